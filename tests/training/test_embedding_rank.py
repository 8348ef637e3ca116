"""Embedding rank (ML-Embed's MEL, ``model.embedding_rank`` / ``model.sample_embedding_rank``) against its formulas.

ML-Embed (its model.py): the token-embedding matrix W is replaced by ``U @ V`` from its SVD at rank r, U scaled by
the singular values; with sampled ranks each step draws k from [64, 128, ..., r] (powers of two up to r, plus r)
with probability proportional to k and embeds with ``(U[:, :k] @ V[:k])[input_ids]``. The references below compute
that in float64 with numpy's SVD and an explicit product, independently of f2llm.embedding_rank.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

from f2llm.config import ConfigError, load_config
from f2llm.distributed import Runtime
from f2llm.embedding_rank import FACTORS_FILE, LowRankEmbedding, rank_of_step, sampled_ranks
from f2llm.encoder import Encoder
from f2llm.trainer import Trainer
from tests.helpers import tiny_qwen3, train_step_with_gradients, trainer_workdir

HIDDEN = 160  # ranks up to 160: ML-Embed's draw is then over 160, 128 and 64
TEMPERATURE = 0.05


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedding_rank")
    trainer_workdir(root)
    tiny_qwen3(root, seed=4, name="tiny-qwen3-wide", hidden_size=HIDDEN, intermediate_size=192)
    return root


def trainer(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(
        workdir / "base.yaml", [f"output_dir={out}", f"model.name_or_path={workdir / 'tiny-qwen3-wide'}", *overrides]
    )
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


# ------------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("rank", [HIDDEN, 64, 7])
def test_factors_are_the_truncated_svd(workdir: Path, tmp_path: Path, rank: int) -> None:
    """U @ V is W's best rank-r approximation (numpy's SVD, float64): W itself at full rank, and the squared error
    is the sum of the dropped singular values squared (Eckart-Young)."""
    W = AutoModel.from_pretrained(workdir / "tiny-qwen3-wide").get_input_embeddings().weight.detach().double().numpy()
    t = trainer(workdir, tmp_path, f"model.embedding_rank={rank}")
    low_rank = t.low_rank
    assert isinstance(t.encoder.model.get_input_embeddings(), LowRankEmbedding) and low_rank.max_rank == rank
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    got = (low_rank.U.detach().double() @ low_rank.V.detach().double()).numpy()
    np.testing.assert_allclose(got, best, atol=1e-5 * np.abs(W).max())
    error = np.square(W - got).sum()
    assert error == pytest.approx(np.square(s[rank:]).sum(), rel=1e-3, abs=1e-6 * np.square(s).sum())
    if rank == HIDDEN:
        np.testing.assert_allclose(got, W, atol=1e-5 * np.abs(W).max())


def test_full_rank_embeds_as_the_original_model(workdir: Path, tmp_path: Path) -> None:
    """At the full rank the factorized encoder's embeddings are the original model's (float32 rounding)."""
    texts = ["a short text", "another, somewhat longer text to embed", "x"]
    original = Encoder.from_pretrained(workdir / "tiny-qwen3-wide", device="cpu").encode(texts, show_progress=False)
    t = trainer(workdir, tmp_path, f"model.embedding_rank={HIDDEN}")
    np.testing.assert_allclose(t.encoder.encode(texts, show_progress=False), original, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sampled ranks
def test_sampled_ranks_follow_ml_embed() -> None:
    """ML-Embed's list and weights: powers of two from 64 up to r, plus r, p(k) = k / sum; the draw depends on
    (seed, step) only, so every process and both gradient-cache passes agree."""
    assert sampled_ranks(512) == ((512, 256, 128, 64), (512 / 960, 256 / 960, 128 / 960, 64 / 960))
    assert sampled_ranks(160)[0] == (160, 128, 64)
    assert sampled_ranks(48)[0] == (48,)
    steps = 40_000
    counts = collections.Counter(rank_of_step(512, 42, step) for step in range(steps))
    for k, p in zip(*sampled_ranks(512), strict=True):
        # 5 standard deviations of a binomial count: a wrong weight (e.g. uniform, 0.25) is far outside.
        assert abs(counts[k] / steps - p) < 5 * math.sqrt(p * (1 - p) / steps), (k, counts)
    assert [rank_of_step(512, 42, s) for s in range(50)] == [rank_of_step(512, 42, s) for s in range(50)]
    assert [rank_of_step(512, 42, s) for s in range(50)] != [rank_of_step(512, 7, s) for s in range(50)]


def reference_loss(model: torch.nn.Module, U: torch.Tensor, V: torch.Tensor, k: int, batch, pad: int) -> torch.Tensor:
    """ML-Embed's forward at rank k, float64: inputs_embeds = (U[:, :k] @ V[:k])[ids], last-token embeddings, F2LLM's
    hard + in-batch InfoNCE on normalized embeddings (no Matryoshka)."""
    seqs = batch.sequences()
    lengths = torch.tensor([len(x) for x in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.as_tensor(x)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    hidden = model(inputs_embeds=(U[:, :k] @ V[:k])[ids], attention_mask=mask).last_hidden_state
    emb = F.normalize(hidden[torch.arange(len(seqs)), lengths - 1], dim=-1)
    B, n = batch.batch_size, batch.num_negatives
    q, pos, neg = emb[:B], emb[B : 2 * B], emb[2 * B :].reshape(B, n, -1)
    group = torch.cat([(q * pos).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", q, neg)], 1) / TEMPERATURE
    hard = F.cross_entropy(group, torch.zeros(B, dtype=torch.long))
    return hard + F.cross_entropy(q @ pos.T / TEMPERATURE, torch.arange(B))


@pytest.mark.parametrize(
    "overrides", [(), ("grad_cache.enabled=true", "grad_cache.chunk_texts=3")], ids=["plain", "gradcache"]
)
def test_step_at_a_sampled_rank_equals_ml_embed(workdir: Path, tmp_path: Path, overrides: tuple[str, ...]) -> None:
    """A step with sampled ranks trains at its drawn rank k: loss and the gradients of U, V and every other
    parameter equal ML-Embed's product-then-index forward in float64 (U's columns beyond k get none)."""
    t = trainer(workdir, tmp_path, f"model.embedding_rank={HIDDEN}", "model.sample_embedding_rank=true", *overrides)
    step = next(s for s in range(50) if rank_of_step(HIDDEN, t.config.seed, s) < HIDDEN)
    t.step = step
    k = rank_of_step(HIDDEN, t.config.seed, step)
    U0, V0 = (p.detach().double().clone() for p in (t.low_rank.U, t.low_rank.V))
    result, batch, got = train_step_with_gradients(t)
    assert t.low_rank.rank == k

    model = AutoModel.from_pretrained(workdir / "tiny-qwen3-wide", dtype=torch.float64)
    U, V = U0.requires_grad_(), V0.requires_grad_()
    total = reference_loss(model, U, V, k, batch, t.encoder.text_tokenizer.pad_token_id)
    total.backward()
    torch.testing.assert_close(result.loss.total.double(), total.detach(), rtol=1e-5, atol=1e-6)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "embed_tokens" not in n}
    ref["embed_tokens.U"], ref["embed_tokens.V"] = U.grad, V.grad
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        err = float((got[name].double() - g).norm() / g.norm().clamp_min(1e-30))
        assert err < 1e-5, (name, err)
    assert float(got["embed_tokens.U"][:, k:].abs().max()) == 0 and float(got["embed_tokens.V"][k:].abs().max()) == 0


# ------------------------------------------------------------------------------------------------ saving, resuming
def test_final_model_holds_u_v_and_loads_everywhere(workdir: Path, tmp_path: Path) -> None:
    """final/ after training with sampled ranks: transformers and sentence-transformers load it as a plain model whose
    embedding matrix is U @ V at the full rank (embeddings equal Encoder's with the factors), U and V are saved
    beside it, and a run started from final/ with the same rank continues from those factors."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    t = trainer(workdir, out, "model.embedding_rank=64", "model.sample_embedding_rank=true", "optim.max_steps=2")
    final = t.train()
    factors = load_file(str(final / FACTORS_FILE))
    assert factors["U"].shape == (t.low_rank.num_embeddings, 64) and factors["V"].shape == (64, HIDDEN)
    weights = load_file(str(final / "model.safetensors"))
    assert not any(k.endswith((".U", ".V")) for k in weights)
    torch.testing.assert_close(
        weights["embed_tokens.weight"], (factors["U"].double() @ factors["V"].double()).float(), rtol=0, atol=1e-6
    )
    texts = ["a short text", "another, somewhat longer text to embed"]
    t.set_embedding_rank(None)
    ours = t.encoder.encode(texts, show_progress=False)
    np.testing.assert_allclose(Encoder.load(final, device="cpu").encode(texts, show_progress=False), ours, atol=1e-5)
    np.testing.assert_allclose(SentenceTransformer(str(final), device="cpu").encode(texts), ours, atol=1e-5)
    assert json.loads((final / "config.json").read_text())["vocab_size"] == t.low_rank.num_embeddings

    again = trainer(workdir, tmp_path / "again", f"model.name_or_path={final}", "model.embedding_rank=64")
    torch.testing.assert_close(again.low_rank.U.detach(), factors["U"])
    torch.testing.assert_close(again.low_rank.V.detach(), factors["V"])


# ------------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.embedding_rank=161",), r"161 is not in \[1, 160\]"),
        (("model.embedding_rank=0",), r"model\.embedding_rank must be > 0"),
        (("model.sample_embedding_rank=true",), r"sample_embedding_rank needs model\.embedding_rank"),
        (("model.embedding_rank=64", "model.lora={}"), r"model\.embedding_rank and model\.lora"),
    ],
)
def test_bad_settings_are_refused_before_the_first_step(
    workdir: Path, tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        trainer(workdir, tmp_path, *overrides)
