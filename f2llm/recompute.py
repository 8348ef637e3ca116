"""Recompute (activation checkpointing): what a forward saves for backward, and which layers recompute instead.

* :func:`estimate_activation_profile`: the (fixed, per-token) bytes a training forward of a backbone saves for
  backward, measured once on the meta device (no memory, no compute); :class:`ActivationMemory` caches it per
  encoder, compute dtype, adapters and recomputed layers.
* :class:`RecomputePolicy`: which layers of a forward with grad recompute their activations in backward
  (``model.gradient_checkpointing``): forced on or off, or (auto) only when the forward's estimated saved
  activations exceed the budget, and then just enough of its first layers to fit. The decision reads only the
  batch's shape, so it costs no host sync and works on the meta device.
* the budget: :func:`activation_budget` (from a rank's free device memory) and :func:`budget_from_free_memory`.

Under DDP and ZeRO 0-2 recompute changes no collective (the same gradients are reduced in the same order; a
recomputed forward holds none), so ranks may decide differently, e.g. for chunks of different sizes. ZeRO-3 gathers a
layer's parameters again when it recomputes it: there the policy's ``agree`` makes every rank recompute, in each
forward with grad, the most layers any rank asks for (one small all-reduce per forward), so all ranks run the same
gathers.

The config key keeps transformers' name (``gradient_checkpointing``), which users know from its TrainingArguments;
in the code the concept is "recompute", and "checkpoint" means saved training state only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from f2llm.attention import VARLEN, measuring, no_masks, takes_prepared_masks
from f2llm.encoder import enable_recompute
from f2llm.liger import without_liger
from f2llm.lora import adapter_configs, adapter_signature

if TYPE_CHECKING:
    from f2llm.config import TrainConfig
    from f2llm.distributed import Runtime
    from f2llm.encoder import Encoder
    from f2llm.engine import Engine


# ------------------------------------------------------------------------------------------------ measuring
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


_PROBE_TOKENS = (128, 256)  # two packed rows of two texts each: a straight line through their saved bytes


def estimate_activation_profile(
    model: PreTrainedModel,
    attn_implementation: str,
    weights_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    *,
    decoder: bool,
    recomputed: bool | int = False,
) -> tuple[int, int]:
    """(fixed, per-token) bytes a training forward of ``model`` saves for backward, from two forwards of its config
    on the meta device: the same architecture, weights dtype and attention implementation, in training mode,
    under an emulated autocast when ``compute_dtype`` differs from ``weights_dtype``; with ``recomputed`` True,
    every layer transformers can recompute recomputes, an int k: the first k of them (what those layers then save
    is not counted: their inputs, which the recompute holds outside autograd, are left to the caller).

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
    with without_liger(model):
        with torch.device("meta"):
            meta = AutoModel.from_config(config, dtype=weights_dtype, attn_implementation=probe_attention)
        _inject_adapters_like(model, meta)
        meta.train()
        if recomputed:
            enable_recompute(meta)
            if recomputed is not True:
                for i, layer in enumerate(m for m in meta.modules() if isinstance(m, GradientCheckpointingLayer)):
                    layer.gradient_checkpointing = i < recomputed
        weights = [*meta.parameters(), *meta.buffers()]
        emulated = compute_dtype if compute_dtype != weights_dtype else None
        autocast = _MetaAutocast(compute_dtype) if emulated is not None else contextlib.nullcontext()
        for n in _PROBE_TOKENS:
            half = n // 2
            ids = torch.zeros(1, n, dtype=torch.long, device="meta")
            kwargs: dict[str, Any] = {}
            if decoder:
                kwargs["position_ids"] = torch.arange(half, device="meta").repeat(2)[None]
                # A cache makes transformers skip its look for packing, which reads the position ids (meta cannot);
                # the cached keys and values are the very tensors attention saves, so nothing more is counted.
                # Recompute turns the cache off: prepared masks saying "none" skip the look there.
                kwargs["use_cache"] = True
                if recomputed and takes_prepared_masks(type(meta)):
                    kwargs.update(use_cache=False, attention_mask=no_masks(config))
                if probe_attention == VARLEN:
                    cu = torch.arange(0, n + 1, half, dtype=torch.int32, device="meta")
                    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=half, max_length_k=half)
            with measuring(emulated), autocast:
                measured.append(saved_tensor_bytes(lambda: meta(input_ids=ids, **kwargs), weights))  # noqa: B023
    (n1, n2), (b1, b2) = _PROBE_TOKENS, measured
    per_token = -(-(b2 - b1) // (n2 - n1))
    return max(0, b1 - per_token * n1), per_token


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


class ActivationMemory:
    """What forwards with grad of ``encoder`` save for backward (:func:`estimate_activation_profile`), measured on
    the meta device once per compute dtype, adapters (LoRA injected after a measurement is measured anew) and number
    of recomputed layers, and cached here."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._profiles: dict[Any, tuple[int, int]] = {}

    def _weights_dtype(self) -> torch.dtype:
        return next(self.encoder.model.parameters()).dtype

    def profile(self, compute_dtype: torch.dtype | None = None, recomputed: bool | int = False) -> tuple[int, int]:
        """(fixed, per-token) bytes of the tensors a forward with grad saves for backward, with the first
        ``recomputed`` layers recomputing (True: every layer).

        ``compute_dtype``: the dtype the forward computes in (None: the weights'); when it differs, the forward is
        measured under an emulation of autocast (matrix products in ``compute_dtype``; the fixed part then holds
        autocast's low-precision copies of the weights).
        """
        encoder, weights = self.encoder, self._weights_dtype()
        dtype = compute_dtype or weights
        key = (dtype, "all" if recomputed is True else int(recomputed), adapter_signature(encoder.model))
        if key not in self._profiles:
            self._profiles[key] = estimate_activation_profile(
                encoder.model,
                encoder.attn_implementation,
                weights,
                dtype,
                decoder=encoder.is_decoder,
                recomputed=recomputed,
            )
        return self._profiles[key]

    def bytes(self, num_tokens: int, compute_dtype: torch.dtype | None = None) -> int:
        """Estimated bytes a forward with grad of ``num_tokens`` input positions (padding included) keeps for
        backward without recompute: ``fixed + per_token * num_tokens`` (see :meth:`profile`)."""
        fixed, per_token = self.profile(compute_dtype)
        return fixed + per_token * int(num_tokens)

    def layer_saving(self, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
        """(recomputable layers, per-token bytes that recomputing one of them saves at least): what a layer saves
        without recompute, less the input a recomputed layer keeps for its recomputation. Measured on meta for the
        first layer (this profile less the profile with it recomputed) and for the others (less the profile with
        all recomputed, shared evenly: they are alike); the smaller of the two. They differ where the first
        layer's input needs no gradient (LoRA: the embeddings are frozen), so its layer saves less."""
        layers = self.encoder.num_recompute_layers
        if not layers:
            return 0, 0
        _, none_recomputed = self.profile(compute_dtype)
        _, first_recomputed = self.profile(compute_dtype, 1)
        saved = none_recomputed - first_recomputed  # by the first layer
        if layers > 1:
            _, all_recomputed = self.profile(compute_dtype, True)
            saved = min(saved, (first_recomputed - all_recomputed) // (layers - 1))
        weights = self._weights_dtype()
        layer_input = self.encoder.model.config.hidden_size * weights.itemsize  # the residual stream
        return layers, max(0, saved - layer_input)


# ------------------------------------------------------------------------------------------------ the policy
# Share of the free device memory (after the weights and the training state the first step will allocate) that one
# forward's saved activations may take. The estimate counts saved tensors only; the rest is the backward's own
# transient buffers (gradients of the activations of the layer being differentiated, its recompute when it is
# checkpointed, attention and matmul workspaces), the caching allocator's fragmentation under shapes that change
# every step (commonly 10-20%), collective buffers (NCCL, DeepSpeed's reduce buckets), the embeddings and loss.
ACTIVATION_MEMORY_SHARE = 0.7


@dataclass
class RecomputePolicy:
    """Which layers of a forward with grad recompute their activations in backward (``model.gradient_checkpointing``).

    ``mode`` True / False: every layer / none. ``"auto"``: none while ``activation_bytes(tokens)`` (the forward's
    estimated saved activations, for its input positions, padding included) fits ``budget`` bytes; beyond, just
    enough of the first layers to fit (``layer_saving``: the layers and the per-token bytes recomputing one saves;
    without it, every layer). Each recomputed layer costs one more forward of that layer: the fewer, the less
    recompute. With no budget known, every layer (as True).

    ``agree``: given this rank's layer count, the largest any rank asks for (an all-reduce), for engines whose
    recompute runs collectives (ZeRO-3 gathers a recomputed layer's parameters again); ``num_layers`` is then the
    encoder's recomputable layers. None: every rank decides alone.
    """

    mode: Literal["auto"] | bool
    budget: int | None
    activation_bytes: Callable[[int], int]
    budget_source: str = "model.activation_budget_gb"
    layer_saving: tuple[int, int] | None = None
    agree: Callable[[int], int] | None = None
    num_layers: int = 0

    def __call__(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` input positions recomputes any layer (this rank's own decision)."""
        layers = self.layers(tokens)
        return layers is True or layers > 0

    def layers(self, tokens: int) -> bool | int:
        """What a forward of ``tokens`` positions recomputes on this rank: True (every layer), False (none) or the
        first k."""
        if self.mode != "auto":
            return bool(self.mode)
        if self.budget is None:
            return True
        excess = self.activation_bytes(tokens) - self.budget
        if excess <= 0:
            return False
        n_layers, saving = self.layer_saving or (0, 0)
        if saving <= 0:
            return True
        k = -(-excess // (saving * max(1, tokens)))
        return True if k >= n_layers else int(k)

    def decide(self, tokens: int) -> bool | int:
        """What a forward with grad of ``tokens`` positions recomputes, agreed with the other ranks when ``agree``
        is set (every rank then recomputes the most layers any rank asks for: budgets and chunks differ)."""
        layers = self.layers(tokens)
        if self.agree is None:
            return layers
        count = self.agree(self.num_layers if layers is True else int(layers))
        return count if count < self.num_layers else True

    def summary(self) -> str:
        if self.mode != "auto":
            return f"gradient checkpointing {'on' if self.mode else 'off'} in every forward with grad"
        fixed, per_token = self.activation_bytes(0), self.activation_bytes(1) - self.activation_bytes(0)
        head = (
            f"gradient checkpointing auto: ~{per_token / 2**10:,.1f} KiB of saved activations per token "
            f"(+{fixed / 2**20:,.1f} MiB per forward)"
        )
        if self.budget is None:
            return f"{head}, no memory budget known ({self.budget_source}): every forward with grad checkpoints"
        limit = max(0, self.budget - fixed) // max(1, per_token)
        text = (
            f"{head}, budget {self.budget / 2**30:,.2f} GiB ({self.budget_source}): forwards of more than "
            f"{limit:,} tokens checkpoint"
        )
        saving = (self.layer_saving or (0, 0))[1]
        if saving > 0:
            text += f" just enough of their first layers to fit (~{saving / 2**10:,.1f} KiB/token saved per layer)"
        return text


def recompute_policy(config: TrainConfig, engine: Engine, runtime: Runtime) -> RecomputePolicy:
    """A run's :class:`RecomputePolicy`: ``model.gradient_checkpointing`` against the budget
    ``model.activation_budget_gb``, or on CUDA one derived from the device memory now (:func:`activation_budget`:
    call this before any step has allocated gradients or optimizer state). Ranks agree on it where the engine
    gathers parameters (ZeRO-3)."""
    model, encoder, dtype = config.model, engine.encoder, engine.compute_dtype
    budget, source = None, "model.activation_budget_gb"
    if model.activation_budget_gb is not None:
        budget = int(model.activation_budget_gb * 2**30)
    elif model.gradient_checkpointing == "auto":
        budget = activation_budget(engine, runtime.device)
        source = (
            f"{ACTIVATION_MEMORY_SHARE:.0%} of the free device memory after weights, gradients and AdamW state"
            if budget is not None
            else f"not set, and none derived on {runtime.device.type}"
        )
    memory = ActivationMemory(encoder)
    saving = memory.layer_saving(dtype) if budget is not None else None
    return RecomputePolicy(
        model.gradient_checkpointing,
        budget,
        lambda n: memory.bytes(n, dtype),
        source,
        saving,
        agree=runtime.max if engine.gathers_parameters else None,
        num_layers=encoder.num_recompute_layers,
    )


def activation_budget(engine: Engine, device: torch.device) -> int | None:
    """Bytes of saved activations one forward may keep, from this rank's free device memory now (weights, and
    DeepSpeed's master partitions, already in it) less the training state its first step allocates
    (:meth:`Engine.step_state_bytes`), times :data:`ACTIVATION_MEMORY_SHARE`. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free to torch's allocator
    return budget_from_free_memory(free + cached, engine.step_state_bytes())


def budget_from_free_memory(free: int, step_state: int) -> int:
    """The activation budget of a rank with ``free`` bytes of device memory once its weights are loaded, whose first
    step will allocate ``step_state`` more (:meth:`Engine.step_state_bytes`): :data:`ACTIVATION_MEMORY_SHARE` of
    what is left. Also what benchmarks/bench_train_step.py --config budgets a GPU of a given size with."""
    return max(0, int(ACTIVATION_MEMORY_SHARE * (free - step_state)))
