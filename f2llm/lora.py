"""LoRA training through the ``peft`` library: wrap an encoder's backbone, save its adapter, export a merged model.

``peft.get_peft_model`` injects LoRA layers into the backbone in place (each targeted ``nn.Linear`` becomes a
``peft`` LoRA layer holding the original as ``base_layer``) and freezes everything else. The :class:`Encoder` keeps
the backbone it had, so its forward, activation checkpointing and saving are untouched; the ``PeftModel`` around it
is held by a :class:`LoraAdapter` only to save the adapter in peft's own format.

A model saved for use (``final/``, ``extra/step-N/``) is the merged one: every LoRA layer's
``W + scaling * B @ A`` computed in float32 on the CPU from the live weights (the training model is not touched),
loaded into a plain backbone built on the meta device, and written by ``Encoder.save_pretrained`` as any final/ is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from f2llm.encoder import Encoder

ADAPTER_NAME = "default"  # peft's adapter name: its files and state-dict keys use it


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


class LoraError(ValueError):
    """A LoRA setting that does not fit the model (the message names the config key and what exists)."""


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` layers (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_target_modules(model: nn.Module, target_modules: Sequence[str], where: str) -> None:
    """Raise :class:`LoraError` when a target names no ``nn.Linear`` of ``model`` (peft checks only that some
    target matched: a misspelt one beside valid ones would train fewer adapters than asked)."""
    available = linear_module_names(model)
    missing = [t for t in target_modules if t not in available]
    if missing:
        raise LoraError(
            f"model.lora.target_modules: {missing} match no linear layer of {where}; its linear layers are named "
            f"{available}"
        )


@dataclass
class LoraAdapter:
    """The ``PeftModel`` around an encoder's backbone (whose LoRA layers the encoder runs)."""

    peft_model: nn.Module

    @classmethod
    def apply(
        cls,
        encoder: Encoder,
        r: int,
        alpha: float,
        dropout: float,
        target_modules: Sequence[str],
        seed: int,
        where: str = "the model",
    ) -> LoraAdapter:
        """Inject LoRA layers into ``encoder.model`` and freeze every other weight.

        The adapters are initialized from ``seed`` in a forked RNG: every rank starts from the same adapter weights
        (ranks are seeded differently for dropout) and the training RNG streams are not advanced.
        """
        from peft import LoraConfig, get_peft_model

        check_target_modules(encoder.model, target_modules, where)
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
        )
        devices = [encoder.device] if encoder.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            peft_model = get_peft_model(encoder.model, config, adapter_name=ADAPTER_NAME)
        return cls(peft_model)

    def save_adapter(self, path: str | Path) -> None:
        """The adapter alone in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable
        with ``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), path)``."""
        self.peft_model.save_pretrained(str(path), safe_serialization=True)


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The backbone's state dict with every LoRA layer merged (``W + scaling * B @ A``, summed in float32), on the
    CPU in ``dtype``, under the names of the model without LoRA. ``model`` is only read."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            prefix = f"{name}." if name else ""
            lora_prefixes.append(prefix)
            weight = module.get_base_layer().weight.detach().to("cpu", torch.float32)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
            merged[f"{prefix}weight"] = weight.to(dtype)
        for key, value in model.state_dict().items():
            owner = next((p for p in lora_prefixes if key.startswith(p)), None)
            if owner is None:
                merged[key] = value.detach().to("cpu", dtype) if value.is_floating_point() else value.cpu()
            elif key.startswith(f"{owner}base_layer.") and not key.endswith(".weight"):
                merged[owner + key.removeprefix(f"{owner}base_layer.")] = value.detach().to("cpu", dtype)
            # else: the LoRA weights themselves (lora_A / lora_B ...) and base_layer.weight, merged above
    return merged


def merged_encoder(encoder: Encoder, dtype: torch.dtype = torch.float32) -> Encoder:
    """A plain (LoRA-free) copy of ``encoder`` on the CPU whose weights are the merged ones, in ``dtype`` (one copy
    of the weights in host memory, in the dtype it will be saved in).

    The backbone is built from its config on the meta device (no memory, no initialization) and the merged tensors
    are assigned into it. Saving it with ``save_pretrained`` writes exactly what a full fine-tune's final/ holds.
    """
    from transformers import AutoModel

    state = merged_state_dict(encoder.model, dtype)
    with torch.device("meta"):
        backbone = AutoModel.from_config(
            encoder.model.config, attn_implementation=encoder.attn_implementation, dtype=dtype
        )
    missing, unexpected = backbone.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not _is_non_persistent(backbone, k) for k in missing):
        raise RuntimeError(
            f"merged_encoder: the merged LoRA weights do not fit a plain {type(backbone).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    # Non-persistent buffers (rotary frequencies) are not in a state dict: recompute them on the CPU.
    backbone = _materialize_buffers(backbone, encoder.model)
    return Encoder(
        backbone.eval(),
        encoder.tokenizer,
        pooling=encoder.pooling,
        max_length=encoder.max_length,
        normalize=encoder.normalize,
        query_instruction=encoder.query_instruction,
    )


def _is_non_persistent(model: nn.Module, key: str) -> bool:
    module_name, _, buffer = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer in getattr(module, "_non_persistent_buffers_set", set())


def _materialize_buffers(backbone: nn.Module, source: nn.Module) -> nn.Module:
    """Copy the buffers left on the meta device from the live model ``source`` (same module names; LoRA does not
    wrap modules that hold buffers)."""
    live = dict(source.named_buffers())
    for name, buffer in list(backbone.named_buffers()):
        if buffer.device.type != "meta":
            continue
        if name not in live:
            raise RuntimeError(f"merged_encoder: buffer {name} of the plain backbone has no counterpart to copy")
        module_name, _, attr = name.rpartition(".")
        module = backbone.get_submodule(module_name) if module_name else backbone
        persistent = attr not in module._non_persistent_buffers_set
        module.register_buffer(attr, live[name].detach().to("cpu").clone(), persistent=persistent)
    return backbone
