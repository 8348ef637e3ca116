"""Training engines: how one step's forward, backward, gradient synchronization and update run, behind one interface.

The trainer (f2llm.trainer) never asks which engine it has. An :class:`Engine` gives it:

* ``forward(batch, normalize)``: float32 embeddings, with the engine's mixed precision;
* ``backward(loss)`` and ``no_sync()``: the gradient cache runs every chunk but the last under ``no_sync`` (a null
  context where the engine cannot defer its gradient communication);
* ``clip()``: clip the gradients and return their norm (a 0-dim tensor, not read back: that would wait), before the
  update; None where the engine finds the norm inside its update (DeepSpeed ZeRO-1/2/3 and bf16: there
  ``update()`` returns it, and DeepSpeed itself refuses a non-finite update; ``update_applied()`` then says whether
  it did apply it);
* ``update()``: apply the gradients (the optimizer's step) and zero them; ``drop_gradients()``: zero them unused (a
  skipped step). The learning-rate schedule (``scheduler``) is stepped by the trainer, once per step, applied or
  skipped, so that it stays aligned with the data;
* ``save(folder)`` / ``load(folder)``: weights and optimizer state; the schedule is not saved but rebuilt from the
  current config and the step (``set_schedule_step``), so a resume with a changed ``max_steps`` decays on the new
  horizon, and so are the optimizer's betas and weight decay;
* ``full_weights()``: a context in which the encoder holds its whole weights (ZeRO-3 partitions them);
* ``communication()``: a line saying what each step sends between ranks;
* ``step_state_bytes()``: what the first step will allocate on this rank (gradients, AdamW moments), for a memory
  budget set before it: the ``step`` part of :func:`training_state_bytes`, the per-rank state of either engine at any
  rank count as a pure function (benchmarks/bench_train_step.py budgets a config's memory with it).

Mixed precision. :class:`DDPEngine` keeps fp32 weights and AdamW state and runs the forward under
``torch.autocast(bfloat16)``: at the recipe's lr 8e-6 an AdamW update is mostly below bf16's resolution for weights
of ~0.02, so bf16 weights updated in place would barely move. :class:`DeepSpeedEngine` uses DeepSpeed's own bf16
(bf16 weights for compute, fp32 master partitions in its optimizer).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from f2llm.checkpoint import load_state, save_state
from f2llm.config import TrainConfig
from f2llm.data import EncoderBatch
from f2llm.encoder import Encoder


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was NaN or infinite (the message names step, source and which).

    ``skippable`` is False when the non-finite update was already applied: the run must stop.
    """

    def __init__(self, message: str, skippable: bool = True) -> None:
        super().__init__(message)
        self.skippable = skippable


# ------------------------------------------------------------------------------------------------ schedule
class WarmupCosine:
    """LR multiplier: linear warmup to 1, cosine decay to 0 at ``total_steps``, floored at ``min_ratio``
    (``optim.schedule: cosine``). :class:`WarmupConstant` shares the warmup and holds 1 after it.

    ``warmup: steps``: the factor of step s (0-based) is (s + 1) / warmup_steps during warmup, so the first update
    already moves. ``warmup: per_process``: exactly what the official F2LLM v1 code ran: transformers' cosine
    schedule with warmup (factor s / warmup at its step s) over world_size x total_steps scheduler steps, which
    accelerate advanced world_size times per optimizer step; optimizer step s thus gets the factor of scheduler
    step s x world_size: the warmup takes warmup_steps / world_size optimizer steps and the decay ends at
    total_steps. A plain callable object (not a lambda) so that LambdaLR's state_dict holds only numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, per_process: int | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.per_process = per_process

    def __call__(self, step: int) -> float:
        if self.per_process is not None:  # transformers' schedule with warmup, stepped W times per optimizer step
            at, warmup, total = step * self.per_process, self.warmup_steps, self.total_steps * self.per_process
            if at < warmup:
                factor = at / max(1, warmup)
            else:
                factor = self.after_warmup((at - warmup) / max(1, total - warmup), clamp=False)
        elif step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            factor = self.after_warmup(progress, clamp=True)
        return max(factor, self.min_ratio)

    def after_warmup(self, progress: float, clamp: bool) -> float:
        """The factor at ``progress`` (0 at the end of warmup, 1 at total_steps). ``clamp``: stay at the end's value
        past total_steps; unclamped is transformers' formula, which rises again past it."""
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (min(1.0, progress) if clamp else progress))))

    @classmethod
    def from_config(cls, config: TrainConfig, total_steps: int, world_size: int) -> WarmupCosine:
        optim = config.optim
        per_process = world_size if optim.warmup == "per_process" else None
        return cls(optim.warmup_steps, total_steps, optim.min_lr / optim.lr, per_process=per_process)


class WarmupConstant(WarmupCosine):
    """LR multiplier: :class:`WarmupCosine`'s warmup (both ``optim.warmup`` modes), then 1 to the end
    (``optim.schedule: constant_with_warmup``, F2LLM v2's other schedule: transformers'
    get_constant_schedule_with_warmup). During warmup it is floored at ``min_ratio`` as the cosine is."""

    def after_warmup(self, progress: float, clamp: bool) -> float:
        return 1.0


SCHEDULES: dict[str, type[WarmupCosine]] = {"cosine": WarmupCosine, "constant_with_warmup": WarmupConstant}


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at ``step`` (the rate of the step's update is then ``lr * lambda(step)``)."""
    scheduler.last_epoch = step
    rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


# ------------------------------------------------------------------------------------------------ dtypes
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A config dtype name: ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# ------------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class TrainingState:
    """Bytes of training state on one rank (:func:`training_state_bytes`).

    ``weights``: the encoder's weights as loaded (:func:`weights_dtype`; ZeRO-3: this rank's partition).
    ``master``: DeepSpeed's fp32 master copy of the trainable weights for bf16 / fp16 compute (this rank's partition
    from ZeRO-1 on), allocated by ``deepspeed.initialize``. ``step``: what the first step allocates
    (:meth:`Engine.step_state_bytes`): gradients and their communication buffers, AdamW's two fp32 moments.
    """

    weights: int
    master: int
    step: int

    @property
    def resident(self) -> int:
        """In device memory before the first step (what a budget measured then has already lost)."""
        return self.weights + self.master

    @property
    def total(self) -> int:
        return self.resident + self.step


def training_state_bytes(
    engine: Literal["ddp", "deepspeed"],
    params: int,
    trainable: int,
    world_size: int,
    compute_dtype: torch.dtype,
    zero_stage: int = 0,
) -> TrainingState:
    """The training state one rank holds (:class:`TrainingState`), from sizes alone: ``params`` weights, of which
    ``trainable`` get gradients and AdamW moments, ``world_size`` ranks, ``compute_dtype`` (DeepSpeed's weights and
    gradients are in it), ``zero_stage`` for DeepSpeed. The engines' ``step_state_bytes`` is its ``step``; a memory
    budget for a run not started (benchmarks/bench_train_step.py --config) uses the whole.

    * ddp: fp32 weights; fp32 gradients, DDP's bucket copy of them (several ranks), two fp32 moments: 16 bytes per
      parameter on one rank, 20 on several.
    * deepspeed: weights in the compute dtype (ZeRO-3 partitions them); gradients in the compute dtype (partitioned
      from ZeRO-2 on); for bf16 / fp16 compute the fp32 master weights and the fp32 gradient of this rank's master
      partition (both partitioned from ZeRO-1 on; ZeRO-0 keeps its whole master copy and is counted without the
      master gradient, as DeepSpeedEngine always counted it); two fp32 moments (partitioned from ZeRO-1 on).
    """
    if engine == "ddp":
        grads = 4 * trainable
        buckets = grads if world_size > 1 else 0
        return TrainingState(weights=4 * params, master=0, step=grads + buckets + 8 * trainable)
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    half = compute_dtype != torch.float32
    weights = itemsize * params // (world_size if zero_stage >= 3 else 1)
    if zero_stage == 0:
        return TrainingState(weights, 4 * trainable if half else 0, itemsize * trainable + 8 * trainable)
    grads = itemsize * trainable // (world_size if zero_stage >= 2 else 1)
    master = 4 * trainable // world_size if half else 0  # this rank's fp32 partition; its fp32 gradient as large
    return TrainingState(weights, master, grads + master + 8 * trainable // world_size)


# ------------------------------------------------------------------------------------------------ the interface
class Engine(ABC):
    """One training run's model, optimizer and schedule, and how a step runs them (see the module docstring)."""

    config: TrainConfig
    world_size: int
    encoder: Encoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    compute_dtype: torch.dtype

    @abstractmethod
    def forward(self, batch: EncoderBatch, normalize: bool | None = None) -> torch.Tensor:
        """Float32 embeddings of ``batch`` (``normalize``: as :meth:`f2llm.encoder.Encoder.forward`)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def no_sync(self) -> contextlib.AbstractContextManager: ...

    @abstractmethod
    def clip(self) -> torch.Tensor | None:
        """Clip the gradients to ``optim.grad_clip``; their norm before clipping, or None where :meth:`update`
        finds it."""

    @abstractmethod
    def update(self) -> torch.Tensor | None:
        """Apply the gradients and zero them; the gradient norm when the update found it (else None)."""

    def update_applied(self) -> bool:
        """Whether the last :meth:`update` changed the weights (DeepSpeed refuses a non-finite one itself)."""
        return True

    @abstractmethod
    def drop_gradients(self) -> None:
        """Zero this step's gradients without applying them."""

    @abstractmethod
    def save(self, folder: Path, main: bool) -> None: ...

    @abstractmethod
    def load(self, folder: Path, saved_world_size: int) -> None:
        """Load the checkpoint in ``folder``, written by ``saved_world_size`` ranks (its trainer state's count; the
        trainer has called :meth:`check_resume_world_size` first when that differs from this run's)."""

    def check_resume_world_size(self, folder: Path, saved_world_size: int) -> None:
        """Refuse (before anything is loaded) a checkpoint written by ``saved_world_size`` ranks that this engine
        cannot load on its own number of ranks. DDP's checkpoint is whole (rank 0 writes the weights and the full
        optimizer state), so it loads on any number."""
        return None

    @abstractmethod
    def full_weights(self) -> contextlib.AbstractContextManager: ...

    @abstractmethod
    def communication(self, chunked: bool) -> str:
        """What a step sends between ranks (a log line), with or without the gradient cache's chunks."""

    @property
    def gathers_parameters(self) -> bool:
        """Whether a forward gathers partitioned parameters from the other ranks (DeepSpeed ZeRO-3): then a forward
        recomputed in backward (activation checkpointing) runs collectives of its own."""
        return False

    @property
    def lr(self) -> float:
        """The rate the next update uses."""
        return self.scheduler.get_last_lr()[0]

    def set_schedule_step(self, step: int) -> None:
        """Position the schedule at ``step`` and apply the config's AdamW settings (a loaded optimizer state brings
        the betas and weight decay of the run that saved it)."""
        set_schedule_step(self.scheduler, step)
        for group in self.scheduler.optimizer.param_groups:
            group["betas"] = self.config.optim.betas
            group["weight_decay"] = self.config.optim.weight_decay

    def train(self, mode: bool = True) -> None:
        self.encoder.train(mode)

    def gradient_bytes(self) -> int:
        """Bytes of one full set of trainable gradients (in the dtype they are communicated in)."""
        return (4 if self.grad_dtype == torch.float32 else 2) * self.trainable_numel()

    @property
    def grad_dtype(self) -> torch.dtype:
        return torch.float32

    def trainable_numel(self) -> int:
        # ZeRO-3 leaves each parameter an empty placeholder; ds_numel is its real size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.encoder.parameters() if p.requires_grad)

    def step_state_bytes(self) -> int:
        """Bytes of training state this rank's first step allocates (not in memory when the engine is built):
        gradients and their communication buffers, AdamW's two fp32 moments. An estimate for a memory budget."""
        return self.training_state().step

    @abstractmethod
    def training_state(self) -> TrainingState:
        """This rank's training state, by :func:`training_state_bytes`."""


def build_engine(config: TrainConfig, encoder: Encoder, total_steps: int, world_size: int) -> Engine:
    """The engine ``config.engine`` names, around an encoder loaded with :func:`weights_dtype`'s dtype."""
    cls = DeepSpeedEngine if config.engine == "deepspeed" else DDPEngine
    return cls(config, encoder, total_steps, world_size)


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype to load the encoder's weights in: fp32 master weights for DDP (the forward autocasts to the
    compute dtype); the compute dtype for DeepSpeed, which keeps its own fp32 master partitions."""
    compute = resolve_dtype(config.model.dtype, device)
    return compute if config.engine == "deepspeed" else torch.float32


# A LoRA run's DDP checkpoint: its trainable (adapter) weights only, under the backbone's parameter names.
TRAINABLE_FILE = "trainable.safetensors"


def _adamw(config: TrainConfig, encoder: Encoder) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in encoder.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=config.optim.betas,
        weight_decay=config.optim.weight_decay,
    )


def _schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, world_size: int):
    schedule = SCHEDULES[config.optim.schedule].from_config(config, total_steps, world_size)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ------------------------------------------------------------------------------------------------ DDP
class DDPEngine(Engine):
    """fp32 weights and AdamW state; forward under autocast to the compute dtype; torch DDP across ranks.

    With several ranks the gradients are all-reduced once per step: DDP's ``no_sync`` defers it past every
    gradient-cache chunk but the last. Buffers are not broadcast at each forward (``broadcast_buffers=False``):
    the encoders' buffers (rotary frequencies, position ids) are constants, and a broadcast per forward would make
    every chunk a collective (they are still synced once, when DDP wraps the model).
    """

    def __init__(self, config: TrainConfig, encoder: Encoder, total_steps: int, world_size: int) -> None:
        self.encoder = encoder
        self.config = config
        self.device = encoder.device
        self.compute_dtype = resolve_dtype(config.model.dtype, self.device)
        if any(p.dtype != torch.float32 for p in encoder.parameters()):
            raise ValueError(
                "DDPEngine: the encoder's weights must be float32 (master weights); load it with weights_dtype()"
            )
        self.optimizer = _adamw(config, encoder)
        self.scheduler = _schedule(config, self.optimizer, total_steps, world_size)
        self.world_size = world_size
        self.module: torch.nn.Module = encoder
        if world_size > 1:
            ddp = torch.nn.parallel.DistributedDataParallel
            # torch 2.13 renamed broadcast_buffers (deprecated there) to forward_sync_buffers; both keep the
            # buffers synced at init only, which is all constant buffers need.
            no_forward_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else {"broadcast_buffers": False}
            )
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = ddp(encoder, device_ids=device_ids, **no_forward_sync)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def forward(self, batch: EncoderBatch, normalize: bool | None = None) -> torch.Tensor:
        with self.autocast():
            return self.module(batch, normalize)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self) -> contextlib.AbstractContextManager:
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def clip(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.optim.grad_clip).detach()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def training_state(self) -> TrainingState:
        params = sum(p.numel() for p in self.encoder.parameters())
        return training_state_bytes("ddp", params, self.trainable_numel(), self.world_size, self.compute_dtype)

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path, main: bool) -> None:
        if main:
            from safetensors.torch import save_file, save_model

            if self.config.model.lora is None:
                save_model(self.encoder.model, str(folder / "model.safetensors"))
            else:  # the frozen backbone is the one name_or_path loads: the adapters are all that changes
                save_file(
                    {n: p.detach().contiguous() for n, p in self.encoder.model.named_parameters() if p.requires_grad},
                    str(folder / TRAINABLE_FILE),
                )
            save_state(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, saved_world_size: int) -> None:
        from safetensors.torch import load_file, load_model

        expected = TRAINABLE_FILE if self.config.model.lora is not None else "model.safetensors"
        if not (folder / expected).is_file():
            kind = "a LoRA run's adapters" if expected == "model.safetensors" else "full weights (a run without LoRA)"
            raise FileNotFoundError(
                f"resume: {folder} has no {expected}: it holds {kind}; resume with the model.lora setting that wrote "
                "it, or start afresh (resume=never, or another output_dir)"
            )
        if expected == "model.safetensors":
            load_model(self.encoder.model, str(folder / expected), device=str(self.device))
        else:
            saved = load_file(str(folder / expected), device=str(self.device))
            params = {n: p for n, p in self.encoder.model.named_parameters() if p.requires_grad}
            if saved.keys() != params.keys():
                raise ValueError(
                    f"resume: {folder / expected} holds other adapters than this run trains (model.lora r or "
                    f"target_modules changed?): missing {sorted(params.keys() - saved.keys())[:3]}, unexpected "
                    f"{sorted(saved.keys() - params.keys())[:3]}"
                )
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])
        self.optimizer.load_state_dict(load_state(folder / "optimizer.pt"))

    def full_weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def communication(self, chunked: bool) -> str:
        if self.world_size == 1:
            return "engine ddp, 1 process: no gradient communication"
        grads = _mib(self.gradient_bytes())
        line = f"engine ddp, {self.world_size} ranks: one all-reduce of the fp32 gradients ({grads})"
        return line + (" per step, after the last gradient-cache chunk (no_sync before it)" if chunked else " per step")


# ------------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed_config(config: TrainConfig, dtype: torch.dtype, world_size: int) -> dict:
    """The DeepSpeed JSON with the keys f2llm owns (config.DEEPSPEED_KEYS_OWNED) filled from the training config."""
    ds = json.loads(Path(config.deepspeed_config).read_text())
    ds.pop("_comment", None)
    ds["train_micro_batch_size_per_gpu"] = config.data.rank_batch_size(world_size)
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = config.optim.grad_clip
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    return ds


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 around f2llm's AdamW (a torch optimizer: no op compilation) and schedule.

    Gradient communication per step, by ZeRO stage, with the gradient cache's K chunks:

    * 0 and 1: one all-reduce (0) or reduce (1) of the gradients per step, after the last chunk
      (``set_gradient_accumulation_boundary(False)`` before it);
    * 2: a reduce-scatter of the gradients in every chunk's backward (ZeRO-2 partitions gradients as they are
      produced and cannot defer it), K per step;
    * 3: as 2, plus an all-gather of the weights for every forward (K in the no-grad pass, K again with grad) and
      backward.

    Every rank therefore runs the same number of chunks (f2llm.gradcache.split_to_count); otherwise the collectives
    of the ranks would not match.

    A ZeRO-1/2/3 checkpoint written by another number of ranks (the trainer keeps the global batch) is loaded through
    a DeepSpeed universal checkpoint converted next to it (:func:`deepspeed_universal_checkpoint`): the same fp32
    weights and AdamW moments, repartitioned over this run's ranks.
    """

    def __init__(self, config: TrainConfig, encoder: Encoder, total_steps: int, world_size: int) -> None:
        import deepspeed

        self.encoder = encoder
        self.config = config
        self.world_size = world_size
        self.compute_dtype = resolve_dtype(config.model.dtype, encoder.device)
        optimizer = _adamw(config, encoder)
        # The schedule is not handed to DeepSpeed: the trainer steps it once per step, applied or skipped (DeepSpeed
        # would step it inside its update, and not for an update it refused).
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=encoder, optimizer=optimizer, config=deepspeed_config(config, self.compute_dtype, world_size),
            dist_init_required=False,
        )  # fmt: skip
        self.scheduler = _schedule(config, optimizer, total_steps, world_size)
        self.stage = int(self.ds.zero_optimization_stage())
        # ZeRO-0 in fp32 steps the torch optimizer itself and reports no gradient norm: f2llm computes it (the
        # gradients are all-reduced by then) and checks it before the update, as DDP does.
        self.own_norm = self.stage == 0 and self.compute_dtype == torch.float32

    @property
    def grad_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, batch: EncoderBatch, normalize: bool | None = None) -> torch.Tensor:
        return self.ds(batch, normalize)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def training_state(self) -> TrainingState:
        # ZeRO-3 leaves each parameter an empty placeholder; ds_numel is its real size.
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.encoder.parameters())
        return training_state_bytes(
            "deepspeed", params, self.trainable_numel(), self.world_size, self.compute_dtype, self.stage
        )

    def clip(self) -> torch.Tensor | None:
        if not self.own_norm:
            return None  # ZeRO-1/2/3 and bf16: DeepSpeed finds the norm (and clips by it) inside its step
        grads = [p.grad for p in self.encoder.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).detach()  # DeepSpeed's step clips by this same norm

    def update(self) -> torch.Tensor | None:
        self.ds.step()  # updates (clipping first), zeroes the gradients; ZeRO >= 1 skips a non-finite update
        if self.own_norm:
            return None
        reported = self.ds.get_global_grad_norm()
        if reported is None:  # config.validate refuses compute_grad_norm: false, the one known cause
            raise RuntimeError("DeepSpeedEngine: DeepSpeed reported no gradient norm after its step")
        return torch.tensor(float(reported))

    def update_applied(self) -> bool:
        return bool(self.ds.was_step_applied())

    @property
    def gathers_parameters(self) -> bool:
        return self.stage == 3

    def drop_gradients(self) -> None:
        # After a refused update DeepSpeed has dropped the gradients itself; before an update (ZeRO-0 fp32, checked
        # first) they are still there.
        self.ds.zero_grad()

    def save(self, folder: Path, main: bool) -> None:
        # LoRA: the frozen backbone is the one name_or_path loads; only the adapters (and their optimizer) are saved.
        lora = self.config.model.lora is not None
        self.ds.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=lora)

    def check_resume_world_size(self, folder: Path, saved_world_size: int) -> None:
        # ZeRO-0 state is whole; ZeRO-1/2/3 state partitioned over another number of ranks is converted by load() into
        # a DeepSpeed universal checkpoint, which loads on any number. Optimizer state swapped to NVMe is per rank.
        if self.stage >= 1 and self.ds.zero_nvme_offload_optimizer():
            raise ValueError(
                f"resume: {folder} holds DeepSpeed ZeRO-{self.stage} optimizer state offloaded to NVMe by "
                f"{saved_world_size} ranks, and this run has {self.world_size}: resume on {saved_world_size} ranks "
                "(ZeRO-0/1/2/3 checkpoints without NVMe offload, and engine: ddp ones, load on any number of ranks)"
            )

    def load(self, folder: Path, saved_world_size: int) -> None:
        use_weights_only_loading(self.ds)
        # The schedule is rebuilt from the current config (set_schedule_step), not restored. A LoRA checkpoint
        # holds no frozen weights, hence a non-strict module load.
        lora = self.config.model.lora is not None
        if self.stage == 0 or saved_world_size == self.world_size:
            self.ds.load_checkpoint(
                str(folder), tag="deepspeed", load_lr_scheduler_states=False, load_module_strict=not lora
            )
            return
        # Written by another number of ranks: DeepSpeed refuses to repartition ZeRO state itself, but loads a
        # universal checkpoint (each parameter's fp32 weights and AdamW moments whole) on any number. Its universal
        # load restores the weights from those fp32 copies (no module load: the LoRA case needs no strictness) and
        # the frozen weights of a LoRA run stay those name_or_path loaded.
        with deepspeed_universal_checkpoint(folder, "deepspeed", saved_world_size) as tag:
            self.ds._config.load_universal_checkpoint = True
            try:
                self.ds.load_checkpoint(
                    str(folder), tag=tag, load_lr_scheduler_states=False, load_module_strict=not lora
                )
            finally:
                self.ds._config.load_universal_checkpoint = False

    def full_weights(self) -> contextlib.AbstractContextManager:
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.encoder.parameters()), modifier_rank=None)

    def communication(self, chunked: bool) -> str:
        head = f"engine deepspeed ZeRO-{self.stage}, {self.world_size} rank(s)"
        grads = f"the gradients ({_mib(self.gradient_bytes())})"
        if self.stage < 2:
            line = f"{head}: one reduction of {grads} per step"
            return line + (", after the last gradient-cache chunk" if chunked else "")
        line = f"{head}: a reduce-scatter of {grads} in every backward"
        if chunked:
            line += ", i.e. one per gradient-cache chunk (ZeRO-2/3 cannot defer it to the last)"
        if self.stage == 3:
            line += "; the weights are all-gathered for the forwards (both gradient-cache passes) and backwards"
        return line


@contextlib.contextmanager
def deepspeed_universal_checkpoint(folder: Path, tag: str, saved_world_size: int) -> Iterator[str]:
    """The ZeRO checkpoint ``folder/tag`` as a DeepSpeed universal checkpoint: yields its tag, ``<tag>-universal``.

    Global rank 0 converts it once (``deepspeed.checkpoint.ds_to_universal``) under ``folder/.tmp-<tag>-universal``
    and renames that into place after an fsync (atomic: a killed conversion leaves only the temporary folder, which
    the next one replaces); the other ranks wait at a barrier (the folder must be on a file system they all read,
    as the checkpoint itself). A later resume from the same checkpoint reuses the converted one.

    Within the context ``torch.load`` reads tensors and plain data only (``weights_only=True``, the three DeepSpeed
    classes of :func:`use_weights_only_loading` allowed): the converter and DeepSpeed's universal loader call it with
    ``weights_only=False``, which would unpickle anything planted in the checkpoint folder.
    """
    import argparse
    import os
    import shutil

    import torch.distributed as dist
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from f2llm.checkpoint import fsync_dir, fsync_tree
    from f2llm.distributed import is_distributed, rank

    universal = f"{tag}-universal"
    target, scratch = folder / universal, folder / f".tmp-{universal}"
    torch_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch_load(*args, **kwargs)

    torch.load = weights_only_load
    try:
        failure = None
        if rank() == 0 and not target.is_dir():
            print(
                f"f2llm: resume: converting {folder / tag} (written by {saved_world_size} ranks) into the universal "
                f"checkpoint {target}"
            )
            try:
                shutil.rmtree(scratch, ignore_errors=True)
                # In this process (1 worker each: no process pool); the injected state is the universal-checkpoint
                # version, which Megatron-style clients save themselves and f2llm (no tensor/pipeline parallelism)
                # does not.
                ds_to_universal.main(argparse.Namespace(
                    input_folder=str(folder / tag), output_folder=str(scratch), num_extract_workers=1,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
                ))  # fmt: skip
                (folder / "latest_universal").unlink(missing_ok=True)  # it names the scratch folder; tags are explicit
                fsync_tree(scratch)
                os.replace(scratch, target)
                fsync_dir(folder)
            except Exception as e:  # the other ranks are waiting at the barrier below: release them first
                failure = e
        if is_distributed():
            dist.barrier()
        if failure is not None:
            raise RuntimeError(f"resume: converting {folder / tag} into a universal checkpoint failed") from failure
        if not target.is_dir():
            raise RuntimeError(f"resume: rank 0 did not convert {folder / tag} into {target} (see its error)")
        yield universal
    finally:
        torch.load = torch_load


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
