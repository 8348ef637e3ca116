"""Benchmark and check the fused pooling + L2-normalization op (f2llm.kernels.pool).

Commands:
    python benchmarks/bench_pooling.py --check            # correctness vs float64 at real sizes (CUDA) or small (CPU)
    python benchmarks/bench_pooling.py                    # CUDA: time + peak memory grid, bandwidth vs device copy
    python benchmarks/bench_pooling.py --cpu              # CPU: pytest-benchmark of the CPU path vs the reference
    python benchmarks/bench_pooling.py --cpu --quick      # seconds; what CI runs
Each writes JSON and markdown under --out (default benchmarks/results/local).

On CUDA, for every (B, L, D) in {64, 512} x {512, 2048} x {1024, 2560}, bf16, it times (median of
triton.testing.do_bench) forward and forward+backward of: ours (Triton), the PyTorch reference (the op's
definition, float32 math) and the sentence-transformers style eager code (mask-multiply-sum in the input dtype,
then F.normalize). Bandwidth = bytes that must move (hidden read once, output written) / time, against a device
copy of the same tensor measured in the same process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    cuda_median_ms,
    cuda_peak_extra_mib,
    is_oom,
    kernel_benchmark_parser,
    rel_err,
    write_results,
)

from f2llm.kernels import pool
from f2llm.kernels.pooling import MODES, pool_reference
from f2llm.kernels.utils import triton_interpreting


# ------------------------------------------------------------------------------------------------ helpers
def sbert_style_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling as sentence-transformers writes it (input dtype), then normalization."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    return F.normalize(summed / m.sum(1).clamp_min(1e-9), dim=-1)


def make_inputs(B: int, L: int, D: int, dtype: torch.dtype, device: str, layout: str, full: bool = False):
    """Fresh random states; lengths uniform in [1, L] (or all L when full)."""
    g = torch.Generator(device="cpu").manual_seed(B * 7 + L * 3 + D)
    lengths = torch.full((B,), L) if full else torch.randint(1, L + 1, (B,), generator=g)
    if layout == "packed":
        hidden = torch.randn(int(lengths.sum()), D, generator=g).to(device=device, dtype=dtype)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        return hidden, {"cu_seqlens": cu.to(device)}
    hidden = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long().to(device)
    return hidden, {"attention_mask": mask}


# ------------------------------------------------------------------------------------------------ check
def run_check(device: str, out: Path) -> bool:
    backends = ["triton", "torch"] if device == "cuda" or triton_interpreting() else ["torch"]
    if device == "cuda":
        sizes = [(64, 2048, 1024), (512, 512, 2560), (3, 1000, 1000)]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        sizes = [(8, 64, 384), (3, 17, 97)]
        dtypes = [torch.float32, torch.bfloat16]
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    rows, ok = [], True
    for B, L, D in sizes:
        for layout in ("padded", "packed"):
            for dtype in dtypes:
                hidden, layout_args = make_inputs(B, L, D, dtype, device, layout)
                for mode in MODES:
                    ref_in = hidden.double().requires_grad_()
                    ref = pool_reference(ref_in, mode=mode, **layout_args)
                    grad_out = torch.randn_like(ref)
                    ref.backward(grad_out)
                    for backend in backends:
                        x = hidden.clone().requires_grad_()
                        y = pool(x, mode=mode, backend=backend, **layout_args)
                        y.backward(grad_out.to(dtype))
                        fwd, bwd = rel_err(y, ref), rel_err(x.grad, ref_in.grad)
                        passed = fwd < tol[dtype] and bwd < tol[dtype]
                        ok &= passed
                        rows.append(
                            {"B": B, "L": L, "D": D, "layout": layout, "dtype": str(dtype).split(".")[-1],
                             "mode": mode, "backend": backend, "fwd_rel_err": fwd, "bwd_rel_err": bwd,
                             "pass": "PASS" if passed else "FAIL"}
                        )  # fmt: skip
                    del ref_in, ref
    cols = ["B", "L", "D", "layout", "dtype", "mode", "backend", "fwd_rel_err", "bwd_rel_err", "pass"]
    write_results(out, f"pooling_check_{device}", rows, cols, f"pooling correctness vs float64 ({device})")
    print("pooling check:", "ALL PASS" if ok else "FAILURES")
    return ok


# ------------------------------------------------------------------------------------------------ CUDA timing
def time_cuda_case(fn, hidden: torch.Tensor) -> dict:
    """Median forward and forward+backward time, and peak memory of forward+backward beyond the inputs."""
    x = hidden.clone().requires_grad_()
    grad = torch.randn(hidden.shape[0], hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)

    def fwd_bwd() -> None:
        fn(x).backward(grad)

    try:
        fwd_ms = cuda_median_ms(lambda: fn(hidden))
        fwd_bwd_ms = cuda_median_ms(fwd_bwd, grad_to_none=[x])
        x.grad = None
        peak = cuda_peak_extra_mib(fwd_bwd)
    except Exception as e:
        if not is_oom(e):
            raise
        torch.cuda.empty_cache()
        return {"fwd_ms": "OOM", "fwd_bwd_ms": "OOM"}
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_extra_mib": peak}


def run_cuda(out: Path, quick: bool) -> None:
    sizes = [(64, 512, 1024)] if quick else [(b, l, d) for b in (64, 512) for l in (512, 2048) for d in (1024, 2560)]
    dtype = torch.bfloat16
    rows = []
    for B, L, D in sizes:
        hidden, args = make_inputs(B, L, D, dtype, "cuda", "padded", full=True)
        mask = args["attention_mask"]
        copy_ms = cuda_median_ms(lambda h=hidden: torch.empty_like(h).copy_(h))
        copy_bw = 2 * hidden.numel() * hidden.element_size() / copy_ms / 1e6  # GB/s, bytes read + written
        for mode in ("mean", "last"):
            impls = {
                "f2llm": lambda h, m=mode, k=mask: pool(h, k, mode=m),
                "reference": lambda h, m=mode, k=mask: pool_reference(h, k, mode=m),
            }
            if mode == "mean":
                impls["sbert-style"] = lambda h, k=mask: sbert_style_mean(h, k)
            # Bytes a pooling pass must move: mean reads all of hidden, last one row per sequence; output written.
            read = hidden.numel() * hidden.element_size() if mode == "mean" else B * D * hidden.element_size()
            moved = read + B * D * hidden.element_size()
            case_rows = []
            for name, fn in impls.items():
                row = {"B": B, "L": L, "D": D, "mode": mode, "impl": name, "copy_GBps": copy_bw}
                row.update(time_cuda_case(fn, hidden))
                if isinstance(row["fwd_ms"], float):
                    row["fwd_GBps"] = moved / row["fwd_ms"] / 1e6
                    row["fwd_pct_copy_bw"] = 100 * row["fwd_GBps"] / copy_bw
                case_rows.append(row)
            ref_ms = case_rows[1]["fwd_bwd_ms"]
            for row in case_rows:
                if isinstance(row["fwd_bwd_ms"], float) and isinstance(ref_ms, float):
                    row["fwd_bwd_speedup_vs_ref"] = ref_ms / row["fwd_bwd_ms"]
            rows += case_rows
        hidden = mask = args = None  # free before the next size
        torch.cuda.empty_cache()
    cols = ["B", "L", "D", "mode", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_speedup_vs_ref", "peak_extra_mib",
            "fwd_GBps", "fwd_pct_copy_bw", "copy_GBps"]  # fmt: skip
    write_results(out, "pooling_cuda", rows, cols, "pooling (bf16, CUDA): time, memory, bandwidth")


# ------------------------------------------------------------------------------------------------ CPU timing
CPU_SIZES = {"quick": [(8, 64, 64)], "full": [(32, 256, 384), (64, 512, 1024)]}


def cpu_cases() -> list[tuple]:
    quick = os.environ.get("F2LLM_BENCH_QUICK") == "1"
    return [
        (B, L, D, mode, impl)
        for B, L, D in CPU_SIZES["quick" if quick else "full"]
        for mode in ("mean", "last")
        for impl in ("f2llm-cpu", "reference")
    ]


def _bench_id(case: tuple) -> str:
    return "-".join(map(str, case))


def pytest_generate_tests(metafunc) -> None:  # pytest hook: parametrize over CPU cases when run by run_cpu()
    if "cpu_case" in metafunc.fixturenames:
        metafunc.parametrize("cpu_case", cpu_cases(), ids=_bench_id)


def test_cpu_fwd_bwd(benchmark, cpu_case) -> None:
    """pytest-benchmark case: forward + backward of one implementation on CPU, fp32."""
    B, L, D, mode, impl = cpu_case
    hidden, args = make_inputs(B, L, D, torch.float32, "cpu", "padded")
    x = hidden.requires_grad_()
    grad = torch.randn(B, D)
    fn = pool if impl == "f2llm-cpu" else pool_reference
    benchmark.group = f"B{B} L{L} D{D} {mode}"

    def run() -> None:
        x.grad = None
        fn(x, mode=mode, **args).backward(grad)

    benchmark(run)


def run_cpu(out: Path, quick: bool) -> None:
    import pytest

    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pooling_cpu_pytest_benchmark.json"
    env = dict(os.environ, F2LLM_BENCH_QUICK="1" if quick else "0")
    os.environ.update(env)
    # -p no:xdist: pytest-benchmark disables itself under xdist (and this may run inside an xdist worker).
    args = [__file__, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--benchmark-enable", "--benchmark-only",
            f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]  # fmt: skip
    if quick:
        args += ["--benchmark-min-rounds=2", "--benchmark-max-time=0.05", "--benchmark-warmup=off"]
    code = pytest.main(args)
    if code != 0:
        raise SystemExit(f"bench_pooling: pytest-benchmark failed with exit code {code}")
    stats = json.loads(raw.read_text())["benchmarks"]
    median = {tuple(b["params"]["cpu_case"]): b["stats"]["median"] for b in stats}
    rows = []
    for (B, L, D, mode, impl), t in sorted(median.items()):
        if impl != "f2llm-cpu":
            continue
        ref = median[(B, L, D, mode, "reference")]
        rows.append({"B": B, "L": L, "D": D, "mode": mode, "f2llm_cpu_ms": t * 1e3, "reference_ms": ref * 1e3,
                     "speedup": ref / t})  # fmt: skip
    cols = ["B", "L", "D", "mode", "f2llm_cpu_ms", "reference_ms", "speedup"]
    write_results(out, "pooling_cpu", rows, cols, "pooling fwd+bwd on CPU (fp32, median): CPU path vs reference")


def main(argv: list[str] | None = None) -> int:
    parser = kernel_benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.check:
        return 0 if run_check(device, args.out) else 1
    if device == "cuda":
        run_cuda(args.out, args.quick)
    else:
        run_cpu(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
