"""Every engine with every gradient-cache chunking, the way users launch them: 2 ranks under torchrun (gloo).

Each row of the matrix trains 2 ranks x 2 queries and must end at the weights (and the training and validation
losses) of 1 rank x 4 queries, padded, without the gradient cache (fp32, 1e-5). Rows pair every engine (DDP,
DeepSpeed ZeRO-2, ZeRO-3) with every chunking (none; by text count, >= 3 chunks; by tokens, where the two ranks
would make different numbers of chunks), each engine and each chunking once padded and once packed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from f2llm.config import load_config
from f2llm.data import F2LLMBatchSampler
from f2llm.encoder import Encoder
from f2llm.gradcache import chunk_by_tokens
from f2llm.trainer import training_sources
from tests.helpers import ROOT, assert_same_weights, metrics, run, train_command, trainer_workdir, weights

TEXT_CHUNK = 3  # 2 queries x (2 + 2 negatives) = 8 texts on msmarco steps: 3 chunks per rank
TOKEN_CHUNK = 40
ENGINES = {
    "ddp": (),
    "zero0": ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero0.json'}"),
    "zero2": ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}"),
    "zero3": ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero3.json'}"),
}
CHUNKING = {
    "none": (),
    "texts": ("grad_cache.enabled=true", f"grad_cache.chunk_texts={TEXT_CHUNK}"),
    "tokens": ("grad_cache.enabled=true", f"grad_cache.chunk_tokens={TOKEN_CHUNK}"),
}
LAYOUT = {"padded": (), "packed": ("data.packing=true", "data.max_tokens=128")}
MATRIX = [
    ("ddp", "none", "padded"),
    ("ddp", "texts", "packed"),
    ("ddp", "tokens", "padded"),
    ("zero2", "none", "packed"),
    ("zero2", "texts", "padded"),
    ("zero2", "tokens", "packed"),
    ("zero3", "none", "padded"),
    ("zero3", "texts", "packed"),
    ("zero3", "tokens", "padded"),
    ("zero0", "tokens", "packed"),  # fp32 ZeRO-0 steps the torch optimizer itself: f2llm computes the norm
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def one_rank(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-rank") / "run"
    run(train_command(workdir, out, "data.batch_size=4"))
    return out


def natural_chunk_counts(workdir: Path, steps: int) -> list[tuple[int, int]]:
    """(rank 0, rank 1) chunk counts that chunking by TOKEN_CHUNK tokens gives each step, before the ranks agree."""
    config = load_config(workdir / "base.yaml", ["data.batch_size=2"])
    encoder = Encoder.from_pretrained(config.model.name_or_path, max_length=config.model.max_length)
    sources = training_sources(config, encoder.text_tokenizer)
    counts = []
    samplers = [F2LLMBatchSampler(sources, 2, world_size=2, rank=r, seed=config.data.seed) for r in (0, 1)]
    for step in range(steps):
        seqs = [s.batch_at(0, step).sequences() for s in samplers]
        counts.append(tuple(len(chunk_by_tokens(x, TOKEN_CHUNK)) for x in seqs))
    return counts


def test_token_chunking_gives_the_ranks_unequal_counts(workdir: Path) -> None:
    """Guards the matrix: its token-chunked rows really have ranks whose own chunk counts differ."""
    counts = natural_chunk_counts(workdir, steps=4)
    assert any(a != b for a, b in counts), counts


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("engine", "chunking", "layout"), MATRIX, ids=["-".join(row) for row in MATRIX])
def test_two_ranks_match_one_rank(
    workdir: Path, one_rank: Path, tmp_path: Path, engine: str, chunking: str, layout: str
) -> None:
    out = tmp_path / "run"
    overrides = ("data.batch_size=2", *ENGINES[engine], *CHUNKING[chunking], *LAYOUT[layout])
    stdout = run(train_command(workdir, out, *overrides, nproc=2))
    assert_same_weights(one_rank, out, atol=1e-5)
    reference, got = metrics(one_rank), metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for a, b in zip(reference, got, strict=True):
        for key in ("train/loss", "train/hard", "train/in_batch", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # The start of the run says what each step communicates.
    said = {"ddp": "engine ddp, 2 ranks: one all-reduce", "zero0": "ZeRO-0, 2 rank(s): one reduction",
            "zero2": "ZeRO-2, 2 rank(s): a reduce-scatter", "zero3": "ZeRO-3, 2 rank(s): a reduce-scatter"}  # fmt: skip
    assert said[engine] in stdout and ("gradient-cache chunk" in stdout) == (chunking != "none"), stdout[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_resume_continues_exactly(workdir: Path, tmp_path: Path) -> None:
    """ZeRO-2, 2 ranks, gradient cache by tokens, dropout on: a run resumed from its step-2 checkpoint (the newer
    ones and the final model lost, as after a kill) ends at the uninterrupted run's weights, with the same
    learning rate at every step (DeepSpeed's scheduler state is not loaded; the schedule is put at the step)."""
    settings = (
        f"model.name_or_path={workdir / 'tiny-qwen3-1'}", "data.batch_size=2", *ENGINES["zero2"],
        *CHUNKING["tokens"], "optim.max_steps=6", "validate_every=100", "keep_last=5",
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(train_command(workdir, straight, *settings, nproc=2))
    shutil.copytree(straight, resumed)
    for lost in ("step-00000004", "step-00000006"):
        shutil.rmtree(resumed / "checkpoints" / lost)
    shutil.rmtree(resumed / "final")
    stdout = run(train_command(workdir, resumed, *settings, nproc=2))
    assert "resumed from" in stdout and "at step 2 of 6" in stdout
    assert_same_weights(straight, resumed, atol=0)
    lrs = [[(r["step"], r["train/lr"]) for r in metrics(run_dir) if "train/lr" in r] for run_dir in (straight, resumed)]
    assert lrs[0] == lrs[1] and [s for s, _ in lrs[1]] == list(range(1, 7))


@pytest.mark.slow
def test_deepspeed_runs_as_one_process_without_torchrun(workdir: Path, one_rank: Path, tmp_path: Path) -> None:
    """`f2llm train` with a DeepSpeed config and no launcher (the README's first command): a process group of one."""
    out = tmp_path / "run"
    run(train_command(workdir, out, "data.batch_size=4", *ENGINES["zero2"]))
    assert_same_weights(one_rank, out, atol=1e-5)


def mean_weight_change(run_dir: Path, initial: dict[str, torch.Tensor]) -> float:
    final = weights(run_dir)
    keys = [k for k in final if k in initial and final[k].dim() == 2]
    return sum(float((final[k].double() - initial[k].double()).abs().mean()) for k in keys) / len(keys)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_bf16_two_ranks_with_chunks_train_like_fp32(workdir: Path, one_rank: Path, tmp_path: Path, engine: str) -> None:
    """What users launch: bf16 (DDP: autocast over fp32 master weights; ZeRO-2: DeepSpeed's bf16), 2 ranks, the
    gradient cache by tokens. Each step's loss is the fp32 run's to bf16 accuracy, and the weights move as far."""
    out = tmp_path / "run"
    overrides = ("data.batch_size=2", "model.dtype=bfloat16", *ENGINES[engine], *CHUNKING["tokens"])
    run(train_command(workdir, out, *overrides, nproc=2))
    reference, got = metrics(one_rank), metrics(out)
    for a, b in zip(reference, got, strict=True):
        for key in ("train/loss", "val/loss"):
            if key in a:  # bf16's ~4e-3 error in a cosine is x20 in a logit at temperature 0.05
                assert b[key] == pytest.approx(a[key], rel=5e-2), (a["step"], key)
    initial = AutoModel.from_pretrained(str(workdir / "tiny-qwen3-0")).state_dict()
    fp32, bf16 = mean_weight_change(one_rank, initial), mean_weight_change(out, initial)
    assert bf16 == pytest.approx(fp32, rel=0.1), (bf16, fp32)
    assert {t.dtype for t in weights(out).values()} == {torch.bfloat16}  # final_dtype auto: the compute dtype
