"""Matryoshka (nested-dimension) InfoNCE: every prefix level of the embeddings in one pass over D.

F2LLM v2 trains every prefix of the embedding: levels l with dims ``D = d_0 > d_1 > ... > d_{L-1}`` and weights
``w_l``. At level l queries and candidates are cut to their first ``d_l`` coordinates and L2-normalized again,
``s^l_ij = <q_i[:d_l], c_j[:d_l]> / (|q_i[:d_l]| |c_j[:d_l]|)``, and ``loss = sum_l w_l InfoNCE(s^l / T)``.

Computed level by level that is L losses. Here it costs about one:

* The prefix norms of every row come from one reduction per segment of D (``[B, L]``, ``[N, L]``); kernels take
  their inverses. The positives' cosines at every level are prefix dot products on the host (B x D work).
* Segment k of D is ``[d_{k+1}, d_k)`` (``d_L = 0``); level l covers segments ``k >= l``. The forward walks D once
  from 0 upward, segment by segment (smallest level first), and at each segment's end the running dot product is
  that level's raw score: ``s^l = acc * inv_q^l * inv_c^l`` feeds the level's own online log-sum-exp.
* Backward: with ``G^l_ij = w_l K (p^l_ij - y_ij)`` (``K = grad_out / (n_valid T)``), the normalization gives
  ``dq_i[:d_l] += sum_j G^l_ij c_j[:d_l] / (|q^l_i| |c^l_j|) - r^l_i q_i[:d_l] / |q^l_i|^2`` with the radial sum
  ``r^l_i = sum_j G^l_ij s^l_ij`` (columns likewise for dc). Segment k only sees levels ``l <= k``, so with
  ``H^k = sum_{l <= k} G^l / (|q^l| |c^l|)`` one GEMM per segment, ``dq[:, seg k] = H^k @ c[:, seg k]`` (and
  ``H^k.T @ q`` for dc), costs 2BND in all, as for one level; the radial terms are B x D / N x D elementwise work.
  The Triton backward recomputes the scores once for all levels, per chunk of candidates writes the L segment
  tiles H^k (inputs' dtype) and per-tile partial radial sums (reduced on the host: no atomics, deterministic),
  then runs :func:`~f2llm.kernels.utils.scaled_matmul` per segment.

The walk from 0 upward yields the levels smallest first, but ``H^k`` sums the levels at and above k. The kernel
keeps the running sum ``R`` of the levels done so far: before adding level k it stores ``R = sum_{l > k}`` in slot
k, at the end ``R`` is the total ``T`` and slot k becomes ``T - R_k`` (slot 0 gets its level directly, slot L-1 the
total). The PyTorch path (CPU) keeps a row block's L level tiles and sums them in level order.

``grouped_infonce`` (each query against its own G docs) keeps the raw per-level prefix dots and squared norms
([B, G, L]) from one pass over D; softmaxes and the backward's coefficients are [B, G, L] host work, and one more
pass over D writes both gradients.

Layers, top to bottom: the levels, the references (the definitions), per-row prefix statistics, the ``@triton.jit``
kernels, their host forward / backward (:func:`triton_mrl_forward`, :func:`triton_mrl_backward`), the PyTorch path
(:func:`torch_mrl_infonce`), then grouped_infonce's kernels and autograd Function. The public entry points and the
autograd Function of infonce, shared with the single-level loss, are in :mod:`f2llm.kernels.losses`; shared helpers
come from :mod:`f2llm.kernels.utils`. This module imports no other kernel module.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from f2llm.kernels.utils import (
    IGNORE_INDEX,
    LOG2E,
    InfoNCEConfig,
    bwd_chunk_n,
    cast_fp32,
    cuda_capability,
    for_each_problem,
    grouped_blocks,
    grouped_infonce_of_scores,
    infonce_config,
    infonce_of_scores,
    load_rows,
    logsumexp2,
    scaled_matmul,
    split_ranges,
    torch_tile_rows,
)

# F.normalize's eps: a prefix with a smaller norm is divided by eps instead (and gets no radial gradient term).
NORM_EPS = 1e-12
Levels = tuple[tuple[int, ...], tuple[float, ...]]


# ----------------------------------------------------------------------------------------------------------
# Levels.
# ----------------------------------------------------------------------------------------------------------
def _as_dim(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: dims must be positive integers, got {value!r}")
    try:
        dim = operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: dims must be positive integers, got {value!r}") from None
    if dim < 1:
        raise ValueError(f"{where}: dims must be positive integers, got {dim}")
    return dim


def matryoshka_levels(D: int, dims: Sequence[int] | None = None, weights: Sequence[float] | None = None) -> Levels:
    """(dims, weights) of the Matryoshka levels for embeddings of size ``D``, dims descending, ``dims[0] == D``.

    ``dims=None``: F2LLM v2's, ``[2**i for i in range(3, 15) if 2**i < D] + [D]``. Given dims: those >= D are
    dropped, D is added, duplicates are merged. ``weights=None``: v2's ``1 / (n sqrt(D / d_n))`` for the n-th level
    (n = 1, 2, ... in descending order). Given weights pair one to one with the dims as given (the defaults when
    dims is None); a dim >= D drops with its weight, so D's own weight must then be among them. Resolved levels pass
    through unchanged.
    """
    where = "matryoshka_levels"
    D = _as_dim(D, f"{where}: D")
    given = [2**i for i in range(3, 15) if 2**i < D] + [D] if dims is None else [_as_dim(d, where) for d in dims]
    if not given:
        raise ValueError(f"{where}: dims is empty; pass None for F2LLM v2's levels or at least one dim")
    if weights is None:
        out_dims = sorted({d for d in given if d < D} | {D}, reverse=True)
        return tuple(out_dims), tuple(1.0 / (n * math.sqrt(D / d)) for n, d in enumerate(out_dims, start=1))
    weights = [float(w) for w in weights]
    if len(weights) != len(given):
        raise ValueError(
            f"{where}: {len(weights)} weights for {len(given)} dims {given}: give one weight per dim, or None for "
            "v2's 1 / (n sqrt(D / d))"
        )
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"{where}: weights must be finite and > 0, got {bad}")
    paired: dict[int, float] = {}
    for d, w in zip(given, weights, strict=True):
        if d > D:
            continue  # like v2's 2**i < hidden: a level wider than the embedding does not exist
        if paired.setdefault(d, w) != w:
            raise ValueError(f"{where}: dim {d} is given twice with different weights ({paired[d]} and {w})")
    if D not in paired:
        raise ValueError(
            f"{where}: dims {given} with weights must include the full size D = {D} (every Matryoshka loss has the "
            "full-size level): add it with its weight"
        )
    out_dims = sorted(paired, reverse=True)
    return tuple(out_dims), tuple(paired[d] for d in out_dims)


def _segments(dims: Sequence[int]) -> list[tuple[int, int]]:
    """Segment k = [dims[k + 1], dims[k]) of D per level k (the last one starts at 0)."""
    return [(dims[k + 1] if k + 1 < len(dims) else 0, dims[k]) for k in range(len(dims))]


def _bounds(dims: Sequence[int]) -> tuple[int, ...]:
    """(0, d_{L-1}, ..., d_0 = D): the kernels' walk over D, segment s = [bounds[s], bounds[s + 1]) is level
    L - 1 - s."""
    return (0, *reversed(tuple(dims)))


def _bounds_tensor(dims: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(_bounds(dims), device=device, dtype=torch.int32)


def _alignment(dims: Sequence[int]) -> int:
    """Largest power of two <= 16 dividing every dim: the kernels' alignment hint for segment bounds."""
    g = math.gcd(*dims)
    return min(16, g & -g)


# ----------------------------------------------------------------------------------------------------------
# References: the definitions, one full loss per level (differentiable, promoted to >= float32).
# ----------------------------------------------------------------------------------------------------------
def matryoshka_infonce_reference(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    dims: Sequence[int],
    weights: Sequence[float],
    mask_margin: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``sum_l w_l infonce(normalize(q[:, :d_l]), normalize(c[:, :d_l]))`` with the [B, N] matrix per level."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, cf = q.to(compute), c.to(compute)
    total = qf.new_zeros(())
    for d, w in zip(dims, weights, strict=True):
        qd, cd = F.normalize(qf[:, :d], dim=-1), F.normalize(cf[:, :d], dim=-1)
        total = total + w * infonce_of_scores(qd @ cd.T, targets, temperature, mask_margin, ignore_index)
    return total


def matryoshka_grouped_infonce_reference(
    q: torch.Tensor, docs: torch.Tensor, temperature: float, dims: Sequence[int], weights: Sequence[float]
) -> torch.Tensor:
    """``sum_l w_l grouped_infonce(normalize(q[:, :d_l]), normalize(docs[..., :d_l]))``."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, df = q.to(compute), docs.to(compute)
    total = qf.new_zeros(())
    for d, w in zip(dims, weights, strict=True):
        qd, dd = F.normalize(qf[:, :d], dim=-1), F.normalize(df[..., :d], dim=-1)
        total = total + w * grouped_infonce_of_scores(torch.einsum("bd,bgd->bg", qd, dd), temperature)
    return total


# ----------------------------------------------------------------------------------------------------------
# Per-row prefix statistics (host, B x D / N x D work).
# ----------------------------------------------------------------------------------------------------------
def _to_levels(per_segment: torch.Tensor) -> torch.Tensor:
    """Per-segment sums [..., L] -> per-level prefix sums: level l adds segments k >= l."""
    return per_segment.flip(-1).cumsum(-1).flip(-1)


def _inv_prefix_norms(x: torch.Tensor, dims: Sequence[int], compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / max(|x[..., :d_l]|, eps), the radial coefficient 1 / |x[..., :d_l]|^2 or 0 below eps), [..., L] each.
    One norm reduction per segment: no float32 copy of x."""
    sq = torch.stack(
        [torch.linalg.vector_norm(x[..., lo:hi], dim=-1, dtype=compute).square() for lo, hi in _segments(dims)], -1
    )
    norm = _to_levels(sq).sqrt()
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    return inv, torch.where(norm > NORM_EPS, inv * inv, 0.0)


def _positive_cosines(
    q: torch.Tensor, c: torch.Tensor, tgt: torch.Tensor, dims: Sequence[int], inv_q: torch.Tensor, inv_c: torch.Tensor
) -> torch.Tensor:
    """[..., B, L] cosine of each query with its target at every level (0 for rows without target, ``tgt`` [B]
    < 0), for ``q`` [..., B, D] and ``c`` [..., N, D] (every problem's queries against its own candidates)."""
    has_tgt = tgt >= 0
    safe = tgt.clamp_min(0).long()
    prod = q.to(inv_q.dtype) * c.index_select(-2, safe).to(inv_q.dtype)
    dots = _to_levels(torch.stack([prod[..., lo:hi].sum(-1) for lo, hi in _segments(dims)], -1))
    return torch.where(has_tgt[:, None], dots * inv_q * inv_c.index_select(-2, safe), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Tiles: infonce_config's, adapted to the level epilogue.
# ----------------------------------------------------------------------------------------------------------
def matryoshka_config(
    B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, capability: int | None = None
) -> InfoNCEConfig:
    """Tiles of the Matryoshka kernels: :func:`infonce_config`'s with 32-candidate tiles on a GPU (and 16-wide D
    steps for fp32). The level epilogue keeps the dot accumulator live beside the level's scores (and, in backward,
    the running sum of the levels' tiles): at 128 x 64 they spill (fp32 forward, every backward); 128 x 32 tiles
    still feed wgmma. benchmarks/bench_compile.py checks every choice for sm_90 and sm_80."""
    cfg = infonce_config(B, N, D, dtype, device, capability)
    if device.type != "cuda":
        return cfg
    capability = cuda_capability(device) if capability is None else capability
    # Below 128 rows ptxas gives a program about 8k registers in all (64 a thread over 4 warps, 128 over 2):
    # the kernels sit at that cap, and the problem axis (layer exits) tipped them into 8-40 B spills. Small tiles
    # therefore run on fewer warps: 16-bit over 2, fp32 (ieee: FMA dot, operands in registers) over 1.
    if dtype != torch.float32:
        return replace(cfg, block_n=32) if cfg.block_b >= 128 else replace(cfg, block_n=32, num_warps=2)
    if cfg.block_b < 128:
        return replace(cfg, block_n=32, num_warps=1)
    # fp32 at 128 rows holds both operands' rows in registers: 16-wide D steps halve them. On Ampere the backward
    # still sat at 255 registers a thread and spilled 12 B with the problem axis: 64-row tiles there.
    big = replace(cfg, block_n=32, block_d=min(16, cfg.block_d))
    return big if capability >= 90 else replace(big, block_b=64)


def mrl_bwd_chunk_n(cfg: InfoNCEConfig, B: int, N: int, L: int) -> int:
    """Candidates per backward chunk: the single-level workspace budget shared by the L segment tiles."""
    return bwd_chunk_n(cfg, B * L, N)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels for infonce. The walk over D is a runtime loop over segments (bounds from a small int32 tensor;
# unrolled per level it doubled registers and pipelining buffers and spilled at 128-row tiles) with ALIGN, the
# largest power of two (<= 16) dividing every bound, as the loads' alignment hint.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_bounds(bounds_ptr, seg, ALIGN: tl.constexpr):
    """[lo, hi) of segment ``seg`` of the walk over D (level L - 1 - seg ends at hi), both hinted ALIGN-aligned.
    Every Matryoshka kernel walks D this way."""
    lo = tl.multiple_of(tl.load(bounds_ptr + seg), ALIGN)
    hi = tl.multiple_of(tl.load(bounds_ptr + seg + 1), ALIGN)
    return lo, hi


@triton.jit
def _mrl_fwd_kernel(
    q_ptr,  # [E, B, D]: E independent problems (layer exits) along grid axis 2, one target list for all
    c_ptr,  # [E, N, D]
    tgt_ptr,  # [B]
    inv_q_ptr,  # [E, B, L] float32 1 / |q_i[:d_l]|
    inv_c_ptr,  # [E, N, L] float32
    pos_ptr,  # [E, B, L] float32 cosine with the target at each level (the margin's threshold)
    lse_ptr,  # [splits, E, B, L] float32 base-2 log-sum-exp of z = s log2(e) / T per level and split
    bounds_ptr,  # [L + 1] int32 (0, d_{L-1}, ..., d_0 = D): segment s = [bounds[s], bounds[s + 1]) ends level L-1-s
    B,
    N,
    D,
    L,
    tiles_per_split,
    scale_log2,
    margin,
    ALIGN: tl.constexpr,
    L_PAD: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    problem = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    # Rows of the problem-major [E * B] queries and [E * N] candidates: the loop walks this problem's candidate rows
    # and the targets become rows too, so nothing else about the problem stays live.
    rows = problem * B + offs_b
    c_row0 = problem * N
    tgt = tl.load(tgt_ptr + offs_b, mask=mask_b, other=-1)
    tgt = tl.where(tgt >= 0, c_row0 + tgt, -1)
    q_off = rows.to(tl.int64) * D
    levels = tl.arange(0, L_PAD)
    # Per-level online log-sum-exp state, one column per level (updated with tl.where on the level's column).
    m = tl.full([BLOCK_B, L_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_B, L_PAD], dtype=tl.float32)
    n_begin = c_row0 + pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(c_row0 + N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        c_off = offs_n.to(tl.int64) * D
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for seg in range(0, L):
            lvl = L - 1 - seg  # the level whose prefix ends with this segment
            lo, hi = _segment_bounds(bounds_ptr, seg, ALIGN)
            for d0 in range(lo, hi, BLOCK_D):
                a = load_rows(q_ptr, q_off, mask_b, d0, hi, BLOCK_D, CAST_FP32)
                b = load_rows(c_ptr, c_off, mask_n, d0, hi, BLOCK_D, CAST_FP32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            # acc now holds the prefix dot products over [0, d_lvl): this level's cosines.
            iq = tl.load(inv_q_ptr + rows * L + lvl, mask=mask_b, other=0.0)
            ic = tl.load(inv_c_ptr + offs_n.to(tl.int64) * L + lvl, mask=mask_n, other=0.0)
            s = acc * iq[:, None] * ic[None, :]
            keep = mask_n[None, :]
            if HAS_MARGIN:
                pos = tl.load(pos_ptr + rows * L + lvl, mask=mask_b, other=0.0)
                keep = keep & ((s <= pos[:, None] + margin) | (offs_n[None, :] == tgt[:, None]))
            z = tl.where(keep, s * scale_log2, float("-inf"))
            column = levels[None, :] == lvl
            m_old = tl.max(tl.where(column, m, float("-inf")), axis=1)
            l_old = tl.sum(tl.where(column, l_sum, 0.0), axis=1)
            m_new = tl.maximum(m_old, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
            l_new = l_old * tl.exp2(m_old - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m = tl.where(column, m_new[:, None], m)
            l_sum = tl.where(column, l_new[:, None], l_sum)
    lse = tl.where(l_sum > 0, m + tl.log2(tl.maximum(l_sum, 1e-30)), float("-inf"))
    ptrs = lse_ptr + (pid_s * tl.num_programs(2) * B + rows[:, None]) * L + levels[None, :]
    tl.store(ptrs, lse, mask=mask_b[:, None] & (levels < L)[None, :])


@triton.jit
def _mrl_bwd_probs_kernel(
    q_ptr,
    c_ptr,
    tgt_ptr,
    inv_q_ptr,
    inv_c_ptr,
    pos_ptr,
    lse_ptr,  # [E, B, L] float32 base-2 log-sum-exp, +inf for rows without target (their p is then exactly 0)
    w_ptr,  # [L] float32 level weights
    h_ptr,  # [L, E, B, h_stride] inputs' dtype: slot k = H^k of the chunk (segment k's GEMM operand)
    rq_ptr,  # [n_tiles, E, B, L] float32: per candidate tile, row sums of G^l * s^l (the radial terms of dq)
    rc_ptr,  # [E, b_tiles, h_stride, L] float32: per query tile, column sums (the radial terms of dc)
    B,
    N,
    D,
    n0,
    n_count,
    h_stride,
    slot_stride,  # E * B * h_stride
    bounds_ptr,
    L,
    scale_log2,
    margin,
    ALIGN: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_N] tile of a candidate chunk: scores recomputed once for all levels, every level's
    G^l = w_l (p^l - y) (unscaled by K), its radial partial sums, and the segment tiles H^k written once."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    problem = tl.program_id(2)  # the problem (layer exit), as in the forward
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = problem * B + offs_b  # query and candidate rows of [E * B] and [E * N], targets too, as in the forward
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < n_count
    offs_n = problem * N + n0 + cols
    tgt = tl.load(tgt_ptr + offs_b, mask=mask_b, other=-1)
    tgt = tl.where(tgt >= 0, problem * N + tgt, -1)
    q_off = rows.to(tl.int64) * D
    c_off = offs_n.to(tl.int64) * D
    rc_row0 = (problem * tl.num_programs(1) + pid_b) * h_stride  # this tile's rows of [E, b_tiles, h_stride]
    tile = mask_b[:, None] & mask_n[None, :]
    # int32 offsets (the host keeps L * E * B * h_stride < 2**31): half the registers of a 64-bit pointer tile.
    h_rows = rows[:, None] * h_stride + cols[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    run = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)  # sum of the levels' A^l = G^l / (|q^l| |c^l|) so far
    for seg in range(0, L):
        lvl = L - 1 - seg
        lo, hi = _segment_bounds(bounds_ptr, seg, ALIGN)
        for d0 in range(lo, hi, BLOCK_D):
            a = load_rows(q_ptr, q_off, mask_b, d0, hi, BLOCK_D, CAST_FP32)
            b = load_rows(c_ptr, c_off, mask_n, d0, hi, BLOCK_D, CAST_FP32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        iq = tl.load(inv_q_ptr + rows * L + lvl, mask=mask_b, other=0.0)
        ic = tl.load(inv_c_ptr + offs_n.to(tl.int64) * L + lvl, mask=mask_n, other=0.0)
        lse2 = tl.load(lse_ptr + rows * L + lvl, mask=mask_b, other=float("inf"))
        s = acc * iq[:, None] * ic[None, :]
        keep = tile
        if HAS_MARGIN:
            pos = tl.load(pos_ptr + rows * L + lvl, mask=mask_b, other=0.0)
            keep = keep & ((s <= pos[:, None] + margin) | (offs_n[None, :] == tgt[:, None]))
        p = tl.where(keep, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        g = (p - tl.where((offs_n[None, :] == tgt[:, None]) & tile, 1.0, 0.0)) * tl.load(w_ptr + lvl)
        gs = g * s
        tl.store(rq_ptr + (pid_n * tl.num_programs(2) * B + rows) * L + lvl, tl.sum(gs, axis=1), mask=mask_b)
        tl.store(rc_ptr + (rc_row0 + cols) * L + lvl, tl.sum(gs, axis=0), mask=mask_n)
        a_lvl = g * iq[:, None] * ic[None, :]
        if lvl == 0:
            tl.store(h_ptr + h_rows, a_lvl.to(h_ptr.dtype.element_ty), mask=tile)  # H^0 = A^0: the full level alone
        if (lvl > 0) & (lvl < L - 1):
            tl.store(h_ptr + lvl * slot_stride + h_rows, run.to(h_ptr.dtype.element_ty), mask=tile)  # sum_{l > lvl} A^l
        run += a_lvl
    if L > 1:
        tl.store(h_ptr + (L - 1) * slot_stride + h_rows, run.to(h_ptr.dtype.element_ty), mask=tile)  # all levels
    # H^k = total - sum_{l > k} A^l for the middle segments; the barrier orders this block's stores before its
    # loads of the same addresses, whatever threads the compiler gave them.
    tl.debug_barrier()
    for k in range(1, L - 1):
        partial = tl.load(h_ptr + k * slot_stride + h_rows, mask=tile, other=0.0).to(tl.float32)
        tl.store(h_ptr + k * slot_stride + h_rows, (run - partial).to(h_ptr.dtype.element_ty), mask=tile)


# ----------------------------------------------------------------------------------------------------------
# Host forward / backward of the infonce kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
# ----------------------------------------------------------------------------------------------------------
def triton_mrl_forward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
    dims: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(lse [E, B, L], pos [E, B, L], stats) in float32 for ``q`` [E, B, D] and ``c`` [E, N, D] (E problems, one
    launch): each query's base-2 log-sum-exp per level, its positive cosine per level, and the prefix statistics
    the backward needs, ``(inv_q, rad_q, inv_c, rad_c)``."""
    inv_q, rad_q = _inv_prefix_norms(q, dims, torch.float32)
    inv_c, rad_c = _inv_prefix_norms(c, dims, torch.float32)
    pos = _positive_cosines(q, c, tgt, dims, inv_q, inv_c)
    E, B, D = q.shape
    N, L = c.shape[1], len(dims)
    per_split, splits = split_ranges(N, cfg.block_n, cfg.splits_n)
    lse_parts = torch.empty((splits, E, B, L), device=q.device, dtype=torch.float32)
    _mrl_fwd_kernel[(triton.cdiv(B, cfg.block_b), splits, E)](
        q,
        c,
        tgt,
        inv_q,
        inv_c,
        pos,
        lse_parts,
        _bounds_tensor(dims, q.device),
        B,
        N,
        D,
        L,
        per_split,
        LOG2E / temperature,
        0.0 if margin is None else float(margin),
        ALIGN=_alignment(dims),
        L_PAD=triton.next_power_of_2(L),
        HAS_MARGIN=margin is not None,
        CAST_FP32=cast_fp32(q.dtype),
        PRECISION=precision,
        BLOCK_B=cfg.block_b,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    lse = lse_parts[0] if splits == 1 else logsumexp2(lse_parts)
    return lse, pos, (inv_q, rad_q, inv_c, rad_c)


def triton_mrl_backward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    pos: torch.Tensor,
    stats: tuple[torch.Tensor, ...],
    weights: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
    dims: tuple[int, ...],
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dq, dc) in the inputs' dtype (``q`` [E, B, D], ``c`` [E, N, D]: every problem in each launch); ``scale`` =
    K = grad_out / (E n_valid T), a [1] float32 device tensor; ``lse`` and ``pos`` [E, B, L] and ``stats`` as
    :func:`triton_mrl_forward` returned them (lse +inf for rows without target); ``weights`` [L] float32.

    Per chunk: the probs kernel writes the L segment tiles H^k and radial partial sums, then per segment k
    ``dq[:, seg] += H^k @ c[chunk, seg]`` (float32 accumulator) and ``dc[chunk, seg] = K H^k.T @ q[:, seg]``:
    2BND FLOPs per gradient over all segments, as for one level. The radial terms ``- coef q[:, seg]`` are
    elementwise on the host once the partial sums are reduced (in a fixed order: deterministic).
    """
    inv_q, rad_q, inv_c, rad_c = stats
    E, B, D = q.shape
    N, L = c.shape[1], len(dims)
    segments = _segments(dims)
    chunk = mrl_bwd_chunk_n(cfg, E * B, N, L)
    b_tiles, n_tiles = triton.cdiv(B, cfg.block_b), triton.cdiv(chunk, cfg.block_n)
    if L * E * B * chunk >= 2**31:  # the kernel's int32 offsets into the slots
        raise ValueError(
            f"infonce (matryoshka): backward workspace of {L} levels x {E} x {B} queries x {chunk} candidates passes "
            "2**31 elements; lower InfoNCEConfig.chunk_n"
        )
    h = torch.empty((L, E, B, chunk), device=q.device, dtype=q.dtype)
    rq_part = torch.empty((n_tiles, E, B, L), device=q.device, dtype=torch.float32)
    rc_part = torch.empty((E, b_tiles, chunk, L), device=q.device, dtype=torch.float32)
    rq = torch.zeros((E, B, L), device=q.device, dtype=torch.float32)
    bounds = _bounds_tensor(dims, q.device)
    dq = torch.zeros((E, B, D), device=q.device, dtype=torch.float32) if need_q else None
    dc = torch.empty_like(c) if need_c else None
    for n0 in range(0, N, chunk):
        width = min(chunk, N - n0)
        tiles = triton.cdiv(width, cfg.block_n)
        _mrl_bwd_probs_kernel[(tiles, b_tiles, E)](
            q,
            c,
            tgt,
            inv_q,
            inv_c,
            pos,
            lse,
            weights,
            h,
            rq_part,
            rc_part,
            B,
            N,
            D,
            n0,
            width,
            chunk,
            E * B * chunk,
            bounds,
            L,
            LOG2E / temperature,
            0.0 if margin is None else float(margin),
            ALIGN=_alignment(dims),
            HAS_MARGIN=margin is not None,
            CAST_FP32=cast_fp32(q.dtype),
            PRECISION=precision,
            BLOCK_B=cfg.block_b,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        c_chunk = c[:, n0 : n0 + width]
        for k, (lo, hi) in enumerate(segments):
            hk = h[k, :, :, :width]
            if need_q:
                scaled_matmul(hk, c_chunk[..., lo:hi], dq[..., lo:hi], scale, transpose_a=False, accumulate=True,
                               precision=precision)  # fmt: skip
            if need_c:
                scaled_matmul(hk, q[..., lo:hi], dc[:, n0 : n0 + width, lo:hi], scale, transpose_a=True,
                               accumulate=False, precision=precision)  # fmt: skip
        if need_q:
            rq += rq_part[:tiles].sum(0)
        if need_c:
            coef = (rc_part[:, :, :width].sum(1) * rad_c[:, n0 : n0 + width]).cumsum(-1) * scale
            _subtract_radial(dc[:, n0 : n0 + width], c_chunk, coef, segments)
    if need_q:
        _subtract_radial(dq, q, (rq * rad_q).cumsum(-1), segments)
        dq = dq.mul_(scale).to(q.dtype)
    return dq, dc


def _subtract_radial(
    grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, segments: Sequence[tuple[int, int]]
) -> None:
    """``grad[..., seg k] -= coef[..., k] * x[..., seg k]`` in place (the normalization's radial terms; ``coef``
    already summed over the levels covering each segment). addcmul_ computes in float32 without a copy of x."""
    for k, (lo, hi) in enumerate(segments):
        grad[..., lo:hi].addcmul_(x[..., lo:hi], coef[..., k : k + 1], value=-1.0)


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (CPU): blocks of query rows against all candidates, like contrastive.torch_infonce. Per row
# block the raw prefix dots of every level come from one chain of segment matmuls (smallest level first, BND
# FLOPs in all, each level's tile written once); then the levels largest first: each one's softmax is exact at
# once, its gradient tile is added to the running H (levels l <= k) and segment k's gradient GEMMs follow. Buffers
# are allocated once and reused by every block; the passes over a tile are in place. Blocks as large as the memory
# bound allows: measured on 2 EPYC cores, L2-sized blocks (16-26 rows) made it slower (0.62 s vs 0.37 s at
# B = N = 2048), the small GEMMs and the per-block [N, D] read-modify-write of dc outweighing the cached passes.
# ----------------------------------------------------------------------------------------------------------
# Gradient GEMMs of segments narrower than this (v2's two 8-wide ones) are computed transposed: with torch 2.13's
# CPU BLAS, [64, 2048] @ [2048, 8] took 0.9 ms as written and 0.05 ms as (c.T @ h.T).T (16 wide: about equal).
_TORCH_MRL_NARROW = 16
# exp(logit - 1/T) needs no row maximum while the row sum cannot underflow: every logit is >= -1/T.
_FIXED_SHIFT_MAX_SPAN = 64.0


def _torch_mrl_block_rows(N: int, L: int) -> int:
    """Query rows per block of the PyTorch path: its L + 2 live [rows, N] tiles within two tiles of the PyTorch
    paths' budget, the single-level path's peak (its logits and probabilities tiles), at least one row.
    (Half that made B = N = 4096 about 10% slower on 2 threads: GEMMs of ~100 rows split poorly.)"""
    return torch_tile_rows(N * (L + 2), tiles=2)


def torch_mrl_infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    dims: tuple[int, ...],
    weights: tuple[float, ...],
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(lse [E, B, L] natural log, positive cosines [E, B, L], unscaled dq or None, unscaled dc or None) for ``q``
    [E, B, D] and ``c`` [E, N, D]: the problems one after the other, as :func:`contrastive.torch_infonce`."""
    args = (tgt, temperature, margin, dims, weights)
    return for_each_problem(_torch_mrl_one, q, c, need_q, need_c, *args)


def _torch_mrl_one(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    dims: tuple[int, ...],
    weights: tuple[float, ...],
    dq: torch.Tensor | None,
    dc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One problem of :func:`torch_mrl_infonce`: (lse [B, L], pos [B, L]); the unscaled gradients are written into
    ``dq`` [B, D] and added into ``dc`` [N, D] (zeros) when given."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, cf = q.to(compute), c.to(compute)
    B, N, L = q.shape[0], c.shape[0], len(dims)
    segments = _segments(dims)
    inv_q, rad_q = _inv_prefix_norms(qf, dims, compute)
    inv_c, rad_c = _inv_prefix_norms(cf, dims, compute)
    pos = _positive_cosines(qf, cf, tgt, dims, inv_q, inv_c)
    has_tgt = tgt >= 0
    valid = has_tgt.to(compute)
    need_q, need_c = dq is not None, dc is not None
    need = need_q or need_c
    # Cosines are within [-1, 1] (the eps clamp only shrinks them), so logits are within +-1/T: shifting by 1/T
    # instead of the row maximum keeps exp <= 1 and the row sum >= exp(-2/T), exact enough while that is normal.
    fixed_shift = 2.0 / temperature <= _FIXED_SHIFT_MAX_SPAN
    row_scale = (inv_q / temperature).T.contiguous()  # [L, B]: logits = dots * row_scale * col_scale
    col_scale = inv_c.T.contiguous()  # [L, N]
    inv_q_t = inv_q.T.contiguous()
    pos_logit = (pos / temperature).T.contiguous()  # [L, B]
    lse = torch.empty((L, B), device=q.device, dtype=compute)
    rq = torch.zeros((L, B), device=q.device, dtype=compute)
    rc = torch.zeros((L, N), device=q.device, dtype=compute)
    cols = torch.arange(N, device=q.device)
    fill = torch.finfo(compute).min  # masked logits: exp gives exactly 0, and 0 * fill is 0 (-inf would give nan)
    step = _torch_mrl_block_rows(N, L)
    dots_buf = torch.empty((L, min(step, B), N), device=q.device, dtype=compute)
    exp_buf = torch.empty((min(step, B), N), device=q.device, dtype=compute)
    h_buf = torch.empty_like(exp_buf) if need else None
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        n = r1 - r0
        dots, e = dots_buf[:, :n], exp_buf[:n]
        q_blk, tgt_blk, v_blk = qf[r0:r1], tgt[r0:r1], valid[r0:r1]
        lo, hi = segments[L - 1]
        torch.mm(q_blk[:, lo:hi], cf[:, lo:hi].T, out=dots[L - 1])
        for k in range(L - 2, -1, -1):  # level k's prefix = level k + 1's plus segment k
            lo, hi = segments[k]
            torch.addmm(dots[k + 1], q_blk[:, lo:hi], cf[:, lo:hi].T, out=dots[k])
        if need:
            rows = has_tgt[r0:r1].nonzero()[:, 0]
            tgt_rows = tgt_blk[rows]
        if fixed_shift:
            shift = torch.full((n, 1), 1.0 / temperature, device=q.device, dtype=compute)
        for k in range(L):  # largest level first: H^k = sum_{l <= k} A^l is a running sum
            y = dots[k].mul_(row_scale[k, r0:r1, None])
            if fixed_shift:
                y.mul_(col_scale[k])
                y.sub_(1.0 / temperature)
            else:
                y.mul_(col_scale[k])
                shift = y.amax(1, keepdim=True)
                y.sub_(shift)
            if margin is not None:
                limit = (pos_logit[k, r0:r1] + margin / temperature)[:, None] - shift
                y.masked_fill_((y > limit) & (cols[None, :] != tgt_blk[:, None]), fill)
            torch.exp(y, out=e)
            row_sum = e.sum(1)
            lse[k, r0:r1] = shift[:, 0] + row_sum.log()
            if not need:
                continue
            # G = w (p - onehot) with p = e / row_sum; radial sums of G * s (s = T * (y + shift)), targets'
            # terms from the positive cosines; ignored rows (v = 0) contribute nothing.
            inv_sum = v_blk / row_sum
            y.mul_(e)  # e * y
            w_t = weights[k] * temperature
            rq[k, r0:r1] = w_t * v_blk * (y.sum(1) * inv_sum + shift[:, 0] - pos_logit[k, r0:r1])
            rc[k].addmv_(y.T, inv_sum, alpha=w_t).addmv_(e.T, inv_sum * shift[:, 0], alpha=w_t)
            rc[k].index_add_(0, tgt_rows, pos_logit[k, r0 + rows], alpha=-w_t)
            # A^k = G / (|q^k| |c^k|) added to H; the one-hot part at each row's target.
            e.mul_((weights[k] * inv_sum * inv_q_t[k, r0:r1])[:, None])
            h = h_buf[:n]
            if k == 0:
                torch.mul(e, col_scale[k], out=h)
            else:
                h.addcmul_(e, col_scale[k][None, :])
            h.index_put_(
                (rows, tgt_rows), -weights[k] * inv_q_t[k, r0 + rows] * col_scale[k, tgt_rows], accumulate=True
            )
            lo, hi = segments[k]
            if hi - lo < _TORCH_MRL_NARROW:  # the [.., N] x [N, 8] products run far faster transposed
                if need_q:
                    dq[r0:r1, lo:hi] = (cf[:, lo:hi].T @ h.T).T
                if need_c:
                    dc[:, lo:hi] += (q_blk[:, lo:hi].T @ h).T
            else:
                if need_q:
                    dq[r0:r1, lo:hi] = h @ cf[:, lo:hi]
                if need_c:
                    dc[:, lo:hi].addmm_(h.T, q_blk[:, lo:hi])
    if need_q:
        _subtract_radial(dq, qf, (rq.T * rad_q).cumsum(1), segments)
    if need_c:
        _subtract_radial(dc, cf, (rc.T * rad_c).cumsum(1), segments)
    return lse.T.contiguous(), pos


# ----------------------------------------------------------------------------------------------------------
# grouped_infonce: each query against its own G docs. One pass over D keeps the raw prefix dots and squared norms
# at every boundary; the rest is [B, G, L] work on the host. Both kernels walk the same blocks of D for the same
# queries x docs, so they share their indexing (_group_tile, _group_block).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _group_tile(B, G, D, L, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's BLOCK_B queries x BLOCK_G docs: (query indices, their mask, the [BLOCK_B, BLOCK_G] mask,
    element offsets of the query rows (int64), of the doc rows ([BLOCK_B, BLOCK_G], int64), and of each
    (query, doc)'s level-0 entry in the [B, G, L] statistics)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_g = tl.arange(0, BLOCK_G)
    mask_b = offs_b < B
    mask_bg = mask_b[:, None] & (offs_g < G)[None, :]
    q_rows = offs_b.to(tl.int64) * D
    doc_rows = (offs_b.to(tl.int64)[:, None] * G + offs_g[None, :]) * D
    out_bg = (offs_b[:, None] * G + offs_g[None, :]) * L
    return offs_b, mask_b, mask_bg, q_rows, doc_rows, out_bg


@triton.jit
def _group_block(q_ptr, docs_ptr, q_rows, doc_rows, mask_b, mask_bg, d0, hi, BLOCK_D: tl.constexpr):
    """Columns d0 .. d0 + BLOCK_D (those below ``hi``) of the tile's queries [BLOCK_B, BLOCK_D] and docs
    [BLOCK_B, BLOCK_G, BLOCK_D] in float32, with their element offsets and masks (where gradients are stored)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < hi
    mask_qd = mask_b[:, None] & mask_d[None, :]
    mask_3d = mask_bg[:, :, None] & mask_d[None, None, :]
    q_off = q_rows[:, None] + offs_d[None, :]
    doc_off = doc_rows[:, :, None] + offs_d[None, None, :]
    qv = tl.load(q_ptr + q_off, mask=mask_qd, other=0.0).to(tl.float32)
    dv = tl.load(docs_ptr + doc_off, mask=mask_3d, other=0.0).to(tl.float32)
    return qv, dv, q_off, doc_off, mask_qd, mask_3d


@triton.jit
def _mrl_grouped_fwd_kernel(
    q_ptr,
    docs_ptr,
    dot_ptr,  # [B, G, L] float32 q_i[:d_l] . d_ig[:d_l]
    dsq_ptr,  # [B, G, L] float32 |d_ig[:d_l]|^2
    qsq_ptr,  # [B, L] float32 |q_i[:d_l]|^2
    bounds_ptr,
    B,
    G,
    D,
    L,
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_b, mask_b, mask_bg, q_rows, doc_rows, out_bg = _group_tile(B, G, D, L, BLOCK_B, BLOCK_G)
    s = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    dd = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    qq = tl.zeros([BLOCK_B], dtype=tl.float32)
    for seg in range(0, L):
        lvl = L - 1 - seg
        lo, hi = _segment_bounds(bounds_ptr, seg, ALIGN)
        for d0 in range(lo, hi, BLOCK_D):
            qv, dv, _, _, _, _ = _group_block(q_ptr, docs_ptr, q_rows, doc_rows, mask_b, mask_bg, d0, hi, BLOCK_D)
            s += tl.sum(qv[:, None, :] * dv, axis=2)
            dd += tl.sum(dv * dv, axis=2)
            qq += tl.sum(qv * qv, axis=1)
        tl.store(dot_ptr + out_bg + lvl, s, mask=mask_bg)
        tl.store(dsq_ptr + out_bg + lvl, dd, mask=mask_bg)
        tl.store(qsq_ptr + offs_b * L + lvl, qq, mask=mask_b)


@triton.jit
def _mrl_grouped_bwd_kernel(
    q_ptr,
    docs_ptr,
    h_ptr,  # [B, G, L] float32 H^k_ig = sum_{l <= k} W^l_ig / (|q^l_i| |d^l_ig|), W = w K (p - y)
    cq_ptr,  # [B, L] float32 sum_{l <= k} (sum_g W^l_ig s^l_ig) / |q^l_i|^2
    cd_ptr,  # [B, G, L] float32 sum_{l <= k} W^l_ig s^l_ig / |d^l_ig|^2
    dq_ptr,
    ddocs_ptr,
    bounds_ptr,
    B,
    G,
    D,
    L,
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq[:, seg k] = sum_g H^k d[:, g, seg] - cq^k q[:, seg]; ddocs[:, g, seg] = H^k q[:, seg] - cd^k d[:, g, seg]."""
    offs_b, mask_b, mask_bg, q_rows, doc_rows, out_bg = _group_tile(B, G, D, L, BLOCK_B, BLOCK_G)
    for seg in range(0, L):
        lvl = L - 1 - seg
        lo, hi = _segment_bounds(bounds_ptr, seg, ALIGN)
        h = tl.load(h_ptr + out_bg + lvl, mask=mask_bg, other=0.0)
        cd = tl.load(cd_ptr + out_bg + lvl, mask=mask_bg, other=0.0)
        cq = tl.load(cq_ptr + offs_b * L + lvl, mask=mask_b, other=0.0)
        for d0 in range(lo, hi, BLOCK_D):
            qv, dv, q_off, doc_off, mask_qd, mask_3d = _group_block(
                q_ptr, docs_ptr, q_rows, doc_rows, mask_b, mask_bg, d0, hi, BLOCK_D
            )
            dq = tl.sum(h[:, :, None] * dv, axis=1) - cq[:, None] * qv
            tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=mask_qd)
            dd = h[:, :, None] * qv[:, None, :] - cd[:, :, None] * dv
            tl.store(ddocs_ptr + doc_off, dd.to(ddocs_ptr.dtype.element_ty), mask=mask_3d)


# Elements of docs per block of queries in the grouped PyTorch path: each block's buffer (forward) or gradient
# slice (backward) is touched twice, the second time from cache at this size (4 MiB in float32; at B = 4096,
# G = 8, D = 1024 the forward took 29 ms with it, 57 ms with 16 MiB blocks).
_GROUPED_TORCH_BLOCK = 1 << 20


def _prefix_matrix(dims: tuple[int, ...], D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[L, D] 0/1: row l selects level l's prefix [0, d_l). ``P @ x.T`` gives every level's prefix sum in one GEMM."""
    return (torch.arange(D, device=device)[None, :] < torch.tensor(dims, device=device)[:, None]).to(dtype)


def _prefix_sums(x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., L] prefix sums at every level. As prefix @ x.T: x @ prefix.T ([rows, D] @ [D, 8]) ran 2.5x
    slower with torch 2.13's CPU BLAS."""
    return (prefix @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], prefix.shape[0])


def _grouped_prefix_torch(
    q: torch.Tensor, docs: torch.Tensor, dims: tuple[int, ...], compute: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dots [B, G, L], |d|^2 [B, G, L], |q|^2 [B, L]) at every level: per bounded block of queries, the products
    q_i * d_ig and d_ig^2 reduced to every prefix by one GEMM each."""
    B, G, D = docs.shape
    L = len(dims)
    prefix = _prefix_matrix(dims, D, compute, q.device)
    dots = torch.empty((B, G, L), device=q.device, dtype=compute)
    dsq = torch.empty_like(dots)
    step = max(1, _GROUPED_TORCH_BLOCK // (G * D))
    prod = torch.empty((min(step, B), G, D), device=q.device, dtype=compute)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        qb, db, pb = q[b0:b1].to(compute), docs[b0:b1].to(compute), prod[: b1 - b0]
        torch.mul(db, qb[:, None, :], out=pb)
        dots[b0:b1] = _prefix_sums(pb, prefix)
        torch.mul(db, db, out=pb)
        dsq[b0:b1] = _prefix_sums(pb, prefix)
    qf = q.to(compute)
    return dots, dsq, _prefix_sums(qf * qf, prefix)


def _inv_and_radial(sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = sq.clamp_min(0).sqrt()
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    return inv, torch.where(norm > NORM_EPS, inv * inv, 0.0)


class MatryoshkaGroupedInfoNCEFunction(torch.autograd.Function):
    """Per-query softmax over [positive, hard negatives] at every level; saves the [B, G, L] cosines."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        docs: torch.Tensor,
        temperature: float,
        use_triton: bool,
        dims: tuple[int, ...],
        weights: tuple[float, ...],
    ) -> torch.Tensor:
        B, G, D = docs.shape
        L = len(dims)
        if use_triton:
            dots = torch.empty((B, G, L), device=q.device, dtype=torch.float32)
            dsq, qsq = torch.empty_like(dots), torch.empty((B, L), device=q.device, dtype=torch.float32)
            block_b, block_g, block_d, num_warps = grouped_blocks(B, G, D)
            _mrl_grouped_fwd_kernel[(triton.cdiv(B, block_b),)](
                q, docs, dots, dsq, qsq, _bounds_tensor(dims, q.device), B, G, D, L, ALIGN=_alignment(dims),
                BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps,
            )  # fmt: skip
        else:
            dots, dsq, qsq = _grouped_prefix_torch(q, docs, dims, torch.promote_types(q.dtype, torch.float32))
        inv_q, rad_q = _inv_and_radial(qsq)
        inv_d, rad_d = _inv_and_radial(dsq)
        s = dots * inv_q[:, None, :] * inv_d  # [B, G, L] cosines
        lse = torch.logsumexp(s / temperature, 1)  # [B, L]
        w = torch.tensor(weights, device=q.device, dtype=s.dtype)
        loss = ((lse - s[:, 0] / temperature).mean(0) * w).sum()
        ctx.save_for_backward(q, docs, s, lse, w, inv_q, rad_q, inv_d, rad_d)
        ctx.temperature, ctx.use_triton, ctx.dims = temperature, use_triton, dims
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, docs, s, lse, w, inv_q, rad_q, inv_d, rad_d = ctx.saved_tensors
        t, dims = ctx.temperature, ctx.dims
        B, G, D = docs.shape
        g = torch.exp(s / t - lse[:, None, :])
        g[:, 0] -= 1.0
        g = g * (w * (grad_out.to(s.dtype) / (B * t)))  # W^l = w_l K (p^l - y)
        gs = g * s
        h = (g * inv_q[:, None, :] * inv_d).cumsum(-1)  # level order: segment k gets the levels l <= k
        cq = (gs.sum(1) * rad_q).cumsum(-1)
        cd = (gs * rad_d).cumsum(-1)
        if ctx.use_triton:
            dq, ddocs = torch.empty_like(q), torch.empty_like(docs)
            block_b, block_g, block_d, num_warps = grouped_blocks(B, G, D)
            _mrl_grouped_bwd_kernel[(triton.cdiv(B, block_b),)](
                q, docs, h.float().contiguous(), cq.float().contiguous(), cd.float().contiguous(), dq, ddocs,
                _bounds_tensor(dims, q.device), B, G, D, len(dims), ALIGN=_alignment(dims), BLOCK_B=block_b,
                BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps,
            )  # fmt: skip
            return dq, ddocs, None, None, None, None
        compute = s.dtype
        # Per segment, written straight into the gradients (broadcast [rows, G, 1] coefficients, no expanded copy).
        dq = torch.empty_like(q, dtype=compute)
        ddocs = torch.empty_like(docs, dtype=compute)
        step = max(1, _GROUPED_TORCH_BLOCK // (G * D))
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            qb, db = q[b0:b1].to(compute), docs[b0:b1].to(compute)
            for k, (lo, hi) in enumerate(_segments(dims)):
                hk = h[b0:b1, :, k, None]
                out = ddocs[b0:b1, :, lo:hi]
                torch.mul(hk, qb[:, None, lo:hi], out=out)
                out.addcmul_(cd[b0:b1, :, k, None], db[:, :, lo:hi], value=-1.0)
                gathered = torch.bmm(hk.transpose(1, 2), db[:, :, lo:hi])[:, 0]  # sum_g H d (a strided out= loops)
                torch.addcmul(gathered, cq[b0:b1, k, None], qb[:, lo:hi], value=-1.0, out=dq[b0:b1, lo:hi])
        return dq.to(q.dtype), ddocs.to(docs.dtype), None, None, None, None
