"""The v2 data layout: query files whose passage / negative_i hold document ids into one corpus.parquet."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from f2llm.config import load_config
from f2llm.data import DataError, SourceOverride, TextTokenizer, load_source, load_sources
from f2llm.distributed import Runtime
from f2llm.trainer import Trainer
from tests.helpers import assert_same_weights, make_rows, tiny_tokenizer, trainer_workdir, write_source

datasets.disable_progress_bars()
RETRIEVAL_1 = SourceOverride(kind="retrieval", num_negatives=1, add_instruction=False)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(tiny_tokenizer(), max_length=32, append_eos=True)


def write_corpus(folder: Path, ids: list, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), folder / "corpus.parquet")
    return folder / "corpus.parquet"


def decoded(tokenizer: TextTokenizer, seqs) -> list[str]:
    return [tokenizer.tokenizer.decode(s[:-1]) for s in seqs]  # the last id is the appended EOS


@pytest.mark.parametrize(
    ("ids", "fmt"), [([7, 3, 11], "parquet"), (["d7", "d3", "d11"], "parquet"), ([7, 3, 11], "jsonl")]
)
def test_ids_resolve_to_corpus_texts(tmp_path: Path, tokenizer: TextTokenizer, ids: list, fmt: str) -> None:
    write_corpus(tmp_path, ids, ["seven dogs", "three cats", "eleven birds"])
    rows = [
        {"query": "first q", "passage": ids[2], "negative_1": ids[0]},
        {"query": "second q", "passage": ids[1], "negative_1": ids[2]},
    ]
    write_source(tmp_path / f"msmarco_query.{fmt}", rows)
    (source,) = load_sources(tmp_path, tokenizer, tmp_path / "cache", overrides={"msmarco": RETRIEVAL_1})
    assert source.name == "msmarco"  # v2's _query suffix is not part of the name
    queries, passages, negatives = source.take([0, 1], [0])
    assert decoded(tokenizer, passages) == ["eleven birds", "three cats"]
    assert decoded(tokenizer, negatives) == ["seven dogs", "eleven birds"]
    assert decoded(tokenizer, queries) == ["first q", "second q"]


def test_missing_id_names_file_row_field_and_id(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    write_corpus(tmp_path, [1, 2, 3], ["a text", "b text", "c text"])
    query_file = write_source(
        tmp_path / "msmarco_query.parquet",
        [{"query": "q0", "passage": 1, "negative_1": 2}, {"query": "q1", "passage": 3, "negative_1": 42}],
    )
    with pytest.raises(DataError) as e:
        load_source(query_file, tokenizer, tmp_path / "cache", override=RETRIEVAL_1)
    message = str(e.value)
    assert str(query_file) in message and "row 1" in message and "'negative_1'" in message and "42" in message


def test_duplicate_corpus_ids_are_named(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    write_corpus(tmp_path, ["x", "y", "x", "z", "y"], ["t1", "t2", "t3", "t4", "t5"])
    query_file = write_source(tmp_path / "msmarco_query.parquet", [{"query": "q", "passage": "z"}])
    with pytest.raises(DataError, match=r"2 duplicate doc_id\(s\), e\.g\. \['x', 'y'\]|\['y', 'x'\]"):
        load_source(query_file, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=0))


def test_ids_match_exactly_int_is_not_string(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    write_corpus(tmp_path, [5, 6], ["five", "six"])
    query_file = write_source(tmp_path / "msmarco_query.parquet", [{"query": "q", "passage": "5"}])
    with pytest.raises(DataError, match=r"column 'passage' holds string values .* doc_id are ints"):
        load_source(query_file, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=0))


def test_bad_corpus(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    query_file = write_source(tmp_path / "msmarco_query.parquet", [{"query": "q", "passage": 1}])
    no_override = SourceOverride(num_negatives=0)
    pq.write_table(pa.table({"id": [1], "text": ["t"]}), tmp_path / "corpus.parquet")
    with pytest.raises(DataError, match=r"corpus.parquet: missing column 'doc_id'"):
        load_source(query_file, tokenizer, tmp_path / "cache", override=no_override)
    write_corpus(tmp_path, [1, 2], ["fine", "  "])
    with pytest.raises(DataError, match=r"row 1 \(doc_id 2\): text is missing or empty"):
        load_source(query_file, tokenizer, tmp_path / "cache", override=no_override)
    with pytest.raises(DataError, match="a v2 corpus is not a source"):
        load_sources([tmp_path / "corpus.parquet"], tokenizer, tmp_path / "cache")


def test_changed_corpus_invalidates_the_cache(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    write_corpus(tmp_path, [1, 2], ["old text", "other"])
    query_file = write_source(tmp_path / "msmarco_query.parquet", [{"query": "q", "passage": 1}])
    first = load_source(query_file, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=0))
    again = load_source(query_file, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=0))
    assert not first.cache_hit and again.cache_hit
    write_corpus(tmp_path, [1, 2], ["new words here", "other"])  # the query file is unchanged
    changed = load_source(query_file, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=0))
    assert not changed.cache_hit and changed.cache_file != first.cache_file
    assert decoded(tokenizer, changed.take([0], [])[1]) == ["new words here"]


def to_v2_layout(rows: list[dict], prefix: str, corpus: dict[str, int]) -> list[dict]:
    """Rows with passage / negative texts replaced by ids of ``corpus`` (text -> id, extended as needed)."""
    out = []
    for row in rows:
        new = {"query": row["query"]}
        for column, text in row.items():
            if column != "query":
                new[column] = corpus.setdefault(text, 1000 + len(corpus))
        out.append(new)
    return out


def test_training_on_the_v2_layout_matches_the_same_data_inline(tmp_path: Path) -> None:
    """The workdir's two sources, written once inline and once as query files + corpus.parquet: same training."""
    workdir = trainer_workdir(tmp_path / "work")
    msmarco, banking = make_rows(70, 3), make_rows(40, 1, prefix="b ")
    v2 = tmp_path / "v2"
    corpus: dict[str, int] = {}
    write_source(v2 / "msmarco_query.parquet", to_v2_layout(msmarco, "m", corpus))
    write_source(v2 / "banking77_query.jsonl", to_v2_layout(banking, "b", corpus))
    write_corpus(v2, list(corpus.values()), list(corpus))

    def run(name: str, *overrides: str) -> Path:
        config = load_config(workdir / "base.yaml", [f"output_dir={tmp_path / name}", *overrides])
        Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu"))).train()
        return tmp_path / name

    inline = run("inline", f"data.paths=[{workdir / 'data'}]")  # a folder: sources in name order, as below
    layout = run("v2", f"data.paths=[{v2}]")
    assert_same_weights(inline, layout, atol=1e-6)
