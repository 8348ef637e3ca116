"""The training engine end to end on a tiny Qwen3: ranks, gradient cache, DeepSpeed, resume, NaN policy."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from f2llm.config import load_config
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder
from f2llm.loss import LossOutput
from f2llm.trainer import NonFiniteError, Trainer, WarmupCosine
from tests.helpers import (
    assert_same_weights,
    launch,
    make_rows,
    metrics,
    run,
    train_command,
    trainer_workdir,
    weights,
    write_source,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("trainer"))


def single_process(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


# ------------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.01)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(9) == pytest.approx(0.5) and s(14) == 0.01 and s(100) == 0.01
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


@pytest.mark.parametrize("world", [1, 4, 32])
def test_per_process_warmup_is_the_official_v1_schedule(workdir: Path, world: int) -> None:
    """optim.warmup: per_process gives, at every optimizer step, the rate the official v1 code used: transformers'
    cosine schedule with warmup over world x total steps, advanced `world` times per optimizer step (accelerate),
    floored at min_lr."""
    from transformers import get_cosine_schedule_with_warmup

    total, warmup, lr, min_lr = 40, 50, 1e-3, 1e-7
    overrides = [f"optim.warmup_steps={warmup}", "optim.warmup=per_process", f"optim.lr={lr}", f"optim.min_lr={min_lr}"]
    ours = WarmupCosine.from_config(load_config(workdir / "base.yaml", overrides), total_steps=total, world_size=world)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    v1 = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=world * total)
    for step in range(total + 3):
        assert lr * ours(step) == pytest.approx(max(v1.get_last_lr()[0], min_lr), rel=1e-12, abs=1e-15), step
        for _ in range(world):
            optimizer.step()
            v1.step()
    steps = WarmupCosine.from_config(load_config(workdir / "base.yaml", ["optim.warmup_steps=8"]), 20, world_size=4)
    assert [steps(i) for i in range(8)] == pytest.approx([(i + 1) / 8 for i in range(8)])


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


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_identical(workdir: Path, tmp_path: Path) -> None:
    """kill -9 mid-run, rerun the same command: it resumes and ends with exactly the uninterrupted weights."""
    settings = (f"model.name_or_path={workdir / 'tiny-qwen3-1'}", "optim.max_steps=10", "validate_every=100")
    run(train_command(workdir, tmp_path / "straight", *settings))

    cmd = train_command(workdir, tmp_path / "killed", *settings)
    # The same thread settings as the straight run and the resume (helpers.launch / run): bitwise equality of
    # the weights needs every run to add up floats in the same order.
    proc = launch(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    # The killed run had logged steps past its step-4 checkpoint; after the resume each step is in the log once.
    logged = [r["step"] for r in metrics(tmp_path / "killed") if "train/loss" in r]
    assert logged == list(range(1, 11))


# ------------------------------------------------------------------------------------------------ mixed precision
def mean_abs_change(trainer: Trainer, initial: dict[str, torch.Tensor]) -> float:
    """Mean |w_after - w_before| over the weight matrices (the parameters AdamW moves by about lr per step)."""
    state = trainer.encoder.model.state_dict()
    diffs = [(state[k].double() - v.double()).abs().mean() for k, v in initial.items() if v.dim() == 2]
    return float(torch.stack(diffs).mean())


@pytest.mark.slow
def test_bf16_trains_as_far_as_fp32(workdir: Path, tmp_path: Path) -> None:
    """bf16 (CPU autocast) at the recipe's lr 8e-6 for 150 steps moves the weights as far as fp32 does.

    bf16 weights updated in place would move about 0.01x as far: most AdamW updates of ~8e-6 on weights of ~0.2 are
    below bf16's resolution (1/128 of the weight) and round away.
    """
    settings = ("optim.lr=8e-6", "optim.min_lr=8e-6", "optim.epochs=8", "optim.max_steps=150")
    settings += ("validate_every=1000", "save_every=1000", "log_every=50")
    moved = {}
    for dtype in ("float32", "bfloat16"):
        trainer = single_process(workdir, tmp_path / dtype, f"model.dtype={dtype}", *settings)
        assert all(p.dtype == torch.float32 for p in trainer.encoder.parameters()), "master weights must be fp32"
        initial = {k: v.clone() for k, v in trainer.encoder.model.state_dict().items()}
        trainer.train()
        assert trainer.step == 150
        moved[dtype] = mean_abs_change(trainer, initial)
    assert moved["bfloat16"] == pytest.approx(moved["float32"], rel=0.2), moved
    # The checkpoint holds the fp32 master weights; final/ is saved in the compute dtype (final_dtype: auto).
    checkpoint = load_file(str(tmp_path / "bfloat16" / "checkpoints" / "step-00000150" / "model.safetensors"))
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
    assert {t.dtype for t in weights(tmp_path / "bfloat16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bfloat16" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = Encoder.load(tmp_path / "bfloat16" / "final", dtype=torch.float32)
    texts = ["q 1 0 a man", "What is the capital of France?"]
    np.testing.assert_allclose(
        loaded.encode(texts, show_progress=False), trainer.encoder.encode(texts, show_progress=False), atol=2e-2
    )


def test_bf16_forward_runs_under_autocast_and_embeddings_are_fp32(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run", "model.dtype=bfloat16", "grad_cache.enabled=true")
    seen = {}
    layer = trainer.encoder.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    batch = next(iter(trainer.sampler))
    emb = trainer.engine.forward(trainer.collator(batch.sequences()))
    assert seen["dtype"] == torch.bfloat16 and emb.dtype == torch.float32
    # The gradient cache's cached d(loss)/d(embeddings) is fp32 too.
    cached = {}
    step_loss = trainer.loss

    def recording(emb: torch.Tensor, batch, target=None) -> tuple:
        cached["dtype"] = emb.dtype
        return step_loss(emb, batch, target)

    trainer.loss = recording
    trainer.train_step(batch)
    assert cached["dtype"] == torch.float32


def test_final_dtype_float32_is_available(workdir: Path, tmp_path: Path) -> None:
    single_process(workdir, tmp_path / "run", "model.dtype=bfloat16", "model.final_dtype=float32").train()
    assert {t.dtype for t in weights(tmp_path / "run").values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ validation
def test_validation_runs_through_the_gradient_cache_chunks(workdir: Path, tmp_path: Path) -> None:
    """With the gradient cache on, a validation batch is encoded chunk by chunk (the memory of a training step), and
    gives the loss of encoding it whole."""
    plain = single_process(workdir, tmp_path / "plain")
    trainer = single_process(workdir, tmp_path / "chunked", "grad_cache.enabled=true", "grad_cache.chunk_texts=3")
    sizes = []
    forward = trainer.engine.forward

    def recording(batch, normalize=None):
        sizes.append(batch.num_texts)
        return forward(batch, normalize)

    trainer.engine.forward = recording
    got = trainer.validate()
    assert sizes and max(sizes) <= 3, sizes
    assert got == pytest.approx(plain.validate(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_rebuilds_the_schedule_from_the_current_config(workdir: Path, tmp_path: Path) -> None:
    """A run resumed with a longer max_steps decays on the new horizon, not on the one in the checkpoint."""
    out = tmp_path / "run"
    single_process(workdir, out, "optim.max_steps=4", "optim.warmup_steps=1").train()
    longer = single_process(workdir, out, "optim.max_steps=12", "optim.warmup_steps=1")
    assert longer.step == 4
    longer.train()
    schedule = WarmupCosine(warmup_steps=1, total_steps=12, min_ratio=1e-7 / 1e-3)
    rows = [r for r in metrics(out) if "train/lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["train/lr"] for r in rows[4:]] == pytest.approx([1e-3 * schedule(s) for s in range(4, 12)], rel=1e-9)


def test_resume_logs_every_step_once(workdir: Path, tmp_path: Path) -> None:
    """Steps logged after the last checkpoint by a run that died are run again after a resume: logged once."""
    out = tmp_path / "run"
    single_process(workdir, out, "tensorboard=true").train()  # checkpoints at steps 2 and 4
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after logging steps 3 and 4
    shutil.rmtree(out / "final")
    resumed = single_process(workdir, out, "tensorboard=true")
    assert resumed.step == 2
    resumed.train()
    rows = metrics(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]


# ------------------------------------------------------------------------------------------------ data
def test_small_sources_train_and_are_validated(tmp_path: Path) -> None:
    """A source with fewer rows than one global batch trains every epoch (its last batch wraps, as in the recipe),
    and its held-out rows are validated; with last_batch: drop it never trains, as the start-up line says."""
    import yaml

    root = trainer_workdir(tmp_path)
    write_source(root / "data" / "fiqa.parquet", make_rows(12, 2, prefix="f "))
    config = yaml.safe_load((root / "base.yaml").read_text())
    config["data"]["paths"].append(str(root / "data" / "fiqa.parquet"))
    config["data"]["sources"]["fiqa"] = {"num_negatives": 2}
    config["data"]["batch_size"] = 16
    config["optim"] = {"lr": 1e-3, "warmup_steps": 1, "epochs": 1}
    (root / "small.yaml").write_text(yaml.safe_dump(config))
    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"))

    wrap = Trainer.from_config(load_config(root / "small.yaml", [f"output_dir={tmp_path / 'wrap'}"]), runtime)
    batches = [wrap.sampler.batch_at(0, s) for s in range(wrap.sampler.steps_per_epoch)]
    fiqa = [b for b in batches if b.source == "fiqa"]
    assert len(fiqa) == 1 and set(fiqa[0].rows.tolist()) == set(wrap.sampler.sources[2].train_rows.tolist())
    for source, rows in zip(wrap.sampler.sources, wrap.sampler._rows, strict=True):  # every row, every epoch
        used = np.concatenate([b.rows for b in batches if b.source == source.name])
        assert set(used.tolist()) == set(rows.tolist()), source.name
    val = [wrap.validation.batch_at(0, s).source for s in range(wrap.validation.steps_per_epoch)]
    assert "fiqa" in val, val

    drop = Trainer.from_config(
        load_config(root / "small.yaml", [f"output_dir={tmp_path / 'drop'}", "data.last_batch=drop"]), runtime
    )
    sources = [drop.sampler.batch_at(0, s).source for s in range(drop.sampler.steps_per_epoch)]
    assert "fiqa" not in sources
    assert any("'fiqa'" in line and "0 global batches" in line for line in drop.sampler.summary())
