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

Tokenized ids are cached as an Arrow file under ``cache_dir``, keyed by the tokenizer's identity (vocabulary,
rule, max_length), the query instruction and the content hash of the file (and of its corpus.parquet in the v2
layout, so an edited corpus invalidates the cache): a second run, or another rank, memory-
maps the cached file and tokenizes nothing. The first process to arrive builds the cache under a file lock while
the others wait on it, so ranks (and nodes sharing the cache directory) never tokenize the same source twice.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import filelock
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

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
CACHE_FORMAT_VERSION = "f2llm-tokenized-v1"
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


def _read_v2_query_file(path: Path, corpus: Corpus) -> datasets.Dataset:
    """A query file of the v2 layout with its ``passage`` / ``negative_i`` ids replaced by the corpus texts."""
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
        resolved[column] = corpus.texts.take(index)
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(pa.table(resolved)))


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


def _validate_and_tokenize(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: TextTokenizer,
    columns: list[str],
    instruction: str | None,
    where: str,
    file_rows: np.ndarray | None = None,
) -> dict[str, list[list[int]]]:
    if file_rows is not None:  # a sample of the file's rows: errors name the row of the file
        indices = file_rows[indices].tolist()
    for column in columns:
        for value, row in zip(batch[column], indices, strict=True):
            if value is None:
                problem = "missing (null)"
            elif not isinstance(value, str):
                problem = f"expected a string, got {type(value).__name__}"
            elif not value.strip():
                problem = "empty text"
            else:
                continue
            raise DataError(f"{where}: row {row}, field {column!r}: {problem}; fix or drop the row")
    texts: list[str] = []
    for column in columns:
        values = batch[column]
        if column == "query" and instruction is not None:
            values = [format_query(q, instruction) for q in values]
        texts.extend(values)
    ids = tokenizer(texts)
    n = len(indices)
    return {f"{column}_ids": ids[i * n : (i + 1) * n] for i, column in enumerate(columns)}


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


def _split_list_column(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    bounds = np.cumsum(array.value_lengths().to_numpy(zero_copy_only=False))[:-1]
    return np.split(values, bounds)


@dataclass
class TokenizedSource:
    """One source's token ids (memory-mapped Arrow), its settings and its train / validation rows.

    Attributes:
        name: source name (file stem).
        kind: retrieval / classification / clustering.
        num_negatives: negatives sampled per query and batch.
        available_negatives: K, the ``negative_i`` columns of the file.
        instruction: the instruction prefixed to queries while tokenizing (None: queries used as they are).
        dataset: columns ``query_ids``, ``passage_ids``, ``negative_{i}_ids`` (int32 lists).
        train_rows / validation_rows: row indices of the two splits.
        cache_file: the Arrow file holding ``dataset``.
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
    dataset: datasets.Dataset
    train_rows: np.ndarray
    validation_rows: np.ndarray
    cache_file: Path
    cache_hit: bool
    source: str | Path | datasets.Dataset | None = None
    total_rows: int | None = None
    file_rows: np.ndarray | None = None
    _views: dict[tuple[str, ...], datasets.Dataset] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def take(
        self, rows: Sequence[int] | np.ndarray, negative_columns: Sequence[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Token ids of ``rows``: (queries, passages, negatives row-major: row i's negatives at [i*k, (i+1)*k)).

        ``negative_columns`` are 0-based indices into negative_1 .. negative_K.
        """
        columns = ("query_ids", "passage_ids", *(f"negative_{j + 1}_ids" for j in negative_columns))
        view = self._views.get(columns)
        if view is None:
            view = self._views[columns] = self.dataset.with_format("arrow", columns=list(columns))
        table = view[np.asarray(rows, dtype=np.int64)]
        per_column = [_split_list_column(table.column(c)) for c in columns]
        k = len(negative_columns)
        negatives = [per_column[2 + j][i] for i in range(len(per_column[0])) for j in range(k)]
        return per_column[0], per_column[1], negatives


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

    Raises:
        DataError: unknown source, bad columns, a bad row (missing / empty / non-string field), or fewer negative
            columns than ``num_negatives`` asks.
    """
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
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_of(Path(source)) if not isinstance(source, datasets.Dataset) else None
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
    meta_file = cache_file.with_suffix(".json")

    with filelock.FileLock(str(cache_file) + ".lock"):
        cache_hit = meta_file.exists() and cache_file.exists()
        if cache_hit:
            meta = json.loads(meta_file.read_text())
            dataset = datasets.Dataset.from_file(str(cache_file))
            total_rows = int(meta.get("total_rows", len(dataset)))  # caches written before max_rows: every row
            file_rows = sample_rows(total_rows, max_rows, seed, name)
        else:
            raw = read_raw(source, cache_dir)
            total_rows = len(raw)
            file_rows = sample_rows(total_rows, max_rows, seed, name)
            if file_rows is not None:  # only the sampled rows are validated and tokenized
                raw = raw.select(file_rows)
            k = negative_count(raw.column_names, where)
            instruction = query_instruction(spec, raw, tokenizer.append_eos, where)
            columns = text_columns(k)
            features = datasets.Features({f"{c}_ids": datasets.List(datasets.Value("int32")) for c in columns})
            dataset = raw.map(
                _validate_and_tokenize,
                with_indices=True,
                batched=True,
                remove_columns=raw.column_names,
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "columns": columns,
                    "instruction": instruction,
                    "where": where,
                    "file_rows": file_rows,
                },
                features=features,
                cache_file_name=str(cache_file),
                load_from_cache_file=False,
                new_fingerprint=key,
                desc=f"tokenizing {name}",
            )
            meta = {
                "name": name,
                "source": where,
                "rows": len(dataset),
                "total_rows": total_rows,
                "negatives": k,
                "instruction": instruction,
            }
            tmp = meta_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_file)

    k = int(meta["negatives"])
    if spec.num_negatives > k:
        have = f"{k} negative column(s) (negative_1 .. negative_{k})" if k else "no negative columns"
        raise DataError(
            f"{where}: source {name!r} has {have} but num_negatives={spec.num_negatives} are asked per query; "
            "lower num_negatives for this source (SourceOverride(num_negatives=...); 0 = in-batch negatives only) "
            "or mine hard negatives first"
        )
    train_rows, validation_rows = _holdout(len(dataset), validation_fraction, seed, name)
    return TokenizedSource(
        name=name,
        kind=spec.kind,
        num_negatives=spec.num_negatives,
        available_negatives=k,
        instruction=meta["instruction"],
        dataset=dataset,
        train_rows=train_rows,
        validation_rows=validation_rows,
        cache_file=cache_file,
        cache_hit=cache_hit,
        source=source,
        total_rows=total_rows,
        file_rows=file_rows,
    )


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
) -> list[TokenizedSource]:
    """:func:`load_source` for every source file of a directory (or list of paths), in name order.

    Every source's settings are resolved before any is read or tokenized: an unknown source (its kind neither in
    the tables nor in ``overrides``) is refused at once, all of them named with their files.
    """
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
    return [
        load_source(
            path,
            tokenizer,
            cache_dir,
            override=overrides.get(source_name(path)),
            seed=seed,
            validation_fraction=validation_fraction,
            num_negatives=num_negatives,
            max_rows=max_rows,
        )
        for path in files
    ]
