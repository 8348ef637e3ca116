"""The F2LLM training loop: torchrun + (DDP | DeepSpeed ZeRO 0-3), gradient cache, checkpoints, logging.

Read top to bottom: :func:`train` sets up (process group, encoder, data, engine, optimizer, schedule, resume),
then runs steps. One step, on every rank:

1. the sampler gives this rank's share of a global batch, every rank from the same source;
2. the texts (queries, positives, negatives) are encoded, in one forward or in gradient-cache chunks;
3. :class:`f2llm.loss.F2LLMLoss`: hard-negative loss always, in-batch loss (positives gathered from every rank,
   with gradient) for retrieval sources;
4. backward, gradient clipping, AdamW step, warmup + cosine schedule; metrics, validation and checkpoints.

A non-finite loss or gradient norm stops the run (naming the step and the source) or skips the step, as
``nan_policy`` says; all ranks agree before acting, so none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from f2llm.data import Collator, EncoderBatch, F2LLMBatchSampler, SourceOverride, TrainingBatch, load_sources
from f2llm.gradcache import GradientCache, chunk_by_tokens
from f2llm.loss import F2LLMLoss, LossOutput
from f2llm.model import Encoder


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was NaN or infinite (the message names step, source and which)."""


# ------------------------------------------------------------------------------------------------ schedule
@dataclass
class WarmupCosine:
    """LR multiplier: linear warmup to 1, cosine decay to 0 at ``total_steps``, floored at ``min_ratio``.

    A plain callable object (not a lambda) so that LambdaLR's state_dict holds only numbers.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(factor, self.min_ratio)


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
        if not distributed.is_distributed():
            return failed
        flag = torch.tensor([float(failed)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def init_runtime() -> Runtime:
    """Join the torchrun process group (when launched by torchrun) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not distributed.is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(distributed.rank(), distributed.world_size(), device)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def deepspeed_config(config: TrainConfig, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON with the keys f2llm owns filled from the training config."""
    ds = json.loads(Path(config.deepspeed_config).read_text())
    ds.pop("_comment", None)
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = config.optim.grad_clip
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.pop("fp16", None)
    return ds


# ------------------------------------------------------------------------------------------------ metrics
class MetricLogger:
    """Rank 0 writes metrics.jsonl and (optionally) TensorBoard scalars; other ranks write nothing."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))

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


def plot_loss_curve(metrics_file: Path, out: Path) -> None:
    """PNG of training (and validation) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("train/hard", ":"), ("train/in_batch", "--"), ("val/loss", "o-")):
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


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class StepResult:
    loss: LossOutput
    grad_norm: float
    tokens: int
    lr: float


@dataclass
class Trainer:
    """Holds everything a run needs; build it with :meth:`from_config`."""

    config: TrainConfig
    runtime: Runtime
    encoder: Encoder
    model: torch.nn.Module  # what forward runs through: the encoder, its DDP wrapper or the DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: F2LLMBatchSampler
    validation: F2LLMBatchSampler | None
    collator: Collator
    loss_fn: F2LLMLoss
    total_steps: int
    step: int = 0
    logger: MetricLogger | None = None
    checkpoints: CheckpointWriter | None = None
    deepspeed: Any = None
    history: list[dict] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: TrainConfig, runtime: Runtime | None = None) -> Trainer:
        runtime = runtime or init_runtime()
        seed_everything(config.seed + runtime.rank)  # dropout differs across ranks, data order does not
        out = Path(config.output_dir)
        dtype = resolve_dtype(config.model.dtype, runtime.device)
        encoder = Encoder.from_pretrained(
            config.model.name_or_path,
            pooling=config.model.pooling,
            max_length=config.model.max_length,
            dtype=dtype,
            attn_implementation=config.model.attn_implementation,
            gradient_checkpointing=config.model.gradient_checkpointing,
            liger=config.model.liger if runtime.device.type == "cuda" else False,
            device=runtime.device,
        ).train()

        overrides = {name: SourceOverride(**vars(s)) for name, s in config.data.sources.items()}
        sources = load_sources(
            config.data.paths,
            encoder.text_tokenizer,
            config.data.cache_dir,
            overrides=overrides,
            seed=config.data.seed,
            validation_fraction=config.data.validation_fraction,
        )
        sampler = F2LLMBatchSampler(
            sources,
            config.data.batch_size,
            world_size=runtime.world_size,
            rank=runtime.rank,
            seed=config.data.seed,
            epochs=config.optim.epochs,
        )
        # Held-out sources are small (1%): validation batches shrink to what the largest one can fill, so that
        # small datasets are validated too (the in-batch term then sees fewer negatives than in training).
        largest = max(len(s.validation_rows) for s in sources) // runtime.world_size
        validation = None
        if largest >= 1:
            validation = F2LLMBatchSampler(
                sources,
                min(config.data.batch_size, largest),
                world_size=runtime.world_size,
                rank=runtime.rank,
                seed=config.data.seed,
                epochs=1,
                split="validation",
            )
        elif runtime.main:
            print("f2llm: validation disabled: fewer held-out rows than ranks (raise data.validation_fraction)")
        total_steps = len(sampler) if config.optim.max_steps is None else min(config.optim.max_steps, len(sampler))

        optimizer = torch.optim.AdamW(
            encoder.parameters(),
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
        )
        schedule = WarmupCosine(config.optim.warmup_steps, total_steps, config.optim.min_lr / config.optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        engine = None
        model: torch.nn.Module = encoder
        if config.engine == "deepspeed":
            import deepspeed

            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=encoder,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(config, dtype),
                dist_init_required=False,
            )
            model = engine
        elif runtime.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                encoder, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
            )

        trainer = cls(
            config=config,
            runtime=runtime,
            encoder=encoder,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler=sampler,
            validation=validation,
            collator=Collator(
                pad_token_id=encoder.text_tokenizer.pad_token_id,
                mode="packed" if config.data.packing else "padded",
                max_tokens=config.data.max_tokens,
            ),
            loss_fn=F2LLMLoss(config.temperature),
            total_steps=total_steps,
            logger=MetricLogger(out, runtime.main, config.tensorboard),
            checkpoints=CheckpointWriter(out / "checkpoints", config.keep_last, runtime.rank, runtime.any_failed),
            deepspeed=engine,
        )
        if runtime.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        trainer.maybe_resume()
        return trainer

    # ---------------------------------------------------------------------------------------------- one step
    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        return self.model(batch)

    def chunks(self, seqs: list[np.ndarray]) -> list[EncoderBatch]:
        """The gradient cache's chunks of a step's texts, in order: by text count, or by real tokens."""
        gc = self.config.grad_cache
        if gc.chunk_tokens is None:
            groups = [seqs[i : i + gc.chunk_texts] for i in range(0, len(seqs), gc.chunk_texts)]
        else:
            groups = chunk_by_tokens(seqs, gc.chunk_tokens)
        return [self.collator(g) for g in groups]

    def batch_loss(self, emb: torch.Tensor, batch: TrainingBatch) -> LossOutput:
        """F2LLMLoss of a batch's embeddings (queries, positives, negatives row-major, as sequences() orders them)."""
        B, k = batch.batch_size, batch.num_negatives
        q, p = emb[:B], emb[B : 2 * B]
        n = emb[2 * B :].reshape(B, k, emb.shape[-1])
        return self.loss_fn(q, p, n, in_batch=batch.kind == "retrieval")

    def compute_loss(self, emb: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, LossOutput]:
        out = self.batch_loss(emb, batch)
        self.check_finite(out.total.detach(), "loss", batch)
        return out.total, out

    def check_finite(self, value: torch.Tensor, what: str, batch: TrainingBatch) -> None:
        """Raise NonFiniteError on every rank when ``value`` is non-finite on any rank."""
        bad = (~torch.isfinite(value.float())).to(torch.float32).reshape(1)
        if distributed.is_distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            raise NonFiniteError(
                f"non-finite {what} at step {self.step + 1} (epoch {batch.epoch}, step {batch.step} of the epoch), "
                f"source {batch.source!r}, rows {batch.rows[:8].tolist()}..."
            )

    def no_sync(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        if self.deepspeed is not None:
            engine = self.deepspeed

            @contextlib.contextmanager
            def ds_no_sync() -> Iterator[None]:
                engine.set_gradient_accumulation_boundary(False)
                try:
                    yield
                finally:
                    engine.set_gradient_accumulation_boundary(True)

            return ds_no_sync
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync
        return None

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)
        else:
            loss.backward()

    def train_step(self, batch: TrainingBatch) -> StepResult:
        seqs = batch.sequences()
        tokens = sum(len(s) for s in seqs)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        if self.config.grad_cache.enabled:
            cache = GradientCache(self.encode, no_sync=self.no_sync(), backward=self.backward)
            result = cache.step(self.chunks(seqs), lambda emb: self.compute_loss(emb, batch))
            out = result.aux
        else:
            emb = self.encode(self.collator(seqs))
            total, out = self.compute_loss(emb, batch)
            self.backward(total)
        if self.deepspeed is not None:
            self.deepspeed.step()  # clips, steps the optimizer and the schedule, zeroes gradients
            norm = self.deepspeed.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            if not math.isfinite(grad_norm) and norm is not None:
                # The engine has already applied this update; the only safe policy is to stop.
                raise NonFiniteError(
                    f"non-finite gradient norm at step {self.step + 1}, source {batch.source!r} (DeepSpeed: the "
                    "update was applied before the norm is known, so the run stops whatever nan_policy says)"
                )
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.optim.grad_clip)
            self.check_finite(norm, "gradient norm", batch)
            grad_norm = float(norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=detach_loss(out), grad_norm=grad_norm, tokens=tokens, lr=lr)

    def skip_step(self) -> None:
        """Drop this step's gradients; the schedule still advances so it stays aligned with the data."""
        if self.deepspeed is not None:
            raise NonFiniteError("nan_policy=skip is not available with DeepSpeed; use engine: ddp or nan_policy: stop")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ---------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.validation is None:
            return None
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)
        try:
            for step in range(self.validation.steps_per_epoch):
                batch = self.validation.batch_at(0, step)
                out = self.batch_loss(self.encode(self.collator(batch.sequences())), batch)
                totals += torch.tensor([*map(float, out), 1.0], dtype=torch.float64)
        finally:
            self.model.train()
        if distributed.is_distributed():
            dist.all_reduce(totals)
        n = max(1.0, float(totals[3]))
        return {f"val/{name}": float(totals[i]) / n for i, name in enumerate(("loss", "hard", "in_batch"))}

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        def write(folder: Path) -> None:
            if self.deepspeed is not None:
                self.deepspeed.save_checkpoint(str(folder), tag="deepspeed")
            elif self.runtime.main:
                from safetensors.torch import save_model

                save_model(self.encoder.model, str(folder / "model.safetensors"))
                save_state(self.optimizer.state_dict(), folder / "optimizer.pt")
                save_state(self.scheduler.state_dict(), folder / "scheduler.pt")
            if self.runtime.main:
                state = {"step": self.step, "sampler": self.sampler.state_dict(), "world_size": self.runtime.world_size}
                (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
            save_state(rng_state(), folder / f"rng-rank{self.runtime.rank}.pt")

        return self.checkpoints.save(self.step, write)

    def maybe_resume(self) -> None:
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
        if self.deepspeed is not None:
            use_weights_only_loading(self.deepspeed)
            self.deepspeed.load_checkpoint(str(path), tag="deepspeed")
        else:
            from safetensors.torch import load_model

            load_model(self.encoder.model, str(path / "model.safetensors"), device=str(self.runtime.device))
            self.optimizer.load_state_dict(load_state(path / "optimizer.pt"))
            self.scheduler.load_state_dict(load_state(path / "scheduler.pt"))
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        set_rng_state(load_state(path / f"rng-rank{self.runtime.rank}.pt"))
        if self.runtime.main:
            print(f"f2llm: resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> Path:
        """Run to ``total_steps``; returns the folder of the final model (rank 0 writes it)."""
        config, out = self.config, Path(self.config.output_dir)
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
                if config.nan_policy == "stop":
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
        bar.close()
        final = out / "final"
        self.save_final(final)
        self.logger.close()
        if self.runtime.main and config.plot and self.logger.path.exists():
            plot_loss_curve(self.logger.path, out / "loss.png")
        return final

    def log_step(self, batch: TrainingBatch, result: StepResult, seconds: float) -> None:
        values = torch.tensor(
            [float(result.loss.total), float(result.loss.hard), float(result.loss.in_batch), float(result.tokens)],
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
            "train/grad_norm": result.grad_norm,
            "train/tokens_per_s": float(values[3]) / max(seconds, 1e-9),
            "train/peak_memory_mib": peak_memory_mib(self.runtime.device),
            "source": batch.source,
        }
        self.logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})

    def save_final(self, folder: Path) -> None:
        """The trained encoder, loadable by transformers, sentence-transformers and Encoder.load.

        Written under a temporary name and renamed when complete: a job killed while saving never leaves a partial
        model where a complete one is expected (a rerun resumes from the last checkpoint and saves it again).
        """
        tmp = folder.with_name(f".tmp-{folder.name}")
        if self.runtime.main and tmp.exists():
            shutil.rmtree(tmp)
        if self.deepspeed is not None and self.deepspeed.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.encoder.parameters()), modifier_rank=None):
                if self.runtime.main:
                    self.encoder.save_pretrained(tmp)
        elif self.runtime.main:
            self.encoder.save_pretrained(tmp)
        if self.runtime.main:
            fsync_tree(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        self.runtime.barrier()


def use_weights_only_loading(engine: Any) -> None:
    """Make a DeepSpeed engine load checkpoints with ``torch.load(weights_only=True)``.

    DeepSpeed's TorchCheckpointEngine unpickles arbitrary objects (``weights_only=False``): a planted file in a
    checkpoint folder would run code on resume. Its checkpoints hold tensors, plain data and three DeepSpeed
    classes, which are the only globals allowed here.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    base = type(engine.checkpoint_engine)
    if getattr(base, "weights_only", False):
        return

    class WeightsOnlyCheckpointEngine(base):
        weights_only = True

        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine


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
        if distributed.is_distributed():
            dist.destroy_process_group()
