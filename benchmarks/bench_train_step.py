"""Training-step benchmark: one F2LLM training step of a Qwen3 backbone, ablated one switch at a time, timed and
FLOP-counted.

Commands (from the repository root):
    python benchmarks/bench_train_step.py                          # CUDA: Qwen3-0.6B dimensions, every row
    python benchmarks/bench_train_step.py --model 4b --budget-s 300
    python benchmarks/bench_train_step.py --cpu                    # tiny Qwen3 on CPU (committed CPU results)
    python benchmarks/bench_train_step.py --cpu --quick            # seconds: every row type (CI smoke test)
    python benchmarks/bench_train_step.py --flops --model all      # executed vs ideal FLOPs of one step (no GPU)
    python benchmarks/bench_train_step.py --flops --config f2llm-4b [key=value ...] [--world-size N]
    python benchmarks/bench_train_step.py --flops --config all     # every shipped recipe config + README launches
    python benchmarks/bench_train_step.py --comm                   # what each engine communicates per step
The timed modes write train_step_<device>.json and .md under --out (default benchmarks/results/local), after every
row, so that a run stopped by a timeout keeps the rows it finished; --flops writes train_step_flops.json / .md,
--flops --config train_step_flops_configs.json / .md.

Every row runs the trainer's own step, ``f2llm.trainer.Trainer.train_step``: collation, the gradient cache
(``f2llm.gradcache.GradientCache``), the encoder's forward and backward and the engine's step (``DDPEngine``: fp32
master weights and AdamW state, the forward under bf16 autocast on CUDA, clipping at 1.0, AdamW with the trainer's
defaults, betas (0.9, 0.98), weight decay 0.01) exactly as training does them. The Trainer is built directly (its
dataclass fields) around an Encoder on a ``transformers.Qwen3Config`` backbone with the real dimensions of Qwen3-0.6B
/ 1.7B / 4B and random weights (nothing is downloaded), and is fed a real ``f2llm.data.sampler.TrainingBatch`` of 16
queries x (1 positive + 7 hard negatives), the recipe's batch on one GPU. Rows, each adding one switch:

    a. baseline, as the recipe's code runs it: all texts padded into one batch, sdpa attention with the padding
       mask, gradient checkpointing, plain PyTorch pooling and loss: :class:`PlainPoolingEncoder` (a bench subclass
       of ``f2llm.encoder.Encoder`` that replaces only the pooling, by the last token's hidden state and
       ``F.normalize``; the Encoder has no pooling switch, so the subclass overrides ``forward`` for padded batches
       with the same backbone call) and :class:`PlainF2LLMLoss` (F2LLMLoss's call signature on ``cross_entropy(q @
       p.T / t)`` in-batch + ``cross_entropy(bmm(q, docs) / t)`` hard);
    b. + Liger RMSNorm / RoPE / SwiGLU (``f2llm.liger.apply_liger_kernels``; skipped, with the reason, where Liger
       cannot run: on CPU, or when liger_kernel is not importable). Liger changes no matmul: same FLOPs as a;
    c. + fused pooling and loss (``Encoder.forward``: ``f2llm.kernels.pool``; ``F2LLMLoss``);
    d. + packing (``data.packing``, rows of ``data.max_tokens``) with varlen attention where it runs (the
       ``f2llm_varlen`` attention of f2llm.attention, or flash-attention 2, on CUDA), else sdpa with the block-diagonal
       causal mask transformers builds from the restarting position ids; gradient checkpointing decided by the
       memory budget (below). The --flops row d is always the varlen layout: the full stack. Row d2 packs into rows
       of 2 x max text length under sdpa's block-diagonal mask (that mask's attention work grows with the square of
       the row width);
    e. + gradient cache (``grad_cache.enabled``, ``grad_cache.chunk_tokens``) at effective batches of many queries on
       one device, packed as d (timed rows without varlen: the faster of d / d2), in chunks of real tokens whose
       activations fit the memory budget without checkpointing (or --gc-chunk-tokens). With --budget-s, a
       gradient-cache row whose predicted time exceeds what is left is skipped (the row says so), and so are the
       larger ones after it.

Memory budget (rows d, d2, e): they run ``model.gradient_checkpointing: auto``, the trainer's RecomputePolicy:
a forward with grad (the batch, or a gradient-cache chunk in its second pass) checkpoints only when its estimated
saved activations (the library's ``ActivationMemory``, for bf16 compute) exceed the budget, and then only
as many of its first layers as it takes to fit (``ActivationMemory.layer_saving``). The budget is
what an 80 GB H100 (``--memory-gb``, 80e9 bytes) leaves after the DDP engine's training state on one rank, 16 bytes
per parameter (fp32 weights, fp32 gradients, AdamW's two fp32 moments; ``f2llm.engine.training_state_bytes``): 65.6
GiB for Qwen3-0.6B, 48.9 GiB for 1.7B, 14.6 GiB for 4B; the same on any GPU, so that the timed rows are the --flops
rows. The rows set it as ``model.activation_budget_gb``, which the trainer takes as it is: no activation share is
applied (unlike the budget the trainer derives when none is set, which --config counts). Rows a-c checkpoint every
forward (the recipe's). :class:`StepObserver` (a forward pre-hook on the Encoder) records what each forward did.

Text lengths come from the shipped SciFact data (``data/retrieval/scifact``), without a tokenizer: a text's
token count is taken as round(1.3 x its word count) + 1 (EOS), capped at 1024, the recipe's maximum. Queries
are the instruction-formatted claims (23-70 tokens, mean 35), documents title + abstract (44-1024 tokens, mean
279). Each row draws its batch with a fixed seed (rows a-d train on the same batch), token ids are random.
The CPU modes scale the lengths down (x0.25; x0.125 with --quick), use a tiny Qwen3 (hidden 64, 2 layers) and
one torch thread.

Metrics per timed row:
    step_s      median wall time of --steps steps after 2 warm-up steps (CUDA: synchronized); gradient-cache
                rows run --gc-steps steps and no warm-up (their chunks reuse the shapes rows a-d warmed up);
    tokens_per_s real (non-padding) tokens of the step / step_s;
    real_share  real tokens / positions the model computed (padding included);
    mfu_pct     model FLOPs (the ideal of --flops below) / step_s / the matmul rate measured in this run (bf16
                8192^3 on CUDA, fp32 on CPU). The GPU suite also reports the executed-FLOPs MFU of each row, from
                the --flops rows of the same configuration (benchmarks/report.py summary);
    peak_mib    CUDA: torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state, activations);
                CPU: the process's peak resident memory over the timed steps (VmHWM after a reset).
An out-of-memory row is recorded as OOM, any other failure as the error's text; the next rows still run.

--flops counts the FLOPs one step executes, against the ideal, for every row on the real Qwen3 dimensions (--model
0.6b, 1.7b, 4b or all; lengths at scale 1.0; gradient-cache rows at --gc-batches queries, default 512), on the meta
device (no memory, no compute), plus row d0: d with checkpointing off (what d costs where its activations fit):
    ideal       forward + backward of the real tokens once: 6 x N x T + 3 x n_layers x 4 x d_attn x sum_i
                len_i (len_i + 1) / 2, with N the weight matrices' parameters without the token embedding (a
                lookup; an embedding model has no LM head), T = sum_i len_i real tokens, d_attn = n_heads x head_dim
                (QK^T and AV over the causal pairs of each text);
    linear      counted: ``torch.utils.flop_counter.FlopCounterMode`` around ``Trainer.train_step``: every matmul of
                the step, padding positions, checkpointing's recompute (torch's non-reentrant checkpoint stops
                recomputing after the last saved tensor it needs, so a layer's down projection is not recomputed)
                and the gradient cache's no-grad pass included. Split by phase (forward with grad, no-grad, inside
                backward); recompute = inside backward - 2 x forward;
    attention   by the kernel's actual work, call by call (:class:`AttentionLedger`): dense sdpa with a mask
                computes every row's full W x W scores (padded: L_pad^2 per text; packed under the block-diagonal
                mask: row width^2 per row), varlen kernels the causal pairs of each segment of the collator's
                ``attn_cu_seqlens`` (texts, and runs of padding); 4 x d_attn FLOPs per score forward, backward 2.5 x
                forward (flash / memory-efficient kernels recompute the scores: 5 GEMMs to 2), a recomputed or
                no-grad forward 1 x. Varlen rows run the library's ``f2llm_varlen`` (torch's varlen_attn, its fake
                kernel on meta), whose calls the counter hands to the ledger: torch's own FLOP formula for it, on
                meta, takes every segment as long as the longest and counts no causal halving. sdpa rows (and
                varlen rows where torch has no varlen_attn) run :func:`count_attention`, a zero-FLOP stand-in:
                transformers' sdpa mask creation reads values (``.item()``), which meta tensors do not have;
    loss        analytic (:class:`CountedLoss`; the fused kernels' target checks read values): in-batch B x N x D
                scores: fused kernel 8 BND (forward, and a backward that recomputes the scores: 3 GEMMs), plain
                torch 6 BND; hard negatives B x G x D (G = 1 + negatives), 6 BGD either way.
Everything else is the library's: Trainer.train_step, GradientCache.step, the Encoder, the DDP engine's forward,
backward and step (its finiteness check skips meta tensors). It writes train_step_flops.json with per-row
``executed_flops``, ``ideal_flops``, ``ratio`` and the breakdown, and ``summary``: per model the
``baseline_ratio`` (row a), ``full_stack_ratio`` (row d), ``full_stack_no_checkpointing_ratio`` (row d0) and
``grad_cache_ratio`` (the first row e).

--flops --config CONFIG [key=value ...] [--world-size N] counts one ``Trainer.train_step`` of one rank of a
training config, ``f2llm.config.load_config(CONFIG, overrides)`` (a shipped name or a YAML path), counted as the
rows above (linear layers by FlopCounterMode, attention by the ledger, the loss from its shapes; ideal the same):
    model       the real dimensions of ``model.name_or_path``: Qwen/Qwen3-0.6B, 1.7B or 4B (QWEN3_DIMS), or a
                local folder's config.json (AutoConfig); random weights on meta. model.lora and distill are refused
                (not counted);
    batch       ``data.batch_size`` queries x (1 positive + ``data.num_negatives.retrieval``) documents, plus the
                queries, SciFact lengths as above capped at ``model.max_length``, seed 0 (at 16 queries: row d's);
    step        the config's ``data.packing`` / ``data.max_tokens``, gradient cache (``grad_cache.enabled``,
                ``chunk_texts`` or ``chunk_tokens``) and ``model.gradient_checkpointing`` with the trainer's
                RecomputePolicy; attention: the varlen kernel the trainer picks on CUDA when
                ``model.attn_implementation`` is null, flash_attention_2 or f2llm_varlen (a padded batch's padding
                runs are segments of their own), else sdpa's mask (packed: block-diagonal; padded: L_pad^2). The
                step itself runs the DDP engine of one process in fp32 on meta: no matmul differs under DeepSpeed
                (bf16 weights) or at another world size, except the in-batch loss, whose B x (N ranks x B) scores
                CountedLoss counts (with chunk_tokens, ranks needing more chunks make the others split theirs
                further: the same tokens, in more forwards; not modelled). Matryoshka (``loss.matryoshka_dims``)
                adds no GEMM work (the fused op walks D once for every level, kernels/matryoshka.py: the same 8 BND
                + 6 BGD), so it is counted as one level; layer exits (``model.layer_exits``, set on the Encoder as
                Trainer.from_config sets it) count the loss once per exit and add no matmul (an exit's final norm
                acts on pooled tokens; bench_layer_exits.py --flops compares such a step with the plain one);
    world size  ``--world-size N``, default max(1, 512 // data.batch_size): the configs' global batch is
                data.batch_size x GPUs, the recipe's 512 queries (16 x 32 GPUs); on fewer GPUs the configs raise
                data.batch_size with the gradient cache on, so the rule holds either way (the README's launches:
                512 queries gives 1 GPU, 64 gives 8). The run prints which N it used and why;
    budget      what ``f2llm.recompute.activation_budget`` derives on a GPU of ``--memory-gb`` (80e9 bytes) when
                ``model.activation_budget_gb`` is not set (an explicit one is used as it is, as the trainer does):
                ACTIVATION_MEMORY_SHARE (0.7) x (memory - weights - DeepSpeed's fp32 master partition - what the
                first step allocates), all per rank of the config's engine at N ranks by
                ``f2llm.engine.training_state_bytes``, the function the engines' ``step_state_bytes`` use: DDP 16
                bytes per parameter (+4, DDP's gradient buckets, when N > 1); DeepSpeed bf16 ZeRO-2: bf16 weights,
                and the fp32 master weights, fp32 master gradients, AdamW's moments and the bf16 gradients over N.
                The ablation rows' budget (above) is the same function's DDP state on one rank, without the share,
                set explicitly. The activation estimate is measured, as the trainer measures it, on the encoder as
                its engine loads it (DeepSpeed: bf16 weights; DDP: fp32 under autocast).
It writes train_step_flops_configs.json / .md (one row per config: engine, world size, per-rank state, budget,
checkpointing, forwards with grad, executed / ideal; ``command``: the command that counts the row alone) and prints
as its last line ``executed/ideal FLOPs: <ratio>`` (one config). ``--config all`` counts every shipped recipe config
(``f2llm-*.yaml``) at its default world size and the README's gradient-cache launches (README_LAUNCHES: one GPU of
512 queries, 8 GPUs of 64).

--comm measures what one training step sends between ranks, per engine (DDP, DeepSpeed ZeRO-1/2/3) and gradient-
cache chunk count, by running the trainer's own step (``f2llm.trainer.Trainer.train_step``) under torchrun with 2
ranks (gloo, CPU, a tiny Qwen3, the shipped SNLI triplets) and counting every collective and the bytes of the
tensors handed to it (torch.distributed's Python API, and DDP's gradient buckets through a comm hook). Bytes are
those of the collectives' input tensors on one rank, not wire bytes (an all-reduce moves about twice its input,
a reduce-scatter about once); ``per_gradient`` divides them by one full set of gradients, which makes the figures
hold for any model size. It writes train_step_comm.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from common import DEFAULT_OUT, MIB, cpu_median_s, cuda_median_ms, is_oom, write_results
from tokenizers import Tokenizer, models
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from f2llm.attention import VARLEN as VARLEN_ATTENTION
from f2llm.attention import default_attn_implementation, varlen_available
from f2llm.config import DataConfig, GradCacheConfig, LossConfig, ModelConfig, TrainConfig, load_config
from f2llm.data import INSTRUCTIONS, Collator, EncoderBatch, format_query
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder
from f2llm.engine import (
    TrainingState,
    build_engine,
    deepspeed_config,
    resolve_dtype,
    training_state_bytes,
    weights_dtype,
)
from f2llm.liger import apply_liger_kernels
from f2llm.loss import F2LLMLoss, LossOutput
from f2llm.recompute import ACTIVATION_MEMORY_SHARE, ActivationMemory, RecomputePolicy, budget_from_free_memory
from f2llm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "retrieval" / "scifact"
MAX_LENGTH = 1024  # the recipe's maximum tokens per text
WORDS_TO_TOKENS = 1.3
EOS = "<|endoftext|>"
TEMPERATURE = LossConfig().temperature
# Dimensions of the released Qwen3 base models (their config.json); "tiny" is the CPU mode's model.
QWEN3_DIMS: dict[str, dict[str, int]] = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=1024),
}  # fmt: skip
FLOPS_MODELS = ("0.6b", "1.7b", "4b")
# Gradient-cache step time over a plain step's, per token: one more forward (the no-grad pass). Used only to
# predict whether the first such row fits --budget-s.
GC_OVERHEAD = 1.3
COLUMNS = ["row", "status", "attention", "checkpointing", "queries", "texts", "chunks", "real_tokens", "real_share",
           "step_s", "tokens_per_s", "mfu_pct", "peak_mib", "steps"]  # fmt: skip
FLOPS_COLUMNS = ["model", "row", "status", "attention", "checkpointing", "queries", "chunks", "real_share",
                 "executed_tflop", "ideal_tflop", "ratio", "linear_share", "attention_share", "loss_share",
                 "recompute_share"]  # fmt: skip
# Training state of the DDP engine per parameter on one rank (f2llm.engine.training_state_bytes): fp32 weights, fp32
# gradients, AdamW's exp_avg and exp_avg_sq: 16.
STATE_BYTES_PER_PARAM = training_state_bytes("ddp", 1, 1, 1, torch.bfloat16).total
GPU_MEMORY_GB = 80.0  # an 80 GB H100 (GB = 1e9 bytes)
# Flash / memory-efficient attention backward: recompute QK^T, then dV, dP, dQ, dK: 5 GEMMs to the forward's 2.
ATTENTION_BACKWARD = 2.5
COUNT_ATTENTION = "f2llm_bench_count"  # the zero-FLOP attention function of --flops (see count_attention)


@dataclass(frozen=True)
class Settings:
    """What one run measures (see the module docstring and --help)."""

    model: str
    device: str
    queries: int = 16
    negatives: int = 7
    length_scale: float = 1.0
    max_tokens: int = DataConfig().max_tokens
    gc_batches: tuple[int, ...] = (512, 4096, 32768)
    gc_chunk_tokens: int | None = None  # None: the largest chunk whose activations fit the memory budget
    memory_gb: float = GPU_MEMORY_GB
    warmup: int = 2
    steps: int = 5
    gc_steps: int = 1
    budget_s: float | None = None
    seed: int = 0

    @property
    def max_length(self) -> int:
        return max(2, round(MAX_LENGTH * self.length_scale))


def default_settings(device: str, model: str | None, quick: bool) -> Settings:
    if device == "cuda":
        base = Settings(model=model or "0.6b", device=device)
        return replace(base, gc_batches=(256,), steps=3) if quick else base
    if device == "meta":  # --flops: the real lengths and batch
        return Settings(model=model or "0.6b", device=device, gc_batches=(512,))
    base = Settings(model=model or "tiny", device=device, length_scale=0.25, max_tokens=2048,
                    gc_batches=(64, 256), gc_chunk_tokens=4096, warmup=2, steps=3)  # fmt: skip
    if quick:
        return replace(base, queries=4, length_scale=0.125, gc_batches=(8, 16), gc_chunk_tokens=256, steps=2)
    return base


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class LengthPool:
    """Token-length proxies of real texts to draw batches from."""

    queries: np.ndarray
    documents: np.ndarray

    def describe(self) -> dict[str, Any]:
        def stats(a: np.ndarray) -> dict[str, float]:
            p10, p50, p90 = np.percentile(a, [10, 50, 90])
            return {"n": int(a.size), "min": int(a.min()), "p10": float(p10), "median": float(p50),
                    "p90": float(p90), "max": int(a.max()), "mean": round(float(a.mean()), 2)}  # fmt: skip

        return {"queries": stats(self.queries), "documents": stats(self.documents)}


def token_count(text: str, max_length: int) -> int:
    """round(1.3 x words) + 1 (EOS), capped at max_length: a tokenizer-free proxy of a Qwen3 token count."""
    return min(max_length, round(WORDS_TO_TOKENS * len(text.split())) + 1)


def scifact_lengths(scale: float = 1.0) -> LengthPool:
    """Lengths of SciFact's instruction-formatted claims and title + abstract documents, times ``scale``."""
    queries_file, corpus_file = SCIFACT / "queries.jsonl", SCIFACT / "corpus.jsonl.gz"
    for path in (queries_file, corpus_file):
        if not path.exists():
            raise FileNotFoundError(f"bench_train_step: {path} not found; the text lengths come from the shipped "
                                    "SciFact data (data/README.md), run from a full checkout")  # fmt: skip
    instruction = INSTRUCTIONS["scifact"]
    with queries_file.open() as f:
        queries = [token_count(format_query(json.loads(line)["text"], instruction), MAX_LENGTH) for line in f]
    with gzip.open(corpus_file, "rt") as f:
        docs = [token_count(f"{d['title']} {d['text']}", MAX_LENGTH) for d in map(json.loads, f)]

    def scaled(lengths: list[int]) -> np.ndarray:
        return np.maximum(2, np.round(np.asarray(lengths) * scale)).astype(np.int64)

    return LengthPool(scaled(queries), scaled(docs))


def draw_batch(pool: LengthPool, queries: int, negatives: int, vocab_size: int, eos_id: int, seed: int) -> Any:
    """A TrainingBatch (what the trainer's sampler yields) of lengths drawn from ``pool``: random int32 token ids,
    EOS last (what last-token pooling reads); a retrieval source, so the loss has its in-batch term."""
    from f2llm.data.sampler import TrainingBatch

    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.choice(pool.queries, queries), rng.choice(pool.documents, queries * (1 + negatives))])
    tokens = rng.integers(0, vocab_size, int(lengths.sum()), dtype=np.int32)
    tokens[np.cumsum(lengths) - 1] = eos_id
    seqs = np.split(tokens, np.cumsum(lengths)[:-1])
    return TrainingBatch(source="scifact", kind="retrieval", epoch=0, step=0, rows=np.arange(queries),
                         negative_columns=list(range(negatives)), queries=seqs[:queries],
                         passages=seqs[queries : 2 * queries], negatives=seqs[2 * queries :])  # fmt: skip


def batch_lengths(batch: Any) -> np.ndarray:
    """Token counts of a TrainingBatch's texts, in the order of ``batch.sequences()``."""
    seqs = batch.sequences()
    return np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))


# ------------------------------------------------------------------------------------------------ model
def eos_tokenizer() -> PreTrainedTokenizerFast:
    """A one-token tokenizer: the benchmark feeds token ids directly, the Encoder only needs EOS / pad ids."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({EOS: 0}, unk_token=EOS)), eos_token=EOS, pad_token=EOS
    )


def qwen3_config(dims: dict[str, int]) -> Qwen3Config:
    return Qwen3Config(**dims, max_position_embeddings=40960, use_cache=False)


def build_backbone(
    dims: dict[str, int] | PretrainedConfig, device: str, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Qwen3 backbone (``dims``: QWEN3_DIMS entry, or a model config) with random weights built on ``device``, train
    mode; fp32 by default (the DDP engine's master weights).

    On the meta device nothing is allocated; the weights have shapes and no values."""
    config = qwen3_config(dims) if isinstance(dims, dict) else dims
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.train()


def set_attention(model: PreTrainedModel, name: str) -> None:
    if model.config._attn_implementation == name:
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError, AttributeError):
        model.config._attn_implementation = name  # a function registered in AttentionInterface is looked up by name


def matmul_params(model: nn.Module) -> int:
    """N of the FLOP count: the weight matrices (2-D parameters) but the token embedding table."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)


def ideal_flops(config: Qwen3Config, n_params: int, lengths: np.ndarray) -> float:
    """Forward + backward of the real tokens once (see the module docstring): 6 N T + causal attention."""
    d_attn = config.num_attention_heads * config.head_dim
    lengths = lengths.astype(np.float64)
    pairs = (lengths * (lengths + 1) / 2).sum()
    return float(6 * n_params * lengths.sum() + 3 * config.num_hidden_layers * 4 * d_attn * pairs)


model_flops = ideal_flops  # the FLOPs of the timed rows' MFU


def matmul_tflops(device: str) -> tuple[float, str]:
    """The device's matmul rate measured now: (TFLOP/s, what was measured)."""
    if device == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = cuda_median_ms(lambda: a @ b)
        return 2 * n**3 / ms / 1e9, f"bf16 {n}^3 matmul (triton.testing.do_bench median)"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    seconds, _ = cpu_median_s(lambda: a @ b, repeats=7)
    threads = torch.get_num_threads()
    return 2 * n**3 / seconds / 1e12, f"fp32 {n}^3 matmul (median of 7, torch threads: {threads})"


class PlainPoolingEncoder(Encoder):
    """The baseline's pooling: the backbone's last hidden state at each text's last token, then ``F.normalize``.

    ``f2llm.encoder.Encoder`` has no pooling switch (its forward calls the fused ``f2llm.kernels.pool``), so this
    subclass overrides ``forward`` for padded batches: the same backbone call as Encoder.forward's padded branch,
    then the plain pooling. Everything else (construction, device handling, the trainer's use) is the Encoder's.
    """

    def forward(self, batch: EncoderBatch, normalize: bool | None = None) -> torch.Tensor:
        if batch.packed or normalize is False:
            raise ValueError("PlainPoolingEncoder: the baseline pools padded batches into normalized embeddings only")
        batch = batch.to(self.device, non_blocking=True)
        hidden = self.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # fmt: skip
        last = batch.attention_mask.sum(1) - 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(hidden[rows, last].float(), dim=-1)


class PlainF2LLMLoss(nn.Module):
    """F2LLMLoss's call signature on plain PyTorch ops: hard (each query vs its positive + negatives, via bmm) +
    in-batch (``q @ p.T``), both ``F.cross_entropy`` at the recipe's temperature; one rank."""

    def __init__(self, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, query_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, in_batch: bool
    ) -> LossOutput:
        docs = torch.cat([pos_emb[:, None], neg_emb], dim=1)  # [B, 1 + k, D]
        hard_logits = torch.bmm(query_emb[:, None], docs.transpose(1, 2)).squeeze(1) / self.temperature
        zeros = torch.zeros(query_emb.shape[0], dtype=torch.long, device=query_emb.device)
        hard = F.cross_entropy(hard_logits, zeros)
        if not in_batch:
            return LossOutput(hard, hard, torch.zeros((), device=hard.device, dtype=hard.dtype))
        targets = torch.arange(query_emb.shape[0], device=query_emb.device)
        in_batch_loss = F.cross_entropy(query_emb @ pos_emb.T / self.temperature, targets)
        return LossOutput(hard + in_batch_loss, hard, in_batch_loss)


def loss_flops(B: int, N: int, G: int, D: int, fused: bool, in_batch: bool = True) -> int:
    """FLOPs of the loss, forward + backward (module docstring): in-batch 8 BND fused (its backward recomputes the
    scores) or 6 BND plain; hard negatives 6 BGD."""
    return 6 * B * G * D + ((8 if fused else 6) * B * N * D if in_batch else 0)


class CountedLoss(nn.Module):
    """F2LLMLoss's call signature for the meta device: the loss keeps every embedding's gradient path (sums, no
    FLOPs to count) and the FLOPs of the loss the row runs are added from the shapes (:func:`loss_flops`). With
    ``world_size`` ranks the in-batch term scores this rank's queries against the positives of every rank (F2LLMLoss
    gathers them). Matryoshka levels add no GEMM work (kernels/matryoshka.py walks D once for every level), so the
    count is the same with ``loss.matryoshka_dims``. Layer exits (``model.layer_exits``: ``[B, E, D]`` embeddings,
    negatives ``[B, k, E, D]``) run the loss of every exit: E times the count of one."""

    def __init__(self, fused: bool, world_size: int = 1) -> None:
        super().__init__()
        self.fused = fused
        self.world_size = world_size
        self.flops = 0

    def forward(
        self, query_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, in_batch: bool
    ) -> LossOutput:
        B, D = query_emb.shape[0], query_emb.shape[-1]
        exits = query_emb.shape[1] if query_emb.dim() == 3 else 1
        N = pos_emb.shape[0] * self.world_size
        self.flops += exits * loss_flops(B, N, 1 + neg_emb.shape[1], D, self.fused, in_batch)
        hard = (query_emb.sum() + pos_emb.sum() + neg_emb.sum()) * 0.0
        in_batch_loss = (query_emb.sum() + pos_emb.sum()) * 0.0 if in_batch else torch.zeros_like(hard)
        return LossOutput(hard + in_batch_loss, hard, in_batch_loss)


# ------------------------------------------------------------------------------------------------ memory
def state_bytes(model: nn.Module) -> int:
    """The DDP engine's training state on one rank (f2llm.engine.training_state_bytes): fp32 weights, gradients and
    AdamW moments, 16 bytes per parameter."""
    params = sum(p.numel() for p in model.parameters())
    return training_state_bytes("ddp", params, params, 1, torch.bfloat16).total


def activation_budget_bytes(model: nn.Module, memory_gb: float = GPU_MEMORY_GB) -> int:
    """The ablation rows' ``model.activation_budget_gb`` (in bytes): the GPU's memory less the DDP engine's state on
    one rank. Set explicitly, the trainer takes it as it is (no ACTIVATION_MEMORY_SHARE)."""
    return int(memory_gb * 1e9) - state_bytes(model)


def derived_budget_bytes(state: TrainingState, memory_gb: float = GPU_MEMORY_GB) -> int:
    """What ``f2llm.recompute.activation_budget`` derives on a GPU of ``memory_gb`` when ``model.activation_budget_gb``
    is not set: ACTIVATION_MEMORY_SHARE of the memory left after the weights (and DeepSpeed's master partition),
    which are loaded when it measures, less what the first step will allocate (``state.step``)."""
    return budget_from_free_memory(int(memory_gb * 1e9) - state.resident, state.step)


def recompute_policy_of(
    memory: ActivationMemory,
    mode: bool | str,
    budget: int | None,
    compute_dtype: torch.dtype,
    source: str | None = None,
) -> RecomputePolicy:
    """The trainer's RecomputePolicy of a row: ``mode`` True / False / "auto", the library's activation estimate
    (``memory``, of the row's encoder as loaded: measured for its weights dtype) for ``compute_dtype`` (bf16 on CUDA
    and for --flops) against ``budget`` bytes; ``source`` says where the budget comes from."""
    if source is None:
        source = f"an {GPU_MEMORY_GB:g} GB GPU less {STATE_BYTES_PER_PARAM} B per parameter"
    if budget is not None:
        source = f"{budget / 2**30:.1f} GiB: {source}"
    saving = memory.layer_saving(compute_dtype) if budget is not None else None
    return RecomputePolicy(mode, budget, lambda n: memory.bytes(n, compute_dtype), source, saving)


def chunk_tokens_fitting(memory: ActivationMemory, budget: int, compute_dtype: torch.dtype) -> int:
    """The gradient cache's chunk size (real tokens, a multiple of 1024, 2% left for packed rows' padding tails)
    whose forward fits ``budget`` without checkpointing (by the library's estimate ``memory``)."""
    fixed, per_token = memory.profile(compute_dtype)
    return max(MAX_LENGTH, int(0.98 * (budget - fixed) / per_token) // 1024 * 1024)


class StepObserver:
    """A forward pre-hook on the Encoder: it sees every batch the trainer's step encodes, on the host (before the
    Encoder moves it to its device), and, for forwards with grad, whether the trainer's policy checkpoints it."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.batch: EncoderBatch | None = None
        self.grad = False  # the last forward builds a graph
        self.decisions: list[int] = []  # checkpointed layers of each forward with grad
        self.positions: list[int] = []  # input positions of each forward with grad

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.batch = args[0]
        self.grad = torch.is_grad_enabled()
        if self.grad:
            self.decisions.append(self.encoder.recomputed_layers)
            self.positions.append(self.batch.input_ids.numel())

    def describe(self, policy: RecomputePolicy) -> str:
        rule = "by the memory budget" if policy.mode == "auto" else "fixed"
        if not self.decisions:
            return f"none ({rule})"
        layers, n = self.encoder.num_recompute_layers, len(self.decisions)
        if all(d == layers for d in self.decisions):
            state = "on"
        elif not any(self.decisions):
            state = "off"
        elif len(set(self.decisions)) == 1:
            state = f"{self.decisions[0]} of {layers} layers"
        else:
            forwards = sum(map(bool, self.decisions))
            state = f"{sum(self.decisions) / n:.1f} of {layers} layers on average, in {forwards}/{n} forwards"
        return f"{state} ({rule})"


# ------------------------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class Variant:
    """One ablation row: which switches are on (see the module docstring)."""

    key: str
    row: str
    fused: bool
    packed: bool
    attention: str  # "padded" (sdpa, padding mask), "varlen", or "mask" (sdpa, block-diagonal causal mask)
    max_tokens: int | None = None  # packed row capacity
    gc_queries: int | None = None
    checkpointing: bool | None = True  # None: by the memory budget
    liger: bool = False
    skip: str | None = None

    def attention_label(self) -> str:
        if self.attention == "padded":
            return "sdpa, padding mask"
        if self.attention == "varlen":
            return "varlen (cu_seqlens)"
        return f"sdpa, block-diagonal causal mask (rows of {self.max_tokens})"


def ablation_rows(settings: Settings, varlen: bool) -> list[Variant]:
    """Rows a-d (and d2); ``varlen``: row d runs varlen attention, else sdpa's block-diagonal mask."""
    packed = "varlen" if varlen else "mask"
    rows = [
        Variant("a", "a. baseline (padded, checkpointing, plain pooling + loss)", fused=False, packed=False,
                attention="padded"),
        Variant("b", "b. + Liger RMSNorm/RoPE/SwiGLU", fused=False, packed=False, attention="padded", liger=True),
        Variant("c", "c. + fused pooling + loss", fused=True, packed=False, attention="padded", liger=True),
        Variant("d", f"d. + packing ({packed}), checkpointing by memory budget", fused=True, packed=True,
                attention=packed, max_tokens=settings.max_tokens, checkpointing=None, liger=True),
    ]  # fmt: skip
    if 2 * settings.max_length < settings.max_tokens:
        width = 2 * settings.max_length
        rows.append(Variant("d2", f"d2. packing (mask), rows of {width}", fused=True, packed=True, attention="mask",
                            max_tokens=width, checkpointing=None, liger=True))  # fmt: skip
    return rows


def gradient_cache_row(queries: int, attention: str, max_tokens: int) -> Variant:
    size = f"{queries // 1024}k" if queries % 1024 == 0 else str(queries)
    return Variant(f"e{queries}", f"e. + gradient cache, {size} queries", fused=True, packed=True, attention=attention,
                   max_tokens=max_tokens, gc_queries=queries, checkpointing=None, liger=True)  # fmt: skip


TOTAL_STEPS = 1000  # the schedule's length: any; a row runs a few steps


def mode(variant: Variant) -> bool | str:
    """``model.gradient_checkpointing`` of a row."""
    return "auto" if variant.checkpointing is None else variant.checkpointing


def row_config(variant: Variant, settings: Settings, chunk_tokens: int | None, budget: int) -> TrainConfig:
    """The training config of a row: what Trainer.train_step reads (packing, row capacity, gradient cache, the
    engine's dtype and optimizer) as the trainer's defaults give them."""
    return TrainConfig(
        model=ModelConfig(max_length=settings.max_length, gradient_checkpointing=mode(variant),
                          activation_budget_gb=budget / 2**30),
        data=DataConfig(batch_size=variant.gc_queries or settings.queries, packing=variant.packed,
                        max_tokens=variant.max_tokens or settings.max_tokens),
        grad_cache=GradCacheConfig(enabled=variant.gc_queries is not None, chunk_tokens=chunk_tokens),
        engine="ddp", resume="never", tensorboard=False, plot=False,
    )  # fmt: skip


def make_trainer(config: TrainConfig, encoder: Encoder, loss_fn: nn.Module, device: str,
                 recompute: RecomputePolicy) -> Trainer:  # fmt: skip
    """A Trainer built from its fields as Trainer.from_config builds them (the encoder's layer exits, engine,
    collator), with no data source (the rows hand ``train_step`` their own TrainingBatch) and the row's recompute
    policy."""
    encoder.set_layer_exits(config.model.layer_exits)  # model.layer_exits, as Trainer.from_config sets it
    engine = build_engine(config, encoder, TOTAL_STEPS, world_size=1)
    collator = Collator(
        pad_token_id=encoder.text_tokenizer.pad_token_id,
        mode="packed" if config.data.packing else "padded",
        max_tokens=config.data.max_tokens,
    )
    return Trainer(config=config, runtime=Runtime(0, 1, torch.device(device)), engine=engine, sampler=None,
                   validation=None, collator=collator, loss_fn=loss_fn, total_steps=TOTAL_STEPS,
                   recompute=recompute)  # fmt: skip


def make_encoder(model: PreTrainedModel, fused: bool, max_length: int) -> Encoder:
    cls = Encoder if fused else PlainPoolingEncoder
    return cls(model, eos_tokenizer(), pooling="last", max_length=max_length).train()


# ------------------------------------------------------------------------------------------------ FLOP counting
def phase() -> str:
    """Where an op runs: "backward" (inside autograd's backward, checkpointing's recompute included), "no_grad"
    (the gradient cache's first pass) or "forward" (with grad)."""
    if torch._C._current_graph_task_id() != -1:
        return "backward"
    return "forward" if torch.is_grad_enabled() else "no_grad"


def _varlen_ops() -> tuple[Any, Any]:
    """torch's varlen attention ops (forward, backward) as FlopCounterMode sees them, or Nones."""
    ops = getattr(torch.ops, "torch_attn", None)
    try:
        return ops._varlen_attn, ops._varlen_attn_backward
    except AttributeError:
        return None, None


class AttentionLedger:
    """The attention FLOPs of a step by the kernel's actual work, call by call.

    ``kind`` "dense": sdpa with a mask computes every row's full W x W scores; "varlen": the causal pairs of each
    segment the collator hands the kernel (``attn_cu_seqlens``: every text, every run of padding). A call's forward
    is 4 x d_attn FLOPs per score; its backward ATTENTION_BACKWARD x that; a forward inside backward is
    checkpointing's recompute, one without grad the gradient cache's first pass. The batch is the one the
    :class:`StepObserver` saw last (a backward follows its own chunk's forward)."""

    def __init__(self, observer: StepObserver, kind: str) -> None:
        self.observer = observer
        self.kind = kind
        self.flops = dict.fromkeys(("forward", "backward", "recompute", "no_grad"), 0)
        self._pairs: dict[int, int] = {}

    def pairs(self, batch: EncoderBatch) -> int:
        key = id(batch)
        if key not in self._pairs:
            rows, width = batch.input_ids.shape
            if self.kind == "dense":
                self._pairs[key] = rows * width * width
            else:
                s = batch.attn_cu_seqlens.numpy().astype(np.int64)
                s = np.diff(s)
                self._pairs[key] = int((s * (s + 1) // 2).sum())
        return self._pairs[key]

    def work(self, d_attn: int) -> int:
        return 4 * d_attn * self.pairs(self.observer.batch)

    def forward(self, d_attn: int, backward_follows: bool) -> None:
        """A forward call; ``backward_follows``: the attention computes no backward of its own (the zero-FLOP
        stand-in), so a forward with grad adds it here."""
        # Grad mode is off inside a custom op's kernel (torch's varlen attention): the forward's own mode, as the
        # observer saw it, tells a forward with grad from the gradient cache's no-grad pass.
        work = self.work(d_attn)
        where = "backward" if phase() == "backward" else "forward" if self.observer.grad else "no_grad"
        if where == "forward":
            self.flops["forward"] += work
            if backward_follows:
                self.flops["backward"] += int(ATTENTION_BACKWARD * work)
        else:
            self.flops["recompute" if where == "backward" else "no_grad"] += work

    def backward(self, d_attn: int) -> None:
        self.flops["backward"] += int(ATTENTION_BACKWARD * self.work(d_attn))

    @property
    def total(self) -> int:
        return sum(self.flops.values())


class PhaseFlopCounter(FlopCounterMode):
    """FlopCounterMode that splits its count by :func:`phase` and hands torch's varlen attention calls to the
    ledger instead of counting them (torch's formula on meta takes every segment as long as the longest and
    counts no causal halving)."""

    def __init__(self, ledger: AttentionLedger) -> None:
        super().__init__(display=False)
        self.ledger = ledger
        self.phases = dict.fromkeys(("forward", "backward", "no_grad"), 0)
        self.varlen_forward, self.varlen_backward = _varlen_ops()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet is not None and func_packet is self.varlen_forward:  # query [T, H, D]
            self.ledger.forward(args[0].shape[1] * args[0].shape[2], backward_follows=False)
            return out
        if func_packet is not None and func_packet is self.varlen_backward:  # grad_out, query [T, H, D], ...
            self.ledger.backward(args[1].shape[1] * args[1].shape[2])
            return out
        if func_packet in self.flop_registry:
            self.phases[phase()] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


_LEDGER: AttentionLedger | None = None  # the ledger of the step being counted


def count_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """The stand-in for sdpa (and for varlen where torch has no varlen_attn) under --flops: it records the call in
    the current :class:`AttentionLedger` and returns an output of the right shape [B, W, H, d] made of elementwise
    ops (no FLOPs) whose gradient reaches q, k and v, so that the projections' backward runs as with real
    attention. Registered in transformers' AttentionInterface but not in its mask interface: transformers then
    builds no mask (building one reads values, which meta tensors do not have)."""
    if _LEDGER is not None:
        _LEDGER.forward(query.shape[1] * query.shape[-1], backward_follows=True)
    out = query + (key + value).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(COUNT_ATTENTION, count_attention)


def count_step(
    model: PreTrainedModel, variant: Variant, batch: Any, settings: Settings, budget: int, chunk_tokens: int | None
) -> dict[str, Any]:
    """The FLOPs of one ``Trainer.train_step`` of ``variant`` on ``batch``, on the meta device, with its breakdown
    (:func:`count_train_step` of the row's config)."""
    config = row_config(variant, settings, chunk_tokens, budget)

    def policy_of(encoder: Encoder) -> RecomputePolicy:
        return recompute_policy_of(ActivationMemory(encoder), mode(variant), budget, torch.bfloat16)

    return count_train_step(model, variant, batch, config, policy_of)


def count_train_step(
    model: PreTrainedModel,
    variant: Variant,
    batch: Any,
    config: TrainConfig,
    policy_of: Callable[[Encoder], RecomputePolicy],
    world_size: int = 1,
) -> dict[str, Any]:
    """The FLOPs of one ``Trainer.train_step`` of ``config`` (the trainer reads its packing, row capacity and gradient
    cache; the DDP engine of one process runs the step) on ``batch``, on the meta device, with its breakdown.
    ``variant`` names the row and its attention layout; ``policy_of`` gives the trainer's RecomputePolicy for the
    encoder built here; ``world_size``: ranks the loss's in-batch term gathers positives from.

    Attention: torch's varlen kernel (``f2llm_varlen``, its fake kernel on meta) for varlen rows where this torch
    has it, else :func:`count_attention`."""
    global _LEDGER
    real_varlen = variant.attention == "varlen" and varlen_available()
    set_attention(model, VARLEN_ATTENTION if real_varlen else COUNT_ATTENTION)
    encoder = make_encoder(model, variant.fused, config.model.max_length)
    policy = policy_of(encoder)
    observer = StepObserver(encoder)
    ledger = AttentionLedger(observer, "varlen" if variant.attention == "varlen" else "dense")
    loss = CountedLoss(variant.fused, world_size)
    trainer = make_trainer(config, encoder, loss, "meta", policy)
    policy.activation_bytes(0)  # the policy's estimate, measured (on meta) before counting starts
    hook = encoder.register_forward_pre_hook(observer)
    t0 = time.perf_counter()
    _LEDGER = ledger
    try:
        with PhaseFlopCounter(ledger) as counter:
            trainer.train_step(batch)
    finally:
        _LEDGER = None
        hook.remove()
    lengths = batch_lengths(batch)
    n_params = matmul_params(model)
    phases = counter.phases
    linear = sum(phases.values())
    linear_recompute = phases["backward"] - 2 * phases["forward"]
    attention_recompute = ledger.flops["recompute"] + ledger.flops["no_grad"]
    executed = linear + ledger.total + loss.flops
    ideal = ideal_flops(model.config, n_params, lengths)
    positions = sum(observer.positions)
    recompute = linear_recompute + phases["no_grad"] + attention_recompute
    largest = max(observer.positions)
    attention = variant.attention_label() + (
        "; f2llm_varlen (torch varlen_attn, fake kernel)" if real_varlen else "; counted by call (stand-in)"
    )
    cache = config.grad_cache
    chunk_tokens = cache.chunk_tokens if cache.enabled else None
    chunk_texts = cache.chunk_texts if cache.enabled and cache.chunk_tokens is None else None
    return {
        "row": variant.row, "key": variant.key, "status": "ok", "attention": attention,
        "layout": f"packed (rows of {variant.max_tokens})" if variant.packed else "padded",
        "pooling_loss": "f2llm fused" if variant.fused else "plain torch",
        "liger": "as on CUDA (not applied on meta: no matmul changes)" if variant.liger else False,
        "checkpointing": observer.describe(policy), "queries": config.data.rank_batch_size(1),
        "texts": len(lengths), "chunks": len(observer.positions), "chunk_tokens": chunk_tokens,
        **({"chunk_texts": chunk_texts} if chunk_texts is not None else {}),
        "real_tokens": int(lengths.sum()), "positions": positions, "real_share": int(lengths.sum()) / positions,
        "largest_forward_activations_gib": policy.activation_bytes(largest) / 2**30,
        "executed_flops": executed, "ideal_flops": ideal, "ratio": executed / ideal,
        "executed_tflop": executed / 1e12, "ideal_tflop": ideal / 1e12,
        "linear_flops": linear, "linear_forward_flops": phases["forward"], "linear_backward_flops": phases["backward"],
        "linear_no_grad_flops": phases["no_grad"], "linear_recompute_flops": linear_recompute,
        "attention_flops": ledger.total, "attention_parts": dict(ledger.flops), "loss_flops": loss.flops,
        "recompute_flops": recompute,
        "linear_share": linear / executed, "attention_share": ledger.total / executed,
        "loss_share": loss.flops / executed, "recompute_share": recompute / executed,
        "ideal_linear_flops": 6 * n_params * int(lengths.sum()),
        "count_s": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


def run_flops(settings: Settings, model_names: list[str], out: Path) -> list[dict[str, Any]]:
    """--flops: every row of every model, counted (see the module docstring); writes train_step_flops.json / .md."""
    pool = scifact_lengths(settings.length_scale)
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, float | None]] = {}
    models_meta: dict[str, Any] = {}
    meta = {"what": "FLOPs of one Trainer.train_step on the meta device (no hardware): linear layers counted by "
                    "torch.utils.flop_counter.FlopCounterMode, attention and loss analytic by their kernels' work",
            "ideal": "6 N T + 3 x layers x 4 d_attn x sum len (len + 1) / 2 (forward + backward of the real tokens "
                     "once)",
            "attention_backward_factor": ATTENTION_BACKWARD, "lengths": pool.describe(), "settings": asdict(settings),
            "gpu_memory_gb": settings.memory_gb, "state_bytes_per_param": STATE_BYTES_PER_PARAM,
            "models": models_meta}  # fmt: skip
    title = "FLOPs of one training step, executed vs ideal (meta device)"

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print({k: row.get(k) for k in FLOPS_COLUMNS}, flush=True)
        write_results(out, "train_step_flops", rows, FLOPS_COLUMNS, title, meta=meta, quiet=True,
                      extra={"summary": summary})  # fmt: skip

    for name in model_names:
        dims = QWEN3_DIMS[name]
        label = f"Qwen3-{name[:-1]}B" if name.endswith("b") else f"Qwen3-{name}"
        model = build_backbone(dims, "meta", COUNT_ATTENTION)
        budget = activation_budget_bytes(model, settings.memory_gb)
        probe = make_encoder(model, True, settings.max_length)
        memory = ActivationMemory(probe)
        fixed, per_token = memory.profile(torch.bfloat16)
        chunk = settings.gc_chunk_tokens or chunk_tokens_fitting(memory, budget, torch.bfloat16)
        models_meta[label] = {
            "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model),
            "state_gb": state_bytes(model) / 1e9, "activation_budget_gb": budget / 1e9,
            "activation_budget_gib": budget / 2**30, "activation_bytes_per_token": per_token,
            "activation_bytes_fixed": fixed, "gc_chunk_tokens": chunk, **dims,
        }  # fmt: skip
        base = draw_batch(pool, settings.queries, settings.negatives, dims["vocab_size"], 0, settings.seed)
        variants = ablation_rows(settings, varlen=True)
        variants.insert(4, Variant("d0", "d0. as d, checkpointing off (d where its activations fit)", fused=True,
                                   packed=True, attention="varlen", max_tokens=settings.max_tokens,
                                   checkpointing=False, liger=True))  # fmt: skip
        variants += [gradient_cache_row(q, "varlen", settings.max_tokens) for q in settings.gc_batches]
        found: dict[str, float] = {}
        for variant in variants:
            gc_index = settings.gc_batches.index(variant.gc_queries) if variant.gc_queries else None
            batch = (
                base
                if gc_index is None
                else draw_batch(
                    pool, variant.gc_queries, settings.negatives, dims["vocab_size"], 0, settings.seed + 1 + gc_index
                )
            )
            try:
                row = count_step(model, variant, batch, settings, budget, chunk if gc_index is not None else None)
                found.setdefault("e" if gc_index is not None else variant.key, row["ratio"])
            except Exception as exc:
                row = {"row": variant.row, "key": variant.key, "status": failure_status(exc)}
            record({"model": label, **row})
        summary[label] = {"baseline_ratio": found.get("a"), "full_stack_ratio": found.get("d"),
                          "grad_cache_ratio": found.get("e"), "full_stack_no_checkpointing_ratio": found.get("d0"),
                          "grad_cache_queries": settings.gc_batches[0] if settings.gc_batches else None,
                          "activation_budget_gib": budget / 2**30}  # fmt: skip
        del model
        gc.collect()
    write_results(out, "train_step_flops", rows, FLOPS_COLUMNS, title, meta=meta, extra={"summary": summary})
    print(json.dumps(summary, indent=1))
    return rows


# ------------------------------------------------------------------------------------------------ --config
RECIPE_GLOBAL_QUERIES = 512  # the recipe's global batch: 16 queries per GPU x 32 GPUs (the configs' header)
HUB_QWEN3 = re.compile(r"Qwen/Qwen3-(0\.6B|1\.7B|4B)(-Base)?", re.IGNORECASE)
# The README's gradient-cache launches (its "Launches" block): the recipe's 512 queries on one GPU, and on 8 GPUs of
# 64 queries. Its third launch is f2llm-4b as shipped. Keep these in step with the README.
README_LAUNCHES = (
    ("f2llm-0.6b", ("engine=ddp", "data.batch_size=512", "grad_cache.enabled=true", "grad_cache.chunk_tokens=16384")),
    ("f2llm-1.7b", ("engine=ddp", "data.batch_size=64", "grad_cache.enabled=true", "grad_cache.chunk_tokens=6144")),
)
CONFIG_COLUMNS = ["config", "engine", "world_size", "state_gib", "budget_gib", "checkpointing", "queries", "texts",
                  "chunks", "real_share", "executed_tflop", "ideal_tflop", "ratio", "recompute_share",
                  "command"]  # fmt: skip


def shipped_recipe_configs() -> list[str]:
    """The shipped recipe configs by name (f2llm-*.yaml; not the CPU demo)."""
    from f2llm.config import shipped_configs

    return sorted(Path(name).stem for name in shipped_configs(".yaml") if name.startswith("f2llm-"))


def backbone_config(name_or_path: str) -> tuple[str, PretrainedConfig]:
    """(label, model config) of ``model.name_or_path``: a local folder's config.json (AutoConfig), or the released
    Qwen3 0.6B / 1.7B / 4B by hub name (their dimensions, QWEN3_DIMS: nothing is downloaded)."""
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder)
        config.use_cache = False
        return folder.name, config
    match = HUB_QWEN3.fullmatch(name_or_path)
    if match is None:
        raise SystemExit(
            f"bench_train_step --config: model.name_or_path {name_or_path!r} is neither a local folder with a "
            "config.json nor Qwen/Qwen3-0.6B, -1.7B or -4B (the models whose dimensions this script knows offline)"
        )
    size = match.group(1).upper()
    return f"Qwen3-{size}", qwen3_config(QWEN3_DIMS[size.lower()])


def default_world_size(config: TrainConfig) -> tuple[int, str]:
    """(ranks, why) a config is written for: the recipe's global batch over its per-rank batch. The configs say
    global batch = data.batch_size x GPUs, and on fewer GPUs raise data.batch_size (with the gradient cache) to keep
    512 queries: so the rule holds with the gradient cache on or off (the one-GPU launch's 512 queries give 1)."""
    size = config.data.rank_batch_size(1)  # a config with data.global_batch_size runs it on one rank
    ranks = max(1, RECIPE_GLOBAL_QUERIES // size)
    return ranks, f"the recipe's global batch of {RECIPE_GLOBAL_QUERIES} queries / data.batch_size {size}"


def config_state(config: TrainConfig, params: int, world_size: int) -> tuple[TrainingState, str]:
    """(per-rank training state, engine label) of the config's engine at ``world_size`` ranks, by
    f2llm.engine.training_state_bytes: the formula the engines' ``step_state_bytes`` use."""
    compute = resolve_dtype(config.model.dtype, torch.device("cuda"))
    stage = 0
    if config.engine == "deepspeed":
        stage = int(deepspeed_config(config, compute, world_size).get("zero_optimization", {}).get("stage", 0))
    label = f"deepspeed ZeRO-{stage}" if config.engine == "deepspeed" else "ddp"
    return training_state_bytes(config.engine, params, params, world_size, compute, stage), label


def config_budget(config: TrainConfig, state: TrainingState, memory_gb: float) -> tuple[int | None, str]:
    """(activation budget in bytes, where it comes from), as the trainer sets it on a GPU of ``memory_gb``:
    ``model.activation_budget_gb`` as it is when set, else (``auto``) :func:`derived_budget_bytes`; None when the
    checkpointing is fixed (no budget is read)."""
    model = config.model
    if model.activation_budget_gb is not None:
        return int(model.activation_budget_gb * 2**30), "model.activation_budget_gb"
    if model.gradient_checkpointing != "auto":
        return None, f"none: model.gradient_checkpointing {model.gradient_checkpointing}"
    source = (
        f"{ACTIVATION_MEMORY_SHARE:.0%} of an {memory_gb:g} GB GPU less {state.resident / 1e9:.2f} GB of weights and "
        f"{state.step / 1e9:.2f} GB of step state"
    )
    return derived_budget_bytes(state, memory_gb), source


def config_attention(config: TrainConfig) -> str:
    """The ledger's layout for the config's attention on CUDA: "varlen" for the varlen kernels (the default, or
    flash_attention_2 / f2llm_varlen; padded batches too, whose padding runs are segments of their own), else sdpa /
    eager: "mask" when packed (block-diagonal causal mask), "padded" otherwise."""
    name = config.model.attn_implementation
    if name is None or name == VARLEN_ATTENTION or name.startswith("flash_attention"):
        return "varlen"
    return "mask" if config.data.packing else "padded"


def count_config(
    name: str, overrides: list[str], world_size: int | None, memory_gb: float, seed: int = 0
) -> dict[str, Any]:
    """One ``Trainer.train_step`` of ``load_config(name, overrides)`` counted on the meta device, one rank of
    ``world_size`` (None: :func:`default_world_size`); see the module docstring (--config)."""
    config = load_config(name, overrides)
    if config.model.lora is not None or config.distill is not None:
        raise SystemExit(
            "bench_train_step --config: model.lora and distill are not counted (LoRA skips the frozen weights' "
            "gradients, distillation adds a teacher): count with model.lora=null distill=null"
        )
    label, backbone = backbone_config(config.model.name_or_path)
    if world_size is None:
        world_size, why = default_world_size(config)
    else:
        why = "--world-size"
    model = build_backbone(backbone, "meta", COUNT_ATTENTION)
    params = sum(p.numel() for p in model.parameters())
    state, engine = config_state(config, params, world_size)
    budget, source = config_budget(config, state, memory_gb)
    compute = resolve_dtype(config.model.dtype, torch.device("cuda"))
    # The trainer estimates activations on the encoder as loaded: DeepSpeed's weights are in the compute dtype (no
    # autocast copies of them are saved), DDP's fp32 (the counted backbone).
    loaded = weights_dtype(config, torch.device("cuda"))
    estimator = None
    if loaded != torch.float32:
        as_loaded = build_backbone(backbone, "meta", COUNT_ATTENTION, loaded)
        estimator = make_encoder(as_loaded, True, config.model.max_length)
    checkpointing = config.model.gradient_checkpointing

    def policy_of(encoder: Encoder) -> RecomputePolicy:
        return recompute_policy_of(ActivationMemory(estimator or encoder), checkpointing, budget, compute, source)

    pool = scifact_lengths(1.0)
    cap = config.model.max_length
    pool = LengthPool(np.minimum(pool.queries, cap), np.minimum(pool.documents, cap))
    queries, negatives = config.data.rank_batch_size(1), config.data.num_negatives["retrieval"]
    batch = draw_batch(pool, queries, negatives, backbone.vocab_size, 0, seed)
    shown = " ".join([name, *overrides])
    variant = Variant(
        "config", shown, fused=True, packed=config.data.packing, attention=config_attention(config),
        max_tokens=config.data.max_tokens if config.data.packing else None,
        gc_queries=queries if config.grad_cache.enabled else None,
        checkpointing=None if checkpointing == "auto" else bool(checkpointing), liger=config.model.liger is not False,
    )  # fmt: skip
    # The step runs the DDP engine of one process on meta: the FLOPs are the same with DeepSpeed (its bf16 weights
    # change no matmul) and at any world size (but the in-batch loss, which CountedLoss scales); fp32 compute, since
    # autocast has no meta backend (the FLOPs do not depend on the dtype; the policy's estimate is for `compute`).
    counted = replace(config, engine="ddp", model=replace(config.model, dtype="float32"), resume="never",
                      tensorboard=False, plot=False)  # fmt: skip
    row = count_train_step(model, variant, batch, counted, policy_of, world_size)
    command = f"python benchmarks/bench_train_step.py --flops --config {shown} --world-size {world_size}"
    if memory_gb != GPU_MEMORY_GB:
        command += f" --memory-gb {memory_gb:g}"
    dims = config.loss.matryoshka_dims
    return {
        "config": shown, "command": command, "model": label, "engine": engine, "world_size": world_size,
        "world_size_rule": why, "params": params, "state": asdict(state), "state_gib": state.total / 2**30,
        "memory_gb": memory_gb, "budget_gib": None if budget is None else budget / 2**30, "budget_source": source,
        "matryoshka_dims": dims, "layer_exits": config.model.layer_exits, "max_length": cap, "negatives": negatives,
        **row,
    }  # fmt: skip


def run_config_flops(
    entries: list[tuple[str, list[str]]], world_size: int | None, memory_gb: float, out: Path
) -> list[dict[str, Any]]:
    """--flops --config: each (config name, overrides) counted (:func:`count_config`); writes
    train_step_flops_configs.json / .md, and prints the last config's ratio as the last line."""
    rows: list[dict[str, Any]] = []
    meta = {"what": "FLOPs of one Trainer.train_step of each config, one rank, on the meta device (see "
                    "bench_train_step.py, --config)",
            "ideal": "6 N T + 3 x layers x 4 d_attn x sum len (len + 1) / 2 (forward + backward of the real tokens "
                     "once)",
            "attention_backward_factor": ATTENTION_BACKWARD, "gpu_memory_gb": memory_gb,
            "activation_memory_share": ACTIVATION_MEMORY_SHARE, "recipe_global_queries": RECIPE_GLOBAL_QUERIES,
            "lengths": scifact_lengths(1.0).describe()}  # fmt: skip
    title = "FLOPs of one training step per shipped config, executed vs ideal (meta device)"
    for i, (name, overrides) in enumerate(entries):
        row = count_config(name, overrides, world_size, memory_gb)
        rows.append(row)
        print(f"bench_train_step: {row['config']}: {row['engine']} at world size {row['world_size']} "
              f"({row['world_size_rule']}); per-rank state {row['state_gib']:.2f} GiB; activation budget "
              f"{row['budget_source']}; checkpointing {row['checkpointing']}; {row['chunks']} forward(s) with grad; "
              f"executed/ideal {row['ratio']:.3f}", flush=True)  # fmt: skip
        write_results(out, "train_step_flops_configs", rows, CONFIG_COLUMNS, title, meta=meta,
                      quiet=i < len(entries) - 1)  # fmt: skip
    if len(rows) == 1:
        print(f"executed/ideal FLOPs: {rows[0]['ratio']:.2f}")
    return rows


# ------------------------------------------------------------------------------------------------ timed rows
@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Yields a dict whose "mib" is set, on exit, to the peak memory during the body (see the module docstring)."""
    result: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["mib"] = torch.cuda.max_memory_allocated() / MIB
        return
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    yield result
    status = Path("/proc/self/status").read_text()
    hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    result["mib"] = hwm_kib / 1024


def liger_unavailable(device: str) -> str | None:
    """Why Liger cannot run here, or None when it can."""
    if device != "cuda":
        return "skipped: Liger's Triton kernels run on CUDA only"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        return f"skipped: liger_kernel not importable ({exc}); carry its wheel (benchmarks/README.md)"
    return None


def varlen_attention(device: str) -> str | None:
    """The varlen attention the Encoder runs packed batches with here (flash_attention_2, else f2llm_varlen: what
    the trainer picks by default on CUDA), or None: then sdpa with the block-diagonal mask."""
    name = default_attn_implementation("qwen3", device, torch.bfloat16)
    return None if name == "sdpa" else name


def failure_status(exc: BaseException) -> str:
    """A row's status for a step that raised: "OOM", or the error's type and first line (traceback printed)."""
    if is_oom(exc):
        return "OOM"
    traceback.print_exc()
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first_line}"


@dataclass
class Bench:
    """The backbone and measurement state shared by the timed rows."""

    settings: Settings
    model: PreTrainedModel
    n_params: int
    budget: int
    peak_tflops: float
    varlen: str | None  # the varlen attention implementation, where one runs
    liger: bool = False  # Liger applied (from row b on)
    start: float = field(default_factory=time.perf_counter)

    @property
    def config(self) -> Qwen3Config:
        return self.model.config

    def sync(self) -> None:
        if self.settings.device == "cuda":
            torch.cuda.synchronize()

    def measure(self, step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], float]:
        """(step times in s, peak memory in MiB) of ``steps`` steps after ``warmup`` untimed ones."""
        for _ in range(warmup):
            step()
        self.sync()
        with peak_memory(self.settings.device) as peak:
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                self.sync()
                times.append(time.perf_counter() - t0)
        return times, peak["mib"]

    def run(self, variant: Variant, batch: Any) -> dict[str, Any]:
        """One timed row: a Trainer of the row's config around the shared backbone, ``train_step`` on ``batch``."""
        settings = self.settings
        if variant.liger and not self.liger and liger_unavailable(settings.device) is None:
            apply_liger_kernels(self.model)
            self.liger = True
        attention = self.varlen if variant.attention == "varlen" else "sdpa"
        set_attention(self.model, attention)
        encoder = make_encoder(self.model, variant.fused, settings.max_length)
        compute = torch.bfloat16 if settings.device == "cuda" else torch.float32
        memory = ActivationMemory(encoder)  # one measurement per row: the policy's and the chunk size's
        policy = recompute_policy_of(memory, mode(variant), self.budget, compute)
        chunk_tokens = None
        if variant.gc_queries is not None:
            chunk_tokens = settings.gc_chunk_tokens or chunk_tokens_fitting(memory, self.budget, compute)
        policy.activation_bytes(0)  # the policy's estimate, measured (on meta) before the timed steps
        observer = StepObserver(encoder)
        hook = encoder.register_forward_pre_hook(observer)
        loss = F2LLMLoss(TEMPERATURE, equal_batches=True) if variant.fused else PlainF2LLMLoss(TEMPERATURE)
        config = row_config(variant, settings, chunk_tokens, self.budget)
        trainer = make_trainer(config, encoder, loss, settings.device, policy)
        lengths = batch_lengths(batch)
        row: dict[str, Any] = {
            "row": variant.row, "key": variant.key,
            "attention": variant.attention_label() + ("" if attention == "sdpa" else f" ({attention})"),
            "layout": f"packed (rows of {variant.max_tokens})" if variant.packed else "padded", "liger": self.liger,
            "pooling_loss": "f2llm fused" if variant.fused else "plain torch", "queries": len(batch.queries),
            "texts": len(lengths), "real_tokens": int(lengths.sum()), "chunk_tokens": chunk_tokens,
        }  # fmt: skip
        cached = variant.gc_queries is not None
        warmup, steps = (0, settings.gc_steps) if cached else (settings.warmup, settings.steps)
        try:
            times, peak = self.measure(lambda: trainer.train_step(batch), warmup, steps)
        finally:
            hook.remove()
        per_step = len(observer.positions) // max(1, warmup + steps)
        positions = sum(observer.positions[:per_step])
        step_s = statistics.median(times)
        flops = ideal_flops(self.config, self.n_params, lengths)
        row.update(status="ok", checkpointing=observer.describe(policy), chunks=per_step, positions=positions,
                   real_share=row["real_tokens"] / positions, step_s=step_s, step_times_s=times,
                   tokens_per_s=row["real_tokens"] / step_s, model_tflop=flops / 1e12,
                   mfu_pct=100 * flops / step_s / (self.peak_tflops * 1e12), peak_mib=peak, steps=steps)  # fmt: skip
        return row

    def release(self) -> None:
        """Drop gradients a failed step may have left and return cached blocks, so the next row starts clean."""
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        if self.settings.device == "cuda":
            torch.cuda.empty_cache()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run_all(settings: Settings, out: Path) -> list[dict[str, Any]]:
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    if settings.device == "cpu":
        # One thread: on a small shared machine a second OpenMP thread that waits for a busy core makes step
        # times jump tenfold from run to run; one thread gives repeatable CPU numbers.
        torch.set_num_threads(1)
    pool = scifact_lengths(settings.length_scale)
    peak_tflops, peak_what = matmul_tflops(settings.device)
    model = build_backbone(QWEN3_DIMS[settings.model], settings.device, "sdpa")
    budget = activation_budget_bytes(model, settings.memory_gb)
    varlen = varlen_attention(settings.device)
    bench = Bench(settings, model, matmul_params(model), budget, peak_tflops, varlen, start=start)
    cfg = bench.config
    meta = {"model": f"Qwen3-{settings.model} dimensions, random weights", "dtype": "float32 weights, " + (
                "bf16 autocast" if settings.device == "cuda" else "float32 compute"),
            "params": sum(p.numel() for p in model.parameters()), "matmul_params": bench.n_params,
            "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size, "attn_implementation": f"sdpa; packed: {varlen or 'sdpa (mask)'}",
            "step": "f2llm.trainer.Trainer.train_step (DDP engine, one process)",
            "activation_budget_gb": budget / 1e9, "gpu_memory_gb": settings.memory_gb,
            "peak_tflops": peak_tflops, "peak_measured": peak_what, "lengths": pool.describe(),
            "settings": asdict(settings), "torch_threads": torch.get_num_threads()}  # fmt: skip
    name = f"train_step_{settings.device}"
    title = f"training step ablation ({meta['model']}, {settings.device})"
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], last: bool = False) -> None:
        rows.append(row)
        print({k: row.get(k) for k in COLUMNS}, flush=True)
        write_results(out, name, rows, COLUMNS, title, meta=meta, quiet=not last)

    base = draw_batch(pool, settings.queries, settings.negatives, cfg.vocab_size, 0, settings.seed)
    variants = ablation_rows(settings, varlen=varlen is not None)
    best_packed: tuple[dict[str, Any], Variant] | None = None  # the faster packed row and its variant
    for variant in variants:
        row: dict[str, Any] = {"row": variant.row, "key": variant.key, "queries": settings.queries}
        skip = liger_unavailable(settings.device) if variant.key == "b" else None
        if skip:
            record({**row, "status": skip})
            continue
        try:
            row = bench.run(variant, base)
            if variant.packed and (best_packed is None or row["tokens_per_s"] > best_packed[0]["tokens_per_s"]):
                best_packed = (row, variant)
        except Exception as exc:
            row["status"] = failure_status(exc)
        bench.release()
        record(row)

    # Seconds per real token of the layout the gradient-cache rows use, to predict their time.
    measured = [r for r in rows if r.get("status") == "ok"]
    reference = best_packed[0] if best_packed else (measured[-1] if measured else None)
    per_token = reference["step_s"] / reference["real_tokens"] if reference else None
    overhead = GC_OVERHEAD
    layout = best_packed[1] if best_packed else Variant("d", "", True, True, "mask", settings.max_tokens)
    if varlen is not None:
        layout = next(v for v in variants if v.key == "d")
    for i, gc_queries in enumerate(settings.gc_batches):
        variant = gradient_cache_row(gc_queries, layout.attention, layout.max_tokens or settings.max_tokens)
        row = {"row": variant.row, "key": variant.key, "queries": gc_queries}
        last = i == len(settings.gc_batches) - 1
        expected_tokens = gc_queries * (pool.queries.mean() + settings.negatives * pool.documents.mean()
                                        + pool.documents.mean())  # fmt: skip
        if settings.budget_s is not None and per_token is not None:
            predicted = per_token * expected_tokens * overhead * settings.gc_steps
            left = settings.budget_s - (time.perf_counter() - start)
            if predicted > left:
                record({**row, "status": f"skipped: predicted {predicted:.0f} s > {max(left, 0):.0f} s left of "
                                         f"--budget-s {settings.budget_s:g}"}, last=last)  # fmt: skip
                continue
        try:
            batch = draw_batch(pool, gc_queries, settings.negatives, cfg.vocab_size, 0, settings.seed + 1 + i)
            row = bench.run(variant, batch)
            per_token, overhead = row["step_s"] / row["real_tokens"], 1.0
        except Exception as exc:
            row["status"] = failure_status(exc)
        bench.release()
        record(row, last=last)
    if not settings.gc_batches:
        write_results(out, name, rows, COLUMNS, title, meta=meta)
    return rows


# ------------------------------------------------------------------------------------------------ communication
COMM_ENGINES = {"ddp": None, "zero1": "zero1.json", "zero2": "zero2.json", "zero3": "zero3.json"}
COMM_COLUMNS = ["row", "status", "chunks", "collectives", "comm_mib", "gradient_mib", "per_gradient",
                "per_chunk_gradients"]  # fmt: skip
COMM_QUERIES = 8  # per rank; SNLI triplets: 3 texts per query
COMM_CHUNK_TEXTS = 6  # 24 texts per rank and step: 4 chunks
COMM_WARMUP = 3  # steps before the measured ones
SNLI = ROOT / "data" / "f2llm" / "snli.parquet"


def _tensor_bytes(*tensors: Any) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += _tensor_bytes(*t)
    return total


class CollectiveCounter:
    """Counts the collectives of this process and the bytes of their input tensors.

    It wraps torch.distributed's Python functions (DeepSpeed binds some of them when its communication backend
    starts, so :meth:`install` must run before). DDP's C++ reducer all-reduces its gradient buckets without going
    through Python unless a comm hook is registered: :func:`ddp_allreduce_hook` (torch's default all-reduce,
    registered from Python) routes them through the wrapped ``all_reduce``.
    """

    # name -> the collective's input tensor(s), from its arguments
    INPUTS: ClassVar[dict[str, Callable[..., Any]]] = {
        "all_reduce": lambda tensor, *a, **k: tensor,
        "reduce": lambda tensor, *a, **k: tensor,
        "broadcast": lambda tensor, *a, **k: tensor,
        "all_gather": lambda tensor_list, tensor, *a, **k: tensor,
        "all_gather_into_tensor": lambda output_tensor, input_tensor, *a, **k: input_tensor,
        "reduce_scatter": lambda output, input_list, *a, **k: input_list,
        "reduce_scatter_tensor": lambda output, input, *a, **k: input,
        "all_to_all_single": lambda output, input, *a, **k: input,
    }

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def reset(self) -> None:
        self.calls = self.bytes = 0

    def install(self) -> None:
        import torch.distributed as dist

        for name, inputs in self.INPUTS.items():
            original = getattr(dist, name)

            def counted(*args: Any, _original: Callable = original, _inputs: Callable = inputs, **kwargs: Any) -> Any:
                self.calls += 1
                self.bytes += _tensor_bytes(_inputs(*args, **kwargs))
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def write_comm_model(folder: Path) -> Path:
    """A tiny random Qwen3 with a whitespace tokenizer (every word one token): real text lengths, nothing to
    download."""
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = eos_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = Qwen3Config(**QWEN3_DIMS["tiny"], max_position_embeddings=512, use_cache=False)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def deepspeed_json(work: Path, name: str, rank: int) -> Path:
    """train/configs/<name>; for ZeRO-3 with every weight partitioned: the tiny model's matrices are all below
    the shipped stage3_param_persistence_threshold (1e5 elements, which Qwen3's matrices all exceed), so ZeRO-3
    would keep them whole on every rank and gather nothing."""
    path = ROOT / "train" / "configs" / name
    ds = json.loads(path.read_text())
    if ds["zero_optimization"]["stage"] != 3:
        return path
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    mine = work / f"{path.stem}-partitioned-rank{rank}.json"
    mine.write_text(json.dumps(ds))
    return mine


def comm_worker(work: Path, steps: int) -> int:
    """One rank of --comm: every (engine, chunking) row in one process group, through the trainer's own step.
    Rank 0 leaves the rows in ``work/rows.json`` for :func:`run_comm`."""
    counter = CollectiveCounter()
    counter.install()
    import torch.distributed as dist

    from f2llm.distributed import init_runtime
    from f2llm.trainer import Trainer

    runtime = init_runtime()
    rows: list[dict[str, Any]] = []
    for engine, ds_json in COMM_ENGINES.items():
        for chunks in (1, COMM_QUERIES * 3 // COMM_CHUNK_TEXTS):
            overrides = [
                f"model.name_or_path={work / 'model'}", "model.max_length=64", "model.gradient_checkpointing=false",
                f"data.paths=[{SNLI}]", f"data.batch_size={COMM_QUERIES}", f"data.cache_dir={work / 'cache'}",
                "data.sources.snli.num_negatives=1", f"optim.max_steps={steps + COMM_WARMUP}", "optim.epochs=1",
                f"output_dir={work / 'runs' / f'{engine}-{chunks}'}", "tensorboard=false", "plot=false",
                f"engine={'ddp' if ds_json is None else 'deepspeed'}",
            ]  # fmt: skip
            if ds_json is not None:
                overrides.append(f"deepspeed_config={deepspeed_json(work, ds_json, runtime.rank)}")
            if chunks > 1:
                overrides += ["grad_cache.enabled=true", f"grad_cache.chunk_texts={COMM_CHUNK_TEXTS}"]
            trainer = Trainer.from_config(load_config(None, overrides), runtime)
            if engine == "ddp":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                trainer.engine.module.register_comm_hook(None, allreduce_hook)
            batches = iter(trainer.sampler)
            # Warm-up: one-time set-up collectives are not a step's, and ZeRO-3 traces its first steps' order
            # of parameter use before it settles.
            for _ in range(COMM_WARMUP):
                trainer.train_step(next(batches))
            per_step = []
            for _ in range(steps):
                counter.reset()
                trainer.train_step(next(batches))
                per_step.append((counter.calls, counter.bytes))
            if runtime.main:
                print(f"bench_train_step --comm: {engine}, {chunks} chunk(s): (collectives, bytes) per step {per_step}")
            gradient = trainer.engine.gradient_bytes()
            calls, sent = per_step[-1]
            rows.append({
                "row": f"{engine}, {chunks} chunk{'s' if chunks > 1 else ''}", "status": "ok", "engine": engine,
                "chunks": chunks, "collectives": calls, "comm_mib": sent / MIB, "gradient_mib": gradient / MIB,
                "per_gradient": sent / gradient, "per_chunk_gradients": sent / gradient / chunks,
                "steps_measured": steps, "same_every_step": len(set(per_step)) == 1,
            })  # fmt: skip
            del trainer
            gc.collect()
    if runtime.main:
        meta = {"ranks": runtime.world_size, "backend": dist.get_backend(), "model": "Qwen3-tiny, random weights",
                "data": str(SNLI.relative_to(ROOT)), "queries_per_rank": COMM_QUERIES, "texts_per_query": 3,
                "chunk_texts": COMM_CHUNK_TEXTS, "warmup_steps": COMM_WARMUP, "steps": steps,
                "counted": "input bytes of collectives, one rank",
                "zero3": "stage3_param_persistence_threshold 0 (every weight partitioned, as Qwen3's are)"}  # fmt: skip
        (work / "rows.json").write_text(json.dumps({"rows": rows, "meta": meta}))
    dist.destroy_process_group()
    return 0


def run_comm(out: Path, steps: int) -> int:
    """--comm: torchrun with 2 ranks of comm_worker, in a scratch folder."""
    import subprocess
    import tempfile

    from f2llm.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="f2llm-comm-") as tmp:
        work = Path(tmp)
        write_comm_model(work / "model")
        script = str(Path(__file__).resolve())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               script, "--comm-worker", str(work), "--steps", str(steps)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        code = subprocess.run(cmd, env=env, check=False).returncode
        if code != 0:
            print(f"bench_train_step --comm: torchrun exited {code}", file=sys.stderr)
            return code
        result = json.loads((work / "rows.json").read_text())
    title = "what one training step communicates (2 CPU ranks, gloo)"
    write_results(out, "train_step_comm", result["rows"], COMM_COLUMNS, title, meta=result["meta"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available (tiny model)")
    parser.add_argument("--quick", action="store_true", help="fewest steps and smallest batches (smoke test)")
    parser.add_argument("--model", choices=[*sorted(QWEN3_DIMS), "all"],
                        help="backbone (default 0.6b; CPU: tiny; all: --flops of 0.6b, 1.7b, 4b)")  # fmt: skip
    parser.add_argument("--flops", action="store_true", help="executed vs ideal FLOPs of one step (meta device)")
    parser.add_argument("--budget-s", type=float, help="skip gradient-cache rows that would end the run past this")
    parser.add_argument("--gc-batches", help="comma-separated effective batches (queries) of the gradient-cache rows")
    parser.add_argument("--steps", type=int, help="timed steps per row (rows a-d)")
    parser.add_argument("--gc-steps", type=int, help="timed steps per gradient-cache row")
    parser.add_argument("--gc-chunk-tokens", type=int,
                        help="real tokens per gradient-cache chunk (default: what fits the budget)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, help="packed row capacity of row d")
    parser.add_argument("--memory-gb", type=float, help=f"GPU memory of the budget rule (default {GPU_MEMORY_GB:g})")
    parser.add_argument(
        "--config",
        help="--flops of one Trainer.train_step of this training config (a shipped name "
        "or a YAML path; 'all': every shipped recipe config and the README's gradient-cache launches)",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of --config (as f2llm train takes)")
    parser.add_argument(
        "--world-size",
        type=int,
        help="ranks the --config run trains on (default: 512 // data.batch_size, the recipe's global batch)",
    )
    parser.add_argument("--comm", action="store_true", help="what each engine communicates per step (2 CPU ranks)")
    parser.add_argument("--comm-worker", type=Path, help=argparse.SUPPRESS)  # one rank of --comm, under torchrun
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    # Overrides may come before or after the options (`--config f2llm-0.6b engine=ddp --world-size 1`).
    args = parser.parse_intermixed_args(argv)
    if args.comm_worker is not None:
        return comm_worker(args.comm_worker, args.steps or 2)
    if (args.overrides or args.world_size is not None) and args.config is None:
        parser.error("key=value overrides and --world-size go with --config")
    if args.config is not None:
        if not args.flops:
            parser.error("--config counts FLOPs: add --flops")
        if args.world_size is not None and args.world_size < 1:
            parser.error("--world-size must be >= 1")
        if args.config == "all":
            if args.overrides:
                parser.error("--config all takes no overrides (it counts the shipped configs as shipped)")
            entries = [(name, []) for name in shipped_recipe_configs()]
            entries += [(name, list(overrides)) for name, overrides in README_LAUNCHES]
        else:
            entries = [(args.config, list(args.overrides))]
        memory_gb = args.memory_gb if args.memory_gb is not None else GPU_MEMORY_GB
        run_config_flops(entries, args.world_size, memory_gb, args.out)
        return 0
    if args.comm:
        return run_comm(args.out, args.steps or 2)
    if args.flops:
        device = "meta"
    else:
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        if args.model == "all":
            parser.error("--model all is for --flops")
    names = list(FLOPS_MODELS) if args.model == "all" else [args.model or "0.6b"]
    settings = default_settings(device, None if args.model == "all" else args.model, args.quick)
    gc_batches = tuple(int(b) for b in args.gc_batches.split(",") if b) if args.gc_batches is not None else None
    overrides = {"budget_s": args.budget_s, "gc_batches": gc_batches, "steps": args.steps, "gc_steps": args.gc_steps,
                 "gc_chunk_tokens": args.gc_chunk_tokens, "max_tokens": args.max_tokens,
                 "memory_gb": args.memory_gb}  # fmt: skip
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    rows = run_flops(settings, names, args.out) if args.flops else run_all(settings, args.out)
    failed = [r["row"] for r in rows if str(r.get("status", "")).startswith("error")]
    if failed:
        print(f"bench_train_step: rows failed with an error: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
