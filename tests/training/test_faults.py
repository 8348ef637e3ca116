"""Fault injection in training: kill -9 of the whole job, a kill inside a checkpoint write, a full disk, NaN on one
rank, a rank that dies. The faults fire at exact points through tests/training/fault_worker.py; each test checks what
survives on disk, that a resumed run ends with exactly the weights of an uninterrupted one, and that no fault leaves
a process waiting forever."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from f2llm import engine as engine_module
from f2llm import trainer as trainer_module
from f2llm.checkpoint import CheckpointError, CheckpointWriter, latest_checkpoint, list_checkpoints, load_state
from f2llm.config import load_config
from f2llm.distributed import Runtime, free_port
from f2llm.encoder import Encoder
from f2llm.export import F2LLM_CONFIG
from f2llm.trainer import Trainer
from tests.helpers import HANG_BOUND, launch, trainer_workdir, training_env

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")
MAX_STEPS = 10
SAVE_EVERY = 2
# A failed or torn-down job must be gone well within this (startup of 2 ranks included).
EXIT_DEADLINE = 60.0
RUN_DEADLINE = float(HANG_BOUND)  # a job that should finish: waited for this long before it counts as hung
# Kill points of the kill -9 chain, one per seed (see draw_kill_points).
KILL_SEEDS = (11, 12, 13)
PHASES = ("before", "after_backward", "after_update")
# Checkpoint files written through save_state, with the rank that writes each.
CHECKPOINT_FILES = (("optimizer.pt", 0), ("rng-rank0.pt", 0), ("rng-rank1.pt", 1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return trainer_workdir(
        root,
        model={"name_or_path": str(root / "tiny-qwen3-1")},  # dropout on: a resume must replay every rank's RNG
        data={"batch_size": 2},
        optim={"max_steps": MAX_STEPS},
        validate_every=100,
        save_every=SAVE_EVERY,
        keep_last=2,
    )


# ------------------------------------------------------------------------------------------------ launching jobs
class Job:
    """A training job (torchrun with ``nproc`` ranks, or one plain process) running tests/training/fault_worker.py."""

    def __init__(self, workdir: Path, out: Path, *overrides: str, nproc: int, faults: list[dict] | None = None):
        self.out = out
        self.fault_dir = out.parent / f"{out.name}-faults"
        shutil.rmtree(self.fault_dir, ignore_errors=True)
        self.fault_dir.mkdir(parents=True)
        args = ["train", "--config", str(workdir / "base.yaml"), f"output_dir={out}", *overrides]
        if nproc == 1:
            cmd = [sys.executable, str(WORKER), *args]
        else:
            torchrun = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
            cmd = [sys.executable, *torchrun, str(WORKER), *args]
        env = {"F2LLM_FAULTS": json.dumps(faults or []), "F2LLM_FAULT_DIR": str(self.fault_dir)}
        self.log = (self.fault_dir / "output.log").open("w")
        self.started = time.monotonic()
        self.proc = launch(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.fault_dir / "output.log").read_text()[-6000:]

    def errors(self) -> dict[int, dict[str, Any]]:
        """The exception each rank raised out of Trainer.train, by rank."""
        records = [json.loads(p.read_text()) for p in self.fault_dir.glob("error-rank*.json")]
        return {int(r["rank"]): r for r in records}

    def kill(self) -> None:
        """SIGKILL the launcher and every rank at once (torchrun starts each rank in its own session)."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        psutil.wait_procs(procs, timeout=30)
        self.log.close()

    def wait_held_then_kill(self, timeout: float = RUN_DEADLINE) -> str:
        """Wait until a rank holds at its fault point, then kill -9 the whole job; returns where it held."""
        marker = self.fault_dir / "held"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None:
                self.log.close()
                pytest.fail(f"the job exited ({self.proc.returncode}) before reaching its fault point:\n{self.output}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the job did not reach its fault point within {timeout} s:\n{self.output}")
            time.sleep(0.02)
        where = marker.read_text()
        self.kill()
        assert self.proc.returncode == -signal.SIGKILL
        return where

    def wait(self, timeout: float = RUN_DEADLINE) -> tuple[int, float]:
        """(exit status, seconds since launch); kills the job and fails the test if it outlives ``timeout``."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job still ran after {timeout} s (a hang):\n{self.output}")
        self.log.close()
        return code, time.monotonic() - self.started


def run_ok(workdir: Path, out: Path, *overrides: str, nproc: int, faults: list[dict] | None = None) -> Job:
    job = Job(workdir, out, *overrides, nproc=nproc, faults=faults)
    code, _ = job.wait()
    assert code == 0, job.output
    return job


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_complete_checkpoint(path: Path, world_size: int) -> None:
    """Every file of a DDP checkpoint is there and loads (safetensors, weights_only state, JSON)."""
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == int(path.name.split("-")[1]) and state["world_size"] == world_size
    assert load_file(str(path / "model.safetensors"))
    for name in ("optimizer.pt", *(f"rng-rank{r}.pt" for r in range(world_size))):
        load_state(path / name)


@pytest.fixture(scope="module")
def straight_two_ranks(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted 2-rank run that the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_ok(workdir, out, nproc=2)
    return final_weights(out)


# ------------------------------------------------------------------------------------------------ kill -9
def draw_kill_points(seeds: tuple[int, ...] = KILL_SEEDS) -> list[dict[str, Any]]:
    """One kill point per seed, each later than the one before: a random step (1-3 steps on), phase and rank,
    except the second, which lands inside the write of a random checkpoint file at the next save (the second save
    or later, so that an older checkpoint exists)."""
    points: list[dict[str, Any]] = []
    previous = 0
    for i, seed in enumerate(seeds):
        rng = random.Random(seed)
        if i == 1:
            # the second save or later: a previous checkpoint exists and must survive
            step = next(s for s in range(max(previous + 1, 2 * SAVE_EVERY), MAX_STEPS) if s % SAVE_EVERY == 0)
            name, writer = rng.choice(CHECKPOINT_FILES)
            points.append({"at": "save", "step": step, "file": name, "rank": writer, "action": "hold"})
        else:
            step = rng.randint(previous + 1, previous + 3)
            phase, rank = rng.choice(PHASES), rng.randint(0, 1)
            points.append({"at": "step", "step": step, "phase": phase, "rank": rank, "action": "hold"})
        previous = step
    assert previous < MAX_STEPS
    return points


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_chain_two_ranks_resumes_bitwise(
    workdir: Path, tmp_path: Path, straight_two_ranks: dict[str, torch.Tensor]
) -> None:
    """kill -9 of the whole 2-rank job (launcher and ranks) at 3 drawn points, one inside a checkpoint write;
    each rerun of the same command resumes from the newest complete checkpoint; the last one finishes with
    exactly the weights of the uninterrupted run (dropout on: every rank's RNG is replayed)."""
    out = tmp_path / "run"
    for point in draw_kill_points():
        job = Job(workdir, out, nproc=2, faults=[point])
        where = job.wait_held_then_kill()
        assert not (out / "final").exists(), f"killed at {where}, yet a final model exists"
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None:
            assert_complete_checkpoint(latest, world_size=2)
            assert int(latest.name.split("-")[1]) < point["step"]  # a step's checkpoint follows the whole step
        if point["at"] == "save":
            partial = out / "checkpoints" / f".tmp-step-{point['step']:08d}"
            assert (partial / point["file"]).exists(), f"killed at {where}, but {partial} has no partial file"
            assert latest is not None and latest.name < f"step-{point['step']:08d}"
    job = run_ok(workdir, out, nproc=2)
    assert "resumed from" in job.output
    assert not list((out / "checkpoints").glob(".tmp-*")), "the resumed run left the killed write's folder behind"
    assert_bitwise_equal(final_weights(out), straight_two_ranks, "kill -9 + resume vs uninterrupted")


def test_kill_9_inside_checkpoint_writer_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """CheckpointWriter alone: SIGKILL halfway through the files of step 2 leaves step 1 intact and newest; the
    next save removes the half-written folder."""
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "checkpoint-writer", str(root)],
        capture_output=True,
        text=True,
        timeout=HANG_BOUND,
        env=training_env(),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert (root / ".tmp-step-00000002" / "optimizer.pt").exists()
    state = load_state(root / "step-00000001" / "state.pt")
    assert state["step"] == 1 and torch.equal(state["weights"], torch.full((4, 4), 1.0))
    with pytest.raises(RuntimeError, match=re.escape(str(root / ".tmp-step-00000002" / "optimizer.pt"))):
        load_state(root / ".tmp-step-00000002" / "optimizer.pt")  # the half-written file is never taken for state

    CheckpointWriter(root, keep_last=2).save(3, lambda folder: (folder / "state.json").write_text("{}"))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000003"]


# ------------------------------------------------------------------------------------------------ full disk
def single_process(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", "optim.max_steps=6", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


def test_disk_full_during_save_keeps_last_checkpoint_and_resumes(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC halfway through optimizer.pt of step 4: the error reaches the caller, step 2 stays the newest
    complete checkpoint, nothing half-written is left, and a rerun resumes to the uninterrupted weights."""
    single_process(workdir, tmp_path / "straight").train()
    save_state = engine_module.save_state  # the engine writes optimizer.pt

    def disk_full(obj: Any, path: Path) -> None:
        if path.parent.name == ".tmp-step-00000004" and path.name == "optimizer.pt":
            path.write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_state(obj, path)

    monkeypatch.setattr(engine_module, "save_state", disk_full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step-00000004 failed on rank 0") as error:
        single_process(workdir, out).train()
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert "step-00000002" in str(error.value)  # the message names the checkpoint a rerun resumes from
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert_complete_checkpoint(out / "checkpoints" / "step-00000002", world_size=1)
    assert not list((out / "checkpoints").glob(".tmp-*")), "the failed write left its folder behind"
    assert not (out / "final").exists()

    monkeypatch.setattr(engine_module, "save_state", save_state)  # space freed
    resumed = single_process(workdir, out)
    assert resumed.step == 2
    resumed.train()
    assert_bitwise_equal(final_weights(out), final_weights(tmp_path / "straight"), "resume after ENOSPC")


@pytest.fixture(scope="module")
def real_write_failure(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A real OS write failure: after step 3 files may not grow past 600 kB (RLIMIT_FSIZE), so optimizer.pt
    (~800 kB) of the step-4 checkpoint fails inside torch.save, as on a full disk."""
    out = tmp_path_factory.mktemp("fsize") / "run"
    limit = {"at": "step", "step": 3, "phase": "after_update", "action": "limit_file_size", "bytes": 600_000}
    job = Job(workdir, out, "optim.max_steps=6", nproc=1, faults=[limit])
    job.wait()
    return job


@pytest.mark.slow
def test_real_write_failure_keeps_last_checkpoint(real_write_failure: Job) -> None:
    job, checkpoints = real_write_failure, real_write_failure.out / "checkpoints"
    assert job.proc.returncode == 1, job.output
    assert 0 in job.errors(), job.output
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002"]
    assert_complete_checkpoint(checkpoints / "step-00000002", world_size=1)
    assert not list(checkpoints.glob(".tmp-*"))


@pytest.mark.slow
def test_real_write_failure_error_names_the_checkpoint(real_write_failure: Job) -> None:
    message = real_write_failure.errors()[0]["message"]
    assert "step-00000004" in message and "step-00000002" in message, message


@pytest.fixture(scope="module")
def write_failure_on_rank_1(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, float, float]:
    """2 ranks; rank 1's write of rng-rank1.pt for the step-4 checkpoint fails halfway (as on a full disk) and
    raises there, while rank 0 goes on to the checkpoint's barrier. Returns the job, its run time and the time it
    exited."""
    out = tmp_path_factory.mktemp("rank1-write") / "run"
    fault = {"at": "save", "step": 4, "file": "rng-rank1.pt", "rank": 1, "action": "raise"}
    job = Job(workdir, out, "optim.max_steps=6", nproc=2, faults=[fault])
    _, seconds = job.wait(timeout=EXIT_DEADLINE * 3)
    return job, seconds, time.time()


@pytest.mark.slow
@pytest.mark.distributed
def test_write_failure_on_one_rank_ends_the_job(write_failure_on_rank_1: tuple[Job, float, float]) -> None:
    job, seconds, exited = write_failure_on_rank_1
    assert job.proc.returncode != 0 and seconds < EXIT_DEADLINE, (job.proc.returncode, seconds, job.output)
    error = job.errors()[1]
    print(f"rank 1 raised: the job exited {exited - error['time']:.1f} s later ({seconds:.1f} s after launch)")
    # The rank that failed names the checkpoint and its own cause.
    assert "fault_worker: injected failure at writing" in error["message"], error
    assert "rng-rank1.pt" in error["message"] and "step-00000004" in error["message"], error
    # Both ranks agree on the failure and stop together; rank 0 names the checkpoint and the intact one.
    assert "writing checkpoint" in job.errors()[0]["message"] and "on another rank" in job.errors()[0]["message"]
    assert "step-00000002" in job.errors()[0]["message"]
    assert not (job.out / "final").exists()
    assert_complete_checkpoint(job.out / "checkpoints" / "step-00000002", world_size=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_write_failure_on_one_rank_publishes_nothing(write_failure_on_rank_1: tuple[Job, float, float]) -> None:
    checkpoints = write_failure_on_rank_1[0].out / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step-00000002", sorted(os.listdir(checkpoints))


# ------------------------------------------------------------------------------------------------ NaN on one rank
def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DDP (safetensors) or DeepSpeed (module states) checkpoint."""
    if (checkpoint / "model.safetensors").exists():
        return load_file(str(checkpoint / "model.safetensors"))
    return load_state(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt")["module"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_nan_on_one_rank_is_skipped_by_all_ranks(workdir: Path, tmp_path: Path, engine: str) -> None:
    """nan_policy=skip, 2 ranks: step 2's loss is NaN on rank 1 only, step 3's gradient is NaN on rank 0 only
    (before the all-reduce). Both ranks skip both steps together: the weights (and, for DDP, the optimizer moments)
    after steps 1, 2 and 3 are identical, step 4 trains again at the rate of its step, and the run ends normally.
    Under DeepSpeed ZeRO-2 the non-finite norm makes DeepSpeed skip its own update; f2llm keeps the schedule."""
    out = tmp_path / "run"
    faults = [
        {"at": "loss", "step": 2, "rank": 1, "action": "nan"},
        {"at": "grad", "step": 3, "rank": 0, "action": "nan"},
    ]
    settings = ("nan_policy=skip", "optim.max_steps=4", "save_every=1", "keep_last=10")
    if engine == "zero2":
        settings += ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}")
    job = Job(workdir, out, *settings, nproc=2, faults=faults)
    # A run that ends normally: the wait is only a bound for a hang, not a speed (4 checkpointed ZeRO-2 steps on 2
    # shared cores took over 3 minutes beside another test's 2 ranks).
    code, _ = job.wait(timeout=RUN_DEADLINE)
    assert code == 0, job.output
    assert re.search(r"skipped: non-finite loss at step 2 .*source '(msmarco|banking77)'", job.output), job.output
    assert re.search(r"skipped: non-finite gradient norm at step 3 .*source '(msmarco|banking77)'", job.output)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if r.get("skipped")) == [2, 3]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [1, 4]
    ckpt = [out / "checkpoints" / f"step-{s:08d}" for s in range(1, 5)]
    weights = [checkpoint_weights(c) for c in ckpt]
    assert_bitwise_equal(weights[1], weights[0], "step 2 skipped")
    assert_bitwise_equal(weights[2], weights[0], "step 3 skipped")
    assert any(not torch.equal(weights[3][k], weights[2][k]) for k in weights[3]), "step 4 did not train"
    step4 = next(r for r in rows if r["step"] == 4 and "train/lr" in r)
    assert step4["train/lr"] == pytest.approx(1e-3 * trainer_module.WarmupCosine(2, 4, 1e-4)(3), rel=1e-9)
    if engine == "ddp":
        moments = [load_state(c / "optimizer.pt")["state"] for c in ckpt[:3]]
        for m in moments[1:]:
            assert all(torch.equal(m[i][k], moments[0][i][k]) for i in m for k in m[i]), "a skipped step moved Adam"


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_on_one_rank_stops_every_rank(workdir: Path, tmp_path: Path) -> None:
    """nan_policy=stop, 2 ranks, the loss NaN on rank 1 only: both ranks raise NonFiniteError naming step 2 and
    the same source, and the job exits with an error instead of leaving rank 0 waiting."""
    job = Job(workdir, tmp_path / "run", nproc=2, faults=[{"at": "loss", "step": 2, "rank": 1, "action": "nan"}])
    code, seconds = job.wait(timeout=EXIT_DEADLINE * 3)
    assert code != 0 and seconds < EXIT_DEADLINE, (code, seconds, job.output)
    errors = job.errors()
    assert sorted(errors) == [0, 1], job.output
    print(f"NaN on rank 1, stop: the job exited {time.time() - errors[1]['time']:.1f} s after the error")
    for record in errors.values():
        assert record["type"] == "NonFiniteError" and "non-finite loss at step 2 " in record["message"], record
    sources = {r["message"].split("source ")[1].split(",")[0] for r in errors.values()}
    assert len(sources) == 1, errors


# ------------------------------------------------------------------------------------------------ a rank dies
@pytest.mark.slow
@pytest.mark.distributed
def test_dead_rank_ends_the_job(workdir: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed in step 3 while rank 0 goes on into the next collective: torchrun tears the group down
    and the whole job exits non-zero within the deadline, naming rank 1 as the root cause. (A rank that raises
    instead: test_write_failure_on_one_rank_ends_the_job.)"""
    fault = {"at": "step", "step": 3, "phase": "after_backward", "rank": 1, "action": "die"}
    job = Job(workdir, tmp_path / "run", nproc=2, faults=[fault])
    code, seconds = job.wait(timeout=EXIT_DEADLINE * 3)
    assert code != 0 and seconds < EXIT_DEADLINE, (code, seconds, job.output)
    died = float((job.fault_dir / "died-rank1").read_text())
    print(f"rank 1 SIGKILLed: the job exited {time.time() - died:.1f} s later ({seconds:.1f} s after launch)")
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)", job.output, re.S), job.output
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_stuck_outside_a_collective_ends_the_job_at_the_timeout(workdir: Path, tmp_path: Path) -> None:
    """Rank 1 hangs (alive, never reaching the next collective): rank 0 waits dist_timeout_minutes in its collective,
    then raises, and the job ends instead of hanging for torch's default 30 minutes."""
    fault = {"at": "step", "step": 2, "phase": "before", "rank": 1, "action": "hold"}
    job = Job(workdir, tmp_path / "run", "dist_timeout_minutes=0.1", nproc=2, faults=[fault])
    code, seconds = job.wait(timeout=EXIT_DEADLINE * 3)
    assert code != 0 and seconds < EXIT_DEADLINE, (code, seconds, job.output)
    errors = job.errors()
    assert 0 in errors and re.search(r"time(d)? ?out", errors[0]["message"], re.I), (errors, job.output)
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------------------ final model
@pytest.fixture(scope="module")
def killed_in_final_save(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A single-process run killed -9 inside the final model save (weights written, f2llm_config.json not yet);
    returns the run folder and what final/ held at that moment."""
    out = tmp_path_factory.mktemp("final") / "run"
    job = Job(workdir, out, "optim.max_steps=4", nproc=1, faults=[{"at": "final", "action": "hold"}])
    job.wait_held_then_kill()
    final = out / "final"
    return out, sorted(p.name for p in final.iterdir()) if final.exists() else []


@pytest.mark.slow
def test_final_model_is_never_partial(killed_in_final_save: tuple[Path, list[str]]) -> None:
    _, files = killed_in_final_save
    assert not files or F2LLM_CONFIG in files, f"a partial final model is visible: {files}"


@pytest.mark.slow
def test_rerun_after_kill_in_final_save_completes_it(
    workdir: Path, killed_in_final_save: tuple[Path, list[str]]
) -> None:
    out, _ = killed_in_final_save
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step-00000004"
    job = run_ok(workdir, out, "optim.max_steps=4", nproc=1)
    assert "resumed from" in job.output
    encoder = Encoder.load(out / "final")
    assert encoder.pooling == "last"
    assert_bitwise_equal(final_weights(out), load_file(str(checkpoint / "model.safetensors")), "final vs step 4")
