"""A DeepSpeed ZeRO-2/3 checkpoint resumes on another number of ranks (the global batch kept: data.global_batch_size).

DeepSpeed refuses to repartition ZeRO optimizer state itself; f2llm's DeepSpeedEngine converts the checkpoint into a
universal one (each parameter's fp32 weights and AdamW moments whole) inside the checkpoint folder and loads that.
A run resumed so continues as the uninterrupted run: the same losses and final weights (fp32, to float rounding: 2
ranks reduce the gradients in another order than 1 rank's backward adds them), the universal checkpoint holding
exactly the saved fp32 state.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from f2llm.engine import deepspeed_universal_checkpoint
from tests.helpers import ROOT, assert_same_weights, metrics, run, train_command, trainer_workdir

SETTINGS = (
    "data.batch_size=null", "data.global_batch_size=4", "engine=deepspeed", "optim.max_steps=6",
    "validate_every=100", "keep_last=5",
)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("reshard"))


def resume_from_step_2(run_dir: Path, resumed: Path, workdir: Path, settings: tuple[str, ...], nproc: int) -> str:
    """``run_dir`` copied to ``resumed`` as if killed after its step-2 checkpoint, then resumed on ``nproc`` ranks
    (a conversion killed before, in the copy, left its temporary folder behind)."""
    shutil.copytree(run_dir, resumed)
    for lost in ("step-00000004", "step-00000006"):
        shutil.rmtree(resumed / "checkpoints" / lost)
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "step-00000002" / ".tmp-deepspeed-universal" / "zero").mkdir(parents=True)
    return run(train_command(workdir, resumed, *settings, nproc=nproc))


def assert_continues(straight: Path, resumed: Path, stdout: str, saved: int, now: int) -> None:
    assert f"(written by {saved} ranks, resumed on {now}) at step 2 of 6" in stdout, stdout[-3000:]
    universal = resumed / "checkpoints" / "step-00000002" / "deepspeed-universal"
    assert (universal / "zero" / "optimizer_state.pt").is_file()
    assert not list(universal.parent.glob(".tmp-*"))
    assert_same_weights(straight, resumed, atol=1e-5)
    reference = {r["step"]: r for r in metrics(straight) if "train/loss" in r}
    got = {r["step"]: r for r in metrics(resumed) if "train/loss" in r}
    for step in range(3, 7):
        assert got[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
        assert got[step]["train/lr"] == pytest.approx(reference[step]["train/lr"], rel=1e-6), step


def assert_same_optimizer_state(checkpoint: Path) -> None:
    """The universal checkpoint holds exactly the fp32 weights and AdamW moments the ranks saved: a parameter's
    fragments in the ranks' flat partitions (param_slice_mappings), in rank order, make its whole tensor."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    fragments: dict[tuple[str, str], list[torch.Tensor]] = {}
    shards = sorted((checkpoint / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) > 0
    for shard in shards:  # rank order: one digit
        sd = torch.load(shard, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        groups = zip(sd[PARAM_SLICE_MAPPINGS], sd[SINGLE_PARTITION_OF_FP32_GROUPS], strict=True)
        for group, (mappings, fp32) in enumerate(groups):
            moments = sd[BASE_OPTIMIZER_STATE]["state"][group]
            flat = {"fp32": fp32, "exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]}
            for name, address in mappings.items():
                for key, partition in flat.items():
                    fragments.setdefault((name, key), []).append(partition.narrow(0, address.start, address.numel))
    universal = checkpoint / "deepspeed-universal" / "zero"
    assert {name for name, _ in fragments} == {p.name for p in universal.iterdir() if p.is_dir()}
    for (name, key), parts in fragments.items():
        whole = torch.load(universal / name / f"{key}.pt", weights_only=True)["param"]
        assert whole.dtype == torch.float32 and torch.equal(whole.flatten(), torch.cat(parts)), (name, key)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("stage", "saved", "now"), [(2, 2, 1), (2, 1, 2), (3, 2, 1)], ids=["zero2-2to1", "zero2-1to2", "zero3-2to1"]
)
def test_checkpoint_resumes_on_another_number_of_ranks(
    workdir: Path, tmp_path: Path, stage: int, saved: int, now: int
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    settings = (*SETTINGS, f"deepspeed_config={ROOT / 'train' / 'configs' / f'zero{stage}.json'}")
    run(train_command(workdir, straight, *settings, nproc=saved))
    checkpoint = resumed / "checkpoints" / "step-00000002"
    stdout = resume_from_step_2(straight, resumed, workdir, settings, nproc=now)
    assert_continues(straight, resumed, stdout, saved, now)
    if stage < 3:
        assert_same_optimizer_state(checkpoint)
    if (saved, now) == (2, 1):  # a second resume from the same checkpoint reuses its universal checkpoint
        stdout = resume_from_step_2(resumed, tmp_path / "again", workdir, settings, nproc=now)
        assert "converting" not in stdout and "resumed from" in stdout, stdout[-3000:]
        assert_same_weights(resumed, tmp_path / "again", atol=0)


class Planted:
    """What a planted pickle would unpickle: a global that no checkpoint of f2llm holds."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_universal_checkpoint_is_read_weights_only(tmp_path: Path) -> None:
    """DeepSpeed's converter and universal loader call torch.load(weights_only=False); within the context torch.load
    refuses a pickle's globals all the same, and outside it torch.load is torch's own again."""
    own = torch.load
    (tmp_path / "deepspeed-universal").mkdir()  # converted before: reused, nothing to convert
    torch.save({"param": torch.ones(2), "planted": Planted()}, tmp_path / "fp32.pt")
    with deepspeed_universal_checkpoint(tmp_path, "deepspeed", saved_world_size=2) as tag:
        assert tag == "deepspeed-universal"
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "fp32.pt", weights_only=False)
    assert torch.load is own
