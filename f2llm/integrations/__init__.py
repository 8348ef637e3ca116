"""f2llm's engine behind other libraries' interfaces.

* :mod:`f2llm.integrations.sentence_transformers`: ``CachedMultipleNegativesRankingLoss``, a drop-in for
  sentence-transformers' loss of that name (gradient cache, sequence packing, fused InfoNCE).

Each submodule imports its library on import; this package itself imports nothing.
"""
