"""Distillation from a frozen teacher, as F2LLM v2 trains its small models.

v2 (its utils.py, ``accelerate_train``) runs the teacher on the same batch without grad and adds, per model output::

    kd = mse(q, tq[..., :d]) + mse(p, tp[..., :d]) + mse(n, tn[..., :d])      total = (in_batch + hard + w kd) / 1

on the raw pooled last-token states (no L2 normalization), ``mse`` being ``F.mse_loss`` with its mean reduction, so
each of the three terms is a mean over its own elements (``B*d``, ``B*d``, ``B*k*d``), and the teacher's
embeddings cut to the student's dimension ``d``. v2 divides the total by ``len(outputs)``, the number of outputs of
one model forward: 1 for F2LLM models, so f2llm adds ``weight * kd`` to the loss and divides by nothing. Where v2 and
f2llm differ:

* no hard negatives (k = 0): v2's model then returns ``None`` negatives and its ``F.mse_loss(None, ...)`` would fail
  (it never trains with k = 0: classification sources use 1); f2llm drops the negatives' term (the mean of an
  empty tensor is NaN);
* v2 feeds the teacher the student's token ids (both are Qwen3 models sharing the tokenizer and the max length);
  f2llm's teacher reads the student's max length (``model.max_length``; a teacher with fewer positions is refused
  before training) and the student's ids whenever the two tokenizers agree (vocabulary, rule); a teacher with
  another tokenizer tokenizes the same texts, cut at the same max length, and uses its own pooling;
* v2 runs the teacher on the whole batch at once; with the gradient cache f2llm runs it in the chunks of the
  student's first pass (same texts per chunk), without grad, and keeps its embeddings for the step.

Two teachers give the same targets: :class:`LiveTeacher` (an :class:`f2llm.encoder.Encoder` run in every step) and
:class:`PrecomputedTeacher` (a parquet written by ``f2llm encode --model TEACHER --config TRAIN.yaml --output
FILE.parquet``, see :func:`write_teacher_embeddings`: the texts training with that config reads, the teacher
reading them at the config's ``model.max_length``). The precomputed file maps each text, as the model reads it
(queries with their instruction), to its raw teacher embedding; the key is the first 16 bytes of the SHA-256 of
the text's UTF-8 bytes. Every text of every training source is looked up when training starts: a text the file
lacks is an error naming the file, the row and the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from f2llm.data.sampler import split_embeddings
from f2llm.data.sources import DataError

if TYPE_CHECKING:
    from f2llm.config import TrainConfig
    from f2llm.data import Collator, TextTokenizer, TokenizedSource, TrainingBatch
    from f2llm.encoder import Encoder

KEY_BYTES = 16
KEY_COLUMN, EMBEDDING_COLUMN = "key", "embedding"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, batch_size: int, num_negatives: int) -> torch.Tensor:
    """v2's kd term for a batch's raw embeddings, both laid out as the trainer orders texts (``B`` queries, ``B``
    positives, ``B*k`` negatives row-major): ``student`` [N, d], ``teacher`` [N, D_t] with ``D_t >= d`` (cut to d).

    With layer exits (``student`` [N, E, d], ``teacher`` [N, E, D_t], exit i against exit i) each mean also runs
    over the exits: ML-Embed's ``sum over exits of kd_i``, divided by E as its total is."""
    B, k = batch_size, num_negatives
    if student.dim() not in (2, 3) or student.shape[0] != B * (2 + k):
        raise ValueError(
            f"distill_loss: student must be [B*(2+k), d] (or [B*(2+k), E, d]) with B*(2+k) = {B * (2 + k)}, got "
            f"{tuple(student.shape)}"
        )
    if teacher.shape[:-1] != student.shape[:-1] or teacher.shape[-1] < student.shape[-1]:
        expected = [*student.shape[:-1], f">= {student.shape[-1]}"]
        raise ValueError(f"distill_loss: teacher must be {expected}, got {tuple(teacher.shape)}")
    target = teacher[..., : student.shape[-1]].to(student.dtype)
    (sq, sp, sn), (tq, tp, tn) = split_embeddings(student, B, k), split_embeddings(target, B, k)
    kd = F.mse_loss(sq, tq) + F.mse_loss(sp, tp)
    if k:
        kd = kd + F.mse_loss(sn, tn)
    return kd


class Teacher(Protocol):
    """Raw teacher embeddings of a training batch's texts, in the trainer's order, without autograd."""

    dim: int

    def embed(self, batch: TrainingBatch, group_sizes: Sequence[int]) -> torch.Tensor:
        """[B*(2+k), dim] float32 on the student's device; ``group_sizes``: texts per forward (the gradient cache's
        chunks; their sum is the batch's text count)."""
        ...


# ------------------------------------------------------------------------------------------------ live teacher
@dataclass
class LiveTeacher:
    """A frozen :class:`f2llm.encoder.Encoder` (eval mode, no grad, raw pooled output) run on every batch.

    ``sources``: the training sources tokenized with the teacher's tokenizer (by name), or None when the teacher
    reads the student's token ids (same tokenizer identity: vocabulary, rule, max length; the max length is the
    student's, :func:`load_teacher_encoder`).
    """

    encoder: Encoder
    collator: Collator
    sources: Mapping[str, TokenizedSource] | None = None

    @property
    def dim(self) -> int:
        return self.encoder.embedding_dim

    def sequences(self, batch: TrainingBatch) -> list[np.ndarray]:
        if self.sources is None:
            return batch.sequences()
        queries, passages, negatives = self.sources[batch.source].take(batch.rows, batch.negative_columns)
        return [*queries, *passages, *negatives]

    @torch.no_grad()
    def embed(self, batch: TrainingBatch, group_sizes: Sequence[int]) -> torch.Tensor:
        seqs = self.sequences(batch)
        if sum(group_sizes) != len(seqs):
            raise ValueError(f"LiveTeacher.embed: groups of {sum(group_sizes)} texts for a batch of {len(seqs)}")
        outs, start = [], 0
        for size in group_sizes:
            outs.append(self.encoder(self.collator(seqs[start : start + size]), normalize=False).float())
            start += size
        return torch.cat(outs)


def position_limit(encoder: Encoder) -> int | None:
    """The most tokens ``encoder`` can read (its ``max_position_embeddings`` less the position offset), or None."""
    limit = getattr(encoder.model.config, "max_position_embeddings", None)
    return limit - encoder.position_offset if limit is not None else None


def load_teacher_encoder(
    path: str, device: torch.device, dtype: torch.dtype, max_length: int, where: str | None = None
) -> Encoder:
    """The teacher, frozen and in eval mode, reading at most ``max_length`` tokens per text: the student's
    (``model.max_length``), as v2's teacher reads the student's ids. An f2llm folder keeps its saved pooling
    (Encoder.load), a Hugging Face model gets the Encoder's default.

    Raises:
        ConfigError: the teacher has fewer positions than ``max_length``. A warning would let kd pull the
            student's embedding of every longer text towards the teacher's embedding of a truncated one; the fix
            (a lower ``model.max_length`` or another teacher) is the user's call. ``where`` names the setting
            that gave ``path`` (default ``distill.teacher PATH``).
    """
    from f2llm.config import ConfigError
    from f2llm.data import TextTokenizer
    from f2llm.encoder import Encoder
    from f2llm.export import F2LLM_CONFIG

    options = dict(device=device, dtype=dtype, liger=False, recompute=False)
    if (Path(path) / F2LLM_CONFIG).is_file():
        teacher = Encoder.load(path, **options)
    else:
        teacher = Encoder.from_pretrained(path, **options)
    limit = position_limit(teacher)
    if limit is not None and limit < max_length:
        raise ConfigError(
            f"{where or f'distill.teacher {path}'}: the teacher reads at most {limit} tokens per text "
            f"(max_position_embeddings in its config.json) but the student reads model.max_length={max_length}; "
            f"kd would compare the student's embedding of each longer text with the teacher's of its first {limit} "
            f"tokens. Set model.max_length to at most {limit}, or use a teacher with {max_length} positions or more"
        )
    if teacher.max_length != max_length:  # the text tokenizer is all that max_length decides
        teacher.text_tokenizer = TextTokenizer(teacher.tokenizer, max_length, append_eos=teacher.is_decoder)
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_sources(
    sources: Sequence[TokenizedSource],
    tokenizer: TextTokenizer,
    student: TextTokenizer,
    cache_dir: str | Path,
    seed: int = 0,
    max_rows: int | None = None,
) -> dict[str, TokenizedSource] | None:
    """The student's sources tokenized with the teacher's ``tokenizer`` (cached like the student's), every query
    with exactly the student's instruction, the same rows sampled (``seed``, ``max_rows``: data.seed and
    data.max_rows_per_source, so that a batch's rows index both alike); None when the two tokenizers are the same
    (the student's ids serve: the teacher reads the student's max length, so they are whenever vocabulary and rule
    agree)."""
    from f2llm.data import SourceOverride, load_source

    if tokenizer.identity() == student.identity():
        return None
    out = {}
    for s in sources:
        # Pin what training decided for the student (kind, instruction, negatives): the same texts, whatever
        # the teacher's own rule (encoder / decoder) would pick.
        pinned = SourceOverride(
            kind=s.kind,
            instruction=s.instruction or "",
            add_instruction=s.instruction is not None,
            num_negatives=s.num_negatives,
        )
        out[s.name] = load_source(
            s.source, tokenizer, cache_dir, name=s.name, override=pinned, validation_fraction=0, seed=seed,
            max_rows=max_rows,
        )  # fmt: skip
        mine, theirs = out[s.name].file_rows, s.file_rows
        if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
            raise RuntimeError(f"teacher_sources: {s.source}: the teacher's row sample differs from the student's")
    return out


# ------------------------------------------------------------------------------------------------ precomputed
def text_key(text: str) -> bytes:
    """The key of a text in a teacher-embeddings file: the first 16 bytes of the SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:KEY_BYTES]


@dataclass
class PrecomputedTeacher:
    """Teacher embeddings read from a file: ``embeddings`` [M, D_t] and, per source, the embedding row of every
    (row, field) of the source (``index[name]``: [n_rows, 2 + K] int64, fields query, passage, negative_1..K)."""

    embeddings: np.ndarray
    index: Mapping[str, np.ndarray]
    device: torch.device

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def embed(self, batch: TrainingBatch, group_sizes: Sequence[int]) -> torch.Tensor:
        fields = self.index[batch.source][np.asarray(batch.rows, dtype=np.int64)]
        negatives = fields[:, [2 + j for j in batch.negative_columns]].reshape(-1)
        rows = np.concatenate([fields[:, 0], fields[:, 1], negatives])
        return torch.from_numpy(self.embeddings[rows]).to(self.device, torch.float32)


def read_teacher_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys [M] of KEY_BYTES bytes as a numpy ``S16`` array, embeddings [M, D] float32) of a teacher file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
            f"{path}: not a readable parquet file ({e}); write it with "
            "`f2llm encode --model TEACHER --config TRAIN.yaml --output FILE.parquet`"
        ) from None
    if table.column_names[:2] != [KEY_COLUMN, EMBEDDING_COLUMN]:
        raise DataError(
            f"{path}: columns {table.column_names}, expected [{KEY_COLUMN!r}, {EMBEDDING_COLUMN!r}] as written by "
            "`f2llm encode --model TEACHER --config TRAIN.yaml` (a plain `f2llm encode` file maps texts, not "
            "training texts' keys)"
        )
    keys = table.column(KEY_COLUMN).combine_chunks()
    emb = table.column(EMBEDDING_COLUMN).combine_chunks()
    if keys.type != pa.binary(KEY_BYTES) or not pa.types.is_fixed_size_list(emb.type):
        raise DataError(
            f"{path}: column types {keys.type} / {emb.type}, expected fixed_size_binary[{KEY_BYTES}] / "
            "fixed_size_list<float>; rewrite it with `f2llm encode --model TEACHER --config TRAIN.yaml`"
        )
    width = emb.type.list_size
    values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    key_array = np.frombuffer(keys.buffers()[1], dtype=f"S{KEY_BYTES}", count=len(keys), offset=keys.offset * KEY_BYTES)
    return key_array, values


def index_sources(
    sources: Sequence[TokenizedSource], keys: np.ndarray, where: str, cache_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
    """The embedding row of every text of every source (see :class:`PrecomputedTeacher`).

    Raises:
        DataError: a text has no embedding in the file (named: source file, row, field, and what to do).
    """
    from f2llm.data.readers import model_texts, read_raw

    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    index = {}
    for s in sources:
        raw = read_raw(s.source, cache_dir)
        k = s.available_negatives
        rows = np.empty((len(raw), 2 + k), dtype=np.int64)
        for column, start, texts in model_texts(raw, s.instruction):
            wanted = np.array([text_key(t) for t in texts], dtype=f"S{KEY_BYTES}")
            at = np.searchsorted(sorted_keys, wanted)
            at_clipped = np.minimum(at, len(sorted_keys) - 1)
            found = (at < len(sorted_keys)) & (sorted_keys[at_clipped] == wanted)
            if not found.all():
                miss = int(np.flatnonzero(~found)[0])
                raise DataError(
                    f"{where}: no teacher embedding for {s.source}: row {start + miss}, field {column!r} "
                    f"({int((~found).sum())} text(s) of this field in rows {start}..{start + len(texts) - 1} missing): "
                    f"{texts[miss][:80]!r}; the file must hold every text this config trains on (its data.paths, "
                    "data.sources settings and the student's instruction rule): write it with `f2llm encode "
                    "--model TEACHER --config TRAIN.yaml [key.path=value ...] --output FILE.parquet`, TRAIN.yaml "
                    "and overrides as for this run"
                )
            field = 0 if column == "query" else 1 if column == "passage" else 1 + int(column.split("_")[1])
            rows[start : start + len(texts), field] = order[at]
        # A source sampled by data.max_rows_per_source: batches index its sampled rows, not the file's.
        index[s.name] = rows if s.file_rows is None else rows[s.file_rows]
    return index


def student_is_decoder(name_or_path: str) -> bool:
    """Whether the student ``model.name_or_path`` follows the decoder rule (EOS appended; instructions on queries by
    default), read from its config alone: what :class:`f2llm.encoder.Encoder` decides when training loads it."""
    from transformers import AutoConfig

    from f2llm.data.tokenize import is_decoder_model_type

    return is_decoder_model_type(AutoConfig.from_pretrained(name_or_path).model_type)


def training_texts(config: TrainConfig) -> Iterator[str]:
    """Every text training with ``config`` reads, as the model reads it, over all rows of all sources (validation
    rows included; duplicates repeated): the sources of ``data.paths``, each with its ``data.sources`` settings and
    ``data.num_negatives``, queries instructed by the student's rule (:func:`student_is_decoder`), as
    :func:`f2llm.data.load_sources` decides them."""
    from f2llm.data.readers import find_source_files, model_texts, query_instruction, read_raw, source_name
    from f2llm.data.sources import resolve_source

    data = config.data
    files = find_source_files(data.paths)
    names = [source_name(p) for p in files]
    unused = sorted(set(data.sources) - set(names))
    if unused:
        raise DataError(f"data.sources: settings given for {unused}, which are not among the sources {names}")
    decoder = student_is_decoder(config.model.name_or_path)
    for path, name in zip(files, names, strict=True):
        spec = resolve_source(name, data.sources.get(name), str(path), data.num_negatives)
        raw = read_raw(path, data.cache_dir)
        for _, _, batch in model_texts(raw, query_instruction(spec, raw, decoder, str(path))):
            yield from batch


def write_teacher_embeddings(
    encoder: Encoder,
    config: TrainConfig,
    output: str | Path,
    *,
    batch_size: int = 32,
    show_progress: bool = True,
) -> tuple[Path, int]:
    """Raw embeddings by ``encoder`` (the teacher, loaded by :func:`load_teacher_encoder` with the config's
    ``model.max_length``) of every distinct text training with ``config`` reads (:func:`training_texts`), as
    :func:`read_teacher_embeddings` reads them. Returns (path, number of texts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if encoder.max_length != config.model.max_length:
        raise ValueError(
            f"write_teacher_embeddings: the teacher reads {encoder.max_length} tokens per text, training "
            f"model.max_length={config.model.max_length}; load it with load_teacher_encoder(..., max_length=...)"
        )
    texts: dict[bytes, str] = {}
    for text in training_texts(config):
        texts.setdefault(text_key(text), text)
    emb = encoder.encode(list(texts.values()), batch_size=batch_size, show_progress=show_progress, normalize=False)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    keys = pa.array(list(texts), type=pa.binary(KEY_BYTES))
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    pq.write_table(pa.table({KEY_COLUMN: keys, EMBEDDING_COLUMN: values}), output)
    return output, len(texts)


# ------------------------------------------------------------------------------------------------ from a config
def build_teacher(
    config: TrainConfig,
    sources: Sequence[TokenizedSource],
    student: Encoder,
    device: torch.device,
    dtype: torch.dtype,
    collator: Collator,
) -> Teacher:
    """The teacher ``config.distill`` asks for, checked against the student before any step: its dimension must be
    at least the student's (kd compares the teacher's first d coordinates), every text must have a target."""
    from f2llm.config import ConfigError

    distill = config.distill
    if distill.embeddings is not None:
        keys, embeddings = read_teacher_embeddings(distill.embeddings)
        teacher: Teacher = PrecomputedTeacher(
            embeddings,
            index_sources(sources, keys, f"distill.embeddings {distill.embeddings}", config.data.cache_dir),
            device,
        )
        what = f"distill.embeddings {distill.embeddings}"
    else:
        from f2llm.data import Collator

        encoder = load_teacher_encoder(distill.teacher, device, dtype, config.model.max_length)
        teacher_collator = Collator(
            pad_token_id=encoder.text_tokenizer.pad_token_id,
            mode=collator.mode,
            max_tokens=max(collator.max_tokens, encoder.max_length),
        )
        tokenized = teacher_sources(
            sources, encoder.text_tokenizer, student.text_tokenizer, config.data.cache_dir,
            seed=config.data.seed, max_rows=config.data.max_rows_per_source,
        )  # fmt: skip
        teacher = LiveTeacher(encoder, teacher_collator, tokenized)
        what = f"distill.teacher {distill.teacher}"
        if student.layer_exits is not None:
            # ML-Embed: the teacher's exits by the same rule on its own depth, exit i distilled into the student's
            # exit i (its teacher forward returns one output per exit, zipped with the student's).
            try:
                encoder.set_layer_exits(config.model.layer_exits)
            except ValueError as e:
                raise ConfigError(f"{what}: {e}") from None
            if len(encoder.layer_exits) != len(student.layer_exits):
                raise ConfigError(
                    f"{what}: model.layer_exits gives the teacher exits {list(encoder.layer_exits)} and the student "
                    f"{list(student.layer_exits)}; kd pairs exit i with exit i, so both need as many"
                )
    student_dim = student.embedding_dim
    if teacher.dim < student_dim:
        raise ConfigError(
            f"{what}: teacher embeddings have dimension {teacher.dim}, fewer than the student's {student_dim}; kd "
            "compares the student with the teacher's first d coordinates, so the teacher must be at least as wide"
        )
    return teacher
