"""Runs whose number of ranks changes, and torchrun's elastic launches the ways they fail (gloo, CPU, tiny Qwen3).

A run with ``data.global_batch_size`` trains the same sequence of global batches on any number of ranks that divides
it, so its checkpoints resume on another number of ranks: 2 ranks resumed on 1 (and 1 on 2) end where the
uninterrupted run ends, to float rounding. On that rest torchrun's elastic launches: two agents as two nodes, a
worker SIGKILLed under ``--max-restarts`` (the agent restarts the workers and they resume by themselves), and a node
lost for good under ``--nnodes 1:2`` (the job goes on alone from the newest checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from f2llm.config import ConfigError, load_config
from f2llm.data import F2LLMBatchSampler
from f2llm.distributed import free_port
from f2llm.encoder import Encoder
from f2llm.trainer import training_sources
from tests.helpers import HANG_BOUND, ROOT, assert_same_weights, launch, metrics, run, train_command, trainer_workdir

WORKER = Path(__file__).with_name("fault_worker.py")
TRAIN = ROOT / "train" / "train.py"
# 4 queries a step over all ranks (2 each on 2 ranks), 6 steps, a checkpoint every 2 (base.yaml's save_every).
SETTINGS = ("data.batch_size=null", "data.global_batch_size=4", "optim.max_steps=6", "validate_every=100",
            "keep_last=5")  # fmt: skip
# Rendezvous settings of the elastic launches: a lost node is declared dead after 3 missed 1-second heartbeats, and
# a round closes 2 s after its minimum of nodes joined (torchrun's defaults: 15 s and 30 s).
RDZV_CONF = "join_timeout=120,last_call_timeout=2,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("elastic"))


@pytest.fixture(scope="module")
def two_ranks(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    run(train_command(workdir, out, *SETTINGS, nproc=2))
    return out


@pytest.fixture(scope="module")
def one_rank(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-rank") / "run"
    run(train_command(workdir, out, *SETTINGS))
    return out


def from_step_2(straight: Path, to: Path) -> Path:
    """A copy of a finished run as a kill after step 3 leaves it: the step-2 checkpoint is the newest."""
    shutil.copytree(straight, to)
    for lost in ("step-00000004", "step-00000006"):
        shutil.rmtree(to / "checkpoints" / lost)
    shutil.rmtree(to / "final")
    return to


def assert_same_run(reference: Path, got: Path, atol: float) -> None:
    """Final weights within ``atol``; the training losses of every step logged by both to float rounding."""
    assert_same_weights(reference, got, atol=atol)
    want = {r["step"]: r["train/loss"] for r in metrics(reference) if "train/loss" in r}
    have = {r["step"]: r["train/loss"] for r in metrics(got) if "train/loss" in r}
    assert set(have) == set(want) == set(range(1, 7))
    for step, loss in have.items():
        assert loss == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


# ------------------------------------------------------------------------------------------------ another world size
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_resumed_on_one_end_where_two_ranks_end(workdir: Path, two_ranks: Path, tmp_path: Path) -> None:
    resumed = from_step_2(two_ranks, tmp_path / "resumed")
    stdout = run(train_command(workdir, resumed, *SETTINGS))
    assert "(written by 2 ranks, resumed on 1) at step 2 of 6" in stdout, stdout[-2000:]
    assert_same_run(two_ranks, resumed, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_one_rank_resumed_on_two_ends_where_one_rank_ends(workdir: Path, one_rank: Path, tmp_path: Path) -> None:
    resumed = from_step_2(one_rank, tmp_path / "resumed")
    stdout = run(train_command(workdir, resumed, *SETTINGS, nproc=2))
    assert "(written by 1 ranks, resumed on 2) at step 2 of 6" in stdout, stdout[-2000:]
    assert_same_run(one_rank, resumed, atol=1e-5)


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused_before_any_step(
    workdir: Path, two_ranks: Path, tmp_path: Path
) -> None:
    """data.batch_size fixes the per-rank share: on 1 rank it would be another global batch. The refusal says which
    setting keeps the run's batch and which numbers of ranks it divides over; nothing trains, nothing is lost."""
    resumed = from_step_2(two_ranks, tmp_path / "resumed")
    before = (resumed / "metrics.jsonl").read_text()
    overrides = ("data.global_batch_size=null", "data.batch_size=2", *SETTINGS[2:])
    result = subprocess.run(
        train_command(workdir, resumed, *overrides), capture_output=True, text=True, timeout=HANG_BOUND
    )
    assert result.returncode != 0
    error = result.stderr[-3000:]
    assert "global batch is 4 queries (2 per rank x 2 ranks), this run's 2 (2 x 1)" in error, error
    assert "set data.global_batch_size: 4" in error and "divides it: 1, 2, 4" in error, error
    assert (resumed / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000002"]


@pytest.mark.slow
def test_a_per_process_warmup_is_not_resumed_on_other_ranks(workdir: Path, two_ranks: Path, tmp_path: Path) -> None:
    """optim.warmup: per_process (the official v1 loop's schedule) counts processes: the same run on 1 rank would
    follow another learning-rate schedule, so its resume there is refused, naming the setting."""
    resumed = from_step_2(two_ranks, tmp_path / "resumed")
    result = subprocess.run(
        train_command(workdir, resumed, *SETTINGS, "optim.warmup=per_process"),
        capture_output=True, text=True, timeout=HANG_BOUND,
    )  # fmt: skip
    assert result.returncode != 0
    assert "optim.warmup: per_process ties the learning-rate schedule" in result.stderr, result.stderr[-3000:]
    assert "resume on 2 ranks, or train with optim.warmup: steps" in result.stderr


def test_the_global_batches_do_not_depend_on_the_number_of_ranks(workdir: Path) -> None:
    """Over two epochs, the slices of W ranks (W = 2, 4) put side by side are the one-rank batches: the same source,
    rows in the same order, the same negative columns and token ids."""
    config = load_config(workdir / "base.yaml", list(SETTINGS))
    sources = training_sources(config, Encoder.from_pretrained(config.model.name_or_path).text_tokenizer)

    def samplers(world: int) -> list[F2LLMBatchSampler]:
        return [F2LLMBatchSampler(sources, 4 // world, world_size=world, rank=r, epochs=2) for r in range(world)]

    whole = samplers(1)[0]
    for world in (2, 4):
        ranks = samplers(world)
        assert len(ranks[0]) == len(whole)
        for epoch, step in [(e, s) for e in range(2) for s in range(whole.steps_per_epoch)]:
            one = whole.batch_at(epoch, step)
            parts = [r.batch_at(epoch, step) for r in ranks]
            assert {p.source for p in parts} == {one.source}
            assert all(p.negative_columns == one.negative_columns for p in parts)
            assert np.concatenate([p.rows for p in parts]).tolist() == one.rows.tolist()
            ids = [t.tolist() for p in parts for t in p.queries]
            assert ids == [t.tolist() for t in one.queries]


def test_a_global_batch_the_ranks_do_not_divide_is_refused(workdir: Path) -> None:
    config = load_config(workdir / "base.yaml", list(SETTINGS))
    assert [config.data.rank_batch_size(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"does not divide over 3 ranks; it divides over 1, 2, 4 ranks"):
        config.data.rank_batch_size(3)
    with pytest.raises(ConfigError, match="are both set; set one"):
        load_config(workdir / "base.yaml", ["data.global_batch_size=4"])  # base.yaml sets data.batch_size


# ------------------------------------------------------------------------------------------------ elastic launches
def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def job_args(workdir: Path, out: Path) -> list[str]:
    return ["train", "--config", str(workdir / "base.yaml"), f"output_dir={out}", *SETTINGS]


def fault_env(fault_dir: Path, *faults: dict) -> dict[str, str]:
    fault_dir.mkdir(parents=True, exist_ok=True)
    return {"F2LLM_FAULTS": json.dumps(list(faults)), "F2LLM_FAULT_DIR": str(fault_dir)}


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a launched job; its output. Fails the test (after killing the job) if it hangs or fails."""
    try:
        code = proc.wait(timeout=HANG_BOUND)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"the job hung:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert code == 0, f"exit {code}:\n{output[-6000:]}"
    return output


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in a session of its own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def agents(
    workdir: Path, out: Path, nnodes: str, env: dict[str, str], *extra: str
) -> list[tuple[Path, subprocess.Popen]]:
    """Two torchrun agents of one job on this machine, each a node of one worker, meeting through a c10d rendezvous
    on 127.0.0.1 hosted by the first; (log, process) of each."""
    endpoint = f"127.0.0.1:{free_port()}"
    common = [f"--nnodes={nnodes}", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
              f"--rdzv-id={out.name}", *extra]  # fmt: skip
    launched = []
    for node, host in enumerate(("true", "false")):
        log = out.parent / f"{out.name}-node{node}.log"
        cmd = torchrun(*common, f"--rdzv-conf=is_host={host},{RDZV_CONF}", str(WORKER), *job_args(workdir, out))
        proc = launch(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        launched.append((log, proc))
    return launched


@pytest.mark.slow
@pytest.mark.distributed
def test_two_agents_as_two_nodes_train_like_one_agent_with_two_processes(
    workdir: Path, two_ranks: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nodes"
    launched = agents(workdir, out, "2", fault_env(tmp_path / "faults"))
    outputs = [finish(proc, log) for log, proc in launched]
    assert "engine ddp, 2 ranks" in outputs[0]
    assert_same_run(two_ranks, out, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_worker_is_restarted_and_resumes_by_itself(workdir: Path, two_ranks: Path, tmp_path: Path) -> None:
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed as step 3 begins (first attempt only); the agent restarts
    both workers, which resume from the step-2 checkpoint and end at the uninterrupted run's weights."""
    out, faults = tmp_path / "restart", tmp_path / "faults"
    die = {"at": "step", "step": 3, "phase": "before", "action": "die", "rank": 1, "attempt": 0}
    log = tmp_path / "restart.log"
    cmd = torchrun("--nproc-per-node=2", "--max-restarts=1", f"--master-port={free_port()}", str(WORKER),
                   *job_args(workdir, out))  # fmt: skip
    output = finish(launch(cmd, env=fault_env(faults, die), stdout=log.open("w"), stderr=subprocess.STDOUT), log)
    assert (faults / "died-rank1").exists()
    assert "resumed from" in output and "step-00000002 at step 2 of 6" in output, output[-3000:]
    assert_same_run(two_ranks, out, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_node_lost_for_good_leaves_the_job_to_finish_on_the_other(
    workdir: Path, two_ranks: Path, tmp_path: Path
) -> None:
    """``--nnodes 1:2``: the second node (agent and worker) is SIGKILLed in step 3 and never comes back. The first
    node's worker fails in its next collective, its agent meets alone in a new rendezvous round (min 1 node), and
    the restarted worker resumes the 2-rank checkpoint of step 2 on 1 rank, with the same global batch."""
    out, faults = tmp_path / "lost", tmp_path / "faults"
    hold = {"at": "step", "step": 3, "phase": "before", "action": "hold", "rank": 1, "attempt": 0}
    (log_a, first), (_, second) = agents(workdir, out, "1:2", fault_env(faults, hold), "--max-restarts=3")
    deadline = time.monotonic() + HANG_BOUND
    while not (faults / "held").exists():
        assert first.poll() is None and second.poll() is None, log_a.read_text()[-4000:]
        assert time.monotonic() < deadline, "rank 1 never reached step 3"
        time.sleep(0.2)
    kill_tree(second)
    lost_at = time.monotonic()
    output = finish(first, log_a)
    print(f"the job finished {time.monotonic() - lost_at:.0f} s after losing a node")
    assert "(written by 2 ranks, resumed on 1) at step 2 of 6" in output, output[-3000:]
    assert_same_run(two_ranks, out, atol=1e-5)
