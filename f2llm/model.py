"""The embedding model: a Hugging Face backbone (``AutoModel``, no LM head) + fused pooling and L2 normalization.

* decoders (Qwen3, ...): causal attention kept, the recipe's tokenization (EOS appended, always last), last-token
  (EOS) pooling by default;
* encoders (BERT, MiniLM, ...): the tokenizer's own special tokens, mean pooling by default.

(:func:`f2llm.data.is_decoder_model_type` decides which: a model type with a causal-LM class and no masked-LM
class is a decoder.)

:meth:`Encoder.forward` embeds a collated :class:`f2llm.data.EncoderBatch`, padded or packed, with autograd.
Packed batches never let texts attend to each other:

* decoders with sdpa / eager / flex attention: ``position_ids`` restart at 0 for every text and no
  ``attention_mask`` is passed, which transformers (``masking_utils.find_packed_sequence_indices``) turns into a
  block-diagonal causal mask (a BlockMask document mask for flex);
* decoders with a varlen kernel (flash-attention 2/3, or ``"f2llm_varlen"``: torch's own
  ``torch.nn.attention.varlen.varlen_attn``, registered with transformers when this module is imported): the rows
  are flattened into one and the kernel gets the collator's ``attn_cu_seqlens`` (every text, and every run of
  padding, a segment of its own) with its host-known longest segment: no mask, no L x L anything, no host sync;
  padded batches take the same route;
* encoders (sdpa / eager): an explicit block-diagonal bidirectional 4-D mask.

The default attention of a decoder on CUDA is flash_attention_2 when the flash-attn package is installed, else
``"f2llm_varlen"`` when torch has ``varlen_attn`` (torch >= 2.13), else sdpa (see
:func:`default_attn_implementation`).

Activation checkpointing can be switched per forward (:meth:`Encoder.checkpointing`), and
:meth:`Encoder.activation_bytes` estimates what a forward with grad keeps for backward (measured once, on the meta
device), so that a trainer checkpoints only the forwards that would not fit.

:meth:`Encoder.save_pretrained` writes a folder that ``transformers.AutoModel``, ``sentence_transformers.
SentenceTransformer`` and :meth:`Encoder.load` all read, giving the same embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import is_flash_attn_2_available

from f2llm.data import EncoderBatch, TextTokenizer, format_query, is_decoder_model_type, pad_sequences
from f2llm.ops import pool

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

Pooling = Literal["last", "mean", "first"]
DEFAULT_MAX_LENGTH = 1024  # the recipe's training length
F2LLM_CONFIG = "f2llm_config.json"
F2LLM_CONFIG_FORMAT = "f2llm-encoder-v1"
# sentence-transformers' Pooling modes for ours ("lasttoken" is how Qwen3-Embedding is saved).
_ST_POOLING_KEY = {
    "last": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
}
_FLASH = ("flash_attention_2", "flash_attention_3")
# Model types whose Liger kernels f2llm applies, with the liger_kernel.transformers function doing it.
LIGER_PATCHES = {"qwen3": "apply_liger_kernel_to_qwen3"}


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Swap in Liger's RMSNorm, RoPE and SwiGLU kernels (CUDA only; they do not run on CPU).

    Cross-entropy kernels stay off: with ``fused_linear_cross_entropy=True`` Liger would replace the model's
    forward by a causal-LM forward, which an embedding model (no LM head) must not get. RoPE is patched in the
    modeling module (process-wide), RMSNorm and SwiGLU on this model's instances.
    """
    model_type = model.config.model_type
    if model_type not in LIGER_PATCHES:
        raise ValueError(
            f"apply_liger_kernels: no Liger patch for model type {model_type!r} (supported: {sorted(LIGER_PATCHES)}); "
            "pass liger=False"
        )
    import liger_kernel.transformers as liger

    modeling = importlib.import_module(type(model).__module__)
    _BEFORE_LIGER.setdefault(modeling.__name__, dict(vars(modeling)))
    getattr(liger, LIGER_PATCHES[model_type])(
        model=model, rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


# Each modeling module's namespace before Liger patched it (process-wide): the activation estimate builds a model
# of plain PyTorch modules from it, since Liger's Triton kernels cannot run on the meta device.
_BEFORE_LIGER: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def _without_liger(model: PreTrainedModel) -> Iterator[None]:
    """Inside: the modeling module of ``model`` as it was before :func:`apply_liger_kernels` patched it."""
    modeling = importlib.import_module(type(model).__module__)
    before = _BEFORE_LIGER.get(modeling.__name__, {})
    patched = {k: v for k, v in vars(modeling).items() if k in before and before[k] is not v}
    for name in patched:
        setattr(modeling, name, before[name])
    try:
        yield
    finally:
        for name, value in patched.items():
            setattr(modeling, name, value)


# ------------------------------------------------------------------------------------------------ varlen attention
VARLEN = "f2llm_varlen"  # torch's varlen_attn as a transformers attention implementation (registered below)


try:
    # Imported with f2llm.model, not on first use: it registers the kernel's FLOP formula, which a FlopCounterMode
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


# The dtype an emulated autocast computes matrix products in (see _MetaAutocast), or None.
_EMULATED_AUTOCAST: list[torch.dtype] = []
# True while estimate_activation_profile runs its meta forwards: the varlen kernel then stands in for every fused
# attention kernel, with dropout too (flash kernels draw it from a seed: it saves nothing).
_MEASURING: list[bool] = []


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


def _uses_varlen_kernel(attn_implementation: str) -> bool:
    return attn_implementation in _FLASH or attn_implementation == VARLEN


@functools.cache
def _takes_prepared_masks(model_class: type) -> bool:
    """Whether the model's forward accepts a mapping of prepared masks (layer type -> mask) as attention_mask, and
    then builds none: transformers' Qwen2/Qwen3/Gemma-2... (not Llama). Passing ``{type: None}`` to these skips the
    mask code, which otherwise reads the position ids back from the device to look for packing (a host sync, and
    an error on the meta device)."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False
    return "isinstance(causal_mask_mapping := attention_mask, dict)" in source


def _no_masks(config: PretrainedConfig) -> dict[str, None]:
    """Prepared masks saying "none" for every layer type of the model (see :func:`_takes_prepared_masks`)."""
    return dict.fromkeys(getattr(config, "layer_types", None) or ("full_attention",))


# ------------------------------------------------------------------------------------------------ activation memory
class _MetaAutocast(TorchFunctionMode):
    """torch.autocast's lower-precision rule for meta tensors (autocast has no meta backend): matrix products and
    attention compute in ``dtype``. The casts happen above autograd, so the graph saves the casted copies, as it does
    under autocast (its weight copies included)."""

    LOW_PRECISION = frozenset(
        {
            F.linear,
            F.scaled_dot_product_attention,
            torch.matmul,
            torch.Tensor.matmul,
            torch.Tensor.__matmul__,
            torch.mm,
            torch.Tensor.mm,
            torch.bmm,
            torch.Tensor.bmm,
            torch.addmm,
            torch.baddbmm,
            torch.einsum,
        }
    )

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __enter__(self) -> _MetaAutocast:
        _EMULATED_AUTOCAST.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _EMULATED_AUTOCAST.pop()
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW_PRECISION:

            def cast(t: Any) -> Any:
                return t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def saved_tensor_bytes(forward: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs (storages of
    ``exclude``, e.g. the parameters, left out). Works on the meta device: storages are told apart by identity,
    not address."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    saved: dict[int, torch.Tensor] = {}  # holding the tensors keeps their storages (and identities) alive

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in skip:
            saved.setdefault(key, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(t.untyped_storage().nbytes() for t in saved.values())


@contextlib.contextmanager
def _measuring() -> Iterator[None]:
    _MEASURING.append(True)
    try:
        yield
    finally:
        _MEASURING.pop()


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Turn transformers' non-reentrant activation checkpointing on in every layer of ``model``."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


_PROBE_TOKENS = (128, 256)  # two packed rows of two texts each: a straight line through their saved bytes


def estimate_activation_profile(
    model: PreTrainedModel,
    attn_implementation: str,
    weights_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    *,
    decoder: bool,
    checkpointed: bool | int = False,
) -> tuple[int, int]:
    """(fixed, per-token) bytes a training forward of ``model`` saves for backward, from two forwards of its config
    on the meta device: the same architecture, weights dtype and attention implementation, in training mode,
    under an emulated autocast when ``compute_dtype`` differs from ``weights_dtype``; with ``checkpointed`` True,
    every layer transformers can checkpoint inside checkpoint, an int k: the first k of them (what those layers
    then save is not counted: their inputs, which the checkpoint holds outside autograd, are left to the caller).

    What it counts: every distinct storage autograd saves (activations, dropout masks, autocast's weight copies),
    not the parameters. What it does not: the transient buffers of the backward itself and the output. Attention
    other than eager is measured as torch's varlen kernel, which saves what every fused kernel (flash-attention,
    sdpa's flash and efficient backends) saves: q, k, v, the output and its log-sum-exp; on meta sdpa would take
    its math path, whose L x L probabilities no GPU run keeps. Liger's kernels cannot run on meta: the plain
    PyTorch modules they replace are measured instead, which save more (a safe side). A model carrying peft
    adapters (``model.lora``) is measured with the same adapters injected, and every weight trainable or frozen
    as in ``model``: LoRA's dropout saves its mask and the dropped input per adapted layer, and a frozen weight
    spares its layer's input (see :func:`_inject_adapters_like`).
    """
    config = copy.deepcopy(model.config)
    probe_attention = "eager" if attn_implementation == "eager" else VARLEN
    measured = []
    with _without_liger(model), _measuring():
        with torch.device("meta"):
            meta = AutoModel.from_config(config, dtype=weights_dtype, attn_implementation=probe_attention)
        _inject_adapters_like(model, meta)
        meta.train()
        if checkpointed:
            enable_checkpointing(meta)
            if checkpointed is not True:
                for i, layer in enumerate(m for m in meta.modules() if isinstance(m, GradientCheckpointingLayer)):
                    layer.gradient_checkpointing = i < checkpointed
        weights = [*meta.parameters(), *meta.buffers()]
        autocast = _MetaAutocast(compute_dtype) if compute_dtype != weights_dtype else contextlib.nullcontext()
        for n in _PROBE_TOKENS:
            half = n // 2
            ids = torch.zeros(1, n, dtype=torch.long, device="meta")
            kwargs: dict[str, Any] = {}
            if decoder:
                kwargs["position_ids"] = torch.arange(half, device="meta").repeat(2)[None]
                # A cache makes transformers skip its look for packing, which reads the position ids (meta cannot);
                # the cached keys and values are the very tensors attention saves, so nothing more is counted.
                # Checkpointing turns the cache off: prepared masks saying "none" skip the look there.
                kwargs["use_cache"] = True
                if checkpointed and _takes_prepared_masks(type(meta)):
                    kwargs.update(use_cache=False, attention_mask=_no_masks(config))
                if probe_attention == VARLEN:
                    cu = torch.arange(0, n + 1, half, dtype=torch.int32, device="meta")
                    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=half, max_length_k=half)
            with autocast:
                measured.append(saved_tensor_bytes(lambda: meta(input_ids=ids, **kwargs), weights))  # noqa: B023
    (n1, n2), (b1, b2) = _PROBE_TOKENS, measured
    per_token = -(-(b2 - b1) // (n2 - n1))
    return max(0, b1 - per_token * n1), per_token


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The peft adapter configs (name -> ``PeftConfig``) whose layers ``model`` holds, or {} without adapters.

    ``peft.get_peft_model`` / ``inject_adapter_in_model`` record them on the model they inject into."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return {}  # adapters merged and unloaded: the config outlived its layers
    return dict(configs)


def adapter_signature(model: nn.Module) -> str:
    """A key telling apart the peft adapter configs recorded on ``model`` ("" for none), cheap enough for every
    forward: measurements of ``model`` are cached under it, so adapters injected after one are measured anew."""
    configs = getattr(model, "peft_config", None)
    return repr(sorted((name, repr(config)) for name, config in configs.items())) if configs else ""


def _inject_adapters_like(model: nn.Module, meta: nn.Module) -> None:
    """Give the meta-device copy ``meta`` the peft adapters of ``model`` (same configs, same names) and the same
    trainable / frozen weights, so that it saves for backward what ``model`` saves as it trains. Nothing without
    adapters but the frozen weights (e.g. an encoder's pooler)."""
    configs = adapter_configs(model)
    if configs:
        from peft import inject_adapter_in_model

        for name, config in configs.items():
            with torch.random.fork_rng(devices=[]):  # meta init draws nothing; the training streams stay as they are
                inject_adapter_in_model(copy.deepcopy(config), meta, adapter_name=name)
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    unknown = [name for name, _ in meta.named_parameters() if name not in trains]
    if unknown and configs:
        raise RuntimeError(
            f"estimate_activation_profile: the meta-device copy of {type(model).__name__} has parameters the model "
            f"lacks ({unknown[:3]}); its adapters were not reproduced. Report this with the model's peft config"
        )
    for name, p in meta.named_parameters():
        p.requires_grad_(trains.get(name, True))  # a name the model lacks (no adapters): trains, as a full fine-tune


def sentence_transformers_max_length(name_or_path: str | os.PathLike) -> int | None:
    """``max_seq_length`` of a local sentence-transformers folder (its embedding setting), or None."""
    config = Path(name_or_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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


def pool_packed(hidden: torch.Tensor, batch: EncoderBatch, mode: Pooling, normalize: bool) -> torch.Tensor:
    """Float32 embeddings [batch.num_texts, D] of a packed batch's last hidden states, in collation order."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if batch.token_index is not None:
        hidden = hidden.index_select(0, batch.token_index)
    emb = pool(
        hidden, cu_seqlens=batch.cu_seqlens, mode=mode, normalize=normalize, validate=False, out_dtype=torch.float32
    )
    return emb.index_select(0, batch.text_position)


class Encoder(nn.Module):
    """Text -> L2-normalized embedding ``[D]`` (D = the backbone's hidden size).

    Build it with :meth:`from_pretrained` (a Hugging Face model) or :meth:`load` (a folder written by
    :meth:`save_pretrained`).

    Attributes:
        model: the backbone (``AutoModel``).
        tokenizer: its Hugging Face tokenizer.
        text_tokenizer: the f2llm tokenization rule (:class:`f2llm.data.TextTokenizer`) used by ``encode`` and
            by the data pipeline.
        pooling: ``"last"``, ``"mean"`` or ``"first"``.
        normalize: L2-normalize the pooled vector.
        query_instruction: the instruction written as the sentence-transformers ``query`` prompt on save.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.is_decoder = is_decoder_model_type(model.config.model_type)
        pooling = pooling or ("last" if self.is_decoder else "mean")
        if pooling not in _ST_POOLING_KEY:
            raise ValueError(f"Encoder: pooling must be one of {sorted(_ST_POOLING_KEY)} or None, got {pooling!r}")
        # RoBERTa-family embeddings number positions from padding_idx + 1 (BERT and decoders from 0).
        padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
        self.position_offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
        limit = getattr(model.config, "max_position_embeddings", None)
        limit = limit - self.position_offset if limit is not None else None
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, limit) if limit is not None else DEFAULT_MAX_LENGTH
        elif limit is not None and max_length > limit:
            raise ValueError(
                f"Encoder: max_length={max_length} exceeds the {limit} positions of {model.config.model_type} "
                "(config.max_position_embeddings); lower max_length"
            )
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.query_instruction = query_instruction
        self.text_tokenizer = TextTokenizer(tokenizer, max_length, append_eos=self.is_decoder)
        # BERT-like models carry a pooler head ([CLS] -> dense -> tanh) that embeddings never use: frozen, it gets
        # no optimizer state and DDP does not wait for its gradients (which would never come).
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        # (compute dtype, adapters) or ("checkpointed", k, dtype, adapters): the first k layers checkpointed (True:
        # all) -> (fixed, per-token) saved bytes; adapters: adapter_signature (LoRA injected later is measured anew)
        self._activation_profiles: dict[Any, tuple[int, int]] = {}

    # ------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        liger: bool | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Encoder:
        """Load a Hugging Face model (no LM head) and its tokenizer.

        Args:
            name_or_path: hub id or local folder.
            pooling: ``"last"`` / ``"mean"`` / ``"first"``; None: ``"last"`` for decoders, ``"mean"`` for encoders.
            max_length: tokens per text, special tokens included; None: the ``max_seq_length`` of a local
                sentence-transformers folder (all-MiniLM-L6-v2: 256, as MTEB evaluates it), else 1024 (the
                recipe's), or fewer when the model has fewer positions (BERT: 512).
            dtype: None: bfloat16 on CUDA, float32 on CPU.
            attn_implementation: None: :func:`default_attn_implementation` (decoders on CUDA in bf16 / fp16:
                ``"flash_attention_2"`` with flash-attn installed, else ``"f2llm_varlen"`` with torch >= 2.13, else
                ``"sdpa"``; everything else ``"sdpa"``).
            gradient_checkpointing: recompute activations in backward (non-reentrant) in every forward; a trainer
                may switch it per forward instead (:meth:`checkpointing`).
            liger: apply Liger's RMSNorm / RoPE / SwiGLU kernels; None: on CUDA when the model type has a patch.
            normalize: L2-normalize embeddings.
            query_instruction: saved as the sentence-transformers ``query`` prompt.
            device: None: the current CUDA device if any, else CPU.
            compute_dtype: the dtype the forward computes in when it differs from ``dtype`` (a trainer's autocast
                over fp32 master weights); None: ``dtype``. Only the default attention depends on it.
        """
        device = torch.device(device) if device is not None else _default_device()
        on_cuda = device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if attn_implementation is None:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
            attn_implementation = default_attn_implementation(model_type, device, compute_dtype or dtype)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        if liger is None:
            liger = on_cuda and model.config.model_type in LIGER_PATCHES
        if liger:
            if not on_cuda:
                raise ValueError("Encoder.from_pretrained: Liger kernels run on CUDA only; pass liger=False on CPU")
            apply_liger_kernels(model)
        if max_length is None:
            max_length = sentence_transformers_max_length(name_or_path)
        encoder = cls(
            model,
            tokenizer,
            pooling=pooling,
            max_length=max_length,
            normalize=normalize,
            query_instruction=query_instruction,
        )
        if gradient_checkpointing:
            encoder.set_checkpointing(True)
        # Eval mode, like transformers' from_pretrained: dropout stays off until a trainer calls .train().
        return encoder.to(device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> Encoder:
        """Load a folder written by :meth:`save_pretrained`; keyword arguments override :meth:`from_pretrained`'s."""
        config_file = Path(path) / F2LLM_CONFIG
        if not config_file.exists():
            raise FileNotFoundError(
                f"Encoder.load: {config_file} not found; {path} was not written by Encoder.save_pretrained "
                "(use Encoder.from_pretrained for a plain Hugging Face model)"
            )
        saved = json.loads(config_file.read_text())
        if saved.get("format") != F2LLM_CONFIG_FORMAT:
            raise ValueError(
                f"Encoder.load: {config_file} has format {saved.get('format')!r}, expected {F2LLM_CONFIG_FORMAT!r}"
            )
        kwargs = {k: saved[k] for k in ("pooling", "max_length", "normalize", "query_instruction")}
        kwargs.update(overrides)
        return cls.from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.text_tokenizer.max_length

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    # ------------------------------------------------------------------------------------------------------
    # Activation checkpointing and its memory
    # ------------------------------------------------------------------------------------------------------
    def _checkpoint_layers(self) -> list[nn.Module]:
        """The blocks (decoder / encoder layers) transformers can checkpoint one by one, in forward order."""
        return [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _checkpoint_modules(self) -> list[nn.Module]:
        """The modules transformers gives a ``gradient_checkpointing`` flag (its GradientCheckpointingLayer blocks,
        and the odd model-level flag)."""
        return [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]

    @property
    def num_checkpoint_layers(self) -> int:
        """How many layers can be checkpointed one by one (what ``checkpointing(k)`` counts)."""
        return len(self._checkpoint_layers())

    @property
    def checkpointed_layers(self) -> int:
        """How many of them are checkpointed now."""
        return sum(bool(layer.gradient_checkpointing) for layer in self._checkpoint_layers())

    @property
    def checkpointing_enabled(self) -> bool:
        return any(m.gradient_checkpointing for m in self._checkpoint_modules())

    def set_checkpointing(self, enabled: bool | int) -> None:
        """Recompute activations in backward (non-reentrant; training mode only) in every forward from now on, or
        keep them: True / False for every layer, an int k for the first k layers (:meth:`_checkpoint_layers`; the
        rest keep theirs). The first enabling sets transformers' checkpointing up."""
        if not isinstance(enabled, bool):
            layers = self._checkpoint_layers()
            if not 0 <= enabled <= len(layers):
                raise ValueError(f"Encoder: cannot checkpoint {enabled} of the model's {len(layers)} layers")
            self.set_checkpointing(enabled > 0)
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < enabled
            return
        modules = self._checkpoint_modules()
        if enabled and not modules:
            raise ValueError(f"Encoder: {type(self.model).__name__} does not support gradient checkpointing")
        if enabled and not all(hasattr(m, "_gradient_checkpointing_func") for m in modules):
            enable_checkpointing(self.model)
        for module in modules:
            module.gradient_checkpointing = enabled

    @contextlib.contextmanager
    def checkpointing(self, enabled: bool | int) -> Iterator[None]:
        """Forwards inside checkpoint (or keep their activations) as ``enabled`` says (see :meth:`set_checkpointing`:
        all, none, or the first k layers); the setting before is restored after. Checkpointing changes only what
        is kept for backward, never a result or a gradient."""
        modules = self._checkpoint_modules()
        before = [m.gradient_checkpointing for m in modules]
        self.set_checkpointing(enabled)
        try:
            yield
        finally:
            for module, value in zip(modules, before, strict=True):
                module.gradient_checkpointing = value

    @contextlib.contextmanager
    def raw_embeddings(self) -> Iterator[None]:
        """Forwards inside return the pooled vectors without L2 normalization (distillation compares raw ones; the
        trainer then normalizes them itself for the contrastive loss); the setting before is restored after."""
        normalize, self.normalize = self.normalize, False
        try:
            yield
        finally:
            self.normalize = normalize

    def activation_bytes(self, num_tokens: int, compute_dtype: torch.dtype | None = None) -> int:
        """Estimated bytes a forward with grad of ``num_tokens`` input positions (padding included) keeps for
        backward without checkpointing: ``fixed + per_token * num_tokens`` (see :meth:`activation_profile`)."""
        fixed, per_token = self.activation_profile(compute_dtype)
        return fixed + per_token * int(num_tokens)

    def layer_checkpoint_saving(self, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
        """(checkpointable layers, per-token bytes that checkpointing one of them saves at least): what a layer
        saves without checkpointing, less the input a checkpointed layer keeps for its recomputation. Measured on
        meta for the first layer (this profile less the profile with it checkpointed) and for the others (less the
        profile with all checkpointed, shared evenly: they are alike); the smaller of the two. They differ where
        the first layer's input needs no gradient (LoRA: the embeddings are frozen), so its layer saves less."""
        layers = self._checkpoint_layers()
        if not layers:
            return 0, 0
        weights = next(self.model.parameters()).dtype
        dtype = compute_dtype or weights
        _, none_checkpointed = self.activation_profile(compute_dtype)
        _, first_checkpointed = self._checkpointed_profile(1, dtype)
        saved = none_checkpointed - first_checkpointed  # by the first layer
        if len(layers) > 1:
            _, all_checkpointed = self._checkpointed_profile(True, dtype)
            saved = min(saved, (first_checkpointed - all_checkpointed) // (len(layers) - 1))
        layer_input = self.model.config.hidden_size * weights.itemsize  # the residual stream, in the weights' dtype
        return len(layers), max(0, saved - layer_input)

    def _checkpointed_profile(self, layers: bool | int, dtype: torch.dtype) -> tuple[int, int]:
        """The profile with the first ``layers`` layers checkpointed (True: every layer), cached."""
        weights = next(self.model.parameters()).dtype
        key = ("checkpointed", layers if layers is not True else "all", dtype, adapter_signature(self.model))
        if key not in self._activation_profiles:
            self._activation_profiles[key] = estimate_activation_profile(
                self.model, self.attn_implementation, weights, dtype, decoder=self.is_decoder, checkpointed=layers
            )
        return self._activation_profiles[key]

    def activation_profile(self, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
        """(fixed, per-token) bytes of the tensors a forward with grad saves for backward, measured once per
        compute dtype on the meta device (no memory, no compute; works whatever device the encoder is on).

        ``compute_dtype``: the dtype the forward computes in (None: the weights'); when it differs, the forward is
        measured under an emulation of autocast (matrix products in ``compute_dtype``; the fixed part then holds
        autocast's low-precision copies of the weights). See :func:`estimate_activation_profile`.
        """
        weights = next(self.model.parameters()).dtype
        dtype = compute_dtype or weights
        key = (dtype, adapter_signature(self.model))  # LoRA injected after a measurement is measured anew
        if key not in self._activation_profiles:
            self._activation_profiles[key] = estimate_activation_profile(
                self.model, self.attn_implementation, weights, dtype, decoder=self.is_decoder
            )
        return self._activation_profiles[key]

    # ------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """Float32 embeddings ``[batch.num_texts, D]`` in the order the texts were collated, with autograd.

        Float32 whatever the backbone computes in: the pooling kernel works in float32, and the loss and the
        gradient cache's d(loss)/d(embedding) keep that precision instead of a bf16 rounding of it.
        """
        batch = batch.to(self.device, non_blocking=True)
        positions = batch.position_ids + self.position_offset if self.position_offset else batch.position_ids
        kwargs: dict[str, Any] = {"use_cache": False} if self.is_decoder else {}
        if self.is_decoder and _uses_varlen_kernel(self.attn_implementation):
            return self._forward_varlen(batch, positions, kwargs)
        if not batch.packed:
            hidden = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, **kwargs
            ).last_hidden_state
            return pool(
                hidden,
                batch.attention_mask,
                mode=self.pooling,
                normalize=self.normalize,
                validate=False,
                out_dtype=torch.float32,
            )

        if not self.is_decoder:
            kwargs["attention_mask"] = self._packed_encoder_mask(batch.position_ids)
        hidden = self.model(input_ids=batch.input_ids, position_ids=positions, **kwargs).last_hidden_state
        return self._pool_packed(hidden, batch)

    def _pool_packed(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        return pool_packed(hidden, batch, self.pooling, self.normalize)

    def _forward_varlen(self, batch: EncoderBatch, positions: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """A decoder with a varlen kernel, padded or packed batch: the [R, W] grid flattened into one row, whose
        segments (every text, every run of padding) and longest segment the collator computed on the host."""
        if batch.attn_cu_seqlens is not None:
            cu, longest = batch.attn_cu_seqlens, batch.attn_max_seqlen
        else:  # a batch built by hand: segments from the position ids (two host syncs)
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

            (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids.reshape(1, -1))
            longest = int(longest)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if _takes_prepared_masks(type(self.model)):
            kwargs["attention_mask"] = _no_masks(self.model.config)
        R, W = batch.input_ids.shape
        hidden = self.model(
            input_ids=batch.input_ids.reshape(1, -1), position_ids=positions.reshape(1, -1), **kwargs
        ).last_hidden_state
        if batch.packed:
            return self._pool_packed(hidden, batch)
        return pool(
            hidden.reshape(R, W, -1),
            batch.attention_mask,
            mode=self.pooling,
            normalize=self.normalize,
            validate=False,
            out_dtype=torch.float32,
        )

    def _packed_encoder_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        return packed_encoder_mask(position_ids, self.attn_implementation, next(self.model.parameters()).dtype)

    # ------------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None) -> list:
        """Token ids of texts (queries get ``Instruct: {instruction}\\nQuery: {text}`` when instruction is set)."""
        if isinstance(texts, str):
            raise TypeError("Encoder: pass a list of texts, not a single string")
        if instruction:
            texts = [format_query(t, instruction) for t in texts]
        tokenizer = self.text_tokenizer
        if max_length is not None and max_length != tokenizer.max_length:
            tokenizer = TextTokenizer(self.tokenizer, max_length, append_eos=self.is_decoder)
        return tokenizer(texts)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        instruction: str | None = None,
        show_progress: bool = True,
        max_length: int | None = None,
    ) -> np.ndarray:
        """Embeddings ``[len(texts), D]`` float32, in the order of ``texts``.

        Texts are tokenized once, sorted by length (less padding) and run in eval mode without autograd.
        """
        ids = self.tokenize(texts, instruction, max_length)
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(ids), batch_size), desc="encode", disable=not show_progress):
                    index = order[start : start + batch_size]
                    batch = pad_sequences([ids[i] for i in index], self.text_tokenizer.pad_token_id)
                    out[index] = self(batch).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write weights (safetensors), tokenizer, sentence-transformers modules and ``f2llm_config.json``.

        ``dtype``: the weights' dtype on disk (None: as in memory). A trainer holding fp32 master weights saves a
        bf16 model this way without converting the model it trains.

        For decoders the saved tokenizer appends EOS itself (``add_eos_token``), so that sentence-transformers,
        which tokenizes with special tokens, gets exactly the ids of :meth:`encode`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if dtype is None or all(p.dtype == dtype for p in self.model.parameters()):
            self.model.save_pretrained(path)
        else:
            # Converted tensor by tensor on the CPU: no second copy of the model on its device.
            state = {
                k: v.detach().to("cpu", dtype) if v.is_floating_point() else v
                for k, v in self.model.state_dict().items()
            }
            self.model.save_pretrained(path, state_dict=state)
            # transformers writes the in-memory dtype into config.json; the files hold `dtype`.
            config_file = path / "config.json"
            saved = json.loads(config_file.read_text())
            saved["dtype"] = str(dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.model_max_length = self.max_length
        if self.is_decoder:
            tokenizer.add_eos_token = True
            probe = tokenizer("a").input_ids
            if not probe or probe[-1] != tokenizer.eos_token_id:
                raise ValueError(
                    f"Encoder.save_pretrained: could not make tokenizer {type(tokenizer).__name__} append EOS; "
                    "sentence-transformers would then pool a different token than Encoder.encode"
                )
        tokenizer.save_pretrained(path)
        self._write_sentence_transformers_files(path)
        config = {
            "format": F2LLM_CONFIG_FORMAT,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "query_instruction": self.query_instruction,
            "decoder": self.is_decoder,
        }
        (path / F2LLM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def _write_sentence_transformers_files(self, path: Path) -> None:
        """Transformer -> Pooling -> (Normalize), in the module format every sentence-transformers version reads."""
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            (path / "2_Normalize").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.embedding_dim,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        }
        pooling[_ST_POOLING_KEY[self.pooling]] = True
        (path / "1_Pooling").mkdir(exist_ok=True)
        prompts = {"query": format_query("", self.query_instruction), "document": ""} if self.query_instruction else {}
        files = {
            "modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "1_Pooling/config.json": pooling,
            "config_sentence_transformers.json": {
                "model_type": "SentenceTransformer",
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        }
        for name, content in files.items():
            (path / name).write_text(json.dumps(content, indent=2) + "\n")
