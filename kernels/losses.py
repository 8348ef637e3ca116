"""The public contrastive losses: :func:`infonce` and :func:`grouped_infonce`, with or without Matryoshka levels.

The front of the InfoNCE kernels: argument checks, tile choice, and the choice between the single-level loss
(:mod:`f2llm.kernels.contrastive`, raw dot products) and the Matryoshka loss (:mod:`f2llm.kernels.matryoshka`,
cosines of re-normalized prefixes at every level, weighted). The only module that imports both; they import
neither each other nor this one.

Both infonce forms follow one protocol, written once in :class:`InfoNCEFunction`: targets remapped to the kernels'
-1 for ignored queries, a per-query log-sum-exp and positive score (per level for Matryoshka) from a Triton or a
PyTorch forward, the loss as their mean over valid queries, and a backward that either reruns the Triton kernels
or scales the gradients the PyTorch path computed in forward. grouped_infonce's two forms share nothing but their
block choice, so each keeps its own autograd Function in its module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from f2llm.kernels import contrastive, matryoshka
from f2llm.kernels.utils import (
    DEFAULT_TEMPERATURE,
    IGNORE_INDEX,
    LN2,
    Backend,
    InfoNCEConfig,
    infonce_config,
    resolve_splits,
    use_triton,
)

Fp32Precision = Literal["ieee", "tf32"]
Levels = matryoshka.Levels  # (dims, weights), resolved by matryoshka_levels


# ----------------------------------------------------------------------------------------------------------
# Autograd: one Function for both infonce forms. The three functions below pick the form's host code (levels None:
# contrastive, else matryoshka); the Function around them is the protocol both follow. Shapes: lse and pos are [B]
# for one level, [B, L] with levels.
# ----------------------------------------------------------------------------------------------------------
def _triton_forward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
    levels: Levels | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The Triton forward of either form: (base-2 lse, pos, extra tensors its backward needs), float32."""
    if levels is None:
        return (*contrastive.triton_infonce_forward(q, c, tgt, temperature, margin, precision, cfg), ())
    return matryoshka.triton_mrl_forward(q, c, tgt, temperature, margin, precision, cfg, levels[0])


def _triton_backward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    pos: torch.Tensor,
    extra: Sequence[torch.Tensor],
    scale: torch.Tensor,
    temperature: float,
    margin: float | None,
    precision: str,
    cfg: InfoNCEConfig,
    levels: Levels | None,
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The Triton backward of either form: (dq, dc) in the inputs' dtype; ``extra``: the level weights [L] then
    what :func:`_triton_forward` returned for it (nothing for one level)."""
    args = (scale, temperature, margin, precision, cfg)
    if levels is None:
        return contrastive.triton_infonce_backward(q, c, tgt, lse, pos, *args, need_q, need_c)
    w, *stats = extra
    return matryoshka.triton_mrl_backward(q, c, tgt, lse, pos, tuple(stats), w, *args, levels[0], need_q, need_c)


def _torch_forward(
    q: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    margin: float | None,
    levels: Levels | None,
    need_q: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The PyTorch path of either form: (lse, pos, unscaled dq or None, unscaled dc or None), natural log."""
    if levels is None:
        return contrastive.torch_infonce(q, c, tgt, temperature, margin, need_q, need_c)
    return matryoshka.torch_mrl_infonce(q, c, tgt, temperature, margin, *levels, need_q, need_c)


class InfoNCEFunction(torch.autograd.Function):
    """InfoNCE without any [B, N] score matrix, on raw dot products (``levels`` None) or summed over Matryoshka
    levels (``levels``: dims and weights), of ``q`` [E, B, D] against ``c`` [E, N, D]: the mean over E problems
    sharing ``targets`` (E = 1 for the plain loss), every problem in the same launches. Saves the inputs,
    per-query log-sum-exp and positive scores (and, for the Matryoshka kernels, the level weights and prefix
    statistics); the Triton backward recomputes the scores, the PyTorch path hands over the gradients it computed
    in forward."""

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
        levels: Levels | None,
    ) -> torch.Tensor:
        valid = targets != ignore_index
        # Kernel convention: -1 = no target (ignored query).
        tgt = torch.where(valid, targets, -1).to(torch.int32 if use_triton else torch.int64)
        need_q, need_c = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grads, stats = (None, None), ()
        if use_triton:
            lse, pos, stats = _triton_forward(q, c, tgt, temperature, margin, precision, cfg, levels)
            # The kernels keep the log-sum-exp in base 2 (what their backward consumes); the loss is in nats.
            per_query = lse * LN2 - pos / temperature
        else:
            lse, pos, *grads = _torch_forward(q, c, tgt, temperature, margin, levels, need_q, need_c)
            per_query = lse - pos / temperature
        n_valid = valid.sum()
        row_valid = valid if levels is None else valid[:, None]  # against [E, B] or [E, B, L]
        per_query = torch.where(row_valid, per_query, 0)
        weights = ()
        if levels is not None:  # the levels' weighted sum per query
            w = torch.tensor(levels[1], device=q.device, dtype=per_query.dtype)
            per_query, weights = per_query @ w, (w,)
        # The mean over problems of each problem's mean over its valid queries (every problem has the same ones).
        loss = per_query.sum() / (n_valid.clamp_min(1) * q.shape[0])
        # +inf log-sum-exp makes every p of an ignored query exactly 0 in backward, with no extra mask.
        lse = torch.where(row_valid, lse, float("inf"))
        ctx.save_for_backward(q, c, tgt, lse, pos, n_valid, *weights, *stats)
        ctx.grads = grads
        ctx.temperature, ctx.margin, ctx.use_triton, ctx.precision, ctx.cfg, ctx.levels = (
            temperature,
            margin,
            use_triton,
            precision,
            cfg,
            levels,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, c, tgt, lse, pos, n_valid, *extra = ctx.saved_tensors
        need_q, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        t, margin, levels = ctx.temperature, ctx.margin, ctx.levels
        scale = grad_out.to(lse.dtype) / (n_valid.clamp_min(1).to(lse.dtype) * (q.shape[0] * t))
        if ctx.use_triton:
            dq, dc = _triton_backward(
                q, c, tgt, lse, pos, extra, scale.float().reshape(1), t, margin, ctx.precision, ctx.cfg, levels,
                need_q, need_c,
            )  # fmt: skip
        else:
            # The unscaled gradients from forward become the gradients (scaled in place, no second buffer). A
            # second backward through a retained graph finds them handed over and recomputes them.
            dq_unscaled, dc_unscaled = ctx.grads
            ctx.grads = (None, None)
            if (need_q and dq_unscaled is None) or (need_c and dc_unscaled is None):
                _, _, dq_unscaled, dc_unscaled = _torch_forward(q, c, tgt, t, margin, levels, need_q, need_c)
            dq = dq_unscaled.mul_(scale).to(q.dtype) if need_q else None
            dc = dc_unscaled.mul_(scale).to(c.dtype) if need_c else None
        return dq, dc, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Argument checks and the entry points.
# ----------------------------------------------------------------------------------------------------------
def _matryoshka_levels(
    op: str, q: torch.Tensor, dims: Sequence[int] | None, weights: Sequence[float] | None
) -> Levels | None:
    """Resolved (dims, weights) of the Matryoshka levels, or None for the single-level loss."""
    if dims is None:
        if weights is not None:
            raise ValueError(f"{op}: matryoshka_weights given without matryoshka_dims; pass the dims they weight")
        return None
    try:
        return matryoshka.matryoshka_levels(q.shape[-1], dims, weights)
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

    Several problems at once (layer exits, ML-Embed): ``q`` [E, B, D] and ``c`` [E, N, D] give the mean over e of
    the loss of ``q[e]`` against ``c[e]`` with the same ``targets``: every problem in the same kernel launches
    (a grid axis), not E calls.

    Args:
        q: [B, D] query embeddings (float16, bfloat16 or float32; float64 on the PyTorch path), or [E, B, D].
        c: [N, D] candidate embeddings, same dtype and device as ``q``, or [E, N, D] with a [E, B, D] ``q``.
        targets: [B] integer index of each query's positive in ``c`` (in ``c[e]``, the same for every e), or
            ``ignore_index`` to skip the query.
        temperature: logits are ``q . c / temperature``.
        mask_margin: drop candidate j != target from query i's denominator when ``q_i . c_j > q_i . c_t + m``
            (raw dot products: cosine domain for normalized embeddings, before the temperature). None = off.
        ignore_index: target value of queries that do not count.
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            PyTorch, same memory bound), or ``"auto"`` (Triton on CUDA, PyTorch on CPU).
        fp32_precision: ``tl.dot`` precision for float32 inputs: ``"ieee"`` (exact fp32) or ``"tf32"`` (tensor
            cores, ~1e-4 relative error). Ignored for 16-bit inputs and by the PyTorch path.
        config: tile sizes of the Triton kernels (by default :func:`~f2llm.kernels.utils.infonce_config`, or
            :func:`~f2llm.kernels.matryoshka.matryoshka_config` with ``matryoshka_dims``).
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
    if q.dim() not in (2, 3) or c.dim() != q.dim():
        raise ValueError(
            f"{op}: q must be [B, D] and c [N, D] (or q [E, B, D] and c [E, N, D]), got q {tuple(q.shape)} and c "
            f"{tuple(c.shape)}"
        )
    if q.dim() == 3 and q.shape[0] != c.shape[0]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and c {tuple(c.shape)} hold different numbers of problems (E)")
    if q.shape[-1] != c.shape[-1]:
        raise ValueError(f"{op}: embedding dims differ: q is {tuple(q.shape)}, c is {tuple(c.shape)}")
    if 0 in q.shape or 0 in c.shape:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, c {tuple(c.shape)}; need E, B, N, D >= 1")
    if q.dtype != c.dtype or not q.is_floating_point():
        raise ValueError(f"{op}: q and c must share one floating dtype, got q {q.dtype} and c {c.dtype}")
    if q.device != c.device or targets.device != q.device:
        raise ValueError(f"{op}: q ({q.device}), c ({c.device}) and targets ({targets.device}) must share a device")
    if q.dim() == 2:  # one problem: the kernels' [E, B, D] layout with E = 1 (views, no copy)
        q, c = q[None], c[None]
    E, B, D = q.shape
    N = c.shape[1]
    if targets.shape != (B,) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"{op}: targets must be an integer tensor of shape [B] = ({B},), got {targets.dtype} {tuple(targets.shape)}"
        )
    _check_temperature(temperature, op)
    if mask_margin is not None and not math.isfinite(mask_margin):
        raise ValueError(f"{op}: mask_margin must be a finite float or None, got {mask_margin!r}")
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"{op}: fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    targets = targets.long()
    if validate:
        bad = ((targets < 0) | (targets >= N)) & (targets != ignore_index)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:10]
            raise ValueError(
                f"{op}: targets at row(s) {rows.tolist()} are {targets[rows].tolist()}: each must be in [0, N) = "
                f"[0, {N}) or equal ignore_index ({ignore_index})"
            )
    levels = _matryoshka_levels(op, q, matryoshka_dims, matryoshka_weights)
    # The kernels index the problems' rows (and, with levels, their per-level statistics) in int32.
    per_row = 1 if levels is None else len(levels[0])
    if E * max(B, N) * per_row >= 2**31:
        raise ValueError(f"{op}: {E} problems x {max(B, N)} rows x {per_row} level(s) pass 2**31; split the call")
    triton_path = use_triton(backend, q, op)
    cfg = None
    if triton_path:
        if config is not None:
            cfg = config
        elif levels is not None:
            cfg = matryoshka.matryoshka_config(B, N, D, q.dtype, q.device)
        else:
            cfg = infonce_config(B, N, D, q.dtype, q.device)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        cfg = resolve_splits(cfg, B, N, sms, problems=E)
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
        levels,
    )


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
        return matryoshka.MatryoshkaGroupedInfoNCEFunction.apply(
            q.contiguous(), docs.contiguous(), float(temperature), triton_path, *levels
        )
    return contrastive.GroupedInfoNCEFunction.apply(q.contiguous(), docs.contiguous(), float(temperature), triton_path)
