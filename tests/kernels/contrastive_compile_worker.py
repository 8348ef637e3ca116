"""Compile the contrastive kernels for an H100 (sm_90) without a GPU; launched by test_contrastive.py.

Runs without TRITON_INTERPRET (the kernels must be real JIT functions). Exits non-zero, naming the kernel and
variant, when any compilation fails or a kernel needs more shared memory than an H100 block can have.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from f2llm.kernels import contrastive

H100_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int) -> int:
    signature = signature | dict.fromkeys(constexprs, "constexpr")
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs), target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return compiled.metadata.shared


def main() -> int:
    failures = []
    scalars = {"B": "i32", "N": "i32", "D": "i32", "tiles_per_split": "i32", "scale_log2": "fp32", "margin": "fp32"}
    kernels = [
        ("fwd", contrastive._infonce_fwd_kernel, {}),
        ("dq", contrastive._infonce_bwd_dq_kernel, {"dq_ptr": "*fp32"}),
        ("dc", contrastive._infonce_bwd_dc_kernel, {"dc_ptr": "*fp32"}),
    ]
    # The default GPU configs of infonce_config: D = 1024 (chunked D: 64 for 16-bit, 32 for fp32) and fp32 D = 64
    # (one chunk), with margin and tf32 variants.
    variants = [
        ("bf16", False, 64, True, "ieee"),
        ("fp16", False, 64, False, "ieee"),
        ("fp32", False, 32, False, "ieee"),
        ("fp32", True, 64, True, "tf32"),
    ]
    for dtype, one_d, block_d, margin, precision in variants:
        for name, fn, extra in kernels:
            pointers = {"q_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "tgt_ptr": "*i32", "lse_ptr": "*fp32"}
            signature = pointers | {"pos_ptr": "*fp32"} | extra | scalars
            constexprs = {"HAS_MARGIN": margin, "CAST_FP32": False, "PRECISION": precision, "ONE_D": one_d,
                          "BLOCK_B": 128, "BLOCK_N": 64, "BLOCK_D": block_d}  # fmt: skip
            label = f"{name} {dtype} one_d={one_d} margin={margin} {precision}"
            try:
                shared = compile_kernel(fn, signature, constexprs, num_warps=8, num_stages=3)
            except Exception as exc:  # report every failing variant, not only the first
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            print(f"ok {label}: {shared} B shared")
            if shared > H100_SHARED_BYTES:
                failures.append(f"{label}: needs {shared} B of shared memory > {H100_SHARED_BYTES}")
    for dtype in ("bf16", "fp32"):
        block_b, block_g, block_d = contrastive._grouped_blocks(512, 8, 2560)
        constexprs = {"BLOCK_B": block_b, "BLOCK_G": block_g, "BLOCK_D": block_d}
        io = {"q_ptr": f"*{dtype}", "docs_ptr": f"*{dtype}", "s_ptr": "*fp32", "lse_ptr": "*fp32"}
        sizes = {"B": "i32", "G": "i32", "D": "i32", "scale_log2": "fp32"}
        backward = io | {"scale_ptr": "*fp32", "dq_ptr": f"*{dtype}", "ddocs_ptr": f"*{dtype}"} | sizes
        for name, fn, signature in (
            ("grouped fwd", contrastive._grouped_fwd_kernel, io | sizes),
            ("grouped bwd", contrastive._grouped_bwd_kernel, backward),
        ):
            try:
                compile_kernel(fn, signature, constexprs, num_warps=4, num_stages=2)
                print(f"ok {name} {dtype}")
            except Exception as exc:
                failures.append(f"{name} {dtype}: {type(exc).__name__}: {exc}")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
