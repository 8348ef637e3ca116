"""Collators: token id sequences -> one model input, padded or packed.

* padded: ``[n, L]`` with L the longest text, right padding (left optional), ``attention_mask`` from lengths
  (never from ``input_ids != pad``: Qwen3 base tokenizers have pad == EOS, the very token that is pooled).
* packed: texts laid end to end in rows of at most ``max_tokens`` tokens (first-fit decreasing, as few rows as
  possible and filled evenly, since rows are padded to the longest), ``position_ids``
  restarting at 0 for every text, and ``cu_seqlens`` (int32, flash-attention's varlen convention) delimiting the
  texts in the stream of real tokens. The tail of a row that is not full is padding; its position ids restart at 0
  too, so it forms a segment of its own and never shares attention with a text.

Both layouts also carry ``attn_cu_seqlens`` / ``attn_max_seqlen``: the segments of ``input_ids.view(-1)`` that a
varlen attention kernel attends within (every text, and every run of padding as a segment of its own), computed
here from the lengths the collator knows, so that the encoder never reads them back from the device.

:class:`f2llm.encoder.Encoder` turns either into embeddings ``[n, D]`` in the order of the input sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

TokenIds = Sequence[int] | np.ndarray
PaddingSide = Literal["right", "left"]
CollateMode = Literal["padded", "packed"]


@dataclass
class EncoderBatch:
    """One model input holding ``num_texts`` texts.

    Attributes:
        input_ids: [R, W] int64 token ids (padded: one text per row; packed: several texts per row).
        position_ids: [R, W] int64; each text's positions run 0..len-1 (padding positions are never read).
        attention_mask: [R, W] int64, 1 = real token. Padded layout only (None when packed).
        cu_seqlens: [n + 1] int32 offsets of the texts in the packed stream of real tokens. Packed only.
        token_index: [T] int64 index of each real token of the stream in ``input_ids.view(-1)``; None when the
            rows hold no padding (the stream is then ``input_ids.view(-1)`` itself). Packed only.
        text_position: [n] int64, where text i (input order) sits in the packed stream. Packed only.
        max_seqlen: longest text, in tokens.
        num_tokens: real tokens (sum of text lengths).
        attn_cu_seqlens: [S + 1] int32 offsets of the attention segments in ``input_ids.view(-1)``: each text, and
            each run of padding (a row's padding tail, or a padded row's padding) as a segment of its own. With
            causal or bidirectional attention inside each segment, no text sees another text or padding.
        attn_max_seqlen: longest segment of ``attn_cu_seqlens`` (a Python int: a kernel's launch size).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    text_position: torch.Tensor | None = None
    max_seqlen: int = 0
    num_tokens: int = 0
    attn_cu_seqlens: torch.Tensor | None = None
    attn_max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_texts(self) -> int:
        return self.cu_seqlens.numel() - 1 if self.packed else self.input_ids.shape[0]

    @property
    def real_token_fraction(self) -> float:
        """Share of the model's input positions that hold real tokens (1.0 = no padding FLOPs)."""
        return self.num_tokens / max(1, self.input_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncoderBatch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return EncoderBatch(**moved)


def _lengths(seqs: Sequence[TokenIds]) -> np.ndarray:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if lengths.size and lengths.min() == 0:
        empty = np.flatnonzero(lengths == 0)[:10].tolist()
        raise ValueError(f"collate: sequence(s) {empty} have no token; every text needs at least one (EOS)")
    return lengths


def _concat(seqs: Sequence[TokenIds]) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])


def _positions_within(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for every sequence, concatenated."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def _segments(rows: list[np.ndarray]) -> tuple[torch.Tensor, int]:
    """``attn_cu_seqlens`` and ``attn_max_seqlen`` from each row's segment lengths, in order (zeros dropped)."""
    lengths = np.concatenate(rows)
    lengths = lengths[lengths > 0]
    cu = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return torch.from_numpy(cu), int(lengths.max())


def pad_sequences(seqs: Sequence[TokenIds], pad_token_id: int, padding_side: PaddingSide = "right") -> EncoderBatch:
    """One row per text, padded to the longest; ``attention_mask`` and ``position_ids`` from the lengths."""
    if not seqs:
        raise ValueError("pad_sequences: no sequences to collate")
    if padding_side not in ("right", "left"):
        raise ValueError(f"pad_sequences: padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = _lengths(seqs)
    n, width = len(seqs), int(lengths.max())
    within = _positions_within(lengths)
    rows = np.repeat(np.arange(n), lengths)
    cols = within if padding_side == "right" else within + np.repeat(width - lengths, lengths)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    input_ids[rows, cols] = _concat(seqs)
    mask = np.zeros((n, width), dtype=np.int64)
    mask[rows, cols] = 1
    positions = np.zeros((n, width), dtype=np.int64)
    positions[rows, cols] = within
    padding = width - lengths
    order = (lengths, padding) if padding_side == "right" else (padding, lengths)
    attn_cu, attn_max = _segments([np.stack(order, axis=1).reshape(-1)])
    return EncoderBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(positions),
        attention_mask=torch.from_numpy(mask),
        max_seqlen=width,
        num_tokens=int(lengths.sum()),
        attn_cu_seqlens=attn_cu,
        attn_max_seqlen=attn_max,
    )


def _first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of sequence indices) of total length <= capacity; longest sequences placed first."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        for b, room in enumerate(free):
            if room >= length:
                bins[b].append(i)
                free[b] = room - length
                break
        else:
            bins.append([i])
            free.append(capacity - length)
    return bins


def _balanced_bins(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """As few rows as max_tokens allows, filled evenly: rows are padded to the longest, so even rows waste least.

    Tries first-fit decreasing with the smallest capacity that could hold everything in R rows, growing it until
    the texts fit in R rows (R grows when the capacity would pass max_tokens).
    """
    total, longest = int(lengths.sum()), int(lengths.max())
    rows = -(-total // max_tokens)
    while True:
        capacity = max(longest, -(-total // rows))
        while capacity <= max_tokens:
            bins = _first_fit_decreasing(lengths, capacity)
            if len(bins) <= rows:
                return bins
            capacity += max(1, capacity // 64)
        rows += 1


def pack_sequences(seqs: Sequence[TokenIds], max_tokens: int, pad_token_id: int) -> EncoderBatch:
    """Texts concatenated into rows of at most ``max_tokens`` tokens, with ``cu_seqlens`` and restarting positions.

    Rows are padded at their end to the longest row. With ``max_tokens`` >= the total number of tokens there is
    one row and no padding at all (the layout flash-attention's varlen kernels want).
    """
    if not seqs:
        raise ValueError("pack_sequences: no sequences to collate")
    lengths = _lengths(seqs)
    longest = int(lengths.max())
    if longest > max_tokens:
        i = int(lengths.argmax())
        raise ValueError(
            f"pack_sequences: sequence {i} has {longest} tokens, more than max_tokens={max_tokens}; raise "
            "max_tokens to at least the tokenizer's max_length"
        )
    bins = _balanced_bins(lengths, max_tokens)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(seqs))
    stream_lengths = lengths[order]
    row_lengths = np.array([int(lengths[b].sum()) for b in bins], dtype=np.int64)
    n_rows, width = len(bins), int(row_lengths.max())

    within = _positions_within(stream_lengths)
    tokens = _concat([seqs[i] for i in order.tolist()])
    # Flat position in the [R, W] grid of every stream token: rows are filled left to right.
    row_starts = np.arange(n_rows, dtype=np.int64) * width
    token_index = np.repeat(row_starts, row_lengths) + _positions_within(row_lengths)

    input_ids = np.full(n_rows * width, pad_token_id, dtype=np.int64)
    input_ids[token_index] = tokens
    # Padding tails count 0, 1, ... so that a position-id reset separates them from the last text of the row.
    positions = np.tile(np.arange(width, dtype=np.int64), n_rows)
    positions -= np.repeat(row_lengths, width)
    positions[token_index] = within
    cu_seqlens = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(stream_lengths, out=cu_seqlens[1:])
    text_position = np.empty(len(seqs), dtype=np.int64)
    text_position[order] = np.arange(len(seqs))
    has_padding = int(row_lengths.sum()) < n_rows * width
    attn_cu, attn_max = _segments([np.append(lengths[b], width - row_lengths[r]) for r, b in enumerate(bins)])
    return EncoderBatch(
        input_ids=torch.from_numpy(input_ids.reshape(n_rows, width)),
        position_ids=torch.from_numpy(positions.reshape(n_rows, width)),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        token_index=torch.from_numpy(token_index) if has_padding else None,
        text_position=torch.from_numpy(text_position),
        max_seqlen=longest,
        num_tokens=int(lengths.sum()),
        attn_cu_seqlens=attn_cu,
        attn_max_seqlen=attn_max,
    )


@dataclass(frozen=True)
class Collator:
    """Collates token id sequences for the encoder: ``mode="packed"`` or ``"padded"``.

    Attributes:
        pad_token_id: id written at padded positions (see :attr:`f2llm.data.TextTokenizer.pad_token_id`).
        mode: ``"packed"`` (no padding FLOPs) or ``"padded"``.
        max_tokens: packed row capacity; must be >= the tokenizer's max_length.
        padding_side: padded layout only.
    """

    pad_token_id: int
    mode: CollateMode = "packed"
    max_tokens: int = 4096
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        if self.mode not in ("packed", "padded"):
            raise ValueError(f"Collator: mode must be 'packed' or 'padded', got {self.mode!r}")
        if self.max_tokens < 1:
            raise ValueError(f"Collator: max_tokens must be >= 1, got {self.max_tokens}")

    def __call__(self, seqs: Sequence[TokenIds]) -> EncoderBatch:
        if self.mode == "packed":
            return pack_sequences(seqs, self.max_tokens, self.pad_token_id)
        return pad_sequences(seqs, self.pad_token_id, self.padding_side)
