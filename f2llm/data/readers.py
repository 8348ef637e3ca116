"""Read F2LLM-format sources, validate them, tokenize once and cache the ids on disk.

A source is one parquet file (the released format), one JSON-lines file, a ``datasets`` directory written by
``save_to_disk``, or an in-memory ``datasets.Dataset``, with string columns ``query``, ``passage`` and
``negative_1`` .. ``negative_K`` (K may be 0, e.g. before hard negatives are mined). Other columns are ignored.

The v2 layout (F2LLM v2's data): a folder holding ``corpus.parquet`` (columns ``doc_id`` and ``text``, one row per
document) is a folder of query files: every other .parquet / .jsonl file in it is a source whose ``passage`` and
``negative_i`` columns hold document ids into that corpus instead of texts. The rule is the folder's: a query file
is read in the v2 layout exactly when ``corpus.parquet`` sits next to it (whether the folder or the file is listed
in the data paths). v2 names query files ``<source>_query.parquet``; the ``_query`` suffix is not part of the
source name. Ids are ints or strings, matched exactly (the int 5 is not the string "5"): a query file's id columns
must have the corpus ids' type. Ids are resolved to texts when the file is read, so every later step (validation,
tokenization, distillation) sees texts; a missing id is an error naming the query file, the row, the field and the
id, duplicate corpus ids an error naming them.

Tokenized ids are cached under ``cache_dir`` (layout: f2llm.data.prepare: each distinct text's ids once, plus
per-row text indices, both Arrow files memory-mapped when read), keyed by the tokenizer's identity (vocabulary,
rule, max_length), the query instruction and the content hash of the file (and of its corpus.parquet in the v2
layout, so an edited corpus invalidates the cache): a second run, or another rank, memory-maps the cached files
and tokenizes nothing. A source file that changes while it is being tokenized is refused (nothing is cached), so
an entry never holds other rows than its key's. The source is streamed in row groups (memory does not grow with
its rows) and tokenized by a pool of worker processes, one per core of the rank. Each entry is built under a file
lock by one process; the ranks of a job split the sources (:func:`load_sources`) and all end with every source.
Every row is validated while the cache is built, i.e. before training starts.

``max_rows`` (``data.max_rows_per_source``) caps a source at that many rows, as F2LLM v2's preprocessing does
(``df.sample(n=80000)``): a sample without replacement seeded by the seed and the source name, the same rows on every
rank, in every run and at every resume (:func:`sample_rows`). Only the sampled rows are validated and tokenized, and
the cache key holds the cap and the seed, so another cap or seed never reads a cache built for other rows. The
sample is taken before the validation split (v2: sample, then split): held-out rows are sampled rows.

1% of each source (``validation_fraction``) is held out for validation, like ``datasets.train_test_split(
train_size=0.99)``: ``ceil(fraction * n)`` rows, so every source with at least 2 rows (and fraction > 0) keeps at
least one validation row. The split is a seeded permutation of the rows, identical on every rank and every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import filelock
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

from f2llm.data.prepare import (
    POOL_MIN_TEXTS,
    ROW_GROUP,
    RowGroup,
    RowIndex,
    TokenizerPool,
    TokenTable,
    build_cache,
    default_num_proc,
    open_stream,
)
from f2llm.data.sources import (
    INSTRUCT_PREFIX,
    KINDS,
    SOURCE_KINDS,
    DataError,
    SourceKind,
    SourceOverride,
    SourceSpec,
    format_query,
    resolve_source,
    unknown_source_message,
)
from f2llm.data.tokenize import TextTokenizer

# Bump when the cached layout or the validation rules change: old caches are then rebuilt, never misread.
CACHE_FORMAT_VERSION = "f2llm-tokenized-v2"  # v2: distinct texts once (<entry>.texts) + per-row indices
_NEGATIVE = re.compile(r"^negative_(\d+)$")
_TEXT_TYPES = (pa.string(), pa.large_string())
SUPPORTED_SUFFIXES = (".parquet", ".jsonl")
# The v2 layout: this file in a folder makes the folder's other files query files referencing it by document id.
CORPUS_FILE = "corpus.parquet"
CORPUS_ID, CORPUS_TEXT = "doc_id", "text"  # F2LLM v2's corpus columns (its run.py indexes corpus['doc_id'])
QUERY_SUFFIX = "_query"  # v2's query files: <source>_query.parquet


def negative_count(column_names: Sequence[str], where: str) -> int:
    """K, the number of ``negative_i`` columns; they must be exactly ``negative_1`` .. ``negative_K``."""
    numbers = sorted(int(m.group(1)) for c in column_names if (m := _NEGATIVE.match(c)))
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
        raise DataError(
            f"{where}: negative columns must be negative_1 .. negative_K without gaps; found "
            f"{[f'negative_{i}' for i in numbers]}, missing {[f'negative_{i}' for i in missing]}"
        )
    return len(numbers)


def text_columns(num_negatives: int) -> list[str]:
    return ["query", "passage", *(f"negative_{i}" for i in range(1, num_negatives + 1))]


def _check_columns(column_names: Sequence[str], where: str) -> int:
    for required in ("query", "passage"):
        if required not in column_names:
            raise DataError(
                f"{where}: missing column {required!r} (columns: {list(column_names)}); an F2LLM source needs "
                "`query`, `passage` and optionally `negative_1` .. `negative_K`"
            )
    return negative_count(column_names, where)


def content_digest(source: str | Path | datasets.Dataset) -> str:
    """SHA-256 of a file, of every file of a ``save_to_disk`` directory, or a Dataset's fingerprint."""
    if isinstance(source, datasets.Dataset):
        return f"fingerprint:{source._fingerprint}"
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _jsonl_rows(path: str, ids: bool = False) -> Iterator[dict]:
    """Rows of a JSON-lines file with line-precise errors (datasets' JSON loader reports neither line nor field).

    ``ids``: the v2 layout, where ``passage`` and ``negative_i`` hold document ids (int or string) instead of texts.
    """
    columns: list[str] | None = None
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {line_no}: not UTF-8 ({e.reason} at byte {e.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            fields = [c for c in row if c in ("query", "passage") or _NEGATIVE.match(c)]
            if columns is None:
                columns = fields
                _check_columns(list(row), f"{path}: line {line_no}")
            elif extra := sorted(set(fields) - set(columns)):
                raise DataError(
                    f"{path}: line {line_no}: field(s) {extra} are not in the first row's fields {columns}; every "
                    "row needs the same negative_i fields"
                )
            for column in columns:
                value = row.get(column)
                if ids and column != "query":
                    if isinstance(value, bool) or not isinstance(value, int | str | None):
                        raise DataError(
                            f"{path}: line {line_no}, field {column!r}: expected a document id (int or string) of "
                            f"{CORPUS_FILE}, got {type(value).__name__} {value!r:.80}"
                        )
                elif value is not None and not isinstance(value, str):
                    raise DataError(
                        f"{path}: line {line_no}, field {column!r}: expected a string, got "
                        f"{type(value).__name__} {value!r:.80}"
                    )
            yield {column: row.get(column) for column in columns}


# ------------------------------------------------------------------------------------------------ the v2 layout
def corpus_of(path: Path) -> Path | None:
    """The corpus.parquet a query file references (the v2 layout: one next to it), or None."""
    if path.name == CORPUS_FILE or path.suffix not in SUPPORTED_SUFFIXES:
        return None
    corpus = path.parent / CORPUS_FILE
    return corpus if corpus.is_file() else None


def source_name(path: Path) -> str:
    """A source file's name: its stem; in the v2 layout without v2's ``_query`` suffix."""
    stem = path.stem
    if corpus_of(path) is not None and stem.endswith(QUERY_SUFFIX) and len(stem) > len(QUERY_SUFFIX):
        return stem[: -len(QUERY_SUFFIX)]
    return stem


@dataclass(frozen=True)
class Corpus:
    """A v2 corpus.parquet: document ids (int64 or string, distinct) and their texts, row-aligned; its digest keys
    the tokenized caches of the query files that reference it."""

    path: Path
    ids: pa.Array
    texts: pa.Array
    digest: str


_CORPORA: dict[tuple[str, int, int], Corpus] = {}


def _id_kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    return None


def _normalize_ids(array: pa.Array) -> pa.Array:
    """Ints as int64, strings as large_string: one type per kind, so that lookups compare like with like."""
    return array.cast(pa.int64() if pa.types.is_integer(array.type) else pa.large_string())


def load_corpus(path: str | Path) -> Corpus:
    """Read and check a corpus.parquet (memoized per file version: every query file of a folder shares it).

    Raises:
        DataError: missing ``doc_id`` / ``text`` column, ids neither ints nor strings, a null id, duplicate ids
            (named), a null or empty text (row and id named).
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _CORPORA:
        return _CORPORA[key]
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); rewrite it") from None
    for column in (CORPUS_ID, CORPUS_TEXT):
        if column not in table.column_names:
            raise DataError(
                f"{path}: missing column {column!r} (columns: {table.column_names}); a v2 corpus needs "
                f"`{CORPUS_ID}` (document ids, int or string) and `{CORPUS_TEXT}`"
            )
    ids = table.column(CORPUS_ID).combine_chunks()
    texts = table.column(CORPUS_TEXT).combine_chunks()
    if _id_kind(ids.type) is None:
        raise DataError(f"{path}: column {CORPUS_ID!r} has type {ids.type}; document ids must be ints or strings")
    if texts.type not in _TEXT_TYPES:
        raise DataError(f"{path}: column {CORPUS_TEXT!r} has type {texts.type}, expected string (one text per row)")
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: row {row}: {CORPUS_ID} is null; every document needs an id")
    ids = _normalize_ids(ids)
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        shown = repeated.to_pylist()[:10]
        raise DataError(
            f"{path}: {len(repeated)} duplicate {CORPUS_ID}(s), e.g. {shown}; every document id must be distinct "
            "(a query file's id would be ambiguous)"
        )
    bad = pc.or_(pc.is_null(texts), pc.equal(pc.utf8_trim_whitespace(texts.fill_null("")), ""))
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{path}: row {row} ({CORPUS_ID} {ids[row].as_py()!r}): {CORPUS_TEXT} is missing or empty; fix or drop it"
        )
    corpus = Corpus(path=path, ids=ids, texts=texts, digest=content_digest(path))
    _CORPORA.clear()  # one corpus at a time is what a data folder needs; old versions are released
    _CORPORA[key] = corpus
    return corpus


def _v2_query_index(path: Path, corpus: Corpus) -> pa.Table:
    """A query file of the v2 layout, checked: ``query`` (texts) and, for ``passage`` / ``negative_i``, the corpus
    row (int64) of each document id. Ids take 8 bytes a field whatever the documents' lengths: the texts are
    resolved a row group at a time (:func:`_resolve_v2`)."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e}); rewrite it") from None
    else:
        rows = list(_jsonl_rows(str(path), ids=True))
        if not rows:
            raise DataError(f"{path}: no rows")
        columns: dict[str, pa.Array] = {}
        for column in rows[0]:
            values = [r[column] for r in rows]
            try:
                columns[column] = pa.array(values, type=pa.string() if column == "query" else None)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise DataError(
                    f"{path}: field {column!r} mixes int and string document ids; use one type, that of "
                    f"{corpus.path}'s {CORPUS_ID}"
                ) from None
        table = pa.table(columns)
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    k = _check_columns(table.column_names, str(path))
    corpus_kind = _id_kind(corpus.ids.type)
    resolved = {"query": table.column("query")}
    for column in text_columns(k)[1:]:
        ids = table.column(column).combine_chunks()
        if ids.type == pa.null():  # every id missing: reported below, row by row
            ids = ids.cast(corpus.ids.type)
        kind = _id_kind(ids.type)
        if kind != corpus_kind:
            raise DataError(
                f"{path}: column {column!r} holds {ids.type} values but {corpus.path}'s {CORPUS_ID} are "
                f"{corpus_kind}s; in the v2 layout passage and negative_i are document ids of the corpus's type "
                '(ids match exactly: the int 5 is not the string "5")'
            )
        ids = _normalize_ids(ids)
        if ids.null_count:
            row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row}, field {column!r}: missing (null) document id; fix or drop the row")
        index = pc.index_in(ids, value_set=corpus.ids)
        if index.null_count:
            missing = np.flatnonzero(index.is_null().to_numpy(zero_copy_only=False))
            row = int(missing[0])
            raise DataError(
                f"{path}: row {row}, field {column!r}: document id {ids[row].as_py()!r} is not in {corpus.path} "
                f"({len(missing)} row(s) of this field reference missing ids); add the documents or fix the ids"
            )
        resolved[column] = index.cast(pa.int64())
    return pa.table(resolved)


def _resolve_v2(index: pa.Table, corpus: Corpus) -> pa.Table:
    """Rows of :func:`_v2_query_index` with their documents' texts in place of the corpus rows."""
    return pa.table(
        {c: index.column(c) if c == "query" else corpus.texts.take(index.column(c)) for c in index.column_names}
    )


def _read_v2_query_file(path: Path, corpus: Corpus) -> datasets.Dataset:
    """A query file of the v2 layout with its ``passage`` / ``negative_i`` ids replaced by the corpus texts."""
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(_resolve_v2(_v2_query_index(path, corpus), corpus)))


def read_raw(source: str | Path | datasets.Dataset, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The untokenized rows of a source as a ``datasets.Dataset``, its columns checked (texts: in the v2 layout the
    document ids are resolved through the folder's corpus.parquet)."""
    if isinstance(source, datasets.Dataset):
        ds, where = source, "dataset"
    else:
        path = Path(source)
        where = str(path)
        raw_cache = str(Path(cache_dir) / "raw") if cache_dir is not None else None
        corpus_path = corpus_of(path)
        if corpus_path is not None and path.exists():
            ds = _read_v2_query_file(path, load_corpus(corpus_path))
        elif path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if not isinstance(loaded, datasets.Dataset):
                raise DataError(f"{path}: holds a {type(loaded).__name__}; save one split (a Dataset) per source")
            ds = loaded
        elif path.suffix == ".parquet":
            try:
                rows = pq.read_metadata(path).num_rows
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: not a readable parquet file ({e}); rewrite it") from None
            if rows == 0:
                raise DataError(f"{path}: no rows")
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=raw_cache)
        elif path.suffix == ".jsonl":
            first = next(_jsonl_rows(str(path)), None)
            if first is None:
                raise DataError(f"{path}: no rows")
            features = datasets.Features({c: datasets.Value("string") for c in first})
            try:
                ds = datasets.Dataset.from_generator(
                    _jsonl_rows,
                    gen_kwargs={"path": str(path)},
                    features=features,
                    cache_dir=raw_cache,
                    fingerprint=f"{path.stem}-{content_digest(path)[:32]}",
                )
            except DatasetGenerationError as e:
                # datasets wraps the generator's exception; ours names the line and the field.
                if isinstance(e.__cause__, DataError):
                    raise e.__cause__ from None
                raise
        elif not path.exists():
            raise DataError(f"{path}: no such file or directory")
        else:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUPPORTED_SUFFIXES)} or a "
                "datasets directory (save_to_disk)"
            )
    k = _check_columns(ds.column_names, where)
    for column in text_columns(k):
        dtype = ds.data.schema.field(column).type
        if dtype not in _TEXT_TYPES and dtype != pa.null():
            raise DataError(f"{where}: column {column!r} has type {dtype}, expected string (one text per row)")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    return ds


def _queries_carry_instruction(ds: datasets.Dataset, where: str) -> bool:
    """True when every query starts with ``Instruct:``, False when none does; a mix is an error."""
    if getattr(ds, "_indices", None) is None:
        column = ds.data.column("query")
    else:  # a selection of rows (max_rows): ds.data is every row of the file, read the selected queries only
        column = ds.with_format("arrow", columns=["query"])[:].column("query")
    if column.type == pa.null():  # no query at all: row validation reports it
        return False
    starts = pc.starts_with(column, INSTRUCT_PREFIX)
    count = int(pc.sum(starts).as_py() or 0)
    if 0 < count < len(ds):
        plain = int(np.flatnonzero(~starts.to_numpy(zero_copy_only=False).astype(bool))[0])
        raise DataError(
            f"{where}: {count} of {len(ds)} queries start with {INSTRUCT_PREFIX!r} and the others do not (e.g. row "
            f"{plain}); give every query its instruction or none"
        )
    return count == len(ds)


def sample_rows(n: int, max_rows: int | None, seed: int, name: str) -> np.ndarray | None:
    """The rows of a source of ``n`` rows that ``max_rows`` keeps, sorted: ``max_rows`` of them without
    replacement, seeded by (seed, source name) and nothing else (the same on every rank and at every resume); None
    when every row is kept (no cap, or a source of at most ``max_rows`` rows)."""
    if max_rows is None or n <= max_rows:
        return None
    # The third seed word keys the sample apart from the holdout's stream, which uses (seed, name) alone.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0x5A4D])
    return np.sort(rng.choice(n, size=max_rows, replace=False))


def _holdout(n: int, fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), both sorted; seeded by (seed, source name)."""
    n_val = math.ceil(fraction * n - 1e-9) if n >= 2 and fraction > 0 else 0
    perm = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ------------------------------------------------------------------------------------------------ streaming reads
@dataclass
class _Reader:
    """A source read for tokenizing: its rows counted and columns checked up front, then read in row groups.

    ``batches(columns)`` yields ``(first file row, table)`` for consecutive rows of the file, ``ROW_GROUP`` at a
    time; memory holds one group (and, in the v2 layout, the corpus and the query file's ids)."""

    where: str
    total_rows: int
    column_names: list[str]
    batches: Callable[[Sequence[str]], Iterator[tuple[int, pa.Table]]]


def _check_text_types(schema: pa.Schema, columns: Sequence[str], where: str) -> None:
    for column in columns:
        dtype = schema.field(column).type
        if dtype not in _TEXT_TYPES and dtype != pa.null():
            raise DataError(f"{where}: column {column!r} has type {dtype}, expected string (one text per row)")


def _dataset_reader(ds: datasets.Dataset, where: str) -> _Reader:
    k = _check_columns(ds.column_names, where)
    _check_text_types(ds.data.schema, text_columns(k), where)
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")

    def batches(columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        view = ds.with_format("arrow", columns=list(columns))
        for start in range(0, len(ds), ROW_GROUP):
            yield start, view[start : start + ROW_GROUP]

    return _Reader(where, len(ds), list(ds.column_names), batches)


def _parquet_reader(path: Path) -> _Reader:
    def unreadable(e: Exception) -> DataError:
        return DataError(f"{path}: not a readable parquet file ({e}); rewrite it")

    try:
        # Column chunks read a buffer at a time: pre-buffering (the default) holds a whole row group in memory,
        # and a row group can be the whole file (measured: 680 MB for a 690 MB single-group file).
        file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise unreadable(e) from None
    if file.metadata.num_rows == 0:
        raise DataError(f"{path}: no rows")
    schema = file.schema_arrow
    k = _check_columns(schema.names, str(path))
    _check_text_types(schema, text_columns(k), str(path))

    def batches(columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        start = 0
        try:
            reading = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
            for batch in reading.iter_batches(ROW_GROUP, columns=list(columns)):
                yield start, pa.Table.from_batches([batch])
                start += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise unreadable(e) from None

    return _Reader(str(path), file.metadata.num_rows, schema.names, batches)


def _jsonl_reader(path: Path) -> _Reader:
    # One validating pass counts the rows (max_rows samples by row number) and finds the fields; the rows are
    # parsed again, a group at a time, when tokenized.
    first, count = None, 0
    for row in _jsonl_rows(str(path)):
        first = first or row
        count += 1
    if first is None:
        raise DataError(f"{path}: no rows")

    def batches(columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        rows: list[dict] = []
        start = 0
        for row in _jsonl_rows(str(path)):
            rows.append(row)
            if len(rows) == ROW_GROUP:
                yield start, pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
                start, rows = start + len(rows), []
        if rows:
            yield start, pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})

    return _Reader(str(path), count, list(first), batches)


def _v2_reader(path: Path, corpus: Corpus) -> _Reader:
    index = _v2_query_index(path, corpus)

    def batches(columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        for start in range(0, index.num_rows, ROW_GROUP):
            yield start, _resolve_v2(index.slice(start, ROW_GROUP).select(list(columns)), corpus)

    return _Reader(str(path), index.num_rows, index.column_names, batches)


def _open_reader(source: str | Path | datasets.Dataset, where: str) -> _Reader:
    if isinstance(source, datasets.Dataset):
        return _dataset_reader(source, where)
    path = Path(source)
    corpus_path = corpus_of(path)
    if corpus_path is not None:
        return _v2_reader(path, load_corpus(corpus_path))
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.Dataset):
            raise DataError(f"{path}: holds a {type(loaded).__name__}; save one split (a Dataset) per source")
        return _dataset_reader(loaded, where)
    if path.suffix == ".parquet":
        return _parquet_reader(path)
    if path.suffix == ".jsonl":
        return _jsonl_reader(path)
    raise DataError(
        f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUPPORTED_SUFFIXES)} or a datasets "
        "directory (save_to_disk)"
    )


def _row_groups(reader: _Reader, columns: Sequence[str], file_rows: np.ndarray | None) -> Iterator[RowGroup]:
    """The reader's groups, only the sampled rows when ``file_rows`` (sorted) is set."""
    for start, table in reader.batches(columns):
        rows = np.arange(start, start + table.num_rows)
        if file_rows is not None:
            lo, hi = np.searchsorted(file_rows, [start, start + table.num_rows])
            rows = file_rows[lo:hi]
            table = table.take(pa.array(rows - start))
        yield RowGroup(table, rows)


def _carries_instruction(reader: _Reader, file_rows: np.ndarray | None) -> bool:
    """:func:`_queries_carry_instruction` of the kept rows, streamed through the query column."""
    count = total = 0
    plain: int | None = None
    for group in _row_groups(reader, ["query"], file_rows):
        column = group.table.column("query")
        total += group.table.num_rows
        if column.type == pa.null():  # no query at all in this group: row validation reports it
            plain = int(group.file_rows[0]) if plain is None and len(group.file_rows) else plain
            continue
        starts = pc.starts_with(column, INSTRUCT_PREFIX).fill_null(False).to_numpy(zero_copy_only=False)
        count += int(starts.sum())
        if plain is None and not starts.all():
            plain = int(group.file_rows[int(np.flatnonzero(~starts)[0])])
    if 0 < count < total:
        raise DataError(
            f"{reader.where}: {count} of {total} queries start with {INSTRUCT_PREFIX!r} and the others do not (e.g. "
            f"row {plain}); give every query its instruction or none"
        )
    return count == total and total > 0


# ------------------------------------------------------------------------------------------------ the cache entry
@dataclass
class TokenizedSource:
    """One source's token ids (memory-mapped Arrow), its settings and its train / validation rows.

    Attributes:
        name: source name (file stem).
        kind: retrieval / classification / clustering.
        num_negatives: negatives sampled per query and batch.
        available_negatives: K, the ``negative_i`` columns of the file.
        instruction: the instruction prefixed to queries while tokenizing (None: queries used as they are).
        rows_table: per row, the text index of ``query``, ``passage``, ``negative_1`` .. ``negative_K`` (int32).
        texts: the token ids of the source's distinct texts (:class:`f2llm.data.prepare.TokenTable`).
        train_rows / validation_rows: row indices of the two splits.
        cache_file: the Arrow file holding ``rows_table`` (the texts' ids: the same name with suffix ``.texts``).
        cache_hit: True when this load found the cache and tokenized nothing.
        source: what was read (a file or directory path, or the ``datasets.Dataset``): its texts, for
            :func:`model_texts`.
        total_rows: rows of the source before ``max_rows`` sampled it (``len(self)`` when it kept every row).
        file_rows: the source's row of each dataset row when ``max_rows`` sampled it (sorted), else None (dataset
            row i is the source's row i). Whatever re-reads the source's texts by row (e.g. a teacher) maps rows
            through it.
    """

    name: str
    kind: SourceKind
    num_negatives: int
    available_negatives: int
    instruction: str | None
    rows_table: pa.Table
    texts: TokenTable
    train_rows: np.ndarray
    validation_rows: np.ndarray
    cache_file: Path
    cache_hit: bool
    source: str | Path | datasets.Dataset | None = None
    total_rows: int | None = None
    file_rows: np.ndarray | None = None
    _columns: dict[str, RowIndex] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.rows_table.num_rows

    def _text_index(self, column: str, rows: np.ndarray) -> np.ndarray:
        index = self._columns.get(column)
        if index is None:
            index = self._columns[column] = RowIndex(self.rows_table.column(column))
        return index.take(rows)

    def take(
        self, rows: Sequence[int] | np.ndarray, negative_columns: Sequence[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Token ids of ``rows``: (queries, passages, negatives row-major: row i's negatives at [i*k, (i+1)*k)).

        ``negative_columns`` are 0-based indices into negative_1 .. negative_K. The arrays are the caller's
        (copies, int32), not views of the memory-mapped cache.
        """
        rows = np.asarray(rows, dtype=np.int64)
        k = len(negative_columns)
        fields = [self._text_index(c, rows) for c in ("query", "passage")]
        fields += [self._text_index(f"negative_{j + 1}", rows) for j in negative_columns]
        # Negatives row-major: [n, k] -> row i's k negatives side by side.
        negatives = np.stack(fields[2:], axis=1).reshape(-1) if k else np.empty(0, dtype=np.int64)
        order = np.concatenate([fields[0], fields[1], negatives])
        views = self.texts.take(order)
        if not views:
            return [], [], []
        lengths = np.fromiter((len(v) for v in views), dtype=np.int64, count=len(views))
        ids = np.split(np.concatenate(views), np.cumsum(lengths)[:-1])
        n = len(rows)
        return ids[:n], ids[n : 2 * n], ids[2 * n :]

    @property
    def dataset(self) -> datasets.Dataset:
        """Every row's ids as the columns ``query_ids``, ``passage_ids``, ``negative_{i}_ids`` (int32 lists),
        materialized in memory: for inspecting a source; training reads rows through :meth:`take`."""
        columns = text_columns(self.available_negatives)
        rows = np.arange(len(self))
        data = {f"{c}_ids": [ids.tolist() for ids in self.texts.take(self._text_index(c, rows))] for c in columns}
        features = datasets.Features({f"{c}_ids": datasets.List(datasets.Value("int32")) for c in columns})
        return datasets.Dataset.from_dict(data, features=features)


@dataclass
class _Entry:
    """A source resolved, keyed and named in the cache, before anything is read or tokenized."""

    source: str | Path | datasets.Dataset
    name: str
    where: str
    spec: SourceSpec
    key: str
    cache_file: Path
    max_rows: int | None
    seed: int
    state: tuple | None  # the source file(s)' (path, size, mtime) when keyed: a change while building is refused

    @property
    def texts_file(self) -> Path:
        return self.cache_file.with_suffix(".texts")

    @property
    def meta_file(self) -> Path:
        return self.cache_file.with_suffix(".json")

    @property
    def lock_file(self) -> str:
        return str(self.cache_file) + ".lock"

    def complete(self) -> bool:
        # The metadata is published last: with it, both Arrow files are whole.
        return self.meta_file.exists() and self.cache_file.exists() and self.texts_file.exists()


def _file_state(source: str | Path | datasets.Dataset, corpus: Path | None) -> tuple | None:
    if isinstance(source, datasets.Dataset):
        return None
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files += [corpus] if corpus is not None else []
    return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


def _plan(
    source: str | Path | datasets.Dataset,
    tokenizer: TextTokenizer,
    cache_dir: Path,
    *,
    name: str | None,
    override: SourceOverride | None,
    seed: int,
    num_negatives: Mapping[str, int] | None,
    max_rows: int | None,
) -> _Entry:
    if isinstance(source, datasets.Dataset):
        if name is None:
            raise DataError("load_source: a datasets.Dataset needs an explicit name=")
        where = f"dataset {name!r}"
    else:
        path = Path(source)
        name = name or source_name(path)
        where = str(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows <= 0):
        raise DataError(f"{where}: max_rows (data.max_rows_per_source) must be an int > 0 or None, got {max_rows!r}")
    spec = resolve_source(name, override, where, num_negatives)
    corpus = corpus_of(Path(source)) if not isinstance(source, datasets.Dataset) else None
    state = _file_state(source, corpus)  # before the digest: an edit after this point is seen when the build ends
    key_parts = {
        "format": CACHE_FORMAT_VERSION,
        "tokenizer": tokenizer.identity(),
        "content": content_digest(source),
        "instruction": spec.instruction,
        "add_instruction": spec.add_instruction,
    }
    if corpus is not None:  # the texts live in the corpus: a changed corpus is changed data
        key_parts["corpus"] = load_corpus(corpus).digest
    if max_rows is not None:  # the cache holds the sampled rows: another cap or seed samples other rows
        key_parts["sample"] = {"max_rows": max_rows, "seed": seed}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    cache_file = cache_dir / f"{name}-{key[:20]}.arrow"
    return _Entry(source, name, where, spec, key, cache_file, max_rows, seed, state)


class _Pools:
    """The tokenization pool of one load, started when a source first needs it and closed at the end."""

    def __init__(self, tokenizer: TextTokenizer, num_proc: int | None) -> None:
        self.tokenizer = tokenizer
        self.num_proc = num_proc
        self.pool: TokenizerPool | None = None

    def for_texts(self, texts: int) -> TokenizerPool | None:
        """The pool for a source of about ``texts`` texts, or None to tokenize in this process."""
        spec = self.tokenizer.worker_spec()
        procs = self.num_proc if self.num_proc is not None else default_num_proc()
        if spec is None or procs <= 1 or (self.num_proc is None and texts < POOL_MIN_TEXTS):
            return None
        if self.pool is None:
            self.pool = TokenizerPool(spec, procs)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _build(entry: _Entry, tokenizer: TextTokenizer, pools: _Pools, show_progress: bool | None) -> None:
    """Read, validate, sample and tokenize ``entry``'s source into its cache files (temporary names, published
    with the metadata last). The caller holds the entry's lock."""
    reader = _open_reader(entry.source, entry.where)
    file_rows = sample_rows(reader.total_rows, entry.max_rows, entry.seed, entry.name)
    k = negative_count(reader.column_names, entry.where)
    spec = entry.spec
    if spec.add_instruction is not None:
        instruction = spec.instruction if spec.add_instruction else None
    else:
        carries = _carries_instruction(reader, file_rows)
        instruction = spec.instruction if spec.instruction and tokenizer.append_eos and not carries else None
    columns = text_columns(k)
    rows = reader.total_rows if file_rows is None else len(file_rows)
    suffix = f".tmp{os.getpid()}"
    tmp_rows, tmp_texts = (Path(str(f) + suffix) for f in (entry.cache_file, entry.texts_file))
    if show_progress is None:
        show_progress = not datasets.utils.are_progress_bars_disabled()
    try:
        stats = build_cache(
            _row_groups(reader, columns, file_rows),
            columns=columns,
            instruction=instruction,
            tokenizer=tokenizer,
            rows_file=tmp_rows,
            texts_file=tmp_texts,
            total_rows=rows,
            where=entry.where,
            desc=f"tokenizing {entry.name}",
            pool=pools.for_texts(rows * len(columns)),
            show_progress=show_progress,
        )
        corpus = corpus_of(Path(entry.source)) if not isinstance(entry.source, datasets.Dataset) else None
        if _file_state(entry.source, corpus) != entry.state:
            raise DataError(
                f"{entry.where}: the source changed while it was being tokenized; nothing was cached, run again "
                "once it is written"
            )
        os.replace(tmp_texts, entry.texts_file)
        os.replace(tmp_rows, entry.cache_file)
    finally:
        for tmp in (tmp_rows, tmp_texts):
            tmp.unlink(missing_ok=True)
    meta = {
        "name": entry.name,
        "source": entry.where,
        "rows": stats.rows,
        "total_rows": reader.total_rows,
        "negatives": k,
        "instruction": instruction,
        "texts": stats.texts,
        "tokens": stats.tokens,
        "seconds": round(stats.seconds, 3),
    }
    tmp = entry.meta_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, entry.meta_file)


def _open(entry: _Entry, validation_fraction: float, cache_hit: bool) -> TokenizedSource:
    meta = json.loads(entry.meta_file.read_text())
    rows_table = open_stream(entry.cache_file)
    total_rows = int(meta["total_rows"])
    k = int(meta["negatives"])
    spec = entry.spec
    if spec.num_negatives > k:
        have = f"{k} negative column(s) (negative_1 .. negative_{k})" if k else "no negative columns"
        raise DataError(
            f"{entry.where}: source {entry.name!r} has {have} but num_negatives={spec.num_negatives} are asked per "
            "query; lower num_negatives for this source (SourceOverride(num_negatives=...); 0 = in-batch negatives "
            "only) or mine hard negatives first"
        )
    train_rows, validation_rows = _holdout(rows_table.num_rows, validation_fraction, entry.seed, entry.name)
    return TokenizedSource(
        name=entry.name,
        kind=spec.kind,
        num_negatives=spec.num_negatives,
        available_negatives=k,
        instruction=meta["instruction"],
        rows_table=rows_table,
        texts=TokenTable(open_stream(entry.texts_file).column("ids")),
        train_rows=train_rows,
        validation_rows=validation_rows,
        cache_file=entry.cache_file,
        cache_hit=cache_hit,
        source=entry.source,
        total_rows=total_rows,
        file_rows=sample_rows(total_rows, entry.max_rows, entry.seed, entry.name),
    )


def _ensure(
    entry: _Entry, tokenizer: TextTokenizer, pools: _Pools, show_progress: bool | None, wait: bool = True
) -> bool | None:
    """Build ``entry`` unless complete, under its file lock. Returns True when this call built it, False when it
    was complete, None when another process holds the lock and ``wait`` is False."""
    if entry.complete():
        return False
    lock = filelock.FileLock(entry.lock_file)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        return None
    try:
        if entry.complete():  # built by the process that held the lock
            return False
        _build(entry, tokenizer, pools, show_progress)
        return True
    finally:
        lock.release()


def load_source(
    source: str | Path | datasets.Dataset,
    tokenizer: TextTokenizer,
    cache_dir: str | Path,
    *,
    name: str | None = None,
    override: SourceOverride | None = None,
    seed: int = 0,
    validation_fraction: float = 0.01,
    num_negatives: Mapping[str, int] | None = None,
    max_rows: int | None = None,
    num_proc: int | None = None,
    show_progress: bool | None = None,
) -> TokenizedSource:
    """Validate, tokenize (once: cached), sample (``max_rows``) and split one source.

    Args:
        source: a .parquet / .jsonl file, a ``save_to_disk`` directory, or a ``datasets.Dataset``.
        tokenizer: the encoder's :class:`TextTokenizer` (its identity keys the cache).
        cache_dir: where tokenized Arrow files are kept (shared by runs and ranks).
        name: source name; default the file stem (required for a Dataset).
        override: settings replacing the source tables (kind, instruction, num_negatives).
        seed: seed of the row sample (``max_rows``) and of the validation split.
        validation_fraction: share of rows held out (ceil; 0 disables), of the sampled rows.
        num_negatives: negatives per query by source kind (f2llm.data.sources.check_num_negatives); the
            override's num_negatives wins.
        max_rows: keep at most this many rows, a seeded sample (:func:`sample_rows`; data.max_rows_per_source),
            taken before the validation split; only they are validated and tokenized. None: every row.
        num_proc: tokenizing processes when the cache is built; None: this rank's cores
            (f2llm.data.prepare.default_num_proc) for sources of at least POOL_MIN_TEXTS texts, else this process.
        show_progress: a progress bar (rows/s, ETA) while building; None: unless datasets' bars are disabled.

    Raises:
        DataError: unknown source, bad columns, a bad row (missing / empty / non-string field), fewer negative
            columns than ``num_negatives`` asks, or a source file that changed while it was tokenized.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = _plan(
        source, tokenizer, cache_dir, name=name, override=override, seed=seed, num_negatives=num_negatives,
        max_rows=max_rows,
    )  # fmt: skip
    pools = _Pools(tokenizer, num_proc)
    try:
        built = _ensure(entry, tokenizer, pools, show_progress)
    finally:
        pools.close()
    return _open(entry, validation_fraction, cache_hit=not built)


def query_instruction(spec: SourceSpec, raw: datasets.Dataset, decoder: bool, where: str) -> str | None:
    """The instruction prefixed to a source's queries, or None: ``spec.add_instruction`` when set, else (auto) the
    source's instruction for a decoder (the recipe's last-token models; encoders are trained and evaluated
    without) when no query carries one already."""
    if spec.add_instruction is not None:
        return spec.instruction if spec.add_instruction else None
    carries = _queries_carry_instruction(raw, where)
    return spec.instruction if spec.instruction and decoder and not carries else None


def model_texts(
    raw: datasets.Dataset, instruction: str | None, batch_rows: int = 10_000
) -> Iterator[tuple[str, int, list[str]]]:
    """The texts a model reads for a source's rows, as training tokenizes them: ``(column, first row, texts)`` for
    consecutive row ranges of every text column (queries formatted with ``instruction`` when it is set)."""
    columns = text_columns(negative_count(raw.column_names, "dataset"))
    view = raw.with_format("arrow", columns=columns)
    for start in range(0, len(raw), batch_rows):
        table = view[start : start + batch_rows]
        for column in columns:
            texts = table.column(column).to_pylist()
            if column == "query" and instruction is not None:
                texts = [format_query(q, instruction) for q in texts]
            yield column, start, texts


def find_source_files(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Source files: each directory given contributes its files (sorted; .parquet / .jsonl), each file itself.

    A ``datasets`` directory (written by ``save_to_disk``) is one source, not a folder of sources. In a v2-layout
    folder the corpus.parquet is no source: the other files are (its query files).
    """
    paths: list[Path] = []
    for item in [data] if isinstance(data, (str, Path)) else data:
        path = Path(item)
        if path.is_dir() and not (path / "dataset_info.json").exists():
            files = sorted(p for p in path.iterdir() if p.suffix in SUPPORTED_SUFFIXES and p.name != CORPUS_FILE)
            if not files:
                raise DataError(f"{path}: no source files ({', '.join(SUPPORTED_SUFFIXES)}) in this directory")
            paths.extend(files)
        elif path.name == CORPUS_FILE:
            raise DataError(
                f"{path}: a v2 corpus is not a source; list its folder (or its query files) in the data paths"
            )
        else:
            paths.append(path)
    names = [source_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"two sources share the name(s) {duplicates} (the source name is the file stem, without the v2 layout's "
            f"{QUERY_SUFFIX!r} suffix)"
        )
    return paths


def load_sources(
    data: str | Path | Sequence[str | Path],
    tokenizer: TextTokenizer,
    cache_dir: str | Path,
    *,
    overrides: Mapping[str, SourceOverride] | None = None,
    seed: int = 0,
    validation_fraction: float = 0.01,
    num_negatives: Mapping[str, int] | None = None,
    max_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_proc: int | None = None,
    show_progress: bool | None = None,
) -> list[TokenizedSource]:
    """:func:`load_source` for every source file of a directory (or list of paths), in name order.

    Every source's settings are resolved before any is read or tokenized: an unknown source (its kind neither in
    the tables nor in ``overrides``) is refused at once, all of them named with their files.

    The ``world_size`` processes of a job (``rank`` each) share the building: rank r visits the sources from
    position ``r * n // world_size`` on (wrapping around) and builds each one no process has built or locked yet;
    a source locked by another process is waited for once the rank's own pass is done. Every process then returns
    every source (memory-mapped from the shared cache_dir), with no collective call: processes that do not share
    a cache_dir (nodes without a shared file system) each build what they lack.

    Args:
        rank / world_size: this process's place in the job (the trainer's runtime.rank / runtime.world_size).
        num_proc: tokenizing processes of this process (see :func:`load_source`).
        show_progress: a progress bar per source this process builds; None: unless datasets' bars are disabled.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"load_sources: rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    overrides = overrides or {}
    files = find_source_files(data)
    names = [source_name(p) for p in files]
    unused = sorted(set(overrides) - set(names))
    if unused:
        raise DataError(f"source settings given for {unused}, which are not among the sources {names}")
    unknown = [
        (path, name)
        for path, name in zip(files, names, strict=True)
        if name not in SOURCE_KINDS and (overrides.get(name) is None or overrides[name].kind is None)
    ]
    if len(unknown) == 1:
        path, name = unknown[0]
        raise DataError(f"{path}: {unknown_source_message(name)}")
    if unknown:
        listed = "; ".join(f"{name!r} ({path})" for path, name in unknown)
        # Per-key overrides: a whole `data.sources={...}` would replace the config's other source settings.
        example = " ".join(f"data.sources.{name}.kind=retrieval" for _, name in unknown[:2])
        raise DataError(
            f"{len(unknown)} unknown sources, whose kind f2llm's tables of F2LLM v1 / v2 sources do not give: "
            f"{listed}. Give each its kind with the setting data.sources.<name>.kind, e.g. the overrides "
            f"`{example}`; kinds: {', '.join(KINDS)} (only retrieval sources get the in-batch term)"
        )
    for path, name in zip(files, names, strict=True):  # the other settings' errors, before any tokenizing too
        resolve_source(name, overrides.get(name), str(path), num_negatives)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries: list[_Entry | None] = [None] * len(files)  # keyed in visiting order: a bad file fails when met
    built = [False] * len(files)
    pools = _Pools(tokenizer, num_proc)
    try:
        first = rank * len(files) // world_size
        order = [(first + i) % len(files) for i in range(len(files))]
        waiting = []
        for i in order:
            entries[i] = _plan(
                files[i], tokenizer, cache_dir, name=None, override=overrides.get(names[i]), seed=seed,
                num_negatives=num_negatives, max_rows=max_rows,
            )  # fmt: skip
            outcome = _ensure(entries[i], tokenizer, pools, show_progress, wait=world_size == 1)
            if outcome is None:  # another rank builds it: come back once this rank's own share is done
                waiting.append(i)
            else:
                built[i] = outcome
        for i in waiting:
            built[i] = bool(_ensure(entries[i], tokenizer, pools, show_progress))  # type: ignore[arg-type]
    finally:
        pools.close()
    return [
        _open(entry, validation_fraction, cache_hit=not b)  # type: ignore[arg-type]
        for entry, b in zip(entries, built, strict=True)
    ]


def cache_summary(source: TokenizedSource) -> dict[str, Any]:
    """What building ``source``'s cache entry recorded: rows, distinct texts, tokens, seconds, and the entry's bytes
    on disk (both Arrow files)."""
    meta = json.loads(source.cache_file.with_suffix(".json").read_text())
    files = (source.cache_file, source.cache_file.with_suffix(".texts"))
    return {
        "name": source.name,
        "rows": len(source),
        "texts": meta.get("texts"),
        "tokens": meta.get("tokens"),
        "seconds": meta.get("seconds"),
        "bytes": sum(f.stat().st_size for f in files),
        "cache_hit": source.cache_hit,
    }
