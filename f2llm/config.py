"""Training configuration: dataclasses read from YAML, with ``section.field=value`` command-line overrides.

Every key is checked: an unknown key or a value of the wrong type is an error naming the file, the key path and
what was expected, raised before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names where and why."""


@dataclass
class ModelConfig:
    """The encoder (see :class:`f2llm.model.Encoder`)."""

    name_or_path: str = ""
    pooling: Literal["last", "mean", "first"] | None = None  # None: last for decoders, mean for BERT-like
    max_length: int = 1024
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_implementation: str | None = None
    gradient_checkpointing: bool = True
    liger: bool | None = None  # None: on for CUDA


@dataclass
class SourceSettings:
    """Per-source settings replacing the built-in tables (f2llm.data.sources)."""

    kind: Literal["retrieval", "classification", "clustering"] | None = None
    instruction: str | None = None
    add_instruction: bool | None = None
    num_negatives: int | None = None


@dataclass
class DataConfig:
    """Training data in the F2LLM layout: one parquet / jsonl file per source."""

    paths: list[str] = field(default_factory=list)  # files, or directories holding one file per source
    sources: dict[str, SourceSettings] = field(default_factory=dict)
    batch_size: int = 16  # queries per rank per step (recipe: 16 x 32 GPUs = 512)
    validation_fraction: float = 0.01
    cache_dir: str = ".cache/f2llm/tokenized"
    packing: bool = False  # pack texts into rows of max_tokens (no padding FLOPs)
    max_tokens: int = 8192  # tokens per packed row
    seed: int = 42


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay clamped at min_lr (the recipe's schedule)."""

    lr: float = 8e-6
    min_lr: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    epochs: int = 2
    max_steps: int | None = None  # stop earlier than `epochs`
    grad_clip: float = 1.0


@dataclass
class GradCacheConfig:
    """Gradient cache: the step's texts are encoded in chunks (see f2llm.gradcache)."""

    enabled: bool = False
    chunk_texts: int = 64  # texts per chunk (padded), or
    chunk_tokens: int | None = None  # real tokens per chunk (packed); overrides chunk_texts when set


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    temperature: float = 0.05
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = None  # a DeepSpeed JSON; its ZeRO stage is used as is
    output_dir: str = "runs/f2llm"
    seed: int = 42
    log_every: int = 10
    validate_every: int = 5000
    save_every: int = 5000
    keep_last: int = 2
    resume: Literal["auto", "never"] | str = "auto"  # auto: newest checkpoint in output_dir; or a checkpoint path
    nan_policy: Literal["stop", "skip"] = "stop"
    tensorboard: bool = True
    plot: bool = True


# ------------------------------------------------------------------------------------------------ loading
def _check(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to ``annotation`` (dataclass, list, dict, tuple, Literal, Optional, scalar)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _build(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _check(v if v is not None else {}, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-5" (no dot) as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply ``key.path=value`` overrides, validate.

    Override values are parsed as YAML (``optim.lr=1e-5``, ``data.paths=[a.parquet,b.parquet]``,
    ``model.pooling=null``).
    """
    tree: dict = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: override {item!r}: expected key.path=value, e.g. optim.lr=1e-5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: override {item!r}: value is not valid YAML: {e}") from None
        _set_path(tree, key.strip(), value)
        where = f"{where} + overrides"
    try:
        config = _build(TrainConfig, tree, "")
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path is required")
    if not config.data.paths:
        raise ConfigError("data.paths is required (F2LLM-format files, or folders of them)")
    positive = {
        "data.batch_size": config.data.batch_size,
        "data.max_tokens": config.data.max_tokens,
        "model.max_length": config.model.max_length,
        "optim.epochs": config.optim.epochs,
        "grad_cache.chunk_texts": config.grad_cache.chunk_texts,
        "keep_last": config.keep_last,
        "log_every": config.log_every,
        "validate_every": config.validate_every,
        "save_every": config.save_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if config.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {config.temperature}")
    if not 0 <= config.data.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {config.data.validation_fraction}")
    if config.data.packing and config.data.max_tokens < config.model.max_length:
        raise ConfigError(
            f"data.max_tokens ({config.data.max_tokens}) must be >= model.max_length ({config.model.max_length}) "
            "so that the longest text fits in a packed row"
        )
    if config.optim.min_lr > config.optim.lr:
        raise ConfigError(f"optim.min_lr ({config.optim.min_lr}) must be <= optim.lr ({config.optim.lr})")
    if config.engine == "deepspeed" and not config.deepspeed_config:
        raise ConfigError("engine: deepspeed needs deepspeed_config (a DeepSpeed JSON, e.g. train/configs/zero2.json)")


def to_dict(config: TrainConfig) -> dict:
    """Plain-data form (for saving next to checkpoints and logs)."""
    return dataclasses.asdict(config)
