"""The training engine end to end on a tiny Qwen3: ranks, gradient cache, DeepSpeed, resume, NaN policy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from f2llm.config import load_config
from f2llm.loss import LossOutput
from f2llm.model import Encoder
from f2llm.trainer import NonFiniteError, Runtime, Trainer, WarmupCosine
from tests.helpers import make_rows, tiny_qwen3, write_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
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
    import yaml

    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root


def single_process(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=f"weight {key}")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(workdir: Path, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    script = str(ROOT / "train" / "train.py")
    args = ["--config", str(workdir / "base.yaml"), f"output_dir={out}", *overrides]
    if nproc == 1:
        return [sys.executable, script, *args]
    launch = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return [sys.executable, *launch, script, *args]


def run(cmd: list[str], timeout: int = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


# ------------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.01)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(9) == pytest.approx(0.5) and s(14) == 0.01 and s(100) == 0.01
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


# ------------------------------------------------------------------------------------------------ single process
def test_single_process_run(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run", "tensorboard=true", "plot=true")
    initial = {k: v.clone() for k, v in trainer.encoder.model.state_dict().items()}
    final = trainer.train()
    rows = metrics(tmp_path / "run")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {r["source"] for r in train_rows} == {"msmarco", "banking77"}
    for r in train_rows:  # in-batch loss only for retrieval sources
        assert (r["train/in_batch"] > 0) == (r["source"] == "msmarco")
        assert r["train/loss"] == pytest.approx(r["train/hard"] + r["train/in_batch"], rel=1e-6)
        assert r["train/tokens_per_s"] > 0 and r["train/peak_memory_mib"] > 0 and r["train/grad_norm"] > 0
    assert [r["train/lr"] for r in train_rows[:2]] == pytest.approx([5e-4, 1e-3])  # warmup
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    # The final model is the trained one and loads back.
    state = trainer.encoder.model.state_dict()
    assert any(not torch.equal(state[k], initial[k]) for k in initial)
    loaded = Encoder.load(final)
    texts = ["q 1 0 a man", "What is the capital of France?"]
    torch.testing.assert_close(torch.from_numpy(loaded.encode(texts, show_progress=False)),
                               torch.from_numpy(trainer.encoder.encode(texts, show_progress=False)))  # fmt: skip


def test_gradient_cache_matches_one_forward(workdir: Path, tmp_path: Path) -> None:
    single_process(workdir, tmp_path / "plain").train()
    single_process(workdir, tmp_path / "cached", "grad_cache.enabled=true", "grad_cache.chunk_texts=5").train()
    single_process(workdir, tmp_path / "tokens", "grad_cache.enabled=true", "grad_cache.chunk_tokens=40").train()
    assert_same_weights(tmp_path / "plain", tmp_path / "cached", atol=1e-5)
    assert_same_weights(tmp_path / "plain", tmp_path / "tokens", atol=1e-5)
    losses = [[r["train/loss"] for r in metrics(tmp_path / name) if "train/loss" in r] for name in ("plain", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_packed_training_matches_padded(workdir: Path, tmp_path: Path) -> None:
    single_process(workdir, tmp_path / "padded").train()
    single_process(workdir, tmp_path / "packed", "data.packing=true", "data.max_tokens=128").train()
    assert_same_weights(tmp_path / "padded", tmp_path / "packed", atol=1e-5)


# ------------------------------------------------------------------------------------------------ NaN policy
def poison_step(trainer: Trainer, bad_step: int) -> None:
    """Make the loss NaN at trainer step ``bad_step`` (1-based)."""
    original = trainer.loss_fn.forward

    def forward(*args, **kwargs) -> LossOutput:
        out = original(*args, **kwargs)
        if trainer.step + 1 == bad_step and torch.is_grad_enabled():
            return LossOutput(*(t * float("nan") for t in out))
        return out

    trainer.loss_fn.forward = forward


def test_nan_loss_stops_naming_step_and_source(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run")
    poison_step(trainer, 3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 .*source '(msmarco|banking77)'"):
        trainer.train()


@pytest.mark.parametrize("grad_cache", ["false", "true"])
def test_nan_loss_skips_step_when_configured(workdir: Path, tmp_path: Path, grad_cache: str) -> None:
    trainer = single_process(workdir, tmp_path / "run", "nan_policy=skip", f"grad_cache.enabled={grad_cache}")
    poison_step(trainer, 3)
    snapshots = []
    original_step = trainer.train_step

    def train_step(batch):
        snapshots.append({k: v.clone() for k, v in trainer.encoder.model.state_dict().items()})
        return original_step(batch)

    trainer.train_step = train_step
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert any(r.get("skipped") == 1 and r["step"] == 3 for r in rows)
    # Step 3 changed nothing: the weights before step 4 equal those before step 3.
    for key, before in snapshots[2].items():
        assert torch.equal(before, snapshots[3][key]), key


def test_nan_gradient_is_caught(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run")
    param = next(trainer.encoder.parameters())
    param.register_hook(lambda g: g * float("nan") if trainer.step + 1 == 2 else g)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 2"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_rank(workdir: Path, tmp_path: Path) -> None:
    """2 ranks x B/2 queries (in-batch positives gathered with gradient) == 1 rank x B: loss and weights."""
    run(train_command(workdir, tmp_path / "one", "data.batch_size=4"))
    run(train_command(workdir, tmp_path / "two", "data.batch_size=2", nproc=2))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for key in ("train/loss", "train/hard", "train/in_batch", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero2_matches_ddp(workdir: Path, tmp_path: Path) -> None:
    ds = ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}")
    run(train_command(workdir, tmp_path / "ddp", "data.batch_size=2", nproc=2))
    run(train_command(workdir, tmp_path / "zero2", "data.batch_size=2", "grad_cache.enabled=true", *ds, nproc=2))
    assert_same_weights(tmp_path / "ddp", tmp_path / "zero2", atol=1e-5)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_identical(workdir: Path, tmp_path: Path) -> None:
    """kill -9 mid-run, rerun the same command: it resumes and ends with exactly the uninterrupted weights."""
    settings = (f"model.name_or_path={workdir / 'tiny-qwen3-1'}", "optim.max_steps=10", "validate_every=100")
    run(train_command(workdir, tmp_path / "straight", *settings))

    cmd = train_command(workdir, tmp_path / "killed", *settings)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # past the step-4 checkpoint
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    assert (tmp_path / "killed" / "checkpoints" / "step-00000004").exists()

    run(cmd)  # same command: resume="auto" picks the newest checkpoint
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{key} differs after resume"
