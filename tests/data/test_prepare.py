"""Recipe-scale data preparation: each distinct text tokenized once, streamed in row groups, in worker processes,
the sources split among ranks, ``f2llm prepare``; the ids are always those of tokenizing every row directly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import f2llm.data.readers as readers
from f2llm import cli
from f2llm.data import DataError, SourceOverride, TextTokenizer, format_query, load_source, load_sources
from f2llm.data.prepare import open_stream
from f2llm.data.sources import INSTRUCTIONS
from f2llm.encoder import Encoder
from tests.helpers import HANG_BOUND, make_rows, tiny_qwen3, tiny_tokenizer, training_env, write_source

datasets.disable_progress_bars()
RETRIEVAL_2 = SourceOverride(num_negatives=2)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tokenizer(hf_tokenizer) -> TextTokenizer:
    return TextTokenizer(hf_tokenizer, max_length=32, append_eos=True)


def repeated_rows(n: int, k: int, pool: int = 7) -> list[dict]:
    """Rows whose passages and negatives are drawn from a few documents (as mined negatives recur), and whose
    queries repeat too (every third row asks row 0's question)."""
    docs = [r["passage"] for r in make_rows(pool, 0, prefix="doc ")]
    rng = np.random.default_rng(0)
    rows = make_rows(n, 0)
    for i, row in enumerate(rows):
        if i % 3 == 2:
            row["query"] = rows[0]["query"]
        row["passage"] = docs[int(rng.integers(pool))]
        for j in range(1, k + 1):
            row[f"negative_{j}"] = docs[int(rng.integers(pool))]
    return rows


def assert_reference_ids(src, rows: list[dict], tokenizer: TextTokenizer, instruction: str | None) -> None:
    """Every row's ids through ``take`` are what tokenizing the row's texts one by one gives."""
    k = src.available_negatives
    picked = np.arange(len(src))
    queries, passages, negatives = src.take(picked, list(range(k)))
    file_rows = src.file_rows if src.file_rows is not None else picked
    for i, row in enumerate(file_rows.tolist()):
        query = rows[row]["query"] if instruction is None else format_query(rows[row]["query"], instruction)
        assert queries[i].tolist() == tokenizer([query])[0]
        assert passages[i].tolist() == tokenizer([rows[row]["passage"]])[0]
        for j in range(k):
            assert negatives[i * k + j].tolist() == tokenizer([rows[row][f"negative_{j + 1}"]])[0]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_each_distinct_text_is_tokenized_once(tmp_path: Path, tokenizer: TextTokenizer, fmt: str) -> None:
    rows = repeated_rows(30, 3)
    src = load_source(
        write_source(tmp_path / f"msmarco.{fmt}", rows), tokenizer, tmp_path / "cache", override=RETRIEVAL_2
    )
    assert_reference_ids(src, rows, tokenizer, INSTRUCTIONS["msmarco"])
    distinct_queries = len({r["query"] for r in rows})
    assert len(src.texts) == distinct_queries + 7  # the 7 documents once each, however many rows repeat them
    meta = json.loads(src.cache_file.with_suffix(".json").read_text())
    assert meta["texts"] == len(src.texts) and meta["rows"] == 30


def test_v2_layout_tokenizes_each_document_once(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    rows = repeated_rows(20, 2)
    docs = sorted({r[c] for r in rows for c in ("passage", "negative_1", "negative_2")})
    pq.write_table(pa.table({"doc_id": list(range(len(docs))), "text": docs}), tmp_path / "corpus.parquet")
    ids = [{**r, **{c: docs.index(r[c]) for c in ("passage", "negative_1", "negative_2")}} for r in rows]
    pq.write_table(pa.Table.from_pylist(ids), tmp_path / "msmarco_query.parquet")
    (src,) = load_sources(tmp_path, tokenizer, tmp_path / "cache", overrides={"msmarco": RETRIEVAL_2})
    assert_reference_ids(src, rows, tokenizer, INSTRUCTIONS["msmarco"])
    assert len(src.texts) == len({r["query"] for r in rows}) + len(docs)


def test_sampled_rows_and_datasets_sources(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    rows = repeated_rows(50, 2)
    path = write_source(tmp_path / "msmarco.parquet", rows)
    capped = load_source(path, tokenizer, tmp_path / "cache", override=RETRIEVAL_2, max_rows=17, seed=3)
    assert len(capped) == 17 and capped.total_rows == 50
    assert_reference_ids(capped, rows, tokenizer, INSTRUCTIONS["msmarco"])
    in_memory = load_source(
        datasets.Dataset.from_list(rows), tokenizer, tmp_path / "cache", name="msmarco", override=RETRIEVAL_2,
        max_rows=17, seed=3,
    )  # fmt: skip
    assert (in_memory.file_rows == capped.file_rows).all()
    assert in_memory.take(np.arange(17), [0, 1])[2][5].tolist() == capped.take(np.arange(17), [0, 1])[2][5].tolist()


def test_second_load_is_a_cache_hit_and_a_changed_source_is_retokenized(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    rows = repeated_rows(12, 2)
    path = write_source(tmp_path / "msmarco.jsonl", rows)
    first = load_source(path, tokenizer, tmp_path / "cache", override=RETRIEVAL_2)
    again = load_source(path, tokenizer, tmp_path / "cache", override=RETRIEVAL_2)
    assert not first.cache_hit and again.cache_hit and again.cache_file == first.cache_file
    rows[4] = {**rows[4], "passage": "an edited passage", "negative_2": "an edited negative"}
    write_source(path, rows)  # same name, one row edited
    edited = load_source(path, tokenizer, tmp_path / "cache", override=RETRIEVAL_2)
    assert not edited.cache_hit and edited.cache_file != first.cache_file
    assert_reference_ids(edited, rows, tokenizer, INSTRUCTIONS["msmarco"])


def test_a_source_changed_while_tokenized_is_refused(
    tmp_path: Path, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = repeated_rows(10, 2)
    path = write_source(tmp_path / "msmarco.parquet", rows)
    build_cache = readers.build_cache

    def editing(*args, **kwargs):
        stats = build_cache(*args, **kwargs)
        time.sleep(0.01)  # a later modification time
        write_source(path, repeated_rows(11, 2))
        return stats

    monkeypatch.setattr(readers, "build_cache", editing)
    with pytest.raises(DataError, match="changed while it was being tokenized"):
        load_source(path, tokenizer, tmp_path / "cache", override=RETRIEVAL_2)
    assert not list((tmp_path / "cache").glob("*.json")) and not list((tmp_path / "cache").glob("*.tmp*"))


def test_row_groups_stream_and_name_the_file_row(
    tmp_path: Path, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "ROW_GROUP", 8)
    rows = repeated_rows(45, 2)
    for fmt in ("parquet", "jsonl"):
        src = load_source(write_source(tmp_path / f"fiqa.{fmt}", rows), tokenizer, tmp_path / fmt, override=RETRIEVAL_2)
        assert_reference_ids(src, rows, tokenizer, INSTRUCTIONS["fiqa"])
        assert len(open_stream(src.cache_file).to_batches()) == 6  # 45 rows in groups of 8: streamed, not whole
    rows[37]["negative_2"] = "   "
    with pytest.raises(DataError, match=r"fiqa.parquet: row 37, field 'negative_2': empty text"):
        load_source(
            write_source(tmp_path / "bad" / "fiqa.parquet", rows), tokenizer, tmp_path / "c", override=RETRIEVAL_2
        )


def test_worker_processes_write_the_same_cache(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    rows = repeated_rows(40, 3)
    path = write_source(tmp_path / "msmarco.parquet", rows)
    one = load_source(path, tokenizer, tmp_path / "one", override=RETRIEVAL_2, num_proc=1)
    two = load_source(path, tokenizer, tmp_path / "two", override=RETRIEVAL_2, num_proc=2)
    for a, b in (
        (one.cache_file, two.cache_file),
        (one.cache_file.with_suffix(".texts"), two.cache_file.with_suffix(".texts")),
    ):
        assert a.read_bytes() == b.read_bytes()
    assert_reference_ids(two, rows, tokenizer, INSTRUCTIONS["msmarco"])


_RANK = """
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from f2llm.data import SourceOverride, TextTokenizer, load_sources
folder, tok_dir, cache, rank, go = sys.argv[1:]
tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(tok_dir), 32, True)
Path(go + rank).touch()  # ready: imports done
while not Path(go).exists():  # both ranks start together
    time.sleep(0.01)
sources = load_sources(folder, tokenizer, cache, overrides={n: SourceOverride(kind="retrieval", num_negatives=1)
    for n in ("a", "b", "c", "d")}, rank=int(rank), world_size=2, num_proc=1, show_progress=False)
rows = {s.name: [x.tolist() for part in s.take(range(len(s)), [0]) for x in part] for s in sources}
print(json.dumps({"built": [s.name for s in sources if not s.cache_hit], "rows": rows}))
"""


@pytest.mark.slow
def test_ranks_split_the_sources_and_all_end_with_every_source(tmp_path: Path, hf_tokenizer) -> None:
    for name in ("a", "b", "c", "d"):
        write_source(tmp_path / "data" / f"{name}.parquet", repeated_rows(600, 1, pool=400))
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    go = tmp_path / "go"
    args = [str(tmp_path / "data"), str(tmp_path / "tok"), str(tmp_path / "cache")]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, *args, str(r), str(go)], stdout=subprocess.PIPE, text=True, env=training_env()
        )
        for r in range(2)
    ]
    deadline = time.monotonic() + HANG_BOUND
    while not all(Path(f"{go}{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    out = [json.loads(p.communicate(timeout=HANG_BOUND)[0].strip().splitlines()[-1]) for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    built = [set(o["built"]) for o in out]
    assert built[0] and built[1], f"each rank builds a share: {built}"
    assert not built[0] & built[1] and built[0] | built[1] == {"a", "b", "c", "d"}
    assert out[0]["rows"] == out[1]["rows"]


def test_prepare_command_fills_the_cache_training_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_qwen3(tmp_path)
    data = tmp_path / "data"
    write_source(data / "msmarco.parquet", repeated_rows(25, 2))
    write_source(data / "fiqa.jsonl", repeated_rows(9, 1))
    config = {
        "model": {"name_or_path": str(model), "max_length": 48},
        "data": {
            "paths": [str(data)],
            "cache_dir": str(tmp_path / "cache"),
            "sources": {"fiqa": {"num_negatives": 1}, "msmarco": {"num_negatives": 2}},
        },
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["prepare", "--config", str(tmp_path / "train.yaml"), "data.seed=3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "msmarco" in out and "fiqa" in out and "2 sources, 34 rows" in out
    # What training loads (the Encoder's tokenizer, the config's settings) is all in the cache.
    tokenizer = Encoder.from_pretrained(model, max_length=48).text_tokenizer
    loaded = load_sources(
        [data],
        tokenizer,
        tmp_path / "cache",
        overrides={"fiqa": SourceOverride(num_negatives=1), "msmarco": RETRIEVAL_2},
        seed=3,
    )
    assert all(s.cache_hit for s in loaded)
    assert cli.main(["prepare", "--config", str(tmp_path / "train.yaml"), "data.seed=3", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("cached") == 2
