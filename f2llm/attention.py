"""Attention for packed batches: torch's varlen kernel registered with transformers as ``"f2llm_varlen"``, the
default attention per model and device, and the block-diagonal mask of packed rows for encoder (BERT-like) models.

``"f2llm_varlen"`` (torch's ``torch.nn.attention.varlen.varlen_attn``, torch >= 2.13) is registered with
transformers' ``AttentionInterface`` when this module is imported, so any config may name it. The segments come from
the collator's host-known ``cu_seqlens``: no mask, no L x L anything, no host sync.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import is_flash_attn_2_available

from f2llm.data import is_decoder_model_type

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_FLASH = ("flash_attention_2", "flash_attention_3")
# ------------------------------------------------------------------------------------------------ varlen attention
# ------------------------------------------------------------------------------------------------ varlen attention
VARLEN = "f2llm_varlen"  # torch's varlen_attn as a transformers attention implementation (registered below)


try:
    # Imported with f2llm.attention, not on first use: it registers the kernel's FLOP formula, which a FlopCounterMode
    # opened before the first packed forward would otherwise miss (the mode copies the registry when it is made).
    import torch.nn.attention.varlen
except ImportError:  # torch < 2.9
    pass


@functools.cache
def _torch_varlen_attn() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn when it takes what f2llm passes (scale, window_size, enable_gqa:
    torch >= 2.13), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if not {"scale", "window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters):
        return None
    return varlen_attn


def varlen_available() -> bool:
    """Whether ``attn_implementation="f2llm_varlen"`` can run here (this torch has a suitable ``varlen_attn``)."""
    return _torch_varlen_attn() is not None


def _varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None,
    window_size: tuple[int, int],
    enable_gqa: bool,
) -> torch.Tensor:
    """[T, H, D] attention inside each ``cu_seqlens`` segment: torch's varlen_attn (flash kernel, CUDA; fake / meta
    and FLOP-counter registrations). The one place the kernel is called: CPU tests put a reference here."""
    varlen_attn = _torch_varlen_attn()
    if varlen_attn is None and query.device.type == "meta":
        return _MetaVarlenAttention.apply(query, key, value)  # measuring saved activations on an older torch
    if varlen_attn is None:
        raise RuntimeError(
            f"attn_implementation {VARLEN!r} needs torch.nn.attention.varlen.varlen_attn with scale / window_size / "
            f"enable_gqa (torch >= 2.13); this is torch {torch.__version__}: use sdpa or flash_attention_2"
        )
    if query.device.type == "cpu":
        raise ValueError(
            f"attn_implementation {VARLEN!r} runs on CUDA (and the meta device); use sdpa for a model on the CPU"
        )
    return varlen_attn(
        query,
        key,
        value,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=scale,
        window_size=window_size,
        enable_gqa=enable_gqa,
    )


class _MetaVarlenAttention(torch.autograd.Function):
    """What torch's varlen kernel keeps for backward (q, k, v, the output and a float32 [T, H] log-sum-exp), with no
    computation: stands in on the meta device where this torch has no suitable varlen_attn, so that the activation
    estimate (and the checkpointing decisions built on it) work on any torch."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:2], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, *_ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


# The dtype an emulated autocast computes matrix products in (f2llm.recompute's meta autocast), or None.
_EMULATED_AUTOCAST: list[torch.dtype] = []
# True while f2llm.recompute measures on the meta device: the varlen kernel then stands in for every fused attention
# kernel, with dropout too (flash kernels draw it from a seed: it saves nothing).
_MEASURING: list[bool] = []


@contextlib.contextmanager
def measuring(autocast_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Inside: forwards are meta-device measurements (dropout allowed, see :data:`_MEASURING`); ``autocast_dtype``:
    the dtype an emulated autocast computes in (a float32 query then runs the kernel in it)."""
    _MEASURING.append(True)
    if autocast_dtype is not None:
        _EMULATED_AUTOCAST.append(autocast_dtype)
    try:
        yield
    finally:
        _MEASURING.pop()
        if autocast_dtype is not None:
            _EMULATED_AUTOCAST.pop()


def _attention_dtype(query: torch.Tensor, module: nn.Module) -> torch.dtype:
    """The dtype the kernel computes in: an fp32 query (fp32 norms under autocast) follows autocast's dtype."""
    if query.dtype != torch.float32:
        return query.dtype
    if _EMULATED_AUTOCAST:
        return _EMULATED_AUTOCAST[-1]
    device_type = query.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"f2llm_varlen"``: query [B, H, L, D], key / value [B, H_kv, L, D] ->
    [B, L, H, D], by torch's varlen kernel (GQA native, no repeated KV heads).

    Segments, in order of preference: ``cu_seq_lens_q/k`` + ``max_length_q/k`` (flash-attention's kwargs, over the
    flattened ``B * L`` tokens; what :class:`Encoder` passes, with host-known lengths); else a 2-D padding mask
    (:func:`varlen_attention_mask`): the real tokens are gathered and attend within their row; else position ids
    that restart (packed rows, one host sync); else every row is one sequence.
    """
    if dropout and not _MEASURING:
        raise ValueError(
            f"attn_implementation {VARLEN!r} has no attention dropout; set attention_dropout=0 or use sdpa"
        )
    if softcap is not None:
        raise ValueError(f"attn_implementation {VARLEN!r} has no logit softcapping; use eager or flex_attention")
    B, H, L, D = query.shape
    dtype = _attention_dtype(query, module)
    if query.is_cuda and dtype == torch.float32:
        raise ValueError(
            f"attn_implementation {VARLEN!r} runs a flash kernel, which computes in bf16 / fp16 only; for float32 "
            "compute use sdpa"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = (sliding_window - 1 if sliding_window else -1, 0 if causal else -1)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D).to(dtype) for t in (query, key, value))
    run = functools.partial(_varlen_kernel, scale=scaling, window_size=window, enable_gqa=k.shape[1] != H)
    if cu_seq_lens_q is not None:
        # Self-attention: cu_seq_lens_k is cu_seq_lens_q (not compared: that would read both back from the device).
        max_len = max_length_q if max_length_q is not None else max_length_k
        if max_len is None:
            max_len = int(cu_seq_lens_q.diff().max())  # a host sync: pass max_length_q to avoid it
        out = run(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_len))
    elif attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (B, L):
            raise ValueError(
                f"{VARLEN}: expected a [batch, length] padding mask (or none), got {tuple(attention_mask.shape)}"
            )
        # Rows padded on one side: each row's real tokens are contiguous, a segment of their own. Two host syncs
        # (the real tokens' count and the longest row), which Encoder's host-known segments avoid.
        real = attention_mask.reshape(-1).nonzero().squeeze(1)
        lengths = attention_mask.sum(-1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        out_real = run(q.index_select(0, real), k.index_select(0, real), v.index_select(0, real), cu, longest)
        out = out_real.new_zeros(B * L, H, D).index_copy_(0, real, out_real)
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape == (B, L):
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

            (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)  # restarts -> segments
            longest = int(longest)  # a host sync, as the segments' were
        else:
            cu, longest = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=query.device), L
        out = run(q, k, v, cu.to(torch.int32), longest)
    return out.reshape(B, L, H, D), None


def varlen_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function of ``"f2llm_varlen"``: never builds a mask. The 2-D padding mask, when there is
    one, goes to :func:`varlen_attention_forward` as is (it gathers the real tokens), else None."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_attention_mask)


@functools.cache
def _warn_no_varlen() -> None:
    logger.warning(
        "f2llm: torch %s has no usable torch.nn.attention.varlen.varlen_attn (needs torch >= 2.13) and flash-attn is "
        "not installed: decoders use sdpa, packed batches with a block-diagonal mask",
        torch.__version__,
    )


def default_attn_implementation(model_type: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention a model gets when none is asked for.

    Decoders on CUDA computing in bf16 / fp16 (what the varlen kernels take): flash_attention_2 when the flash-attn
    package is installed, else ``"f2llm_varlen"`` when torch has ``varlen_attn``, else sdpa (said once). Everything
    else: sdpa.
    """
    if torch.device(device).type != "cuda" or not is_decoder_model_type(model_type):
        return "sdpa"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if is_flash_attn_2_available():
        return "flash_attention_2"
    if varlen_available():
        return VARLEN
    _warn_no_varlen()
    return "sdpa"


def uses_varlen_kernel(attn_implementation: str) -> bool:
    return attn_implementation in _FLASH or attn_implementation == VARLEN


@functools.cache
def takes_prepared_masks(model_class: type) -> bool:
    """Whether the model's forward accepts a mapping of prepared masks (layer type -> mask) as attention_mask, and
    then builds none: transformers' Qwen2/Qwen3/Gemma-2... (not Llama). Passing ``{type: None}`` to these skips the
    mask code, which otherwise reads the position ids back from the device to look for packing (a host sync, and
    an error on the meta device)."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False
    return "isinstance(causal_mask_mapping := attention_mask, dict)" in source


def no_masks(config: PretrainedConfig) -> dict[str, None]:
    """Prepared masks saying "none" for every layer type of the model (see :func:`takes_prepared_masks`)."""
    return dict.fromkeys(getattr(config, "layer_types", None) or ("full_attention",))


def packed_encoder_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, W, W] block-diagonal mask of packed rows for an encoder (BERT-like) model: a token attends to every
    token of its own text (segment: positions restart at 0) only; boolean for sdpa, additive in ``dtype`` for eager."""
    segment = (position_ids == 0).cumsum(-1)
    same = segment[:, None, :, None] == segment[:, None, None, :]
    if attn_implementation == "sdpa":
        return same
    if attn_implementation == "eager":
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)
    raise ValueError(
        f"Encoder: packed batches for encoder models need attn_implementation 'sdpa' or 'eager', not "
        f"{attn_implementation!r}; use padded batches (Collator(mode='padded'))"
    )
