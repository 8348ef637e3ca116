"""f2llm's Triton kernels, installed as ``f2llm.kernels``; the public ops are importable from here.

One module per op, as in Liger-Kernel: ``@triton.jit`` kernels, their host forward / backward, a PyTorch path for
CPU tensors, and the PyTorch reference that defines the op. Imports run one way:

* :mod:`~f2llm.kernels.utils`: what more than one module needs (backend choice, casts, tile choice, the shared
  row load and backward GEMM);
* the kernel modules, which import only ``utils``: :mod:`~f2llm.kernels.pooling` (pooling + L2 norm, with its
  entry point :func:`pool`), :mod:`~f2llm.kernels.contrastive` (InfoNCE on raw dot products) and
  :mod:`~f2llm.kernels.matryoshka` (InfoNCE summed over Matryoshka prefix levels);
* :mod:`~f2llm.kernels.losses`: the entry points :func:`infonce` and :func:`grouped_infonce` (argument checks,
  tile choice, single-level or Matryoshka) and the autograd Function both infonce forms share.

Nothing here imports transformers.
"""

from f2llm.kernels.contrastive import grouped_infonce_reference, infonce_reference
from f2llm.kernels.losses import grouped_infonce, infonce
from f2llm.kernels.matryoshka import (
    matryoshka_grouped_infonce_reference,
    matryoshka_infonce_reference,
    matryoshka_levels,
)
from f2llm.kernels.pooling import pool, pool_reference
from f2llm.kernels.utils import InfoNCEConfig, infonce_config

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
