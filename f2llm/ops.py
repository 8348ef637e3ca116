"""Public fused ops. Each dispatches to a Triton kernel on CUDA and to a PyTorch path on CPU."""

from f2llm.kernels.contrastive import (
    InfoNCEConfig,
    grouped_infonce,
    grouped_infonce_reference,
    infonce,
    infonce_config,
    infonce_reference,
)
from f2llm.kernels.matryoshka import (
    matryoshka_grouped_infonce_reference,
    matryoshka_infonce_reference,
    matryoshka_levels,
)
from f2llm.kernels.pooling import pool, pool_reference

__all__ = [
    "InfoNCEConfig",
    "grouped_infonce",
    "grouped_infonce_reference",
    "infonce",
    "infonce_config",
    "infonce_reference",
    "matryoshka_grouped_infonce_reference",
    "matryoshka_infonce_reference",
    "matryoshka_levels",
    "pool",
    "pool_reference",
]
