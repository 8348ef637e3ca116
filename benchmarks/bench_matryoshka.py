"""What Matryoshka costs: F2LLM v2's 8 levels in one fused op vs one level, and vs v2's plain-PyTorch loop.

Commands (from the repository root):
    python benchmarks/bench_matryoshka.py                # CUDA: bf16, B in {4096, 16384}, N in {16384, 65536}
    python benchmarks/bench_matryoshka.py --quick        # CUDA: B=1024 N=4096 (smoke test, seconds)
    python benchmarks/bench_matryoshka.py --cpu          # CPU: fp32, B=N=4096 (a few minutes on 2 cores)
    python benchmarks/bench_matryoshka.py --cpu --quick  # CPU: B=N=256 D=128 (seconds; the suite's dry run)
    python benchmarks/bench_matryoshka.py --check        # CUDA: fused levels vs v2's loop in float64, bf16/fp32
    python benchmarks/bench_matryoshka.py --check --cpu  # CPU: same at small sizes, D=97 (Triton too under
                                                         #      TRITON_INTERPRET=1)
    python benchmarks/bench_matryoshka.py --cpu-case infonce:fused --B 4096 --N 4096 --D 1024   # one case, JSON
Writes matryoshka_<device>.json and .md under --out (default benchmarks/results/local).

D = 1024 with v2's 8 levels 1024, 512, ..., 8 (matryoshka_levels(1024, [8, ..., 512])) and v2's weights
1 / (n sqrt(D / d_n)); L2-normalized random inputs, random targets, temperature 0.05. Implementations, for the
in-batch op (``infonce``: q [B, D] against c [N, D]) and the hard-negative op (``grouped_infonce``: each of B queries
against its own G = 8 docs):

* ``single``: the fused op, one level (no Matryoshka): what a step pays today;
* ``fused``: the fused op with the 8 levels (``matryoshka_dims`` / ``matryoshka_weights``), one call;
* ``loop``: what v2's code does, per level ``F.normalize`` of the prefixes, the full logits ``q @ c.T / T`` (or the
  [B, G] group scores) and ``F.cross_entropy``, weighted and summed.

For each: forward+backward time (the inputs require grad, as in training) and peak memory beyond the inputs
(including the q and c gradients, the same for all). CUDA: median of ``triton.testing.do_bench``, peak by
``max_memory_allocated``; an implementation that runs out of memory is recorded as OOM. CPU: each implementation
in its own fresh subprocess (the two ops' three implementations alternating, ``--rounds`` times): peak resident
memory of the first forward+backward beyond the resident memory before it, then the median of ``--repeats`` more
(the subprocesses run with MALLOC_MMAP_THRESHOLD_=65536, as in bench_contrastive.py, and ``--threads`` torch
threads, default 1: on a small shared machine a second OpenMP thread waiting for a busy core makes each small op
wait, 15 ms instead of 0.1 ms for a [93, 4096] multiply measured here, which swamps code of many small ops).
Ratios are against ``single`` of the same op and size; ``loss_rel_diff`` is |loss - loss of loop| / loss of loop
(fused and loop compute the same loss). Targets: fused <= 1.3x single's time with about its extra memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_contrastive import cpu_case_env, make_inputs, time_cuda_case
from common import (
    cpu_loss_fwd_bwd,
    kernel_benchmark_parser,
    rel_err,
    run_json_subprocess,
    write_results,
)

from f2llm.kernels import grouped_infonce, infonce, matryoshka_levels
from f2llm.kernels.utils import triton_interpreting

TEMPERATURE = 0.05
D_FULL = 1024
DIMS, WEIGHTS = matryoshka_levels(D_FULL)  # v2's defaults: 1024, 512, ..., 8
GROUP = 8  # docs per query of the hard-negative op: the positive + 7 hard negatives, as in the recipe
IMPLS = ("single", "fused", "loop")
OPS = ("infonce", "grouped")
TARGET_TIME_VS_SINGLE = 1.3
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def loss_fns(op: str, D: int) -> dict[str, LossFn]:
    """The three implementations of ``op`` as f(q, c or docs, targets) -> loss."""
    dims, weights = matryoshka_levels(D)
    if op == "infonce":

        def loop(q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            total = 0.0
            for d, w in zip(dims, weights, strict=True):
                logits = F.normalize(q[:, :d], dim=-1) @ F.normalize(c[:, :d], dim=-1).T / TEMPERATURE
                total = total + w * F.cross_entropy(logits, targets)
            return total

        return {
            "single": lambda q, c, t: infonce(q, c, t, TEMPERATURE),
            "fused": lambda q, c, t: infonce(q, c, t, TEMPERATURE, matryoshka_dims=dims, matryoshka_weights=weights),
            "loop": loop,
        }

    def grouped_loop(q: torch.Tensor, docs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = 0.0
        zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for d, w in zip(dims, weights, strict=True):
            scores = torch.einsum("bd,bgd->bg", F.normalize(q[:, :d], dim=-1), F.normalize(docs[..., :d], dim=-1))
            total = total + w * F.cross_entropy(scores / TEMPERATURE, zeros)
        return total

    return {
        "single": lambda q, docs, t: grouped_infonce(q, docs, TEMPERATURE),
        "fused": lambda q, docs, t: grouped_infonce(
            q, docs, TEMPERATURE, matryoshka_dims=dims, matryoshka_weights=weights
        ),
        "loop": grouped_loop,
    }


def op_inputs(op: str, B: int, N: int, D: int, dtype: torch.dtype, device: str):
    """(q, c, targets) for infonce; (q, docs [B, GROUP, D], targets unused) for grouped."""
    if op == "infonce":
        return make_inputs(B, N, D, dtype, device, seed=B + N + D)
    g = torch.Generator(device=device).manual_seed(B + D)
    q = F.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    docs = F.normalize(torch.randn(B, GROUP, D, generator=g, device=device), dim=-1).to(dtype)
    return q, docs, torch.zeros(B, dtype=torch.long, device=device)


def add_ratios(rows: list[dict]) -> None:
    """time / memory vs ``single`` and the loss's relative difference from ``loop``, per (op, size)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["op"], row["B"], row["N"], row["D"]), {})[row["impl"]] = row
    for group in by_key.values():
        single, loop = group.get("single", {}), group.get("loop", {})
        for row in group.values():
            for base, ratio in (("fwd_bwd_ms", "time_vs_single"), ("peak_extra_mib", "mem_vs_single")):
                if isinstance(row.get(base), float) and isinstance(single.get(base), float) and single[base] > 0:
                    row[ratio] = row[base] / single[base]
            if row["impl"] != "single" and isinstance(row.get("loss"), float) and isinstance(loop.get("loss"), float):
                row["loss_rel_diff"] = abs(row["loss"] - loop["loss"]) / abs(loop["loss"])


def summary(rows: list[dict]) -> dict:
    """Per (op, size): fused's and loop's time and memory vs single, and whether fused meets the time target."""
    out = []
    for row in rows:
        if row["impl"] == "single":
            continue
        out.append({k: row.get(k) for k in ("op", "B", "N", "D", "impl", "time_vs_single", "mem_vs_single")})
        if row["impl"] == "fused" and isinstance(row.get("time_vs_single"), float):
            out[-1]["meets_time_target"] = row["time_vs_single"] <= TARGET_TIME_VS_SINGLE
    return {"levels": list(DIMS), "weights": list(WEIGHTS), "target_time_vs_single": TARGET_TIME_VS_SINGLE,
            "ratios": out}  # fmt: skip


# ------------------------------------------------------------------------------------------------ check
def run_check(device: str, out: Path) -> bool:
    """The fused op with levels (every backend, bf16 and fp32) vs v2's loop in float64: loss and gradients."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    if device == "cuda":
        backends, sizes = ["triton", "torch"], {"infonce": (4096, 16384, D_FULL), "grouped": (4096, GROUP, D_FULL)}
    else:  # D not a power of two: levels 97, 64, 32, 16, 8
        backends = ["torch", "triton"] if triton_interpreting() else ["torch"]
        sizes = {"infonce": (64, 200, 97), "grouped": (16, GROUP, 97)}
    rows, ok = [], True
    for op, (B, N, D) in sizes.items():
        dims, weights = matryoshka_levels(D)
        fused = infonce if op == "infonce" else lambda q, c, t, T, **kw: grouped_infonce(q, c, T, **kw)
        for dtype in tol:
            q, c, targets = op_inputs(op, B, N, D, dtype, device)
            rq, rc = q.double().requires_grad_(), c.double().requires_grad_()
            ref = loss_fns(op, D)["loop"](rq, rc, targets)
            ref.backward()
            for backend in backends:
                qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
                loss = fused(qq, cc, targets, TEMPERATURE, matryoshka_dims=dims, matryoshka_weights=weights,
                             backend=backend)  # fmt: skip
                loss.backward()
                errs = [rel_err(loss, ref), rel_err(qq.grad, rq.grad), rel_err(cc.grad, rc.grad)]
                row = {"case": f"{op} {str(dtype).removeprefix('torch.')} {backend}", "B": B, "N": N, "D": D,
                       "levels": len(dims), "loss_rel_err": errs[0], "grad_rel_err": max(errs[1:]),
                       "tol": tol[dtype], "pass": "PASS" if max(errs) < tol[dtype] else "FAIL"}  # fmt: skip
                ok &= row["pass"] == "PASS"
                rows.append(row)
                print(row, flush=True)
    cols = ["case", "B", "N", "D", "levels", "loss_rel_err", "grad_rel_err", "tol", "pass"]
    write_results(out, f"matryoshka_check_{device}", rows, cols, f"Matryoshka ops vs v2's loop in float64 ({device})")
    print("matryoshka check:", "ALL PASS" if ok else "FAILURES")
    return ok


COLUMNS = ["op", "B", "N", "D", "impl", "fwd_bwd_ms", "time_vs_single", "peak_extra_mib", "mem_vs_single",
           "loss", "loss_rel_diff"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ CUDA
def run_cuda(out: Path, quick: bool) -> None:
    sizes = [(1024, 4096)] if quick else [(4096, 16384), (4096, 65536), (16384, 65536)]
    cases = [("infonce", B, N) for B, N in sizes] + [("grouped", B, GROUP) for B in sorted({B for B, _ in sizes})]
    rows = []
    for op, B, N in cases:
        q, c, targets = op_inputs(op, B, N, D_FULL, torch.bfloat16, "cuda")
        for impl, fn in loss_fns(op, D_FULL).items():
            row = {"op": op, "B": B, "N": N, "D": D_FULL, "impl": impl, "levels": 1 if impl == "single" else len(DIMS)}
            row.update(time_cuda_case(fn, q, c, targets))
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
        del q, c, targets
        torch.cuda.empty_cache()
    add_ratios(rows)
    title = f"Matryoshka ({len(DIMS)} levels {DIMS[0]}..{DIMS[-1]}, bf16, CUDA): fwd+bwd time, peak extra memory"
    write_results(out, "matryoshka_cuda", rows, COLUMNS, title, extra={"summary": summary(rows)})


# ------------------------------------------------------------------------------------------------ CPU
def run_cpu_case(case: str, B: int, N: int, D: int, repeats: int) -> dict:
    """One (op, implementation) in this process: peak extra memory of the first forward+backward, then timings."""
    op, impl = case.split(":")
    q, c, targets = op_inputs(op, B, N, D, torch.float32, "cpu")
    q.requires_grad_()
    c.requires_grad_()
    fn = loss_fns(op, D)[impl]
    return {"op": op, "impl": impl, "B": B, "N": N, "D": D, **cpu_loss_fwd_bwd(fn, q, c, targets, repeats)}


def run_cpu(out: Path, quick: bool, repeats: int, rounds: int, threads: int) -> None:
    B, N, D = (256, 256, 128) if quick else (4096, 4096, D_FULL)
    if quick:
        repeats, rounds = 1, 1
    script, env = str(Path(__file__).resolve()), {**cpu_case_env(), "OMP_NUM_THREADS": str(threads)}
    cases = [f"{op}:{impl}" for op in OPS for impl in IMPLS]
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(rounds):  # alternate the cases so that load from other processes hits all of them
        for case in cases:
            n = N if case.startswith("infonce") else GROUP
            argv = [script, "--cpu-case", case, "--B", str(B), "--N", str(n), "--D", str(D), "--repeats", str(repeats),
                    "--threads", str(threads)]  # fmt: skip
            results[case].append(run_json_subprocess(argv, timeout=1800, env=env))
            print(case, results[case][-1]["median_s"], "s", results[case][-1]["peak_extra_mib"], "MiB", flush=True)
    rows = []
    for case, runs in results.items():
        op, impl = case.split(":")
        times = sorted(t for r in runs for t in r["times_s"])
        rows.append({"op": op, "B": B, "N": runs[0]["N"], "D": D, "impl": impl, "levels": 1 if impl == "single" else
                     len(matryoshka_levels(D)[0]), "fwd_bwd_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0],
                     "runs": len(times), "peak_extra_mib": max(r["peak_extra_mib"] for r in runs),
                     "loss": runs[0]["loss"], "threads": runs[0]["threads"]})  # fmt: skip
    add_ratios(rows)
    dims, weights = matryoshka_levels(D)
    title = (f"Matryoshka ({len(dims)} levels {dims[0]}..{dims[-1]}, fp32, CPU torch paths, {threads} torch thread(s) "
             "per case): fwd+bwd, peak extra memory")  # fmt: skip
    write_results(out, "matryoshka_cpu", rows, [*COLUMNS[:6], "min_ms", "runs", *COLUMNS[6:]], title,
                  meta={"levels": list(dims), "weights": list(weights), "repeats": repeats, "rounds": rounds,
                        "threads": threads},
                  extra={"summary": summary(rows)})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = kernel_benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: subprocesses per implementation")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads of each case")
    parser.add_argument("--cpu-case", help="run one CPU case here (OP:IMPL, e.g. infonce:fused), print a JSON line")
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--D", type=int, default=D_FULL)
    args = parser.parse_args(argv)
    if args.cpu_case:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_cpu_case(args.cpu_case, args.B, args.N, args.D, args.repeats)))
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.check:
        return 0 if run_check(device, args.out) else 1
    if device == "cuda":
        run_cuda(args.out, args.quick)
    else:
        run_cpu(args.out, args.quick, args.repeats, args.rounds, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
