"""Evaluation that reproduces MTEB on local data, the embedding cache, and the MTEB adapter.

``evaluate_model(encoder, ["scifact", "stsb"], model_name=...)`` runs MTEB's own task classes and evaluators on the
datasets under ``data/``; ``MTEBEncoder`` lets ``mteb.evaluate`` run any :class:`TextEncoder` on hub tasks too.
"""

from f2llm.evaluation.data import BeirSplit, DataFormatError, corpus_text, read_beir
from f2llm.evaluation.encoding import (
    TASK_INSTRUCTIONS,
    MTEBEncoder,
    TextEncoder,
    cache_path,
    encode_cached,
    model_fingerprint,
    uses_instructions,
)
from f2llm.evaluation.run import TaskScore, evaluate_model, format_table, match_published_model, write_report
from f2llm.evaluation.tasks import BUILTIN_TASKS, default_data_dir, get_local_tasks

__all__ = [
    "BUILTIN_TASKS",
    "TASK_INSTRUCTIONS",
    "BeirSplit",
    "DataFormatError",
    "MTEBEncoder",
    "TaskScore",
    "TextEncoder",
    "cache_path",
    "corpus_text",
    "default_data_dir",
    "encode_cached",
    "evaluate_model",
    "format_table",
    "get_local_tasks",
    "match_published_model",
    "model_fingerprint",
    "read_beir",
    "uses_instructions",
    "write_report",
]
