"""The official F2LLM data loop's rules, as settings: data.source_draw: fixed, data.last_batch: keep and
data.max_rows_per_source (F2LLM v2's 80,000-row sample per source)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from f2llm.config import load_config
from f2llm.data import F2LLMBatchSampler, SourceOverride, TextTokenizer, load_source, load_sources
from f2llm.data.sampler import fixed_weight_schedule, occurrence_index
from f2llm.distributed import Runtime
from f2llm.trainer import Trainer, training_sources
from tests.helpers import assert_same_weights, make_rows, metrics, tiny_tokenizer, trainer_workdir, write_source

datasets.disable_progress_bars()
RETRIEVAL_0 = SourceOverride(kind="retrieval", num_negatives=0)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(tiny_tokenizer(), max_length=32, append_eos=True)


# ------------------------------------------------------------------------------------------------ source_draw: fixed
@dataclass
class Rows:
    """What the sampler reads of a source to build an epoch's schedule."""

    name: str
    train_rows: np.ndarray
    validation_rows: np.ndarray = field(default_factory=lambda: np.arange(0))
    kind: str = "retrieval"


def schedules(batches: list[int], source_draw: str, epochs: int, seed: int = 0) -> np.ndarray:
    """f2llm's schedules of ``epochs`` epochs, sources of ``batches`` batches of 4 rows: [epochs, steps]."""
    sources = [Rows(f"s{i}", np.arange(4 * n)) for i, n in enumerate(batches)]
    sampler = F2LLMBatchSampler(sources, 4, seed=seed, source_draw=source_draw)
    return np.stack([sampler.source_schedule(epoch) for epoch in range(epochs)])


def official_schedules(batches: list[int], epochs: int) -> np.ndarray:
    """The official loop's rule (F2LLM run.py's MultiLoader), written plainly: each step draws a source with
    ``random.Random(epoch).choices`` over the sources not yet found exhausted, weighted by their batches per epoch;
    drawing an exhausted one removes it and draws again."""
    out = []
    for epoch in range(epochs):
        rng = random.Random(epoch)
        left = list(batches)
        names, weights = list(range(len(batches))), list(batches)
        steps = []
        while names:
            name = rng.choices(names, weights=weights)[0]
            if left[name] == 0:  # its loader raised StopIteration
                i = names.index(name)
                names.pop(i)
                weights.pop(i)
                continue
            left[name] -= 1
            steps.append(name)
        out.append(steps)
    return np.array(out)


def final_run(schedule: np.ndarray) -> np.ndarray:
    """Per epoch, the length of the run of one source that ends it."""
    last = schedule[:, -1:]
    differs = schedule != last
    where = np.where(differs.any(axis=1), schedule.shape[1] - 1 - np.argmax(differs[:, ::-1], axis=1), -1)
    return schedule.shape[1] - 1 - where


def statistics(schedule: np.ndarray, num_sources: int, bins: int = 10) -> np.ndarray:
    """Per epoch: the final run's length, then each source's share of the steps in each of ``bins`` stretches."""
    stretches = np.array_split(np.arange(schedule.shape[1]), bins)
    shares = [(schedule[:, s] == src).mean(axis=1) for src in range(num_sources) for s in stretches]
    return np.column_stack([final_run(schedule), *shares])


def largest_z(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |difference of means| / standard error over the statistics' columns (epochs are independent)."""
    se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
    z = np.abs(a.mean(axis=0) - b.mean(axis=0)) / np.where(se > 0, se, np.inf)
    return float(z.max())


@pytest.mark.parametrize("batches", [[100, 10], [60, 25, 5]])
def test_fixed_draw_follows_the_official_rule(batches: list[int]) -> None:
    """Over many epochs the fixed draw has the official rule's statistics (final run of one source, each source's
    share of every stretch of the epoch), and the remaining draw visibly has not (the test can tell them apart)."""
    epochs = 2500
    official = statistics(official_schedules(batches, epochs), len(batches))
    fixed = statistics(schedules(batches, "fixed", epochs), len(batches))
    remaining = statistics(schedules(batches, "remaining", epochs), len(batches))
    assert largest_z(fixed, official) < 4.5
    assert largest_z(remaining, official) > 9
    if batches == [100, 10]:  # the numbers the sampler's docstring gives
        assert official[:, 0].mean() == pytest.approx(14.6, abs=1.2)
        assert fixed[:, 0].mean() == pytest.approx(14.6, abs=1.2)
        assert remaining[:, 0].mean() == pytest.approx(9.1, abs=0.6)


def test_fixed_draw_gives_every_batch_once_the_same_on_every_rank() -> None:
    sources = [Rows(f"s{i}", np.arange(n)) for i, n in enumerate([37, 8, 100, 3])]
    ranks = [F2LLMBatchSampler(sources, 2, world_size=2, rank=r, seed=5, source_draw="fixed") for r in (0, 1)]
    schedule = ranks[0].source_schedule(3)
    assert np.bincount(schedule).tolist() == ranks[0].batches_per_source == [10, 2, 25, 1]
    assert (ranks[1].source_schedule(3) == schedule).all()
    again = F2LLMBatchSampler(sources, 2, world_size=2, seed=5, source_draw="fixed")
    assert (again.source_schedule(3) == schedule).all()  # a function of (seed, epoch): a resume rebuilds it
    assert (again.source_schedule(4) != schedule).any()
    # An epoch of a million steps over v2's 502 sources is one sort.
    big = np.random.default_rng(0).integers(1, 4000, size=502)  # ~10^6 batches
    big[[3, 100]] = 0  # sources without a batch (e.g. under last_batch: drop) never come
    assert big.sum() > 1_000_000
    long = fixed_weight_schedule(big.tolist(), np.random.default_rng(1))
    assert (np.bincount(long, minlength=502) == big).all()
    assert (occurrence_index(long, 502)[long == 7] == np.arange(big[7])).all()


# ------------------------------------------------------------------------------------------------ last_batch: keep
@pytest.fixture
def sources(tmp_path: Path, tokenizer: TextTokenizer):
    folder = tmp_path / "sources"
    for name, n, k in (("msmarco", 22, 3), ("imdb", 13, 1), ("banking77", 9, 2)):
        write_source(folder / f"{name}.parquet", make_rows(n, k, prefix=name))
    overrides = {"msmarco": SourceOverride(num_negatives=2), "banking77": SourceOverride(num_negatives=2)}
    return load_sources(folder, tokenizer, tmp_path / "cache", overrides=overrides, validation_fraction=0.0)


@pytest.mark.parametrize("source_draw", ["remaining", "fixed"])
def test_keep_trains_the_short_last_batch_on_one_process(sources, source_draw: str) -> None:
    sampler = F2LLMBatchSampler(sources, 4, seed=2, epochs=2, last_batch="keep", source_draw=source_draw)
    batches = list(sampler)
    for epoch in (0, 1):
        for source in sources:
            mine = [b for b in batches if b.epoch == epoch and b.source == source.name]
            rows = np.concatenate([b.rows for b in mine])
            assert sorted(rows.tolist()) == list(range(len(source)))  # every row once, none repeated
            sizes = [b.batch_size for b in mine]
            assert sizes == [4] * (len(source) // 4) + ([len(source) % 4] if len(source) % 4 else [])
            for b in mine:
                assert len(b.passages) == b.batch_size and len(b.negatives) == b.batch_size * b.num_negatives
    summary = sampler.summary()
    assert "data.source_draw: " + source_draw in summary[0] and "last incomplete batch: keep" in summary[0]
    assert any("'msmarco'" in line and "the last batch has 2 of 4 rows (last_batch: keep)" in line for line in summary)


def test_keep_is_wrap_on_several_ranks(sources) -> None:
    for rank in (0, 1):
        keep = F2LLMBatchSampler(sources, 2, world_size=2, rank=rank, seed=4, epochs=2, last_batch="keep")
        wrap = F2LLMBatchSampler(sources, 2, world_size=2, rank=rank, seed=4, epochs=2, last_batch="wrap")
        assert [(b.source, b.rows.tolist(), b.negative_columns) for b in keep] == [
            (b.source, b.rows.tolist(), b.negative_columns) for b in wrap
        ]
    assert "keep, as wrap on 2 ranks (accelerate's even_batches" in keep.summary()[0]
    assert any(
        "'msmarco'" in line and "2 repeated to fill the last batch (last_batch: keep)" in line
        for line in keep.summary()
    )


def test_resume_refuses_another_last_batch_or_source_draw(sources) -> None:
    sampler = F2LLMBatchSampler(sources, 4, seed=1, epochs=2, last_batch="keep", source_draw="fixed")
    head = [b for _, b in zip(range(5), sampler, strict=False)]
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = F2LLMBatchSampler(sources, 4, seed=1, epochs=2, last_batch="keep", source_draw="fixed")
    resumed.load_state_dict(state)
    full = list(F2LLMBatchSampler(sources, 4, seed=1, epochs=2, last_batch="keep", source_draw="fixed"))
    assert [(b.source, b.rows.tolist()) for b in head + list(resumed)] == [(b.source, b.rows.tolist()) for b in full]
    with pytest.raises(ValueError, match=r"saved source_draw='fixed' \(data\.source_draw\) differs .* 'remaining'"):
        F2LLMBatchSampler(sources, 4, seed=1, last_batch="keep").load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved last_batch='keep' \(data\.last_batch\) differs .* 'wrap'"):
        F2LLMBatchSampler(sources, 4, seed=1, source_draw="fixed").load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "source_draw"}  # written before source_draw existed
    F2LLMBatchSampler(sources, 4, seed=1, last_batch="keep").load_state_dict(old)
    with pytest.raises(ValueError, match="saved source_draw='remaining'"):
        F2LLMBatchSampler(sources, 4, seed=1, last_batch="keep", source_draw="fixed").load_state_dict(old)


def test_keep_with_the_gradient_cache_trains_and_validates_short_batches(tmp_path: Path) -> None:
    """One process, last_batch: keep: the short batches (training and validation) go through the gradient cache's
    chunks, the loss and validation, and train exactly as one forward would."""
    root = trainer_workdir(tmp_path / "work")
    write_source(root / "data" / "msmarco.parquet", make_rows(22, 3))  # 19 train rows: batches of 8, 8, 3
    write_source(root / "data" / "banking77.parquet", make_rows(13, 1, prefix="b "))  # 11: 8, 3
    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"))

    def run(name: str, *overrides: str) -> Trainer:
        settings = ["data.batch_size=8", "data.last_batch=keep", "optim.max_steps=null", "validate_every=100"]
        config = load_config(root / "base.yaml", [f"output_dir={tmp_path / name}", *settings, *overrides])
        trainer = Trainer.from_config(config, runtime)
        trainer.train()
        return trainer

    cached = run("cached", "grad_cache.enabled=true", "grad_cache.chunk_texts=5", "save_every=100")
    sizes = sorted(cached.sampler.batch_at(0, s).batch_size for s in range(cached.sampler.steps_per_epoch))
    assert sizes == [3, 3, 8, 8, 8] and cached.total_steps == 5
    val_sizes = [cached.validation.batch_at(0, s).batch_size for s in range(cached.validation.steps_per_epoch)]
    assert 2 in val_sizes  # banking77's 2 held-out rows, in validation batches of 3: a short one
    rows = metrics(tmp_path / "cached")
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 5 and all(math.isfinite(r["train/loss"]) for r in train_rows)
    assert [r["step"] for r in rows if "val/loss" in r] == [5] and math.isfinite(rows[-1]["val/loss"])
    run("plain", "save_every=100")
    assert_same_weights(tmp_path / "plain", tmp_path / "cached", atol=1e-5)


# ------------------------------------------------------------------------------------------------ max_rows_per_source
def _count_tokenized_texts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    texts = [0]
    original = TextTokenizer.__call__

    def counting(self, batch):
        texts[0] += len(batch)
        return original(self, batch)

    monkeypatch.setattr(TextTokenizer, "__call__", counting)
    return texts


def test_cap_keeps_a_seeded_sample_and_tokenizes_only_it(
    tmp_path: Path, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_source(tmp_path / "qqp.parquet", make_rows(300, 2))
    texts = _count_tokenized_texts(monkeypatch)
    capped = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7, max_rows=40)
    assert texts[0] == 40 * 4  # query, passage, 2 negatives of the sampled rows only
    assert (len(capped), capped.total_rows) == (40, 300)
    assert len(set(capped.file_rows.tolist())) == 40 and capped.file_rows.max() < 300
    # The dataset's rows are the file's rows file_rows, tokenized as an uncapped load tokenizes them.
    full = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7)
    assert full.file_rows is None and len(full) == 300
    assert [a.tolist() for a in capped.take(np.arange(40), [1])[2]] == [
        a.tolist() for a in full.take(capped.file_rows, [1])[2]
    ]
    # The same rows at a second load (cache hit), from another cache (tokenized again) and in another process.
    texts[0] = 0
    again = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7, max_rows=40)
    assert again.cache_hit and texts[0] == 0 and (again.file_rows == capped.file_rows).all()
    other_cache = load_source(path, tokenizer, tmp_path / "c2", override=RETRIEVAL_0, seed=7, max_rows=40)
    assert not other_cache.cache_hit and (other_cache.file_rows == capped.file_rows).all()
    script = "import sys; from f2llm.data.readers import sample_rows; print(sample_rows(300, 40, 7, 'qqp').tolist())"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == capped.file_rows.tolist()
    # The holdout splits the sample (v2: sample, then split): ceil(10% of 40) held-out rows, all sampled ones.
    split = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7, max_rows=40,
                        validation_fraction=0.1)  # fmt: skip
    assert split.cache_hit and len(split.validation_rows) == 4 and len(split.train_rows) == 36
    held_out = set(split.file_rows[split.validation_rows].tolist())
    assert held_out <= set(capped.file_rows.tolist())
    # Another seed or cap: another sample, in a cache of its own.
    reseeded = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=8, max_rows=40)
    assert not reseeded.cache_hit and set(reseeded.file_rows.tolist()) != set(capped.file_rows.tolist())
    assert reseeded.cache_file != capped.cache_file
    bigger = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7, max_rows=41)
    assert not bigger.cache_hit and len(bigger) == 41
    # A source of at most max_rows rows keeps every row, in file order.
    small = load_source(path, tokenizer, tmp_path / "c1", override=RETRIEVAL_0, seed=7, max_rows=300)
    assert small.file_rows is None and (len(small), small.total_rows) == (300, 300)


def test_cap_from_the_config_is_the_same_on_every_rank_and_said(tmp_path: Path) -> None:
    write_source(tmp_path / "d" / "msmarco.parquet", make_rows(120, 7))
    write_source(tmp_path / "d" / "banking77.parquet", make_rows(30, 7, prefix="b "))
    overrides = ["model.name_or_path=m", f"data.paths=[{tmp_path / 'd'}]", f"data.cache_dir={tmp_path / 'cache'}"]
    config = load_config(
        None, [*overrides, "data.max_rows_per_source=50", "data.seed=3", "data.validation_fraction=0.04"]
    )
    tokenizer = TextTokenizer(tiny_tokenizer(), max_length=32, append_eos=True)
    banking, msmarco = training_sources(config, tokenizer)
    assert (len(msmarco), msmarco.total_rows, len(banking), banking.file_rows) == (50, 120, 30, None)
    assert len(msmarco.validation_rows) == 2  # 4% of the 50 sampled rows
    ranks = [F2LLMBatchSampler([banking, msmarco], 2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    rows = [set(np.concatenate([b.rows for b in sampler if b.source == "msmarco"]).tolist()) for sampler in ranks]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(msmarco.train_rows.tolist())
    summary = ranks[0].summary()
    assert any(
        "'msmarco'" in line and "(of a sample of 50 of 120 rows: data.max_rows_per_source)" in line for line in summary
    )
    assert not any("'banking77'" in line and "sample" in line for line in summary)
