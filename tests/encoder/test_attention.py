"""Torch's varlen attention as the transformers implementation "f2llm_varlen": registration, the default choice, its
numerics on CPU (the kernel, CUDA-only, replaced by a per-segment sdpa reference behind the same interface), and a
forward + backward on the meta device (torch's fake kernel), where FLOPs of real model sizes are counted."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, Qwen3Config
from transformers.masking_utils import AttentionMaskInterface

import f2llm.attention
import f2llm.recompute
from f2llm.attention import VARLEN, default_attn_implementation, varlen_available
from f2llm.data import pack_sequences, pad_sequences
from f2llm.encoder import Encoder
from tests.helpers import CORPUS, tiny_qwen3, tiny_qwen3_config, tiny_tokenizer

TEXTS = CORPUS[:7]


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qwen3(tmp_path_factory.mktemp("attention"))


class ReferenceKernel:
    """``f2llm.attention._varlen_kernel``'s contract in plain PyTorch: attention inside each segment, causal when
    window_size is (-1, 0), GQA by repeating the KV heads. Records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, *, scale, window_size, enable_gqa):
        assert cu_seqlens.dtype == torch.int32 and isinstance(max_seqlen, int)
        bounds = cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0]
        assert max_seqlen == max(b - a for a, b in itertools.pairwise(bounds))
        heads = (q.shape[1], k.shape[1])
        self.calls.append(dict(scale=scale, window_size=window_size, enable_gqa=enable_gqa, heads=heads))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = torch.empty_like(q)
        for s, e in itertools.pairwise(bounds):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            attn = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=window_size == (-1, 0), scale=scale
            )
            out[s:e] = attn.transpose(0, 1)
        return out


@pytest.fixture
def reference_kernel(monkeypatch: pytest.MonkeyPatch) -> ReferenceKernel:
    kernel = ReferenceKernel()
    monkeypatch.setattr(f2llm.attention, "_varlen_kernel", kernel)
    return kernel


def _alone(encoder: Encoder, ids: list[list[int]]) -> torch.Tensor:
    return torch.cat([encoder(pad_sequences([s], encoder.text_tokenizer.pad_token_id)) for s in ids])


# ------------------------------------------------------------------------------------------------ registration, choice
def test_registered_on_import(qwen3_path) -> None:
    assert VARLEN == "f2llm_varlen"
    assert transformers.AttentionInterface()[VARLEN] is f2llm.attention.varlen_attention_forward
    assert AttentionMaskInterface()[VARLEN] is f2llm.attention.varlen_attention_mask
    # No mask is ever built: none without padding, the 2-D padding mask as is with it.
    mask = f2llm.attention.varlen_attention_mask
    assert mask(batch_size=1, q_length=8, kv_length=8) is None
    padding = torch.ones(2, 8, dtype=torch.bool)
    assert torch.equal(mask(batch_size=2, q_length=8, kv_length=8, attention_mask=padding), padding)
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation=VARLEN)
    assert encoder.attn_implementation == VARLEN and encoder.model.config._attn_implementation == VARLEN


@pytest.mark.parametrize(
    ("device", "model_type", "dtype", "flash", "varlen", "expected"),
    [
        ("cuda", "qwen3", torch.bfloat16, True, True, "flash_attention_2"),
        ("cuda", "qwen3", torch.bfloat16, False, True, VARLEN),
        ("cuda", "qwen3", torch.float16, False, True, VARLEN),
        ("cuda", "qwen3", torch.bfloat16, False, False, "sdpa"),  # torch < 2.13: said once
        ("cuda", "qwen3", torch.float32, True, True, "sdpa"),  # flash kernels take bf16 / fp16 only
        ("cuda", "bert", torch.bfloat16, True, True, "sdpa"),
        ("cpu", "qwen3", torch.bfloat16, True, True, "sdpa"),
    ],
)
def test_default_attention(
    monkeypatch: pytest.MonkeyPatch, caplog, device, model_type, dtype, flash, varlen, expected
) -> None:
    monkeypatch.setattr(f2llm.attention, "is_flash_attn_2_available", lambda: flash)
    monkeypatch.setattr(f2llm.attention, "varlen_available", lambda: varlen)
    f2llm.attention._warn_no_varlen.cache_clear()
    with caplog.at_level(logging.WARNING, logger="f2llm.attention"):
        assert default_attn_implementation(model_type, device, dtype) == expected
        default_attn_implementation(model_type, device, dtype)
    warned = [r for r in caplog.records if "varlen_attn" in r.getMessage()]
    fell_back = device == "cuda" and model_type == "qwen3" and dtype != torch.float32 and not (flash or varlen)
    assert len(warned) == int(fell_back)


def test_varlen_needs_torch_with_window_size_and_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older torch's varlen_attn (no window_size / enable_gqa) counts as unavailable: decoders fall back to sdpa."""
    import torch.nn.attention.varlen as varlen

    assert varlen_available()  # torch 2.13 here

    def estimate_on_meta() -> tuple[int, int]:
        with torch.device("meta"):
            model = AutoModel.from_config(tiny_qwen3_config(100))
        return f2llm.recompute.estimate_activation_profile(model, "sdpa", torch.float32, torch.float32, decoder=True)

    with_kernel = estimate_on_meta()

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("not called")

    monkeypatch.setattr(varlen, "varlen_attn", old_varlen_attn)
    f2llm.attention._torch_varlen_attn.cache_clear()
    try:
        assert not varlen_available()
        q = torch.zeros(6, 2, 8)
        cu = torch.tensor([0, 6], dtype=torch.int32)
        with pytest.raises(RuntimeError, match=r"needs torch\.nn\.attention\.varlen\.varlen_attn"):
            f2llm.attention._varlen_kernel(q, q, q, cu, 6, scale=None, window_size=(-1, 0), enable_gqa=False)
        # The activation estimate (gradient_checkpointing: auto, the default) still measures on the meta device,
        # through a stand-in that saves what the kernel saves: the same bytes per token as with the real kernel.
        (fixed, per_token), (kernel_fixed, kernel_per_token) = estimate_on_meta(), with_kernel
        assert per_token == kernel_per_token and abs(fixed - kernel_fixed) < 64  # the kernel also keeps cu_seqlens
    finally:
        monkeypatch.undo()
        f2llm.attention._torch_varlen_attn.cache_clear()
    assert varlen_available()


# ------------------------------------------------------------------------------------------------ numerics on CPU
def test_packed_and_padded_equal_texts_alone(qwen3_path, reference_kernel: ReferenceKernel, monkeypatch) -> None:
    """Every layout through "f2llm_varlen" gives each text's embedding run alone through sdpa; the encoder passes the
    collator's segments and host-known lengths, so transformers never looks for packing (a host sync)."""
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as fa_utils

    def no_host_sync(*args, **kwargs):
        raise AssertionError("segments read back from the device")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", no_host_sync)
    monkeypatch.setattr(fa_utils, "prepare_fa_kwargs_from_position_ids", no_host_sync)
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation=VARLEN)
    reference = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa")
    ids = reference.tokenize(TEXTS)
    pad = reference.text_tokenizer.pad_token_id
    assert pack_sequences(ids, 40, pad).input_ids.shape[0] > 1
    with torch.no_grad():
        expected = _alone(reference, ids)
        for name, batch in {
            "right": pad_sequences(ids, pad, "right"),
            "left": pad_sequences(ids, pad, "left"),
            "packed-rows": pack_sequences(ids, 40, pad),
            "packed-one-row": pack_sequences(ids, 4096, pad),
        }.items():
            torch.testing.assert_close(encoder(batch), expected, atol=1e-5, rtol=0, msg=name)
    config = encoder.model.config
    assert reference_kernel.calls and all(
        c["window_size"] == (-1, 0)
        and c["scale"] == config.head_dim**-0.5
        and c["enable_gqa"]
        and c["heads"] == (config.num_attention_heads, config.num_key_value_heads)
        for c in reference_kernel.calls
    )


def test_gradients_equal_sdpa(qwen3_path, reference_kernel: ReferenceKernel) -> None:
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation=VARLEN).train()
    reference = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa").train()
    ids = reference.tokenize(TEXTS)
    pad = reference.text_tokenizer.pad_token_id
    weights = torch.randn(len(ids), encoder.embedding_dim)

    def grads(model: Encoder, batch) -> list[torch.Tensor]:
        model.zero_grad()
        (model(batch) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = grads(reference, pad_sequences(ids, pad))
    for batch in (pack_sequences(ids, 40, pad), pad_sequences(ids, pad, "left")):
        for got, want in zip(grads(encoder, batch), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_transformers_padding_mask_and_packed_position_ids(qwen3_path, reference_kernel: ReferenceKernel) -> None:
    """Called as transformers calls any implementation: a left-padded batch with its 2-D mask (the real tokens are
    gathered), and packed rows told apart by position ids only, give sdpa's hidden states on every real token."""
    varlen = AutoModel.from_pretrained(qwen3_path, attn_implementation=VARLEN)
    sdpa = AutoModel.from_pretrained(qwen3_path, attn_implementation="sdpa")
    ids = Encoder.from_pretrained(qwen3_path).tokenize(TEXTS)
    with torch.no_grad():
        b = pad_sequences(ids, 0, "left")
        inputs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        real = b.attention_mask.bool()
        got, want = (m(**inputs, use_cache=False).last_hidden_state for m in (varlen, sdpa))
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        p = pack_sequences(ids, 4096, 0)
        inputs = dict(input_ids=p.input_ids, position_ids=p.position_ids)
        got, want = (m(**inputs, use_cache=False).last_hidden_state for m in (varlen, sdpa))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_refuses_attention_dropout() -> None:
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match="no attention dropout"):
        f2llm.attention.varlen_attention_forward(torch.nn.Module(), q, q[:, :2], q[:, :2], None, dropout=0.1)


# ------------------------------------------------------------------------------------------------ meta device
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("dims", ["tiny", "qwen3-0.6b"])
def test_meta_forward_and_backward_count_varlen_flops(dims: str) -> None:
    """The real kernel's fake (meta) implementation runs a packed forward + backward with no data and no host read;
    torch's FLOP counter sees the varlen attention and its backward."""
    tokenizer = tiny_tokenizer()
    config = tiny_qwen3_config(len(tokenizer)) if dims == "tiny" else Qwen3Config(**QWEN3_06B)
    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation=VARLEN)
    encoder = Encoder(model, tokenizer).train()
    lengths = [37, 120, 5, 64, 201]
    ids = [[1 + i % 300 for i in range(n)] for n in lengths]
    for batch in (pack_sequences(ids, 4096, 0), pack_sequences(ids, 256, 0), pad_sequences(ids, 0)):
        with FlopCounterMode(display=False) as counter:
            emb = encoder(batch)
            emb.sum().backward()
        assert emb.shape == (len(ids), config.hidden_size) and emb.device.type == "meta"
        ops = {str(op) for op in counter.get_flop_counts()["Global"]}
        assert {"torch_attn._varlen_attn", "torch_attn._varlen_attn_backward"} <= ops, ops
        model.zero_grad(set_to_none=True)
