"""Build F2LLM-format training sources from the public data shipped under ``data/``.

Each converter returns a ``pyarrow.Table`` with string columns ``query``, ``passage`` and ``negative_1`` ..
``negative_K``; :func:`main` writes them as ``<source>.parquet`` (zstd) under ``data/f2llm/``.

* ``scifact``: SciFact train claims -> cited abstracts (``title + " " + text``, as MTEB builds the corpus), one
  row per train qrel. No negatives (K = 0): hard negatives are mined later with an embedding model.
* ``snli``: premise -> entailed hypothesis, one row per (premise, hypothesis); the negative is a contradiction of
  the same premise. Contradictions are grouped per premise and handed out in turn to its rows (nearly every premise
  has one, so K = 1 keeps every row without repeating a negative inside a row).
* ``mrpc``: MRPC train paraphrase pairs (quality 1): sentence 1 -> sentence 2. No negatives (K = 0).
* ``banking77`` / ``emotion`` (clustering sources in the recipe): each text -> another text of the same label;
  negatives: K texts of other labels, all distinct (texts that carry several labels are dropped).

Queries carry no instruction: the per-source instruction table adds it while tokenizing.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from f2llm.data.sources import DataError

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def _table(query: list[str], passage: list[str], negatives: list[list[str]] | None = None) -> pa.Table:
    columns: dict[str, list[str]] = {"query": query, "passage": passage}
    for i, column in enumerate(zip(*negatives, strict=True) if negatives else [], start=1):
        columns[f"negative_{i}"] = list(column)
    return pa.table({name: pa.array(values, type=pa.string()) for name, values in columns.items()})


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def convert_scifact(data_dir: Path) -> pa.Table:
    root = data_dir / "retrieval" / "scifact"
    queries = {row["_id"]: row["text"] for row in _read_jsonl(root / "queries.jsonl")}
    corpus = {row["_id"]: f"{row['title']} {row['text']}".strip() for row in _read_jsonl(root / "corpus.jsonl.gz")}
    query, passage = [], []
    with open(root / "qrels" / "train.tsv", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            if int(row["score"]) <= 0:
                continue
            qid, did = row["query-id"], row["corpus-id"]
            if qid not in queries or did not in corpus:
                raise DataError(f"{root / 'qrels' / 'train.tsv'}: line {line_no}: unknown query {qid} or doc {did}")
            query.append(queries[qid])
            passage.append(corpus[did])
    return _table(query, passage)


def convert_snli(data_dir: Path) -> pa.Table:
    path = data_dir / "training" / "snli" / "snli_devtest_triplets.tsv"
    positives: dict[str, list[str]] = defaultdict(list)
    contradictions: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            anchor = row["anchor"]
            if row["positive"] not in positives[anchor]:
                positives[anchor].append(row["positive"])
            if row["negative"] not in contradictions[anchor]:
                contradictions[anchor].append(row["negative"])
    query, passage, negatives = [], [], []
    for anchor, hypotheses in positives.items():
        group = contradictions[anchor]
        for i, hypothesis in enumerate(hypotheses):
            query.append(anchor)
            passage.append(hypothesis)
            negatives.append([group[i % len(group)]])
    return _table(query, passage, negatives)


def convert_mrpc(data_dir: Path) -> pa.Table:
    path = data_dir / "training" / "mrpc" / "msr_paraphrase_train.txt"
    query, passage = [], []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if len(row) != 5:
                raise DataError(f"{path}: line {line_no}: expected 5 tab-separated fields, got {len(row)}")
            if row[0] == "1":
                query.append(row[3])
                passage.append(row[4])
    return _table(query, passage)


def label_source(
    texts: Sequence[str], labels: Sequence[str], num_negatives: int, seed: int, max_rows: int | None = None
) -> pa.Table:
    """Clustering / classification rows: positive = another text of the same label, negatives = other labels'.

    Duplicate texts are merged and texts carrying several labels dropped (they would be false negatives); labels
    left with a single text cannot give a positive and are skipped. ``max_rows`` keeps a seeded sample.
    """
    rng = np.random.default_rng(seed)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in zip(texts, labels, strict=True):
        labels_of[text].add(label)
    unique = [(t, next(iter(ls))) for t, ls in labels_of.items() if len(ls) == 1]
    texts_arr = np.asarray([t for t, _ in unique], dtype=object)
    names, codes = np.unique(np.asarray([lab for _, lab in unique], dtype=object), return_inverse=True)
    same_label = [np.flatnonzero(codes == c) for c in range(len(names))]
    other_labels = [np.flatnonzero(codes != c) for c in range(len(names))]
    rows = np.flatnonzero([len(same_label[c]) >= 2 for c in codes])
    if max_rows is not None and len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    query, passage, negatives = [], [], []
    for i in rows.tolist():
        same, others = same_label[codes[i]], other_labels[codes[i]]
        j = i
        while j == i:
            j = int(same[rng.integers(len(same))])
        if len(others) < num_negatives:
            raise DataError(
                f"label {names[codes[i]]!r}: only {len(others)} texts of other labels, {num_negatives} asked"
            )
        picked = rng.choice(others, size=num_negatives, replace=False)
        query.append(texts_arr[i])
        passage.append(texts_arr[j])
        negatives.append(texts_arr[picked].tolist())
    return _table(query, passage, negatives)


def convert_banking77(data_dir: Path, num_negatives: int, seed: int, max_rows: int | None) -> pa.Table:
    with open(data_dir / "classification" / "banking77" / "train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return label_source([r["text"] for r in rows], [r["category"] for r in rows], num_negatives, seed, max_rows)


def convert_emotion(data_dir: Path, num_negatives: int, seed: int, max_rows: int | None) -> pa.Table:
    with open(data_dir / "classification" / "emotion" / "train.txt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", quoting=csv.QUOTE_NONE))
    return label_source([r["text"] for r in rows], [r["label_name"] for r in rows], num_negatives, seed, max_rows)


CONVERTERS: dict[str, Callable[..., pa.Table]] = {
    "scifact": lambda data_dir, **_: convert_scifact(data_dir),
    "snli": lambda data_dir, **_: convert_snli(data_dir),
    "mrpc": lambda data_dir, **_: convert_mrpc(data_dir),
    "banking77": lambda data_dir, **kw: convert_banking77(data_dir, **kw),
    "emotion": lambda data_dir, **kw: convert_emotion(data_dir, **kw),
}


def convert(
    out_dir: str | Path,
    sources: Sequence[str] = tuple(CONVERTERS),
    data_dir: str | Path = DEFAULT_DATA_DIR,
    num_negatives: int = 24,
    max_rows: int | None = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``<source>.parquet`` for each requested source; returns the written paths.

    ``num_negatives`` and ``max_rows`` apply to the label-based sources (banking77, emotion), whose files would
    otherwise be tens of MB.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = sorted(set(sources) - set(CONVERTERS))
    if unknown:
        raise ValueError(f"convert: no converter for {unknown}; available: {sorted(CONVERTERS)}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"convert: data directory {data_dir} not found; pass --data-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in sources:
        table = CONVERTERS[name](data_dir, num_negatives=num_negatives, seed=seed, max_rows=max_rows)
        path = out_dir / f"{name}.parquet"
        pq.write_table(table, path, compression="zstd", compression_level=9)
        written[name] = path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m f2llm.data", description="Convert the shipped public data into F2LLM-format parquet sources."
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the repository's data/ folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR / "f2llm", help="output folder")
    parser.add_argument("--sources", nargs="+", default=list(CONVERTERS), choices=sorted(CONVERTERS))
    parser.add_argument("--num-negatives", type=int, default=24, help="negatives per row of banking77 / emotion")
    parser.add_argument("--max-rows", type=int, default=2000, help="rows kept of banking77 / emotion (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = convert(args.out, args.sources, args.data_dir, args.num_negatives, args.max_rows or None, args.seed)
    for name, path in written.items():
        meta = pq.read_metadata(path)
        negatives = sum(1 for c in meta.schema.names if c.startswith("negative_"))
        print(
            f"{name:>10}: {meta.num_rows:6d} rows, {negatives:2d} negatives, "
            f"{path.stat().st_size / 1e6:6.2f} MB -> {path}"
        )
    return 0
