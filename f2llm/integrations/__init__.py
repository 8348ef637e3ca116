"""f2llm's engine behind other libraries' interfaces.

* :mod:`f2llm.integrations.sentence_transformers`: ``CachedMultipleNegativesRankingLoss``,
  ``MultipleNegativesRankingLoss``, ``CachedGISTEmbedLoss`` and ``MatryoshkaLoss``, drop-ins for
  sentence-transformers' losses of those names (sequence packing, fused InfoNCE where it applies, every Matryoshka
  dimension in one pass; the cached ones on f2llm's gradient cache).

Each submodule imports its library on import; this package itself imports nothing.
"""
