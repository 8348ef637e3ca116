"""The tokenization rule's core on the Rust tokenizer alone, for :class:`f2llm.data.TextTokenizer` and its workers.

Kept out of ``f2llm.data`` on purpose: a worker process of the data preparation pool (f2llm.data.prepare) is
started with ``spawn`` and imports only this module, ``tokenizers`` and numpy (0.3 s), not ``f2llm.data``'s
package, whose collators import torch (several seconds and 200 MB per worker).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer


def clip_text(text: str, limit: int, side: str) -> str:
    """The part of an over-long text that truncation keeps, cut at a whitespace so that no word is split.

    Tokenizing a huge text only to keep max_length tokens costs memory and time in proportion to the text (a 10 MB
    row: ~2 GB, 10-20 s); see TextTokenizer.__init__ for why ``limit`` characters always hold max_length tokens.
    """
    if len(text) <= limit:
        return text
    if side == "left":
        cut = text.find(" ", len(text) - limit)
        return text[cut if 0 <= cut < len(text) - limit // 2 else len(text) - limit :]
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides the ids of a text (picklable): the Rust tokenizer's definition with its truncation
    set, the special-token rule, the EOS appended by the decoder rule, and the clip of over-long texts."""

    definition: str  # Tokenizer.to_str() of the backend, truncation already enabled
    add_special_tokens: bool
    eos_token_id: int | None  # appended to every text (decoder rule), or None
    clip_chars: int
    truncation_side: str


class FastEncoder:
    """Texts -> ids by an :class:`EncoderSpec`: the same ids in the training process and in a pool worker."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.backend = Tokenizer.from_str(spec.definition)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        spec = self.spec
        clipped = [clip_text(t, spec.clip_chars, spec.truncation_side) for t in texts]
        encodings = self.backend.encode_batch_fast(clipped, add_special_tokens=spec.add_special_tokens)
        ids = [e.ids for e in encodings]
        if spec.eos_token_id is not None:
            for row in ids:
                row.append(spec.eos_token_id)
        return ids

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64 [n + 1], values int32): text i's ids are ``values[offsets[i]:offsets[i + 1]]``. Two arrays
        pickle as two buffers, where n lists of ints would pickle int by int."""
        ids = self(texts)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        return offsets, values


_WORKER: FastEncoder | None = None


def init_worker(spec: EncoderSpec) -> None:
    """Pool initializer: one tokenizer per worker process, single-threaded (the pool's processes are the
    parallelism; Rust threads in every worker would oversubscribe the cores)."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = FastEncoder(spec)


def encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A pool task: :meth:`FastEncoder.encode_flat` of one chunk of texts."""
    if _WORKER is None:
        raise RuntimeError("encode_in_worker: the worker was not initialized (init_worker)")
    return _WORKER.encode_flat(texts)
