"""sentence-transformers users get f2llm's engine in one import.

    from f2llm.integrations.sentence_transformers import (
        CachedGISTEmbedLoss,
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)   # sentence-transformers' arguments
    # or, no gradient cache (one forward with gradients over the batch): MultipleNegativesRankingLoss(model)
    # or, in-batch negatives selected by a guide model: CachedGISTEmbedLoss(model, guide, mini_batch_size=64)
    # every embedding prefix trained, in one fused pass: MatryoshkaLoss(model, loss, [384, 256, 128, 64])
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()

``MultipleNegativesRankingLoss`` is the drop-in for sentence-transformers' class of that name (it subclasses it; same
arguments, loss and gradients): no gradient cache, the texts of every column packed together into one forward with
gradients (as below), and the very loss computation of the cached class (``_FusedLossMixin``: the fused InfoNCE, the
masked directions and hardness on the whole batch at once). A forward replaced on the model's instance (as
``MatryoshkaLoss`` does) or an unpackable model is embedded with sentence-transformers' padded forward. Under
DistributedDataParallel the packed forward bypasses DDP's reducer: the gradients are all-reduced once the backward has
finished (not inside ``no_sync``). The rest of this docstring describes ``CachedMultipleNegativesRankingLoss``; all of
it but the gradient cache applies to both.

``MatryoshkaLoss`` is the drop-in for sentence-transformers' class of that name (it subclasses it; same arguments,
loss and gradients): around ``CachedMultipleNegativesRankingLoss`` or ``MultipleNegativesRankingLoss`` the model
embeds once and every dimension's loss comes out of one :func:`f2llm.kernels.infonce` call with
``matryoshka_dims`` (sentence-transformers' class calls the inner loss once per dimension; wrapped in it, f2llm's
losses still give its numbers, and say once that f2llm's class would fuse them). The options the fused op cannot
express are computed dimension by dimension inside f2llm's loss; any other inner loss is left to
sentence-transformers' loop.

``CachedGISTEmbedLoss`` is the drop-in for sentence-transformers' class of that name (it subclasses it; same
arguments, loss and gradients): the trained model runs the gradient cache and packing below; the guide model is
embedded without gradients, packed too where it can be (after re-tokenization when sentence-transformers' would
re-tokenize); the guide's per-row masks (``margin_strategy``, ``margin``, ``contrast_anchors``,
``contrast_positives``) are applied to cosine logits computed ``mini_batch_size`` rows at a time in PyTorch, as the
masked options below are (:func:`_blockwise_loss`), in float32.

Same name, constructor, inputs and loss as sentence-transformers 6.x's ``CachedMultipleNegativesRankingLoss`` (it
subclasses it): columns (anchor, positive, negative_1, ..., negative_n); each anchor is scored against the positives
and negatives of the whole batch (of every rank with ``gather_across_devices=True``), logits = similarity * scale.
What runs inside is f2llm's:

* the gradient cache (:mod:`f2llm.gradcache`), the very passes f2llm's trainer runs: pass 1
  (:func:`f2llm.gradcache.embed_chunks`) embeds every mini-batch without gradients, each one's RNG state captured;
  the loss and d(loss)/d(embeddings) come from :func:`f2llm.kernels.infonce` on all embeddings at once (no B x N score
  matrix); pass 2 (:func:`f2llm.gradcache.backward_chunks`) re-embeds each mini-batch with gradients, dropout
  replayed, and back-propagates ``embeddings . cached gradient``. As in sentence-transformers, pass 2 runs in the
  backward of the returned loss: ``loss.backward()`` (the trainer's) triggers it, and every mini-batch is scaled by
  the gradient that backward hands the loss (gradient accumulation's 1/k, fp16's loss scale). An autocast active in
  pass 1 (the trainer's mixed precision) is replayed in pass 2.
* sequence packing: each mini-batch's texts are unpadded and laid end to end in rows
  (:func:`f2llm.data.pack_sequences`), run through the model's Hugging Face transformer with a block-diagonal mask
  (encoders, as :class:`f2llm.encoder.Encoder` does) or position ids restarting at every text (decoders, which
  transformers turns into a block-diagonal causal mask), and pooled over each text by :func:`f2llm.kernels.pool`: the
  embeddings of sentence-transformers' padded forward, without computing its padding.
* under DistributedDataParallel, the gradients are averaged over the ranks once, after the last mini-batch (the
  packed forward calls the transformer directly, not through DDP's forward, so the reducer is bypassed and this
  module all-reduces them itself; inside the trainer's ``no_sync`` (gradient accumulation) it does not).
* under DeepSpeed ZeRO-1/2 (``SentenceTransformerTrainingArguments(deepspeed=...)``), whose hooks reduce each
  parameter's gradient once per ``engine.backward``, pass 2's mini-batches accumulate their gradients unreduced and
  every gradient is reduced once, after the last one (:func:`_zero_reduce_once`); the trainer's ZeRO-2 runs end at
  the weights of its DDP runs (tests/integrations/test_st_deepspeed.py).

Packing needs the module stack ``Transformer -> Pooling -> [Normalize]`` on text, pooling ``mean``, ``cls`` or
``lasttoken``, a BERT / RoBERTa encoder (sdpa or eager attention) or a Qwen2/Qwen3/Llama/Mistral decoder, and
right-padded inputs for encoders. Any other model is embedded with sentence-transformers' own padded forward
(a warning says why, once); the gradient cache and the loss stay f2llm's.

Every option of sentence-transformers' class is implemented, to its loss and gradients:

* ``directions`` (query_to_doc, query_to_query, doc_to_query, doc_to_doc) with ``partition_mode`` ``joint`` or
  ``per_direction``: query_to_doc and doc_to_query (no per-row logit) are :func:`f2llm.kernels.infonce` calls, the
  joint softmax as one call on rows [q_i, d_i] against candidates [d_j, 0] and [0, q_j]; query_to_query and
  doc_to_doc (a row's own query / documents masked out) are scored per ``mini_batch_size`` rows in PyTorch, as is
* ``hardness_mode`` with ``hardness_strength > 0`` (a detached penalty on some of each row's logits): the fused op
  shares its candidates across rows, so per-row masks and penalties cannot be expressed as extra score blocks
  (see ``_masked_loss``).
* ``similarity_fct``: any function that computes ``cos_sim`` or ``dot_score`` (those, a ``functools.partial`` of
  one, a wrapper: recognised by their values on probe tensors); any other raises a ValueError naming it.
* an overridden ``embed_minibatch`` (in a subclass, or assigned on the instance) embeds every mini-batch in both
  passes, called with sentence-transformers' keywords, instead of the packed forward.

Under autocast the loss is computed in float32 and returned in autocast's dtype, as sentence-transformers' is.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tqdm
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses.cached_gist_embed import (
    CachedGISTEmbedLoss as _STCachedGISTEmbedLoss,
)
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedLossMixin as _CachedLossMixin,
)
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss as _STCachedMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    _create_minibatch,
    _get_batch_size,
)
from sentence_transformers.sentence_transformer.losses.matryoshka import CachedLossDecorator, ForwardDecorator
from sentence_transformers.sentence_transformer.losses.matryoshka import MatryoshkaLoss as _STMatryoshkaLoss
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss,
)
from sentence_transformers.util import batch_to_device, cos_sim, dot_score
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from f2llm import distributed
from f2llm.attention import packed_encoder_mask
from f2llm.data import EncoderBatch, pack_sequences
from f2llm.encoder import pool_packed
from f2llm.gradcache import GradientCache, RngState, chunk_by_tokens
from f2llm.kernels import infonce
from f2llm.kernels.matryoshka import Levels

logger = logging.getLogger(__name__)

__all__ = [
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
]

# sentence-transformers' Pooling mode -> f2llm.kernels.pool's.
_POOLING_MODES = {"mean": "mean", "cls": "first", "lasttoken": "last"}
# Model types whose packed forward is verified to give the padded forward's embeddings
# (tests/integrations/test_st_integration.py).
# Encoders take a 4-D block-diagonal mask; decoders (RoPE) separate packed texts by their restarting position ids.
_PACKED_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta"})
_PACKED_DECODERS = frozenset({"qwen2", "qwen3", "llama", "mistral"})
_ENCODER_ATTENTION = ("sdpa", "eager")
# The tokenized text features packing understands; "prompt_length" is bookkeeping (only read by Pooling when it
# excludes the prompt, which then disables packing).
_TEXT_FEATURES = frozenset({"input_ids", "attention_mask", "token_type_ids", "modality", "prompt_length"})
_GRAD_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
_LOOPED_MATRYOSHKA = (
    "f2llm loss: wrapped in sentence-transformers' MatryoshkaLoss, it is computed once per dimension; "
    "f2llm.integrations.sentence_transformers.MatryoshkaLoss (same arguments) computes every dimension in one pass"
)


# ------------------------------------------------------------------------------------------------ the packed model
@dataclass(frozen=True)
class _PackedModel:
    """How to run one sentence-transformers model packed: its transformer, pooling and normalization."""

    transformer: torch.nn.Module  # the Hugging Face model inside the Transformer module
    decoder: bool
    attn_implementation: str
    position_offset: int  # RoBERTa numbers positions from padding_idx + 1
    pooling: str  # f2llm.kernels.pool's mode
    normalize: bool
    pad_token_id: int


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The SentenceTransformer inside a DDP or DeepSpeed and / or torch.compile wrapper."""
    if isinstance(model, DistributedDataParallel) or _is_deepspeed_engine(model):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (looked up, not imported: only a DeepSpeed run has one)."""
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    return engine is not None and isinstance(model, engine)


def _packed_model(st_model: torch.nn.Module) -> tuple[_PackedModel | None, str]:
    """(how to run ``st_model`` packed, "") or (None, why it cannot be)."""
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    modules = list(st_model.children())
    kinds = [type(m).__name__ for m in modules]
    stack_ok = (
        len(modules) in (2, 3)
        and type(modules[0]) is Transformer
        and type(modules[1]) is Pooling
        and (len(modules) == 2 or type(modules[2]) is Normalize)
    )
    if not stack_ok:
        return None, f"its modules are {kinds}, not Transformer -> Pooling [-> Normalize]"
    transformer, pooling = modules[0], modules[1]
    if len(modules) == 3 and not (
        modules[2].module_input_name == modules[2].module_output_name == "sentence_embedding"
    ):
        return None, "its Normalize module does not normalize the sentence embedding"
    if getattr(transformer, "backend", "torch") != "torch":
        return None, f"its Transformer runs on the {transformer.backend!r} backend"
    text = (transformer.modality_config or {}).get("text", {})
    output_name = text.get("method_output_name")
    if (
        text.get("method") != "forward"
        or output_name not in ("last_hidden_state", ("last_hidden_state",), ["last_hidden_state"])
        or transformer.module_output_name != "token_embeddings"
    ):
        return None, f"its Transformer's text output is {text!r} -> {transformer.module_output_name!r}"
    hf = transformer.model
    config = hf.config
    if getattr(config, "output_hidden_states", False):
        return None, "its transformer outputs every layer's hidden states"
    if not isinstance(pooling.pooling_mode, str) or pooling.pooling_mode not in _POOLING_MODES:
        return None, f"its pooling mode {pooling.pooling_mode!r} is not one of {sorted(_POOLING_MODES)}"
    if not pooling.include_prompt:
        return None, "its Pooling excludes the prompt (include_prompt=False)"
    model_type = getattr(config, "model_type", None)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    decoder = model_type in _PACKED_DECODERS
    if not decoder:
        if model_type not in _PACKED_ENCODERS:
            supported = sorted(_PACKED_ENCODERS | _PACKED_DECODERS)
            return None, f"model type {model_type!r} is not one packing supports ({supported})"
        if attn not in _ENCODER_ATTENTION:
            return None, f"packed encoders need attn_implementation sdpa or eager, not {attn!r}"
    # As f2llm.encoder.Encoder: RoBERTa-family embeddings number positions from padding_idx + 1, BERT from 0.
    padding_idx = getattr(getattr(hf, "embeddings", None), "padding_idx", None)
    position_offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
    tokenizer = getattr(transformer, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    plan = _PackedModel(
        transformer=hf,
        decoder=decoder,
        attn_implementation=attn,
        position_offset=position_offset,
        pooling=_POOLING_MODES[pooling.pooling_mode],
        normalize=len(modules) == 3,
        pad_token_id=int(pad) if pad is not None else 0,
    )
    return plan, ""


def _unpackable_features(features: dict[str, Any], plan: _PackedModel) -> str:
    """Why this column's features cannot be packed ("" when they can)."""
    extra = sorted(set(features) - _TEXT_FEATURES)
    if extra:
        return f"its inputs carry {extra} besides the tokenized text"
    if features.get("modality", "text") != "text":
        return f"its inputs are of modality {features['modality']!r}"
    ids, mask = features.get("input_ids"), features.get("attention_mask")
    if not (isinstance(ids, Tensor) and isinstance(mask, Tensor) and ids.dim() == 2 and ids.shape == mask.shape):
        return "its inputs lack a [batch, length] input_ids / attention_mask pair"
    if not plan.decoder and ids.shape[1] and not bool(mask[:, 0].all()):
        # BERT numbers positions from the first column, padding included: only right padding packs identically.
        return "its encoder inputs are left-padded"
    return ""


@dataclass
class _PackedChunk:
    """One mini-batch's texts packed into rows, on the model's device."""

    batch: EncoderBatch
    token_type_ids: Tensor | None  # [R, W]; None: all zero (the transformer's default)


def _column_texts(features: dict[str, Tensor]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """A column's texts, unpadded: token ids per text, and token type ids per text (None when all zero)."""
    mask = features["attention_mask"].bool().cpu()
    lengths = mask.sum(1).numpy()
    if lengths.size and lengths.min() == 0:
        raise ValueError(f"f2llm loss: text(s) {np.flatnonzero(lengths == 0)[:10]} of a column are empty")
    bounds = np.cumsum(lengths)[:-1]
    texts = np.split(features["input_ids"].cpu()[mask].numpy(), bounds)
    token_types = features.get("token_type_ids")
    types = None
    if isinstance(token_types, Tensor) and bool(token_types.any()):
        types = np.split(token_types.cpu()[mask].numpy(), bounds)
    return texts, types


def _pack_texts(
    texts: Sequence[np.ndarray], types: Sequence[np.ndarray] | None, plan: _PackedModel, row_tokens: int
) -> _PackedChunk:
    """Texts (and their token type ids) packed into rows of at least ``row_tokens`` tokens, on the model's device."""
    device = _plan_device(plan)
    batch = pack_sequences(list(texts), max(row_tokens, max(len(t) for t in texts)), plan.pad_token_id)
    grid_types = None
    if types is not None:
        order = np.argsort(batch.text_position.numpy())  # stream slot -> text
        stream = np.concatenate([types[i] for i in order.tolist()])
        flat = np.zeros(batch.input_ids.numel(), dtype=np.int64)
        flat[batch.token_index.numpy() if batch.token_index is not None else slice(None)] = stream
        grid_types = torch.from_numpy(flat.reshape(batch.input_ids.shape)).to(device)
    return _PackedChunk(batch.to(device), grid_types)


def _pack_column(
    features: dict[str, Tensor], ranges: Sequence[tuple[int, int]], plan: _PackedModel, row_tokens: int
) -> list[_PackedChunk]:
    """Every mini-batch of a column of tokenized texts as packed rows of at least ``row_tokens`` tokens."""
    texts, types = _column_texts(features)
    return [
        _pack_texts(texts[begin:end], None if types is None else types[begin:end], plan, row_tokens)
        for begin, end in ranges
    ]


def _pack_columns(features_list: Sequence[dict[str, Tensor]], plan: _PackedModel, row_tokens: int) -> _PackedChunk:
    """The texts of every column, column after column, packed together (one forward for the whole batch)."""
    texts: list[np.ndarray] = []
    types: list[np.ndarray] = []
    any_types = False
    for features in features_list:
        column_texts, column_types = _column_texts(features)
        texts += column_texts
        any_types |= column_types is not None
        types += column_types if column_types is not None else [np.zeros_like(t) for t in column_texts]
    return _pack_texts(texts, types if any_types else None, plan, row_tokens)


def _packing_plan(
    st_model: torch.nn.Module, sentence_features: Sequence[dict[str, Any]]
) -> tuple[_PackedModel | None, str]:
    """(how to run ``st_model`` packed on these columns, "") or (None, why they cannot be)."""
    plan, reason = _packed_model(st_model)
    for features in sentence_features if plan is not None else ():
        reason = _unpackable_features(features, plan)
        if reason:
            return None, reason
    return plan, reason


def _plan_device(plan: _PackedModel) -> torch.device:
    return next(plan.transformer.parameters()).device


def _embed_packed(plan: _PackedModel, chunk: _PackedChunk) -> Tensor:
    """Float32 sentence embeddings [n_texts, D] of a packed mini-batch, in its texts' order."""
    batch = chunk.batch
    positions = batch.position_ids + plan.position_offset if plan.position_offset else batch.position_ids
    hf = plan.transformer
    if plan.decoder:
        ids = batch.input_ids
        if plan.attn_implementation != "sdpa" and plan.attn_implementation != "eager":
            # varlen kernels (flash-attention, f2llm_varlen) and flex find the texts in one flattened row
            ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
        hidden = hf(input_ids=ids, position_ids=positions, use_cache=False, return_dict=True).last_hidden_state
    else:
        kwargs: dict[str, Tensor] = {}
        if chunk.token_type_ids is not None:
            kwargs["token_type_ids"] = chunk.token_type_ids
        mask = packed_encoder_mask(batch.position_ids, plan.attn_implementation, next(hf.parameters()).dtype)
        hidden = hf(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, return_dict=True, **kwargs
        ).last_hidden_state
    return pool_packed(hidden, batch, plan.pooling, plan.normalize)


def _embed_chunk(model: torch.nn.Module, plan: _PackedModel | None, chunk: Any) -> Tensor:
    """A mini-batch's sentence embeddings: packed (``plan``), else the model's padded forward on its features."""
    if plan is not None:
        return _embed_packed(plan, chunk)
    # A copy: the model's modules write their outputs into the dict they get, and pass 2 reuses the chunk.
    return model(dict(chunk))["sentence_embedding"]


# ------------------------------------------------------------------------------------------------ the loss's inputs
def _similarity_kind(fct: Callable[[Tensor, Tensor], Tensor]) -> bool | None:
    """True when ``fct`` is cos_sim, False when dot_score, None otherwise: by identity, through functools.partial
    without bound arguments, else by its values on probe tensors (a wrapper or a re-implementation is accepted when
    it computes what one of them does, the only thing the loss depends on)."""
    while isinstance(fct, functools.partial) and not fct.args and not fct.keywords:
        fct = fct.func
    if fct is cos_sim:
        return True
    if fct is dot_score:
        return False
    # Rows of different norms (so cosine and dot product differ), of both signs.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, generator=generator) * torch.tensor([[0.5], [1.0], [3.0]])
    b = torch.randn(4, 8, generator=generator) * torch.tensor([[2.0], [0.3], [1.0], [5.0]])
    try:
        with torch.no_grad():
            got = fct(a, b)
    except Exception:  # any failure on a plain [n, D] x [m, D] call: not a similarity matrix function
        return None
    if not isinstance(got, Tensor) or got.shape != (3, 4):
        return None
    got = got.detach().to("cpu", torch.float32)
    for kind, reference in ((True, cos_sim), (False, dot_score)):
        if torch.allclose(got, reference(a, b), rtol=1e-5, atol=1e-6):
            return kind
    return None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device`` now (None when it is off): what
    sentence-transformers' loss, built on them, comes out in."""
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


@dataclass
class _Batch:
    """The loss's embeddings (float32, normalized for cosine): this rank's rows and the gathered candidates."""

    queries: Tensor  # [B, D] this rank's anchors
    positives: Tensor  # [B, D] this rank's positives
    all_queries: Tensor  # [W, D] every rank's anchors (W = B without gathering)
    all_columns: list[Tensor]  # per column (positives, then each negative column): [W, D], every rank's
    targets: Tensor  # [B] each anchor's positive, in all_queries / docs numbering
    offset: int  # this rank's first row in the gathered batch

    @property
    def docs(self) -> Tensor:
        """[K * W, D]: the positives of every rank, then each negative column's, as sentence-transformers orders
        them."""
        return torch.cat(self.all_columns) if len(self.all_columns) > 1 else self.all_columns[0]

    @classmethod
    def gather(cls, queries: Tensor, columns: list[Tensor], gather: bool) -> _Batch:
        n = queries.shape[0]
        all_queries, all_columns, offset = queries, columns, 0
        if gather and distributed.world_size() > 1:
            sizes = distributed.all_gather_sizes(n, queries.device)
            all_queries = distributed.all_gather_with_grad(queries, sizes=sizes)
            all_columns = [distributed.all_gather_with_grad(c, sizes=sizes) for c in columns]
            offset = sum(sizes[: distributed.rank()])
        targets = torch.arange(offset, offset + n, device=queries.device)
        return cls(queries, columns[0], all_queries, all_columns, targets, offset)

    def detached(self) -> tuple[_Batch, list[tuple[Tensor, Tensor]]]:
        """The batch on detached copies of its tensors (leaves requiring grad where the originals do; a tensor in
        two fields stays one), and the (original, copy) pairs to back-propagate the copies' gradients through."""
        copies: dict[int, tuple[Tensor, Tensor]] = {}

        def leaf(x: Tensor) -> Tensor:
            if id(x) not in copies:
                copies[id(x)] = (x, x.detach().requires_grad_(x.requires_grad))
            return copies[id(x)][1]

        batch = _Batch(
            leaf(self.queries),
            leaf(self.positives),
            leaf(self.all_queries),
            [leaf(c) for c in self.all_columns],
            self.targets,
            self.offset,
        )
        return batch, list(copies.values())

    def prefix(self, dim: int) -> _Batch:
        """The batch at one Matryoshka level: every embedding cut to its first ``dim`` coordinates and normalized
        again (sentence-transformers' ``shrink``)."""

        def cut(x: Tensor) -> Tensor:
            return F.normalize(x[:, :dim], dim=-1)

        columns = [cut(c) for c in self.all_columns]
        positives = columns[0] if self.positives is self.all_columns[0] else cut(self.positives)
        queries = cut(self.queries)
        all_queries = queries if self.all_queries is self.queries else cut(self.all_queries)
        return _Batch(queries, positives, all_queries, columns, self.targets, self.offset)


# ------------------------------------------------------------------------------------------------ the training step
def _autocast_of(st_model: torch.nn.Module, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast the model's forward runs under now, as a factory to enter it again in pass 2.

    An autocast already active (a user's, or a trainer's around the loss), else accelerate's mixed precision: the
    trainer (accelerate) wraps the SentenceTransformer's forward in an autocast, which the packed forward, calling
    the transformer directly, would otherwise miss.
    """
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return functools.partial(torch.autocast, kind, dtype=dtype)
    if "_original_forward" in vars(st_model):  # accelerate's prepare_model wrapped the forward in autocast
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(AcceleratorState().mixed_precision)
            if dtype is not None:
                return functools.partial(torch.autocast, kind, dtype=dtype)
    return contextlib.nullcontext


def _all_reduce_gradients(ddp: DistributedDataParallel) -> None:
    """Average every gradient over the ranks, as DDP's reducer does at the end of a synchronized backward."""
    group = ddp.process_group
    world = dist.get_world_size(group)
    grads = [p.grad for p in ddp.module.parameters() if p.requires_grad and p.grad is not None]
    buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    for g in grads:
        lists = buckets.setdefault((g.dtype, g.device), [[]])
        if lists[-1] and sum(t.numel() for t in lists[-1]) * g.element_size() >= _GRAD_BUCKET_BYTES:
            lists.append([])
        lists[-1].append(g)
    for lists in buckets.values():
        for bucket in lists:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


@contextlib.contextmanager
def _zero_reduce_once(model: torch.nn.Module) -> Iterator[None]:
    """Pass 2 under DeepSpeed ZeRO-1/2: every parameter's gradient reduced once, after the last mini-batch.

    ZeRO-1/2 reduce a parameter's gradient in its post-accumulate hook, at most once per ``engine.backward`` (a second
    reduction asserts "Gradient computed twice for this partition"), and pass 2 runs a backward per mini-batch inside
    that one. Within the context the gradients accumulate in place, unreduced (``ds_grad_is_ready = False``,
    DeepSpeed's protocol for a computation split into a loop of backwards); on leaving, one more backward adds zero to
    every trainable parameter, so that the hooks reduce each accumulated gradient once, whichever mini-batches it came
    from (ZeRO fills a missing gradient with zeros in any case). The engine's own backward finishes the reduction
    afterwards, as after any backward.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.ds_grad_is_ready = False
    try:
        yield
    finally:
        for p in params:
            p.ds_grad_is_ready = True
    if params:
        zero = torch.zeros(())
        torch.autograd.backward(params, [zero.to(p.device, p.dtype).expand_as(p) for p in params])


def _backward_if_trainable(surrogate: Tensor) -> None:
    """Pass 2's backward: a frozen model gives embeddings, hence a surrogate, without grad: nothing to back-propagate
    (``surrogate.backward()`` would raise)."""
    if surrogate.requires_grad:
        surrogate.backward()


@dataclass(frozen=True)
class _Range:
    """A mini-batch for an overridden ``embed_minibatch``: the column's features and the texts' range."""

    features: dict[str, Tensor]
    begin: int
    end: int


@dataclass
class _Step:
    """What pass 2 needs of one forward: the gradient cache, every column's mini-batches, RNG states and cached
    gradients."""

    cache: GradientCache  # encode (under pass 1's autocast), no-sync and backward of pass 2
    chunks: list[list[Any]]  # per column: _PackedChunk (packed) or sentence-transformers feature dicts (padded)
    states: list[list[RngState]]
    grads: list[Tensor]  # per column: d(loss)/d(embeddings) [n_texts, D]
    packed: bool  # False: sentence-transformers' padded forward


def _blockwise_loss(
    roots: list[Tensor],
    n_rows: int,
    block_rows: int,
    block_losses: Callable[[list[Tensor], int, int], Tensor],
    with_backward: bool,
    weight: float = 1.0,
) -> Tensor:
    """``weight`` times the mean over ``n_rows`` rows of per-row losses computed ``block_rows`` rows at a time:
    ``block_losses(leaves, begin, end)`` gives rows [begin, end)'s from ``leaves``, the tensors ``roots`` (detached
    copies of them with ``with_backward``). With ``with_backward`` each block is back-propagated to those detached
    copies (memory of one block, never all rows' logits), then their gradients once through whatever computed the
    roots (gather, normalization); the loss is returned detached."""
    leaves = [r.detach().requires_grad_(r.requires_grad) for r in roots] if with_backward else roots
    total = torch.zeros((), device=roots[0].device)
    for begin in range(0, n_rows, block_rows):
        part = block_losses(leaves, begin, min(begin + block_rows, n_rows)).sum() / n_rows
        if weight != 1.0:
            part = part * weight
        if with_backward and part.requires_grad:
            part.backward()
            part = part.detach()
        total = total + part
    if with_backward:
        pairs = [(r, leaf.grad) for r, leaf in zip(roots, leaves, strict=True) if leaf.grad is not None]
        pairs = [(r, g) for r, g in pairs if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
    return total


class _Warnings:
    _warned: set[str]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)


class _FusedLossMixin(_Warnings):
    """The loss of both drop-ins, from the embeddings: sentence-transformers' MultipleNegativesRankingLoss options
    (read from ``scale``, ``similarity_fct``, ``directions``, ``partition_mode``, ``hardness_mode``,
    ``hardness_strength``, ``gather_across_devices``) on :func:`f2llm.kernels.infonce` where it can express them."""

    scale: float
    similarity_fct: Callable[[Tensor, Tensor], Tensor]
    gather_across_devices: bool
    directions: tuple[str, ...]
    partition_mode: str
    hardness_mode: str | None
    hardness_strength: float
    # Matryoshka levels (dims descending, weights) of the current forward, set by f2llm's MatryoshkaLoss; None: one
    # level at the full size.
    _matryoshka: Levels | None = None

    # ------------------------------------------------------------------------------------------------ options
    def _check_supported(self) -> None:
        """Refuse a similarity this loss cannot compute (checked again at every forward: the sentence-transformers
        class lets it be reassigned). Every direction, partition mode and hardness mode is implemented."""
        if self._normalizes() is None:
            fct = getattr(self.similarity_fct, "__name__", repr(self.similarity_fct))
            raise ValueError(
                f"f2llm {type(self).__name__}: similarity_fct={fct} is not supported: only a function equal to "
                "sentence_transformers.util.cos_sim or dot_score (or a functools.partial / wrapper of one) is; pass "
                "one of them, or use sentence-transformers' own loss for this one"
            )

    def _normalizes(self) -> bool | None:
        """True for a cos_sim, False for a dot_score, None for any other similarity (see :func:`_similarity_kind`)."""
        fct = self.similarity_fct
        key = id(fct)
        cached = self.__dict__.get("_similarity_cache")
        if cached is None or cached[0] != key or cached[1] is not fct:
            cached = (key, fct, _similarity_kind(fct))
            self.__dict__["_similarity_cache"] = cached
        return cached[2]

    # ------------------------------------------------------------------------------------------------ loss
    def _embeddings_loss(
        self, queries: Tensor, columns: list[Tensor], *, with_backward: bool = False, block_rows: int | None = None
    ) -> Tensor:
        """sentence-transformers' loss of the anchors ``queries`` [B, D] against every candidate column ``columns``
        (positives, then each negative column; [B, D] each), the one computation of both drop-ins; with
        ``with_backward``, back-propagated to the embeddings and returned detached.

        Candidates are the positives then each negative column, of every rank with ``gather_across_devices``
        (gathered with gradient); anchor i's target is its own positive. Computed in float32 whatever autocast is
        on; the returned loss has the dtype sentence-transformers' would (autocast's). The directions and hardness
        options the fused op cannot express are scored ``block_rows`` rows at a time (all at once: None).
        """
        out_dtype = _autocast_dtype(queries.device) or torch.float32
        levels = self._matryoshka
        with torch.autocast(queries.device.type, enabled=False):  # the loss in float32, whatever autocast is on
            queries, columns = queries.float(), [c.float() for c in columns]
            if levels is not None:
                # Each level normalizes its own prefix (sentence-transformers' shrink), whatever the similarity;
                # the widest level is the fused op's full size.
                width = levels[0][0]
                queries, columns = queries[:, :width], [c[:, :width] for c in columns]
            elif self._normalizes():
                queries, columns = F.normalize(queries, dim=-1), [F.normalize(c, dim=-1) for c in columns]
            batch = _Batch.gather(queries, columns, gather=self.gather_across_devices)
            block_rows = block_rows or max(1, batch.targets.shape[0])
            if levels is None:
                loss = self._level_loss(batch, with_backward, block_rows)
            elif self._fusable(levels):
                loss = self._fused_loss(batch, levels)  # every level in one pass of the fused op
                if with_backward:
                    loss.backward()
                    loss = loss.detach()
            else:  # options the fused op cannot express: level by level, as sentence-transformers' MatryoshkaLoss
                # Each level back-propagates into detached copies of the gathered embeddings, and those gradients
                # go once through the gather (a collective) and the cut.
                leaves, pairs = batch.detached() if with_backward else (batch, [])
                loss = torch.zeros((), device=queries.device)
                for dim, weight in zip(*levels, strict=True):
                    loss = loss + self._level_loss(leaves.prefix(dim), with_backward, block_rows, weight)
                grads = [(root, leaf.grad) for root, leaf in pairs if leaf.grad is not None and root.requires_grad]
                if grads:
                    torch.autograd.backward([r for r, _ in grads], [g for _, g in grads])
        return loss.to(out_dtype) if out_dtype != torch.float32 else loss

    def _fusable(self, levels: Levels | None = None) -> bool:
        """Whether the options leave every row's logits a plain q . c over shared candidates (the fused op), and
        the fused op can take these Matryoshka ``levels`` (positive weights; not the joint doc_to_query softmax,
        whose concatenated rows' prefixes are not the embeddings' prefixes)."""
        plain = not (
            {"query_to_query", "doc_to_doc"} & set(self.directions)
            or (self.hardness_mode is not None and self.hardness_strength > 0.0)
        )
        if levels is None or not plain:
            return plain
        joint = "doc_to_query" in self.directions and self.partition_mode == "joint"
        return not joint and min(levels[1]) > 0.0

    def _level_loss(self, batch: _Batch, with_backward: bool, block_rows: int, weight: float = 1.0) -> Tensor:
        """``weight`` times the loss of ``batch`` (one similarity, no Matryoshka levels): the fused op where the
        options allow, else blocks of ``block_rows`` rows; with ``with_backward``, back-propagated and detached."""
        if not self._fusable():
            return self._masked_loss(batch, with_backward, block_rows, weight)
        loss = self._fused_loss(batch)
        if weight != 1.0:
            loss = loss * weight
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _fused_loss(self, batch: _Batch, levels: Levels | None = None) -> Tensor:
        """query_to_doc, and doc_to_query, with no row-specific logit: :func:`f2llm.kernels.infonce`, no score
        matrix.

        ``per_direction`` averages the two directions' losses (the same positive score, q_i . d_i, in both);
        ``joint`` is one softmax over both: row i is [q_i, d_i] and the candidates are [d_j, 0] and [0, q_j], so
        one fused InfoNCE on the concatenated 2D-dim vectors scores q_i . d_j and d_i . q_j in one denominator.
        With Matryoshka ``levels`` (dims, weights) the fused op computes every level in one pass (each level's
        prefixes normalized inside it); ``joint`` with doc_to_query cannot take them (a prefix of [q_i, d_i] is
        not the two prefixes) and is computed level by level by the caller.
        """
        temperature = 1.0 / self.scale
        kwargs: dict[str, Any] = {"temperature": temperature, "validate": False}
        if levels is not None:
            kwargs.update(matryoshka_dims=levels[0], matryoshka_weights=levels[1])
        partial_infonce = functools.partial(infonce, **kwargs)
        if "doc_to_query" not in self.directions:
            return partial_infonce(batch.queries, batch.docs, batch.targets)
        if self.partition_mode == "per_direction":
            return 0.5 * (
                partial_infonce(batch.queries, batch.docs, batch.targets)
                + partial_infonce(batch.positives, batch.all_queries, batch.targets)
            )
        if levels is not None:
            raise ValueError("the joint doc_to_query loss takes no Matryoshka levels (computed level by level)")
        rows = torch.cat([batch.queries, batch.positives], dim=1)
        zeros_d = batch.docs.new_zeros(batch.docs.shape)
        zeros_q = batch.all_queries.new_zeros(batch.all_queries.shape)
        candidates = torch.cat(
            [torch.cat([batch.docs, zeros_d], dim=1), torch.cat([zeros_q, batch.all_queries], dim=1)]
        )
        return partial_infonce(rows, candidates, batch.targets)

    def _masked_loss(self, batch: _Batch, with_backward: bool, block_rows: int, weight: float = 1.0) -> Tensor:
        """query_to_query, doc_to_doc or hardness weighting: logits that differ per row (a row's own query or
        documents masked out, its own documents' hardness penalty), computed on [block_rows, N] blocks.

        Why not the fused op: its candidates are shared by every row, so what it can score is a low-rank
        q_i . c_j; masking or re-weighting the pairs (i, own(i)) is an identity-shaped (full-rank) change that no
        extra score block expresses, and subtracting them from a fused log-sum-exp cancels catastrophically (the
        masked self-similarity is a row's largest score). So these options score each block of rows in PyTorch:
        memory [block_rows, N], as sentence-transformers', never [B, N]. With ``with_backward`` each block is
        back-propagated to detached copies of the (gathered, normalized) embeddings, and those gradients once
        through the gather and normalization.
        """
        n_world, offset, n_columns = batch.all_queries.shape[0], batch.offset, len(batch.all_columns)

        def block(leaves: list[Tensor], begin: int, end: int) -> Tensor:
            all_queries, all_columns = leaves[0], leaves[1:]
            rows = torch.arange(offset + begin, offset + end, device=all_queries.device)
            return self._block_losses(all_queries, all_columns[0], torch.cat(all_columns), rows, n_world, n_columns)

        roots = [batch.all_queries, *batch.all_columns]
        return _blockwise_loss(roots, batch.targets.shape[0], block_rows, block, with_backward, weight)

    def _block_losses(
        self, all_queries: Tensor, positives: Tensor, docs: Tensor, rows: Tensor, n_world: int, n_columns: int
    ) -> Tensor:
        """Per-row losses of the rows ``rows`` (indices into the gathered batch): sentence-transformers' logits,
        similarity * scale, hardness penalty (not scaled, detached) on query_to_doc, own pairs masked."""
        q, d = all_queries[rows], positives[rows]
        local = torch.arange(rows.shape[0], device=docs.device)
        own = torch.zeros(rows.shape[0], n_world, dtype=torch.bool, device=docs.device)
        own[local, rows] = True
        own_docs = own.repeat(1, n_columns)  # row i's positive and its own hard negatives
        sim = q @ docs.T
        blocks = {"query_to_doc": sim * self.scale}
        if self.hardness_mode is not None and self.hardness_strength > 0.0:
            if self.hardness_mode == "hard_negatives":
                penalized = own_docs.clone()
                penalized[:, :n_world] = False
            elif self.hardness_mode == "in_batch_negatives":
                penalized = ~own_docs
            else:  # all_negatives: every logit but the positive
                penalized = ~own_docs
                penalized[:, n_world:] = True
            penalty = torch.where(penalized, self.hardness_strength * sim.detach(), 0.0)
            blocks["query_to_doc"] = blocks["query_to_doc"] + penalty
        if "query_to_query" in self.directions:
            blocks["query_to_query"] = (q @ all_queries.T * self.scale).masked_fill(own, -torch.inf)
        if "doc_to_query" in self.directions:
            blocks["doc_to_query"] = d @ all_queries.T * self.scale
        if "doc_to_doc" in self.directions:
            blocks["doc_to_doc"] = (d @ docs.T * self.scale).masked_fill(own_docs, -torch.inf)
        positive = blocks["query_to_doc"][local, rows]
        if self.partition_mode == "joint":
            log_z = torch.logsumexp(torch.cat(list(blocks.values()), dim=1), dim=1)
        else:
            log_z = torch.stack([torch.logsumexp(b, dim=1) for b in blocks.values()]).mean(0)
        return log_z - positive


class _GradientCacheMixin(_Warnings):
    """The gradient-cached forward of the cached drop-ins: mini-batches (packed, padded, or an overridden
    ``embed_minibatch``'s ranges), pass 1 and pass 2 on :class:`f2llm.gradcache.GradientCache`. Reads ``model``,
    ``mini_batch_size``, ``mini_batch_num_tokens``, ``show_progress_bar``."""

    pack_row_tokens: int = 64
    _st_embed_minibatch: Callable[..., Any]  # the sentence-transformers class's own embed_minibatch
    model: Any
    mini_batch_size: int
    mini_batch_num_tokens: int | None
    show_progress_bar: bool
    embed_minibatch: Callable[..., Any]

    # ------------------------------------------------------------------------------------------------ options
    def _custom_embed(self) -> bool:
        """Whether ``embed_minibatch`` is overridden (by a subclass, or assigned on the instance): then it embeds
        every mini-batch, in both passes, instead of the packed forward."""
        # Read through the class: through the instance, the stored function would come back as a bound method.
        return "embed_minibatch" in vars(self) or type(self).embed_minibatch is not type(self)._st_embed_minibatch

    # ------------------------------------------------------------------------------------------------ forward
    def _cached_forward(
        self, sentence_features: list[dict[str, Tensor]], loss_of: Callable[[list[list[Tensor]], bool], Tensor]
    ) -> Tensor:
        """The gradient-cached training step of ``loss_of(reps, with_backward)``, the loss of every column's
        embeddings (``reps[c][0]``: column c's, [n_texts, D]; with ``with_backward``, back-propagated to them):
        pass 1 embeds every mini-batch without gradients, the loss caches d(loss)/d(embeddings), pass 2 runs in the
        backward of the returned loss."""
        st_model = _unwrap(self.model)
        if _is_deepspeed_engine(self.model) and self.model.zero_optimization_stage() > 2:
            # Pass 2's backwards inside one engine backward are made to reduce once for ZeRO-1/2 (_zero_reduce_once);
            # ZeRO-3's partitioned parameters and its own reduction are not covered.
            raise ValueError(
                f"f2llm {type(self).__name__}: DeepSpeed ZeRO stage {self.model.zero_optimization_stage()} is not "
                "supported by the gradient-cached losses; use ZeRO stage 1 or 2 (zero_optimization.stage)"
            )
        # An overridden embed_minibatch is the user's forward: it embeds every mini-batch (no packing).
        custom = self._custom_embed()
        plan, reason = (None, "") if custom else _packing_plan(st_model, sentence_features)
        if plan is None and not custom:
            self._warn_once(
                f"f2llm {type(self).__name__}: cannot pack this model ({reason}); embedding with "
                "sentence-transformers' padded forward instead"
            )
        device = _plan_device(plan) if plan is not None else st_model.device
        chunks = [self._mini_batches(features, plan, custom) for features in sentence_features]
        # The padded forward goes through DDP: its gradients sync in the last mini-batch's backward only, the others
        # run under no_sync. The packed forward bypasses DDP's reducer: _replay all-reduces after the last one.
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        cache = GradientCache(
            functools.partial(self._embed, plan=plan, autocast=_autocast_of(st_model, device)),
            no_sync=ddp.no_sync if ddp is not None and plan is None else None,
            backward=_backward_if_trainable,
            device=device,
        )

        # Pass 1: every mini-batch without gradients, RNG states captured.
        reps, states = [], []
        for column in chunks:
            emb, column_states = cache.embed_without_grad(self._progress(column, "Embed mini-batches"))
            reps.append([emb.detach().requires_grad_()])
            states.append(column_states)
        if not torch.is_grad_enabled():
            return loss_of(reps, False)

        # The loss and its gradient w.r.t. every embedding: the cache.
        loss = loss_of(reps, True).detach().requires_grad_()
        grads = [column[0].grad for column in reps]
        unused = [str(i) for i, g in enumerate(grads) if g is None]
        if unused:
            raise ValueError(f"The loss did not use input column(s) {', '.join(unused)}: remove them from the dataset")
        # Pass 2 runs in the backward of the returned loss (sentence-transformers' contract).
        step = _Step(cache=cache, chunks=chunks, states=states, grads=grads, packed=plan is not None)
        loss.register_hook(functools.partial(self._replay, step=step))
        return loss

    def _mini_batches(self, features: dict[str, Tensor], plan: _PackedModel | None, custom: bool = False) -> list[Any]:
        """A column's mini-batches: ``mini_batch_size`` texts, or greedily up to ``mini_batch_num_tokens`` real
        tokens (a longer text alone), as sentence-transformers splits them; packed, sliced feature dicts, or (for an
        overridden ``embed_minibatch``) the ranges it is called with."""
        n = _get_batch_size(features)
        if self.mini_batch_num_tokens is None:
            ranges = [(b, min(b + self.mini_batch_size, n)) for b in range(0, n, self.mini_batch_size)]
        else:
            if "cu_seq_lens_q" in features:
                lengths = features["cu_seq_lens_q"].diff().tolist()
            elif "attention_mask" in features:
                lengths = features["attention_mask"].sum(1).tolist()
            else:
                raise ValueError("mini_batch_num_tokens needs an attention_mask (or cu_seq_lens_q) in the inputs")
            groups = chunk_by_tokens([range(int(length)) for length in lengths], self.mini_batch_num_tokens)
            bounds = np.cumsum([0] + [len(g) for g in groups]).tolist()
            ranges = list(itertools.pairwise(bounds))
        if custom:
            return [_Range(features, begin, end) for begin, end in ranges]
        if plan is not None:
            return _pack_column(features, ranges, plan, self.pack_row_tokens)
        return [_create_minibatch(features, begin, end) for begin, end in ranges]

    def _embed(
        self, chunk: Any, plan: _PackedModel | None, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> Tensor:
        """A mini-batch's embeddings, under the autocast of the forward (the same in both passes)."""
        with autocast():
            if isinstance(chunk, _Range):
                # The user's embed_minibatch, with sentence-transformers' keywords. Its own RNG replay is off: the
                # gradient cache replays every mini-batch's RNG state around this call in pass 2.
                reps = self.embed_minibatch(
                    sentence_feature=chunk.features,
                    begin=chunk.begin,
                    end=chunk.end,
                    with_grad=torch.is_grad_enabled(),
                    copy_random_state=False,
                    random_state=None,
                )[0]  # the model's embeddings (sentence-transformers' returns them first)
                return reps
            return _embed_chunk(self.model, plan, chunk)

    def _progress(self, items: list[Any], desc: str) -> Iterable[Any]:
        return tqdm.tqdm(items, desc=desc, disable=not self.show_progress_bar) if self.show_progress_bar else items

    def _replay(self, grad_output: Tensor, step: _Step) -> None:
        """Pass 2 (the backward hook of the returned loss): :func:`f2llm.gradcache.backward_chunks` over every column's
        mini-batches at once, their RNG states and autocast replayed, back-propagating ``embeddings . cached gradient *
        grad_output``."""
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        # The columns' mini-batches in one call, their cached gradients concatenated in the same order: the last
        # mini-batch of the last column is the one whose backward DDP synchronizes. The cached gradient is scaled by
        # the one handed to the loss (accumulation's 1/k, fp16's loss scale) in float32, then cast once to the
        # embeddings' dtype by backward_chunks: a bf16 embedding's gradient is rounded once, as autograd would.
        grad = torch.cat([g.float() for g in step.grads]) * grad_output
        bounds = np.cumsum([0] + [len(column) for column in step.chunks]).tolist()

        def progress(pairs: list[Any]) -> Iterable[Any]:  # one bar per column, as in pass 1
            for begin, end in itertools.pairwise(bounds):
                yield from self._progress(pairs[begin:end], "Replay mini-batches")

        engine = self.model if _is_deepspeed_engine(self.model) else None
        zero = engine is not None and engine.zero_optimization_stage() in (1, 2)
        reduce_once = _zero_reduce_once(_unwrap(self.model)) if zero else contextlib.nullcontext()
        with torch.enable_grad(), reduce_once:  # a backward hook runs with grad mode off
            step.cache.backward_chunks(
                [c for column in step.chunks for c in column],
                [s for column in step.states for s in column],
                grad,
                progress=progress,
            )
        if ddp is not None and step.packed and ddp.require_backward_grad_sync:
            _all_reduce_gradients(ddp)


class CachedMultipleNegativesRankingLoss(_FusedLossMixin, _GradientCacheMixin, _STCachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on f2llm's gradient cache, packing and InfoNCE.

    Same arguments as sentence-transformers 6.x's class (see the module docstring for the few it refuses). Extra
    attribute: ``pack_row_tokens``, the width of a packed row (at least the mini-batch's longest text): wider rows
    waste less on row padding but attend over more (masked) positions.
    """

    pack_row_tokens: int = 64
    _st_embed_minibatch = _CachedLossMixin.embed_minibatch

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            show_progress_bar=show_progress_bar,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        if not (isinstance(mini_batch_size, int) and mini_batch_size > 0):
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        self._check_supported()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ loss
    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """sentence-transformers' loss of the anchors (``reps[0]``) against every candidate column (``reps[1:]``),
        from the per-mini-batch embeddings; with ``with_backward``, back-propagated to them and returned detached.

        Candidates are the positives then each negative column, of every rank with ``gather_across_devices``
        (gathered with gradient); anchor i's target is its own positive. Labels are unused. Computed in float32
        whatever autocast is on; the returned loss has the dtype sentence-transformers' would (autocast's).
        """
        return self._embeddings_loss(
            torch.cat(reps[0]),
            [torch.cat(column) for column in reps[1:]],
            with_backward=with_backward,
            block_rows=self.mini_batch_size,
        )

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        self._check_supported()
        if isinstance(vars(self).get("calculate_loss"), CachedLossDecorator):
            self._warn_once(_LOOPED_MATRYOSHKA)
        return self._cached_forward(
            sentence_features,
            lambda reps, with_backward: self.calculate_loss(reps, labels, with_backward=with_backward),
        )


class MultipleNegativesRankingLoss(_FusedLossMixin, _STMultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` on f2llm's packing and InfoNCE.

    Same arguments, loss and gradients as sentence-transformers 6.x's class (it subclasses it): one forward with
    gradients over the whole batch, no gradient cache. The texts of every column are packed together and embedded
    in one forward (see the module docstring for what packs; anything else goes through sentence-transformers'
    padded forward), and :meth:`compute_loss_from_embeddings` is :class:`CachedMultipleNegativesRankingLoss`'s loss
    computation. Extra attribute: ``pack_row_tokens``, the width of a packed row (at least the longest text).
    """

    pack_row_tokens: int = 64

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        self._check_supported()
        self._warned: set[str] = set()

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        self._check_supported()
        st_model = _unwrap(self.model)
        # A forward replaced on the instance (MatryoshkaLoss's ForwardDecorator, say) must see every column. Not
        # replacements: accelerate's mixed-precision wrapper, which the packed forward reproduces, and the model's
        # own forward stored on the instance (sentence-transformers' MatryoshkaLoss restores it so).
        forward = vars(st_model).get("forward")
        if isinstance(forward, ForwardDecorator):
            self._warn_once(_LOOPED_MATRYOSHKA)
        method = inspect.ismethod(forward)
        own = method and forward.__self__ is st_model and forward.__func__ is type(st_model).forward
        accelerate = method and "_original_forward" in vars(st_model)
        if forward is not None and not (own or accelerate):
            plan, reason = None, "its forward is replaced on the instance"
        else:
            plan, reason = _packing_plan(st_model, sentence_features)
        if plan is None:
            self._warn_once(
                f"f2llm MultipleNegativesRankingLoss: cannot pack this model ({reason}); embedding with "
                "sentence-transformers' padded forward instead"
            )
            return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)
        chunk = _pack_columns(sentence_features, plan, self.pack_row_tokens)
        with _autocast_of(st_model, _plan_device(plan))():
            embeddings = _embed_packed(plan, chunk)
        sizes = [_get_batch_size(features) for features in sentence_features]
        loss = self.compute_loss_from_embeddings(list(embeddings.split(sizes)), labels)
        # The packed forward bypasses DDP's reducer: the gradients are averaged over the ranks after the backward.
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        if ddp is not None and loss.requires_grad:
            loss.register_hook(functools.partial(_sync_after_backward, ddp=ddp))
        return loss

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """sentence-transformers' loss of the anchors (``embeddings[0]``) against every candidate column
        (``embeddings[1:]``), computed as :class:`CachedMultipleNegativesRankingLoss` does. Labels are unused."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        self._check_supported()
        return self._embeddings_loss(embeddings[0], list(embeddings[1:]))


def _sync_after_backward(grad: Tensor, ddp: DistributedDataParallel) -> None:
    """The packed loss's backward hook: all-reduce the gradients once the backward has finished (as DDP's reducer
    would), unless inside ``no_sync``."""
    if ddp.require_backward_grad_sync:
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_all_reduce_gradients, ddp))


class CachedGISTEmbedLoss(_GradientCacheMixin, _STCachedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss`` on f2llm's gradient cache and packing.

    Same arguments, loss and gradients as sentence-transformers 6.x's class (it subclasses it): anchor i is scored
    (cosine similarity / ``temperature``) against every positive (of every rank with ``gather_across_devices``),
    every negative column's texts, and, with ``contrast_anchors`` / ``contrast_positives``, the other anchors (this
    rank's) / positives; a candidate whose guide similarity exceeds the guide's anchor-positive similarity (less
    ``margin``, or less ``|similarity| * margin`` with ``margin_strategy="relative"``) is masked out, the positive
    never. The trained model runs the gradient cache of :class:`CachedMultipleNegativesRankingLoss` (packed where
    it can be); the guide is embedded without gradients, packed too where it can be (re-tokenized first, as
    sentence-transformers does, when its tokenizer or shorter ``max_seq_length`` requires). The guide's masks
    differ per row, so the loss is computed in PyTorch ``mini_batch_size`` rows at a time (never the whole
    [B, N] score matrix), in float32 whatever autocast is on. An overridden ``embed_minibatch`` embeds the model's
    mini-batches (its first output); the guide is still embedded here. Extra attribute: ``pack_row_tokens``.
    """

    pack_row_tokens: int = 64
    _st_embed_minibatch = _STCachedGISTEmbedLoss.embed_minibatch

    def __init__(
        self,
        model: Any,
        guide: Any,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model,
            guide,
            temperature=temperature,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            show_progress_bar=show_progress_bar,
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices,
        )
        if not (isinstance(mini_batch_size, int) and mini_batch_size > 0):
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")

        def loss_of(reps: list[list[Tensor]], with_backward: bool) -> Tensor:
            # The guide after the model's pass 1, as sentence-transformers embeds it after the model's mini-batch.
            guided = [[g] for g in self._guide_embeddings(sentence_features)]
            return self.calculate_loss(reps, guided, with_backward=with_backward)

        return self._cached_forward(sentence_features, loss_of)

    def _guide_embeddings(self, sentence_features: list[dict[str, Tensor]]) -> list[Tensor]:
        """Every column's guide embeddings, without gradients, ``mini_batch_size`` texts (or the token budget) at a
        time: packed where the guide and its inputs allow, else its padded forward."""
        guide = _unwrap(self.guide)
        columns = [self._guide_features(features, guide) for features in sentence_features]
        plan, reason = _packing_plan(guide, columns)
        if plan is None:
            self._warn_once(
                f"f2llm {type(self).__name__}: cannot pack the guide ({reason}); embedding it with "
                "sentence-transformers' padded forward instead"
            )
        autocast = _autocast_of(guide, _plan_device(plan) if plan is not None else guide.device)
        with torch.no_grad(), autocast():
            return [
                torch.cat([_embed_chunk(guide, plan, chunk) for chunk in self._mini_batches(features, plan)])
                for features in columns
            ]

    def _guide_features(self, features: dict[str, Tensor], guide: torch.nn.Module) -> dict[str, Tensor]:
        """A column's inputs for the guide: the model's, or (``must_retokenize``) its texts decoded and tokenized by
        the guide, as sentence-transformers does."""
        if not self.must_retokenize:
            return features
        input_ids = features["input_ids"]
        if "cu_seq_lens_q" in features:  # flattened inputs: one row, texts delimited by cumulative lengths
            flat = input_ids[0].tolist()
            bounds = features["cu_seq_lens_q"].tolist()
            input_ids = [flat[begin:end] for begin, end in itertools.pairwise(bounds)]
        decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return batch_to_device(guide.preprocess(decoded), guide.device)

    # ------------------------------------------------------------------------------------------------ loss
    def calculate_loss(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """sentence-transformers' loss from the model's and the guide's per-mini-batch embeddings (anchors, positives,
        negative columns); with ``with_backward``, back-propagated to the model's and returned detached."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        anchors = torch.cat(reps[0])
        with torch.autocast(anchors.device.type, enabled=False):  # the loss in float32, whatever autocast is on
            model = _Batch.gather(
                _unit(anchors), [_unit(torch.cat(c)) for c in reps[1:]], gather=self.gather_across_devices
            )
            with torch.no_grad():
                guide = _Batch.gather(
                    _unit(torch.cat(reps_guided[0])),
                    [_unit(torch.cat(c)) for c in reps_guided[1:]],
                    gather=self.gather_across_devices,
                )
            block = functools.partial(self._block_losses, guide=guide, offset=model.offset)
            roots = [model.queries, *model.all_columns]
            return _blockwise_loss(roots, model.queries.shape[0], self.mini_batch_size, block, with_backward)

    def _block_losses(self, leaves: list[Tensor], begin: int, end: int, guide: _Batch, offset: int) -> Tensor:
        """Per-row losses of this rank's anchors [begin, end): logits cosine / temperature, the candidates the guide
        rates above the row's threshold masked (its positive and, for anchors and positives, itself excepted /
        masked)."""
        anchors, columns = leaves[0], leaves[1:]
        device = anchors.device
        local = torch.arange(end - begin, device=device)
        rows = local + offset + begin  # the anchors' positives in the gathered candidates
        guide_anchors, guide_columns = guide.queries[begin:end], guide.all_columns
        guide_positive = (guide_anchors * guide_columns[0][rows]).sum(-1, keepdim=True)
        if self.margin_strategy == "absolute":
            threshold = guide_positive - self.margin
        else:
            threshold = guide_positive - guide_positive.abs() * self.margin

        def masked(sim: Tensor, guide_sim: Tensor, own: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
            mask = guide_sim > threshold
            if keep is not None:
                mask[local, keep] = False
            if own is not None:
                mask[local, own] = True
            return sim.masked_fill(mask, -torch.inf)

        q = anchors[begin:end]
        scores = [masked(q @ columns[0].T, guide_anchors @ guide_columns[0].T, keep=rows)]
        if self.contrast_anchors:
            scores.append(masked(q @ anchors.T, guide_anchors @ guide.queries.T, own=local + begin))
        if self.contrast_positives:
            guide_sim = guide_columns[0][rows] @ guide_columns[0].T
            scores.append(masked(columns[0][rows] @ columns[0].T, guide_sim, own=rows))
        for column, guide_column in zip(columns[1:], guide_columns[1:], strict=True):
            scores.append(masked(q @ column.T, guide_anchors @ guide_column.T))
        logits = torch.cat(scores, dim=1) / self.temperature
        return torch.logsumexp(logits, dim=1) - logits[local, rows]


def _unit(embeddings: Tensor) -> Tensor:
    """Float32 unit vectors: the cosine similarities of sentence-transformers' GIST losses as dot products."""
    return F.normalize(embeddings.float(), dim=-1)


class MatryoshkaLoss(_STMatryoshkaLoss):
    """sentence-transformers' ``MatryoshkaLoss``, every dimension in one pass of f2llm's fused loss.

    Same arguments and loss as sentence-transformers 6.x's class (it subclasses it): ``sum_k w_k loss(embeddings cut
    to d_k and normalized again)`` over ``matryoshka_dims`` (a random ``n_dims_per_step`` of them per step, drawn
    from Python's ``random`` as theirs are). Around f2llm's :class:`CachedMultipleNegativesRankingLoss` or
    :class:`MultipleNegativesRankingLoss` the model embeds once (one gradient cache, one packed forward) and the
    loss of every dimension comes out of one :func:`f2llm.kernels.infonce` call over the widest prefix
    (``matryoshka_dims``: each level's prefixes normalized inside, no per-dimension copy of the embeddings, no
    per-dimension [B, N] scores); sentence-transformers' class instead calls the inner loss once per dimension. The
    options the fused op cannot express (query_to_query, doc_to_doc, hardness weighting, the joint doc_to_query
    softmax, a weight <= 0) are computed dimension by dimension inside f2llm's loss. Around any other loss it is
    sentence-transformers' class unchanged.
    """

    def __init__(
        self,
        model: Any,
        loss: torch.nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | Sequence[int] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step)
        if isinstance(loss, _FusedLossMixin) and isinstance(vars(loss).get("calculate_loss"), CachedLossDecorator):
            # The parent wrapped the cached loss's calculate_loss in its per-dimension loop; f2llm's loss takes the
            # levels itself (forward below).
            del loss.calculate_loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if not isinstance(self.loss, _FusedLossMixin):
            return super().forward(sentence_features, labels)
        with self.step_levels():
            return self.loss(sentence_features, labels)

    @contextlib.contextmanager
    def step_levels(self) -> Iterator[Levels]:
        """Within it, the wrapped f2llm loss computes this step's Matryoshka levels: every (dim, weight), or a
        random ``n_dims_per_step`` of them (the same draw as sentence-transformers'); yields (dims, weights)."""
        if not isinstance(self.loss, _FusedLossMixin):
            raise TypeError(f"step_levels needs an f2llm loss inside, not {type(self.loss).__name__}")
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = random.sample(indices, self.n_dims_per_step)
        weights: dict[int, float] = {}
        for i in indices:  # a dim listed twice is one level with the summed weight
            dim = int(self.matryoshka_dims[i])
            weights[dim] = weights.get(dim, 0.0) + float(self.matryoshka_weights[i])
        dims = sorted(weights, reverse=True)
        levels = (tuple(dims), tuple(weights[d] for d in dims))
        self.loss._matryoshka = levels
        try:
            yield levels
        finally:
            self.loss._matryoshka = None
