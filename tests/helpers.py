"""Shared test helpers: a tiny random Qwen3 with a real (small, in-test trained) tokenizer, and F2LLM-format files.

No model hub is reached: the tokenizer is a byte-level BPE trained on :data:`CORPUS` in a few milliseconds, with
``<|endoftext|>`` as both EOS and pad token, like Qwen3 base tokenizers (the pad == EOS trap of the recipe).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from f2llm.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]

EOS = "<|endoftext|>"
CORPUS = [
    "A man is playing a guitar on the stage.",
    "Two dogs run through the snowy park together.",
    "What is the capital of France? Paris is the capital.",
    "Scientists found that the protein binds to the receptor.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my card PIN at the bank?",
    "i feel so happy and grateful today",
    "The committee approved the new budget on Tuesday evening.",
    "Retrieval augmented generation combines search with language models.",
    "Embeddings map texts to vectors so that similar texts are close.",
]


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text tokenizes, no unknown token) with pad == eos, like a Qwen3 base tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_qwen3_config(vocab_size: int, **overrides) -> transformers.Qwen3Config:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return transformers.Qwen3Config(**kwargs)


def tiny_qwen3(
    tmp_path: Path, seed: int = 0, name: str | None = None, vocab_size: int = 400, **config_overrides
) -> Path:
    """Save a random tiny Qwen3 (causal-LM checkpoint, like a base model) + tokenizer of ``vocab_size`` entries
    under ``name`` (default ``tiny-qwen3-{seed}``); returns the folder."""
    path = Path(tmp_path) / (name or f"tiny-qwen3-{seed}")
    if (path / "config.json").exists():
        return path
    tokenizer = tiny_tokenizer(vocab_size=vocab_size)
    config = tiny_qwen3_config(len(tokenizer), **config_overrides)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    # Random init gives tiny weights whose outputs are nearly identical across texts; widen them so that
    # embeddings of different texts differ clearly and comparisons are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_source(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Write F2LLM-format rows (dicts of column -> text) as parquet or jsonl (chosen by the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "parquet":
        columns = list(rows[0])
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_rows(n: int, num_negatives: int, prefix: str = "") -> list[dict]:
    """n distinct rows with distinct texts of varied lengths."""
    words = " ".join(CORPUS).split()
    rows = []
    for i in range(n):
        row = {"query": _text(words, prefix, "q", i), "passage": _text(words, prefix, "p", i)}
        for j in range(1, num_negatives + 1):
            row[f"negative_{j}"] = _text(words, prefix, "n", i, j)
        rows.append(row)
    return rows


def _text(words: list[str], prefix: str, tag: str, i: int, j: int = 0) -> str:
    length = 2 + (i * 7 + j * 3) % 11
    return f"{prefix}{tag} {i} {j} " + " ".join(words[(i + j + t) % len(words)] for t in range(length))


class LookupEncoder:
    """A TextEncoder embedding each text by a fixed table (KeyError for a text the test did not plan).

    Outputs are L2-normalized, as Encoder's; every call is recorded as (texts, instruction).
    """

    def __init__(self, table: dict[str, np.ndarray], pooling: str = "mean") -> None:
        self.table = table
        self.pooling = pooling
        self.calls: list[tuple[list[str], str | None]] = []

    def encode(
        self, texts: list[str], *, batch_size: int = 32, instruction: str | None = None, show_progress: bool = True
    ) -> np.ndarray:
        self.calls.append((list(texts), instruction))
        emb = np.stack([self.table[t] for t in texts]).astype(np.float32)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py imported as a module (its folder on sys.path for `common`), removed afterwards."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------ training runs
def trainer_workdir(root: Path, **updates: Any) -> Path:
    """Tiny Qwen3s (one without dropout, one with), two sources and base.yaml: 4 short steps of f2llm train.

    ``updates``: a dict per section (model, data, optim) merged into it, or a top-level key's value.
    """
    import yaml

    tiny_qwen3(root)  # no dropout: runs with different chunking / ranks must agree exactly
    tiny_qwen3(root, seed=1, attention_dropout=0.2)  # dropout on: resume must replay the RNG
    write_source(root / "data" / "msmarco.parquet", make_rows(70, 3))
    write_source(root / "data" / "banking77.parquet", make_rows(40, 1, prefix="b "))
    config = {
        "model": {"name_or_path": str(root / "tiny-qwen3-0"), "max_length": 64, "gradient_checkpointing": False},
        "data": {
            "paths": [str(root / "data" / "msmarco.parquet"), str(root / "data" / "banking77.parquet")],
            "batch_size": 4,
            "cache_dir": str(root / "cache"),
            "validation_fraction": 0.1,
            "sources": {"msmarco": {"num_negatives": 2}, "banking77": {"num_negatives": 1}},
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": 1, "max_steps": 4},
        "log_every": 1,
        "validate_every": 2,
        "save_every": 2,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in updates.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root


def train_command(workdir: Path, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """train/train.py with workdir's base.yaml, as one process or under torchrun with ``nproc`` ranks."""
    script = str(ROOT / "train" / "train.py")
    args = ["--config", str(workdir / "base.yaml"), f"output_dir={out}", *overrides]
    if nproc == 1:
        return [sys.executable, script, *args]
    torchrun = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return [sys.executable, *torchrun, script, *args]


# The thread settings of every process a test launches. Runs compared bit for bit (a killed run and its resume
# against an uninterrupted one, 1 rank against 2) add up floats in the same order only with the same number of
# threads, and torch otherwise takes one per core: 1 on one machine, 2 or more on the next. One thread per process
# also keeps `pytest -n 2` beside 2-rank jobs from oversubscribing 2 cores.
THREAD_SETTINGS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# How long a test waits for a process it launched before it calls it hung. A bound on hangs, not a claim about
# speed: CI's 2-core machines run the same job 2-5x slower from one day to the next, and `pytest -n 2` runs a
# second test beside it. Performance is measured by benchmarks, never by these waits.
HANG_BOUND = 1800


def training_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test launches: this one's, with :data:`THREAD_SETTINGS` and ``extra``, less
    pytest-xdist's own variables (the child is a fresh process, not a pytest worker)."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return {**own, **THREAD_SETTINGS, **extra}


def launch(cmd: list[str], *, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` in the background with :func:`training_env` (``env``: extra variables); the caller waits."""
    return subprocess.Popen(cmd, env=training_env(**(env or {})), **popen)


def run(cmd: list[str], timeout: float = HANG_BOUND, *, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` to success with :func:`training_env` (``env``: extra variables); returns its stdout."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=training_env(**(env or {})))
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=f"weight {key}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_benchmark(script: str, *args: str, out: Path) -> None:
    """Run ``benchmarks/<script> *args --out out`` to success in a fresh process (Triton through its interpreter)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)]
    result = subprocess.run(
        cmd, env=training_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=HANG_BOUND
    )
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def train_step_with_gradients(trainer: Any) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """One ``Trainer.train_step`` on the trainer's first retrieval batch: (its result, the batch, every parameter's
    gradient as the step had it just before clipping and the update)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    clip = trainer.engine.clip

    def recording_clip():
        seen["grads"] = {n: p.grad.clone() for n, p in trainer.encoder.model.named_parameters() if p.grad is not None}
        return clip()

    trainer.engine.clip = recording_clip
    batch = next(b for b in trainer.sampler if b.kind == "retrieval")
    try:
        result = trainer.train_step(batch)
    finally:
        trainer.engine.clip = clip
    return result, batch, seen["grads"]
