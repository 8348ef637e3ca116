"""Compile every Triton kernel configuration f2llm's dispatch code can choose, for a GPU this machine may not have.

Commands (from the repository root; the process must not run with TRITON_INTERPRET=1):
    python benchmarks/bench_compile.py                         # sm_90 (H100/H200) and sm_80 (A100)
    python benchmarks/bench_compile.py --arch 90 --out DIR
    python benchmarks/bench_compile.py --arch native           # on a GPU machine: the device's own target
It writes compile.json and compile.md under --out (default benchmarks/results/compile) and exits non-zero when
a configuration fails a check.

Triton's wheel ships ptxas, so a kernel compiles for sm_90 without a GPU exactly as its first launch on an H100
would: the launch arguments go through the kernel's own binder (the same integer specialization: 1 and
multiples of 16) with mock tensors in place of real ones, then ``triton.compile``. The configurations are the
ones the ops' own dispatch functions return (``infonce_config``, ``matmul_config``, ``bwd_chunk_n``,
``resolve_splits`` with 132 SMs, ``grouped_blocks``, pooling's ``_block_sizes``) for the recipe's sizes:
D in {1024, 2048, 2560} (Qwen3 0.6B / 1.7B / 4B) plus 64, 128 and 384 (the single-chunk paths and MiniLM),
B in {16, 512, 16384} queries, N in {512, 4096, 131072} candidates, bfloat16 / float16 / float32 (ieee and tf32),
mask margin on and off, and pooling (D in {384, 1024, 2048, 2560}) in every mode over padded and packed bf16 and
fp32 hidden states. Launches
that compile to the same kernel are compiled once; the row lists every size that chose it.

Per compiled kernel: registers per thread and spill bytes (ptxas' own log), shared memory, blocks per SM
(the tightest of registers, shared memory and threads), and the tensor-core instructions in the PTX (wgmma on
sm_90, mma.sync on sm_80). Checks: it compiles; 0 spill bytes; every kernel whose ``tl.dot`` takes 16-bit or
tf32 operands emits MMA instructions; shared memory fits one block (227 KiB on sm_90, 163 KiB on sm_80);
registers x threads fit an SM's 64K registers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Under the interpreter triton.language's own functions are interpreted objects and compiling asserts.
    sys.exit("bench_compile.py compiles real kernels: run it with TRITON_INTERPRET=0 (or unset)")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spill bytes, read from its log
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas, and with it the log

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

from f2llm.kernels import contrastive, matryoshka, pooling, utils

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile"
H100_SMS = 132
DIMS = (64, 128, 384, 1024, 2048, 2560)
POOL_DIMS = (384, 1024, 2048, 2560)  # the models' hidden sizes (MiniLM, Qwen3): pooling tiles follow D alone
QUERIES = (16, 512, 16384)
CANDIDATES = (512, 4096, 131072)
GROUP = 8  # 1 positive + 7 hard negatives per query
MRL_DIMS = (1024, 2048, 2560)  # Matryoshka losses at the Qwen3 sizes, with F2LLM v2's default levels
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Arch:
    """What one streaming multiprocessor offers (CUDA occupancy limits of the compute capability)."""

    name: str
    capability: int
    smem_per_block: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    smem_per_sm: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    mma: str = "mma.sync"


ARCHS = {
    90: Arch("sm_90", 90, smem_per_block=232448, smem_per_sm=233472, mma="wgmma.mma_async"),
    80: Arch("sm_80", 80, smem_per_block=166912, smem_per_sm=167936),
}


@dataclass
class Launch:
    """One kernel launch as the dispatch code makes it: positional arguments (mock tensors for tensors) and
    keyword constexprs / launch options, plus what a row shows about it."""

    kernel: str
    fn: Any
    args: tuple
    kwargs: dict[str, Any]
    mma_expected: bool  # its tl.dot takes 16-bit or tf32 operands
    config: str
    size: str

    def key(self) -> tuple:
        def norm(v: Any) -> Any:
            # What a launch specializes on: a tensor's dtype, an integer's being 1 or a multiple of 16.
            if isinstance(v, MockTensor):
                return str(v.dtype)
            if isinstance(v, bool) or not isinstance(v, int):
                return type(v).__name__
            return "1" if v == 1 else "16k" if v % 16 == 0 else "int"

        return (self.kernel, *map(norm, self.args), *sorted(self.kwargs.items()))


def tensor(dtype: torch.dtype) -> MockTensor:
    return MockTensor(dtype)


# ------------------------------------------------------------------------------------------------ launches
def infonce_launches(capability: int) -> Iterator[Launch]:
    """The kernels of one infonce forward + backward, for every size / dtype / option of the grid."""
    C, U = contrastive, utils
    cuda = torch.device("cuda")
    for D in DIMS:
        for B in QUERIES:
            for N in CANDIDATES:
                for dname, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")):
                    dtype = DTYPES[dname]
                    config = U.infonce_config(B, N, D, dtype, cuda, capability=capability)
                    cfg = U.resolve_splits(config, B, N, H100_SMS)
                    per_split, _ = U.split_ranges(N, cfg.block_n, cfg.splits_n)
                    chunk = U.bwd_chunk_n(cfg, B, N)
                    mma = dtype != torch.float32 or precision == "tf32"
                    size = f"D={D} B={B} N={N}"
                    tiles = f"{cfg.block_b}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"
                    for margin in (False, True):
                        common = dict(HAS_MARGIN=margin, CAST_FP32=False, PRECISION=precision)
                        blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
                        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        label = f"{dname} {precision} margin={margin} {tiles}"
                        q, c = tensor(dtype), tensor(dtype)
                        i32, f32 = tensor(torch.int32), tensor(torch.float32)
                        yield Launch(
                            "infonce_fwd",
                            C._infonce_fwd_kernel,
                            (q, c, i32, f32, f32, B, N, D, per_split, 28.85, 0.1),
                            common | blocks | launch | dict(ONE_D=D <= cfg.block_d),
                            mma,
                            f"{label} one_d={D <= cfg.block_d}",
                            size,
                        )
                        yield Launch(
                            "infonce_bwd_probs",
                            C._infonce_bwd_probs_kernel,
                            (q, c, i32, f32, f32, tensor(dtype), B, N, D, chunk, chunk, chunk, 28.85, 0.1),
                            common | blocks | launch,
                            mma,
                            label,
                            size,
                        )
                    # dq += G @ c[chunk] (float32 out, accumulating); dc[chunk] = G^T @ q (input dtype out).
                    for name, (M, K), transposed, out, accumulate in (
                        ("matmul_dq", (B, chunk), False, tensor(torch.float32), True),
                        ("matmul_dc", (chunk, B), True, tensor(dtype), False),
                    ):
                        mc = U.matmul_config(M, D, K, dtype, cuda)
                        strides = (1, chunk) if transposed else (chunk, 1)
                        # Batch strides of the problems (layer exits): (p - y) [E, B, chunk], c [E, N, D], q [E, B, D].
                        batch = (B * chunk, B * D, N * D) if transposed else (B * chunk, N * D, B * D)
                        yield Launch(
                            name,
                            U._scaled_matmul_kernel,
                            (tensor(dtype), tensor(dtype), out, tensor(torch.float32), M, D, K, *strides, D, D, *batch),
                            dict(
                                ACCUMULATE=accumulate,
                                CAST_FP32=False,
                                PRECISION=precision,
                                BLOCK_M=mc.block_m,
                                BLOCK_N=mc.block_n,
                                BLOCK_K=mc.block_k,
                                num_warps=mc.num_warps,
                                num_stages=mc.num_stages,
                            ),
                            mma,
                            f"{dname} {precision} {mc.block_m}x{mc.block_n}x{mc.block_k} w{mc.num_warps} "
                            f"s{mc.num_stages}",
                            size,
                        )


def grouped_launches() -> Iterator[Launch]:
    """grouped_infonce (each query against its own positive + hard negatives): elementwise, no tl.dot."""
    C, U = contrastive, utils
    for D in DIMS:
        for B in QUERIES:
            block_b, block_g, block_d, num_warps = U.grouped_blocks(B, GROUP, D)
            blocks = dict(BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps)
            for dname, dtype in DTYPES.items():
                x, f32 = tensor(dtype), tensor(torch.float32)
                label = f"{dname} {block_b}x{block_g}x{block_d} w{num_warps}"
                size = f"D={D} B={B} G={GROUP}"
                yield Launch(
                    "grouped_fwd", C._grouped_fwd_kernel, (x, x, f32, f32, B, GROUP, D, 28.85), blocks, False, label,
                    size,
                )  # fmt: skip
                yield Launch(
                    "grouped_bwd",
                    C._grouped_bwd_kernel,
                    (x, x, f32, f32, f32, tensor(dtype), tensor(dtype), B, GROUP, D, 28.85),
                    blocks,
                    False,
                    label,
                    size,
                )


def matryoshka_launches(capability: int) -> Iterator[Launch]:
    """Matryoshka infonce (forward, backward probs and its per-segment GEMMs) and grouped_infonce at the Qwen3
    sizes with v2's default levels (8 to 10 of them), bf16 and fp32."""
    M, U = matryoshka, utils
    cuda = torch.device("cuda")
    for D in MRL_DIMS:
        dims, _ = M.matryoshka_levels(D)
        L, align = len(dims), M._alignment(dims)
        levels = f"levels={L}"
        for B in QUERIES:
            for N in CANDIDATES:
                for dname in ("bf16", "fp32"):
                    dtype, precision = DTYPES[dname], "ieee"
                    config = M.matryoshka_config(B, N, D, dtype, cuda, capability=capability)
                    cfg = U.resolve_splits(config, B, N, H100_SMS)
                    per_split, _ = U.split_ranges(N, cfg.block_n, cfg.splits_n)
                    chunk = M.mrl_bwd_chunk_n(cfg, B, N, L)
                    mma = dtype != torch.float32
                    size = f"D={D} B={B} N={N}"
                    tiles = f"{cfg.block_b}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"
                    blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
                    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    q, c, h = tensor(dtype), tensor(dtype), tensor(dtype)
                    i32, f32 = tensor(torch.int32), tensor(torch.float32)
                    for margin in (False, True):
                        common = dict(ALIGN=align, HAS_MARGIN=margin, CAST_FP32=False, PRECISION=precision)
                        label = f"{dname} {precision} margin={margin} {levels} {tiles}"
                        yield Launch(
                            "mrl_fwd",
                            M._mrl_fwd_kernel,
                            (q, c, i32, f32, f32, f32, f32, i32, B, N, D, L, per_split, 28.85, 0.1),
                            common | blocks | launch | dict(L_PAD=triton.next_power_of_2(L)),
                            mma,
                            label,
                            size,
                        )
                        yield Launch(
                            "mrl_bwd_probs",
                            M._mrl_bwd_probs_kernel,
                            (q, c, i32, f32, f32, f32, f32, f32, h, f32, f32, B, N, D, chunk, chunk, chunk, B * chunk,
                             i32, L, 28.85, 0.1),
                            common | blocks | launch,
                            mma,
                            label,
                            size,
                        )  # fmt: skip
                    # Per segment: dq[:, seg] += H @ c[chunk, seg]; dc[chunk, seg] = H^T @ q[:, seg] (row stride D).
                    for lo, hi in M._segments(dims):
                        width = hi - lo
                        for name, (rows, K), strides, out, accumulate in (
                            ("matmul_dq", (B, chunk), (chunk, 1), tensor(torch.float32), True),
                            ("matmul_dc", (chunk, B), (1, chunk), tensor(dtype), False),
                        ):
                            mc = U.matmul_config(rows, width, K, dtype, cuda)
                            yield Launch(
                                name,
                                U._scaled_matmul_kernel,
                                (h, tensor(dtype), out, f32, rows, width, K, *strides, D, D, B * chunk,
                                 *((N * D, B * D) if name == "matmul_dq" else (B * D, N * D))),
                                dict(ACCUMULATE=accumulate, CAST_FP32=False, PRECISION=precision,
                                     BLOCK_M=mc.block_m, BLOCK_N=mc.block_n, BLOCK_K=mc.block_k,
                                     num_warps=mc.num_warps, num_stages=mc.num_stages),
                                mma,
                                f"{dname} {precision} {mc.block_m}x{mc.block_n}x{mc.block_k} w{mc.num_warps} "
                                f"s{mc.num_stages}",
                                f"{size} matryoshka segment {lo}:{hi}",
                            )  # fmt: skip
        for B in QUERIES:
            block_b, block_g, block_d, num_warps = U.grouped_blocks(B, GROUP, D)
            consts = dict(ALIGN=align, BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps)
            for dname in ("bf16", "fp32"):
                x, f32, i32 = tensor(DTYPES[dname]), tensor(torch.float32), tensor(torch.int32)
                label = f"{dname} {levels} {block_b}x{block_g}x{block_d} w{num_warps}"
                size = f"D={D} B={B} G={GROUP}"
                yield Launch("mrl_grouped_fwd", M._mrl_grouped_fwd_kernel, (x, x, f32, f32, f32, i32, B, GROUP, D, L),
                             consts, False, label, size)  # fmt: skip
                yield Launch("mrl_grouped_bwd", M._mrl_grouped_bwd_kernel,
                             (x, x, f32, f32, f32, tensor(DTYPES[dname]), tensor(DTYPES[dname]), i32, B, GROUP, D, L),
                             consts, False, label, size)  # fmt: skip


def pooling_launches() -> Iterator[Launch]:
    """pool(): every mode over padded and packed hidden states, bf16 (the CUDA compute dtype) and fp32, with the
    float32 normalized output the Encoder asks for and without normalization."""
    P = pooling
    for D in POOL_DIMS:
        block_l, block_d, num_warps = P._block_sizes(D)
        for mode, mode_id in P._MODE_ID.items():
            for layout in ("padded", "packed"):
                for dname in ("bf16", "fp32"):
                    for normalize in (True, False):
                        dtype = DTYPES[dname]
                        out = tensor(torch.float32 if normalize else dtype)
                        i32, f32 = tensor(torch.int32), tensor(torch.float32)
                        consts = dict(MODE=mode_id, NORMALIZE=normalize, HAS_WEIGHTS=layout == "padded",
                                      BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps)  # fmt: skip
                        label = f"{mode} {layout} {dname} normalize={normalize} {block_l}x{block_d} w{num_warps}"
                        seq_stride = 512 * D if layout == "padded" else 0
                        yield Launch(
                            "pool_fwd",
                            P._pool_fwd_kernel,
                            (tensor(dtype), out, f32, i32, i32, f32, f32, seq_stride, D, 1, 512, D, 1e-12),
                            consts,
                            False,
                            label,
                            f"D={D}",
                        )
                        yield Launch(
                            "pool_bwd",
                            P._pool_bwd_kernel,
                            (f32, out, f32, tensor(dtype), i32, i32, f32, f32, seq_stride, 512, 512, D),
                            consts,
                            False,
                            label,
                            f"D={D}",
                        )


def all_launches(capability: int) -> list[Launch]:
    """Every distinct launch of the grid on a GPU of ``capability``; a launch reached by several sizes keeps the
    list of them."""
    unique: dict[tuple, Launch] = {}
    launches = [*infonce_launches(capability), *grouped_launches(), *matryoshka_launches(capability),
                *pooling_launches()]  # fmt: skip
    for launch in launches:
        seen = unique.get(launch.key())
        if seen is None:
            unique[launch.key()] = launch
        elif launch.size not in seen.size.split("; "):
            seen.size += f"; {launch.size}"
    return list(unique.values())


# ------------------------------------------------------------------------------------------------ compiling
@dataclass
class Row:
    kernel: str
    function: str
    arch: str
    config: str
    sizes: str
    compiled: bool = False
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    threads: int = 0
    blocks_per_sm: int = 0
    limited_by: str = ""
    mma_instructions: int = 0  # wgmma.mma_async + mma.sync
    wgmma_instructions: int = 0  # Hopper's warpgroup MMA (tiles of 64+ rows)
    mma_expected: bool = False
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, target: GPUTarget) -> tuple[Any, str]:
    """(compiled kernel, ptxas log) of ``launch`` for ``target``, specialized as a real launch would be."""
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, log.getvalue()


def occupancy(arch: Arch, registers: int, threads: int, shared: int) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource). Registers are allocated per warp in units of 256."""
    warps = threads // 32
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": arch.regs_per_sm // max(1, warps * regs_per_warp),
        "shared memory": arch.smem_per_sm // (shared + 1024) if shared else arch.blocks_per_sm,  # 1 KiB reserved
        "threads": arch.threads_per_sm // threads,
        "blocks": arch.blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def measure(launch: Launch, arch: Arch, target: GPUTarget) -> Row:
    row = Row(
        launch.kernel, launch.fn.__name__, arch.name, launch.config, launch.size, mma_expected=launch.mma_expected
    )
    t0 = time.perf_counter()
    try:
        compiled, log = compile_launch(launch, target)
    except Exception as exc:  # record every failing configuration, not only the first
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        row.failures.append("does not compile")
        return row
    row.seconds = round(time.perf_counter() - t0, 2)
    row.compiled = True
    regs, spills = _PTXAS_REGS.search(log), _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        row.failures.append("no ptxas log (registers / spills unknown)")
    else:
        row.registers = int(regs.group(1))
        row.spill_bytes = int(spills.group(1)) + int(spills.group(2))
    row.shared_bytes = int(compiled.metadata.shared)
    row.threads = compiled.metadata.num_warps * 32
    row.blocks_per_sm, row.limited_by = occupancy(arch, row.registers, row.threads, row.shared_bytes)
    ptx = compiled.asm["ptx"]
    row.wgmma_instructions = ptx.count("wgmma.mma_async")
    row.mma_instructions = row.wgmma_instructions + ptx.count("mma.sync")
    if row.spill_bytes:
        row.failures.append(f"spills {row.spill_bytes} B")
    if launch.mma_expected and row.mma_instructions == 0:
        row.failures.append("tl.dot does not reach the tensor cores (no MMA instruction)")
    if row.shared_bytes > arch.smem_per_block:
        row.failures.append(f"shared memory {row.shared_bytes} B > {arch.smem_per_block} B per block")
    if row.registers * row.threads > arch.regs_per_sm:
        row.failures.append(f"{row.registers} registers x {row.threads} threads > {arch.regs_per_sm}")
    return row


# ------------------------------------------------------------------------------------------------ output
COLUMNS = ("kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "threads", "blocks_per_sm",
           "limited_by", "mma_instructions", "status")  # fmt: skip


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    lines = [
        f"# Triton kernels compiled for {', '.join(sorted({r.arch for r in rows}))}",
        "",
        f"{env['date']}, triton {env['triton']}, {env['machine']}. Command: `{env['command']}`.",
        f"{len(rows)} compiled kernels, {sum(bool(r.failures) for r in rows)} failing a check. Sizes that choose "
        "each configuration are in compile.json.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        status = "; ".join(r.failures) if r.failures else "ok"
        values = {**asdict(r), "status": status, "shared_bytes": f"{r.shared_bytes / 1024:.1f} KiB"}
        lines.append("| " + " | ".join(str(values[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def targets(spec: list[str]) -> list[tuple[Arch, GPUTarget]]:
    out = []
    for name in spec:
        if name == "native":
            from triton.runtime import driver

            target = driver.active.get_current_target()
            out.append((ARCHS.get(target.arch, ARCHS[90]), target))
        else:
            arch = ARCHS[int(name)]
            out.append((arch, GPUTarget("cuda", arch.capability, 32)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["90", "80"], choices=["90", "80", "native"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = []
    for arch, target in targets(args.arch):
        for launch in all_launches(target.arch):
            row = measure(launch, arch, target)
            rows.append(row)
            status = "; ".join(row.failures) or "ok"
            print(f"{row.arch} {row.kernel:18s} {row.config:60s} regs {row.registers:3d} spill {row.spill_bytes:4d}"
                  f" smem {row.shared_bytes / 1024:6.1f} KiB blocks/SM {row.blocks_per_sm}"
                  f" mma {row.mma_instructions:3d} {status}", flush=True)  # fmt: skip
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "machine": f"{os.cpu_count()}-core CPU, no GPU needed" if "native" not in args.arch else "GPU machine",
        "command": "python benchmarks/bench_compile.py" + (" " + " ".join(argv) if argv else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(
        json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    (args.out / "compile.md").write_text(markdown(rows, env))
    failing = [r for r in rows if r.failures]
    for r in failing:
        print(f"FAILED {r.arch} {r.kernel} {r.config} ({r.sizes}): {'; '.join(r.failures)} {r.error}", file=sys.stderr)
    print(f"{len(rows)} kernels compiled, {len(failing)} failing; wrote {args.out / 'compile.md'}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
