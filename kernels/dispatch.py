"""Which implementation an op runs: the Triton kernels (CUDA, or CPU under the interpreter) or the PyTorch path.

One rule for every op in this package: ``backend="auto"`` takes the kernels for CUDA tensors and PyTorch for CPU
tensors; ``"triton"`` forces the kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``: how the tests run
them without a GPU); ``"torch"`` forces the PyTorch path.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(
    backend: Backend, x: torch.Tensor, op: str, dtypes: tuple[torch.dtype, ...] | None = TRITON_DTYPES
) -> bool:
    """Whether ``op`` on tensors like ``x`` runs its Triton kernels; raises on a backend that cannot run here
    (``dtypes``: what the kernels take; None: any floating dtype)."""
    if backend == "auto":
        return x.is_cuda
    if backend not in ("triton", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if not x.is_cuda and not triton_interpreting():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: the Triton kernels take {names} inputs, got {x.dtype}")
    return True


def cast_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast loaded blocks of ``dtype`` to float32: the interpreter computes bf16 arithmetic
    and bf16 ``tl.dot`` wrongly (triton#11584). On a GPU 16-bit blocks stay 16-bit for the tensor cores."""
    return dtype == torch.bfloat16 and triton_interpreting()
