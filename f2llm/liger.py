"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) swapped into a Hugging Face backbone, and undone for measuring.

Applied on CUDA only: Liger's kernels do not run on the CPU or on the meta device. :func:`without_liger` gives the
activation estimate (f2llm.recompute) the modeling module as it was before patching.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedModel

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
def without_liger(model: PreTrainedModel) -> Iterator[None]:
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
