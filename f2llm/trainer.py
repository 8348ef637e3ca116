"""The F2LLM training loop: torchrun + an engine (f2llm.engine: DDP or DeepSpeed ZeRO 0-3), gradient cache, checkpoints.

Read top to bottom: :meth:`Trainer.from_config` sets up (process group, encoder, data, engine, resume), then
:meth:`Trainer.train` runs steps. One step (:meth:`Trainer.train_step`), on every rank:

1. chunks: the sampler gave this rank's share of a global batch, every rank from the same source; its texts
   (queries, positives, negatives) are collated into one chunk, or the gradient cache's chunks (every rank runs
   the same number); with sampled embedding ranks (ML-Embed), the step's rank is set first;
2. teacher targets, when distilling (f2llm.distill), without grad;
3. embed and backpropagate :meth:`Trainer.loss`, with one forward + backward or with the gradient cache (chosen
   once, when the Trainer is built): :class:`f2llm.loss.F2LLMLoss` (hard negatives always, in-batch negatives
   gathered from every rank for retrieval sources) plus ``weight * kd`` when distilling;
4. clip; 5. finite check; 6. update; 7. the schedule advances (also after a skipped update).

A non-finite loss or gradient norm stops the run (naming the step and the source) or skips the step, as
``nan_policy`` says; all ranks agree before acting, so none is left waiting in a collective. Both are checked at
once, where the engine can still refuse the update: one all-reduce and one host read per step.

Which layers of a forward with grad recompute their activations in backward is the recompute policy's decision
(f2llm.recompute), made from the batch's shape alone.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from f2llm import distributed
from f2llm.checkpoint import CheckpointWriter, latest_checkpoint, load_state, rng_state, save_state, set_rng_state
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
from f2llm.distributed import Runtime, init_runtime
from f2llm.embedding_rank import LowRankEmbedding, factorize, rank_of_step, sampled_ranks
from f2llm.encoder import Encoder
from f2llm.engine import Engine, NonFiniteError, WarmupCosine, build_engine, resolve_dtype, weights_dtype
from f2llm.gradcache import GradientCache, chunk_by_tokens, split_to_count
from f2llm.lora import LoraAdapter, merged_encoder
from f2llm.loss import F2LLMLoss, LossOutput
from f2llm.metrics import MetricLogger, peak_memory_mib, plot_loss_curve
from f2llm.recompute import RecomputePolicy, recompute_policy

__all__ = ["NonFiniteError", "Trainer", "WarmupCosine", "train"]

# One step's aux output: the loss's parts (total, hard, in-batch) and, when distilling, the kd term (else None).
StepLoss = tuple[LossOutput, torch.Tensor | None]


# ------------------------------------------------------------------------------------------------ setup
def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class StepResult:
    loss: LossOutput
    grad_norm: torch.Tensor  # 0-dim, not read back until logged: reading it would wait for the update
    tokens: int
    lr: float
    kd: torch.Tensor | None = None  # distillation term (unweighted; loss.total includes weight * kd), None: off
    skipped: NonFiniteError | None = None  # nan_policy: skip, and this step's loss or norm was not finite


# Embed-and-backpropagate: (chunks, loss of all their embeddings -> (scalar, aux)) -> aux, parameter gradients
# accumulated. One forward + backward, or the gradient cache's two passes.
EmbedBackward = Callable[[Sequence[EncoderBatch], Callable[[torch.Tensor], tuple[torch.Tensor, Any]]], Any]


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
    recompute: RecomputePolicy | None = None  # None: built from the config on first use (recompute_policy)
    teacher: Teacher | None = None  # distill: the frozen teacher's targets (f2llm.distill)
    lora: LoraAdapter | None = None  # model.lora: the peft adapters the encoder trains
    low_rank: LowRankEmbedding | None = None  # model.embedding_rank: the factorized token embeddings
    embed_and_backward: EmbedBackward = field(init=False)

    def __post_init__(self) -> None:
        # The strategy for embedding a step's texts and backpropagating its loss, chosen once.
        if self.config.grad_cache.enabled:
            cache = GradientCache(self.encode_chunk, self.engine.no_sync, self.engine.backward, self.runtime.device)
            self.embed_and_backward = lambda chunks, loss: cache.step(chunks, loss).aux
        else:
            self.embed_and_backward = self.forward_backward

    @property
    def encoder(self) -> Encoder:
        return self.engine.encoder

    def recompute_policy(self) -> RecomputePolicy:
        """The run's :class:`RecomputePolicy` (f2llm.recompute.recompute_policy), built (and said, on rank 0) once."""
        if self.recompute is None:
            self.recompute = recompute_policy(self.config, self.engine, self.runtime)
            if self.runtime.main:
                print(f"f2llm: {self.recompute.summary()}")
        return self.recompute

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: TrainConfig, runtime: Runtime | None = None) -> Trainer:
        runtime = runtime or init_runtime(config.dist_timeout_minutes, group_of_one=config.engine == "deepspeed")
        seed_everything(config.seed + runtime.rank)  # dropout differs across ranks, data order does not
        batch_size = config.data.rank_batch_size(runtime.world_size)  # refused now if the ranks do not divide it
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
        encoder.set_layer_exits(config.model.layer_exits)  # refused now if the model lacks the layers or a final norm
        low_rank = None
        if config.model.embedding_rank is not None:  # before the engine: its optimizer trains the factors
            low_rank = factorize(
                encoder.model, config.model.embedding_rank, config.model.name_or_path,
                resume_from=config.model.name_or_path if Path(config.model.name_or_path).is_dir() else None,
            )  # fmt: skip
        lora = None
        if config.model.lora is not None:  # before the engine: its optimizer and DDP / DeepSpeed see the adapters only
            settings = config.model.lora
            lora = LoraAdapter.apply(
                encoder, settings.r, settings.alpha, settings.dropout, settings.target_modules, seed=config.seed,
                where=config.model.name_or_path,
            )  # fmt: skip

        sources = training_sources(config, encoder.text_tokenizer, runtime.rank, runtime.world_size)
        sampling = dict(
            world_size=runtime.world_size,
            rank=runtime.rank,
            seed=config.data.seed,
            last_batch=config.data.last_batch,
            source_draw=config.data.source_draw,
        )
        sampler = F2LLMBatchSampler(sources, batch_size, epochs=config.optim.epochs, **sampling)
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
            low_rank=low_rank,
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
            if low_rank is not None:
                full = low_rank.max_rank
                ranks = sampled_ranks(full)[0] if config.model.sample_embedding_rank else (full,)
                print(
                    f"f2llm: token embeddings as U @ V at rank {low_rank.max_rank} ({low_rank.num_embeddings} x "
                    f"{low_rank.embedding_dim}); ranks trained: {list(ranks)}"
                )
            if encoder.layer_exits is not None:
                print(
                    f"f2llm: layer exits {list(encoder.layer_exits)} of {encoder.num_layers} layers: every exit's "
                    f"embeddings get the loss, averaged over the {len(encoder.layer_exits)} exits"
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
        trainer.recompute_policy()  # measured now, before any step has allocated gradients or optimizer state
        trainer.maybe_resume()
        return trainer

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self, batch: TrainingBatch) -> StepResult:
        """One optimizer step on this rank's share of a global batch, in the module docstring's seven parts."""
        engine, texts = self.engine, batch.sequences()
        lr = engine.lr  # the rate this step's update uses
        self.set_embedding_rank(self.step)  # model.sample_embedding_rank: this step's rank, the same in every pass
        chunks = self.chunks(texts)  # 1
        target = None if self.teacher is None else self.teacher.embed(batch, [c.num_texts for c in chunks])  # 2
        out, kd = self.embed_and_backward(chunks, lambda emb: self.loss(emb, batch, target))  # 3
        norm = engine.clip()  # 4: None where the engine finds the norm in its update (DeepSpeed ZeRO >= 1, bf16)
        skipped = None
        try:
            if norm is not None:
                self.check_finite(out.total, norm, batch)  # 5, before the update: a skip leaves the weights as they are
                engine.update()  # 6
            else:  # 6 then 5: DeepSpeed refuses a non-finite update itself; the check asks whether it applied it
                norm = engine.update()
                self.check_finite(out.total, norm, batch, applied=engine.update_applied())
        except NonFiniteError as e:
            if self.config.nan_policy == "stop" or not e.skippable:
                raise
            engine.drop_gradients()
            skipped = e
        engine.scheduler.step()  # 7, also after a skipped update: the schedule stays aligned with the data
        kd = None if kd is None else kd.detach()
        return StepResult(detach_loss(out), norm, sum(map(len, texts)), lr, kd=kd, skipped=skipped)

    def set_embedding_rank(self, step: int | None) -> None:
        """The embedding rank of a training step (a draw of f2llm.embedding_rank.rank_of_step when ranks are
        sampled), or the full rank (``step`` None: validation, saving)."""
        if self.low_rank is None:
            return
        sample = self.config.model.sample_embedding_rank and step is not None
        rank = self.low_rank.max_rank
        self.low_rank.rank = rank_of_step(rank, self.config.seed, step) if sample else rank

    def chunks(self, seqs: list[np.ndarray]) -> list[EncoderBatch]:
        """A step's texts collated for its forwards: one chunk, or the gradient cache's chunks, in order, by text
        count or by real tokens.

        Every rank gets the same number of chunks: by text count it is the same by construction (every rank has
        the same number of texts); by tokens the ranks agree on the largest count (one small all-reduce) and the
        others split their chunks further (f2llm.gradcache.split_to_count).
        """
        cache = self.config.grad_cache
        if not cache.enabled:
            return [self.collator(seqs)]
        if cache.chunk_tokens is None:
            groups = [seqs[i : i + cache.chunk_texts] for i in range(0, len(seqs), cache.chunk_texts)]
        else:
            groups = chunk_by_tokens(seqs, cache.chunk_tokens)
            groups = split_to_count(groups, self.runtime.max(len(groups)))
        return [self.collator(g) for g in groups]

    def encode_chunk(self, chunk: EncoderBatch) -> torch.Tensor:
        """The engine's embeddings of one chunk: raw (not normalized) when distilling, where kd compares raw ones
        and :meth:`loss` normalizes them itself. With grad, the layers the recompute policy decides for its size
        (input positions, padding included: a shape, known without reading the device) recompute in backward."""
        layers = self.recompute_policy().decide(chunk.input_ids.numel()) if torch.is_grad_enabled() else False
        with self.encoder.recompute(layers):
            return self.engine.forward(chunk, normalize=False if self.teacher is not None else None)

    def forward_backward(
        self, chunks: Sequence[EncoderBatch], loss: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    ) -> Any:
        """Embed-and-backpropagate without the gradient cache: one forward with grad, one backward."""
        (chunk,) = chunks
        total, aux = loss(self.encode_chunk(chunk))
        self.engine.backward(total)
        return aux

    def loss(
        self, emb: torch.Tensor, batch: TrainingBatch, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, StepLoss]:
        """The step's loss of all its embeddings (queries, positives, negatives, as ``batch.sequences()`` orders
        them): F2LLMLoss, plus ``distill.weight * kd`` of the raw embeddings against the teacher's ``target``
        (then ``emb`` is raw and normalized here for the contrastive terms, so both terms get gradient)."""
        if target is None:
            out = self.batch_loss(emb, batch)
            return out.total, (out, None)
        out = self.batch_loss(F.normalize(emb, dim=-1), batch)
        kd = distill_loss(emb, target, batch.batch_size, batch.num_negatives)
        total = out.total + self.config.distill.weight * kd
        return total, (out._replace(total=total), kd)

    def batch_loss(self, emb: torch.Tensor, batch: TrainingBatch) -> LossOutput:
        """F2LLMLoss of a batch's normalized embeddings."""
        return self.loss_fn(*batch.split(emb), in_batch=batch.kind == "retrieval")

    def check_finite(self, loss: torch.Tensor, norm: torch.Tensor, batch: TrainingBatch, applied: bool = False) -> None:
        """Raise NonFiniteError on every rank when the loss or the gradient norm is non-finite on any rank, naming
        the first such (a non-finite loss makes the norm non-finite too): one all-reduce and one host read for
        both. ``applied``: the update was already applied (the error then cannot be skipped). Tensors on the
        meta device hold no values: nothing to check."""
        values = {k: v for k, v in {"loss": loss, "gradient norm": norm}.items() if v.device.type != "meta"}
        if not values:
            return
        device = self.runtime.device
        flags = torch.stack([~torch.isfinite(v.detach().float()).all().to(device) for v in values.values()])
        failed = [name for name, bad in zip(values, self.runtime.failed_anywhere(flags), strict=True) if bad]
        if failed:
            message = (
                f"non-finite {failed[0]} at step {self.step + 1} (epoch {batch.epoch}, step {batch.step} of the "
                f"epoch), source {batch.source!r}, rows {batch.rows[:8].tolist()}..."
            )
            if applied:
                raise NonFiniteError(f"{message}; DeepSpeed applied this update, so the run stops", skippable=False)
            raise NonFiniteError(message)

    def embed(self, seqs: list[np.ndarray]) -> torch.Tensor:
        """Embeddings of texts without autograd, in the step's chunks (validation: a training step's memory)."""
        return torch.cat([self.engine.forward(chunk) for chunk in self.chunks(seqs)])

    # ---------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.validation is None:
            return None
        self.engine.train(False)
        self.set_embedding_rank(None)  # validated at the full rank
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
        saved_world, world = int(state["world_size"]), self.runtime.world_size
        try:  # the global batch, data and rules first: the checks that say which numbers of ranks work
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ValueError(f"resume: {path}: {e}") from None
        if saved_world != world:
            if self.config.optim.warmup == "per_process":
                raise ValueError(
                    f"resume: {path} was written by {saved_world} ranks, this run has {world}, and optim.warmup: "
                    "per_process ties the learning-rate schedule to the number of processes (the official v1 "
                    f"loop's): resume on {saved_world} ranks, or train with optim.warmup: steps"
                )
            self.engine.check_resume_world_size(path, saved_world)
        self.engine.load(path, saved_world)
        self.step = int(state["step"])
        self.engine.set_schedule_step(self.step)
        rng = path / f"rng-rank{self.runtime.rank}.pt"
        if saved_world == world:
            set_rng_state(load_state(rng))
        else:  # other ranks hold other shares: each starts a generator of its own (only dropout draws from it)
            seed_everything(self.config.seed + self.runtime.rank + self.step * world)
        if self.runtime.main:
            moved = f" (written by {saved_world} ranks, resumed on {world})" if saved_world != world else ""
            print(f"f2llm: resumed from {path}{moved} at step {self.step} of {self.total_steps}")

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
            result = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if result.skipped is not None:
                self.logger.log(self.step, {"skipped": 1, "source": batch.source})
                if self.runtime.main:
                    print(f"f2llm: skipped: {result.skipped}")
            elif self.step % config.log_every == 0 or self.step == self.total_steps:
                self.log_step(batch, result, time.perf_counter() - started)
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
        touched), and ``adapter``: the peft adapter beside it in ``adapter/``. Published as checkpoints are
        (:meth:`CheckpointWriter.publish`): a job killed while saving never leaves a partial model where a complete
        one is expected (a rerun resumes from the last checkpoint and saves it again).
        """
        model = self.config.model
        dtype = resolve_dtype(model.dtype if model.final_dtype == "auto" else model.final_dtype, self.runtime.device)

        def write(tmp: Path) -> None:
            with self.engine.full_weights():  # every rank: ZeRO-3 gathers the weights collectively
                if self.runtime.main and self.lora is None:
                    self.encoder.save_pretrained(tmp, dtype=dtype)
                elif self.runtime.main:
                    merged_encoder(self.encoder, dtype).save_pretrained(tmp)
                    if adapter:
                        self.lora.save_adapter(tmp / "adapter")

        self.checkpoints.publish(folder, write)


def training_sources(
    config: TrainConfig, tokenizer: TextTokenizer, rank: int = 0, world_size: int = 1, **building: Any
) -> list[TokenizedSource]:
    """The sources of ``config.data``, tokenized with ``tokenizer`` (cached under data.cache_dir), at most
    data.max_rows_per_source rows of each (a sample seeded by data.seed), split into training and held-out rows.
    ``rank`` of ``world_size`` ranks builds its share of the caches first; ``building``: how the caches are built
    (``num_proc``, ``show_progress`` of f2llm.data.readers.load_sources), never what they hold."""
    return load_sources(
        config.data.paths,
        tokenizer,
        config.data.cache_dir,
        overrides=config.data.sources,
        seed=config.data.seed,
        validation_fraction=config.data.validation_fraction,
        num_negatives=config.data.num_negatives,
        max_rows=config.data.max_rows_per_source,
        rank=rank,
        world_size=world_size,
        **building,
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
    batch_size = min(config.data.rank_batch_size(runtime.world_size), max(1, held_out // runtime.world_size))
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
