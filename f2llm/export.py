"""The saved model: one folder that ``transformers.AutoModel``, ``sentence_transformers.SentenceTransformer`` and
:meth:`f2llm.encoder.Encoder.load` all read, giving the same embeddings.

It holds the backbone's weights (safetensors) and config, the tokenizer (a decoder's appends EOS itself, so that
sentence-transformers tokenizes as :meth:`Encoder.encode` does), sentence-transformers' module files
(Transformer -> Pooling -> [Dense: the first ``dim`` coordinates] -> Normalize, with the query prompt) and
``f2llm_config.json`` (pooling, length, normalization, instruction, ``dim``).

:func:`export_member` writes one member of a model trained with layer exits and Matryoshka dimensions (ML-Embed's
depth x width family): the backbone cut to its first k layers, the embedding to its first d coordinates.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from f2llm.data import format_query
from f2llm.embedding_rank import LowRankEmbedding, materialized_state_dict

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from f2llm.encoder import Encoder

F2LLM_CONFIG = "f2llm_config.json"
F2LLM_CONFIG_FORMAT = "f2llm-encoder-v1"
# sentence-transformers' Pooling modes for ours ("lasttoken" is how Qwen3-Embedding is saved).
ST_POOLING_KEY = {
    "last": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
}


def read_f2llm_config(path: str | os.PathLike, caller: str = "Encoder.load") -> dict[str, Any]:
    """The ``f2llm_config.json`` of a folder :func:`save_encoder` wrote; refuses a folder it did not write
    (``caller`` starts the message)."""
    config_file = Path(path) / F2LLM_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(
            f"{caller}: {config_file} not found; {path} was not written by Encoder.save_pretrained "
            "(use Encoder.from_pretrained for a plain Hugging Face model)"
        )
    saved = json.loads(config_file.read_text())
    if saved.get("format") != F2LLM_CONFIG_FORMAT:
        raise ValueError(
            f"{caller}: {config_file} has format {saved.get('format')!r}, expected {F2LLM_CONFIG_FORMAT!r}"
        )
    return saved


def sentence_transformers_max_length(name_or_path: str | os.PathLike) -> int | None:
    """``max_seq_length`` of a local sentence-transformers folder (its embedding setting), or None."""
    config = Path(name_or_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None


def save_encoder(
    encoder: Encoder,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write weights (safetensors), tokenizer, sentence-transformers modules and ``f2llm_config.json``.

    ``dtype``: the weights' dtype on disk (None: as in memory). A trainer holding fp32 master weights saves a
    bf16 model this way without converting the model it trains. ``extra_config``: more keys for
    ``f2llm_config.json`` (:func:`export_member`'s provenance).

    For decoders the saved tokenizer appends EOS itself (``add_eos_token``), so that sentence-transformers,
    which tokenizes with special tokens, gets exactly the ids of :meth:`Encoder.encode`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Low-rank embeddings (model.embedding_rank) are saved as the full matrix U @ V, which every loader reads, with
    # the factors beside it for a run that continues from this folder.
    state = materialized_state_dict(encoder.model, dtype)
    if state is None and dtype is not None and any(p.dtype != dtype for p in encoder.model.parameters()):
        # Converted tensor by tensor on the CPU: no second copy of the model on its device.
        state = {
            k: v.detach().to("cpu", dtype) if v.is_floating_point() else v
            for k, v in encoder.model.state_dict().items()
        }
    encoder.model.save_pretrained(path, state_dict=state)
    if state is not None and dtype is not None:
        # transformers writes the in-memory dtype into config.json; the files hold `dtype`.
        config_file = path / "config.json"
        saved = json.loads(config_file.read_text())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    embedding = encoder.model.get_input_embeddings()
    if isinstance(embedding, LowRankEmbedding):
        embedding.save_factors(path, dtype)
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
        "dim": encoder.dim,
    }
    config.update(extra_config or {})
    (path / F2LLM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_sentence_transformers_files(encoder: Encoder, path: Path) -> None:
    """Transformer -> Pooling -> (Dense) -> (Normalize), in the module format every sentence-transformers version
    reads. With ``encoder.dim``, Dense keeps the first ``dim`` coordinates of the pooled vector before Normalize."""
    hidden_size = encoder.model.config.hidden_size
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.dim is not None:
        write_cut_module(path / "2_Dense", hidden_size, encoder.dim)
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if encoder.normalize:
        idx = len(modules)
        folder = f"{idx}_Normalize"
        modules.append({"idx": idx, "name": str(idx), "path": folder, "type": "sentence_transformers.models.Normalize"})
        (path / folder).mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": hidden_size,
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


def write_cut_module(folder: Path, in_features: int, out_features: int) -> None:
    """A sentence-transformers ``Dense`` folder keeping the first ``out_features`` coordinates: weight = the first
    rows of the identity, no bias, no activation. Float32, whatever the backbone's dtype: sentence-transformers
    casts the modules after the Transformer to its dtype, and 0 / 1 weights make the cut exact in any of them."""
    folder.mkdir(parents=True, exist_ok=True)
    # Only the keys every Dense version accepts (later ones add module_input_name, use_residual, ... with defaults).
    config = {
        "in_features": in_features,
        "out_features": out_features,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight = torch.eye(out_features, in_features, dtype=torch.float32)
    save_file({"linear.weight": weight}, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------
# One member of a depth x width family (f2llm export)
# ----------------------------------------------------------------------------------------------------------
class ExportError(ValueError):
    """A member that cannot be exported as asked; the message names the setting, its valid range and the folder."""


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def export_member(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, layers: int | None = None, dim: int | None = None
) -> Path:
    """Write the member of a saved model that embeds with its exit-``layers`` embedding cut to ``dim`` coordinates.

    The exit-k embedding is the k-th layer's output (``hidden_states[k]``), through the final norm for a pre-norm
    decoder, pooled as the model pools; the member keeps its first ``dim`` coordinates and L2-normalizes them
    (when the model normalizes). Written as the backbone's first k layers (the final norm kept, so the truncated
    model's last hidden state is the exit-k one) with ``dim`` in ``f2llm_config.json`` and as a sentence-transformers
    ``Dense`` cut: :meth:`Encoder.load` and ``SentenceTransformer`` give the member's embeddings,
    ``transformers.AutoModel`` the exit-k hidden states (to pool, cut and normalize as the model does).

    Args:
        model_dir: a folder written by :meth:`Encoder.save_pretrained` (a training run's ``final/``).
        out_dir: the new folder; it must not exist or be empty.
        layers: k in [1, the model's layers]; None: all of them.
        dim: d in [1, the embedding dimension (the hidden size, or a ``dim`` the model was already cut to)];
            None: the model's own.

    Returns:
        ``out_dir``, whose ``f2llm_config.json`` records under ``exported_from`` the source folder, k and d.

    Raises:
        ExportError: before anything is written, when neither setting is given, one is out of range, ``out_dir``
            holds files, a decoder cut short has no final norm (``norm``) to apply, or the cut backbone does not
            reproduce the exit-k hidden states on a probe text.
        FileNotFoundError: ``model_dir`` was not written by :meth:`Encoder.save_pretrained`.
    """
    from transformers import AutoConfig

    from f2llm.encoder import Encoder

    source, out = Path(model_dir), Path(out_dir)
    if layers is None and dim is None:
        raise ExportError("export: give layers (--layers k), dim (--dim d) or both; with neither it is a plain copy")
    try:
        saved = read_f2llm_config(source, caller="export")
    except ValueError as e:
        raise ExportError(str(e)) from None
    config = AutoConfig.from_pretrained(source)
    num_layers, hidden_size = int(config.num_hidden_layers), int(config.hidden_size)
    saved_dim = saved.get("dim")
    if layers is not None and not 1 <= layers <= num_layers:
        raise ExportError(
            f"export: layers (--layers) must be in [1, {num_layers}] (the layers of {source}), got {layers}"
        )
    max_dim = saved_dim or hidden_size
    if dim is not None and not 1 <= dim <= max_dim:
        what = f"the dimension {source} is already cut to" if saved_dim else f"the hidden size of {source}"
        raise ExportError(f"export: dim (--dim) must be in [1, {max_dim}] ({what}), got {dim}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export: --out {out} exists and is not an empty folder; choose a new folder (or remove it)")

    # On the CPU in the stored dtype: no Liger patches or device copies in what is saved, no dtype round trip.
    stored = getattr(config, "dtype", None)
    dtype = getattr(torch, stored) if isinstance(stored, str) else stored
    encoder = Encoder.load(
        source,
        device="cpu",
        dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        liger=False,
        dim=dim if dim is not None else saved_dim,
    )
    keep = num_layers if layers is None else layers
    if keep < num_layers:
        # The cut model is checked against the definition on a probe text: a family whose layers depend on the
        # ones dropped, or that applies more after its last layer than `norm`, is refused instead of written.
        try:
            norm = encoder.final_norm()  # the one rule of which norm an exit goes through (None: BERT-like)
        except ValueError as e:
            raise ExportError(
                f"export: layers (--layers) {keep} < {num_layers} needs the final norm of {source}: {e}; only all "
                f"{num_layers} layers can be exported"
            ) from None
        probe = torch.tensor([encoder.tokenize([PROBE_TEXT])[0]])
        expected = exit_hidden_state(encoder.model, probe, keep, norm)
        truncate_layers(encoder.model, keep, where=str(source))
        with torch.no_grad():
            got = encoder.model(input_ids=probe).last_hidden_state
        # The same modules on the same input: equal up to rounding in the model's dtype, differences in a bad cut
        # are of the order of the states themselves.
        tolerance = 1e-4 if got.dtype == torch.float32 else 2e-2
        error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        if not error <= tolerance:
            raise ExportError(
                f"export: layers (--layers): the first {keep} layers of {source} ({type(encoder.model).__name__}) "
                f"do not give its exit-{keep} hidden states (relative error {error:.3g}); this model family cannot "
                "be cut"
            )
    provenance = {"path": str(source.resolve()), "layers": keep, "dim": encoder.dim}
    if "exported_from" in saved:
        provenance["source_exported_from"] = saved["exported_from"]
    save_encoder(encoder, out, extra_config={"exported_from": provenance})
    return out


def exit_hidden_state(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: int, norm: nn.Module | None
) -> torch.Tensor:
    """The exit-``layers`` hidden states of ``model`` by definition: ``hidden_states[layers]``, through ``norm``
    (a decoder's final norm, :meth:`Encoder.final_norm`) below the last layer, whose own output
    (``last_hidden_state``) has it."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
        if layers == model.config.num_hidden_layers:
            return out.last_hidden_state
        hidden = out.hidden_states[layers]
        return norm(hidden) if norm is not None else hidden


def truncate_layers(model: PreTrainedModel, layers: int, *, where: str = "the model") -> None:
    """Keep the first ``layers`` layers of a backbone, in place, with a config that describes them.

    A decoder keeps its final norm (``model.norm``), through which an intermediate exit goes as the last layer's
    output does; BERT-like (post-LN) encoders have none, their layer outputs being normalized already.
    """
    num_layers = int(model.config.num_hidden_layers)
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) == num_layers
        and all(isinstance(layer, GradientCheckpointingLayer) for layer in m)
    ]
    if len(stacks) != 1:
        raise ExportError(
            f"export: layers (--layers): found {len(stacks)} lists of {num_layers} layers in {type(model).__name__} "
            f"of {where}, expected one; this model family cannot be cut"
        )
    del stacks[0][layers:]
    config = model.config
    config.num_hidden_layers = layers
    # Per-layer settings: Qwen3 (and most decoders) list every layer's attention type and validate the length.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    # Layers from max_window_layers on slide; capping it at the new depth keeps the kept layers' attention.
    if isinstance(getattr(config, "max_window_layers", None), int) and config.max_window_layers > layers:
        config.max_window_layers = layers
