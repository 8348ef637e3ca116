"""f2llm's Triton kernels, installed as ``f2llm.kernels``.

One module per op: Triton kernels, the PyTorch reference that defines the op, a PyTorch path for CPU tensors,
and the autograd Function + public function that dispatches between them. Nothing here imports transformers.
Import the public ops from :mod:`f2llm.ops`.
"""
