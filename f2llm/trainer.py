"""The F2LLM training loop: torchrun + an engine (f2llm.engine: DDP or DeepSpeed ZeRO 0-3), gradient cache, checkpoints.

Read top to bottom: :meth:`Trainer.from_config` sets up (process group, encoder, data, engine, resume), then
:meth:`Trainer.train` runs steps. One step, on every rank:

1. the sampler gives this rank's share of a global batch, every rank from the same source;
2. the texts (queries, positives, negatives) are encoded, in one forward or in gradient-cache chunks (every rank
   runs the same number of chunks);
3. :class:`f2llm.loss.F2LLMLoss`: hard-negative loss always, in-batch loss (positives gathered from every rank)
   for retrieval sources; with ``distill``, plus ``weight * kd`` against a frozen teacher (f2llm.distill);
4. backward, then the engine clips, updates and advances the warmup + cosine schedule; metrics, validation and
   checkpoints follow.

A non-finite loss or gradient norm stops the run (naming the step and the source) or skips the step, as
``nan_policy`` says; all ranks agree before acting, so none is left waiting in a collective. Both are checked at
once, where the engine can still refuse the update: one all-reduce and one host read per step.

Activation checkpointing (``model.gradient_checkpointing``) is decided per forward with grad by
:class:`CheckpointPolicy`: forced on or off, or (auto) only when the forward's estimated saved activations exceed
the budget, and then just enough of its first layers to fit. The decision reads only the batch's shape, so it costs
no host sync and works on the meta device.
Under DDP and ZeRO 0-2 checkpointing changes no collective (the same gradients are reduced in the same order; a
recomputed forward holds none), so ranks may decide differently, e.g. for chunks of different sizes. ZeRO-3
gathers a layer's parameters again when it recomputes it: there every rank checkpoints, in each forward with grad,
the most layers any rank's policy asks for (one small all-reduce per forward), so all ranks run the same gathers.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from f2llm import distributed
from f2llm.checkpoint import (
    CheckpointWriter,
    fsync_dir,
    fsync_tree,
    latest_checkpoint,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from f2llm.config import TrainConfig, to_dict
from f2llm.data import (
    Collator,
    EncoderBatch,
    F2LLMBatchSampler,
    TextTokenizer,
    TokenizedSource,
    TrainingBatch,
    load_sources,
)
from f2llm.distill import Teacher, build_teacher, distill_loss
from f2llm.engine import Engine, NonFiniteError, WarmupCosine, build_engine, resolve_dtype, weights_dtype
from f2llm.gradcache import GradientCache, chunk_by_tokens, split_to_count
from f2llm.lora import LoraAdapter, merged_encoder
from f2llm.loss import F2LLMLoss, LossOutput
from f2llm.model import Encoder

__all__ = ["CheckpointPolicy", "NonFiniteError", "Runtime", "Trainer", "WarmupCosine", "init_runtime", "train"]


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if distributed.is_distributed():
            dist.barrier()

    def any_failed(self, failed: bool) -> bool:
        """True on every rank when any rank passes True (one all-reduce; no-op in a single process)."""
        return self.max(int(failed)) > 0

    def failed_anywhere(self, flags: torch.Tensor) -> list[bool]:
        """Each flag of a bool vector OR-ed over the ranks, on every rank: one all-reduce, one host read."""
        flags = flags.to(self.device, torch.int64)
        if distributed.is_distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    def max(self, value: int) -> int:
        """The largest ``value`` of all ranks, on every rank (one all-reduce; no-op in a single process)."""
        if not distributed.is_distributed():
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def init_runtime(timeout_minutes: float = 30.0, group_of_one: bool = False) -> Runtime:
    """Join the torchrun process group (when launched by torchrun) and pick this rank's device.

    A rank that waits longer than ``timeout_minutes`` in a collective raises instead of hanging forever.
    ``group_of_one``: a single process started without torchrun gets a process group of its own (DeepSpeed
    needs one even alone).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if (world > 1 or group_of_one) and not distributed.is_distributed():
        if "MASTER_ADDR" not in os.environ:  # started without a launcher: what torchrun would set for one process
            alone = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.update(alone, MASTER_PORT=str(distributed.free_port()))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return Runtime(distributed.rank(), distributed.world_size(), device)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ metrics
class MetricLogger:
    """Rank 0 writes metrics.jsonl and (optionally) TensorBoard scalars; other ranks write nothing.

    :meth:`start` is called with the step a run starts from: a resumed run first drops what the killed run logged
    after its last checkpoint (those steps run again), so every step is in the log once.
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.writer = None

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
            tmp = self.path.with_name(f".tmp-{self.path.name}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of steps after the checkpoint that an earlier run wrote.
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill counts as after every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_loss_curve(metrics_file: Path, out: Path) -> None:
    """PNG of training (and validation) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [("train/loss", "-"), ("train/hard", ":"), ("train/in_batch", "--"), ("train/kd", "-.")]
    curves.append(("val/loss", "o-"))
    for key, style in curves:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("f2llm training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------ checkpointing
# Share of the free device memory (after the weights and the training state the first step will allocate) that one
# forward's saved activations may take. The estimate counts saved tensors only; the rest is the backward's own
# transient buffers (gradients of the activations of the layer being differentiated, its recompute when it is
# checkpointed, attention and matmul workspaces), the caching allocator's fragmentation under shapes that change
# every step (commonly 10-20%), collective buffers (NCCL, DeepSpeed's reduce buckets), the embeddings and loss.
ACTIVATION_MEMORY_SHARE = 0.7


@dataclass
class CheckpointPolicy:
    """Which layers of a forward with grad recompute their activations in backward (``model.gradient_checkpointing``).

    ``mode`` True / False: every layer / none. ``"auto"``: none while ``activation_bytes(tokens)`` (the forward's
    estimated saved activations, for its input positions, padding included) fits ``budget`` bytes; beyond, just
    enough of the first layers to fit (``layer_saving``: the layers and the per-token bytes checkpointing one
    saves; without it, every layer). Each checkpointed layer costs one more forward of that layer: the fewer, the
    less recompute. With no budget known, every layer (as True).
    """

    mode: Literal["auto"] | bool
    budget: int | None
    activation_bytes: Callable[[int], int]
    budget_source: str = "model.activation_budget_gb"
    layer_saving: tuple[int, int] | None = None

    def __call__(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` input positions checkpoints any layer."""
        layers = self.layers(tokens)
        return layers is True or layers > 0

    def layers(self, tokens: int) -> bool | int:
        """What a forward of ``tokens`` positions checkpoints: True (every layer), False (none) or the first k."""
        if self.mode != "auto":
            return bool(self.mode)
        if self.budget is None:
            return True
        excess = self.activation_bytes(tokens) - self.budget
        if excess <= 0:
            return False
        n_layers, saving = self.layer_saving or (0, 0)
        if saving <= 0:
            return True
        k = -(-excess // (saving * max(1, tokens)))
        return True if k >= n_layers else int(k)

    def summary(self) -> str:
        if self.mode != "auto":
            return f"gradient checkpointing {'on' if self.mode else 'off'} in every forward with grad"
        fixed, per_token = self.activation_bytes(0), self.activation_bytes(1) - self.activation_bytes(0)
        head = (
            f"gradient checkpointing auto: ~{per_token / 2**10:,.1f} KiB of saved activations per token "
            f"(+{fixed / 2**20:,.1f} MiB per forward)"
        )
        if self.budget is None:
            return f"{head}, no memory budget known ({self.budget_source}): every forward with grad checkpoints"
        limit = max(0, self.budget - fixed) // max(1, per_token)
        text = (
            f"{head}, budget {self.budget / 2**30:,.2f} GiB ({self.budget_source}): forwards of more than "
            f"{limit:,} tokens checkpoint"
        )
        saving = (self.layer_saving or (0, 0))[1]
        if saving > 0:
            text += f" just enough of their first layers to fit (~{saving / 2**10:,.1f} KiB/token saved per layer)"
        return text


def activation_budget(engine: Engine, device: torch.device) -> int | None:
    """Bytes of saved activations one forward may keep, from this rank's free device memory now (weights, and
    DeepSpeed's master partitions, already in it) less the training state its first step allocates
    (:meth:`Engine.step_state_bytes`), times :data:`ACTIVATION_MEMORY_SHARE`. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free to torch's allocator
    return budget_from_free_memory(free + cached, engine.step_state_bytes())


def budget_from_free_memory(free: int, step_state: int) -> int:
    """The activation budget of a rank with ``free`` bytes of device memory once its weights are loaded, whose first
    step will allocate ``step_state`` more (:meth:`Engine.step_state_bytes`): :data:`ACTIVATION_MEMORY_SHARE` of
    what is left. Also what benchmarks/bench_train_step.py --config budgets a GPU of a given size with."""
    return max(0, int(ACTIVATION_MEMORY_SHARE * (free - step_state)))


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class StepResult:
    loss: LossOutput
    grad_norm: torch.Tensor  # 0-dim, not read back until logged: reading it would wait for the update
    tokens: int
    lr: float
    kd: torch.Tensor | None = None  # distillation term (unweighted; loss.total includes weight * kd), None: off


@dataclass
class Trainer:
    """Holds everything a run needs; build it with :meth:`from_config`."""

    config: TrainConfig
    runtime: Runtime
    engine: Engine
    sampler: F2LLMBatchSampler
    validation: F2LLMBatchSampler | None
    collator: Collator
    loss_fn: F2LLMLoss
    total_steps: int
    step: int = 0
    logger: MetricLogger | None = None
    checkpoints: CheckpointWriter | None = None
    history: list[dict] = field(default_factory=list)
    checkpointing: CheckpointPolicy | None = None  # None: built from the config on first use
    teacher: Teacher | None = None  # distill: the frozen teacher's targets (f2llm.distill)
    lora: LoraAdapter | None = None  # model.lora: the peft adapters the encoder trains

    @property
    def encoder(self) -> Encoder:
        return self.engine.encoder

    def checkpoint_policy(self) -> CheckpointPolicy:
        """The run's :class:`CheckpointPolicy`, built (and said, on rank 0) once: the budget is
        ``model.activation_budget_gb``, or on CUDA derived from the device memory (:func:`activation_budget`)."""
        if self.checkpointing is None:
            model, encoder, dtype = self.config.model, self.encoder, self.engine.compute_dtype
            budget, source = None, "model.activation_budget_gb"
            if model.activation_budget_gb is not None:
                budget = int(model.activation_budget_gb * 2**30)
            elif model.gradient_checkpointing == "auto":
                budget = activation_budget(self.engine, self.runtime.device)
                source = (
                    f"{ACTIVATION_MEMORY_SHARE:.0%} of the free device memory after weights, gradients and AdamW state"
                    if budget is not None
                    else f"not set, and none derived on {self.runtime.device.type}"
                )
            saving = encoder.layer_checkpoint_saving(dtype) if budget is not None else None
            self.checkpointing = CheckpointPolicy(
                model.gradient_checkpointing, budget, lambda n: encoder.activation_bytes(n, dtype), source, saving
            )
            if self.runtime.main:
                print(f"f2llm: {self.checkpointing.summary()}")
        return self.checkpointing

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: TrainConfig, runtime: Runtime | None = None) -> Trainer:
        runtime = runtime or init_runtime(config.dist_timeout_minutes, group_of_one=config.engine == "deepspeed")
        seed_everything(config.seed + runtime.rank)  # dropout differs across ranks, data order does not
        out = Path(config.output_dir)
        encoder = Encoder.from_pretrained(
            config.model.name_or_path,
            pooling=config.model.pooling,
            max_length=config.model.max_length,
            dtype=weights_dtype(config, runtime.device),
            attn_implementation=config.model.attn_implementation,
            liger=config.model.liger if runtime.device.type == "cuda" else False,
            device=runtime.device,
            compute_dtype=resolve_dtype(config.model.dtype, runtime.device),
        ).train()
        lora = None
        if config.model.lora is not None:  # before the engine: its optimizer and DDP / DeepSpeed see the adapters only
            settings = config.model.lora
            lora = LoraAdapter.apply(
                encoder, settings.r, settings.alpha, settings.dropout, settings.target_modules, seed=config.seed,
                where=config.model.name_or_path,
            )  # fmt: skip

        sources = training_sources(config, encoder.text_tokenizer)
        sampling = dict(
            world_size=runtime.world_size,
            rank=runtime.rank,
            seed=config.data.seed,
            last_batch=config.data.last_batch,
            source_draw=config.data.source_draw,
        )
        sampler = F2LLMBatchSampler(sources, config.data.batch_size, epochs=config.optim.epochs, **sampling)
        validation = validation_sampler(config, sources, runtime, sampling)
        total_steps = len(sampler) if config.optim.max_steps is None else min(config.optim.max_steps, len(sampler))
        engine = build_engine(config, encoder, total_steps, runtime.world_size)

        trainer = cls(
            config=config,
            runtime=runtime,
            engine=engine,
            sampler=sampler,
            validation=validation,
            collator=Collator(
                pad_token_id=encoder.text_tokenizer.pad_token_id,
                mode="packed" if config.data.packing else "padded",
                max_tokens=config.data.max_tokens,
            ),
            # The sampler gives every rank the same number of queries: the loss need not exchange batch sizes.
            loss_fn=F2LLMLoss(
                config.loss.temperature,
                in_batch_gradient=config.loss.in_batch_gradient,
                equal_batches=True,
                matryoshka_dims=config.loss.matryoshka_dims,
            ),
            total_steps=total_steps,
            logger=MetricLogger(out, runtime.main, config.tensorboard),
            checkpoints=CheckpointWriter(out / "checkpoints", config.keep_last, runtime.rank, runtime.any_failed),
            lora=lora,
        )
        if runtime.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
            for line in [*sampler.summary(), *(validation.summary() if validation else [])]:
                print(f"f2llm: {line}")
            print(f"f2llm: {engine.communication(chunked=config.grad_cache.enabled)}")
            if lora is not None:
                trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
                total = sum(p.numel() for p in encoder.parameters())
                print(
                    f"f2llm: LoRA r={config.model.lora.r} on {config.model.lora.target_modules}: {trainable:,} "
                    f"trainable of {total:,} parameters; final/ is the merged model, final/adapter/ the adapter"
                )
            if config.loss.matryoshka_dims is not None:
                print(f"f2llm: {trainer.loss_fn.matryoshka_summary(encoder.embedding_dim)}")
        if config.distill is not None:  # loaded before the memory budget is measured, and checked before any step
            trainer.teacher = build_teacher(
                config, sources, encoder, runtime.device, resolve_dtype(config.model.dtype, runtime.device),
                trainer.collator,
            )  # fmt: skip
            if runtime.main:
                source, weight = config.distill.teacher or config.distill.embeddings, config.distill.weight
                print(f"f2llm: distillation from {source} (dimension {trainer.teacher.dim}), kd weight {weight}")
        trainer.checkpoint_policy()  # measured now, before any step has allocated gradients or optimizer state
        trainer.maybe_resume()
        return trainer

    # ---------------------------------------------------------------------------------------------- one step
    def chunks(self, seqs: list[np.ndarray]) -> list[EncoderBatch]:
        """The gradient cache's chunks of a step's texts, in order: by text count, or by real tokens.

        Every rank gets the same number of chunks: by text count it is the same by construction (every rank has
        the same number of texts); by tokens the ranks agree on the largest count (one small all-reduce) and the
        others split their chunks further (f2llm.gradcache.split_to_count).
        """
        gc = self.config.grad_cache
        if gc.chunk_tokens is None:
            groups = [seqs[i : i + gc.chunk_texts] for i in range(0, len(seqs), gc.chunk_texts)]
        else:
            groups = chunk_by_tokens(seqs, gc.chunk_tokens)
            groups = split_to_count(groups, self.runtime.max(len(groups)))
        return [self.collator(g) for g in groups]

    def embed(self, seqs: list[np.ndarray]) -> torch.Tensor:
        """Embeddings of texts without autograd, in the step's chunks (validation: a training step's memory)."""
        if not self.config.grad_cache.enabled:
            return self.engine.forward(self.collator(seqs))
        return torch.cat([self.engine.forward(chunk) for chunk in self.chunks(seqs)])

    def batch_loss(self, emb: torch.Tensor, batch: TrainingBatch) -> LossOutput:
        """F2LLMLoss of a batch's embeddings (queries, positives, negatives row-major, as sequences() orders them)."""
        B, k = batch.batch_size, batch.num_negatives
        q, p = emb[:B], emb[B : 2 * B]
        n = emb[2 * B :].reshape(B, k, emb.shape[-1])
        return self.loss_fn(q, p, n, in_batch=batch.kind == "retrieval")

    def compute_loss(self, emb: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, LossOutput]:
        out = self.batch_loss(emb, batch)
        return out.total, out

    def compute_distill_loss(
        self, raw: torch.Tensor, batch: TrainingBatch, target: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[LossOutput, torch.Tensor]]:
        """v2's total with distillation: the contrastive loss of the normalized embeddings plus ``weight * kd`` of
        the raw ones (``raw``: the student's un-normalized pooled embeddings; ``target``: the teacher's)."""
        out = self.batch_loss(torch.nn.functional.normalize(raw, dim=-1), batch)
        kd = distill_loss(raw, target, batch.batch_size, batch.num_negatives)
        total = out.total + self.config.distill.weight * kd
        return total, (out._replace(total=total), kd)

    def check_finite(self, values: dict[str, torch.Tensor], batch: TrainingBatch) -> None:
        """Raise NonFiniteError on every rank when any of ``values`` (name -> tensor) is non-finite on any rank,
        naming the first such (a non-finite loss makes the gradient norm non-finite too): one all-reduce and one
        host read for all of them. Tensors on the meta device hold no values: nothing to check."""
        values = {k: v for k, v in values.items() if v.device.type != "meta"}
        if not values:
            return
        device = self.runtime.device
        flags = torch.stack([~torch.isfinite(v.detach().float()).all().to(device) for v in values.values()])
        failed = [name for name, bad in zip(values, self.runtime.failed_anywhere(flags), strict=True) if bad]
        if failed:
            raise NonFiniteError(
                f"non-finite {failed[0]} at step {self.step + 1} (epoch {batch.epoch}, step {batch.step} of the "
                f"epoch), source {batch.source!r}, rows {batch.rows[:8].tolist()}..."
            )

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """The engine's forward, checkpointed when it builds a graph and the policy says so for its size (input
        positions, padding included: a shape, known without reading the device)."""
        grad = torch.is_grad_enabled()
        layers = self.checkpoint_policy().layers(batch.input_ids.numel()) if grad else False
        if grad and self.engine.gathers_parameters:
            # A recomputed layer gathers its parameters again: one rank recomputing alone would leave the others'
            # collectives unmatched. Every rank checkpoints the most layers any rank asks for (budgets and chunks
            # differ across ranks).
            total = self.encoder.num_checkpoint_layers
            count = self.runtime.max(total if layers is True else int(layers))
            layers = count if count < total else True
        with self.encoder.checkpointing(layers):
            return self.engine.forward(batch)

    def train_step(self, batch: TrainingBatch) -> StepResult:
        engine = self.engine
        seqs = batch.sequences()
        lr = engine.lr  # the rate this step's update uses
        if self.teacher is not None:
            return self.distill_step(batch, seqs, lr)
        if self.config.grad_cache.enabled:
            cache = GradientCache(self.forward, engine.no_sync, engine.backward, device=self.runtime.device)
            out = cache.step(self.chunks(seqs), lambda emb: self.compute_loss(emb, batch)).aux
        else:
            total, out = self.compute_loss(self.forward(self.collator(seqs)), batch)
            engine.backward(total)
        # Loss and gradient norm checked together, before the engine updates (DeepSpeed ZeRO-1/2/3: after its
        # step, which refuses a non-finite update itself).
        grad_norm = engine.step(lambda norm: self.check_finite({"loss": out.total, "gradient norm": norm}, batch))
        return StepResult(loss=detach_loss(out), grad_norm=grad_norm, tokens=sum(map(len, seqs)), lr=lr)

    def distill_step(self, batch: TrainingBatch, seqs: list[np.ndarray], lr: float) -> StepResult:
        """:meth:`train_step` with distillation: the student's forwards give raw pooled embeddings (normalized here
        for the contrastive loss, so both terms get gradient), the teacher's targets come first, without grad (with
        the gradient cache: in the chunks of pass 1, kept for the step), and kd joins the loss whose gradient the
        cache keeps."""
        engine = self.engine
        with self.encoder.raw_embeddings():
            if self.config.grad_cache.enabled:
                chunks = self.chunks(seqs)
                target = self.teacher.embed(batch, [c.num_texts for c in chunks])
                cache = GradientCache(self.forward, engine.no_sync, engine.backward, device=self.runtime.device)
                out, kd = cache.step(chunks, lambda raw: self.compute_distill_loss(raw, batch, target)).aux
            else:
                target = self.teacher.embed(batch, [len(seqs)])
                total, (out, kd) = self.compute_distill_loss(self.forward(self.collator(seqs)), batch, target)
                engine.backward(total)
        grad_norm = engine.step(lambda norm: self.check_finite({"loss": out.total, "gradient norm": norm}, batch))
        return StepResult(detach_loss(out), grad_norm, sum(map(len, seqs)), lr, kd=kd.detach())

    def skip_step(self) -> None:
        """Drop this step's gradients; the schedule still advances so it stays aligned with the data."""
        self.engine.skip()

    # ---------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.validation is None:
            return None
        self.engine.train(False)
        totals = torch.zeros(4, dtype=torch.float64)
        try:
            for step in range(self.validation.steps_per_epoch):
                batch = self.validation.batch_at(0, step)
                out = self.batch_loss(self.embed(batch.sequences()), batch)
                totals += torch.tensor([*map(float, out), 1.0], dtype=torch.float64)
        finally:
            self.engine.train(True)
        if distributed.is_distributed():
            dist.all_reduce(totals)
        n = max(1.0, float(totals[3]))
        return {f"val/{name}": float(totals[i]) / n for i, name in enumerate(("loss", "hard", "in_batch"))}

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        def write(folder: Path) -> None:
            self.engine.save(folder, self.runtime.main)
            if self.runtime.main:
                state = {"step": self.step, "sampler": self.sampler.state_dict(), "world_size": self.runtime.world_size}
                (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
            save_state(rng_state(), folder / f"rng-rank{self.runtime.rank}.pt")

        return self.checkpoints.save(self.step, write)

    def maybe_resume(self) -> None:
        """Continue from a checkpoint: weights, optimizer state, data position and RNG come from it; the schedule is
        rebuilt from the current config at the checkpoint's step (a changed max_steps / epochs takes effect)."""
        resume = self.config.resume
        if resume == "never":
            return
        path = latest_checkpoint(Path(self.config.output_dir) / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            return
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"resume: {path} is not a complete f2llm checkpoint (no trainer_state.json)")
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != self.runtime.world_size:
            raise ValueError(
                f"resume: {path} was written by {state['world_size']} ranks, this run has {self.runtime.world_size}; "
                "resume with the same number of processes"
            )
        self.engine.load(path)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.engine.set_schedule_step(self.step)
        set_rng_state(load_state(path / f"rng-rank{self.runtime.rank}.pt"))
        if self.runtime.main:
            print(f"f2llm: resumed from {path} at step {self.step} of {self.total_steps}")

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> Path:
        """Run to ``total_steps``; returns the folder of the final model (rank 0 writes it)."""
        config, out = self.config, Path(self.config.output_dir)
        self.logger.start(self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.runtime.main)
        batches = iter(self.sampler)
        if self.runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        while self.step < self.total_steps:
            batch = next(batches)
            started = time.perf_counter()
            try:
                result = self.train_step(batch)
            except NonFiniteError as e:
                if config.nan_policy == "stop" or not e.skippable:
                    raise
                self.skip_step()
                result = None
                if self.runtime.main:
                    print(f"f2llm: skipped: {e}")
            self.step += 1
            bar.update(1)
            if result is not None and (self.step % config.log_every == 0 or self.step == self.total_steps):
                self.log_step(batch, result, time.perf_counter() - started)
            elif result is None:
                self.logger.log(self.step, {"skipped": 1, "source": batch.source})
            if self.step % config.validate_every == 0 or self.step == self.total_steps:
                metrics = self.validate()
                if metrics is not None:
                    self.logger.log(self.step, metrics)
                    self.history.append({"step": self.step, **metrics})
            if self.step % config.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
            if self.extra_save_due(self.step):
                self.save_final(out / "extra" / f"step-{self.step:08d}", adapter=False)
        bar.close()
        final = out / "final"
        self.save_final(final)
        self.logger.close()
        if self.runtime.main and config.plot and self.logger.path.exists():
            plot_loss_curve(self.logger.path, out / "loss.png")
        return final

    def log_step(self, batch: TrainingBatch, result: StepResult, seconds: float) -> None:
        kd = [] if result.kd is None else [float(result.kd)]  # every rank distils or none does
        values = torch.tensor(
            [float(result.loss.total), float(result.loss.hard), float(result.loss.in_batch), float(result.tokens), *kd],
            dtype=torch.float64,
        )
        if distributed.is_distributed():
            dist.all_reduce(values)
        W = self.runtime.world_size
        metrics = {
            "train/loss": float(values[0]) / W,
            "train/hard": float(values[1]) / W,
            "train/in_batch": float(values[2]) / W,
            "train/lr": result.lr,
            "train/grad_norm": float(result.grad_norm),
            "train/tokens_per_s": float(values[3]) / max(seconds, 1e-9),
            "train/peak_memory_mib": peak_memory_mib(self.runtime.device),
            "source": batch.source,
        }
        if kd:
            metrics["train/kd"] = float(values[4]) / W
        self.logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})

    def extra_save_due(self, step: int) -> bool:
        """Whether ``step`` (1-based, done) gets an extra model save for merging (``save_extra``): a multiple of
        ``every`` among the last ``last`` steps, as F2LLM v2 saves "for ckpt merging". (v2 also saves step 5, a
        smoke test of its saving, not a model worth merging: not done here.)"""
        extra = self.config.save_extra
        return extra is not None and step % extra.every == 0 and step > self.total_steps - extra.last

    def save_final(self, folder: Path, adapter: bool = True) -> None:
        """The trained encoder in ``model.final_dtype``, loadable by transformers, sentence-transformers and
        Encoder.load (final/, and the extra saves for merging under extra/step-N/).

        With LoRA it is the merged model (adapters folded into the weights, on the CPU: the training model is not
        touched), and ``adapter``: the peft adapter beside it in ``adapter/``.

        Written under a temporary name and renamed when complete: a job killed while saving never leaves a partial
        model where a complete one is expected (a rerun resumes from the last checkpoint and saves it again).
        """
        model = self.config.model
        dtype = resolve_dtype(model.dtype if model.final_dtype == "auto" else model.final_dtype, self.runtime.device)
        tmp = folder.with_name(f".tmp-{folder.name}")
        if self.runtime.main and tmp.exists():
            shutil.rmtree(tmp)
        with self.engine.full_weights():
            if self.runtime.main and self.lora is None:
                self.encoder.save_pretrained(tmp, dtype=dtype)
            elif self.runtime.main:
                merged_encoder(self.encoder, dtype).save_pretrained(tmp)
                if adapter:
                    self.lora.save_adapter(tmp / "adapter")
        if self.runtime.main:
            fsync_tree(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        self.runtime.barrier()


def training_sources(config: TrainConfig, tokenizer: TextTokenizer) -> list[TokenizedSource]:
    """The sources of ``config.data``, tokenized with ``tokenizer`` (cached under data.cache_dir), at most
    data.max_rows_per_source rows of each (a sample seeded by data.seed), split into training and held-out rows."""
    return load_sources(
        config.data.paths,
        tokenizer,
        config.data.cache_dir,
        overrides=config.data.sources,
        seed=config.data.seed,
        validation_fraction=config.data.validation_fraction,
        num_negatives=config.data.num_negatives,
        max_rows=config.data.max_rows_per_source,
    )


def validation_sampler(
    config: TrainConfig, sources: list[TokenizedSource], runtime: Runtime, sampling: dict[str, Any]
) -> F2LLMBatchSampler | None:
    """Batches of the held-out rows, or None when there are none.

    Held-out sources are small (1%): validation batches shrink to what the largest one can fill per rank, so that
    small held-out sets are validated too (the in-batch term then sees fewer negatives than in training). Their
    negatives are sampled as training's, under the validation split's own seed key, the same at every pass.
    """
    held_out = max(len(s.validation_rows) for s in sources)
    if held_out == 0 or (config.data.last_batch == "drop" and held_out < runtime.world_size):
        if runtime.main:
            print(
                f"f2llm: validation disabled: the largest held-out set has {held_out} rows for "
                f"{runtime.world_size} rank(s) (raise data.validation_fraction, or use data.last_batch: wrap)"
            )
        return None
    batch_size = min(config.data.batch_size, max(1, held_out // runtime.world_size))
    return F2LLMBatchSampler(sources, batch_size, epochs=1, split="validation", **sampling)


def detach_loss(out: LossOutput) -> LossOutput:
    return LossOutput(*(t.detach() for t in out))


def train(config: TrainConfig) -> Path:
    """Train with ``config`` (under torchrun for several processes); returns the final model's folder."""
    trainer = Trainer.from_config(config)
    try:
        final = trainer.train()
        if trainer.runtime.main:
            print(f"f2llm: final model saved to {final}")
        return final
    finally:
        # Release the engine (DeepSpeed keeps collectives' work objects) while torch.distributed and the
        # interpreter are fully alive: work objects freed during interpreter shutdown can abort the process.
        del trainer
        gc.collect()
        if distributed.is_distributed():
            dist.destroy_process_group()
