"""f2llm merge: the average of saved models, checked tensor by tensor against a float64 mean; its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from f2llm.cli import main
from f2llm.encoder import Encoder
from f2llm.merge import MergeError, merge_checkpoints
from tests.helpers import tiny_qwen3


def saved_model(root: Path, seed: int, name: str, dtype: torch.dtype | None = None, **config) -> Path:
    """A tiny Qwen3 saved as f2llm saves final/ (weights, tokenizer, sentence-transformers files)."""
    encoder = Encoder.from_pretrained(tiny_qwen3(root, seed=seed, **config), max_length=64)
    folder = root / name
    encoder.save_pretrained(folder, dtype=dtype)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    return {
        "a": saved_model(root, 0, "a"),
        "b": saved_model(root, 1, "b"),
        "c": saved_model(root, 2, "c"),
        "bf16-a": saved_model(root, 0, "bf16-a", torch.bfloat16),
        "bf16-b": saved_model(root, 1, "bf16-b", torch.bfloat16),
        "wide": saved_model(root, 3, "wide", intermediate_size=96),
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_uniform_merge_is_the_mean_and_loads_everywhere(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(models["a"]), str(models["b"]), "--out", str(out)]) == 0
    a, b, merged = tensors(models["a"]), tensors(models["b"]), tensors(out)
    assert merged.keys() == a.keys()
    for name, value in merged.items():
        expected = (a[name].double() + b[name].double()) / 2
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        assert value.dtype == a[name].dtype
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # the inputs differ: the mean is not either of them
    # The first input's other files come along: it loads as final/ does.
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(out))
    for name, param in model.state_dict().items():
        torch.testing.assert_close(param, merged[name], rtol=0, atol=0, msg=name)
    texts = ["a man is playing a guitar", "two dogs run"]
    ours = Encoder.load(out).encode(texts, show_progress=False)
    st = SentenceTransformer(str(out), device="cpu").encode(texts)
    torch.testing.assert_close(torch.from_numpy(st), torch.from_numpy(ours), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "merge.json").read_text())["weights"] == pytest.approx([0.5, 0.5])


def test_weighted_merge_normalizes_the_weights(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "weighted"
    names = ("a", "b", "c")
    argv = ["merge", *(str(models[n]) for n in names), "--out", str(out), "--weights", "1", "3", "4"]
    assert main(argv) == 0
    assert "0.125, 0.375, 0.5" in capsys.readouterr().out
    inputs = [tensors(models[n]) for n in names]
    for name, value in tensors(out).items():
        expected = 0.125 * inputs[0][name].double() + 0.375 * inputs[1][name].double() + 0.5 * inputs[2][name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_inputs_are_averaged_in_float32_and_written_in_bf16(models: dict[str, Path], tmp_path: Path) -> None:
    out = merge_checkpoints([models["bf16-a"], models["bf16-b"]], tmp_path / "bf16", weights=[1, 2])
    a, b = tensors(models["bf16-a"]), tensors(models["bf16-b"])
    for name, value in tensors(out).items():
        assert value.dtype == torch.bfloat16
        exact = (a[name].double() + 2 * b[name].double()) / 3
        # One bf16 rounding of the mean (unit roundoff 2^-8), plus the float32 sum's own error (2^-24 of the
        # terms' size; visible where the terms cancel). A bf16 sum would be off by ~2^-8 of the terms.
        scale = (a[name].double().abs() + 2 * b[name].double().abs()) / 3
        error = (value.double() - exact).abs()
        assert bool((error <= 2**-8 * exact.abs() + 2**-22 * scale).all()), (name, float(error.max()))


def test_sharded_inputs_keep_their_shards(models: dict[str, Path], tmp_path: Path) -> None:
    """A folder whose weights are split over shards with an index (as save_pretrained writes big models)."""
    sharded = []
    for name in ("a", "b"):
        folder = tmp_path / f"sharded-{name}"
        shutil.copytree(models[name], folder)
        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for file, names in shards.items():
            save_file({k: state[k] for k in names}, str(folder / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        sharded.append(folder)
    out = merge_checkpoints(sharded, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)
    a, b = tensors(models["a"]), tensors(models["b"])
    merged = {k: v for f in shards for k, v in load_file(str(out / f)).items()}
    for name in keys[:4]:
        torch.testing.assert_close(merged[name].double(), (a[name].double() + b[name].double()) / 2, msg=name)
    from transformers import AutoModel

    AutoModel.from_pretrained(str(out))  # the copied index points at the written shards


def without_tensor(source: Path, target: Path, drop: str) -> Path:
    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    del state[drop]
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_merge_refuses_what_it_cannot_average(models: dict[str, Path], tmp_path: Path) -> None:
    a, b = models["a"], models["b"]
    shape = r"wide.*model\.safetensors: tensor layers\.0\.mlp\.\w+_proj\.weight has shape"
    with pytest.raises(MergeError, match=shape):
        merge_checkpoints([a, models["wide"]], tmp_path / "x")
    with pytest.raises(MergeError, match=r"tensor \S+ is torch\.bfloat16, .* has torch\.float32.*final_dtype"):
        merge_checkpoints([a, models["bf16-b"]], tmp_path / "x")
    dropped = without_tensor(b, tmp_path / "dropped", "norm.weight")
    with pytest.raises(MergeError, match=r"dropped does not hold the tensors of .*missing \['norm\.weight'\]"):
        merge_checkpoints([a, dropped], tmp_path / "x")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(b / "config.json", pickled / "config.json")
    torch.save(tensors(b), pickled / "pytorch_model.bin")
    with pytest.raises(MergeError, match=r"pickle files \['pytorch_model\.bin'\]; f2llm merge reads safetensors only"):
        merge_checkpoints([a, pickled], tmp_path / "x")
    with pytest.raises(MergeError, match=r"every weight must be a finite number > 0"):
        merge_checkpoints([a, b], tmp_path / "x", weights=[1, -1])
    with pytest.raises(MergeError, match=r"2 weights for 3 checkpoints"):
        merge_checkpoints([a, b, models["c"]], tmp_path / "x", weights=[1, 1])
    with pytest.raises(MergeError, match=r"at least 2 checkpoints"):
        merge_checkpoints([a], tmp_path / "x")
    with pytest.raises(MergeError, match=r"exists and is not an empty folder"):
        merge_checkpoints([a, b], b)
    with pytest.raises(MergeError, match=r"not a folder"):
        merge_checkpoints([a, tmp_path / "nowhere"], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written by a refused merge


def test_cli_reports_errors_in_one_line(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["merge", str(models["a"]), str(models["b"]), "--out", str(tmp_path / "x"), "--weights", "0", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "f2llm merge: error: --weights: every weight must be a finite number > 0" in err


def test_adapter_folder_is_not_copied(models: dict[str, Path], tmp_path: Path) -> None:
    """A LoRA run's final/ carries its adapter; the merged weights are not that adapter's base: left out."""
    with_adapter = tmp_path / "with-adapter"
    shutil.copytree(models["a"], with_adapter)
    (with_adapter / "adapter").mkdir()
    (with_adapter / "adapter" / "adapter_config.json").write_text("{}")
    out = merge_checkpoints([with_adapter, models["b"]], tmp_path / "merged")
    assert not (out / "adapter").exists()
    assert {p.name for p in models["a"].iterdir()} <= {p.name for p in out.iterdir()}


def test_folders_that_are_not_models_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """A training checkpoint (weights and optimizer state, no config.json), a LoRA run's checkpoint (its adapters
    only), a peft adapter folder and weights holding LoRA matrices would all "merge" into no loadable model."""
    a, b = models["a"], models["b"]
    checkpoint = tmp_path / "checkpoints" / "step-00000010"  # as CheckpointWriter lays out a full fine-tune's
    checkpoint.mkdir(parents=True)
    shutil.copy(b / "model.safetensors", checkpoint / "model.safetensors")
    (checkpoint / "optimizer.pt").write_bytes(b"")
    not_a_model = r"step-00000010: not a model folder \(no config\.json\).*final/ or extra/step-N"
    with pytest.raises(MergeError, match=not_a_model):
        merge_checkpoints([a, checkpoint], tmp_path / "x")

    lora_checkpoint = tmp_path / "lora-checkpoint"  # a LoRA run's: the adapters alone, A and B per layer
    lora_checkpoint.mkdir()
    adapters = {"layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(4, 64),
                "layers.0.self_attn.q_proj.lora_B.default.weight": torch.randn(64, 4)}  # fmt: skip
    save_file(adapters, str(lora_checkpoint / "trainable.safetensors"))
    second_run = shutil.copytree(lora_checkpoint, tmp_path / "lora-checkpoint-2")
    with pytest.raises(MergeError, match=r"adapter-only weights \(trainable\.safetensors\).*final/ or extra/step-N"):
        merge_checkpoints([lora_checkpoint, second_run], tmp_path / "x")
    shutil.copy(a / "config.json", lora_checkpoint / "config.json")  # even beside a config
    with pytest.raises(MergeError, match=r"adapter-only weights"):
        merge_checkpoints([a, lora_checkpoint], tmp_path / "x")

    peft_adapter = tmp_path / "peft-adapter"  # as peft's save_pretrained writes final/adapter
    peft_adapter.mkdir()
    save_file(adapters, str(peft_adapter / "adapter_model.safetensors"))
    (peft_adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(MergeError, match=r"adapter-only weights \(adapter_model\.safetensors, adapter_config\.json\)"):
        merge_checkpoints([a, peft_adapter], tmp_path / "x")

    unmerged = tmp_path / "unmerged"  # a model folder whose weights still hold LoRA matrices
    shutil.copytree(a, unmerged)
    save_file({**tensors(a), **adapters}, str(unmerged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"tensor layers\.0\.self_attn\.q_proj\.lora_[AB]\.default\.weight is a LoRA"):
        merge_checkpoints([unmerged, a], tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / ".tmp-x").exists()


def test_out_inside_an_input_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """--out runs/x/final/merged would put the merge (and its temporary folder) inside the folder being copied."""
    a = tmp_path / "runs" / "x" / "final"
    shutil.copytree(models["a"], a)
    before = sorted(p.relative_to(a) for p in a.rglob("*"))
    for out in (a / "merged", a / "deeper" / "merged", models["b"] / "merged"):
        with pytest.raises(MergeError, match=r"--out .*merged is inside the input .*; write it outside every input"):
            merge_checkpoints([a, models["b"]], out)
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == before  # nothing written into the input
    assert not (models["b"] / "merged").exists() and not (models["b"] / ".tmp-merged").exists()
    sibling = merge_checkpoints([a, models["b"]], a.parent / "merged")  # next to it: fine
    assert (sibling / "model.safetensors").is_file()


def test_a_failure_while_writing_leaves_nothing_behind(models: dict[str, Path], tmp_path: Path) -> None:
    """Integer tensors that differ are found only while averaging, after the temporary folder was made: it goes."""
    with_ints = []
    for name, fill in (("a", 1), ("b", 2)):
        folder = tmp_path / f"ints-{name}"
        shutil.copytree(models[name], folder)
        state = tensors(folder)
        state["counter"] = torch.full((3,), fill, dtype=torch.int64)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with_ints.append(folder)
    out = tmp_path / "out" / "merged"
    with pytest.raises(MergeError, match=r"ints-b: non-float tensor counter differs from .*ints-a's"):
        merge_checkpoints(with_ints, out)
    assert list((tmp_path / "out").iterdir()) == []  # neither merged nor .tmp-merged
