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
* decoders with flash-attention 2/3: the rows are flattened into one and flash-attention's varlen kernel gets
  ``cu_seqlens`` derived from the position ids (no mask, no padding FLOPs);
* encoders (sdpa / eager): an explicit block-diagonal bidirectional 4-D mask.

:meth:`Encoder.save_pretrained` writes a folder that ``transformers.AutoModel``, ``sentence_transformers.
SentenceTransformer`` and :meth:`Encoder.load` all read, giving the same embeddings.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available

from f2llm.data import EncoderBatch, TextTokenizer, format_query, is_decoder_model_type, pad_sequences
from f2llm.ops import pool

logger = logging.getLogger(__name__)

Pooling = Literal["last", "mean", "first"]
DEFAULT_MAX_LENGTH = 1024  # the recipe's training length
F2LLM_CONFIG = "f2llm_config.json"
F2LLM_CONFIG_FORMAT = "f2llm-encoder-v1"
# sentence-transformers' Pooling modes for ours ("lasttoken" is how Qwen3-Embedding is saved).
_ST_POOLING_KEY = {
    "last": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
}
_FLASH = ("flash_attention_2", "flash_attention_3")
# Model types whose Liger kernels f2llm applies, with the liger_kernel.transformers function doing it.
LIGER_PATCHES = {"qwen3": "apply_liger_kernel_to_qwen3"}


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Swap in Liger's RMSNorm, RoPE and SwiGLU kernels (CUDA only; they do not run on CPU).

    Cross-entropy kernels stay off: with ``fused_linear_cross_entropy=True`` Liger would replace the model's
    forward by a causal-LM forward, which an embedding model (no LM head) must not get. RoPE is patched in the
    modeling module (process-wide), RMSNorm and SwiGLU on this model's instances.
    """
    model_type = model.config.model_type
    if model_type not in LIGER_PATCHES:
        raise ValueError(
            f"apply_liger_kernels: no Liger patch for model type {model_type!r} (supported: {sorted(LIGER_PATCHES)}); "
            "pass liger=False"
        )
    import liger_kernel.transformers as liger

    getattr(liger, LIGER_PATCHES[model_type])(
        model=model, rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def sentence_transformers_max_length(name_or_path: str | os.PathLike) -> int | None:
    """``max_seq_length`` of a local sentence-transformers folder (its embedding setting), or None."""
    config = Path(name_or_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Encoder(nn.Module):
    """Text -> L2-normalized embedding ``[D]`` (D = the backbone's hidden size).

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
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.is_decoder = is_decoder_model_type(model.config.model_type)
        pooling = pooling or ("last" if self.is_decoder else "mean")
        if pooling not in _ST_POOLING_KEY:
            raise ValueError(f"Encoder: pooling must be one of {sorted(_ST_POOLING_KEY)} or None, got {pooling!r}")
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
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.query_instruction = query_instruction
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
        gradient_checkpointing: bool = False,
        liger: bool | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
        device: torch.device | str | None = None,
    ) -> Encoder:
        """Load a Hugging Face model (no LM head) and its tokenizer.

        Args:
            name_or_path: hub id or local folder.
            pooling: ``"last"`` / ``"mean"`` / ``"first"``; None: ``"last"`` for decoders, ``"mean"`` for encoders.
            max_length: tokens per text, special tokens included; None: the ``max_seq_length`` of a local
                sentence-transformers folder (all-MiniLM-L6-v2: 256, as MTEB evaluates it), else 1024 (the
                recipe's), or fewer when the model has fewer positions (BERT: 512).
            dtype: None: bfloat16 on CUDA, float32 on CPU.
            attn_implementation: None: ``"flash_attention_2"`` for decoders on CUDA when flash-attn is installed,
                else ``"sdpa"``.
            gradient_checkpointing: recompute activations in backward (non-reentrant).
            liger: apply Liger's RMSNorm / RoPE / SwiGLU kernels; None: on CUDA when the model type has a patch.
            normalize: L2-normalize embeddings.
            query_instruction: saved as the sentence-transformers ``query`` prompt.
            device: None: the current CUDA device if any, else CPU.
        """
        device = torch.device(device) if device is not None else _default_device()
        on_cuda = device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if attn_implementation is None:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
            decoder = is_decoder_model_type(model_type)
            attn_implementation = "flash_attention_2" if on_cuda and decoder and is_flash_attn_2_available() else "sdpa"
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        if liger is None:
            liger = on_cuda and model.config.model_type in LIGER_PATCHES
        if liger:
            if not on_cuda:
                raise ValueError("Encoder.from_pretrained: Liger kernels run on CUDA only; pass liger=False on CPU")
            apply_liger_kernels(model)
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if max_length is None:
            max_length = sentence_transformers_max_length(name_or_path)
        encoder = cls(
            model,
            tokenizer,
            pooling=pooling,
            max_length=max_length,
            normalize=normalize,
            query_instruction=query_instruction,
        )
        # Eval mode, like transformers' from_pretrained: dropout stays off until a trainer calls .train().
        return encoder.to(device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> Encoder:
        """Load a folder written by :meth:`save_pretrained`; keyword arguments override :meth:`from_pretrained`'s."""
        config_file = Path(path) / F2LLM_CONFIG
        if not config_file.exists():
            raise FileNotFoundError(
                f"Encoder.load: {config_file} not found; {path} was not written by Encoder.save_pretrained "
                "(use Encoder.from_pretrained for a plain Hugging Face model)"
            )
        saved = json.loads(config_file.read_text())
        if saved.get("format") != F2LLM_CONFIG_FORMAT:
            raise ValueError(
                f"Encoder.load: {config_file} has format {saved.get('format')!r}, expected {F2LLM_CONFIG_FORMAT!r}"
            )
        kwargs = {k: saved[k] for k in ("pooling", "max_length", "normalize", "query_instruction")}
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
        return self.model.config.hidden_size

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    # ------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """Float32 embeddings ``[batch.num_texts, D]`` in the order the texts were collated, with autograd.

        Float32 whatever the backbone computes in: the pooling kernel works in float32, and the loss and the
        gradient cache's d(loss)/d(embedding) keep that precision instead of a bf16 rounding of it.
        """
        batch = batch.to(self.device, non_blocking=True)
        positions = batch.position_ids + self.position_offset if self.position_offset else batch.position_ids
        kwargs: dict[str, Any] = {"use_cache": False} if self.is_decoder else {}
        if not batch.packed:
            hidden = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, **kwargs
            ).last_hidden_state
            return pool(
                hidden,
                batch.attention_mask,
                mode=self.pooling,
                normalize=self.normalize,
                validate=False,
                out_dtype=torch.float32,
            )

        input_ids = batch.input_ids
        if self.is_decoder and self.attn_implementation in _FLASH:
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

            # One row: the varlen kernel needs no padding and no mask; a padding tail is a sequence of its own.
            input_ids, positions = input_ids.reshape(1, -1), positions.reshape(1, -1)
            (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(positions)
            kwargs.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
        elif not self.is_decoder:
            kwargs["attention_mask"] = self._packed_encoder_mask(batch.position_ids)
        hidden = self.model(input_ids=input_ids, position_ids=positions, **kwargs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if batch.token_index is not None:
            hidden = hidden.index_select(0, batch.token_index)
        emb = pool(
            hidden,
            cu_seqlens=batch.cu_seqlens,
            mode=self.pooling,
            normalize=self.normalize,
            validate=False,
            out_dtype=torch.float32,
        )
        return emb.index_select(0, batch.text_position)

    def _packed_encoder_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[R, 1, W, W] block-diagonal mask: a token attends to every token of its own text (segment) only."""
        segment = (position_ids == 0).cumsum(-1)
        same = segment[:, None, :, None] == segment[:, None, None, :]
        if self.attn_implementation == "sdpa":
            return same
        if self.attn_implementation == "eager":
            dtype = next(self.model.parameters()).dtype
            return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)
        raise ValueError(
            f"Encoder: packed batches for encoder models need attn_implementation 'sdpa' or 'eager', not "
            f"{self.attn_implementation!r}; use padded batches (Collator(mode='padded'))"
        )

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
    ) -> np.ndarray:
        """Embeddings ``[len(texts), D]`` float32, in the order of ``texts``.

        Texts are tokenized once, sorted by length (less padding) and run in eval mode without autograd.
        """
        ids = self.tokenize(texts, instruction, max_length)
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(ids), batch_size), desc="encode", disable=not show_progress):
                    index = order[start : start + batch_size]
                    batch = pad_sequences([ids[i] for i in index], self.text_tokenizer.pad_token_id)
                    out[index] = self(batch).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write weights (safetensors), tokenizer, sentence-transformers modules and ``f2llm_config.json``.

        ``dtype``: the weights' dtype on disk (None: as in memory). A trainer holding fp32 master weights saves a
        bf16 model this way without converting the model it trains.

        For decoders the saved tokenizer appends EOS itself (``add_eos_token``), so that sentence-transformers,
        which tokenizes with special tokens, gets exactly the ids of :meth:`encode`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if dtype is None or all(p.dtype == dtype for p in self.model.parameters()):
            self.model.save_pretrained(path)
        else:
            # Converted tensor by tensor on the CPU: no second copy of the model on its device.
            state = {
                k: v.detach().to("cpu", dtype) if v.is_floating_point() else v
                for k, v in self.model.state_dict().items()
            }
            self.model.save_pretrained(path, state_dict=state)
            # transformers writes the in-memory dtype into config.json; the files hold `dtype`.
            config_file = path / "config.json"
            saved = json.loads(config_file.read_text())
            saved["dtype"] = str(dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.model_max_length = self.max_length
        if self.is_decoder:
            tokenizer.add_eos_token = True
            probe = tokenizer("a").input_ids
            if not probe or probe[-1] != tokenizer.eos_token_id:
                raise ValueError(
                    f"Encoder.save_pretrained: could not make tokenizer {type(tokenizer).__name__} append EOS; "
                    "sentence-transformers would then pool a different token than Encoder.encode"
                )
        tokenizer.save_pretrained(path)
        self._write_sentence_transformers_files(path)
        config = {
            "format": F2LLM_CONFIG_FORMAT,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "query_instruction": self.query_instruction,
            "decoder": self.is_decoder,
        }
        (path / F2LLM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def _write_sentence_transformers_files(self, path: Path) -> None:
        """Transformer -> Pooling -> (Normalize), in the module format every sentence-transformers version reads."""
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            (path / "2_Normalize").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.embedding_dim,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        }
        pooling[_ST_POOLING_KEY[self.pooling]] = True
        (path / "1_Pooling").mkdir(exist_ok=True)
        prompts = {"query": format_query("", self.query_instruction), "document": ""} if self.query_instruction else {}
        files = {
            "modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "1_Pooling/config.json": pooling,
            "config_sentence_transformers.json": {
                "model_type": "SentenceTransformer",
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        }
        for name, content in files.items():
            (path / name).write_text(json.dumps(content, indent=2) + "\n")
