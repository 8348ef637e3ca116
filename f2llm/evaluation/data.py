"""Readers for the evaluation and mining datasets kept as local files.

Every reader reports a malformed input as :class:`DataFormatError` naming the file and the 1-based line, so a bad row
is found without a debugger. The layouts are the ones shipped under ``data/`` (see ``data/README.md``):

* BEIR retrieval: ``corpus.jsonl[.gz]`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` (header ``query-id corpus-id score``);
* STS Benchmark: tab-separated, no quoting, score in column 5 and the sentences in columns 6 and 7;
* Banking77: CSV ``text,category``; Emotion: ``text;label_name``; 20 Newsgroups subjects: TSV
  ``split, newsgroup, doc_id, subject``.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# dair-ai/emotion's label ids, the ids MTEB's EmotionClassification dataset carries.
EMOTION_LABELS: tuple[str, ...] = ("sadness", "joy", "love", "anger", "fear", "surprise")


class DataFormatError(ValueError):
    """A data file does not have the expected layout; the message names the file and the line."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


def _open_text(path: Path) -> IO[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8", newline="")


def read_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file (``.gz`` allowed).

    Raises :class:`DataFormatError` for a line that is not a JSON object or lacks a ``required`` field.
    """
    path = Path(path)
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise DataFormatError(path, line_no, f"missing field(s) {missing}; fields present: {sorted(obj)}")
            yield line_no, obj


def corpus_text(title: str | None, text: str) -> str:
    """The text a model reads for a corpus document: MTEB's ``title + " " + text``, stripped."""
    if title:
        return (title + " " + text).strip()
    return text.strip()


@dataclass
class BeirSplit:
    """One split of a BEIR-layout retrieval dataset.

    ``corpus_ids``/``corpus_titles``/``corpus_texts`` keep the file order; ``queries`` holds only the queries that
    have at least one judged document in the split's qrels (file order); ``qrels`` maps query id -> doc id -> grade.
    """

    corpus_ids: list[str]
    corpus_titles: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]

    def documents(self) -> list[str]:
        """Corpus texts as a model reads them (title + text)."""
        return [corpus_text(t, x) for t, x in zip(self.corpus_titles, self.corpus_texts, strict=True)]


def find_corpus_file(root: Path) -> Path:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no corpus.jsonl or corpus.jsonl.gz (BEIR layout expected)")


def read_qrels(path: Path | str) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (header ``query-id corpus-id score``) into query id -> doc id -> grade."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if line_no == 1 and fields[0] == "query-id":
                continue
            if len(fields) != 3:
                raise DataFormatError(
                    path, line_no, f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}"
                )
            qid, did, grade = fields
            try:
                qrels.setdefault(qid, {})[did] = int(grade)
            except ValueError:
                raise DataFormatError(path, line_no, f"score {grade!r} is not an integer") from None
    if not qrels:
        raise DataFormatError(path, None, "no judgements")
    return qrels


def read_beir(root: Path | str, split: str = "test") -> BeirSplit:
    """Read a BEIR-layout directory: ``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/<split>.tsv``.

    Queries without a judgement in the split are left out, as MTEB's retrieval loader does.
    """
    root = Path(root)
    qrels = read_qrels(root / "qrels" / f"{split}.tsv")
    corpus_ids, titles, texts = [], [], []
    corpus_path = find_corpus_file(root)
    for _, obj in read_jsonl(corpus_path, required=("_id", "text")):
        corpus_ids.append(str(obj["_id"]))
        titles.append(obj.get("title") or "")
        texts.append(obj["text"])
    known = set(corpus_ids)
    query_ids, query_texts = [], []
    for _, obj in read_jsonl(root / "queries.jsonl", required=("_id", "text")):
        qid = str(obj["_id"])
        if qid in qrels:
            query_ids.append(qid)
            query_texts.append(obj["text"])
    missing_queries = set(qrels) - set(query_ids)
    if missing_queries:
        raise DataFormatError(
            root / "qrels" / f"{split}.tsv",
            None,
            f"{len(missing_queries)} query id(s) absent from queries.jsonl, e.g. {sorted(missing_queries)[:3]}",
        )
    unknown_docs = {d for rels in qrels.values() for d in rels} - known
    if unknown_docs:
        raise DataFormatError(
            root / "qrels" / f"{split}.tsv",
            None,
            f"{len(unknown_docs)} corpus id(s) absent from {corpus_path.name}, e.g. {sorted(unknown_docs)[:3]}",
        )
    return BeirSplit(corpus_ids, titles, texts, query_ids, query_texts, qrels)


@dataclass
class STSPairs:
    sentence1: list[str]
    sentence2: list[str]
    score: list[float]


def read_sts_benchmark(path: Path | str) -> STSPairs:
    """Read an STS Benchmark file (``sts-{train,dev,test}.csv``): tab-separated, no quoting, score in [0, 5].

    Some lines carry two trailing extra columns; only columns 5-7 (score, sentence1, sentence2) are read.
    """
    path = Path(path)
    pairs = STSPairs([], [], [])
    with _open_text(path) as f:
        for line_no, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not fields:
                continue
            if len(fields) < 7:
                raise DataFormatError(path, line_no, f"expected at least 7 tab-separated fields, got {len(fields)}")
            try:
                score = float(fields[4])
            except ValueError:
                raise DataFormatError(path, line_no, f"score (field 5) {fields[4]!r} is not a number") from None
            if not 0.0 <= score <= 5.0:
                raise DataFormatError(path, line_no, f"score {score} outside [0, 5]")
            pairs.sentence1.append(fields[5])
            pairs.sentence2.append(fields[6])
            pairs.score.append(score)
    return pairs


@dataclass
class LabelledTexts:
    text: list[str]
    label: list[int]
    label_names: list[str]


def read_banking77(path: Path | str, categories: Path | str) -> LabelledTexts:
    """Read a Banking77 CSV (``text,category``); labels are indices into ``categories.json``."""
    path, categories = Path(path), Path(categories)
    names = json.loads(categories.read_text(encoding="utf-8"))
    index = {name: i for i, name in enumerate(names)}
    out = LabelledTexts([], [], list(names))
    with _open_text(path) as f:
        reader = csv.reader(f)
        for row_no, fields in enumerate(reader, start=1):
            line_no = reader.line_num
            if row_no == 1 and fields == ["text", "category"]:
                continue
            if len(fields) != 2:
                raise DataFormatError(path, line_no, f"expected 2 CSV fields (text, category), got {len(fields)}")
            text, category = fields
            if category not in index:
                raise DataFormatError(path, line_no, f"category {category!r} is not in {categories}")
            out.text.append(text)
            out.label.append(index[category])
    return out


def read_emotion(path: Path | str) -> LabelledTexts:
    """Read a dair-ai Emotion file (``text;label_name`` with a header); labels are dair-ai's ids."""
    path = Path(path)
    index = {name: i for i, name in enumerate(EMOTION_LABELS)}
    out = LabelledTexts([], [], list(EMOTION_LABELS))
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line_no == 1 and line == "text;label_name":
                continue
            if not line:
                continue
            text, sep, label = line.rpartition(";")
            if not sep or label not in index:
                raise DataFormatError(path, line_no, f"expected 'text;label' with label in {EMOTION_LABELS}")
            out.text.append(text)
            out.label.append(index[label])
    return out


def read_newsgroup_subjects(path: Path | str, split: str = "test") -> tuple[list[str], list[str]]:
    """Read the 20 Newsgroups subject lines of one split: returns ``(subjects, newsgroups)``."""
    path = Path(path)
    subjects, groups = [], []
    with _open_text(path) as f:
        for line_no, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if line_no == 1 and fields[:1] == ["split"]:
                continue
            if len(fields) != 4:
                expected = "4 tab-separated fields (split, newsgroup, doc_id, subject)"
                raise DataFormatError(path, line_no, f"expected {expected}, got {len(fields)}")
            if fields[0] == split:
                groups.append(fields[1])
                subjects.append(fields[3])
    if not subjects:
        raise DataFormatError(path, None, f"no rows of split {split!r}")
    return subjects, groups
