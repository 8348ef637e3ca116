"""The F2LLM data pipeline.

rows (query, passage, negative_1..K) -> at most ``max_rows`` of each source (a seeded sample), validated, tokenized
once and cached, split into training and held-out rows (:func:`load_sources`)
-> homogeneous per-source batches, same source on every rank, resumable (:class:`F2LLMBatchSampler`: how a step
picks its source and what a source's short last batch does are settings, the official loop's rules among them)
-> padded or packed model input (:class:`Collator`) -> :class:`f2llm.encoder.Encoder`.

Source kinds (retrieval / classification / clustering) come from the tables of F2LLM v1's and v2's sources
(:data:`SOURCE_KINDS`; f2llm.data.sources and f2llm.data.v2_sources), or from ``SourceOverride(kind=...)``.

A training step, on each rank::

    tok = encoder.text_tokenizer
    sources = load_sources("data/f2llm", tok, cache_dir)
    sampler = F2LLMBatchSampler(sources, batch_size=16, world_size=W, rank=r, seed=0, epochs=2)
    collate = Collator(pad_token_id=tok.pad_token_id, mode="packed", max_tokens=4096)
    for batch in sampler:                      # TrainingBatch: this rank's queries, passages, negatives
        emb = encoder(collate(batch.sequences()))  # [B + B + B*k, D], in that order
"""

from typing import TYPE_CHECKING

from f2llm.data.collate import Collator, EncoderBatch, pack_sequences, pad_sequences
from f2llm.data.sources import (
    INSTRUCTIONS,
    SOURCE_KINDS,
    DataError,
    SourceKind,
    SourceOverride,
    format_query,
    resolve_source,
)
from f2llm.data.tokenize import TextTokenizer, is_decoder_model_type

if TYPE_CHECKING:
    from f2llm.data.convert import convert
    from f2llm.data.readers import TokenizedSource, load_source, load_sources, read_raw
    from f2llm.data.sampler import F2LLMBatchSampler, TrainingBatch, negative_columns_for_step

# The readers, sampler and converters need `datasets` and pyarrow; the encoder (f2llm.encoder) only needs the
# tokenizer and collators. Loading the former on first use keeps `import f2llm.encoder` light, e.g. on a GPU image that
# runs the benchmarks without `datasets` installed.
_LAZY = {
    "convert": "f2llm.data.convert",
    "TokenizedSource": "f2llm.data.readers",
    "load_source": "f2llm.data.readers",
    "load_sources": "f2llm.data.readers",
    "read_raw": "f2llm.data.readers",
    "F2LLMBatchSampler": "f2llm.data.sampler",
    "TrainingBatch": "f2llm.data.sampler",
    "negative_columns_for_step": "f2llm.data.sampler",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'f2llm.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "INSTRUCTIONS",
    "SOURCE_KINDS",
    "Collator",
    "DataError",
    "EncoderBatch",
    "F2LLMBatchSampler",
    "SourceKind",
    "SourceOverride",
    "TextTokenizer",
    "TokenizedSource",
    "TrainingBatch",
    "convert",
    "format_query",
    "is_decoder_model_type",
    "load_source",
    "load_sources",
    "negative_columns_for_step",
    "pack_sequences",
    "pad_sequences",
    "read_raw",
    "resolve_source",
]
