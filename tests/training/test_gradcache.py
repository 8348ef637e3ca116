"""The gradient cache gives the gradients of one big batch, with dropout on."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Model

from f2llm.gradcache import GradientCache, RngState, backward_chunks, chunk_by_tokens, embed_chunks, split_to_count
from f2llm.kernels import pool
from tests.helpers import tiny_qwen3_config


def tiny_qwen3(dropout: float) -> Qwen3Model:
    # eager applies attention dropout with torch's RNG, as every backend does
    config = tiny_qwen3_config(101, hidden_size=32, intermediate_size=64, head_dim=8, attention_dropout=dropout)
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    return Qwen3Model(config).float().train()


def make_chunks(n_texts: int, chunk: int, L: int = 9) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (n_texts, L), generator=g)
    lengths = torch.randint(2, L + 1, (n_texts,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return [{"input_ids": ids[i : i + chunk], "attention_mask": mask[i : i + chunk]} for i in range(0, n_texts, chunk)]


def encoder(model: Qwen3Model):
    def encode(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        return pool(hidden, batch["attention_mask"], mode="last")

    return encode


def contrastive_loss(emb: torch.Tensor) -> torch.Tensor:
    """First half queries, second half their positives; in-batch negatives."""
    q, d = emb.chunk(2)
    return F.cross_entropy(q @ d.T / 0.05, torch.arange(q.shape[0]))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [3, 5, 16])
def test_same_gradients_as_one_big_batch_with_dropout(chunk: int) -> None:
    model = tiny_qwen3(dropout=0.3)
    chunks = make_chunks(16, chunk)
    encode = encoder(model)

    # Reference: the whole batch with the full graph kept, chunks run in the same order from the same seed,
    # so dropout draws the same masks as the gradient cache's pass 1.
    torch.manual_seed(7)
    ref_loss = contrastive_loss(torch.cat([encode(c) for c in chunks]))
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    torch.manual_seed(7)
    result = GradientCache(encode).step(chunks, contrastive_loss)
    got = grads(model)

    torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    assert got.keys() == ref_grads.keys() and len(got) > 0
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def test_dropout_is_live_and_replay_matters() -> None:
    """Guards the test above: with dropout the passes differ unless the RNG is replayed."""
    model = tiny_qwen3(dropout=0.3)
    chunk = make_chunks(4, 4)[0]
    encode = encoder(model)
    with torch.no_grad():
        state = RngState.capture()
        a = encode(chunk)
        b = encode(chunk)
        with state.replay():
            c = encode(chunk)
        d = encode(chunk)
    assert not torch.allclose(a, b), "dropout had no effect: the replay test would be vacuous"
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    # replay() restores the generator afterwards: d continues the stream after b, so it differs from a and b.
    assert not torch.allclose(d, b) and not torch.allclose(d, a)


def test_sync_suppressed_for_all_but_last_chunk() -> None:
    model = tiny_qwen3(dropout=0.0)
    chunks = make_chunks(12, 4)
    syncing: list[bool] = []
    suppressed = {"on": False}

    @contextlib.contextmanager
    def no_sync():
        suppressed["on"] = True
        yield
        suppressed["on"] = False

    def backward(t: torch.Tensor) -> None:
        syncing.append(not suppressed["on"])
        t.backward()

    GradientCache(encoder(model), no_sync=no_sync, backward=backward).step(chunks, contrastive_loss)
    assert syncing == [False, False, True]


def test_loss_fn_may_return_aux_and_must_be_scalar() -> None:
    model = tiny_qwen3(dropout=0.0)
    chunks = make_chunks(8, 4)
    cache = GradientCache(encoder(model))
    out = cache.step(chunks, lambda e: (contrastive_loss(e), {"n": e.shape[0]}))
    assert out.aux == {"n": 8} and out.embeddings.shape == (8, 32)
    with pytest.raises(ValueError, match="scalar"):
        cache.step(chunks, lambda e: e.sum(-1))
    with pytest.raises(ValueError, match="no chunks"):
        cache.step([], contrastive_loss)


def test_backward_chunks_hands_each_chunk_exactly_its_cached_gradient_in_its_dtype() -> None:
    """Pass 2's surrogate gives the parameters exactly what back-propagating the cached gradient does, cast to the
    embeddings' dtype (bf16 here, the gradient fp32), for chunks of several inputs in one call (the
    sentence-transformers loss's columns); no_sync covers every chunk but the last of all."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(model(x), 0.5).to(torch.bfloat16)

    columns = [list(torch.randn(7, 6).split(3)), list(torch.randn(5, 6).split(2))]  # 3 + 3 chunks
    chunks = [c for column in columns for c in column]
    emb, states = embed_chunks(chunks, encode)
    assert emb.dtype == torch.bfloat16 and emb.shape == (12, 4)
    grad = torch.randn(12, 4)

    reference = []
    offset = 0
    for chunk, state in zip(chunks, states, strict=True):
        model.zero_grad()
        with state.replay():
            out = encode(chunk)
        out.backward(grad[offset : offset + len(chunk)].to(torch.bfloat16))
        offset += len(chunk)
        reference.append([p.grad.clone() for p in model.parameters()])
    expected = [sum(g[i] for g in reference) for i in range(2)]

    model.zero_grad()
    synced: list[bool] = []
    suppressed = {"on": False}

    @contextlib.contextmanager
    def no_sync():
        suppressed["on"] = True
        yield
        suppressed["on"] = False

    def backward(t: torch.Tensor) -> None:
        assert t.dim() == 0
        synced.append(not suppressed["on"])
        t.backward()

    backward_chunks(chunks, states, grad, encode, no_sync, backward)
    assert synced == [False] * 5 + [True]
    for got, ref in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_backward_chunks_refuses_an_encode_that_changes_shape() -> None:
    chunks = [torch.ones(2, 3), torch.ones(3, 3)]
    weight = torch.ones(3, requires_grad=True)
    _, states = embed_chunks(chunks, lambda x: x * weight)
    with pytest.raises(RuntimeError, match="deterministic in shape"):  # pass 2 ends short of the cached rows
        backward_chunks(chunks, states, torch.ones(6, 3), lambda x: x * weight)
    with pytest.raises(RuntimeError, match="deterministic in shape"):  # a chunk gives a row more than it has
        backward_chunks(chunks, states, torch.ones(5, 3), lambda x: torch.cat([x, x[:1]]) * weight)


# ------------------------------------------------------------------------------------------------ chunk counts
def token_lists(lengths: list[int]) -> list[list[int]]:
    return [[0] * n for n in lengths]


@pytest.mark.parametrize("seed", range(20))
def test_split_to_count_gives_exactly_the_count_in_order(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    seqs = token_lists(torch.randint(1, 60, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist())
    budget = 64
    groups = chunk_by_tokens(seqs, budget)
    for count in range(len(groups), len(seqs) + 1):
        split = split_to_count(groups, count)
        assert len(split) == count and all(split)
        assert [s for group in split for s in group] == seqs  # same texts, same order (identity)
        assert all(a is b for a, b in zip([s for g_ in split for s in g_], seqs, strict=True))
        # No chunk grows: each stays within the budget, or is a single over-long text.
        assert all(sum(map(len, c)) <= budget or len(c) == 1 for c in split)


def test_split_to_count_halves_the_largest_chunk() -> None:
    groups = [token_lists([10, 10]), token_lists([30, 5, 5, 20])]
    split = split_to_count(groups, 3)
    assert [[len(s) for s in c] for c in split] == [[10, 10], [30], [5, 5, 20]]


def test_split_to_count_refuses_impossible_counts() -> None:
    groups = [token_lists([3, 4]), token_lists([5])]
    with pytest.raises(ValueError, match="cannot make 4 non-empty groups of 3 sequences"):
        split_to_count(groups, 4)
    with pytest.raises(ValueError, match="already 2 groups"):
        split_to_count(groups, 1)


def test_ranks_agree_on_the_chunk_count() -> None:
    """Two ranks whose token chunking differs in count end with the same count (the larger)."""
    rank0, rank1 = token_lists([50, 50, 50, 50]), token_lists([10, 10, 10, 10])
    natural = [len(chunk_by_tokens(r, 64)) for r in (rank0, rank1)]
    assert natural == [4, 1]
    agreed = [len(split_to_count(chunk_by_tokens(r, 64), max(natural))) for r in (rank0, rank1)]
    assert agreed == [4, 4]


# ------------------------------------------------------------------------------------------------ RNG replay
def test_rng_capture_touches_the_model_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's RNG capture reads the model's GPU only, never every visible GPU (one device sync each)."""
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all") or [torch.zeros(1)] * 8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: calls.append(device) or torch.zeros(1))
    state = RngState.capture(torch.device("cuda", 3))
    assert calls == [torch.device("cuda", 3)] and state.device == torch.device("cuda", 3)
    calls.clear()
    assert RngState.capture(torch.device("cpu")).cuda is None and calls == []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert RngState.capture().device == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
