"""Hard-negative mining with an embedding model, as the F2LLM recipe describes it.

For each (query, positive) row: rank the corpus by cosine similarity to the query, take the top ``depth`` (100),
skip the first ``skip_top`` (5) ranks of that ranking (likely unlabelled positives), drop the query's positives (by
index and by identical text), drop documents scoring ``>= max_score`` (0.8) or ``>= max_positive_ratio`` (0.95) x
the positive's score, and keep the first ``num_negatives`` (24) that remain, in rank order.

Rows left with fewer than ``num_negatives`` are dropped and counted (``shortfall="drop"``, the default), or filled
from further down the ranking, up to rank ``fill_depth``, with the same filters (``shortfall="fill"``); a row still
short after filling is dropped and counted too. The ranking is computed by chunked matrix products with a running
``torch.topk`` per chunk, so the full query x corpus score matrix never exists in memory.

Inputs: a BEIR directory (``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/<split>.tsv``; positives are the
documents graded > 0), or an F2LLM-format parquet / JSON-lines file with ``query`` and ``passage`` columns (the
corpus is then the set of distinct passages). Output: F2LLM-format parquet with ``query``, ``passage``,
``negative_1`` .. ``negative_K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from f2llm.evaluation.data import DataFormatError, read_beir, read_jsonl
from f2llm.evaluation.encoding import TextEncoder, encode_cached

Shortfall = Literal["drop", "fill"]


@dataclass(frozen=True)
class MiningConfig:
    """The recipe's filters; every field can be changed."""

    depth: int = 100
    skip_top: int = 5
    max_score: float = 0.8
    max_positive_ratio: float = 0.95
    num_negatives: int = 24
    shortfall: Shortfall = "drop"
    fill_depth: int = 1000
    corpus_chunk_size: int = 16384
    query_chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 <= self.skip_top < self.depth:
            raise ValueError(f"need 0 <= skip_top < depth, got skip_top={self.skip_top}, depth={self.depth}")
        if self.shortfall not in ("drop", "fill"):
            raise ValueError(f"shortfall must be 'drop' or 'fill', got {self.shortfall!r}")
        if self.shortfall == "fill" and self.fill_depth < self.depth:
            raise ValueError(f"fill_depth ({self.fill_depth}) must be >= depth ({self.depth})")

    @property
    def ranking_depth(self) -> int:
        """How many ranks are retrieved per query."""
        return self.fill_depth if self.shortfall == "fill" else self.depth


@dataclass
class MiningInput:
    """Texts to mine from: ``rows[i] = (query index, positive document index)``.

    ``positives[q]`` holds every positive document of query ``q``; none of them is ever a negative of ``q``.
    """

    documents: list[str]
    queries: list[str]
    rows: list[tuple[int, int]]
    positives: dict[int, set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.positives:
            for q, d in self.rows:
                self.positives.setdefault(q, set()).add(d)


@dataclass
class MiningReport:
    rows_in: int = 0
    rows_written: int = 0
    rows_dropped: int = 0
    rows_filled: int = 0

    def summary(self) -> str:
        text = f"{self.rows_written} of {self.rows_in} rows written"
        if self.rows_filled:
            text += f"; {self.rows_filled} filled from beyond the top ranks"
        if self.rows_dropped:
            text += f"; {self.rows_dropped} dropped for lack of negatives"
        return text


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def load_beir_input(root: Path | str, split: str = "train") -> MiningInput:
    """Rows from a BEIR directory: one per (query, document graded > 0) of ``qrels/<split>.tsv``."""
    data = read_beir(root, split)
    doc_index = {d: i for i, d in enumerate(data.corpus_ids)}
    rows = []
    for qi, qid in enumerate(data.query_ids):
        rows.extend((qi, doc_index[did]) for did, grade in data.qrels[qid].items() if grade > 0)
    if not rows:
        raise DataFormatError(Path(root) / "qrels" / f"{split}.tsv", None, "no judgement with a grade > 0")
    return MiningInput(documents=data.documents(), queries=data.query_texts, rows=rows)


def load_pairs_input(path: Path | str) -> MiningInput:
    """Rows from an F2LLM-format parquet or JSON-lines file with ``query`` and ``passage`` columns.

    The corpus is the distinct passages; a query repeated on several rows has all their passages as positives.
    Existing ``negative_*`` columns are ignored (mining replaces them).
    """
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        missing = {"query", "passage"} - set(table.column_names)
        if missing:
            raise DataFormatError(path, None, f"missing column(s) {sorted(missing)}; columns: {table.column_names}")
        queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
        for row, (q, p) in enumerate(zip(queries, passages, strict=True)):
            if not isinstance(q, str) or not isinstance(p, str) or not q or not p:
                raise DataFormatError(path, None, f"row {row}: query and passage must be non-empty strings")
            pairs.append((q, p))
    elif path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        for line_no, obj in read_jsonl(path, required=("query", "passage")):
            q, p = obj["query"], obj["passage"]
            if not isinstance(q, str) or not isinstance(p, str) or not q or not p:
                raise DataFormatError(path, line_no, "query and passage must be non-empty strings")
            pairs.append((q, p))
    else:
        raise DataFormatError(path, None, "unsupported input; expected a BEIR directory, a .parquet or a .jsonl file")
    if not pairs:
        raise DataFormatError(path, None, "no rows")
    query_index: dict[str, int] = {}
    doc_index: dict[str, int] = {}
    rows = []
    for q, p in pairs:
        rows.append((query_index.setdefault(q, len(query_index)), doc_index.setdefault(p, len(doc_index))))
    return MiningInput(documents=list(doc_index), queries=list(query_index), rows=rows)


def load_mining_input(path: Path | str, split: str = "train") -> MiningInput:
    """A BEIR directory or an F2LLM-format file, by what ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return load_beir_input(path, split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return load_pairs_input(path)


# ----------------------------------------------------------------------------------------------------------
# Retrieval and filters
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    corpus_chunk_size: int = 16384,
    query_chunk_size: int = 1024,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` corpus rows by dot product for every query: ``(scores, indices)``, each ``[n_queries, k]``.

    At most ``query_chunk_size x corpus_chunk_size`` scores exist at once: each corpus chunk's top-k is merged
    into the running top-k. ``k`` is capped at the corpus size.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and corpus {tuple(corpus.shape)} must be [n, D] and [m, D]")
    k = min(k, corpus.shape[0])
    all_scores, all_indices = [], []
    n_chunks = -(-queries.shape[0] // query_chunk_size) * -(-corpus.shape[0] // corpus_chunk_size)
    bar = tqdm(total=n_chunks, desc="Ranking corpus", disable=not show_progress)
    for qs in range(0, queries.shape[0], query_chunk_size):
        q = queries[qs : qs + query_chunk_size]
        best_scores = q.new_empty((q.shape[0], 0))
        best_indices = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for cs in range(0, corpus.shape[0], corpus_chunk_size):
            scores = q @ corpus[cs : cs + corpus_chunk_size].T
            top_scores, top_idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            merged_indices = torch.cat([best_indices, top_idx + cs], dim=1)
            best_scores, order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
            best_indices = torch.gather(merged_indices, 1, order)
            bar.update(1)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    bar.close()
    return torch.cat(all_scores), torch.cat(all_indices)


def select_negatives(
    ranked_indices: Sequence[int],
    ranked_scores: Sequence[float],
    *,
    positive_score: float,
    excluded: set[int],
    excluded_texts: set[str],
    documents: Sequence[str],
    config: MiningConfig,
) -> tuple[list[int], bool]:
    """Apply the filters to one query's ranking; returns the negatives and whether ranks past ``depth`` were used."""
    threshold = min(config.max_score, config.max_positive_ratio * positive_score)
    negatives: list[int] = []
    filled = False
    for rank, (idx, score) in enumerate(zip(ranked_indices, ranked_scores, strict=True)):
        if rank < config.skip_top:
            continue
        if rank >= config.depth:
            if config.shortfall == "drop":
                break
            filled = True
        if idx in excluded or documents[idx] in excluded_texts or score >= threshold:
            continue
        negatives.append(idx)
        if len(negatives) == config.num_negatives:
            break
    return negatives, filled


def mine_hard_negatives(
    encoder: TextEncoder,
    data: MiningInput,
    config: MiningConfig | None = None,
    *,
    instruction: str | None = None,
    cache_dir: Path | str | None = None,
    model_key: str | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> tuple[pa.Table, MiningReport]:
    """Mine negatives for every row of ``data``; returns the F2LLM-format table and what happened to the rows.

    ``instruction`` is given to the encoder for queries only (decoder models); documents are encoded without one
    and, with ``cache_dir``, reuse embeddings cached by earlier runs or by evaluation (:func:`encode_cached`);
    ``model_key`` then names the weights (required with ``cache_dir``).
    """
    config = config or MiningConfig()
    if cache_dir is not None and not model_key:
        raise ValueError("mine_hard_negatives: cache_dir needs a model_key identifying the weights")
    model_key = model_key or ""
    doc_emb = encode_cached(
        encoder,
        data.documents,
        cache_dir=cache_dir,
        model_key=model_key,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    query_emb = encode_cached(
        encoder,
        data.queries,
        cache_dir=cache_dir,
        model_key=model_key,
        instruction=instruction,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    # The thresholds are cosine similarities: normalize whatever the encoder returned.
    docs = F.normalize(torch.from_numpy(np.ascontiguousarray(doc_emb)).float(), dim=-1)
    queries = F.normalize(torch.from_numpy(np.ascontiguousarray(query_emb)).float(), dim=-1)
    rows_of_query: dict[int, list[int]] = {}
    for row, (q, _) in enumerate(data.rows):
        rows_of_query.setdefault(q, []).append(row)
    negatives_of_row: list[list[int] | None] = [None] * len(data.rows)
    report = MiningReport(rows_in=len(data.rows))
    bar = tqdm(total=len(data.rows), desc="Mining negatives", disable=not show_progress)
    # Rankings are kept for one chunk of queries at a time: depth x queries Python lists would not fit otherwise.
    for qs in range(0, queries.shape[0], config.query_chunk_size):
        ranked_scores, ranked_indices = chunked_topk(
            queries[qs : qs + config.query_chunk_size],
            docs,
            config.ranking_depth,
            corpus_chunk_size=config.corpus_chunk_size,
            query_chunk_size=config.query_chunk_size,
        )
        scores_list, indices_list = ranked_scores.tolist(), ranked_indices.tolist()
        for offset in range(len(scores_list)):
            q = qs + offset
            excluded = data.positives.get(q, set())
            excluded_texts = {data.documents[d] for d in excluded}
            for row in rows_of_query.get(q, []):
                pos = data.rows[row][1]
                negatives, filled = select_negatives(
                    indices_list[offset],
                    scores_list[offset],
                    positive_score=float(queries[q] @ docs[pos]),
                    excluded=excluded,
                    excluded_texts=excluded_texts,
                    documents=data.documents,
                    config=config,
                )
                if len(negatives) < config.num_negatives:
                    report.rows_dropped += 1
                else:
                    report.rows_filled += int(filled)
                    report.rows_written += 1
                    negatives_of_row[row] = negatives
                bar.update(1)
    bar.close()

    columns: dict[str, list[str]] = {"query": [], "passage": []}
    columns.update({f"negative_{i + 1}": [] for i in range(config.num_negatives)})
    for (q, pos), negatives in zip(data.rows, negatives_of_row, strict=True):
        if negatives is None:
            continue
        columns["query"].append(data.queries[q])
        columns["passage"].append(data.documents[pos])
        for i, idx in enumerate(negatives):
            columns[f"negative_{i + 1}"].append(data.documents[idx])
    schema = pa.schema([(name, pa.string()) for name in columns])
    return pa.table(columns, schema=schema), report


def write_parquet(table: pa.Table, path: Path | str) -> Path:
    """Write the mined table (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
