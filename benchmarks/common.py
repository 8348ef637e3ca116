"""Shared harness of the benchmark scripts: timing, peak memory, result tables and files.

Scripts run as ``python benchmarks/<script>.py`` (this folder is then first on ``sys.path``) and import it as
``from common import ...``. Every script writes ``<name>.json`` (environment + rows) and ``<name>.md`` under its
``--out`` folder (default :data:`DEFAULT_OUT`, not committed).

Measuring:

* CUDA time: median of ``triton.testing.do_bench`` (it warms up, flushes L2 and repeats).
* CUDA memory: ``max_memory_allocated`` during the call minus ``memory_allocated`` before it, after
  ``reset_peak_memory_stats``: the peak extra memory over what already lives (the inputs).
* CPU memory: the process's peak resident set during the call minus its resident set before it. The peak is
  reset first through ``/proc/self/clear_refs`` (Linux), so earlier peaks (imports, input creation) do not count.
  tracemalloc cannot be used: it does not see torch's CPU allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "local"
MIB = 2**20


# ------------------------------------------------------------------------------------------------ results
def environment() -> dict[str, Any]:
    """Versions and device of this run, stored with every result file."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "command": command_line(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return env


def command_line() -> str:
    """This process's command line, with the script path relative to the repository root when inside it."""
    argv = list(sys.argv)
    if argv and argv[0]:
        script = Path(argv[0]).resolve()
        root = Path(__file__).resolve().parents[1]
        argv[0] = str(script.relative_to(root)) if script.is_relative_to(root) else argv[0]
    return " ".join(["python", *map(shlex.quote, argv)])


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when ``x`` holds a nan or inf (a non-finite result never passes)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            # 3 significant digits; from 1000 on, the whole number (no 7.25e+03)
            return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out: Path,
    name: str,
    rows: list[dict],
    columns: list[str],
    title: str,
    meta: dict[str, Any] | None = None,
    quiet: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/name.json`` and ``out/name.md``, print the table (unless ``quiet``); returns the JSON path.

    ``meta`` (settings of the run that hold for every row) is stored under ``"meta"`` in the JSON; ``extra`` adds
    top-level keys (e.g. a ``summary``). A script that writes partial results after every row passes
    ``quiet=True`` until the last write.
    """
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"benchmark": name, "env": environment(), "rows": rows}
    if meta is not None:
        payload["meta"] = meta
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"write_results: extra key {key!r} would replace the payload's own")
        payload[key] = value
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    (out / f"{name}.md").write_text(f"# {title}\n\n{json.dumps(payload['env'])}\n\n{table}\n")
    if not quiet:
        print(f"\n{title}\n{table}\nwrote {path}")
    return path


def kernel_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes: --check, --cpu, --quick, --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness vs float64 instead of timing")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--quick", action="store_true", help="smallest sizes only (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    return parser


# ------------------------------------------------------------------------------------------------ CUDA
def cuda_median_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in milliseconds (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def cuda_peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated during ``fn()`` beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory failure (torch's, or one raised as a RuntimeError by a library)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------------ CPU
def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: peak RSS needs Linux")
    return int(match.group(1))


def cpu_peak_extra_mib(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(``fn()``, peak resident memory during the call beyond the resident memory before it, in MiB).

    Resets the kernel's peak-RSS counter (VmHWM) by writing 5 to /proc/self/clear_refs, so only this call's peak
    counts. Measures what the process really holds (torch's allocator included), page-granular.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    result = fn()
    return result, (_proc_status_kib("VmHWM") - before) / 1024


def cpu_median_s(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(median, all) wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def cpu_loss_fwd_bwd(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    repeats: int,
) -> dict[str, Any]:
    """A loss ``fn(q, c, targets)``'s forward+backward on CPU (q and c require grad): the loss and peak extra memory
    of the first call, then the median and all of ``repeats`` more (0: no timing)."""

    def fwd_bwd() -> float:
        q.grad = c.grad = None
        loss = fn(q, c, targets)
        loss.backward()
        return loss.item()

    loss, peak_mib = cpu_peak_extra_mib(fwd_bwd)
    median, times = cpu_median_s(fwd_bwd, repeats) if repeats > 0 else (float("nan"), [])
    return {"loss": loss, "peak_extra_mib": peak_mib, "median_s": median, "times_s": times,
            "threads": torch.get_num_threads()}  # fmt: skip


def run_json_subprocess(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``python argv...`` in a fresh process and return the JSON object printed on its last stdout line."""
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])
