"""Benchmark and check the fused contrastive loss (f2llm.kernels.infonce, f2llm.kernels.grouped_infonce).

Commands (from the repository root):
    python benchmarks/bench_contrastive.py --check          # CUDA: correctness vs float64 at real sizes, bf16/fp16/fp32
    python benchmarks/bench_contrastive.py                  # CUDA: time + peak memory grid vs reference and peers
    python benchmarks/bench_contrastive.py --quick          # CUDA: one small size (smoke test, seconds)
    python benchmarks/bench_contrastive.py --cpu            # CPU: chunked path vs naive, B=4096 N=32768 D=384
    python benchmarks/bench_contrastive.py --cpu --quick    # CPU: same at B=512 N=4096 D=64 (seconds; CI smoke)
    python benchmarks/bench_contrastive.py --check --cpu    # CPU: correctness at small sizes (torch path; Triton
                                                            #      too under TRITON_INTERPRET=1)
    python benchmarks/bench_contrastive.py --cpu-case chunked --B 4096 --N 32768 --D 64   # one case, JSON line
Each mode writes <name>.json and <name>.md under --out (default benchmarks/results/local).

CUDA grid: D in {1024, 2560}, B in {4096, 16384}, N in {B, 8B}, bf16, L2-normalized random inputs (fresh per
size), random targets, temperature 0.05. For each implementation: forward and forward+backward median time
(triton.testing.do_bench; the forward runs with inputs requiring grad, as in training), peak memory of
forward+backward beyond the inputs (includes the q and c gradients, the same for all), achieved TFLOP/s counting
8*B*N*D flop per forward+backward, and a bf16 q @ c.T matmul's TFLOP/s measured in the same run. An
implementation that runs out of memory is recorded as OOM. Implementations: ours (Triton), the PyTorch reference
(F.cross_entropy(q @ c.T / t, targets) in the input dtype), and, when installed: Liger's
LigerFusedLinearCrossEntropyLoss (weight = c, input = q / t), Inf-CL's cal_inf_loss (scale = 1 / t) and Cut
Cross-Entropy's linear_cross_entropy (exact variant: impl="cce_exact" where it exists, else filter_eps=None).

CPU mode: each implementation runs in its own subprocess (so peaks do not mix): peak resident memory of the first
forward+backward beyond the resident memory before it (VmHWM reset via /proc/self/clear_refs), then the median
time of --repeats more runs. Both include allocating q.grad and c.grad. The subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536 so that resident memory follows live tensors rather than glibc's heap caching.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    cpu_loss_fwd_bwd,
    cuda_median_ms,
    cuda_peak_extra_mib,
    is_oom,
    kernel_benchmark_parser,
    rel_err,
    run_json_subprocess,
    write_results,
)

from f2llm.kernels import grouped_infonce, grouped_infonce_reference, infonce, infonce_reference
from f2llm.kernels.utils import triton_interpreting

TEMPERATURE = 0.05
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(
    B: int, N: int, D: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalized random q [B, D], c [N, D] and random targets in [0, N)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    c = F.normalize(torch.randn(N, D, generator=g, device=device), dim=-1).to(dtype)
    targets = torch.randint(0, N, (B,), generator=g, device=device)
    return q, c, targets


def naive_loss(q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused baseline: the full [B, N] logits, then cross-entropy."""
    return F.cross_entropy(q @ c.T / TEMPERATURE, targets)


def ours_loss(q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return infonce(q, c, targets, TEMPERATURE)


# ------------------------------------------------------------------------------------------------ peers
def peer_losses(device: str) -> dict[str, LossFn]:
    """InfoNCE through the installed peer libraries (each import guarded)."""
    peers: dict[str, LossFn] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger-flce"] = lambda q, c, t: liger(c, q / TEMPERATURE, t)
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        pass
    else:
        scale = torch.tensor(1.0 / TEMPERATURE, device=device)
        peers["inf-cl"] = lambda q, c, t: cal_inf_loss(q, c, labels=t, scale=scale)
    try:
        from cut_cross_entropy import linear_cross_entropy
        from cut_cross_entropy.linear_cross_entropy import LinearCrossEntropyImpl
    except ImportError:
        pass
    else:
        exact = {"impl": "cce_exact"} if "CCE_EXACT" in LinearCrossEntropyImpl.__members__ else {"filter_eps": None}
        peers["cce-exact"] = lambda q, c, t: linear_cross_entropy(q / TEMPERATURE, c, t, **exact)
    return peers


# ------------------------------------------------------------------------------------------------ check
def _check_row(name: str, loss: torch.Tensor, ref: torch.Tensor, grads: list, ref_grads: list, tol: float) -> dict:
    errs = [rel_err(loss, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    return {
        "case": name,
        "loss_rel_err": errs[0],
        "grad_rel_err": max(errs[1:]),
        "tol": tol,
        "pass": "PASS" if max(errs) < tol else "FAIL",
    }


def run_check(device: str, out: Path) -> bool:
    """Loss and gradients of every backend vs the float64 reference; True when all pass."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
    if device == "cuda":
        backends = ["triton", "torch"]
        cases = [  # name, B, N, D, dtype, fp32_precision, mask_margin
            ("fp32", 4096, 32768, 1024, torch.float32, "ieee", None),
            ("fp32-tf32", 4096, 32768, 1024, torch.float32, "tf32", None),
            ("bf16", 4096, 32768, 2560, torch.bfloat16, "ieee", None),
            ("bf16-margin", 4096, 16384, 1024, torch.bfloat16, "ieee", 0.1),
            ("bf16-N>>B", 8, 131072, 2560, torch.bfloat16, "ieee", None),
            ("bf16-B>>N", 16384, 512, 1024, torch.bfloat16, "ieee", None),
            ("fp16", 2048, 8192, 1024, torch.float16, "ieee", None),
        ]
        grouped_cases = [(512, 8, 2560, torch.bfloat16), (512, 8, 2560, torch.float32), (16, 2, 1024, torch.float32)]
    else:
        backends = ["torch", "triton"] if triton_interpreting() else ["torch"]
        cases = [
            ("fp32", 64, 200, 97, torch.float32, "ieee", None),
            ("bf16-margin", 64, 200, 97, torch.bfloat16, "ieee", 0.1),
        ]
        grouped_cases = [(16, 8, 97, torch.float32), (16, 8, 97, torch.bfloat16)]
    rows, ok = [], True
    for name, B, N, D, dtype, precision, margin in cases:
        q, c, targets = make_inputs(B, N, D, dtype, device, seed=B + N + D)
        targets[::7] = -100  # some ignored queries
        rq, rc = q.double().requires_grad_(), c.double().requires_grad_()
        ref = infonce_reference(rq, rc, targets, TEMPERATURE, mask_margin=margin)
        ref.backward()
        for backend in backends:
            if backend == "torch" and precision == "tf32":
                continue
            qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
            loss = infonce(qq, cc, targets, TEMPERATURE, mask_margin=margin, backend=backend, fp32_precision=precision)
            loss.backward()
            case_tol = 5e-3 if precision == "tf32" else tol[dtype]
            row = _check_row(f"infonce {name} {backend}", loss, ref, [qq.grad, cc.grad], [rq.grad, rc.grad], case_tol)
            row.update(B=B, N=N, D=D)
            ok &= row["pass"] == "PASS"
            rows.append(row)
            print(row, flush=True)
        del q, c, rq, rc, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    for B, G, D, dtype in grouped_cases:
        g = torch.Generator(device=device).manual_seed(B + G + D)
        q = F.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
        docs = F.normalize(torch.randn(B, G, D, generator=g, device=device), dim=-1).to(dtype)
        rq, rd = q.double().requires_grad_(), docs.double().requires_grad_()
        ref = grouped_infonce_reference(rq, rd, TEMPERATURE)
        ref.backward()
        for backend in backends:
            qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
            loss = grouped_infonce(qq, dd, TEMPERATURE, backend=backend)
            loss.backward()
            row = _check_row(
                f"grouped {str(dtype).removeprefix('torch.')} {backend}",
                loss,
                ref,
                [qq.grad, dd.grad],
                [rq.grad, rd.grad],
                tol[dtype],
            )
            row.update(B=B, N=G, D=D)
            ok &= row["pass"] == "PASS"
            rows.append(row)
            print(row, flush=True)
    cols = ["case", "B", "N", "D", "loss_rel_err", "grad_rel_err", "tol", "pass"]
    write_results(out, f"contrastive_check_{device}", rows, cols, f"contrastive correctness vs float64 ({device})")
    print("contrastive check:", "ALL PASS" if ok else "FAILURES")
    return ok


# ------------------------------------------------------------------------------------------------ CUDA timing
def time_cuda_case(fn: LossFn, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> dict:
    """Median forward and forward+backward time and peak extra memory of forward+backward, or OOM."""
    qg, cg = q.clone().requires_grad_(), c.clone().requires_grad_()

    def fwd_bwd() -> None:
        fn(qg, cg, targets).backward()

    try:
        loss = float(fn(qg, cg, targets))
        fwd_ms = cuda_median_ms(lambda: fn(qg, cg, targets))
        fwd_bwd_ms = cuda_median_ms(fwd_bwd, grad_to_none=[qg, cg])
        qg.grad = cg.grad = None
        peak = cuda_peak_extra_mib(fwd_bwd)
    except Exception as exc:  # an OOM of one implementation is a result, anything else a bug
        if not is_oom(exc):
            raise
        del qg, cg
        torch.cuda.empty_cache()
        return {"fwd_ms": "OOM", "fwd_bwd_ms": "OOM", "peak_extra_mib": "OOM"}
    return {"loss": loss, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_extra_mib": peak}


def run_cuda(out: Path, quick: bool) -> None:
    sizes = (
        [(1024, 2048, 1024)] if quick else [(B, B * m, D) for D in (1024, 2560) for B in (4096, 16384) for m in (1, 8)]
    )
    impls: dict[str, LossFn] = {"f2llm": ours_loss, "reference": naive_loss, **peer_losses("cuda")}
    rows = []
    for B, N, D in sizes:
        q, c, targets = make_inputs(B, N, D, torch.bfloat16, "cuda", seed=B + N + D)
        flop = 8 * B * N * D
        try:
            mm_ms = cuda_median_ms(lambda q=q, c=c: q @ c.T)
            mm_tflops = 2 * B * N * D / mm_ms / 1e9
        except Exception as exc:
            if not is_oom(exc):
                raise
            mm_tflops = "OOM"
        torch.cuda.empty_cache()
        case_rows = []
        for name, fn in impls.items():
            row = {"B": B, "N": N, "D": D, "impl": name, "matmul_tflops": mm_tflops}
            row.update(time_cuda_case(fn, q, c, targets))
            if isinstance(row["fwd_bwd_ms"], float):
                row["tflops"] = flop / row["fwd_bwd_ms"] / 1e9
                if isinstance(mm_tflops, float):
                    row["pct_of_matmul"] = 100 * row["tflops"] / mm_tflops
            case_rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
        ref = case_rows[1]
        for row in case_rows:
            if isinstance(row["fwd_bwd_ms"], float) and isinstance(ref["fwd_bwd_ms"], float):
                row["speedup_vs_ref"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            if isinstance(row["peak_extra_mib"], float) and isinstance(ref["peak_extra_mib"], float):
                row["mem_vs_ref"] = row["peak_extra_mib"] / ref["peak_extra_mib"]
        rows += case_rows
        del q, c, targets
        torch.cuda.empty_cache()
    cols = ["B", "N", "D", "impl", "fwd_ms", "fwd_bwd_ms", "speedup_vs_ref", "peak_extra_mib", "mem_vs_ref", "tflops",
            "pct_of_matmul", "matmul_tflops", "loss"]  # fmt: skip
    write_results(out, "contrastive_cuda", rows, cols, "InfoNCE (bf16, CUDA, t=0.05): time, peak extra memory")


# ------------------------------------------------------------------------------------------------ CPU
def run_cpu_case(case: str, B: int, N: int, D: int, repeats: int) -> dict:
    """One implementation in this process: peak extra memory of the first forward+backward, then timings."""
    q, c, targets = make_inputs(B, N, D, torch.float32, "cpu")
    q.requires_grad_()
    c.requires_grad_()
    fn = ours_loss if case == "chunked" else naive_loss
    return {"case": case, "B": B, "N": N, "D": D, **cpu_loss_fwd_bwd(fn, q, c, targets, repeats)}


def cpu_case_env() -> dict[str, str]:
    """Environment of a --cpu-case subprocess. glibc's malloc raises its mmap threshold after large frees and
    then keeps freed tiles in its heap, so resident memory would show allocator caching on top of live tensors;
    a fixed threshold returns every block >= 64 KiB to the system on free (the same for both implementations)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def run_cpu(out: Path, quick: bool, repeats: int, rounds: int) -> None:
    B, N, D = (512, 4096, 64) if quick else (4096, 32768, 384)
    if quick:
        repeats, rounds = 1, 1
    results: dict[str, list[dict]] = {"naive": [], "chunked": []}
    script = str(Path(__file__).resolve())
    env = cpu_case_env()
    for _ in range(rounds):  # alternate the implementations so that load from other processes hits both
        for case in results:
            argv = [script, "--cpu-case", case, "--B", str(B), "--N", str(N), "--D", str(D), "--repeats", str(repeats)]
            results[case].append(run_json_subprocess(argv, timeout=1800, env=env))
    rows = []
    for case, runs in results.items():
        times = sorted(t for r in runs for t in r["times_s"])
        rows.append({"impl": case, "B": B, "N": N, "D": D, "loss": runs[0]["loss"],
                     "peak_extra_mib": max(r["peak_extra_mib"] for r in runs),
                     "median_s": times[len(times) // 2], "min_s": times[0], "runs": len(times)})  # fmt: skip
    naive, chunked = rows
    chunked["mem_ratio_naive_over_chunked"] = naive["peak_extra_mib"] / chunked["peak_extra_mib"]
    chunked["time_ratio_chunked_over_naive"] = chunked["median_s"] / naive["median_s"]
    cols = ["impl", "B", "N", "D", "peak_extra_mib", "median_s", "min_s", "runs", "mem_ratio_naive_over_chunked",
            "time_ratio_chunked_over_naive", "loss"]  # fmt: skip
    write_results(out, "contrastive_cpu", rows, cols, "InfoNCE fwd+bwd on CPU (fp32): chunked path vs naive")


def main(argv: list[str] | None = None) -> int:
    parser = kernel_benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: subprocesses per implementation")
    parser.add_argument("--cpu-case", choices=["chunked", "naive"], help="run one CPU case here, print a JSON line")
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--N", type=int, default=32768)
    parser.add_argument("--D", type=int, default=384)
    args = parser.parse_args(argv)
    if args.cpu_case:
        print(json.dumps(run_cpu_case(args.cpu_case, args.B, args.N, args.D, args.repeats)))
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.check:
        return 0 if run_check(device, args.out) else 1
    if device == "cuda":
        run_cuda(args.out, args.quick)
    else:
        run_cpu(args.out, args.quick, args.repeats, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
