"""The F2LLM batch sampler: homogeneous batches, the same source on every rank, exactly resumable.

Per epoch:

* every source's rows of the split are shuffled (seeded by seed, epoch and source name) and cut into global batches
  of ``batch_size * world_size`` rows; rank r takes rows ``[r * batch_size, (r + 1) * batch_size)`` of each. A
  source's last, incomplete global batch is, by ``last_batch``:

  - ``"wrap"`` (default, what accelerate's ``even_batches`` does to the recipe's loaders on several processes):
    filled up with rows from the start of the source's shuffled order, so every row trains every epoch and every
    rank gets a full batch (cross-rank gathers see equal shapes). A source smaller than one global batch gives one
    batch in which its rows repeat; a repeated positive is then an in-batch negative of its own query (that
    query's in-batch loss cannot fall below log 2, its gradient keeps its direction);
  - ``"drop"``: left out this epoch (every batch holds distinct rows; a source smaller than one global batch
    never trains);
  - ``"keep"`` (the official loop): on one process the short batch trains as it is, fewer queries that step
    (every row once per epoch, none repeated); on several processes it is wrapped, as accelerate's
    ``even_batches`` does in the official code, so ``keep`` is ``wrap`` there.

  :meth:`F2LLMBatchSampler.summary` says, per source, how many rows each epoch uses and what its last batch does;
* the order of sources is a seeded random interleaving of all sources' batches, by ``source_draw``:

  - ``"remaining"`` (default): each step draws a source with probability proportional to its batches not yet used
    in this epoch (a uniform shuffle of all batches). At the start of an epoch a source is drawn in proportion to
    its batches per epoch, and every position of the epoch sees each source in that proportion;
  - ``"fixed"`` (the official F2LLM loop's ``MultiLoader``): each step draws a source with fixed weights, each
    source's batches per epoch, among the sources not yet exhausted in this epoch. A source that happens to run
    ahead is exhausted early and the others share its weight, so the last steps of an epoch tend to be a run of
    one large source (with sources of 100 and 10 batches the epoch ends on ~14.6 batches of one source on average,
    against ~9.1 with ``remaining``). It is drawn as a race of Poisson processes: source s's j-th batch comes at
    the j-th point of a Poisson process of rate (its batches per epoch), and the steps follow these times. At
    every step the next point among the sources with batches left belongs to s with probability proportional to
    its rate (memorylessness), which is exactly the official rule; it costs one sort per epoch.

  Either way every source gives exactly its number of batches per epoch. The seed is shared by all ranks, so all
  ranks draw the same source;
* the negatives of a step are ``k`` of the source's K negative columns, ``random.Random`` seeded by (seed, epoch,
  step): the same columns for every row and on every rank (the recipe's ``random.sample(range(24), 7)``).
  Validation batches sample theirs the same way under a key of their own (the split), so they see negatives drawn
  like training's, the same ones at every validation pass: validation losses stay comparable across a run.

Everything is a function of (seed, epoch, step) and the global batch size, not of the number of ranks: rank r of W
takes rows ``[r * G / W, (r + 1) * G / W)`` of each global batch of G rows. :meth:`F2LLMBatchSampler.state_dict` is
just the position, and a run resumed on any number of ranks that divides G yields exactly the global batches an
uninterrupted run would have (``last_batch: keep`` excepted across 1 and several ranks: it wraps on several).
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
        queries / passages: ``batch_size`` sequences each (a source's last batch under ``last_batch: keep`` on one
            process holds fewer: :attr:`batch_size` is what this batch holds).
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

    def split(self, embeddings: Any) -> tuple[Any, Any, Any]:
        """(queries [B, D], positives [B, D], negatives [B, k, D]) of embeddings laid out as :meth:`sequences`."""
        return split_embeddings(embeddings, self.batch_size, self.num_negatives)


def split_embeddings(embeddings: Any, batch_size: int, num_negatives: int) -> tuple[Any, Any, Any]:
    """The one place the batch layout is read: rows ``[0, B)`` are the queries, ``[B, 2B)`` their positives and
    ``[2B, 2B + B*k)`` the negatives, row-major (query i's at ``2B + [i*k, (i+1)*k)``), returned as [B, k, D].
    Rows may carry more axes (layer exits: ``[n, E, D]`` gives [B, E, D], [B, E, D], [B, k, E, D])."""
    B, k = batch_size, num_negatives
    return embeddings[:B], embeddings[B : 2 * B], embeddings[2 * B :].reshape(B, k, *embeddings.shape[1:])


LAST_BATCH_RULES = ("wrap", "drop", "keep")
SOURCE_DRAW_RULES = ("remaining", "fixed")


def _source_seed(seed: int, epoch: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(name.encode())])


def negative_columns_for_step(
    seed: int, epoch: int, step: int, available: int, k: int, split: str = "train"
) -> list[int]:
    """The k negative columns (of ``available``) used at a step; identical on every rank. ``split`` keys the draw
    (validation's are drawn apart from training's; training's key is the one checkpoints were written with)."""
    key = f"{seed}:{epoch}:{step}" if split == "train" else f"{split}:{seed}:{epoch}:{step}"
    return random.Random(f"f2llm-negatives:{key}").sample(range(available), k)


def fixed_weight_schedule(batches: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Source of every step of an epoch under the official rule (``source_draw: fixed``): each step draws a source
    with probability proportional to its batches per epoch among the sources with batches left.

    Drawn as a race: source s's j-th batch comes at the j-th point of a Poisson process of rate ``batches[s]``
    (exponential gaps), and the steps follow these times. Given the past, the next point among the sources with
    batches left belongs to s with probability ``batches[s] / sum(their batches)`` (memorylessness), which is the
    rule; a source that has given all its batches simply stops. One sort of all batches, however many sources.
    """
    counts = np.asarray(batches, dtype=np.int64)
    labels = np.repeat(np.arange(counts.size), counts)
    times = np.empty(labels.size, dtype=np.float64)
    start = 0
    for count in counts.tolist():
        # Arrival times of one source, increasing: its batches keep their order in the schedule.
        times[start : start + count] = np.cumsum(rng.standard_exponential(count)) / max(count, 1)
        start += count
    return labels[np.argsort(times, kind="stable")]


def occurrence_index(schedule: np.ndarray, num_sources: int) -> np.ndarray:
    """For every step, how many earlier steps drew the same source: the source's batch that step reads."""
    order = np.argsort(schedule, kind="stable")
    first = np.concatenate([[0], np.cumsum(np.bincount(schedule, minlength=num_sources))[:-1]])
    index = np.empty_like(schedule)
    index[order] = np.arange(schedule.size) - first[schedule[order]]
    return index


class F2LLMBatchSampler:
    """Yields this rank's :class:`TrainingBatch` for every step, epoch after epoch.

    Args:
        sources: tokenized sources (see :func:`f2llm.data.load_sources`).
        batch_size: queries per rank and step (global batch = batch_size * world_size).
        world_size / rank: this process's place among the data-parallel ranks.
        seed: shared by all ranks.
        epochs: number of epochs to run.
        split: ``"train"`` (training rows) or ``"validation"`` (held-out rows).
        last_batch: ``"wrap"``, ``"drop"`` or ``"keep"`` each source's last incomplete global batch (keep: as it is
            on one process, wrapped on several; see the module docstring).
        source_draw: ``"remaining"`` or ``"fixed"``: how each step picks its source (see the module docstring).
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
        source_draw: str = "remaining",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"F2LLMBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"F2LLMBatchSampler: rank {rank} is outside [0, world_size={world_size})")
        if split not in ("train", "validation"):
            raise ValueError(f"F2LLMBatchSampler: split must be 'train' or 'validation', got {split!r}")
        if last_batch not in LAST_BATCH_RULES:
            raise ValueError(
                f"F2LLMBatchSampler: last_batch must be one of {', '.join(map(repr, LAST_BATCH_RULES))} "
                f"(data.last_batch), got {last_batch!r}"
            )
        if source_draw not in SOURCE_DRAW_RULES:
            raise ValueError(
                f"F2LLMBatchSampler: source_draw must be one of {', '.join(map(repr, SOURCE_DRAW_RULES))} "
                f"(data.source_draw), got {source_draw!r}"
            )
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
        self.source_draw = source_draw
        # keep on several ranks: accelerate's even_batches wraps the short batch (every rank needs a full batch
        # for the cross-rank gathers), so the rule applied is wrap's.
        self.applied_last_batch = "wrap" if last_batch == "keep" and world_size > 1 else last_batch
        self.global_batch_size = batch_size * world_size
        self._rows = [s.train_rows if split == "train" else s.validation_rows for s in self.sources]
        G = self.global_batch_size
        rounding = (lambda n: n // G) if last_batch == "drop" else (lambda n: -(-n // G))
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
        """A line on the rules, then one line per source: rows (of how many, when data.max_rows_per_source sampled
        them), batches per epoch, rows each epoch uses (and how many it drops or repeats, or the short last batch)."""
        G = self.global_batch_size
        if self.source_draw == "fixed":
            draw = "fixed weights (batches per epoch) among the sources not yet exhausted, the official loop's"
        else:
            draw = "in proportion to each source's batches left in the epoch"
        last = self.last_batch
        if last != self.applied_last_batch:
            last = f"keep, as wrap on {self.world_size} ranks (accelerate's even_batches fills the short batch)"
        lines = [
            f"{self.split}: {self.steps_per_epoch} steps per epoch over {len(self.sources)} source(s), global batch "
            f"{G}; each step's source drawn {draw} (data.source_draw: {self.source_draw}); a source's last "
            f"incomplete batch: {last} (data.last_batch)"
        ]
        for source, rows, batches in zip(self.sources, self._rows, self.batches_per_source, strict=True):
            used = batches * G
            if self.applied_last_batch == "keep":
                short = len(rows) % G
                what = f"all, the last batch has {short} of {G} rows (last_batch: keep)" if short else "all"
            elif used > len(rows):
                what = f"all, {used - len(rows)} repeated to fill the last batch (last_batch: {self.last_batch})"
            elif used < len(rows):
                what = f"{used}, {len(rows) - used} left out each epoch (last_batch: drop)"
            else:
                what = "all"
            total = getattr(source, "total_rows", None)
            sampled = ""
            if total is not None and total > len(source):
                sampled = f" (of a sample of {len(source)} of {total} rows: data.max_rows_per_source)"
            lines.append(
                f"{self.split} source {source.name!r} ({source.kind}): {len(rows)} rows{sampled}, {batches} global "
                f"batches of {G} per epoch, rows used: {what}"
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
        if self.source_draw == "fixed":
            rng = np.random.default_rng([self.seed, epoch, 0x5EED, 1])  # keyed apart from remaining's stream
            self._schedule = fixed_weight_schedule(self.batches_per_source, rng)
        else:
            labels = np.repeat(np.arange(len(self.sources)), self.batches_per_source)
            self._schedule = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(labels)
        # The j-th occurrence of a source in the schedule reads that source's j-th batch.
        self._batch_number = occurrence_index(self._schedule, len(self.sources))
        self._orders = {}
        self._schedule_epoch = epoch

    def _row_order(self, source_index: int) -> np.ndarray:
        """The source's rows of this epoch, shuffled, wrapped or cut to its batches' length (keep: as they are)."""
        order = self._orders.get(source_index)
        if order is None:
            rows = self._rows[source_index]
            name = self.sources[source_index].name
            order = _source_seed(self.seed, self._schedule_epoch, name).permutation(rows)
            if self.applied_last_batch != "keep":
                # np.resize repeats the order from its start as often as needed (wrap), or cuts it (drop).
                order = np.resize(order, self.batches_per_source[source_index] * self.global_batch_size)
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
        rows = self._row_order(s)[first : first + self.batch_size]  # keep: the last batch may be short
        columns = negative_columns_for_step(
            self.seed, epoch, step, source.available_negatives, source.num_negatives, self.split
        )
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
        """The position and what decides the sequence of global batches. The world size is recorded but not part
        of that sequence: a run resumes on any number of ranks that divides the same global batch."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "last_batch": self.last_batch,
            "applied_last_batch": self.applied_last_batch,
            "source_draw": self.source_draw,
            "sources": {s.name: len(r) for s, r in zip(self.sources, self._rows, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position. The data, seed, global batch and rules must be those of the saved run; the
        number of ranks may differ (each takes its slice of the same global batches)."""
        mine = self.state_dict()
        # Checkpoints written before a field existed come from samplers that applied its old behaviour.
        saved_last = state.get("last_batch", "drop")
        saved_world = int(state.get("world_size", 1))
        older = {
            "last_batch": "drop",
            "source_draw": "remaining",
            "global_batch_size": int(state.get("batch_size", 0)) * saved_world,
            "applied_last_batch": "wrap" if saved_last == "keep" and saved_world > 1 else saved_last,
        }
        settings = {"global_batch_size": "data.global_batch_size", "last_batch": "data.last_batch",
                    "source_draw": "data.source_draw", "seed": "data.seed", "sources": "data.paths"}  # fmt: skip
        for key in ("seed", "global_batch_size", "last_batch", "applied_last_batch", "source_draw", "sources"):
            saved = state.get(key, older.get(key))
            if saved == mine[key]:
                continue
            if key == "global_batch_size":
                raise ValueError(
                    f"F2LLMBatchSampler.load_state_dict: the saved run's global batch is {saved} queries "
                    f"({state.get('batch_size')} per rank x {saved_world} ranks), this run's {mine[key]} "
                    f"({self.batch_size} x {self.world_size}); set data.global_batch_size: {saved} (and leave "
                    f"data.batch_size unset) to keep it on any number of ranks that divides it: "
                    f"{', '.join(map(str, divisors(saved)))}"
                )
            if key == "applied_last_batch":
                raise ValueError(
                    f"F2LLMBatchSampler.load_state_dict: data.last_batch: keep trained short last batches on "
                    f"{saved_world} rank(s) ({saved}) but would {mine[key]} them on {self.world_size}: the sequence "
                    f"of batches differs; resume on {'1 rank' if saved == 'keep' else 'several ranks'}, or use "
                    "data.last_batch: wrap for runs that change their number of ranks"
                )
            raise ValueError(
                f"F2LLMBatchSampler.load_state_dict: saved {key}={saved!r} ({settings[key]}) differs from this "
                f"run's {mine[key]!r}; a resumed run needs the same data, seed, global batch, last_batch and "
                "source_draw: set them as the checkpoint's run had them, or start a new output_dir"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def divisors(n: int) -> list[int]:
    """The numbers of ranks a global batch of ``n`` queries divides over."""
    return [d for d in range(1, n + 1) if n % d == 0]
