"""Contrastive (InfoNCE) losses that never build the query x candidate score matrix.

Two ops:

* :func:`infonce`: ``q`` [B, D] against a shared pool ``c`` [N, D] (the in-batch loss). For every query i with a
  target t(i) (``targets[i] != ignore_index``)::

      loss_i = logsumexp_j(q_i . c_j / T) - q_i . c_t(i) / T        loss = mean_i loss_i

  which is ``F.cross_entropy(q @ c.T / T, targets, ignore_index=...)`` without the [B, N] matrix.

  Triton (CUDA): the forward pass streams candidate tiles through an online log-sum-exp (flash-attention style)
  and keeps only the per-query log-sum-exp (float32, [B]; base 2, as the backward uses it) and positive score
  (float32, [B]). Backward, ``dq_i = K sum_j (p_ij - y_ij) c_j`` and ``dc_j = K sum_i (p_ij - y_ij) q_i`` with
  ``K = grad_out / (n_valid T)``, goes through the candidates in chunks: a kernel recomputes the chunk's scores
  and writes its (p - y) [B, chunk] once in the inputs' dtype, then two tensor-core GEMMs multiply it into dq
  (a float32 accumulator) and into dc's rows of the chunk. That is four GEMMs in all, forward included (8BND
  FLOPs), no atomics and no ordering between threads. Extra memory: O(B + N) floats, the (p - y) chunk
  (``_BWD_WORKSPACE_ELEMENTS``) and, for 16-bit inputs, dq's float32 accumulator.

  PyTorch (CPU): blocks of query rows against all candidates, at most ``_TORCH_TILE_ELEMENTS`` scores at a time
  (16 MiB in float32; at least one row). A block sees every candidate, so its softmax is exact at once and, when
  an input requires grad, the gradient contributions are taken from the same tile in forward (three matmuls per
  tile, like the unfused version, instead of a fourth to recompute scores); backward scales them by ``grad_out``.
  Extra memory: two tiles plus float32 gradient buffers that become the gradients.

* :func:`grouped_infonce`: each query against its own group ``docs`` [B, G, D] (positive at index 0, then its
  hard negatives), ``loss = mean_i [logsumexp_g(q_i . d_ig / T) - q_i . d_i0 / T]``. One fused pass; the [B, G]
  scores are kept for backward.

Conventions shared by both:

* All arithmetic accumulates in float32 (float64 inputs stay float64 on the PyTorch path). The loss is a float32
  0-dim tensor (float64 for float64 inputs); gradients come back in the inputs' dtypes.
* Queries whose target is ``ignore_index`` contribute nothing. When every query is ignored the loss is 0 and the
  gradients are 0 (``F.cross_entropy`` returns nan there): a batch without any valid query then leaves the
  weights untouched instead of poisoning them with nan.
* ``mask_margin=m`` (off by default) drops candidate j != t(i) from query i's denominator when
  ``q_i . c_j > q_i . c_t(i) + m``: a likely false negative (Qwen3-Embedding's filter). The comparison is on raw
  dot products, i.e. in the cosine domain for L2-normalized embeddings, before division by the temperature. The
  mask is a constant of the loss (no gradient flows through the comparison).

This file holds the definitions (:func:`infonce_reference`, :func:`grouped_infonce_reference`), the Triton kernels
(CUDA, or CPU under ``TRITON_INTERPRET=1``), chunked PyTorch paths for CPU tensors, and the autograd Functions +
public functions that dispatch between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import triton
import triton.language as tl

from f2llm.kernels.dispatch import Backend, cast_fp32, use_triton

Fp32Precision = Literal["ieee", "tf32"]
DEFAULT_TEMPERATURE = 0.05
IGNORE_INDEX = -100
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------------------
# References: the definitions. Differentiable by autograd, in the inputs' dtype promoted to at least float32
# (tests use float64). They materialize the score matrix.
# ----------------------------------------------------------------------------------------------------------
def infonce_reference(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    mask_margin: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """InfoNCE of ``q`` [B, D] against ``c`` [N, D] with the full [B, N] score matrix (the definition)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(compute) @ c.to(compute).T
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0)
    pos = scores.gather(1, tgt[:, None])
    logits = scores / temperature
    if mask_margin is not None:
        cols = torch.arange(c.shape[0], device=c.device)
        drop = (scores > pos + mask_margin) & (cols[None, :] != tgt[:, None])
        logits = logits.masked_fill(drop, float("-inf"))
    per_query = torch.logsumexp(logits, 1) - pos[:, 0] / temperature
    return torch.where(valid, per_query, 0).sum() / valid.sum().clamp_min(1)


def grouped_infonce_reference(
    q: torch.Tensor, docs: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Each query ``q`` [B, D] against its own ``docs`` [B, G, D] (positive first), the definition."""
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bd,bgd->bg", q.to(compute), docs.to(compute)) / temperature
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


# ----------------------------------------------------------------------------------------------------------
# Tile configuration. Chosen by a plain function: multi-config triton.autotune cannot run under the interpreter.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfoNCEConfig:
    """Tiles and launch parameters of the :func:`infonce` kernels.

    The forward and the backward's probability kernel compute [block_b, block_n] score tiles whose dot products
    step through D in chunks of ``block_d`` (when one chunk covers D the forward keeps its query block in
    registers). ``splits_n`` splits the forward's candidates across programs (for few query blocks: B << N);
    None picks it from the GPU's SM count. The backward turns ``chunk_n`` candidates at a time into (p - y)
    tiles ([B, chunk_n] in the inputs' dtype; None: about ``_BWD_WORKSPACE_ELEMENTS`` of them) and multiplies
    them into dq and dc with :func:`_scaled_matmul_kernel`, whose tiles :func:`matmul_config` picks.
    """

    block_b: int = 64
    block_n: int = 64
    block_d: int = 64
    splits_n: int | None = None
    chunk_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_b", "block_n", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"InfoNCEConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        for name in ("splits_n", "chunk_n"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"InfoNCEConfig.{name} must be >= 1 or None, got {value}")


def cuda_capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number (sm_90: 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def infonce_config(
    B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, capability: int | None = None
) -> InfoNCEConfig:
    """Default tiles for ``q`` [B, D] against ``c`` [N, D] (``capability``: the GPU's, e.g. 90; None: asked)."""
    d_pow2 = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        # Interpreter: every program and loop step costs milliseconds of Python, so take the largest tiles that
        # cover small test shapes in one step. Programs run one after another: splitting only adds work.
        return InfoNCEConfig(
            block_b=min(64, max(16, triton.next_power_of_2(B))),
            block_n=min(64, max(16, triton.next_power_of_2(N))),
            block_d=min(128, d_pow2),
            splits_n=1,
        )
    # GPU: 128 x 64 score tiles with a k-loop over D (tensor cores for 16-bit inputs). One chunk covers D up to
    # 128 (16-bit) or 32 (fp32: a 128 x 64 fp32 query block in registers beside the score tile spills under
    # ieee's FMA dot); beyond, the k-loop steps by 64 (16-bit) or 32 (fp32). Pipeline stages as they compile
    # without spills: 16-bit on Ampere spills 16 B with 3 stages, fp32 there 32 B with 2; Hopper takes 3.
    # tests/kernels/test_compile_hopper.py compiles every choice made here for sm_90 and sm_80 and checks
    # spills, shared memory, registers and tensor-core use (table: benchmarks/results/compile/).
    capability = cuda_capability(device) if capability is None else capability
    block_b = 128 if B >= 128 else max(16, triton.next_power_of_2(B))
    one_chunk, step = (32, 32) if dtype == torch.float32 else (128, 64)
    block_d = d_pow2 if d_pow2 <= one_chunk else step
    return InfoNCEConfig(
        block_b=block_b,
        block_n=64,
        block_d=block_d,
        num_warps=8 if block_b >= 128 else 4,
        num_stages=3 if capability >= 90 or dtype == torch.float32 else 2,
    )


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of :func:`_scaled_matmul_kernel` for one product ``out [M, N] (+)= alpha * a [M, K] @ b [K, N]``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> MatmulConfig:
    """Default tiles of the backward's products (M, N, K as in :class:`MatmulConfig`)."""

    def fit(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    if device.type != "cuda":  # interpreter: few, large programs
        return MatmulConfig(fit(M, 64), fit(N, 64), fit(K, 64), num_warps=4, num_stages=1)
    # 128 x 128 output tiles (a 64 KiB float32 accumulator over 8 warps), K steps of 64 (16-bit) / 32 (fp32).
    # fp32 takes 128 x 64: ieee's FMA dot holds its operands in registers and 128 x 128 spills. 4 warps only
    # below 128 x 64 (there 4 warps spill fp32 on Ampere).
    block_m, block_n = fit(M, 128), fit(N, 64 if dtype == torch.float32 else 128)
    block_k = fit(K, 32 if dtype == torch.float32 else 64)
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return MatmulConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=3)


# The backward's (p - y) workspace: [B, chunk_n] elements in the inputs' dtype (32 MiB in bf16). Each chunk's
# two products read it once each and read-modify-write the float32 dq once: wider chunks amortize that
# (B x D x 8 bytes per chunk) over more multiply-adds, narrower ones save memory.
_BWD_WORKSPACE_ELEMENTS = 1 << 24


def bwd_chunk_n(cfg: InfoNCEConfig, B: int, N: int) -> int:
    """Candidates per backward chunk: ``cfg.chunk_n``, or a multiple of 128 filling the workspace budget."""
    if cfg.chunk_n is not None:
        return min(cfg.chunk_n, N)
    return min(N, max(128, _BWD_WORKSPACE_ELEMENTS // max(1, B) // 128 * 128))


# Split programs write float32 partial log-sum-exps (splits x B): cap the splits so that stays small.
_MAX_PARTIAL_ELEMENTS = 1 << 24


def resolve_splits(cfg: InfoNCEConfig, B: int, N: int, sms: int) -> InfoNCEConfig:
    """Fill ``splits_n``: when there are fewer query blocks than the GPU has SMs (``sms``; e.g. 16 local queries
    against 512 gathered positives), split the forward's candidate loop across programs, up to one program per
    SM. Deterministic (no atomics): the partial log-sum-exps are combined afterwards."""
    if cfg.splits_n is not None:
        return cfg
    b_blocks, n_blocks = triton.cdiv(B, cfg.block_b), triton.cdiv(N, cfg.block_n)
    return replace(cfg, splits_n=max(1, min(n_blocks, sms // b_blocks, _MAX_PARTIAL_ELEMENTS // B)))


def _split_ranges(n_items: int, block: int, splits: int) -> tuple[int, int]:
    """(tiles per split, number of non-empty splits) covering ``n_items`` in tiles of ``block``."""
    tiles = triton.cdiv(n_items, block)
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return per_split, triton.cdiv(tiles, per_split)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels for infonce. Scores s_ij = q_i . c_j accumulate in float32 over D chunks of BLOCK_D; softmax
# arithmetic runs in base 2 (exp2/log2) with z = s * log2(e) / T. Targets arrive remapped: -1 = no target.
# Row offsets are int64: N * D passes 2**31 for large candidate pools at D = 2560.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, row_off, row_mask, d0, D, BLOCK_D: tl.constexpr, CAST_FP32: tl.constexpr):
    """[rows, BLOCK_D] block of a row-major [*, D] matrix: rows at element offsets ``row_off``, columns
    ``d0 .. d0 + BLOCK_D``, zero outside ``row_mask`` and D. Cast to float32 when CAST_FP32."""
    cols = d0 + tl.arange(0, BLOCK_D)
    x = tl.load(ptr + row_off[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
    if CAST_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_rows(
    a_ptr,
    a_off,
    a_mask,
    b_ptr,
    b_off,
    b_mask,
    D,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_A, BLOCK_B] float32 dot products of rows of ``a`` with rows of ``b``, over D in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = _load_rows(a_ptr, a_off, a_mask, d0, D, BLOCK_D, CAST_FP32)
        b = _load_rows(b_ptr, b_off, b_mask, d0, D, BLOCK_D, CAST_FP32)
        s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _infonce_fwd_kernel(
    q_ptr,
    c_ptr,
    tgt_ptr,
    lse_ptr,  # [splits, B] float32: base-2 log-sum-exp of z = s log2(e) / T over each split's candidates
    pos_ptr,  # [B] float32: q_i . c_t(i) (0 for rows without target)
    B,
    N,
    D,
    tiles_per_split,
    scale_log2,
    margin,
    HAS_MARGIN: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    ONE_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    tgt = tl.load(tgt_ptr + offs_b, mask=mask_b, other=-1)
    has_tgt = mask_b & (tgt >= 0)
    q_off = offs_b.to(tl.int64) * D
    t_off = tl.where(has_tgt, tgt, 0).to(tl.int64) * D

    # Positive score: a gather of each query's target row, exact fp32 products.
    pos = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        qv = _load_rows(q_ptr, q_off, mask_b, d0, D, BLOCK_D, True)
        cv = _load_rows(c_ptr, t_off, has_tgt, d0, D, BLOCK_D, True)
        pos += tl.sum(qv * cv, axis=1)

    if ONE_D:  # the whole query block stays in registers across candidate tiles
        q_blk = _load_rows(q_ptr, q_off, mask_b, 0, D, BLOCK_D, CAST_FP32)
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        c_off = offs_n.to(tl.int64) * D
        if ONE_D:
            c_blk = _load_rows(c_ptr, c_off, mask_n, 0, D, BLOCK_D, CAST_FP32)
            s = tl.dot(q_blk, tl.trans(c_blk), input_precision=PRECISION)
        else:
            s = _dot_rows(
                q_ptr, q_off, mask_b, c_ptr, c_off, mask_n, D, BLOCK_B, BLOCK_N, BLOCK_D, CAST_FP32, PRECISION
            )
        keep = mask_n[None, :]
        if HAS_MARGIN:
            keep = keep & ((s <= pos[:, None] + margin) | (offs_n[None, :] == tgt[:, None]))
        z = tl.where(keep, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # A row whose candidates so far are all masked keeps m = -inf: shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_sum = l_sum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
        m = m_new
    # l_sum = 0: every candidate of this split masked (or a row past B); its share of the log-sum-exp is -inf.
    # Kept in base 2, as the backward consumes it: with one candidate, lse = z exactly and p = exp2(z - lse) = 1.
    lse = tl.where(l_sum > 0, m + tl.log2(tl.maximum(l_sum, 1e-30)), float("-inf"))
    tl.store(lse_ptr + pid_s * B + offs_b, lse, mask=mask_b)
    if pid_s == 0:
        tl.store(pos_ptr + offs_b, pos, mask=mask_b)


@triton.jit
def _infonce_bwd_probs_kernel(
    q_ptr,
    c_ptr,
    tgt_ptr,
    lse_ptr,  # [B] float32 base-2 log-sum-exp, +inf for rows without target (their p is then exactly 0)
    pos_ptr,
    g_ptr,  # [B, g_stride] (p_ij - y_ij) for candidates n0 .. n0 + n_count, in the inputs' dtype
    B,
    D,
    n0,
    n_count,
    g_stride,
    scale_log2,
    margin,
    HAS_MARGIN: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_N] tile of the backward's (p - y) for a chunk of candidates: recomputed scores
    (a register accumulator over D), softmax against the forward's log-sum-exp, written once. Candidate tiles run
    along grid axis 0 (up to 2**31 - 1 programs; axis 1 stops at 65535)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < n_count
    offs_n = n0 + cols
    tgt = tl.load(tgt_ptr + offs_b, mask=mask_b, other=-1)
    lse2 = tl.load(lse_ptr + offs_b, mask=mask_b, other=float("inf"))
    s = _dot_rows(
        q_ptr,
        offs_b.to(tl.int64) * D,
        mask_b,
        c_ptr,
        offs_n.to(tl.int64) * D,
        mask_n,
        D,
        BLOCK_B,
        BLOCK_N,
        BLOCK_D,
        CAST_FP32,
        PRECISION,
    )
    keep = mask_b[:, None] & mask_n[None, :]
    if HAS_MARGIN:
        pos = tl.load(pos_ptr + offs_b, mask=mask_b, other=0.0)
        keep = keep & ((s <= pos[:, None] + margin) | (offs_n[None, :] == tgt[:, None]))
    p = tl.where(keep, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
    g = p - tl.where(offs_n[None, :] == tgt[:, None], 1.0, 0.0)
    ptrs = g_ptr + offs_b.to(tl.int64)[:, None] * g_stride + cols[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _scaled_matmul_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    alpha_ptr,  # [1] float32, read on the device (grad_out / (n_valid T): no host sync)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_om,
    ACCUMULATE: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out [M, N] = alpha * a [M, K] @ b [K, N]``, or with ACCUMULATE ``out += a @ b`` (no alpha: the caller
    scales the finished sum once), with float32 accumulation. ``b`` and ``out`` have unit column stride, ``a``
    any strides (the dc product reads the (p - y) chunk transposed).

    A GEMM of its own rather than cuBLAS: it adds a 16-bit product into a float32 accumulator in one pass (the
    dq sum over candidate chunks keeps full precision, no [B, D] float32 temporary per chunk) and follows
    ``fp32_precision`` instead of torch's global matmul setting.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        # The running sum seeds the accumulator (no second tile live in the epilogue). Each program reads and
        # writes only its own tile, once: no ordering between programs is needed.
        acc = tl.load(ptrs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_rows = offs_m.to(tl.int64) * stride_am
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] + offs_k.to(tl.int64)[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if CAST_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if not ACCUMULATE:
        acc = acc * tl.load(alpha_ptr)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _triton_infonce_forward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = q.shape
    N = c.shape[0]
    per_split, splits = _split_ranges(N, cfg.block_n, cfg.splits_n)
    lse_parts = torch.empty((splits, B), device=q.device, dtype=torch.float32)
    pos = torch.empty((B,), device=q.device, dtype=torch.float32)
    _infonce_fwd_kernel[(triton.cdiv(B, cfg.block_b), splits)](
        q,
        c,
        tgt,
        lse_parts,
        pos,
        B,
        N,
        D,
        per_split,
        _LOG2E / temperature,
        0.0 if margin is None else float(margin),
        HAS_MARGIN=margin is not None,
        CAST_FP32=cast_fp32(q.dtype),
        PRECISION=precision,
        ONE_D=D <= cfg.block_d,
        BLOCK_B=cfg.block_b,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (lse_parts[0] if splits == 1 else _logsumexp2(lse_parts)), pos


def _logsumexp2(parts: torch.Tensor) -> torch.Tensor:
    """log2(sum_s 2**parts[s]) over dim 0 (-inf where every part is -inf): base-2 partial log-sum-exps combined."""
    top = parts.max(0).values
    shift = torch.where(torch.isinf(top), 0.0, top)
    return shift + torch.exp2(parts - shift).sum(0).log2()


def _scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alpha: torch.Tensor,
    *,
    transpose_a: bool,
    accumulate: bool,
    precision: str,
) -> None:
    """``out = alpha * op(a) @ b``, or ``out += op(a) @ b`` when ``accumulate``, with op(a) = a.T when
    ``transpose_a``; b and out row-major."""
    M, K = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    N = b.shape[1]
    stride_am, stride_ak = (a.stride(1), a.stride(0)) if transpose_a else (a.stride(0), a.stride(1))
    mc = matmul_config(M, N, K, a.dtype, a.device)
    _scaled_matmul_kernel[(triton.cdiv(M, mc.block_m), triton.cdiv(N, mc.block_n))](
        a,
        b,
        out,
        alpha,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        b.stride(0),
        out.stride(0),
        ACCUMULATE=accumulate,
        CAST_FP32=cast_fp32(a.dtype),
        PRECISION=precision,
        BLOCK_M=mc.block_m,
        BLOCK_N=mc.block_n,
        BLOCK_K=mc.block_k,
        num_warps=mc.num_warps,
        num_stages=mc.num_stages,
    )


def _triton_infonce_backward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    pos: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dq, dc) in the inputs' dtype, ``scale`` = grad_out / (n_valid T) as a [1] float32 device tensor.

    Per chunk of candidates: one kernel writes G = (p - y) [B, chunk] once, then two GEMMs consume it,
    ``dq += G @ c[chunk]`` (float32 accumulator, scaled once at the end) and ``dc[chunk] = scale G^T @ q``
    (complete: every query is in G).

    FLOPs: 2BND to recompute the scores + 2BND per wanted gradient; with the forward's 2BND, 8BND for both
    gradients: four GEMMs. Bytes beyond streaming q and c through the GEMMs: G is written once and read twice
    (3BN x the dtype's size), dq's float32 accumulator is read and written once per chunk (8BD bytes per
    chunk). Memory: G's chunk (``_BWD_WORKSPACE_ELEMENTS``) plus, for 16-bit inputs, the float32 dq
    accumulator [B, D]. Every program owns the tile it writes: no atomics, no barrier, deterministic.
    """
    B, D = q.shape
    N = c.shape[0]
    chunk = bwd_chunk_n(cfg, B, N)
    probs = torch.empty((B, chunk), device=q.device, dtype=q.dtype)
    dq = torch.zeros((B, D), device=q.device, dtype=torch.float32) if need_q else None
    dc = torch.empty_like(c) if need_c else None
    for n0 in range(0, N, chunk):
        width = min(chunk, N - n0)
        _infonce_bwd_probs_kernel[(triton.cdiv(width, cfg.block_n), triton.cdiv(B, cfg.block_b))](
            q,
            c,
            tgt,
            lse,
            pos,
            probs,
            B,
            D,
            n0,
            width,
            chunk,
            _LOG2E / temperature,
            0.0 if margin is None else float(margin),
            HAS_MARGIN=margin is not None,
            CAST_FP32=cast_fp32(q.dtype),
            PRECISION=precision,
            BLOCK_B=cfg.block_b,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        g = probs[:, :width]
        if need_q:
            _scaled_matmul(g, c[n0 : n0 + width], dq, scale, transpose_a=False, accumulate=True, precision=precision)
        if need_c:
            _scaled_matmul(g, q, dc[n0 : n0 + width], scale, transpose_a=True, accumulate=False, precision=precision)
    return (dq.mul_(scale).to(q.dtype) if need_q else None), dc


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (CPU tensors). Blocks of query rows against all candidates: a [rows, N] tile of at most
# _TORCH_TILE_ELEMENTS scores (at least one row) gives each row its exact log-sum-exp at once, so when an input
# needs a gradient the tile's probabilities are turned into gradient contributions right away: three matmuls
# per tile, as many as the unfused q @ c.T + cross_entropy, instead of a fourth to recompute the scores in
# backward. The unscaled float32 gradients wait in ctx until backward multiplies them by grad_out.
# ----------------------------------------------------------------------------------------------------------
# Scores per tile (16 MiB in float32). Smaller tiles save memory but cost time: every row block
# read-modify-writes all of the float32 dc buffer.
_TORCH_TILE_ELEMENTS = 1 << 22


def _torch_infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(lse [B], pos [B], unscaled dq [B, D] or None, unscaled dc [N, D] or None) in the compute dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, cf = q.to(compute), c.to(compute)
    B, N = q.shape[0], c.shape[0]
    has_tgt = tgt >= 0
    safe_tgt = tgt.clamp_min(0)
    pos = torch.where(has_tgt, (qf * cf[safe_tgt]).sum(-1), 0)
    q_scaled = qf * (1.0 / temperature)  # logits = q_scaled @ c.T: the temperature costs no pass over the tiles
    some_ignored = not bool(has_tgt.all())
    lse = torch.empty((B,), device=q.device, dtype=compute)
    dq = torch.empty_like(qf) if need_q else None
    dc = torch.zeros_like(cf) if need_c else None
    step = max(1, _TORCH_TILE_ELEMENTS // N)
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        logits = q_scaled[r0:r1] @ cf.T
        if margin is not None:
            cols = torch.arange(N, device=q.device)
            drop = (logits > (pos[r0:r1, None] + margin) / temperature) & (cols[None, :] != tgt[r0:r1, None])
            logits.masked_fill_(drop, float("-inf"))
        # torch.softmax is one fused pass per row; the log-sum-exp follows from any entry: lse = logit - log p,
        # exact at the row's maximum, where p >= 1/N.
        top, top_idx = logits.max(1, keepdim=True)
        p = torch.softmax(logits, 1)
        del logits
        lse[r0:r1] = (top - p.gather(1, top_idx).log())[:, 0]
        if not (need_q or need_c):
            continue
        if some_ignored:
            p.masked_fill_(~has_tgt[r0:r1, None], 0.0)  # ignored queries get no gradient
        rows = has_tgt[r0:r1].nonzero()[:, 0]
        p[rows, tgt[r0 + rows]] -= 1.0
        if need_q:
            torch.mm(p, cf, out=dq[r0:r1])
        if need_c:
            dc.addmm_(p.T, qf[r0:r1])
    return lse, pos, dq, dc


# ----------------------------------------------------------------------------------------------------------
# Autograd + public entry point.
# ----------------------------------------------------------------------------------------------------------
class InfoNCEFunction(torch.autograd.Function):
    """InfoNCE without the score matrix. Saves the inputs, per-query log-sum-exp and positive score; the Triton
    backward recomputes the scores, the PyTorch path hands over the gradients it computed in forward."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        margin: float | None,
        ignore_index: int,
        use_triton: bool,
        precision: str,
        cfg: InfoNCEConfig | None,
        grad_enabled: bool,
    ) -> torch.Tensor:
        valid = targets != ignore_index
        # Kernel convention: -1 = no target (ignored query).
        tgt = torch.where(valid, targets, -1).to(torch.int32 if use_triton else torch.int64)
        need_q, need_c = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grads = (None, None)
        if use_triton:
            # The kernels keep the log-sum-exp in base 2 (what their backward consumes); the loss is in nats.
            lse, pos = _triton_infonce_forward(q, c, tgt, temperature, margin, precision, cfg)
            per_query = lse * _LN2 - pos / temperature
        else:
            lse, pos, *grads = _torch_infonce(q, c, tgt, temperature, margin, need_q, need_c)
            per_query = lse - pos / temperature
        n_valid = valid.sum()
        loss = torch.where(valid, per_query, 0).sum() / n_valid.clamp_min(1)
        # +inf log-sum-exp makes every p of an ignored query exactly 0 in backward, with no extra mask.
        lse = torch.where(valid, lse, float("inf"))
        ctx.save_for_backward(q, c, tgt, lse, pos, n_valid)
        ctx.grads = grads
        ctx.temperature, ctx.margin, ctx.use_triton, ctx.precision, ctx.cfg = (
            temperature,
            margin,
            use_triton,
            precision,
            cfg,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, c, tgt, lse, pos, n_valid = ctx.saved_tensors
        need_q, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_out.to(lse.dtype) / (n_valid.clamp_min(1).to(lse.dtype) * ctx.temperature)
        t, margin = ctx.temperature, ctx.margin
        if ctx.use_triton:
            args = (q, c, tgt, lse, pos, scale.float().reshape(1), t, margin, ctx.precision, ctx.cfg)
            dq, dc = _triton_infonce_backward(*args, need_q=need_q, need_c=need_c)
        else:
            # The unscaled gradients from forward become the gradients (scaled in place, no second buffer). A
            # second backward through a retained graph finds them handed over and recomputes them.
            dq_unscaled, dc_unscaled = ctx.grads
            ctx.grads = (None, None)
            if (need_q and dq_unscaled is None) or (need_c and dc_unscaled is None):
                _, _, dq_unscaled, dc_unscaled = _torch_infonce(q, c, tgt, t, margin, need_q, need_c)
            dq = dq_unscaled.mul_(scale).to(q.dtype) if need_q else None
            dc = dc_unscaled.mul_(scale).to(c.dtype) if need_c else None
        return dq, dc, None, None, None, None, None, None, None, None


def _matryoshka_levels(
    op: str, q: torch.Tensor, dims: Sequence[int] | None, weights: Sequence[float] | None
) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """Resolved (dims, weights) of the Matryoshka levels, or None for the single-level loss. The matryoshka module
    imports this one, hence the import here."""
    if dims is None:
        if weights is not None:
            raise ValueError(f"{op}: matryoshka_weights given without matryoshka_dims; pass the dims they weight")
        return None
    from f2llm.kernels.matryoshka import matryoshka_levels

    try:
        return matryoshka_levels(q.shape[-1], dims, weights)
    except ValueError as exc:
        raise ValueError(f"{op}: matryoshka_dims / matryoshka_weights: {exc}") from None


def _check_temperature(temperature: float, op: str) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite float > 0, got {temperature!r}")


def infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    mask_margin: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
    fp32_precision: Fp32Precision = "ieee",
    config: InfoNCEConfig | None = None,
    validate: bool = True,
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of queries ``q`` against candidates ``c``, never materializing the [B, N] scores.

    Equals ``F.cross_entropy(q @ c.T / temperature, targets, ignore_index=ignore_index)`` except when every query
    is ignored (0 with zero gradients here, nan there). With ``matryoshka_dims``: the weighted sum over prefix
    levels of the same loss on re-normalized prefixes (:mod:`f2llm.kernels.matryoshka`), in one pass.

    Args:
        q: [B, D] query embeddings (float16, bfloat16 or float32; float64 on the PyTorch path).
        c: [N, D] candidate embeddings, same dtype and device as ``q``.
        targets: [B] integer index of each query's positive in ``c``, or ``ignore_index`` to skip the query.
        temperature: logits are ``q . c / temperature``.
        mask_margin: drop candidate j != target from query i's denominator when ``q_i . c_j > q_i . c_t + m``
            (raw dot products: cosine domain for normalized embeddings, before the temperature). None = off.
        ignore_index: target value of queries that do not count.
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            PyTorch, same memory bound), or ``"auto"`` (Triton on CUDA, PyTorch on CPU).
        fp32_precision: ``tl.dot`` precision for float32 inputs: ``"ieee"`` (exact fp32) or ``"tf32"`` (tensor
            cores, ~1e-4 relative error). Ignored for 16-bit inputs and by the PyTorch path.
        config: tile sizes of the Triton kernels (:func:`infonce_config` by default).
        validate: check that targets are in ``[0, N)`` or ``ignore_index`` (one host sync). With False the caller
            guarantees it; an out-of-range target then gives a wrong loss, never a crash.
        matryoshka_dims: prefix sizes of the Matryoshka levels (resolved by
            :func:`f2llm.kernels.matryoshka.matryoshka_levels`: D is always a level). Each level's scores are
            cosines of the re-normalized prefixes (``mask_margin`` compares them) and the loss is
            ``sum_l w_l InfoNCE_l``. None (default): one level on the raw dot products, as above.
        matryoshka_weights: one weight per given dim; None: F2LLM v2's ``1 / (n sqrt(D / d_n))``.

    Returns:
        0-dim float32 loss (float64 for float64 inputs), differentiable w.r.t. ``q`` and ``c``.
    """
    op = "infonce"
    if q.dim() != 2 or c.dim() != 2:
        raise ValueError(f"{op}: q must be [B, D] and c [N, D], got q {tuple(q.shape)} and c {tuple(c.shape)}")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"{op}: embedding dims differ: q is {tuple(q.shape)}, c is {tuple(c.shape)}")
    if q.shape[0] == 0 or c.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, c {tuple(c.shape)}; need B, N, D >= 1")
    if q.dtype != c.dtype or not q.is_floating_point():
        raise ValueError(f"{op}: q and c must share one floating dtype, got q {q.dtype} and c {c.dtype}")
    if q.device != c.device or targets.device != q.device:
        raise ValueError(f"{op}: q ({q.device}), c ({c.device}) and targets ({targets.device}) must share a device")
    if targets.shape != (q.shape[0],) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"{op}: targets must be an integer tensor of shape [B] = ({q.shape[0]},), got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    _check_temperature(temperature, op)
    if mask_margin is not None and not math.isfinite(mask_margin):
        raise ValueError(f"{op}: mask_margin must be a finite float or None, got {mask_margin!r}")
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"{op}: fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    targets = targets.long()
    if validate:
        bad = ((targets < 0) | (targets >= c.shape[0])) & (targets != ignore_index)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:10]
            raise ValueError(
                f"{op}: targets at row(s) {rows.tolist()} are {targets[rows].tolist()}: each must be in [0, N) = "
                f"[0, {c.shape[0]}) or equal ignore_index ({ignore_index})"
            )
    levels = _matryoshka_levels(op, q, matryoshka_dims, matryoshka_weights)
    triton_path = use_triton(backend, q, op)
    cfg = None
    if triton_path:
        B, D = q.shape
        if config is not None:
            cfg = config
        elif levels is not None:
            from f2llm.kernels.matryoshka import matryoshka_config

            cfg = matryoshka_config(B, c.shape[0], D, q.dtype, q.device)
        else:
            cfg = infonce_config(B, c.shape[0], D, q.dtype, q.device)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        cfg = resolve_splits(cfg, B, c.shape[0], sms)
    if levels is not None:
        from f2llm.kernels.matryoshka import MatryoshkaInfoNCEFunction

        return MatryoshkaInfoNCEFunction.apply(
            q.contiguous(), c.contiguous(), targets, float(temperature),
            None if mask_margin is None else float(mask_margin), ignore_index, triton_path, fp32_precision, cfg,
            torch.is_grad_enabled(), *levels,
        )  # fmt: skip
    return InfoNCEFunction.apply(
        q.contiguous(),
        c.contiguous(),
        targets,
        float(temperature),
        None if mask_margin is None else float(mask_margin),
        ignore_index,
        triton_path,
        fp32_precision,
        cfg,
        torch.is_grad_enabled(),
    )


# ----------------------------------------------------------------------------------------------------------
# grouped_infonce: per-query groups [B, G, D]. Elementwise products in float32 (G is small: no tensor cores).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_fwd_kernel(
    q_ptr,
    docs_ptr,
    s_ptr,  # [B, G] float32 raw scores q_i . d_ig
    lse_ptr,  # [B] float32 base-2 log-sum-exp of z = s log2(e) / T (the backward's p = exp2(z - lse))
    B,
    G,
    D,
    scale_log2,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_g = offs_g < G
    q_rows = offs_b.to(tl.int64) * D
    doc_rows = (offs_b.to(tl.int64)[:, None] * G + offs_g[None, :]) * D  # [BLOCK_B, BLOCK_G]
    mask_bg = mask_b[:, None] & mask_g[None, :]
    s = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + offs_d < D
        qv = tl.load(
            q_ptr + q_rows[:, None] + (d0 + offs_d)[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0
        )
        dv = tl.load(
            docs_ptr + doc_rows[:, :, None] + (d0 + offs_d)[None, None, :],
            mask=mask_bg[:, :, None] & mask_d[None, None, :],
            other=0.0,
        )
        s += tl.sum(qv.to(tl.float32)[:, None, :] * dv.to(tl.float32), axis=2)
    z = tl.where(mask_g[None, :], s * scale_log2, float("-inf"))
    m = tl.max(z, axis=1)
    lse = m + tl.log2(tl.sum(tl.exp2(z - m[:, None]), axis=1))
    tl.store(s_ptr + offs_b[:, None] * G + offs_g[None, :], s, mask=mask_bg)
    tl.store(lse_ptr + offs_b, lse, mask=mask_b)


@triton.jit
def _grouped_bwd_kernel(
    q_ptr,
    docs_ptr,
    s_ptr,
    lse_ptr,
    scale_ptr,  # [1] float32: grad_out / (B T)
    dq_ptr,
    ddocs_ptr,
    B,
    G,
    D,
    scale_log2,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_g = offs_g < G
    mask_bg = mask_b[:, None] & mask_g[None, :]
    s = tl.load(s_ptr + offs_b[:, None] * G + offs_g[None, :], mask=mask_bg, other=0.0)
    lse2 = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    p = tl.where(mask_bg, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
    w = (p - tl.where(offs_g[None, :] == 0, 1.0, 0.0)) * tl.load(scale_ptr)  # [BLOCK_B, BLOCK_G]
    q_rows = offs_b.to(tl.int64) * D
    doc_rows = (offs_b.to(tl.int64)[:, None] * G + offs_g[None, :]) * D
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + offs_d < D
        mask_qd = mask_b[:, None] & mask_d[None, :]
        mask_3d = mask_bg[:, :, None] & mask_d[None, None, :]
        q_off = q_rows[:, None] + (d0 + offs_d)[None, :]
        doc_off = doc_rows[:, :, None] + (d0 + offs_d)[None, None, :]
        qv = tl.load(q_ptr + q_off, mask=mask_qd, other=0.0).to(tl.float32)
        dv = tl.load(docs_ptr + doc_off, mask=mask_3d, other=0.0).to(tl.float32)
        dq = tl.sum(w[:, :, None] * dv, axis=1)
        tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=mask_qd)
        dd = w[:, :, None] * qv[:, None, :]
        tl.store(ddocs_ptr + doc_off, dd.to(ddocs_ptr.dtype.element_ty), mask=mask_3d)


def _grouped_blocks(B: int, G: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_G, BLOCK_D, num_warps): about 8k elements of the [B, G, D] block in flight per program, over
    8 warps (with 4, the fp32 backward needs up to 254 registers a thread on sm_90: no margin; with 8, 170)."""
    block_g = triton.next_power_of_2(G)
    block_d = min(256, triton.next_power_of_2(D))
    block_b = max(1, min(triton.next_power_of_2(B), 8192 // (block_g * block_d)))
    return block_b, block_g, block_d, 8


class GroupedInfoNCEFunction(torch.autograd.Function):
    """Per-query softmax over [positive, hard negatives]; saves the [B, G] scores and [B] log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, docs: torch.Tensor, temperature: float, use_triton: bool) -> torch.Tensor:
        B, G, D = docs.shape
        if use_triton:
            s = torch.empty((B, G), device=q.device, dtype=torch.float32)
            lse = torch.empty((B,), device=q.device, dtype=torch.float32)
            block_b, block_g, block_d, num_warps = _grouped_blocks(B, G, D)
            _grouped_fwd_kernel[(triton.cdiv(B, block_b),)](
                q,
                docs,
                s,
                lse,
                B,
                G,
                D,
                _LOG2E / temperature,
                BLOCK_B=block_b,
                BLOCK_G=block_g,
                BLOCK_D=block_d,
                num_warps=num_warps,
            )
            loss = (lse * _LN2 - s[:, 0] / temperature).mean()  # the kernel's log-sum-exp is in base 2
        else:
            compute = torch.promote_types(q.dtype, torch.float32)
            s = torch.empty((B, G), device=q.device, dtype=compute)
            step = max(1, _TORCH_TILE_ELEMENTS // (G * D))  # bounds the float32 copy of docs
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                s[b0:b1] = torch.bmm(docs[b0:b1].to(compute), q[b0:b1].to(compute)[:, :, None])[:, :, 0]
            lse = torch.logsumexp(s / temperature, 1)
            loss = (lse - s[:, 0] / temperature).mean()
        ctx.save_for_backward(q, docs, s, lse)
        ctx.temperature, ctx.use_triton = temperature, use_triton
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, docs, s, lse = ctx.saved_tensors
        t = ctx.temperature
        B, G, D = docs.shape
        scale = (grad_out.to(s.dtype) / (B * t)).reshape(1)
        if ctx.use_triton:
            dq = torch.empty_like(q)
            ddocs = torch.empty_like(docs)
            block_b, block_g, block_d, num_warps = _grouped_blocks(B, G, D)
            _grouped_bwd_kernel[(triton.cdiv(B, block_b),)](
                q,
                docs,
                s,
                lse,
                scale,
                dq,
                ddocs,
                B,
                G,
                D,
                _LOG2E / t,
                BLOCK_B=block_b,
                BLOCK_G=block_g,
                BLOCK_D=block_d,
                num_warps=num_warps,
            )
        else:
            w = torch.exp(s / t - lse[:, None])
            w[:, 0] -= 1.0
            w.mul_(scale)
            dq = torch.bmm(w[:, None, :], docs.to(w.dtype))[:, 0].to(q.dtype)
            ddocs = (w[:, :, None] * q.to(w.dtype)[:, None, :]).to(docs.dtype)
        return dq, ddocs, None, None


def grouped_infonce(
    q: torch.Tensor,
    docs: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    backend: Backend = "auto",
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean over queries of the cross-entropy of query i over its own group ``docs[i]``, target 0.

    ``loss = mean_i [logsumexp_g(q_i . d_ig / T) - q_i . d_i0 / T]``: the F2LLM hard-negative loss with
    ``docs[:, 0]`` the positives and ``docs[:, 1:]`` each query's own hard negatives (not shared across queries).

    Args:
        q: [B, D] query embeddings.
        docs: [B, G, D] with G >= 1, same dtype and device as ``q``.
        temperature: logits are ``q . d / temperature``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA, PyTorch on CPU).
        matryoshka_dims, matryoshka_weights: Matryoshka levels as in :func:`infonce` (cosines of re-normalized
            prefixes, weighted sum over levels); None: one level on the raw dot products.

    Returns:
        0-dim float32 loss (float64 for float64 inputs), differentiable w.r.t. ``q`` and ``docs``.
    """
    op = "grouped_infonce"
    if q.dim() != 2 or docs.dim() != 3 or docs.shape[0] != q.shape[0] or docs.shape[2] != q.shape[1]:
        raise ValueError(f"{op}: need q [B, D] and docs [B, G, D], got q {tuple(q.shape)} and docs {tuple(docs.shape)}")
    if q.shape[0] == 0 or docs.shape[1] == 0 or q.shape[1] == 0:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, docs {tuple(docs.shape)}; need B, G, D >= 1")
    if q.dtype != docs.dtype or not q.is_floating_point():
        raise ValueError(f"{op}: q and docs must share one floating dtype, got q {q.dtype} and docs {docs.dtype}")
    if q.device != docs.device:
        raise ValueError(f"{op}: q is on {q.device}, docs on {docs.device}")
    _check_temperature(temperature, op)
    levels = _matryoshka_levels(op, q, matryoshka_dims, matryoshka_weights)
    triton_path = use_triton(backend, q, op)
    if levels is not None:
        from f2llm.kernels.matryoshka import MatryoshkaGroupedInfoNCEFunction

        return MatryoshkaGroupedInfoNCEFunction.apply(
            q.contiguous(), docs.contiguous(), float(temperature), triton_path, *levels
        )
    return GroupedInfoNCEFunction.apply(q.contiguous(), docs.contiguous(), float(temperature), triton_path)
