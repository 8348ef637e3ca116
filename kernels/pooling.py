"""Fused sequence pooling + L2 normalization.

One op, three pooling modes, two layouts:

* padded: ``hidden`` [B, L, D] with ``attention_mask`` [B, L] (1 = real token, right or left padding);
* packed: ``hidden`` [T, D] holding n sequences delimited by ``cu_seqlens`` [n + 1] (flash-attention's varlen
  convention), as produced by sequence packing.

Modes: ``last`` (the last real token: the EOS the F2LLM recipe pools), ``mean`` (mean over real tokens),
``first`` (the first real token, i.e. CLS). With ``normalize=True`` the pooled vector is divided by
``max(||p||_2, eps)`` (``torch.nn.functional.normalize``'s definition). All arithmetic is float32; the output
has the input's dtype, or ``out_dtype`` (float32 for a loss: the fp32 result is then kept, not rounded to bf16).

This file holds the definition (:func:`pool_reference`), the Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``), a PyTorch path for CPU tensors, and the autograd Function that dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from f2llm.kernels.utils import Backend, use_triton

PoolMode = Literal["last", "mean", "first"]
MODES: tuple[str, ...] = ("last", "mean", "first")
_MODE_ID = {"last": 0, "mean": 1, "first": 2}
DEFAULT_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Reference: the definition of the op. Differentiable by autograd, works in any dtype (tests use float64).
# ----------------------------------------------------------------------------------------------------------
def pool_reference(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    mode: PoolMode = "last",
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Plain PyTorch pooling. Computes in the input's dtype promoted to at least float32."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(compute)
    if cu_seqlens is not None:
        seqs = [h[int(s) : int(e)] for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)]
        if mode == "last":
            pooled = torch.stack([s[-1] for s in seqs])
        elif mode == "first":
            pooled = torch.stack([s[0] for s in seqs])
        else:
            pooled = torch.stack([s.mean(0) for s in seqs])
    else:
        m = (attention_mask != 0).to(compute)
        positions = torch.arange(h.shape[1], device=h.device)
        real = attention_mask != 0
        if mode == "last":
            idx = torch.where(real, positions, -1).amax(1)
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]
        elif mode == "first":
            idx = torch.where(real, positions, h.shape[1]).amin(1)
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]
        else:
            pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1, eps=eps)
    return pooled.to(hidden.dtype)


# ----------------------------------------------------------------------------------------------------------
# Segments: both layouts reduce to "sequence i lives at rows [start_i, end_i) of a strided [*, D] view".
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Segments:
    start: torch.Tensor  # [n] int32, first row read (padded: position in the sequence; packed: token index)
    end: torch.Tensor  # [n] int32, one past the last row read
    count: torch.Tensor  # [n] float32, number of real tokens (mean's divisor)
    weights: torch.Tensor | None  # [n, L] float32 mask (padded only): rows between start and end may be pads
    seq_stride: int  # element offset between sequences (padded: stride of B; packed: 0)
    row_stride: int  # element offset between rows (tokens)
    n_rows: int  # padded: L (backward writes whole rows); packed: T


def _segments_from_mask(hidden: torch.Tensor, attention_mask: torch.Tensor, validate: bool) -> _Segments:
    if hidden.dim() != 3:
        raise ValueError(f"pool: padded hidden must be [B, L, D], got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool: attention_mask shape {tuple(attention_mask.shape)} does not match hidden [B, L] = "
            f"{tuple(hidden.shape[:2])}"
        )
    if attention_mask.device != hidden.device:
        raise ValueError(f"pool: attention_mask is on {attention_mask.device}, hidden on {hidden.device}")
    real = attention_mask != 0
    count = real.sum(1, dtype=torch.int32)
    if validate:
        empty = (count == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"pool: row(s) {empty[:10].tolist()} of attention_mask have no real token (all zeros); every "
                "sequence needs at least one token (the F2LLM tokenization always appends EOS)"
            )
    L = hidden.shape[1]
    positions = torch.arange(L, device=hidden.device, dtype=torch.int32)
    # Rows without tokens (only reachable with validate=False) get the in-bounds segment [0, 1).
    start = torch.where(real, positions, L).amin(1).clamp_max(max(L - 1, 0)).to(torch.int32)
    end = (torch.where(real, positions, -1).amax(1) + 1).clamp_min(1).to(torch.int32)
    return _Segments(
        start=start.contiguous(),
        end=end.contiguous(),
        count=count.to(torch.float32),
        weights=real.to(torch.float32).contiguous(),
        seq_stride=hidden.stride(0),
        row_stride=hidden.stride(1),
        n_rows=L,
    )


def _segments_from_cu_seqlens(hidden: torch.Tensor, cu_seqlens: torch.Tensor, validate: bool) -> _Segments:
    if hidden.dim() != 2:
        raise ValueError(f"pool: packed hidden must be [T, D], got shape {tuple(hidden.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"pool: cu_seqlens must be 1-D with n + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"pool: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    if validate:
        bad = (lengths <= 0).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"pool: sequence(s) {bad[:10].tolist()} in cu_seqlens are empty or decreasing "
                f"(lengths {lengths[bad[:10]].tolist()}); each sequence needs at least one token"
            )
        if int(cu[0]) < 0 or int(cu[-1]) > hidden.shape[0]:
            raise ValueError(
                f"pool: cu_seqlens spans [{int(cu[0])}, {int(cu[-1])}) but hidden has {hidden.shape[0]} rows"
            )
    return _Segments(
        start=cu[:-1].contiguous(),
        end=cu[1:].contiguous(),
        count=lengths.to(torch.float32),
        weights=None,
        seq_stride=0,
        row_stride=hidden.stride(0),
        n_rows=hidden.shape[0],
    )


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. One program per sequence, covering all of D, so the L2 norm is fused into the same pass.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _pool_fwd_kernel(
    hidden_ptr,
    out_ptr,
    norm_ptr,
    start_ptr,
    end_ptr,
    count_ptr,
    weight_ptr,
    seq_stride,
    row_stride,
    d_stride,
    weight_seq_stride,
    D,
    eps,
    MODE: tl.constexpr,  # 0 last, 1 mean, 2 first
    NORMALIZE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(start_ptr + pid)
    end = tl.load(end_ptr + pid)
    # int64 offsets: B*L*D exceeds 2**31 at real sizes (512 x 2048 x 2560).
    base = hidden_ptr + pid.to(tl.int64) * seq_stride
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if MODE == 1:
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for l0 in range(start, end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < end
            ptrs = base + offs_l.to(tl.int64)[:, None] * row_stride + offs_d[None, :] * d_stride
            x = tl.load(ptrs, mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(weight_ptr + pid.to(tl.int64) * weight_seq_stride + offs_l, mask=mask_l, other=0.0)
                x = x * w[:, None]
            acc += x
        pooled = tl.sum(acc, axis=0) / tl.load(count_ptr + pid)
    else:
        if MODE == 0:
            row = end - 1
        else:
            row = start
        pooled = tl.load(base + row.to(tl.int64) * row_stride + offs_d * d_stride, mask=mask_d, other=0.0).to(
            tl.float32
        )
    if NORMALIZE:
        norm = tl.maximum(tl.sqrt(tl.sum(pooled * pooled, axis=0)), eps)
        tl.store(norm_ptr + pid, norm)
        pooled = pooled / norm
    tl.store(out_ptr + pid.to(tl.int64) * D + offs_d, pooled.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _pool_bwd_kernel(
    grad_out_ptr,
    out_ptr,
    norm_ptr,
    grad_hidden_ptr,
    start_ptr,
    end_ptr,
    count_ptr,
    weight_ptr,
    grad_seq_stride,
    weight_seq_stride,
    n_rows,
    D,
    MODE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(start_ptr + pid)
    end = tl.load(end_ptr + pid)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_off = pid.to(tl.int64) * D
    g = tl.load(grad_out_ptr + row_off + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if NORMALIZE:
        # y = p / n  =>  dp = (dy - y (y . dy)) / n. y is the fp32 output saved by forward: re-reading a bf16
        # output would put bf16 rounding into the gradient.
        y = tl.load(out_ptr + row_off + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        norm = tl.load(norm_ptr + pid)
        g = (g - y * tl.sum(y * g, axis=0)) / norm
    base = grad_hidden_ptr + pid.to(tl.int64) * grad_seq_stride
    if MODE == 1:
        g = g / tl.load(count_ptr + pid)
        if HAS_WEIGHTS:
            # Padded layout: this program owns its whole row [0, n_rows) and writes zeros at pads, so the
            # gradient buffer needs no separate memset.
            lo = 0
            hi = n_rows
        else:
            lo = start
            hi = end
        for l0 in range(lo, hi, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < hi
            vals = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32) + g[None, :]
            if HAS_WEIGHTS:
                w = tl.load(weight_ptr + pid.to(tl.int64) * weight_seq_stride + offs_l, mask=mask_l, other=0.0)
                vals = vals * w[:, None]
            ptrs = base + offs_l.to(tl.int64)[:, None] * D + offs_d[None, :]
            tl.store(ptrs, vals.to(grad_hidden_ptr.dtype.element_ty), mask=mask_l[:, None] & mask_d[None, :])
    else:
        if MODE == 0:
            row = end - 1
        else:
            row = start
        tl.store(base + row.to(tl.int64) * D + offs_d, g.to(grad_hidden_ptr.dtype.element_ty), mask=mask_d)


def _block_sizes(D: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps): one program spans all of D; ~8k elements in flight per program.

    Chosen by rule rather than triton.autotune, which cannot run under the CPU interpreter.
    """
    block_d = triton.next_power_of_2(D)
    block_l = max(1, min(64, 8192 // block_d))
    num_warps = 4 if block_d <= 1024 else 8
    return block_l, block_d, num_warps


def _triton_forward(
    hidden: torch.Tensor, seg: _Segments, mode: str, normalize: bool, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n, D = seg.start.numel(), hidden.shape[-1]
    # With normalization the fp32 output is kept for backward (n x D, tiny next to hidden).
    out = torch.empty((n, D), device=hidden.device, dtype=torch.float32 if normalize else out_dtype)
    norm = torch.empty((n,), device=hidden.device, dtype=torch.float32)
    block_l, block_d, num_warps = _block_sizes(D)
    weights = seg.weights if seg.weights is not None else seg.count  # any tensor: unused when HAS_WEIGHTS=False
    _pool_fwd_kernel[(n,)](
        hidden,
        out,
        norm,
        seg.start,
        seg.end,
        seg.count,
        weights,
        seg.seq_stride,
        seg.row_stride,
        hidden.stride(-1),
        weights.stride(0) if seg.weights is not None else 0,
        D,
        eps,
        MODE=_MODE_ID[mode],
        NORMALIZE=normalize,
        HAS_WEIGHTS=seg.weights is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out, norm


def _triton_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    norm: torch.Tensor,
    hidden_shape: torch.Size,
    hidden_dtype: torch.dtype,
    seg: _Segments,
    mode: str,
    normalize: bool,
) -> torch.Tensor:
    n, D = seg.start.numel(), hidden_shape[-1]
    padded = seg.weights is not None
    # Padded mean writes every element itself; otherwise only pooled rows are written, the rest must be zero.
    alloc = torch.empty if (padded and mode == "mean") else torch.zeros
    grad_hidden = alloc(hidden_shape, device=grad_out.device, dtype=hidden_dtype)
    block_l, block_d, num_warps = _block_sizes(D)
    weights = seg.weights if padded else seg.count
    _pool_bwd_kernel[(n,)](
        grad_out.contiguous(),
        out,
        norm,
        grad_hidden,
        seg.start,
        seg.end,
        seg.count,
        weights,
        seg.n_rows * D if padded else 0,
        weights.stride(0) if padded else 0,
        seg.n_rows,
        D,
        MODE=_MODE_ID[mode],
        NORMALIZE=normalize,
        HAS_WEIGHTS=padded,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grad_hidden


# ----------------------------------------------------------------------------------------------------------
# PyTorch path for CPU tensors: same math, chunked over sequences so fp32 copies stay small.
# ----------------------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = 1 << 24  # fp32 elements materialized at once by the mean path (64 MiB)


def _torch_rows(hidden: torch.Tensor, seg: _Segments, rows: torch.Tensor) -> torch.Tensor:
    """hidden rows selected per sequence: rows[i] is a position within sequence i."""
    if seg.weights is not None:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), rows.long()]
    return hidden[rows.long()]


def _torch_forward(
    hidden: torch.Tensor, seg: _Segments, mode: str, normalize: bool, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    D = hidden.shape[-1]
    if mode == "last":
        pooled = _torch_rows(hidden, seg, seg.end - 1).float()
    elif mode == "first":
        pooled = _torch_rows(hidden, seg, seg.start).float()
    elif seg.weights is not None:
        B, L = seg.weights.shape
        pooled = torch.empty((B, D), dtype=torch.float32, device=hidden.device)
        step = max(1, _TORCH_CHUNK_ELEMENTS // max(1, L * D))
        for b0 in range(0, B, step):
            w = seg.weights[b0 : b0 + step]
            pooled[b0 : b0 + step] = torch.bmm(w[:, None, :], hidden[b0 : b0 + step].float()).squeeze(1)
        pooled /= seg.count[:, None]
    else:
        # Packed: a segment-sum via index_add over token chunks (each token belongs to one sequence).
        tokens, seq_of_token = _packed_tokens(seg)
        pooled = torch.zeros((seg.start.numel(), D), dtype=torch.float32, device=hidden.device)
        step = max(1, _TORCH_CHUNK_ELEMENTS // max(1, D))
        for t0 in range(0, tokens.numel(), step):
            pooled.index_add_(0, seq_of_token[t0 : t0 + step], hidden[tokens[t0 : t0 + step]].float())
        pooled /= seg.count[:, None]
    norm = torch.ones(pooled.shape[0], dtype=torch.float32, device=hidden.device)
    if normalize:
        norm = pooled.norm(dim=-1).clamp_min(eps)
        pooled = pooled / norm[:, None]
    return (pooled if normalize else pooled.to(out_dtype)), norm


def _packed_tokens(seg: _Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(token row, its sequence index) for every token of every packed sequence."""
    lengths = (seg.end - seg.start).long()
    seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first_of_seq = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(seq_of_token.numel(), device=lengths.device) - first_of_seq[seq_of_token]
    return seg.start.long()[seq_of_token] + within, seq_of_token


def _torch_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    norm: torch.Tensor,
    hidden_shape: torch.Size,
    hidden_dtype: torch.dtype,
    seg: _Segments,
    mode: str,
    normalize: bool,
) -> torch.Tensor:
    g = grad_out.float()
    if normalize:
        g = (g - out * (out * g).sum(-1, keepdim=True)) / norm[:, None]
    padded = seg.weights is not None
    # Padded mean writes every element below, so skip the memset (on CPU a fresh zeroed buffer costs as
    # much as the whole backward, in page faults).
    alloc = torch.empty if (padded and mode == "mean") else torch.zeros
    grad_hidden = alloc(hidden_shape, device=grad_out.device, dtype=hidden_dtype)
    if mode in ("last", "first"):
        rows = (seg.end - 1 if mode == "last" else seg.start).long()
        if padded:
            grad_hidden[torch.arange(hidden_shape[0], device=g.device), rows] = g.to(hidden_dtype)
        else:
            grad_hidden[rows] = g.to(hidden_dtype)
        return grad_hidden
    g = g / seg.count[:, None]
    if padded:
        B, L = seg.weights.shape
        step = max(1, _TORCH_CHUNK_ELEMENTS // max(1, L * hidden_shape[-1]))
        for b0 in range(0, B, step):
            chunk = grad_hidden[b0 : b0 + step]
            if chunk.dtype == torch.float32:
                torch.mul(seg.weights[b0 : b0 + step, :, None], g[b0 : b0 + step, None, :], out=chunk)
            else:
                chunk.copy_(seg.weights[b0 : b0 + step, :, None] * g[b0 : b0 + step, None, :])
    else:
        tokens, seq_of_token = _packed_tokens(seg)
        grad_hidden[tokens] = g.to(hidden_dtype)[seq_of_token]
    return grad_hidden


# ----------------------------------------------------------------------------------------------------------
# Autograd + public entry point.
# ----------------------------------------------------------------------------------------------------------
class PoolFunction(torch.autograd.Function):
    """Pooling + normalization with a hand-written backward (gradient only at pooled positions)."""

    @staticmethod
    def forward(
        ctx, hidden, seg: _Segments, mode: str, normalize: bool, eps: float, use_triton: bool, out_dtype: torch.dtype
    ):
        fwd = _triton_forward if use_triton else _torch_forward
        out, norm = fwd(hidden, seg, mode, normalize, eps, out_dtype)
        ctx.seg, ctx.mode, ctx.normalize, ctx.use_triton = seg, mode, normalize, use_triton
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.save_for_backward(out if normalize else None, norm)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        out, norm = ctx.saved_tensors
        bwd = _triton_backward if ctx.use_triton else _torch_backward
        grad_hidden = bwd(grad_out, out, norm, ctx.hidden_shape, ctx.hidden_dtype, ctx.seg, ctx.mode, ctx.normalize)
        return grad_hidden, None, None, None, None, None, None


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    mode: PoolMode = "last",
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    backend: Backend = "auto",
    validate: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pool token states into one vector per sequence, optionally L2-normalized, in one fused pass.

    Args:
        hidden: [B, L, D] padded states (with ``attention_mask``) or [T, D] packed states (with ``cu_seqlens``).
        attention_mask: [B, L], nonzero = real token. Right or left padding (any mask works for ``mean``).
        cu_seqlens: [n + 1] integer offsets of n packed sequences in ``hidden`` (flash-attention convention).
        mode: ``"last"`` (last real token, e.g. EOS), ``"mean"`` or ``"first"`` (e.g. CLS).
        normalize: divide by ``max(||p||_2, eps)``.
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"auto"`` (Triton on CUDA, PyTorch on CPU).
        validate: check for sequences without tokens and out-of-range offsets (one host sync) and raise a
            ValueError naming them. With ``validate=False`` the caller guarantees that every sequence is
            non-empty and in range (a violation gives garbage, never a crash on padded input).
        out_dtype: dtype of the result; None: ``hidden``'s. ``torch.float32`` keeps the float32 result of a
            16-bit ``hidden`` (what a contrastive loss should see) at no extra cost.

    Returns:
        [B, D] or [n, D] in ``out_dtype``; arithmetic in float32.
    """
    if mode not in MODES:
        raise ValueError(f"pool: mode must be one of {MODES}, got {mode!r}")
    if (attention_mask is None) == (cu_seqlens is None):
        raise ValueError("pool: pass exactly one of attention_mask (padded [B, L, D]) or cu_seqlens (packed [T, D])")
    if not hidden.is_floating_point():
        raise ValueError(f"pool: hidden must be a floating-point tensor, got {hidden.dtype}")
    if attention_mask is not None:
        seg = _segments_from_mask(hidden, attention_mask, validate)
    else:
        seg = _segments_from_cu_seqlens(hidden, cu_seqlens, validate)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"pool: out_dtype must be a floating-point dtype, got {out_dtype}")
    triton_path = use_triton(backend, hidden, "pool", dtypes=None)  # the kernels load any float and compute fp32
    return PoolFunction.apply(hidden, seg, mode, normalize, float(eps), triton_path, out_dtype or hidden.dtype)
