"""The embedding model: a Hugging Face backbone (``AutoModel``, no LM head) + fused pooling and L2 normalization.

* decoders (Qwen3, ...): causal attention kept, the recipe's tokenization (EOS appended, always last), last-token
  (EOS) pooling by default;
* encoders (BERT, MiniLM, ...): the tokenizer's own special tokens, mean pooling by default.

(:func:`f2llm.data.is_decoder_model_type` decides which: a model type with a causal-LM class and no masked-LM
class is a decoder.)

:meth:`Encoder.forward` embeds a collated :class:`f2llm.data.EncoderBatch`, padded or packed, with autograd.
Packed batches never let texts attend to each other:

* decoders with sdpa / eager / flex attention: ``position_ids`` restart at 0 for every text and no
  ``attention_mask`` is passed, which transformers (``masking_utils.find_packed_sequence_indices``) turns into a
  block-diagonal causal mask (a BlockMask document mask for flex);
* decoders with a varlen kernel (flash-attention 2/3, or ``"f2llm_varlen"``: torch's own
  ``torch.nn.attention.varlen.varlen_attn``, registered with transformers by f2llm.attention): the rows
  are flattened into one and the kernel gets the collator's ``attn_cu_seqlens`` (every text, and every run of
  padding, a segment of its own) with its host-known longest segment: no mask, no L x L anything, no host sync;
  padded batches take the same route;
* encoders (sdpa / eager): an explicit block-diagonal bidirectional 4-D mask.

The default attention of a decoder on CUDA is flash_attention_2 when the flash-attn package is installed, else
``"f2llm_varlen"`` when torch has ``varlen_attn`` (torch >= 2.13), else sdpa (see
:func:`default_attn_implementation`).

Layer exits (ML-Embed's depth Matryoshka, :meth:`Encoder.set_layer_exits`): one forward yields the pooled embedding of
every exit layer, ``[n, E, D]``, an intermediate exit of a decoder through the model's final norm, as ML-Embed trains
them; inference (:meth:`Encoder.encode`) embeds with the last layer.

Recompute (activation checkpointing) can be switched per forward and per layer (:meth:`Encoder.recompute`);
f2llm.recompute estimates what a forward with grad keeps for backward and decides which forwards recompute.

Beside this module: the attention for packed batches (f2llm.attention), Liger's kernels (f2llm.liger), the saved
format that ``transformers.AutoModel``, ``sentence_transformers.SentenceTransformer`` and :meth:`Encoder.load` all
read, giving the same embeddings (f2llm.export).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from f2llm.attention import (
    default_attn_implementation,
    no_masks,
    packed_encoder_mask,
    takes_prepared_masks,
    uses_varlen_kernel,
)
from f2llm.data import EncoderBatch, TextTokenizer, format_query, is_decoder_model_type, pad_sequences
from f2llm.export import ST_POOLING_KEY, read_f2llm_config, save_encoder, sentence_transformers_max_length
from f2llm.kernels import pool
from f2llm.liger import LIGER_PATCHES, apply_liger_kernels

Pooling = Literal["last", "mean", "first"]
DEFAULT_MAX_LENGTH = 1024  # the recipe's training length


def enable_recompute(model: PreTrainedModel) -> None:
    """Turn transformers' non-reentrant activation checkpointing (recompute) on in every layer of ``model``."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ML-Embed's exits (its model.py): these layers where the model has them, plus the last.
ML_EMBED_EXITS = (1, 2, 4, 8, 16, 24, 32, 40, 48)


def ml_embed_exits(num_layers: int) -> tuple[int, ...]:
    """ML-Embed's layer exits of a model with ``num_layers`` layers, ascending: (1, 2, 4, 8, 16, 24, 32, 40, 48) up
    to the depth, and the last layer (Qwen3-0.6B, 28 layers: 1, 2, 4, 8, 16, 24, 28)."""
    return tuple(sorted({k for k in ML_EMBED_EXITS if k <= num_layers} | {num_layers}))


def pool_packed(
    hidden: torch.Tensor,
    batch: EncoderBatch,
    mode: Pooling,
    normalize: bool,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embeddings [batch.num_texts, D] (float32) of a packed batch's hidden states, in collation order."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if batch.token_index is not None:
        hidden = hidden.index_select(0, batch.token_index)
    emb = pool(hidden, cu_seqlens=batch.cu_seqlens, mode=mode, normalize=normalize, validate=False, out_dtype=out_dtype)
    return emb.index_select(0, batch.text_position)


class Encoder(nn.Module):
    """Text -> L2-normalized embedding ``[D]`` (D = the backbone's hidden size, or ``dim``).

    Build it with :meth:`from_pretrained` (a Hugging Face model) or :meth:`load` (a folder written by
    :meth:`save_pretrained`).

    Attributes:
        model: the backbone (``AutoModel``).
        tokenizer: its Hugging Face tokenizer.
        text_tokenizer: the f2llm tokenization rule (:class:`f2llm.data.TextTokenizer`) used by ``encode`` and
            by the data pipeline.
        pooling: ``"last"``, ``"mean"`` or ``"first"``.
        normalize: L2-normalize the pooled vector.
        query_instruction: the instruction written as the sentence-transformers ``query`` prompt on save.
        dim: embeddings keep their first ``dim`` coordinates (a Matryoshka member), cut before the normalization;
            None: all of them.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.is_decoder = is_decoder_model_type(model.config.model_type)
        pooling = pooling or ("last" if self.is_decoder else "mean")
        if pooling not in ST_POOLING_KEY:
            raise ValueError(f"Encoder: pooling must be one of {sorted(ST_POOLING_KEY)} or None, got {pooling!r}")
        # RoBERTa-family embeddings number positions from padding_idx + 1 (BERT and decoders from 0).
        padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
        self.position_offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
        limit = getattr(model.config, "max_position_embeddings", None)
        limit = limit - self.position_offset if limit is not None else None
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, limit) if limit is not None else DEFAULT_MAX_LENGTH
        elif limit is not None and max_length > limit:
            raise ValueError(
                f"Encoder: max_length={max_length} exceeds the {limit} positions of {model.config.model_type} "
                "(config.max_position_embeddings); lower max_length"
            )
        hidden_size = model.config.hidden_size
        if dim is not None and not 1 <= dim <= hidden_size:
            raise ValueError(f"Encoder: dim must be in [1, {hidden_size}] (the hidden size) or None, got {dim}")
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.dim = dim
        self.query_instruction = query_instruction
        # Layers whose embeddings training computes (set_layer_exits); None: the last layer's only.
        self.layer_exits: tuple[int, ...] | None = None
        self.text_tokenizer = TextTokenizer(tokenizer, max_length, append_eos=self.is_decoder)
        # BERT-like models carry a pooler head ([CLS] -> dense -> tanh) that embeddings never use: frozen, it gets
        # no optimizer state and DDP does not wait for its gradients (which would never come).
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        recompute: bool = False,
        liger: bool | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
        dim: int | None = None,
    ) -> Encoder:
        """Load a Hugging Face model (no LM head) and its tokenizer.

        Args:
            name_or_path: hub id or local folder.
            pooling: ``"last"`` / ``"mean"`` / ``"first"``; None: ``"last"`` for decoders, ``"mean"`` for encoders.
            max_length: tokens per text, special tokens included; None: the ``max_seq_length`` of a local
                sentence-transformers folder (all-MiniLM-L6-v2: 256, as MTEB evaluates it), else 1024 (the
                recipe's), or fewer when the model has fewer positions (BERT: 512).
            dtype: None: bfloat16 on CUDA, float32 on CPU.
            attn_implementation: None: :func:`default_attn_implementation` (decoders on CUDA in bf16 / fp16:
                ``"flash_attention_2"`` with flash-attn installed, else ``"f2llm_varlen"`` with torch >= 2.13, else
                ``"sdpa"``; everything else ``"sdpa"``).
            recompute: recompute activations in backward (non-reentrant activation checkpointing) in every
                forward; a trainer may switch it per forward instead (:meth:`recompute`).
            liger: apply Liger's RMSNorm / RoPE / SwiGLU kernels; None: on CUDA when the model type has a patch.
            normalize: L2-normalize embeddings.
            query_instruction: saved as the sentence-transformers ``query`` prompt.
            device: None: the current CUDA device if any, else CPU.
            compute_dtype: the dtype the forward computes in when it differs from ``dtype`` (a trainer's autocast
                over fp32 master weights); None: ``dtype``. Only the default attention depends on it.
            dim: keep the first ``dim`` coordinates of every embedding, cut before the normalization; None: all.
        """
        device = torch.device(device) if device is not None else _default_device()
        on_cuda = device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if attn_implementation is None:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
            attn_implementation = default_attn_implementation(model_type, device, compute_dtype or dtype)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        if liger is None:
            liger = on_cuda and model.config.model_type in LIGER_PATCHES
        if liger:
            if not on_cuda:
                raise ValueError("Encoder.from_pretrained: Liger kernels run on CUDA only; pass liger=False on CPU")
            apply_liger_kernels(model)
        if max_length is None:
            max_length = sentence_transformers_max_length(name_or_path)
        encoder = cls(
            model,
            tokenizer,
            pooling=pooling,
            max_length=max_length,
            normalize=normalize,
            query_instruction=query_instruction,
            dim=dim,
        )
        if recompute:
            encoder.set_recompute(True)
        # Eval mode, like transformers' from_pretrained: dropout stays off until a trainer calls .train().
        return encoder.to(device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> Encoder:
        """Load a folder written by :meth:`save_pretrained`; keyword arguments override :meth:`from_pretrained`'s."""
        saved = read_f2llm_config(path)
        kwargs = {k: saved[k] for k in ("pooling", "max_length", "normalize", "query_instruction")}
        kwargs["dim"] = saved.get("dim")  # absent from folders saved before dim existed
        kwargs.update(overrides)
        return cls.from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.text_tokenizer.max_length

    @property
    def embedding_dim(self) -> int:
        return self.dim if self.dim is not None else self.model.config.hidden_size

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    # ------------------------------------------------------------------------------------------------------
    # Recompute (activation checkpointing): which layers recompute their activations in backward
    # ------------------------------------------------------------------------------------------------------
    def _recompute_layers(self) -> list[nn.Module]:
        """The blocks (decoder / encoder layers) transformers can recompute one by one, in forward order."""
        return [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _recompute_modules(self) -> list[nn.Module]:
        """The modules transformers gives a ``gradient_checkpointing`` flag (its GradientCheckpointingLayer blocks,
        and the odd model-level flag)."""
        return [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]

    @property
    def num_recompute_layers(self) -> int:
        """How many layers can recompute one by one (what ``recompute(k)`` counts)."""
        return len(self._recompute_layers())

    @property
    def recomputed_layers(self) -> int:
        """How many of them recompute now."""
        return sum(bool(layer.gradient_checkpointing) for layer in self._recompute_layers())

    @property
    def recompute_enabled(self) -> bool:
        return any(m.gradient_checkpointing for m in self._recompute_modules())

    def set_recompute(self, enabled: bool | int) -> None:
        """Recompute activations in backward (non-reentrant; training mode only) in every forward from now on, or
        keep them: True / False for every layer, an int k for the first k layers (:meth:`_recompute_layers`; the
        rest keep theirs). The first enabling sets transformers' checkpointing up."""
        if not isinstance(enabled, bool):
            layers = self._recompute_layers()
            if not 0 <= enabled <= len(layers):
                raise ValueError(f"Encoder: cannot recompute {enabled} of the model's {len(layers)} layers")
            self.set_recompute(enabled > 0)
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < enabled
            return
        modules = self._recompute_modules()
        if enabled and not modules:
            raise ValueError(f"Encoder: {type(self.model).__name__} does not support gradient checkpointing")
        if enabled and not all(hasattr(m, "_gradient_checkpointing_func") for m in modules):
            enable_recompute(self.model)
        for module in modules:
            module.gradient_checkpointing = enabled

    @contextlib.contextmanager
    def recompute(self, enabled: bool | int) -> Iterator[None]:
        """Forwards inside recompute (or keep their activations) as ``enabled`` says (see :meth:`set_recompute`: all,
        none, or the first k layers); the setting before is restored after. Recompute changes only what is kept
        for backward, never a result or a gradient."""
        modules = self._recompute_modules()
        before = [m.gradient_checkpointing for m in modules]
        self.set_recompute(enabled)
        try:
            yield
        finally:
            for module, value in zip(modules, before, strict=True):
                module.gradient_checkpointing = value

    # ------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: EncoderBatch, normalize: bool | None = None, exits: bool = True) -> torch.Tensor:
        """Float32 embeddings ``[batch.num_texts, D]`` in the order the texts were collated, with autograd; with
        :attr:`layer_exits` set (and ``exits``), ``[batch.num_texts, E, D]``: the embedding of every exit, in
        :attr:`layer_exits` order, from the same forward.

        Float32 whatever the backbone computes in: the pooling kernel works in float32, and the loss and the
        gradient cache's d(loss)/d(embedding) keep that precision instead of a bf16 rounding of it.
        ``normalize``: L2-normalize the pooled vectors (None: as the encoder was built; distillation compares raw
        ones, False). ``exits=False``: the last layer's embeddings only (inference).
        """
        normalize = self.normalize if normalize is None else normalize
        layer_exits = self.layer_exits if exits else None
        batch = batch.to(self.device, non_blocking=True)
        positions = batch.position_ids + self.position_offset if self.position_offset else batch.position_ids
        kwargs: dict[str, Any] = {"use_cache": False} if self.is_decoder else {}
        if layer_exits is not None:
            kwargs["output_hidden_states"] = True
        if self.is_decoder and uses_varlen_kernel(self.attn_implementation):
            out, pool_of = self._forward_varlen(batch, positions, kwargs)
        elif not batch.packed:
            out = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, **kwargs
            )
            pool_of = functools.partial(pool, attention_mask=batch.attention_mask, mode=self.pooling, validate=False)
        else:
            if not self.is_decoder:
                weights = next(self.model.parameters()).dtype
                kwargs["attention_mask"] = packed_encoder_mask(batch.position_ids, self.attn_implementation, weights)
            out = self.model(input_ids=batch.input_ids, position_ids=positions, **kwargs)
            pool_of = functools.partial(pool_packed, batch=batch, mode=self.pooling)
        if layer_exits is None:
            fused = normalize and self.dim is None  # pooling's own normalization, when nothing is cut after it
            return self._finish(pool_of(out.last_hidden_state, normalize=fused, out_dtype=torch.float32), normalize)
        return self._exit_embeddings(out, pool_of, layer_exits, normalize)

    def _finish(self, emb: torch.Tensor, normalize: bool) -> torch.Tensor:
        """Pooled vectors -> embeddings: without ``dim``, as pooled (pooling normalized them when asked); with it,
        the first ``dim`` coordinates of the raw vectors, normalized after the cut so that they have unit length."""
        if self.dim is None:
            return emb
        emb = emb[:, : self.dim]
        return F.normalize(emb, dim=-1) if normalize else emb

    def _forward_varlen(
        self, batch: EncoderBatch, positions: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[Any, Callable[..., torch.Tensor]]:
        """A decoder with a varlen kernel, padded or packed batch: the [R, W] grid flattened into one row, whose
        segments (every text, every run of padding) and longest segment the collator computed on the host.
        Returns the model's output and the pooling of a hidden state of it."""
        if batch.attn_cu_seqlens is not None:
            cu, longest = batch.attn_cu_seqlens, batch.attn_max_seqlen
        else:  # a batch built by hand: segments from the position ids (two host syncs)
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

            (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids.reshape(1, -1))
            longest = int(longest)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if takes_prepared_masks(type(self.model)):
            kwargs["attention_mask"] = no_masks(self.model.config)
        R, W = batch.input_ids.shape
        out = self.model(input_ids=batch.input_ids.reshape(1, -1), position_ids=positions.reshape(1, -1), **kwargs)
        if batch.packed:
            return out, functools.partial(pool_packed, batch=batch, mode=self.pooling)

        def pool_grid(hidden: torch.Tensor, **options: Any) -> torch.Tensor:
            return pool(hidden.reshape(R, W, -1), batch.attention_mask, mode=self.pooling, validate=False, **options)

        return out, pool_grid

    # ------------------------------------------------------------------------------------------------------
    # Layer exits (ML-Embed's depth Matryoshka)
    # ------------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def final_norm(self) -> nn.Module | None:
        """The norm a pre-norm decoder applies after its last layer (``model.norm``: Qwen3, Llama, Mistral...),
        which an intermediate exit goes through too; None for BERT-like (post-LN) encoders, whose every layer
        output is already normalized. Raises when a decoder has none f2llm can find."""
        if not self.is_decoder:
            return None
        backbone = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        norm = getattr(backbone, "norm", None)
        if not isinstance(norm, nn.Module):
            raise ValueError(
                f"{type(backbone).__name__} ({self.model.config.model_type}) has no final norm module `norm`, which "
                "an intermediate exit goes through"
            )
        return norm

    def set_layer_exits(self, exits: Sequence[int] | str | None) -> None:
        """Train the embeddings of these layers (1 = the first layer's output, ``num_layers`` = the last), or
        ``"ml-embed"``: ML-Embed's rule (:func:`ml_embed_exits`); None: the last layer only. Exits are checked
        against the model's depth here, before any step."""
        if exits is None:
            self.layer_exits = None
            return
        if self.dim is not None:
            raise ValueError(f"model.layer_exits: this encoder keeps {self.dim} coordinates (dim); train exits in full")
        if isinstance(exits, str):
            if exits != "ml-embed":
                raise ValueError(f"model.layer_exits: {exits!r} is not a list of layers or 'ml-embed'")
            exits = ml_embed_exits(self.num_layers)
        layers = list(exits)
        bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_layers]
        if not layers or bad:
            raise ValueError(
                f"model.layer_exits: {bad or layers} not layers of {self.model.config.model_type} "
                f"({self.num_layers} layers: exits are 1..{self.num_layers}, the last being the full model)"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"model.layer_exits lists a layer more than once: {layers}")
        if min(layers) < self.num_layers:
            try:
                self.final_norm()
            except ValueError as e:
                raise ValueError(f"model.layer_exits: {e}; this model family cannot train layer exits") from None
        self.layer_exits = tuple(sorted(layers))

    def _exit_embeddings(
        self, out: Any, pool_of: Callable[..., torch.Tensor], layer_exits: Sequence[int], normalize: bool
    ) -> torch.Tensor:
        """``[n, E, D]``: every exit's hidden state (``out.hidden_states[k]``: the output of layer k) pooled as the
        last layer's is; an intermediate exit of a decoder through the final norm first (ML-Embed's rule), applied to
        the pooled tokens only when pooling picks one token (the norm is per token: the same values)."""
        norm = self.final_norm()
        embeddings = []
        for k in layer_exits:
            if k == self.num_layers or norm is None:
                hidden = out.last_hidden_state if k == self.num_layers else out.hidden_states[k]
                embeddings.append(pool_of(hidden, normalize=normalize, out_dtype=torch.float32))
            elif self.pooling == "mean":
                embeddings.append(pool_of(norm(out.hidden_states[k]), normalize=normalize, out_dtype=torch.float32))
            else:
                hidden = out.hidden_states[k]
                token = norm(pool_of(hidden, normalize=False, out_dtype=hidden.dtype)).float()
                embeddings.append(F.normalize(token, dim=-1) if normalize else token)
        return torch.stack(embeddings, 1)

    # ------------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None) -> list:
        """Token ids of texts (queries get ``Instruct: {instruction}\\nQuery: {text}`` when instruction is set)."""
        if isinstance(texts, str):
            raise TypeError("Encoder: pass a list of texts, not a single string")
        if instruction:
            texts = [format_query(t, instruction) for t in texts]
        tokenizer = self.text_tokenizer
        if max_length is not None and max_length != tokenizer.max_length:
            tokenizer = TextTokenizer(self.tokenizer, max_length, append_eos=self.is_decoder)
        return tokenizer(texts)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        instruction: str | None = None,
        show_progress: bool = True,
        max_length: int | None = None,
        normalize: bool | None = None,
        layer_exits: bool = False,
    ) -> np.ndarray:
        """Embeddings ``[len(texts), D]`` float32, in the order of ``texts`` (``normalize``: as :meth:`forward`).
        ``layer_exits``: ``[len(texts), E, D]``, every exit of :attr:`layer_exits` from one forward (a whole family's
        embeddings, e.g. to evaluate every depth at once).

        Texts are tokenized once, sorted by length (less padding) and run in eval mode without autograd.
        """
        if layer_exits and self.layer_exits is None:
            raise ValueError("Encoder.encode(layer_exits=True): no exits set; call set_layer_exits first")
        ids = self.tokenize(texts, instruction, max_length)
        exits = (len(self.layer_exits),) if layer_exits else ()
        out = np.empty((len(ids), *exits, self.embedding_dim), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(ids), batch_size), desc="encode", disable=not show_progress):
                    index = order[start : start + batch_size]
                    batch = pad_sequences([ids[i] for i in index], self.text_tokenizer.pad_token_id)
                    out[index] = self(batch, normalize, exits=layer_exits).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a folder that transformers, sentence-transformers and :meth:`load` read, giving the same embeddings
        (``dtype``: the weights' dtype on disk; None: as in memory). See :func:`f2llm.export.save_encoder`."""
        save_encoder(self, path, dtype)
