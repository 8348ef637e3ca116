"""What evaluation and mining need from a model, an on-disk embedding cache, and the adapter MTEB runs.

* :class:`TextEncoder` is the only interface evaluation and mining rely on: ``encode(texts, *, batch_size,
  instruction, show_progress) -> float32 [n, D]``. ``f2llm.encoder.Encoder`` satisfies it, so does any thin wrapper
  over another library's model. ``instruction`` is the bare task instruction; the encoder formats it
  (``Instruct: {instruction}\\nQuery: {text}`` for F2LLM).
* :func:`encode_cached` stores embeddings as ``.npy`` keyed by (model key, instruction, texts), so a corpus encoded
  once (e.g. SciFact's 5,183 documents) serves mining and every later evaluation of the same weights.
* :class:`MTEBEncoder` makes a :class:`TextEncoder` an MTEB 2.x encoder (``mteb.evaluate(MTEBEncoder(...), tasks)``),
  choosing per task the instruction F2LLM's MTEB entry uses: queries get it, documents never do; STS,
  classification and clustering texts all get it. Encoders that pool the CLS token or the mean (BERT-like
  models such as all-MiniLM-L6-v2) get no instruction.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader

# Instructions per task, as F2LLM's MTEB entry (mteb.models.model_implementations.codefuse_models.prompts_dict)
# writes them; tasks it does not list fall back to the task's own MTEB prompt, which the entries here copy.
TASK_INSTRUCTIONS: dict[str, str] = {
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "STSBenchmark": "Retrieve semantically similar text.",
    "Banking77Classification": "Given an online banking query, find the corresponding intents.",
    "EmotionClassification": (
        "Classify the emotion expressed in the given Twitter message into one of the six emotions: "
        "anger, fear, joy, love, sadness, and surprise"
    ),
    "TwentyNewsgroupsClustering.v2": "Identify the topic or theme of the given news articles.",
}


@runtime_checkable
class TextEncoder(Protocol):
    """A model that turns texts into one float32 embedding each (L2-normalized for cosine scoring)."""

    def encode(
        self,
        texts: list[str],
        *,
        batch_size: int = 32,
        instruction: str | None = None,
        show_progress: bool = True,
    ) -> np.ndarray: ...


def uses_instructions(encoder: object) -> bool:
    """True for encoders that pool the last token (decoder LLMs): those were trained with query instructions."""
    return getattr(encoder, "pooling", None) == "last"


# ----------------------------------------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------------------------------------
def cache_path(cache_dir: Path | str, model_key: str, texts: Sequence[str], instruction: str | None = None) -> Path:
    """The ``.npy`` file holding the embeddings of ``texts`` (in this order) for ``model_key`` and ``instruction``."""
    digest = hashlib.sha256()
    for part in (model_key, "\x1f", instruction or "", "\x1f"):
        digest.update(part.encode("utf-8"))
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key).strip("_")[-60:] or "model"
    return Path(cache_dir) / f"{slug}-{len(texts)}-{digest.hexdigest()[:24]}.npy"


def encode_cached(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    cache_dir: Path | str | None,
    model_key: str,
    instruction: str | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> np.ndarray:
    """Encode ``texts``, reusing the embeddings stored under ``cache_dir`` when the same texts were encoded before.

    ``model_key`` must identify the weights and encoding settings (a checkpoint path alone is not enough when
    the checkpoint is overwritten: the CLI uses :func:`model_fingerprint`). With ``cache_dir=None`` nothing is
    stored. The file is written atomically, so an interrupted run never leaves a truncated cache entry.
    """
    texts = list(texts)
    if cache_dir is None:
        return _encode(encoder, texts, instruction, batch_size, show_progress)
    path = cache_path(cache_dir, model_key, texts, instruction)
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] != len(texts):
            raise ValueError(f"{path}: cached embeddings have {emb.shape[0]} rows for {len(texts)} texts; delete it")
        return emb
    emb = _encode(encoder, texts, instruction, batch_size, show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with tmp.open("wb") as f:
            np.save(f, emb)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return emb


def _encode(
    encoder: TextEncoder, texts: list[str], instruction: str | None, batch_size: int, show_progress: bool
) -> np.ndarray:
    emb = np.asarray(
        encoder.encode(texts, batch_size=batch_size, instruction=instruction, show_progress=show_progress),
        dtype=np.float32,
    )
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"{type(encoder).__name__}.encode returned shape {emb.shape} for {len(texts)} texts")
    return emb


def model_fingerprint(name_or_path: str, **settings: Any) -> str:
    """A cache key for a model: its name, plus size and mtime of every file when it is a local directory.

    Encoding settings (max length, pooling, dtype...) are part of the key because they change the embeddings.
    """
    parts = [name_or_path]
    root = Path(name_or_path)
    if root.is_dir():
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = f.stat()
            parts.append(f"{f.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}")
    parts.extend(f"{k}={v}" for k, v in sorted(settings.items()))
    digest = hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{root.name or name_or_path}-{digest}"


# ----------------------------------------------------------------------------------------------------------
# MTEB adapter
# ----------------------------------------------------------------------------------------------------------
class MTEBEncoder(AbsEncoder):
    """An MTEB 2.x encoder over a :class:`TextEncoder`, usable with ``mteb.evaluate``.

    Args:
        encoder: the model.
        model_name: name recorded in MTEB's results (e.g. ``sentence-transformers/all-MiniLM-L6-v2``).
        use_instructions: give task instructions to queries and symmetric-task texts; ``None`` decides from the
            encoder (:func:`uses_instructions`).
        instructions: task name -> instruction; tasks not listed use the instruction MTEB's task defines.
        cache_dir, model_key: when both are set, every encoded list of texts goes through :func:`encode_cached`.
        show_progress: progress bars while encoding.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        model_name: str,
        revision: str | None = None,
        use_instructions: bool | None = None,
        instructions: Mapping[str, str] | None = None,
        cache_dir: Path | str | None = None,
        model_key: str | None = None,
        show_progress: bool = True,
    ) -> None:
        if cache_dir is not None and not model_key:
            raise ValueError("MTEBEncoder: cache_dir needs a model_key identifying the weights")
        self.model = encoder
        self.use_instructions = uses_instructions(encoder) if use_instructions is None else use_instructions
        self.prompts_dict = dict(TASK_INSTRUCTIONS if instructions is None else instructions)
        self.cache_dir = cache_dir
        self.model_key = model_key or model_name
        self.show_progress = show_progress
        # MTEB validates "organisation/name"; a bare local name is filed under "local/".
        meta_name = model_name if "/" in model_name else f"local/{model_name}"
        self.mteb_model_meta = ModelMeta.create_empty(
            {
                "name": meta_name,
                "revision": revision,
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": self.use_instructions,
                "framework": ["PyTorch"],
            }
        )

    def task_instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for texts of this task and side, or None (documents, or an encoder without them)."""
        if not self.use_instructions or prompt_type == PromptType.document:
            return None
        instruction: Any = self.get_instruction(task_metadata, prompt_type)
        if isinstance(instruction, dict):  # a task with per-side prompts, asked for a symmetric text
            instruction = instruction.get(PromptType.query.value) or next(iter(instruction.values()), "")
        return instruction or None

    def encode(
        self,
        inputs: DataLoader[Any],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        return encode_cached(
            self.model,
            texts,
            cache_dir=self.cache_dir,
            model_key=self.model_key,
            instruction=self.task_instruction(task_metadata, prompt_type),
            batch_size=int(kwargs.get("batch_size", 32)),
            show_progress=self.show_progress and bool(kwargs.get("show_progress_bar", True)),
        )
