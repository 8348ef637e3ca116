"""Build one source's tokenized cache: stream the rows, validate them, tokenize each distinct text once, in parallel.

The cache entry of a source (f2llm.data.readers names the files and keys them) is two Arrow IPC stream files,
both memory-mapped when read, so that the ranks of a node share their pages:

* ``<entry>.texts``: one row per distinct text the model reads (queries formatted with their instruction are texts
  like any other), column ``ids`` (list<int32>): its token ids. Each distinct text is tokenized once, however many
  rows repeat it (F2LLM's hard negatives recur across rows: v2's official preprocessing also tokenizes each
  distinct document once).
* ``<entry>.arrow``: one row per source row, int32 columns ``query``, ``passage``, ``negative_1`` .. ``negative_K``:
  the row's text indices into ``<entry>.texts`` (readable by ``datasets.Dataset.from_file``).

Memory does not grow with the source's rows: the source is read ``ROW_GROUP`` rows at a time (parquet row groups
through ``ParquetFile.iter_batches``, JSON lines through their validating reader, ``datasets`` tables by slices),
each group's new texts are tokenized and appended to ``<entry>.texts`` while the next group is read, and the
group's indices appended to ``<entry>.arrow``. What grows is the map from a text's 16-byte hash (xxh3-128) to its
index: about 135 bytes per distinct text (a Python dict of bytes -> int), e.g. 270 MB for v2's largest sources
(80,000 rows x 25 distinct documents).

Tokenization runs in ``num_proc`` worker processes (spawned, each holding the Rust tokenizer, single-threaded:
f2llm._tokenize_worker) that receive chunks of new texts and send back flat id arrays; results are written in
the order the texts were numbered. ``num_proc`` defaults to the cores this rank may use (its CPU affinity divided
by LOCAL_WORLD_SIZE, so that the ranks of a node together use every core once).
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from tqdm.auto import tqdm

from f2llm._tokenize_worker import EncoderSpec, encode_in_worker, init_worker
from f2llm.data.sources import DataError, format_query
from f2llm.data.tokenize import TextTokenizer

ROW_GROUP = 4096  # source rows read, validated and deduplicated at a time (26 texts each: ~100k texts)
CHUNK_TEXTS = 2048  # texts per tokenization task: large enough to amortize a task, small enough to balance workers
# Below this many texts (rows x (2 + K)) a source is tokenized in the calling process when num_proc is automatic:
# starting workers (about a second each on a loaded machine) would cost more than they save.
POOL_MIN_TEXTS = 50_000
_MAX_TEXTS = 2**31 - 1  # text indices are int32
IDS_SCHEMA = pa.schema([pa.field("ids", pa.list_(pa.int32()))])


def default_num_proc() -> int:
    """Tokenization processes for this rank: the cores it may run on, shared with the other ranks of its node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cores // max(1, local_ranks))


class TokenizerPool:
    """Worker processes holding one tokenizer; started on first use, reused by every source of a load."""

    def __init__(self, spec: EncoderSpec, num_proc: int) -> None:
        self.spec = spec
        self.num_proc = num_proc
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, texts: list[str]) -> Future:
        if self._executor is None:
            # spawn, not fork: the caller may be a training process with threads (torch, NCCL, the Rust
            # tokenizer's pool) whose locks a forked child would inherit held.
            self._executor = ProcessPoolExecutor(
                self.num_proc, mp_context=get_context("spawn"), initializer=init_worker, initargs=(self.spec,)
            )
        return self._executor.submit(encode_in_worker, texts)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RowGroup:
    """Rows of a source as read: the text columns (strings, nulls where missing) and each row's row in the file."""

    table: pa.Table
    file_rows: np.ndarray


@dataclass
class BuildStats:
    rows: int
    texts: int  # distinct texts, each tokenized once
    tokens: int
    seconds: float


class _Dedup:
    """Text -> index, numbering distinct texts in the order they are first met (16-byte hashes: xxh3-128)."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def add(self, texts: pa.Array) -> tuple[np.ndarray, list[int]]:
        """Indices of ``texts`` (distinct strings, no nulls), and which of them are new (positions)."""
        index = self.index
        out = np.empty(len(texts), dtype=np.int64)
        new: list[int] = []
        for i, raw in enumerate(texts.cast(pa.large_binary()).to_pylist()):
            key = xxhash.xxh3_128_digest(raw)
            at = index.get(key)
            if at is None:
                at = index[key] = len(index)
                new.append(i)
            out[i] = at
        return out, new


def _empty(texts: list[str]) -> np.ndarray:
    """Which texts are empty or whitespace (Python's ``not text.strip()``, decided by the first character for
    all others, so that long texts are not scanned)."""
    return np.fromiter((not t or (t[0].isspace() and not t.strip()) for t in texts), dtype=bool, count=len(texts))


def _first_bad(group: RowGroup, columns: Sequence[str], bad: np.ndarray, null: np.ndarray, where: str) -> DataError:
    """The error of the first bad value, column by column (as rows were always checked)."""
    flat = int(np.flatnonzero(bad | null)[0])
    n = group.table.num_rows
    column, row = columns[flat // n], int(group.file_rows[flat % n])
    problem = "missing (null)" if null[flat] else "empty text"
    return DataError(f"{where}: row {row}, field {column!r}: {problem}; fix or drop the row")


def build_cache(
    groups: Iterator[RowGroup],
    *,
    columns: Sequence[str],
    instruction: str | None,
    tokenizer: TextTokenizer,
    rows_file: Path,
    texts_file: Path,
    total_rows: int,
    where: str,
    desc: str,
    pool: TokenizerPool | None = None,
    show_progress: bool = True,
    on_group: Callable[[int], None] | None = None,
) -> BuildStats:
    """Validate and tokenize ``groups`` into ``rows_file`` and ``texts_file`` (written in place: the caller writes
    temporary names and publishes them).

    Args:
        groups: the source's row groups, in row order, holding ``columns``.
        instruction: prefixed to every query (:func:`format_query`), or None.
        tokenizer: tokenizes in this process when ``pool`` is None.
        total_rows: rows ``groups`` will yield (the progress bar's total).
        pool: worker processes tokenizing with ``tokenizer``'s rule, or None.
        on_group: called with the rows done after each group (tests, progress of a caller).

    Raises:
        DataError: a missing (null) or empty text, named by file row and field.
    """
    started = time.perf_counter()
    dedup = _Dedup()
    pending: collections.deque[Future | tuple[np.ndarray, np.ndarray]] = collections.deque()
    in_flight = 2 * pool.num_proc if pool is not None else 0
    rows_done = tokens = 0
    schema = pa.schema([pa.field(c, pa.int32()) for c in columns])
    prefix = format_query("", instruction) if instruction is not None else None
    bar = tqdm(total=total_rows, unit="rows", desc=desc, disable=not show_progress, mininterval=1.0, smoothing=0.1)

    def write_ready(block: bool) -> None:
        nonlocal tokens
        while pending and (block or len(pending) > in_flight or _done(pending[0])):
            item = pending.popleft()
            offsets, values = item.result() if isinstance(item, Future) else item
            ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))
            texts_writer.write_batch(pa.record_batch([ids], schema=IDS_SCHEMA))
            tokens += len(values)

    with (
        pa.OSFile(str(rows_file), "wb") as rows_sink,
        pa.ipc.new_stream(rows_sink, schema) as rows_writer,
        pa.OSFile(str(texts_file), "wb") as texts_sink,
        pa.ipc.new_stream(texts_sink, IDS_SCHEMA) as texts_writer,
        bar,
    ):
        try:
            for group in groups:
                n = group.table.num_rows
                if n == 0:
                    continue
                arrays = []
                for column in columns:
                    array = group.table.column(column).combine_chunks().cast(pa.large_string())
                    if column == "query" and prefix is not None:
                        array = pc.binary_join_element_wise(
                            pa.scalar(prefix, pa.large_string()), array, pa.scalar("", pa.large_string())
                        )
                    arrays.append(array)
                encoded = pc.dictionary_encode(pa.concat_arrays(arrays))  # in-group duplicates, in C++
                null = encoded.indices.is_null().to_numpy(zero_copy_only=False)
                uniques = encoded.dictionary
                unique_texts = uniques.to_pylist()
                empty = _empty(unique_texts)
                codes = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
                bad = empty[codes] if len(unique_texts) else np.zeros(len(codes), dtype=bool)
                if null.any() or bad.any():
                    raise _first_bad(group, columns, bad, null, where)
                index, new = dedup.add(uniques)
                if len(dedup) > _MAX_TEXTS:
                    raise DataError(
                        f"{where}: more than {_MAX_TEXTS} distinct texts in one source; split the file into several "
                        "sources"
                    )
                flat = index[codes].astype(np.int32).reshape(len(columns), n)
                rows_writer.write_batch(pa.record_batch(list(flat), schema=schema))
                new_texts = [unique_texts[i] for i in new]
                for start in range(0, len(new_texts), CHUNK_TEXTS):
                    chunk = new_texts[start : start + CHUNK_TEXTS]
                    if pool is None:
                        pending.append(_flat(tokenizer(chunk)))
                    else:
                        pending.append(pool.submit(chunk))
                    write_ready(block=False)
                rows_done += n
                bar.update(n)
                bar.set_postfix(texts=len(dedup), refresh=False)
                if on_group is not None:
                    on_group(rows_done)
            write_ready(block=True)
        finally:
            for item in pending:  # an error: tasks not yet started are dropped
                if isinstance(item, Future):
                    item.cancel()
    return BuildStats(rows=rows_done, texts=len(dedup), tokens=tokens, seconds=time.perf_counter() - started)


def _done(item: Future | tuple[np.ndarray, np.ndarray]) -> bool:
    return not isinstance(item, Future) or item.done()


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return offsets, values


# ------------------------------------------------------------------------------------------------ reading
class ChunkedColumn:
    """A memory-mapped Arrow column read as its chunks' numpy views (no copy), gathered by global row."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.chunks = [c for c in column.chunks if len(c)]
        self.starts = np.cumsum([0, *(len(c) for c in self.chunks)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, row within the chunk) of each global row."""
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        return chunk, rows - self.starts[chunk]


class RowIndex(ChunkedColumn):
    """The per-row text indices of ``<entry>.arrow``."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        super().__init__(column)
        self.values = [c.to_numpy(zero_copy_only=True) for c in self.chunks]

    def take(self, rows: np.ndarray) -> np.ndarray:
        chunk, local = self.locate(rows)
        return np.fromiter((self.values[c][i] for c, i in zip(chunk, local, strict=True)), np.int64, len(rows))


class TokenTable(ChunkedColumn):
    """The token ids of ``<entry>.texts``, one list per distinct text."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        super().__init__(column)
        self.offsets = [c.offsets.to_numpy(zero_copy_only=True) for c in self.chunks]
        self.values = [c.values.to_numpy(zero_copy_only=True) for c in self.chunks]

    def take(self, texts: np.ndarray) -> list[np.ndarray]:
        chunk, local = self.locate(np.asarray(texts, dtype=np.int64))
        out = []
        for c, i in zip(chunk.tolist(), local.tolist(), strict=True):
            offsets = self.offsets[c]
            out.append(self.values[c][offsets[i] : offsets[i + 1]])
        return out


def open_stream(path: Path) -> pa.Table:
    """An Arrow IPC stream file, memory-mapped (the pages are the page cache's, shared by every process)."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
