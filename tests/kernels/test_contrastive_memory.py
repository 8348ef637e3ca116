"""The CPU path's peak extra memory is under a tenth of the naive q @ c.T + cross_entropy at B=4096, N=32768.

Each implementation runs forward+backward in its own subprocess (benchmarks/bench_contrastive.py --cpu-case),
which reports its peak resident memory during the call beyond its resident memory before it (the kernel's peak
counter VmHWM is reset through /proc/self/clear_refs right before the call). Both include the q and c gradients.
glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that freed blocks leave the resident set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_BOUND

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_contrastive.py"
B, N, D = 4096, 32768, 64


def run_case(case: str) -> dict:
    cmd = [sys.executable, str(BENCH), "--cpu-case", case, "--B", str(B), "--N", str(N), "--D", str(D),
           "--repeats", "0"]  # fmt: skip
    # As bench_contrastive.cpu_case_env: a fixed mmap threshold so that freed blocks leave the resident set.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_chunked_peak_memory_is_a_tenth_of_naive() -> None:
    naive, chunked = run_case("naive"), run_case("chunked")
    # Both computed the same loss on the same inputs.
    assert abs(naive["loss"] - chunked["loss"]) <= 1e-5 * abs(naive["loss"])
    # The score matrix alone is B * N * 4 bytes = 512 MiB: the naive peak must show it, or nothing was measured.
    assert naive["peak_extra_mib"] > B * N * 4 / 2**20
    assert chunked["peak_extra_mib"] * 10 < naive["peak_extra_mib"], (naive, chunked)
