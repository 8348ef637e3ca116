"""Converters: the shipped public data -> F2LLM-format parquet, checked row by row against the raw files."""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from f2llm.data import SourceOverride, TextTokenizer, load_sources
from f2llm.data.convert import CONVERTERS, DEFAULT_DATA_DIR, convert, main
from tests.helpers import tiny_tokenizer

DATA = DEFAULT_DATA_DIR
COMMITTED = DATA / "f2llm"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("f2llm")
    paths = convert(out, max_rows=400, seed=0)
    assert sorted(paths) == sorted(CONVERTERS)
    return {name: pq.read_table(path).to_pylist() for name, path in paths.items()}


def test_scifact_rows_are_train_qrels(converted) -> None:
    queries = {r["_id"]: r["text"] for r in map(json.loads, open(DATA / "retrieval/scifact/queries.jsonl"))}
    with gzip.open(DATA / "retrieval/scifact/corpus.jsonl.gz", "rt") as f:
        corpus = {r["_id"]: r for r in map(json.loads, f)}
    with open(DATA / "retrieval/scifact/qrels/train.tsv") as f:
        qrels = [r for r in csv.DictReader(f, delimiter="\t") if int(r["score"]) > 0]
    rows = converted["scifact"]
    assert len(rows) == len(qrels) == 919
    assert set(rows[0]) == {"query", "passage"}  # no negatives until mined
    for row, qrel in zip(rows, qrels, strict=True):
        doc = corpus[qrel["corpus-id"]]
        assert row["query"] == queries[qrel["query-id"]]
        assert row["passage"] == f"{doc['title']} {doc['text']}"


def test_snli_rows_are_entailments_with_same_premise_contradictions(converted) -> None:
    entailed, contradicted = defaultdict(set), defaultdict(set)
    with open(DATA / "training/snli/snli_devtest_triplets.tsv") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            entailed[r["anchor"]].add(r["positive"])
            contradicted[r["anchor"]].add(r["negative"])
    rows = converted["snli"]
    assert len(rows) == sum(len(v) for v in entailed.values())
    assert {(r["query"], r["passage"]) for r in rows} == {(a, p) for a, ps in entailed.items() for p in ps}
    for row in rows:
        assert row["negative_1"] in contradicted[row["query"]]
    # Premises with several contradictions spread them over their rows.
    used = defaultdict(set)
    for row in rows:
        used[row["query"]].add(row["negative_1"])
    for anchor, negatives in used.items():
        assert len(negatives) == min(len(contradicted[anchor]), len(entailed[anchor]))


def test_mrpc_rows_are_paraphrase_pairs(converted) -> None:
    with open(DATA / "training/mrpc/msr_paraphrase_train.txt", encoding="utf-8-sig") as f:
        pairs = [(r[3], r[4]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r[0] == "1"]
    assert [(r["query"], r["passage"]) for r in converted["mrpc"]] == pairs


@pytest.mark.parametrize(
    ("name", "path", "delimiter", "text", "label"),
    [
        ("banking77", "classification/banking77/train.csv", ",", "text", "category"),
        ("emotion", "classification/emotion/train.txt", ";", "text", "label_name"),
    ],
)
def test_label_sources_pair_same_label_and_other_label_negatives(
    converted, name: str, path: str, delimiter: str, text: str, label: str
) -> None:
    with open(DATA / path, newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == ";" else csv.QUOTE_MINIMAL
        raw = list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))
    labels = defaultdict(set)
    for r in raw:
        labels[r[text]].add(r[label])
    rows = converted[name]
    assert len(rows) == 400
    for row in rows:
        own = labels[row["query"]]
        negatives = [row[f"negative_{i}"] for i in range(1, 25)]
        assert len(own) == 1 and labels[row["passage"]] == own and row["passage"] != row["query"]
        assert all(not (labels[n] & own) for n in negatives)
        assert len(set(negatives)) == 24


def test_committed_files_are_what_convert_writes(tmp_path: Path) -> None:
    """data/f2llm/ is reproducible: `python -m f2llm.data` rewrites the same tables (and they stay small)."""
    assert main(["--out", str(tmp_path), "--sources", "snli", "banking77"]) == 0
    for name in ("snli", "banking77"):
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(pq.read_table(COMMITTED / f"{name}.parquet"))
    assert sum(p.stat().st_size for p in COMMITTED.glob("*.parquet")) < 5_000_000


@pytest.mark.slow
def test_committed_files_load_for_training(tmp_path: Path) -> None:
    tok = TextTokenizer(tiny_tokenizer(), max_length=64, append_eos=True)
    no_negatives = SourceOverride(num_negatives=0)
    sources = load_sources(
        COMMITTED,
        tok,
        tmp_path / "cache",
        overrides={"scifact": no_negatives, "mrpc": no_negatives, "snli": SourceOverride(num_negatives=1)},
    )
    summary = {s.name: (s.kind, s.available_negatives, len(s)) for s in sources}
    assert summary == {
        "banking77": ("clustering", 24, 2000),
        "emotion": ("clustering", 24, 2000),
        "mrpc": ("retrieval", 0, 2753),
        "scifact": ("retrieval", 0, 919),
        "snli": ("retrieval", 1, 6337),
    }
    assert all(s.instruction for s in sources)  # raw queries: the instruction table applies
