"""The F2LLM batch sampler: homogeneous batches, the same source on every rank, exactly resumable.

Per epoch:

* every source's training rows are shuffled (seeded by seed, epoch and source name) and cut into global batches of
  ``batch_size * world_size`` rows, so every rank always gets a full batch and cross-rank gathers see equal
  shapes. A source's last, incomplete global batch is, by ``last_batch``:

  - ``"wrap"`` (default, the recipe's: accelerate's ``even_batches``): filled up with rows from the start of the
    source's shuffled order, so every row trains every epoch. A source smaller than one global batch gives one
    batch in which its rows repeat; a repeated positive is then an in-batch negative of its own query (that
    query's in-batch loss cannot fall below log 2, its gradient keeps its direction);
  - ``"drop"``: left out this epoch (every batch holds distinct rows; a source smaller than one global batch
    never trains). :meth:`F2LLMBatchSampler.summary` says, per source, how many rows each epoch uses;
* the order of sources is a seeded random interleaving of all sources' batches: each step draws a source with
  probability proportional to its number of batches not yet used in this epoch. Over an epoch every source gives
  exactly its number of batches, and at the start of an epoch a source is drawn with probability proportional to
  its number of batches (the recipe's rule). The seed is shared by all ranks, so all ranks draw the same source;
* rank r takes rows ``[r * batch_size, (r + 1) * batch_size)`` of the global batch;
* the negatives of a step are ``k`` of the source's K negative columns, ``random.Random`` seeded by (seed, epoch,
  step): the same columns for every row and on every rank (the recipe's ``random.sample(range(24), 7)``).

Everything is a function of (seed, epoch, step), so :meth:`F2LLMBatchSampler.state_dict` is just the position and a
resumed run yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from f2llm.data.readers import TokenizedSource
from f2llm.data.sources import SourceKind


@dataclass
class TrainingBatch:
    """This rank's share of one global batch. Token ids are numpy int32 arrays (one per text).

    Attributes:
        source / kind: where the batch comes from (kind decides the loss: in-batch negatives only for retrieval).
        epoch / step: position in the schedule (step counts from 0 within the epoch).
        rows: dataset rows of this rank's queries.
        negative_columns: 0-based indices of the negative_i columns used for this step.
        queries / passages: ``batch_size`` sequences each.
        negatives: ``batch_size * num_negatives`` sequences, row-major (query i's at ``[i*k, (i+1)*k)``).
    """

    source: str
    kind: SourceKind
    epoch: int
    step: int
    rows: np.ndarray
    negative_columns: list[int]
    queries: list[np.ndarray]
    passages: list[np.ndarray]
    negatives: list[np.ndarray]

    @property
    def batch_size(self) -> int:
        return len(self.queries)

    @property
    def num_negatives(self) -> int:
        return len(self.negative_columns)

    def sequences(self) -> list[np.ndarray]:
        """All texts in one list: queries, then passages, then negatives (row-major)."""
        return [*self.queries, *self.passages, *self.negatives]


def _source_seed(seed: int, epoch: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(name.encode())])


def negative_columns_for_step(seed: int, epoch: int, step: int, available: int, k: int) -> list[int]:
    """The k negative columns (of ``available``) used at a step; identical on every rank."""
    return random.Random(f"f2llm-negatives:{seed}:{epoch}:{step}").sample(range(available), k)


class F2LLMBatchSampler:
    """Yields this rank's :class:`TrainingBatch` for every step, epoch after epoch.

    Args:
        sources: tokenized sources (see :func:`f2llm.data.load_sources`).
        batch_size: queries per rank and step (global batch = batch_size * world_size).
        world_size / rank: this process's place among the data-parallel ranks.
        seed: shared by all ranks.
        epochs: number of epochs to run.
        split: ``"train"`` (training rows) or ``"validation"`` (held-out rows).
        last_batch: ``"wrap"`` or ``"drop"`` each source's last incomplete global batch (see the module docstring).
    """

    def __init__(
        self,
        sources: Sequence[TokenizedSource],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        epochs: int = 1,
        split: str = "train",
        last_batch: str = "wrap",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"F2LLMBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"F2LLMBatchSampler: rank {rank} is outside [0, world_size={world_size})")
        if split not in ("train", "validation"):
            raise ValueError(f"F2LLMBatchSampler: split must be 'train' or 'validation', got {split!r}")
        if last_batch not in ("wrap", "drop"):
            raise ValueError(f"F2LLMBatchSampler: last_batch must be 'wrap' or 'drop', got {last_batch!r}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"F2LLMBatchSampler: duplicate source names in {names}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epochs = epochs
        self.split = split
        self.last_batch = last_batch
        self.global_batch_size = batch_size * world_size
        self._rows = [s.train_rows if split == "train" else s.validation_rows for s in self.sources]
        G = self.global_batch_size
        rounding = (lambda n: -(-n // G)) if last_batch == "wrap" else (lambda n: n // G)
        self.batches_per_source = [rounding(len(rows)) for rows in self._rows]
        if sum(self.batches_per_source) == 0:
            sizes = {s.name: len(r) for s, r in zip(self.sources, self._rows, strict=True)}
            fix = "lower batch_size or use last_batch: wrap" if last_batch == "drop" else "the sources have no rows"
            raise ValueError(
                f"F2LLMBatchSampler: no source has a full global batch of {G} rows ({split} rows per source: "
                f"{sizes}, last_batch: {last_batch}); {fix}"
            )
        self.epoch = 0
        self.step = 0
        self._schedule_epoch = -1
        self._schedule: np.ndarray = np.empty(0, dtype=np.int64)
        self._batch_number: np.ndarray = np.empty(0, dtype=np.int64)
        self._orders: dict[int, np.ndarray] = {}

    def summary(self) -> list[str]:
        """One line per source: rows, batches per epoch, rows each epoch uses (and how many it drops or repeats)."""
        lines = []
        for source, rows, batches in zip(self.sources, self._rows, self.batches_per_source, strict=True):
            used = batches * self.global_batch_size
            if used > len(rows):
                what = f"all, {used - len(rows)} repeated to fill the last batch (last_batch: wrap)"
            elif used < len(rows):
                what = f"{used}, {len(rows) - used} left out each epoch (last_batch: drop)"
            else:
                what = "all"
            lines.append(
                f"{self.split} source {source.name!r} ({source.kind}): {len(rows)} rows, {batches} global batches "
                f"of {self.global_batch_size} per epoch, rows used: {what}"
            )
        return lines

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_source)

    def __len__(self) -> int:
        """Steps left from the current position to the end of the last epoch."""
        return (self.epochs - self.epoch) * self.steps_per_epoch - self.step

    def source_schedule(self, epoch: int) -> np.ndarray:
        """Index of the source of every step of an epoch (same on every rank)."""
        self._prepare_epoch(epoch)
        return self._schedule

    def _prepare_epoch(self, epoch: int) -> None:
        if self._schedule_epoch == epoch:
            return
        labels = np.repeat(np.arange(len(self.sources)), self.batches_per_source)
        self._schedule = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(labels)
        # The j-th occurrence of a source in the schedule reads that source's j-th batch.
        self._batch_number = np.empty_like(self._schedule)
        for s in range(len(self.sources)):
            where = np.flatnonzero(self._schedule == s)
            self._batch_number[where] = np.arange(where.size)
        self._orders = {}
        self._schedule_epoch = epoch

    def _row_order(self, source_index: int) -> np.ndarray:
        """The source's rows of this epoch, shuffled, cut or wrapped to its batches' length."""
        order = self._orders.get(source_index)
        if order is None:
            rows = self._rows[source_index]
            name = self.sources[source_index].name
            shuffled = _source_seed(self.seed, self._schedule_epoch, name).permutation(rows)
            # np.resize repeats the order from its start as often as needed (wrap), or cuts it (drop).
            order = np.resize(shuffled, self.batches_per_source[source_index] * self.global_batch_size)
            self._orders[source_index] = order
        return order

    def batch_at(self, epoch: int, step: int) -> TrainingBatch:
        """This rank's batch at (epoch, step), without moving the sampler's position."""
        self._prepare_epoch(epoch)
        if not 0 <= step < len(self._schedule):
            raise IndexError(f"F2LLMBatchSampler: step {step} outside the epoch's {len(self._schedule)} steps")
        s = int(self._schedule[step])
        source = self.sources[s]
        first = int(self._batch_number[step]) * self.global_batch_size + self.rank * self.batch_size
        rows = self._row_order(s)[first : first + self.batch_size]
        k = source.num_negatives
        if self.split == "train":
            columns = negative_columns_for_step(self.seed, epoch, step, source.available_negatives, k)
        else:
            columns = list(range(k))
        queries, passages, negatives = source.take(rows, columns)
        return TrainingBatch(
            source=source.name,
            kind=source.kind,
            epoch=epoch,
            step=step,
            rows=rows,
            negative_columns=columns,
            queries=queries,
            passages=passages,
            negatives=negatives,
        )

    def __iter__(self) -> Iterator[TrainingBatch]:
        while self.epoch < self.epochs:
            while self.step < self.steps_per_epoch:
                batch = self.batch_at(self.epoch, self.step)
                # The position moves before the batch is handed out: a state_dict taken while the caller works on
                # this batch resumes at the next one.
                self.step += 1
                yield batch
            self.epoch += 1
            self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "last_batch": self.last_batch,
            "sources": {s.name: len(r) for s, r in zip(self.sources, self._rows, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position. The data, seed and global batch must be those of the saved run."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "batch_size", "last_batch", "sources"):
            # Checkpoints written before last_batch existed come from samplers that dropped incomplete batches.
            saved = state.get(key, "drop") if key == "last_batch" else state.get(key)
            if saved != mine[key]:
                raise ValueError(
                    f"F2LLMBatchSampler.load_state_dict: saved {key}={saved!r} differs from this run's "
                    f"{mine[key]!r}; a resumed run needs the same data, seed, batch size, last_batch and world size"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
