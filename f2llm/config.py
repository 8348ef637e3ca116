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

from f2llm.data.sources import DEFAULT_NUM_NEGATIVES, KINDS, SourceOverride

# DeepSpeed JSON keys that f2llm fills from the training config (f2llm.engine.deepspeed_config).
DEEPSPEED_KEYS_OWNED = frozenset(
    {
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16",
        "fp16",
        "optimizer",
        "scheduler",
    }
)


# Queries per rank and step when neither data.batch_size nor data.global_batch_size is set (the recipe's 16 per GPU).
DEFAULT_BATCH_SIZE = 16


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names where and why."""


# The recipe configs and DeepSpeed JSONs of train/configs/, installed inside the package (pyproject.toml), so that a
# wheel trains with `f2llm train --config f2llm-0.6b` and no checkout.
SHIPPED_CONFIGS = "f2llm.configs"


def shipped_configs(suffix: str = ".yaml") -> dict[str, Path]:
    """The shipped files ending in ``suffix``, by file name."""
    from importlib import resources

    root = resources.files(SHIPPED_CONFIGS)
    return {item.name: Path(str(item)) for item in root.iterdir() if item.name.endswith(suffix)}


def find_config_file(value: str | Path, suffix: str, key: str, base: Path | None = None) -> Path:
    """The file ``value`` names: a path (as given, else relative to ``base``, the folder of the YAML that names it)
    or, for a bare name, a shipped file (``f2llm-0.6b`` or ``f2llm-0.6b.yaml``; ``zero2.json``). ``key`` names the
    setting in the error, which lists the shipped names."""
    path = Path(value).expanduser()
    candidates = [path]
    if base is not None and not path.is_absolute():
        candidates.append(base / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = shipped_configs(suffix)
    if path.parent == Path("."):
        for name in (path.name, path.name + suffix):
            if name in shipped:
                return shipped[name]
    where = f" (nor in {base})" if base is not None and not path.is_absolute() else ""
    names = ", ".join(sorted(Path(n).stem if suffix == ".yaml" else n for n in shipped))
    raise ConfigError(f"{key}: {value} does not exist{where} and is not a shipped config; shipped: {names}")


@dataclass
class LoraConfig:
    """LoRA adapters trained instead of the backbone's weights (peft; see f2llm.lora). final/ is the merged model."""

    r: int = 16  # rank of each adapter
    alpha: float = 32.0  # scaling = alpha / r
    dropout: float = 0.05  # dropout on each adapter's input
    # Names of the linear layers that get an adapter (last name component): Qwen3's attention and MLP projections.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    """The encoder (see :class:`f2llm.encoder.Encoder`)."""

    name_or_path: str = ""
    pooling: Literal["last", "mean", "first"] | None = None  # None: last for decoders, mean for BERT-like
    max_length: int = 1024
    # Compute dtype: auto = bf16 on CUDA, fp32 on CPU. bf16 trains with fp32 master weights and optimizer state
    # (engine ddp: the forward under torch.autocast; engine deepspeed: DeepSpeed's bf16 with fp32 partitions).
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    final_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # dtype of final/; auto = the compute dtype
    # None: flash_attention_2 for decoders on CUDA with flash-attn installed, else f2llm_varlen (torch's varlen
    # kernel, torch >= 2.13), else sdpa; sdpa for encoders, on CPU and for float32 compute.
    attn_implementation: str | None = None
    # Recompute activations in backward (transformers' name for it is the key's). true / false: in every forward with
    # grad / in none. auto: a forward with grad (the whole batch, or one gradient-cache chunk in its second pass)
    # recomputes only when its estimated saved activations (f2llm.recompute) exceed activation_budget_gb. Without a
    # budget on CUDA, the budget is derived from the device memory at start (f2llm.recompute.activation_budget); where
    # none is known (CPU, meta), auto recomputes in every forward, as true does: host memory is shared with everything
    # else on the machine and running out of it fails worse than recomputing does.
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    activation_budget_gb: float | None = None  # GiB of saved activations one forward may keep (auto only)
    liger: bool | None = None  # None: on for CUDA
    lora: LoraConfig | None = None  # None: full fine-tuning; a mapping (even {}): LoRA adapters only
    # ML-Embed's depth Matryoshka: the layers whose last-token (pooled) embeddings get the whole loss, e.g. [1, 2, 4,
    # 6] (layer k = the output of the k-th layer; the last layer is the full model and always trains). "ml-embed":
    # its rule, 1, 2, 4, 8, 16, 24, 32, 40, 48 up to the depth plus the last. Every exit's loss (Matryoshka levels
    # included) is summed and divided by the number of exits, as ML-Embed's total. None: the last layer only.
    layer_exits: Literal["ml-embed"] | list[int] | None = None
    # ML-Embed's embedding rank ("MEL", its r): the token-embedding matrix trains as U @ V from its truncated SVD at
    # this rank (f2llm.embedding_rank); final/ holds U @ V as the embedding matrix and the factors beside it. null:
    # the embedding matrix as it is.
    embedding_rank: int | None = None
    # ML-Embed's use_mel: each step trains with the first k factors, k drawn from 64, 128, 256, ... below
    # embedding_rank and embedding_rank itself, with probability proportional to k (the same k on every rank).
    sample_embedding_rank: bool = False


@dataclass
class DataConfig:
    """Training data in the F2LLM layout: one parquet / jsonl file per source."""

    paths: list[str] = field(default_factory=list)  # files, or directories holding one file per source
    sources: dict[str, SourceOverride] = field(default_factory=dict)  # per-source settings (f2llm.data.sources)
    # Negatives sampled per query and batch by source kind (kinds left out keep these defaults, v1's; F2LLM v2 sets
    # clustering: 9). A source's own sources.<name>.num_negatives wins.
    num_negatives: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_NUM_NEGATIVES))
    # The batch: queries per rank per step (recipe: 16 x 32 GPUs = 512), or queries per step over all ranks. Set
    # one of them (neither: batch_size 16). global_batch_size keeps a run's batches whatever its number of ranks:
    # each rank takes global_batch_size / ranks queries, so an elastic run that comes back with fewer nodes (or a
    # run moved from 32 GPUs to 16) resumes from its checkpoints. batch_size fixes the per-rank share, so the
    # global batch follows the number of ranks and a resume on another number is refused.
    batch_size: int | None = None
    global_batch_size: int | None = None
    validation_fraction: float = 0.01
    cache_dir: str = ".cache/f2llm/tokenized"
    packing: bool = False  # pack texts into rows of max_tokens (no padding FLOPs)
    max_tokens: int = 8192  # tokens per packed row
    # A source's last incomplete global batch: wrap (filled from the start of its shuffled rows, as the recipe's
    # accelerate `even_batches` does: no row is left out, a source smaller than one global batch still trains),
    # drop (every row of a batch distinct; a source smaller than one global batch never trains) or keep (the
    # official loop: on one process the short batch trains as it is; on several, accelerate's even_batches wraps
    # it, so keep is wrap there).
    last_batch: Literal["wrap", "drop", "keep"] = "wrap"
    # How each step picks its source. remaining: in proportion to the source's batches not yet used this epoch (a
    # seeded shuffle of all batches). fixed: the official F2LLM loop's rule, fixed weights (each source's batches
    # per epoch) among the sources not yet exhausted, so a large source's last batches run together at the end.
    source_draw: Literal["remaining", "fixed"] = "remaining"
    # At most this many rows of each source, a sample seeded by data.seed and the source name (the same rows on
    # every rank and at every resume), taken before the validation split; null: every row. F2LLM v2's
    # preprocessing samples 80,000 (its tokenize_data_qwen.py).
    max_rows_per_source: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        # A mapping naming some kinds keeps the defaults of the others (validate() refuses unknown kinds).
        self.num_negatives = {**DEFAULT_NUM_NEGATIVES, **self.num_negatives}

    def rank_batch_size(self, world_size: int) -> int:
        """Queries per rank and step on ``world_size`` ranks (see batch_size / global_batch_size above)."""
        if self.global_batch_size is None:
            return DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size
        if self.global_batch_size % world_size:
            fits = [d for d in range(1, self.global_batch_size + 1) if self.global_batch_size % d == 0]
            raise ConfigError(
                f"data.global_batch_size {self.global_batch_size} does not divide over {world_size} ranks; it divides "
                f"over {', '.join(map(str, fits))} ranks: launch one of these, or change data.global_batch_size"
            )
        return self.global_batch_size // world_size


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay clamped at min_lr (the recipe's schedule)."""

    lr: float = 8e-6
    min_lr: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    # steps: warmup_steps optimizer steps. per_process: warmup_steps / world_size, as the official F2LLM v1 code
    # ran it (accelerate stepped its scheduler once per process per optimizer step).
    warmup: Literal["steps", "per_process"] = "steps"
    epochs: int = 2
    max_steps: int | None = None  # stop earlier than `epochs`
    grad_clip: float = 1.0
    # cosine: warmup then cosine decay to min_lr (the recipe). constant_with_warmup: warmup then lr held constant
    # (F2LLM v2's other scheduler_type; as transformers' get_constant_schedule_with_warmup).
    schedule: Literal["cosine", "constant_with_warmup"] = "cosine"


@dataclass
class GradCacheConfig:
    """Gradient cache: the step's texts are encoded in chunks (see f2llm.gradcache)."""

    enabled: bool = False
    chunk_texts: int = 64  # texts per chunk (padded), or
    chunk_tokens: int | None = None  # real tokens per chunk (packed); overrides chunk_texts when set


@dataclass
class LossConfig:
    """The F2LLM loss (f2llm.loss.F2LLMLoss)."""

    temperature: float = 0.05
    # full: the in-batch term sends gradient to every positive of the global batch (textbook InfoNCE).
    # queries_only: no positive gets gradient from the in-batch term, as in the official F2LLM v1 code, whose
    # cross-GPU gather has no autograd (positives then learn from the hard-negative term only).
    in_batch_gradient: Literal["full", "queries_only"] = "full"
    # Matryoshka (F2LLM v2): prefix dims trained besides the full one (added always; dims >= it are ignored), each
    # level's terms weighted 1 / (n sqrt(D / d_n)) and summed. v2 ships every power of two from 8 below D.
    matryoshka_dims: list[int] | None = None


@dataclass
class SaveExtraConfig:
    """Model-only saves for checkpoint merging (f2llm merge): in the last ``last`` steps, every ``every`` steps (the
    steps that are multiples of ``every`` and > total - last), under output_dir/extra/step-N/, never rotated."""

    every: int = 500
    last: int = 2500


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (F2LLM v2, f2llm.distill): ``weight * kd`` is added to the loss, with kd the
    MSE between the student's raw (un-normalized) pooled embeddings and the teacher's truncated to the student's
    dimension. Exactly one of ``teacher`` (run live in every step) and ``embeddings`` (precomputed by
    ``f2llm encode --config``) is set."""

    teacher: str | None = None  # the teacher model (an f2llm folder or a Hugging Face model), its own tokenizer
    embeddings: str | None = None  # a parquet written by `f2llm encode --model T --config C --output PATH`
    weight: float = 1.0  # kd_weight of v2


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig | None = None  # None: no distillation
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = None  # a DeepSpeed JSON (engine: deepspeed); its ZeRO stage is used as is
    # A rank that waits longer than this in a collective (a peer died or hangs) ends the job with an error.
    dist_timeout_minutes: float = 30.0
    output_dir: str = "runs/f2llm"
    seed: int = 42
    log_every: int = 10
    validate_every: int = 5000
    save_every: int = 5000
    keep_last: int = 2
    save_extra: SaveExtraConfig | None = None  # None: no extra saves; F2LLM v2 uses {every: 500, last: 2500}
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
    base = None
    if path is not None:
        path = find_config_file(path, ".yaml", "--config")
        where, base = str(path), path.parent
        try:
            tree = yaml.safe_load(path.read_text()) or {}
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
        validate(config, base)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def validate(config: TrainConfig, base: Path | None = None) -> None:
    """Cross-field checks that types alone cannot express. ``base``: the folder of the YAML the config was read
    from, where a relative ``deepspeed_config`` is also looked for (after the working directory)."""
    _validate_lora_and_extra_saves(config)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path is required")
    if not config.data.paths:
        raise ConfigError("data.paths is required (F2LLM-format files, or folders of them)")
    if config.data.batch_size is not None and config.data.global_batch_size is not None:
        raise ConfigError(
            f"data.batch_size ({config.data.batch_size}, per rank) and data.global_batch_size "
            f"({config.data.global_batch_size}, over all ranks) are both set; set one (global_batch_size keeps the "
            "batch when the number of ranks changes, e.g. an elastic run resumed on fewer nodes)"
        )
    positive = {
        **{f"data.{k}": v for k in ("batch_size", "global_batch_size") if (v := getattr(config.data, k)) is not None},
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
    if config.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be > 0, got {config.loss.temperature}")
    _validate_negatives_and_distill(config)
    dims = config.loss.matryoshka_dims
    if dims is not None and (not dims or any(d <= 0 for d in dims)):
        raise ConfigError(
            f"loss.matryoshka_dims must be a non-empty list of positive ints (prefix dimensions, e.g. [64, 128, 256]; "
            f"the full one is added), got {dims}; use null to turn Matryoshka off"
        )
    exits = config.model.layer_exits
    if isinstance(exits, list):
        if not exits or any(k <= 0 for k in exits) or len(set(exits)) != len(exits):
            raise ConfigError(
                f"model.layer_exits must be distinct layer numbers >= 1 (1 = the first layer's output, e.g. [1, 2, 4, "
                f"6]), 'ml-embed', or null, got {exits}"
            )
    rank = config.model.embedding_rank
    if rank is not None and rank <= 0:
        raise ConfigError(f"model.embedding_rank must be > 0 (ML-Embed: 512) or null, got {rank}")
    if config.model.sample_embedding_rank and rank is None:
        raise ConfigError("model.sample_embedding_rank needs model.embedding_rank (the largest rank, e.g. 512)")
    if rank is not None and config.model.lora is not None:
        raise ConfigError(
            "model.embedding_rank and model.lora are both set: LoRA freezes the embedding factors; set one of them"
        )
    if exits is not None and config.distill is not None and config.distill.embeddings is not None:
        raise ConfigError(
            "model.layer_exits with distill.embeddings: precomputed teacher embeddings hold the teacher's last layer "
            "only, and every exit is distilled from the teacher's same exit; use distill.teacher (a live teacher)"
        )
    if config.dist_timeout_minutes <= 0:
        raise ConfigError(f"dist_timeout_minutes must be > 0, got {config.dist_timeout_minutes}")
    if config.model.activation_budget_gb is not None and config.model.activation_budget_gb <= 0:
        raise ConfigError(f"model.activation_budget_gb must be > 0 or null, got {config.model.activation_budget_gb}")
    if config.grad_cache.chunk_tokens is not None and config.grad_cache.chunk_tokens <= 0:
        raise ConfigError(f"grad_cache.chunk_tokens must be > 0 or null, got {config.grad_cache.chunk_tokens}")
    if config.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {config.optim.warmup_steps}")
    if config.optim.max_steps is not None and config.optim.max_steps <= 0:
        raise ConfigError(f"optim.max_steps must be > 0 or null, got {config.optim.max_steps}")
    cap = config.data.max_rows_per_source
    if cap is not None and cap <= 0:
        raise ConfigError(
            f"data.max_rows_per_source must be a positive number of rows (F2LLM v2: 80000) or null for all rows, "
            f"got {cap}"
        )
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
        raise ConfigError("engine: deepspeed needs deepspeed_config (a DeepSpeed JSON: a path, or zero0..zero3.json)")
    if config.engine == "deepspeed" and config.model.final_dtype == "float32" and config.model.dtype != "float32":
        raise ConfigError(
            "model.final_dtype: float32 with engine: deepspeed needs model.dtype: float32: with bf16 DeepSpeed "
            "trains bf16 weights (its fp32 master copy lives in the optimizer partitions), so a float32 final/ "
            "would only be bf16 weights widened; use engine: ddp (fp32 master weights) or final_dtype: auto"
        )
    if config.engine == "deepspeed":
        # Resolved once, here: the engine, the saved config and every rank then read the same file.
        path = find_config_file(config.deepspeed_config, ".json", "deepspeed_config", base).resolve()
        config.deepspeed_config = str(path)
        import json

        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from None
        if ds.get("zero_optimization", {}).get("compute_grad_norm", True) is False:
            raise ConfigError(
                f"deepspeed_config: {path} sets zero_optimization.compute_grad_norm: false; f2llm needs the gradient "
                "norm to find non-finite steps (and to log it); remove the key"
            )
        owned = sorted(set(ds) & DEEPSPEED_KEYS_OWNED)
        if owned:
            raise ConfigError(
                f"deepspeed_config: {path} sets {owned}, which f2llm fills from the training config "
                "(data.batch_size, optim.grad_clip, model.dtype; f2llm's AdamW and schedule); remove them"
            )


def _validate_lora_and_extra_saves(config: TrainConfig) -> None:
    lora = config.model.lora
    if lora is not None:
        if lora.r <= 0:
            raise ConfigError(f"model.lora.r must be > 0 (the adapters' rank, e.g. 16), got {lora.r}")
        if lora.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0 (scaling = alpha / r, e.g. 32), got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules must name at least one linear layer, e.g. [q_proj, v_proj]")
        blank = [t for t in lora.target_modules if not t.strip() or "." in t]
        if blank:
            raise ConfigError(
                f"model.lora.target_modules: {blank} are not layer names; give the last name component of the "
                "linear layers (q_proj, not model.layers.0.self_attn.q_proj)"
            )
        repeated = sorted({t for t in lora.target_modules if lora.target_modules.count(t) > 1})
        if repeated:
            raise ConfigError(f"model.lora.target_modules lists {repeated} more than once")
    extra = config.save_extra
    if extra is not None:
        for key, value in (("every", extra.every), ("last", extra.last)):
            if value <= 0:
                raise ConfigError(f"save_extra.{key} must be > 0 (or save_extra: null for none), got {value}")
        if extra.last < extra.every:
            raise ConfigError(
                f"save_extra.last ({extra.last}) must be >= save_extra.every ({extra.every}): the extra saves are the "
                "multiples of `every` among the last `last` steps, so a shorter window holds at most one"
            )


def _validate_negatives_and_distill(config: TrainConfig) -> None:
    per_kind = config.data.num_negatives
    unknown = sorted(set(per_kind) - set(KINDS))
    if unknown:
        raise ConfigError(f"data.num_negatives: unknown source kind(s) {unknown}; the keys are {list(KINDS)}")
    for kind, value in per_kind.items():
        if value < 0:
            raise ConfigError(f"data.num_negatives.{kind} must be >= 0 (0 = in-batch negatives only), got {value}")
    for name, override in config.data.sources.items():
        if override.num_negatives is not None and override.num_negatives < 0:
            raise ConfigError(f"data.sources.{name}.num_negatives must be >= 0, got {override.num_negatives}")
    distill = config.distill
    if distill is None:
        return
    if (distill.teacher is None) == (distill.embeddings is None):
        raise ConfigError(
            "distill: set exactly one of distill.teacher (a model run live in every step) and distill.embeddings "
            f"(a parquet from `f2llm encode --config`), got teacher={distill.teacher!r}, "
            f"embeddings={distill.embeddings!r}; use distill: null for no distillation"
        )
    if not distill.weight > 0:
        raise ConfigError(
            f"distill.weight must be > 0 (v2's kd_weight; distill: null turns distillation off), got {distill.weight}"
        )
    if distill.embeddings is not None and not Path(distill.embeddings).is_file():
        raise ConfigError(
            f"distill.embeddings: {distill.embeddings} does not exist; write it with `f2llm encode --model TEACHER "
            "--config TRAIN.yaml [key.path=value ...] --output FILE.parquet` (this run's config and overrides)"
        )
    if distill.teacher is not None and not distill.teacher.strip():
        raise ConfigError("distill.teacher is empty; give the teacher model's folder or hub name")


def to_dict(config: TrainConfig) -> dict:
    """Plain-data form (for saving next to checkpoints and logs)."""
    return dataclasses.asdict(config)
