"""Public fused ops. Each dispatches to a Triton kernel on CUDA and to a PyTorch path on CPU."""

from f2llm.kernels.pooling import pool, pool_reference

__all__ = ["pool", "pool_reference"]
