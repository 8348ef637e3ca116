"""Plain InfoNCE, the contrastive losses on raw dot products, without the query x candidate score matrix.

Two losses, whose public entry points :func:`~f2llm.kernels.losses.infonce` and
:func:`~f2llm.kernels.losses.grouped_infonce` (argument checks, tile choice, the autograd Function of infonce)
live in :mod:`f2llm.kernels.losses`; this module holds their definitions, Triton kernels and PyTorch paths:

* infonce: ``q`` [B, D] against a shared pool ``c`` [N, D] (the in-batch loss). For every query i with a
  target t(i) (``targets[i] != ignore_index``)::

      loss_i = logsumexp_j(q_i . c_j / T) - q_i . c_t(i) / T        loss = mean_i loss_i

  which is ``F.cross_entropy(q @ c.T / T, targets, ignore_index=...)`` without the [B, N] matrix.

  Triton (CUDA): the forward pass streams candidate tiles through an online log-sum-exp (flash-attention style)
  and keeps only the per-query log-sum-exp (float32, [B]; base 2, as the backward uses it) and positive score
  (float32, [B]). Backward, ``dq_i = K sum_j (p_ij - y_ij) c_j`` and ``dc_j = K sum_i (p_ij - y_ij) q_i`` with
  ``K = grad_out / (n_valid T)``, goes through the candidates in chunks: a kernel recomputes the chunk's scores
  and writes its (p - y) [B, chunk] once in the inputs' dtype, then two tensor-core GEMMs
  (:func:`~f2llm.kernels.utils.scaled_matmul`) multiply it into dq (a float32 accumulator) and into dc's rows of
  the chunk. That is four GEMMs in all, forward included (8BND FLOPs), no atomics and no ordering between
  threads. Extra memory: O(B + N) floats, the (p - y) chunk (``utils._BWD_WORKSPACE_ELEMENTS``) and, for 16-bit
  inputs, dq's float32 accumulator.

  PyTorch (CPU): blocks of query rows against all candidates, at most ``utils._TORCH_TILE_ELEMENTS`` scores at a
  time (16 MiB in float32; at least one row). A block sees every candidate, so its softmax is exact at once and,
  when an input requires grad, the gradient contributions are taken from the same tile in forward (three matmuls
  per tile, like the unfused version, instead of a fourth to recompute scores); backward scales them by
  ``grad_out``. Extra memory: two tiles plus float32 gradient buffers that become the gradients.

* grouped_infonce: each query against its own group ``docs`` [B, G, D] (positive at index 0, then its hard
  negatives), ``loss = mean_i [logsumexp_g(q_i . d_ig / T) - q_i . d_i0 / T]``. One fused pass; the [B, G]
  scores are kept for backward (:class:`GroupedInfoNCEFunction`).

Conventions shared by both (and by their Matryoshka forms in :mod:`f2llm.kernels.matryoshka`):

* All arithmetic accumulates in float32 (float64 inputs stay float64 on the PyTorch path). The loss is a float32
  0-dim tensor (float64 for float64 inputs); gradients come back in the inputs' dtypes.
* Queries whose target is ``ignore_index`` contribute nothing. When every query is ignored the loss is 0 and the
  gradients are 0 (``F.cross_entropy`` returns nan there): a batch without any valid query then leaves the
  weights untouched instead of poisoning them with nan.
* ``mask_margin=m`` (off by default) drops candidate j != t(i) from query i's denominator when
  ``q_i . c_j > q_i . c_t(i) + m``: a likely false negative (Qwen3-Embedding's filter). The comparison is on raw
  dot products, i.e. in the cosine domain for L2-normalized embeddings, before division by the temperature. The
  mask is a constant of the loss (no gradient flows through the comparison).

Layers, top to bottom: the references (:func:`infonce_reference`, :func:`grouped_infonce_reference`), the
``@triton.jit`` kernels, their host forward / backward (:func:`triton_infonce_forward`,
:func:`triton_infonce_backward`), the PyTorch path (:func:`torch_infonce`), then grouped_infonce's kernels and
autograd Function. Shared helpers come from :mod:`f2llm.kernels.utils`; this module imports no other kernel module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from f2llm.kernels.utils import (
    DEFAULT_TEMPERATURE,
    IGNORE_INDEX,
    LN2,
    LOG2E,
    InfoNCEConfig,
    bwd_chunk_n,
    cast_fp32,
    for_each_problem,
    grouped_blocks,
    grouped_infonce_of_scores,
    infonce_of_scores,
    load_rows,
    logsumexp2,
    scaled_matmul,
    split_ranges,
    torch_tile_rows,
)


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
    return infonce_of_scores(q.to(compute) @ c.to(compute).T, targets, temperature, mask_margin, ignore_index)


def grouped_infonce_reference(
    q: torch.Tensor, docs: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Each query ``q`` [B, D] against its own ``docs`` [B, G, D] (positive first), the definition."""
    compute = torch.promote_types(q.dtype, torch.float32)
    return grouped_infonce_of_scores(torch.einsum("bd,bgd->bg", q.to(compute), docs.to(compute)), temperature)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels for infonce. Scores s_ij = q_i . c_j accumulate in float32 over D chunks of BLOCK_D; softmax
# arithmetic runs in base 2 (exp2/log2) with z = s * log2(e) / T. Targets arrive remapped: -1 = no target.
# Row offsets are int64: N * D passes 2**31 for large candidate pools at D = 2560.
# ----------------------------------------------------------------------------------------------------------
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
        a = load_rows(a_ptr, a_off, a_mask, d0, D, BLOCK_D, CAST_FP32)
        b = load_rows(b_ptr, b_off, b_mask, d0, D, BLOCK_D, CAST_FP32)
        s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _infonce_fwd_kernel(
    q_ptr,  # [E, B, D]: E independent problems (layer exits) along grid axis 2, one target list for all
    c_ptr,  # [E, N, D]
    tgt_ptr,  # [B]
    lse_ptr,  # [splits, E, B] float32: base-2 log-sum-exp of z = s log2(e) / T over each split's candidates
    pos_ptr,  # [E, B] float32: q_i . c_t(i) (0 for rows without target)
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
    problem = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    # Rows of the problem-major [E * B] queries and [E * N] candidates: the loop walks this problem's candidate rows
    # and the targets become rows too, so nothing else about the problem stays live.
    rows = problem * B + offs_b
    c_row0 = problem * N
    tgt = tl.load(tgt_ptr + offs_b, mask=mask_b, other=-1)
    has_tgt = mask_b & (tgt >= 0)
    tgt = tl.where(has_tgt, c_row0 + tgt, -1)
    q_off = rows.to(tl.int64) * D
    t_off = tl.where(has_tgt, tgt, 0).to(tl.int64) * D

    # Positive score: a gather of each query's target row, exact fp32 products.
    pos = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        qv = load_rows(q_ptr, q_off, mask_b, d0, D, BLOCK_D, True)
        cv = load_rows(c_ptr, t_off, has_tgt, d0, D, BLOCK_D, True)
        pos += tl.sum(qv * cv, axis=1)

    if ONE_D:  # the whole query block stays in registers across candidate tiles
        q_blk = load_rows(q_ptr, q_off, mask_b, 0, D, BLOCK_D, CAST_FP32)
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_begin = c_row0 + pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(c_row0 + N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        c_off = offs_n.to(tl.int64) * D
        if ONE_D:
            c_blk = load_rows(c_ptr, c_off, mask_n, 0, D, BLOCK_D, CAST_FP32)
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
    tl.store(lse_ptr + pid_s * tl.num_programs(2) * B + rows, lse, mask=mask_b)
    if pid_s == 0:
        tl.store(pos_ptr + rows, pos, mask=mask_b)


@triton.jit
def _infonce_bwd_probs_kernel(
    q_ptr,
    c_ptr,
    tgt_ptr,
    lse_ptr,  # [E, B] float32 base-2 log-sum-exp, +inf for rows without target (their p is then exactly 0)
    pos_ptr,  # [E, B]
    g_ptr,  # [E, B, g_stride] (p_ij - y_ij) for candidates n0 .. n0 + n_count, in the inputs' dtype
    B,
    N,
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
    along grid axis 0 (up to 2**31 - 1 programs; axis 1 stops at 65535), problems along axis 2."""
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
    lse2 = tl.load(lse_ptr + rows, mask=mask_b, other=float("inf"))
    s = _dot_rows(
        q_ptr,
        rows.to(tl.int64) * D,
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
        pos = tl.load(pos_ptr + rows, mask=mask_b, other=0.0)
        keep = keep & ((s <= pos[:, None] + margin) | (offs_n[None, :] == tgt[:, None]))
    p = tl.where(keep, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
    g = p - tl.where(offs_n[None, :] == tgt[:, None], 1.0, 0.0)
    ptrs = g_ptr + rows.to(tl.int64)[:, None] * g_stride + cols[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host forward / backward of the infonce kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
# ----------------------------------------------------------------------------------------------------------
def triton_infonce_forward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [E, B], pos [E, B]) in float32 for ``q`` [E, B, D] and ``c`` [E, N, D] (E problems, one launch): each
    query's base-2 log-sum-exp (the backward's input) and positive score. With several splits (``cfg.splits_n``)
    each writes its candidates' log-sum-exp, combined here."""
    E, B, D = q.shape
    N = c.shape[1]
    per_split, splits = split_ranges(N, cfg.block_n, cfg.splits_n)
    lse_parts = torch.empty((splits, E, B), device=q.device, dtype=torch.float32)
    pos = torch.empty((E, B), device=q.device, dtype=torch.float32)
    _infonce_fwd_kernel[(triton.cdiv(B, cfg.block_b), splits, E)](
        q,
        c,
        tgt,
        lse_parts,
        pos,
        B,
        N,
        D,
        per_split,
        LOG2E / temperature,
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
    return (lse_parts[0] if splits == 1 else logsumexp2(lse_parts)), pos


def triton_infonce_backward(
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
    """(dq, dc) in the inputs' dtype (``q`` [E, B, D], ``c`` [E, N, D]: every problem in each launch), ``scale`` =
    grad_out / (E n_valid T) as a [1] float32 device tensor.

    Per chunk of candidates: one kernel writes G = (p - y) [B, chunk] once, then two GEMMs consume it,
    ``dq += G @ c[chunk]`` (float32 accumulator, scaled once at the end) and ``dc[chunk] = scale G^T @ q``
    (complete: every query is in G).

    FLOPs: 2BND to recompute the scores + 2BND per wanted gradient; with the forward's 2BND, 8BND for both
    gradients: four GEMMs. Bytes beyond streaming q and c through the GEMMs: G is written once and read twice
    (3BN x the dtype's size), dq's float32 accumulator is read and written once per chunk (8BD bytes per
    chunk). Memory: G's chunk (:func:`~f2llm.kernels.utils.bwd_chunk_n`) plus, for 16-bit inputs, the float32 dq
    accumulator [B, D]. Every program owns the tile it writes: no atomics, no barrier, deterministic.
    """
    E, B, D = q.shape
    N = c.shape[1]
    chunk = bwd_chunk_n(cfg, E * B, N)
    probs = torch.empty((E, B, chunk), device=q.device, dtype=q.dtype)
    dq = torch.zeros((E, B, D), device=q.device, dtype=torch.float32) if need_q else None
    dc = torch.empty_like(c) if need_c else None
    for n0 in range(0, N, chunk):
        width = min(chunk, N - n0)
        _infonce_bwd_probs_kernel[(triton.cdiv(width, cfg.block_n), triton.cdiv(B, cfg.block_b), E)](
            q,
            c,
            tgt,
            lse,
            pos,
            probs,
            B,
            N,
            D,
            n0,
            width,
            chunk,
            LOG2E / temperature,
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
        g = probs[:, :, :width]
        if need_q:
            scaled_matmul(g, c[:, n0 : n0 + width], dq, scale, transpose_a=False, accumulate=True, precision=precision)
        if need_c:
            scaled_matmul(g, q, dc[:, n0 : n0 + width], scale, transpose_a=True, accumulate=False, precision=precision)
    return (dq.mul_(scale).to(q.dtype) if need_q else None), dc


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (CPU tensors). Blocks of query rows against all candidates: a [rows, N] tile within the PyTorch
# paths' tile budget (utils.torch_tile_rows; at least one row) gives each row its exact log-sum-exp at once, so
# when an input needs a gradient the tile's probabilities are turned into gradient contributions right away: three
# matmuls per tile, as many as the unfused q @ c.T + cross_entropy, instead of a fourth to recompute the scores in
# backward. The unscaled float32 gradients wait in ctx until backward multiplies them by grad_out.
# ----------------------------------------------------------------------------------------------------------
def torch_infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(lse [E, B], pos [E, B], unscaled dq [E, B, D] or None, unscaled dc [E, N, D] or None) in the compute
    dtype, for ``q`` [E, B, D] and ``c`` [E, N, D]: the problems one after the other (:func:`for_each_problem`)."""
    return for_each_problem(_torch_infonce_one, q, c, need_q, need_c, tgt, temperature, margin)


def _torch_infonce_one(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    dq: torch.Tensor | None,
    dc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One problem of :func:`torch_infonce`: (lse [B], pos [B]); the unscaled gradients are written into ``dq``
    [B, D] and added into ``dc`` [N, D] (zeros) when given."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, cf = q.to(compute), c.to(compute)
    B, N = q.shape[0], c.shape[0]
    has_tgt = tgt >= 0
    safe_tgt = tgt.clamp_min(0)
    pos = torch.where(has_tgt, (qf * cf[safe_tgt]).sum(-1), 0)
    q_scaled = qf * (1.0 / temperature)  # logits = q_scaled @ c.T: the temperature costs no pass over the tiles
    some_ignored = not bool(has_tgt.all())
    lse = torch.empty((B,), device=q.device, dtype=compute)
    need_q, need_c = dq is not None, dc is not None
    step = torch_tile_rows(N)
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
    return lse, pos


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


class GroupedInfoNCEFunction(torch.autograd.Function):
    """Per-query softmax over [positive, hard negatives]; saves the [B, G] scores and [B] log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, docs: torch.Tensor, temperature: float, use_triton: bool) -> torch.Tensor:
        B, G, D = docs.shape
        if use_triton:
            s = torch.empty((B, G), device=q.device, dtype=torch.float32)
            lse = torch.empty((B,), device=q.device, dtype=torch.float32)
            block_b, block_g, block_d, num_warps = grouped_blocks(B, G, D)
            _grouped_fwd_kernel[(triton.cdiv(B, block_b),)](
                q,
                docs,
                s,
                lse,
                B,
                G,
                D,
                LOG2E / temperature,
                BLOCK_B=block_b,
                BLOCK_G=block_g,
                BLOCK_D=block_d,
                num_warps=num_warps,
            )
            loss = (lse * LN2 - s[:, 0] / temperature).mean()  # the kernel's log-sum-exp is in base 2
        else:
            compute = torch.promote_types(q.dtype, torch.float32)
            s = torch.empty((B, G), device=q.device, dtype=compute)
            step = torch_tile_rows(G * D)  # bounds the float32 copy of docs
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
            block_b, block_g, block_d, num_warps = grouped_blocks(B, G, D)
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
                LOG2E / t,
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
