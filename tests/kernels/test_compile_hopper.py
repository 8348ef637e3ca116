"""Every Triton kernel configuration the dispatch code can choose compiles for sm_90 (H100/H200) and sm_80 (A100)
without spills, within shared memory and registers, and with 16-bit / tf32 dots on the tensor cores.

benchmarks/bench_compile.py does the compiling (in subprocesses without TRITON_INTERPRET: a process that
imported triton under the interpreter cannot compile) and writes the table; the committed one is under
benchmarks/results/compile/. Here it runs into a temporary folder and every row is checked.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from f2llm.kernels import contrastive, matryoshka, pooling, utils
from tests.helpers import HANG_BOUND

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compile.py"
SMEM_PER_BLOCK = {"sm_90": 232448, "sm_80": 166912}


def jit_kernels() -> set[str]:
    """Names of every @triton.jit kernel launched from the host in f2llm's kernel modules (jit or interpreted)."""
    return {
        name
        for module in (contrastive, matryoshka, pooling, utils)
        for name, obj in inspect.getmembers(module)
        if isinstance(obj, triton.runtime.jit.KernelInterface) and name.endswith("_kernel")
    }


@pytest.fixture(scope="module")
def compile_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One process per architecture, side by side (each is about a minute of ptxas on one core).
    procs = {
        arch: subprocess.Popen(
            [sys.executable, str(BENCH), "--arch", arch, "--out", str(out / arch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for arch in ("90", "80")
    }
    rows = []
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=HANG_BOUND)
        report = out / arch / "compile.json"
        assert report.exists(), f"bench_compile.py --arch {arch} wrote nothing:\n{stdout[-2000:]}\n{stderr[-3000:]}"
        rows += json.loads(report.read_text())["rows"]
    return rows


@pytest.mark.slow
def test_every_kernel_config_compiles_clean(compile_rows: list[dict]) -> None:
    failing = [
        f"{r['arch']} {r['kernel']} {r['config']}: {'; '.join(r['failures'])} {r['error']}"
        for r in compile_rows
        if r["failures"]
    ]
    assert not failing, "\n".join(failing[:30])
    for r in compile_rows:  # the checks bench_compile applies, restated from the raw numbers
        assert r["compiled"] and r["spill_bytes"] == 0 and r["registers"] > 0, r
        assert r["shared_bytes"] <= SMEM_PER_BLOCK[r["arch"]], r
        assert r["registers"] * r["threads"] <= 65536 and r["blocks_per_sm"] >= 1, r
        if r["mma_expected"]:
            assert r["mma_instructions"] > 0, r


@pytest.mark.slow
def test_table_covers_every_kernel_and_the_recipe_sizes(compile_rows: list[dict]) -> None:
    for arch in SMEM_PER_BLOCK:
        compiled = {r["function"] for r in compile_rows if r["arch"] == arch}
        assert compiled == jit_kernels(), f"{arch}: kernels missing from the compile table"
    sizes = " ".join(r["sizes"] for r in compile_rows)
    for size in ("D=1024 B=16 N=512", "D=2560 B=16384 N=131072", "D=2048 B=512 N=4096"):
        assert size in sizes
    # 16-bit dots on 128-row tiles reach Hopper's wgmma; fp32 ieee stays on FMA (no MMA expected or found).
    wgmma = {(r["kernel"], r["config"].split(" margin")[0]) for r in compile_rows
             if r["arch"] == "sm_90" and r["wgmma_instructions"] > 0}  # fmt: skip
    expected = [("infonce_fwd", "bf16 ieee"), ("matmul_dq", "bf16 ieee 128x128x64 w8 s3"),
                ("matmul_dc", "fp16 ieee 128x128x64 w8 s3"), ("infonce_bwd_probs", "bf16 ieee")]  # fmt: skip
    for kernel, config in expected:
        assert (kernel, config) in wgmma, (kernel, config, sorted(wgmma))
    # Matryoshka at the recipe's sizes with v2's default levels: bf16 on the tensor cores, both architectures.
    for size in ("D=1024 B=512 N=4096", "D=2560 B=16384 N=131072"):
        assert any(r["kernel"] == "mrl_fwd" and size in r["sizes"] for r in compile_rows), size
    for kernel in ("mrl_fwd", "mrl_bwd_probs"):
        for arch in SMEM_PER_BLOCK:
            bf16 = [r for r in compile_rows if r["kernel"] == kernel and r["arch"] == arch and "bf16" in r["config"]]
            assert bf16 and all(r["mma_instructions"] > 0 for r in bf16), (kernel, arch)
    ieee = [r for r in compile_rows if r["kernel"] == "infonce_fwd" and "fp32 ieee" in r["config"]]
    assert ieee and all(not r["mma_expected"] and r["mma_instructions"] == 0 for r in ieee)
