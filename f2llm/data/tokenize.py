"""Text -> token ids, the same way for training data and for :meth:`f2llm.encoder.Encoder.encode`.

Two rules, chosen by the model type (:func:`is_decoder_model_type`):

* decoders (a causal-LM model type without a masked-LM head, e.g. Qwen3, Llama, Mistral): the recipe's
  ``tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length - 1).input_ids + [eos]``.
  EOS is always the last token, also after truncation, and it is what last-token pooling reads.
* encoders (every model type with a masked-LM head, e.g. BERT, RoBERTa, MiniLM, ModernBERT): the tokenizer's own
  special tokens (``[CLS] ... [SEP]``), truncated to ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from f2llm._tokenize_worker import EncoderSpec, FastEncoder, clip_text


def is_decoder_model_type(model_type: str) -> bool:
    """True for decoder-only LLMs: the model type has a causal-LM class and no masked-LM class.

    BERT-like encoders register both (``BertLMHeadModel`` and ``BertForMaskedLM``), Qwen3/Llama only the first.
    """
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TextTokenizer:
    """Tokenizes texts for an embedding model.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        max_length: tokens per text, special tokens included.
        append_eos: the decoder rule (see the module docstring); False for the encoder rule.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, append_eos: bool) -> None:
        if max_length < 2:
            raise ValueError(f"TextTokenizer: max_length must be >= 2 (one text token + EOS), got {max_length}")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError(
                f"TextTokenizer: the decoder rule appends EOS but tokenizer {tokenizer.name_or_path!r} has no "
                "eos_token; set tokenizer.eos_token before building the encoder"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.append_eos = append_eos
        # Tokenizing a huge text only to keep max_length tokens costs memory and time in proportion to the text
        # (a 10 MB row: ~2 GB, 10-20 s). A token spans at most the longest vocabulary entry, so a piece of
        # max_length x longest characters holds max_length tokens; 4x that (at least 16 characters a token) leaves
        # room for normalization, and the cut falls on a whitespace so no word is split.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
        self._clip_chars = 4 * (max_length + 1) * max(16, longest)
        # A private copy of the Rust tokenizer with fixed truncation: transformers rewrites the shared backend's
        # truncation on every call, and the copy's encode_batch_fast (no offsets) is ~1.7x faster than a call.
        # The copy's rule (f2llm._tokenize_worker) is what the data preparation's worker processes run too.
        self._backend: FastEncoder | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            copy = Tokenizer.from_str(backend.to_str())
            copy.no_padding()
            copy.enable_truncation(max_length - 1 if append_eos else max_length, direction=tokenizer.truncation_side)
            self._backend = FastEncoder(
                EncoderSpec(
                    definition=copy.to_str(),
                    add_special_tokens=not append_eos,
                    eos_token_id=tokenizer.eos_token_id if append_eos else None,
                    clip_chars=self._clip_chars,
                    truncation_side=tokenizer.truncation_side,
                )
            )

    def worker_spec(self) -> EncoderSpec | None:
        """What a worker process needs to tokenize exactly as this tokenizer does (f2llm.data.prepare's pool), or
        None when it cannot: no Rust backend, or a subclass that changes ``__call__`` (its rule is its own)."""
        if self._backend is None or type(self).__call__ is not TextTokenizer.__call__:
            return None
        return self._backend.spec

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """Id written at padded positions; never read by attention or pooling, so any valid id works."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, at most ``max_length`` each."""
        if not texts:
            return []
        if self._backend is not None:
            return self._backend(texts)
        texts = [clip_text(t, self._clip_chars, self.tokenizer.truncation_side) for t in texts]
        ids = self.tokenizer(
            texts,
            add_special_tokens=not self.append_eos,
            truncation=True,
            max_length=self.max_length - 1 if self.append_eos else self.max_length,
            return_attention_mask=False,
        )["input_ids"]
        if self.append_eos:
            eos = self.tokenizer.eos_token_id
            for row in ids:
                row.append(eos)
        return ids

    def identity(self) -> str:
        """Hash of everything that decides the ids: vocabulary, normalization, special tokens, rule, max_length."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            definition = json.loads(backend.to_str())
            # Truncation / padding are call-time settings that transformers writes into the backend on every call.
            definition.pop("truncation", None)
            definition.pop("padding", None)
            definition = json.dumps(definition, sort_keys=True)
        else:
            definition = json.dumps(sorted(self.tokenizer.get_vocab().items()))
        h = hashlib.sha256()
        for part in (
            type(self.tokenizer).__name__,
            definition,
            json.dumps(self.tokenizer.all_special_tokens),
            str(self.tokenizer.eos_token_id),
            f"append_eos={self.append_eos}",
            f"max_length={self.max_length}",
        ):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()
