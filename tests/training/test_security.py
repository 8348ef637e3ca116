"""Loading never runs code from the files it reads: a malicious pickle planted in a checkpoint folder, a model folder
or the embedding cache is refused without being executed, and code shipped in a model folder is never imported.

Each payload, when unpickled, creates a canary file; every test first proves its payload is live (an unsafe
``torch.load`` / ``np.load`` does create the canary), then that f2llm refuses the file and the canary never appears.
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from f2llm.config import load_config
from f2llm.distributed import Runtime, free_port
from f2llm.encoder import Encoder
from f2llm.evaluation.encoding import cache_path, encode_cached
from f2llm.trainer import Trainer
from tests.helpers import HANG_BOUND, make_rows, tiny_qwen3, training_env, write_source

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")
FORMATS = ("zip", "legacy")  # torch.save's archive format and its pre-1.6 plain-pickle format


class Canary:
    """Unpickling this object opens (creates) ``path``: proof that the loader ran code chosen by the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def plant(file: Path, canary: Path, fmt: str) -> None:
    """Write a torch checkpoint file whose unpickling creates ``canary``, in the given serialization format."""
    payload = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [], "hook": Canary(canary)}
    torch.save(payload, file, _use_new_zipfile_serialization=fmt == "zip")


@pytest.fixture(autouse=True)
def _payloads_are_live(tmp_path: Path) -> None:
    # Without this, a payload that never ran code would make every test below pass vacuously.
    for fmt in FORMATS:
        canary = tmp_path / f"live-{fmt}"
        plant(tmp_path / f"live-{fmt}.pt", canary, fmt)
        torch.load(tmp_path / f"live-{fmt}.pt", weights_only=False)
        assert canary.exists(), f"the {fmt} payload does not run code: the tests below would prove nothing"
        canary.unlink()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security")
    model = tiny_qwen3(root)
    write_source(root / "data" / "msmarco.parquet", make_rows(24, 1))
    config = {
        "model": {"name_or_path": str(model), "max_length": 32, "gradient_checkpointing": False},
        "data": {
            "paths": [str(root / "data" / "msmarco.parquet")],
            "batch_size": 4,
            "cache_dir": str(root / "cache"),
            "validation_fraction": 0.0,
            "sources": {"msmarco": {"num_negatives": 1}},
        },
        "optim": {"lr": 1e-3, "warmup_steps": 1, "epochs": 1, "max_steps": 2},
        "save_every": 2,
        "output_dir": str(root / "run"),
        "tensorboard": False,
        "plot": False,
    }
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trainer(workdir: Path) -> Trainer:
    """A trained run with a checkpoint at step 2; the returned trainer is a fresh one, not resumed."""
    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    Trainer.from_config(load_config(workdir / "base.yaml"), runtime).train()
    fresh = Trainer.from_config(load_config(workdir / "base.yaml", ["resume=never"]), runtime)
    assert fresh.step == 0
    return fresh


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["optimizer.pt", "rng-rank0.pt"])
def test_resume_refuses_a_pickle_planted_in_the_checkpoint(
    trainer: Trainer, workdir: Path, tmp_path: Path, name: str, fmt: str
) -> None:
    checkpoint = tmp_path / "step-00000002"
    shutil.copytree(workdir / "run" / "checkpoints" / "step-00000002", checkpoint)
    trainer.config.resume = str(checkpoint)
    trainer.maybe_resume()  # the genuine checkpoint resumes
    assert trainer.step == 2

    canary = tmp_path / "canary"
    plant(checkpoint / name, canary, fmt)
    with pytest.raises(RuntimeError, match=f"{checkpoint / name}: refusing to load"):
        trainer.maybe_resume()
    assert not canary.exists(), f"resuming unpickled {name} and ran its code"


def test_resume_refuses_a_pickle_in_place_of_the_safetensors_weights(
    trainer: Trainer, workdir: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "step-00000002"
    shutil.copytree(workdir / "run" / "checkpoints" / "step-00000002", checkpoint)
    canary = tmp_path / "canary"
    plant(checkpoint / "model.safetensors", canary, "zip")
    trainer.config.resume = str(checkpoint)
    with pytest.raises(Exception, match=r"(?i)safetensor|header"):
        trainer.maybe_resume()
    assert not canary.exists()


# ------------------------------------------------------------------------------------------------ model folders
def model_folder_with_pickled_weights(source: Path, folder: Path, canary: Path, fmt: str) -> Path:
    """A copy of ``source`` whose weights are a malicious pytorch_model.bin and no safetensors file."""
    shutil.copytree(source, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    plant(folder / "pytorch_model.bin", canary, fmt)
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_pretrained_refuses_pickled_weights(workdir: Path, tmp_path: Path, fmt: str) -> None:
    """transformers >= 5 loads .bin weights with torch.load(weights_only=True) (and requires torch >= 2.6)."""
    canary = tmp_path / "canary"
    folder = model_folder_with_pickled_weights(workdir / "tiny-qwen3-0", tmp_path / "model", canary, fmt)
    with pytest.raises(Exception, match=r"(?i)weights only load failed|weights_only"):
        Encoder.from_pretrained(folder)
    assert not canary.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoder_load_refuses_pickled_weights(workdir: Path, tmp_path: Path, fmt: str) -> None:
    saved = tmp_path / "saved"
    Encoder.from_pretrained(workdir / "tiny-qwen3-0").save_pretrained(saved)
    canary = tmp_path / "canary"
    folder = model_folder_with_pickled_weights(saved, tmp_path / "model", canary, fmt)
    with pytest.raises(Exception, match=r"(?i)weights only load failed|weights_only"):
        Encoder.load(folder)
    assert not canary.exists()


@pytest.mark.parametrize("model_type", ["qwen3", "f2llm-unknown"])
def test_code_shipped_in_a_model_folder_is_never_imported(workdir: Path, tmp_path: Path, model_type: str) -> None:
    """config.json / tokenizer_config.json may point at Python files in the folder (auto_map). Without
    trust_remote_code they are never imported: a known model type loads its built-in class, an unknown one is
    refused."""
    folder = tmp_path / "model"
    shutil.copytree(workdir / "tiny-qwen3-0", folder)
    canary = tmp_path / "canary"
    (folder / "remote_code.py").write_text(
        f"open({str(canary)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast as RemoteTokenizer, Qwen3Config as RemoteConfig, "
        "Qwen3Model as RemoteModel\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "remote_code.RemoteConfig", "AutoModel": "remote_code.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "remote_code.RemoteTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if model_type == "qwen3":
        encoder = Encoder.from_pretrained(folder)
        assert type(encoder.model).__module__.startswith("transformers.models.qwen3")
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            Encoder.from_pretrained(folder)
    assert not canary.exists(), "code from the model folder was imported"


# ------------------------------------------------------------------------------------------------ embedding cache
def test_embedding_cache_refuses_pickled_arrays(workdir: Path, tmp_path: Path) -> None:
    """The evaluation cache reads .npy files with numpy's default allow_pickle=False."""
    encoder = Encoder.from_pretrained(workdir / "tiny-qwen3-0")
    texts = ["a planted cache entry", "second text"]
    path = cache_path(tmp_path, "model-key", texts)
    canary = tmp_path / "canary"
    np.save(path, np.array([Canary(canary), Canary(canary)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        encode_cached(encoder, texts, cache_dir=tmp_path, model_key="model-key", show_progress=False)
    assert not canary.exists()


# ------------------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.slow
def test_deepspeed_resume_refuses_a_planted_pickle(workdir: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((workdir / "base.yaml").read_text())
    config.update(
        engine="deepspeed",
        deepspeed_config=str(ROOT / "train" / "configs" / "zero2.json"),
        output_dir=str(tmp_path / "run"),
    )
    (tmp_path / "deepspeed.yaml").write_text(yaml.safe_dump(config))
    canary = tmp_path / "canary"
    plant(tmp_path / "payload.pt", canary, "zip")
    env = training_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cmd = [
        sys.executable,
        str(WORKER),
        "deepspeed-resume",
        str(tmp_path / "deepspeed.yaml"),
        str(tmp_path / "payload.pt"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not canary.exists(), f"DeepSpeed's resume unpickled the planted file and ran its code: {outcome}"
    assert not outcome["resumed"]
