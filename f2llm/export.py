"""The saved model: one folder that ``transformers.AutoModel``, ``sentence_transformers.SentenceTransformer`` and
:meth:`f2llm.encoder.Encoder.load` all read, giving the same embeddings.

It holds the backbone's weights (safetensors) and config, the tokenizer (a decoder's appends EOS itself, so that
sentence-transformers tokenizes as :meth:`Encoder.encode` does), sentence-transformers' module files
(Transformer -> Pooling -> Normalize, with the query prompt) and ``f2llm_config.json`` (pooling, length,
normalization, instruction).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from f2llm.data import format_query

if TYPE_CHECKING:
    from f2llm.encoder import Encoder

F2LLM_CONFIG = "f2llm_config.json"
F2LLM_CONFIG_FORMAT = "f2llm-encoder-v1"
# sentence-transformers' Pooling modes for ours ("lasttoken" is how Qwen3-Embedding is saved).
ST_POOLING_KEY = {
    "last": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
}


def read_f2llm_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``f2llm_config.json`` of a folder :func:`save_encoder` wrote; refuses a folder it did not write."""
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
    return saved


def sentence_transformers_max_length(name_or_path: str | os.PathLike) -> int | None:
    """``max_seq_length`` of a local sentence-transformers folder (its embedding setting), or None."""
    config = Path(name_or_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None


def save_encoder(encoder: Encoder, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write weights (safetensors), tokenizer, sentence-transformers modules and ``f2llm_config.json``.

    ``dtype``: the weights' dtype on disk (None: as in memory). A trainer holding fp32 master weights saves a
    bf16 model this way without converting the model it trains.

    For decoders the saved tokenizer appends EOS itself (``add_eos_token``), so that sentence-transformers,
    which tokenizes with special tokens, gets exactly the ids of :meth:`Encoder.encode`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is None or all(p.dtype == dtype for p in encoder.model.parameters()):
        encoder.model.save_pretrained(path)
    else:
        # Converted tensor by tensor on the CPU: no second copy of the model on its device.
        state = {
            k: v.detach().to("cpu", dtype) if v.is_floating_point() else v
            for k, v in encoder.model.state_dict().items()
        }
        encoder.model.save_pretrained(path, state_dict=state)
        # transformers writes the in-memory dtype into config.json; the files hold `dtype`.
        config_file = path / "config.json"
        saved = json.loads(config_file.read_text())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.model_max_length = encoder.max_length
    if encoder.is_decoder:
        tokenizer.add_eos_token = True
        probe = tokenizer("a").input_ids
        if not probe or probe[-1] != tokenizer.eos_token_id:
            raise ValueError(
                f"save_encoder: could not make tokenizer {type(tokenizer).__name__} append EOS; "
                "sentence-transformers would then pool a different token than Encoder.encode"
            )
    tokenizer.save_pretrained(path)
    write_sentence_transformers_files(encoder, path)
    config = {
        "format": F2LLM_CONFIG_FORMAT,
        "pooling": encoder.pooling,
        "max_length": encoder.max_length,
        "normalize": encoder.normalize,
        "query_instruction": encoder.query_instruction,
        "decoder": encoder.is_decoder,
    }
    (path / F2LLM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_sentence_transformers_files(encoder: Encoder, path: Path) -> None:
    """Transformer -> Pooling -> (Normalize), in the module format every sentence-transformers version reads."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": encoder.embedding_dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    pooling[ST_POOLING_KEY[encoder.pooling]] = True
    (path / "1_Pooling").mkdir(exist_ok=True)
    instruction = encoder.query_instruction
    prompts = {"query": format_query("", instruction), "document": ""} if instruction else {}
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": encoder.max_length, "do_lower_case": False},
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
