"""Hard-negative mining: chunked retrieval against full-matrix topk, each recipe filter on constructed scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from f2llm.evaluation.data import DataFormatError
from f2llm.mine import (
    MiningConfig,
    MiningInput,
    chunked_topk,
    load_mining_input,
    mine_hard_negatives,
    select_negatives,
    write_parquet,
)
from tests.helpers import LookupEncoder


# ----------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_queries", "n_docs", "k", "query_chunk", "corpus_chunk"),
    [(11, 103, 10, 4, 17), (1, 50, 50, 1, 7), (5, 9, 20, 2, 4), (6, 64, 5, 1024, 16384)],
)
def test_chunked_topk_equals_full_matrix_topk(n_queries, n_docs, k, query_chunk, corpus_chunk) -> None:
    gen = torch.Generator().manual_seed(n_docs)
    queries = torch.randn(n_queries, 24, generator=gen)
    corpus = torch.randn(n_docs, 24, generator=gen)
    scores, indices = chunked_topk(queries, corpus, k, corpus_chunk_size=corpus_chunk, query_chunk_size=query_chunk)
    full = queries.double() @ corpus.double().T
    ref_scores, ref_indices = torch.topk(full, min(k, n_docs), dim=1)
    assert scores.shape == indices.shape == (n_queries, min(k, n_docs))
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)


def test_chunked_topk_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match=r"queries \(2, 3\) and corpus \(4, 5\)"):
        chunked_topk(torch.zeros(2, 3), torch.zeros(4, 5), 2)


# ----------------------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------------------
def test_select_negatives_applies_each_filter() -> None:
    # rank:     0     1     2     3     4     5     6     7     8     9     10    11    12    13
    scores = [0.99, 0.95, 0.90, 0.88, 0.86, 0.85, 0.79, 0.70, 0.66, 0.60, 0.55, 0.50, 0.45, 0.40]
    indices = list(range(100, 114))
    documents = {i: f"doc {i}" for i in indices}
    documents[110] = "the positive's text"  # a duplicate of the positive under another id
    config = MiningConfig(depth=14, skip_top=5, max_score=0.8, max_positive_ratio=0.95, num_negatives=3)
    negatives, filled = select_negatives(
        indices,
        scores,
        positive_score=0.7,  # 0.95 x 0.7 = 0.665: ranks 6 (0.79) and 7 (0.70) are too close to the positive
        excluded={109},  # the positive itself (or another positive of the query)
        excluded_texts={"the positive's text"},
        documents=documents,
        config=config,
    )
    # ranks 0-4 skipped; 5 (0.85) >= 0.8; 6, 7 >= 0.665; 8 (0.66) kept; 9 positive; 10 same text; 11, 12 kept
    assert negatives == [108, 111, 112]
    assert not filled


def test_select_negatives_skips_top_ranks_that_pass_every_other_filter() -> None:
    scores = [0.50, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43]
    negatives, _ = select_negatives(
        list(range(8)),
        scores,
        positive_score=0.9,
        excluded=set(),
        excluded_texts=set(),
        documents=[str(i) for i in range(8)],
        config=MiningConfig(depth=8, skip_top=5, num_negatives=2),
    )
    assert negatives == [5, 6]


def test_select_negatives_absolute_threshold_binds_for_strong_positive() -> None:
    config = MiningConfig(depth=6, skip_top=0, num_negatives=2)
    negatives, _ = select_negatives(
        [0, 1, 2, 3],
        [0.81, 0.80, 0.79, 0.5],
        positive_score=0.99,
        excluded=set(),
        excluded_texts=set(),
        documents=["a", "b", "c", "d"],
        config=config,
    )
    assert negatives == [2, 3]  # 0.80 is not below 0.8


def test_select_negatives_shortfall_policies() -> None:
    scores = [0.5 - 0.01 * r for r in range(12)]
    docs = [str(i) for i in range(12)]
    common = dict(positive_score=0.9, excluded=set(), excluded_texts=set(), documents=docs)
    drop = MiningConfig(depth=6, skip_top=2, num_negatives=5, shortfall="drop", fill_depth=12)
    negatives, filled = select_negatives(list(range(12)), scores, config=drop, **common)
    assert negatives == [2, 3, 4, 5] and not filled  # only 4 inside the top 6
    fill = MiningConfig(depth=6, skip_top=2, num_negatives=5, shortfall="fill", fill_depth=12)
    negatives, filled = select_negatives(list(range(12)), scores, config=fill, **common)
    assert negatives == [2, 3, 4, 5, 6] and filled


def test_mining_config_validation() -> None:
    with pytest.raises(ValueError, match="skip_top"):
        MiningConfig(depth=5, skip_top=5)
    with pytest.raises(ValueError, match="fill_depth"):
        MiningConfig(depth=100, shortfall="fill", fill_depth=50)


# ----------------------------------------------------------------------------------------------------------
# End to end on constructed embeddings
# ----------------------------------------------------------------------------------------------------------
def _vector_with_cosine(cosine: float, axis: int, dim: int = 64) -> np.ndarray:
    """A unit vector whose cosine with e_0 is ``cosine`` (orthogonal part along e_axis)."""
    v = np.zeros(dim)
    v[0] = cosine
    v[axis] = np.sqrt(1 - cosine**2)
    return v


def _constructed_case() -> tuple[MiningInput, dict[str, np.ndarray]]:
    cosines = [0.99, 0.97, 0.95, 0.93, 0.91, 0.85, 0.75, 0.60, 0.55, 0.50, 0.45, 0.40]
    docs = [f"doc cos {c}" for c in cosines] + ["the positive", "far away"]
    table = {d: _vector_with_cosine(c, axis=i + 1) for i, (d, c) in enumerate(zip(docs, cosines, strict=False))}
    table["the positive"] = _vector_with_cosine(0.7, axis=40)  # 0.95 x 0.7 = 0.665
    table["far away"] = _vector_with_cosine(-0.5, axis=41)
    table["query"] = _vector_with_cosine(1.0, axis=42)
    table["lonely query"] = _vector_with_cosine(0.0, axis=43)  # every document scores ~0 or below against it
    positive = docs.index("the positive")
    data = MiningInput(documents=docs, queries=["query", "lonely query"], rows=[(0, positive), (1, positive)])
    return data, table


def test_mine_constructed_case_and_report() -> None:
    data, table = _constructed_case()
    config = MiningConfig(depth=14, skip_top=5, num_negatives=3)
    encoder = LookupEncoder(table)
    result, report = mine_hard_negatives(encoder, data, config, instruction="Find it", show_progress=False)
    # ranks 0-4 (0.99 .. 0.91) skipped; 0.85 >= 0.8; 0.75 and the positive (0.7) out; 0.60, 0.55, 0.50 kept
    assert result.column_names == ["query", "passage", "negative_1", "negative_2", "negative_3"]
    assert result.to_pylist() == [
        {
            "query": "query",
            "passage": "the positive",
            "negative_1": "doc cos 0.6",
            "negative_2": "doc cos 0.55",
            "negative_3": "doc cos 0.5",
        }
    ]
    # "lonely query": every document scores 0, none below 0.95 x its positive's 0: the row is dropped
    assert (report.rows_in, report.rows_written, report.rows_dropped) == (2, 1, 1)
    assert "1 dropped" in report.summary()
    instructions = {tuple(texts): instr for texts, instr in encoder.calls}
    assert instructions[tuple(data.documents)] is None and instructions[tuple(data.queries)] == "Find it"


def test_mine_fill_policy_reaches_past_depth() -> None:
    data, table = _constructed_case()
    data.rows = [(0, data.rows[0][1])]
    config = MiningConfig(depth=8, skip_top=5, num_negatives=3, shortfall="fill", fill_depth=14)
    result, report = mine_hard_negatives(LookupEncoder(table), data, config, show_progress=False)
    assert result.column("negative_3").to_pylist() == ["doc cos 0.5"]  # rank 10, past depth 8
    assert (report.rows_written, report.rows_filled) == (1, 1)
    drop = MiningConfig(depth=8, skip_top=5, num_negatives=3)
    result, report = mine_hard_negatives(LookupEncoder(table), data, drop, show_progress=False)
    assert result.num_rows == 0 and report.rows_dropped == 1


def test_mine_reuses_cached_corpus(tmp_path: Path) -> None:
    data, table = _constructed_case()
    encoder = LookupEncoder(table)
    config = MiningConfig(depth=14, skip_top=5, num_negatives=3)
    first, _ = mine_hard_negatives(encoder, data, config, cache_dir=tmp_path, model_key="m", show_progress=False)
    again, _ = mine_hard_negatives(encoder, data, config, cache_dir=tmp_path, model_key="m", show_progress=False)
    assert len(encoder.calls) == 2  # documents and queries, once each
    assert first.equals(again)


def test_positives_of_other_rows_of_the_same_query_are_excluded() -> None:
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(30)]
    table = {d: rng.standard_normal(8) for d in docs}
    table["q"] = table["d3"] + table["d7"] + table["d11"]  # every positive scores well above 0
    data = MiningInput(documents=docs, queries=["q"], rows=[(0, 3), (0, 7), (0, 11)])
    config = MiningConfig(depth=30, skip_top=0, max_score=1.1, max_positive_ratio=10.0, num_negatives=20)
    result, _ = mine_hard_negatives(LookupEncoder(table), data, config, show_progress=False)
    assert result.num_rows == 3
    for row in result.to_pylist():
        negatives = {v for k, v in row.items() if k.startswith("negative_")}
        assert len(negatives) == 20 and not negatives & {"d3", "d7", "d11"}


# ----------------------------------------------------------------------------------------------------------
# Inputs and output
# ----------------------------------------------------------------------------------------------------------
def test_load_pairs_input_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"query": "q1", "passage": "p1", "negative_1": "old"},
        {"query": "q2", "passage": "p2"},
        {"query": "q1", "passage": "p3"},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [r["query"] for r in rows], "passage": [r["passage"] for r in rows]}), parquet)
    for path in (jsonl, parquet):
        data = load_mining_input(path)
        assert data.queries == ["q1", "q2"] and data.documents == ["p1", "p2", "p3"]
        assert data.rows == [(0, 0), (1, 1), (0, 2)]
        assert data.positives == {0: {0, 2}, 1: {1}}


def test_load_beir_input_one_row_per_graded_positive(tmp_path: Path) -> None:
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": "a", "title": "T", "text": "alpha"}, {"_id": "b", "text": "beta"}, {"_id": "c", "text": "gamma"}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text('{"_id": "1", "text": "first"}\n{"_id": "2", "text": "second"}\n')
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\ta\t1\n1\tc\t2\n2\tb\t0\n2\tc\t1\n")
    data = load_mining_input(root, "train")
    assert data.documents == ["T alpha", "beta", "gamma"]
    assert data.queries == ["first", "second"]
    assert data.rows == [(0, 0), (0, 2), (1, 2)]  # the grade-0 judgement is not a positive


def test_bad_inputs_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "q", "passage": "p"}\n{"query": "q2"}\n')
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl:2: missing field\(s\) \['passage'\]"):
        load_mining_input(bad)
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["q"], "passage": ["p"]}), parquet)
    with pytest.raises(DataFormatError, match=r"pairs\.parquet: missing column\(s\) \['query'\]"):
        load_mining_input(parquet)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mining_input(tmp_path / "nowhere")


def test_write_parquet_round_trip(tmp_path: Path) -> None:
    data, table = _constructed_case()
    result, _ = mine_hard_negatives(
        LookupEncoder(table), data, MiningConfig(depth=14, skip_top=5, num_negatives=3), show_progress=False
    )
    path = write_parquet(result, tmp_path / "out" / "mined.parquet")
    assert pq.read_table(path).equals(result)
