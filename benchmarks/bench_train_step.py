"""Training-step benchmark: one F2LLM training step of a Qwen3 backbone, ablated one switch at a time.

Commands (from the repository root):
    python benchmarks/bench_train_step.py                          # CUDA: Qwen3-0.6B dimensions, every row
    python benchmarks/bench_train_step.py --model 4b --budget-s 300
    python benchmarks/bench_train_step.py --cpu                    # tiny Qwen3 on CPU (committed CPU results)
    python benchmarks/bench_train_step.py --cpu --quick            # seconds: every row type (CI smoke test)
    python benchmarks/bench_train_step.py --comm                   # what each engine communicates per step
It writes train_step_<device>.json and .md under --out (default benchmarks/results/local), after every row, so
that a run stopped by a timeout keeps the rows it finished.

One step = forward, loss, backward, gradient clipping (1.0) and an AdamW step (the trainer's defaults: betas
(0.9, 0.98), weight decay 0.01), with gradient checkpointing on, of 16 queries x (1 positive + 7 hard negatives)
on one device. The backbone is built from ``transformers.Qwen3Config`` with the real dimensions of Qwen3-0.6B /
1.7B / 4B and random weights (bf16 on CUDA, fp32 on CPU); nothing is downloaded. Rows, each adding one switch:

    a. baseline, as the recipe's code runs it: all texts padded into one batch, sdpa attention (flash-attention 2
       when installed), plain PyTorch pooling (gather the last token, ``F.normalize``) and loss
       (``cross_entropy(q @ p.T / t)`` in-batch + ``cross_entropy(bmm(q, docs) / t)`` hard), no Liger;
    b. + Liger RMSNorm / RoPE / SwiGLU (``f2llm.model.apply_liger_kernels``; skipped, with the reason, where Liger
       cannot run: on CPU, or when liger_kernel is not importable);
    c. + fused pooling and loss (``Encoder.forward``: ``f2llm.ops.pool``; ``F2LLMLoss``);
    d. + packing (``Collator(mode="packed")`` with the trainer's default row capacity); on CUDA the Encoder runs
       flash-attention's varlen kernel when flash-attn is installed, else sdpa with a block-diagonal causal mask
       that transformers builds from the restarting position ids. Under a mask-based attention a second row d2
       packs into rows of 2 x max text length (the mask's attention work grows with the square of the row width);
    e. + gradient cache (``f2llm.gradcache.GradientCache``) at effective batches of 1k / 4k / 16k / 64k queries,
       in chunks of at most --gc-chunk-tokens real tokens, packed as the faster of d / d2. With --budget-s, a
       gradient-cache row whose predicted time exceeds what is left is skipped (the row says so), and so are the
       larger ones after it.

Text lengths come from the shipped SciFact data (``data/retrieval/scifact``), without a tokenizer: a text's
token count is taken as round(1.3 x its word count) + 1 (EOS), capped at 1024, the recipe's maximum. Queries
are the instruction-formatted claims (23-70 tokens, mean 35), documents title + abstract (44-1024 tokens, mean
279). Each row draws its batch with a fixed seed (rows a-d train on the same batch), token ids are random.
The CPU modes scale the lengths down (x0.25; x0.125 with --quick), use a tiny Qwen3 (hidden 64, 2 layers) and
one torch thread.

Metrics per row:
    step_s      median wall time of --steps steps after 2 warm-up steps (CUDA: synchronized); gradient-cache
                rows run --gc-steps steps and no warm-up (their chunks reuse the shapes rows a-d warmed up);
    tokens_per_s real (non-padding) tokens of the step / step_s;
    real_share  real tokens / positions the model computed (padding included);
    mfu_pct     model FLOPs / step_s / the matmul rate measured in this run (bf16 8192^3 on CUDA, fp32 on CPU), with
                    model FLOPs = 6 * N * T + 6 * n_layers * (n_heads * head_dim) * sum_i len_i^2
                N: the weight matrices' parameters without the token embedding (a lookup; an embedding model
                has no LM head), i.e. what the linear layers multiply by;
                T = sum_i len_i real tokens. The second term is attention: QK^T and AV cost 4 * len^2 * d_attn per
                layer forward, times 3 for forward + backward, halved by the causal mask. Recomputation (gradient
                checkpointing, the gradient cache's no-grad pass) and padding count as overhead, not as work;
    peak_mib    CUDA: torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state, activations);
                CPU: the process's peak resident memory over the timed steps (VmHWM after a reset).
An out-of-memory row is recorded as OOM, any other failure as the error's text; the next rows still run.

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
from transformers import AutoModel, PreTrainedTokenizerFast, Qwen3Config
from transformers.utils import is_flash_attn_2_available

from f2llm.config import DataConfig, OptimConfig, TrainConfig, load_config
from f2llm.data import INSTRUCTIONS, Collator, EncoderBatch, format_query
from f2llm.gradcache import GradientCache, chunk_by_tokens
from f2llm.loss import F2LLMLoss
from f2llm.model import Encoder, apply_liger_kernels

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "retrieval" / "scifact"
MAX_LENGTH = 1024  # the recipe's maximum tokens per text
WORDS_TO_TOKENS = 1.3
EOS = "<|endoftext|>"
TEMPERATURE = TrainConfig().loss.temperature
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
# Gradient-cache step time over a plain step's, per token: one more forward (the no-grad pass) on top of
# forward + recompute + backward (about 4 forwards). Used only to predict whether the first such row fits.
GC_OVERHEAD = 1.3
COLUMNS = ["row", "status", "attention", "layout", "queries", "texts", "chunks", "real_tokens", "real_share",
           "step_s", "tokens_per_s", "mfu_pct", "peak_mib", "steps"]  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What one run measures (see the module docstring and --help)."""

    model: str
    device: str
    queries: int = 16
    negatives: int = 7
    length_scale: float = 1.0
    max_tokens: int = DataConfig().max_tokens
    gc_batches: tuple[int, ...] = (1024, 4096, 16384, 65536)
    gc_chunk_tokens: int = 65536
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


@dataclass
class StepBatch:
    """One step's texts in the trainer's order (queries, positives, negatives row-major) as token id arrays."""

    queries: int
    negatives: int
    seqs: list[np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.seqs), dtype=np.int64, count=len(self.seqs))


def draw_batch(pool: LengthPool, queries: int, negatives: int, vocab_size: int, eos_id: int, seed: int) -> StepBatch:
    """Lengths drawn from ``pool``, random token ids, EOS last (what last-token pooling reads)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.choice(pool.queries, queries), rng.choice(pool.documents, queries * (1 + negatives))])
    tokens = rng.integers(0, vocab_size, int(lengths.sum()), dtype=np.int64)
    tokens[np.cumsum(lengths) - 1] = eos_id
    return StepBatch(queries, negatives, np.split(tokens, np.cumsum(lengths)[:-1]))


# ------------------------------------------------------------------------------------------------ model
def eos_tokenizer() -> PreTrainedTokenizerFast:
    """A one-token tokenizer: the benchmark feeds token ids directly, the Encoder only needs EOS / pad ids."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({EOS: 0}, unk_token=EOS)), eos_token=EOS, pad_token=EOS
    )


def build_encoder(settings: Settings, attn_implementation: str) -> Encoder:
    """Qwen3 backbone with random weights, built on the device, gradient checkpointing on, in train mode."""
    dims = QWEN3_DIMS[settings.model]
    config = Qwen3Config(**dims, max_position_embeddings=40960, use_cache=False)
    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    with torch.device(settings.device):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # Non-reentrant checkpointing, as Encoder.from_pretrained enables it (the method's name depends on the
    # transformers version).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Encoder(model, eos_tokenizer(), pooling="last", max_length=settings.max_length).train()


def matmul_params(model: torch.nn.Module) -> int:
    """N of the FLOP count: the weight matrices (2-D parameters) but the token embedding table."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)


def model_flops(config: Qwen3Config, n_params: int, lengths: np.ndarray) -> float:
    """Training FLOPs of one step over texts of ``lengths`` (see the module docstring)."""
    d_attn = config.num_attention_heads * config.head_dim
    lengths = lengths.astype(np.float64)
    return float(6 * n_params * lengths.sum() + 6 * config.num_hidden_layers * d_attn * (lengths**2).sum())


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


# ------------------------------------------------------------------------------------------------ the step
def plain_embed(encoder: Encoder, batch: EncoderBatch) -> torch.Tensor:
    """The baseline's pooling: the HF model's last hidden state at each text's last token, then F.normalize."""
    batch = batch.to(encoder.device)
    hidden = encoder.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    last = batch.attention_mask.sum(1) - 1
    return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), last], dim=-1)


def plain_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The baseline's loss: hard (each query vs its positive + negatives, via bmm) + in-batch (q @ p.T)."""
    docs = torch.cat([p[:, None], n], dim=1)  # [B, 1 + k, D]
    hard_logits = torch.bmm(q[:, None], docs.transpose(1, 2)).squeeze(1) / TEMPERATURE
    zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    in_batch = F.cross_entropy(q @ p.T / TEMPERATURE, torch.arange(q.shape[0], device=q.device))
    return F.cross_entropy(hard_logits, zeros) + in_batch


def split_embeddings(emb: torch.Tensor, queries: int, negatives: int) -> tuple[torch.Tensor, ...]:
    """[B + B + B*k, D] in the trainer's order -> q [B, D], p [B, D], n [B, k, D]."""
    return emb[:queries], emb[queries : 2 * queries], emb[2 * queries :].reshape(queries, negatives, -1)


@dataclass
class Variant:
    """One ablation row: which switches are on."""

    row: str
    fused: bool
    packed: bool
    max_tokens: int | None = None
    gc_queries: int | None = None
    skip: str | None = None


@dataclass
class Bench:
    """The model, optimizer and measurement state shared by all rows."""

    settings: Settings
    encoder: Encoder
    optimizer: torch.optim.Optimizer
    n_params: int
    peak_tflops: float
    attn_implementation: str
    liger: bool = False
    start: float = field(default_factory=time.perf_counter)

    @property
    def config(self) -> Qwen3Config:
        return self.encoder.model.config

    def collator(self, variant: Variant) -> Collator:
        pad = self.encoder.text_tokenizer.pad_token_id
        if variant.packed:
            return Collator(pad_token_id=pad, mode="packed", max_tokens=variant.max_tokens)
        return Collator(pad_token_id=pad, mode="padded")

    def attention(self, variant: Variant) -> str:
        attn = self.attn_implementation
        if not variant.packed:
            return f"{attn}, padding mask"
        if attn.startswith("flash_attention"):
            return f"{attn} varlen (cu_seqlens)"
        return f"{attn}, block-diagonal causal mask (rows of {variant.max_tokens})"

    def prepare(self, variant: Variant, batch: StepBatch) -> tuple[list[EncoderBatch], Callable[[], None]]:
        """(the collated model inputs, a function running one training step on them) as ``variant`` says.

        Collation happens here, once, outside the timed steps (the trainer's data loader does it ahead too).
        """
        collate = self.collator(variant)
        loss_fn = F2LLMLoss(TEMPERATURE)
        B, k = batch.queries, batch.negatives

        if variant.gc_queries is not None:
            inputs = [collate(g) for g in chunk_by_tokens(batch.seqs, self.settings.gc_chunk_tokens)]
            cache = GradientCache(self.encoder)

            def forward_backward() -> None:
                cache.step(inputs, lambda emb: loss_fn(*split_embeddings(emb, B, k), in_batch=True).total)

        else:
            inputs = [collate(batch.seqs)]

            def forward_backward() -> None:
                if variant.fused:
                    loss = loss_fn(*split_embeddings(self.encoder(inputs[0]), B, k), in_batch=True).total
                else:
                    loss = plain_loss(*split_embeddings(plain_embed(self.encoder, inputs[0]), B, k))
                loss.backward()

        grad_clip = OptimConfig().grad_clip

        def step() -> None:
            forward_backward()
            torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return inputs, step

    def release(self) -> None:
        """Drop gradients a failed step may have left and return cached blocks, so the next row starts clean."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.settings.device == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.settings.device == "cuda":
            torch.cuda.synchronize()

    def measure(self, step: Callable[[], None], warmup: int, steps: int) -> tuple[list[float], float]:
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

    def run(self, variant: Variant, batch: StepBatch) -> dict[str, Any]:
        lengths = batch.lengths
        layout = f"packed (rows of {variant.max_tokens})" if variant.packed else "padded"
        row: dict[str, Any] = {
            "row": variant.row,
            "attention": self.attention(variant),
            "layout": layout,
            "liger": self.liger,
            "pooling_loss": "f2llm fused" if variant.fused else "plain torch",
            "queries": batch.queries,
            "texts": len(lengths),
            "real_tokens": int(lengths.sum()),
        }
        inputs, step = self.prepare(variant, batch)
        positions = sum(b.input_ids.numel() for b in inputs)
        row.update(chunks=len(inputs), positions=positions, real_share=row["real_tokens"] / positions)
        cached = variant.gc_queries is not None
        warmup, steps = (0, self.settings.gc_steps) if cached else (self.settings.warmup, self.settings.steps)
        times, peak = self.measure(step, warmup, steps)
        step_s = statistics.median(times)
        flops = model_flops(self.config, self.n_params, lengths)
        row.update(status="ok", step_s=step_s, step_times_s=times, tokens_per_s=row["real_tokens"] / step_s,
                   model_tflop=flops / 1e12, mfu_pct=100 * flops / step_s / (self.peak_tflops * 1e12),
                   peak_mib=peak, steps=steps)  # fmt: skip
        return row

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


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


# ------------------------------------------------------------------------------------------------ the table
def liger_unavailable(device: str) -> str | None:
    """Why Liger cannot run here, or None when it can."""
    if device != "cuda":
        return "skipped: Liger's Triton kernels run on CUDA only"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        return f"skipped: liger_kernel not importable ({exc}); carry its wheel (benchmarks/README.md)"
    return None


def failure_status(exc: BaseException) -> str:
    """A row's status for a step that raised: "OOM", or the error's type and first line (traceback printed)."""
    if is_oom(exc):
        return "OOM"
    traceback.print_exc()
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first_line}"


def run_all(settings: Settings, out: Path) -> list[dict[str, Any]]:
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    if settings.device == "cpu":
        # One thread: on a small shared machine a second OpenMP thread that waits for a busy core makes step
        # times jump tenfold from run to run; one thread gives repeatable CPU numbers.
        torch.set_num_threads(1)
    attn = "flash_attention_2" if settings.device == "cuda" and is_flash_attn_2_available() else "sdpa"
    pool = scifact_lengths(settings.length_scale)
    peak_tflops, peak_what = matmul_tflops(settings.device)
    encoder = build_encoder(settings, attn)
    optim = OptimConfig()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    bench = Bench(settings, encoder, optimizer, matmul_params(encoder.model), peak_tflops, attn, start=start)
    cfg = bench.config
    meta = {"model": f"Qwen3-{settings.model} dimensions, random weights", "dtype": str(encoder.model.dtype),
            "params": sum(p.numel() for p in encoder.parameters()), "matmul_params": bench.n_params,
            "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size, "attn_implementation": attn, "gradient_checkpointing": True,
            "peak_tflops": peak_tflops, "peak_measured": peak_what, "lengths": pool.describe(),
            "settings": asdict(settings), "torch_threads": torch.get_num_threads()}  # fmt: skip
    name = f"train_step_{settings.device}"
    title = f"training step ablation ({meta['model']}, {settings.device})"
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], last: bool = False) -> None:
        rows.append(row)
        print({k: row.get(k) for k in COLUMNS}, flush=True)
        write_results(out, name, rows, COLUMNS, title, meta=meta, quiet=not last)

    eos = encoder.text_tokenizer.eos_token_id
    base = draw_batch(pool, settings.queries, settings.negatives, cfg.vocab_size, eos, settings.seed)
    mask_attention = not attn.startswith("flash_attention")
    variants = [
        Variant("a. baseline (padded, plain pooling + loss)", fused=False, packed=False),
        Variant("b. + Liger RMSNorm/RoPE/SwiGLU", fused=False, packed=False, skip=liger_unavailable(settings.device)),
        Variant("c. + fused pooling + loss", fused=True, packed=False),
        Variant("d. + packing", fused=True, packed=True, max_tokens=settings.max_tokens),
    ]
    if mask_attention and 2 * settings.max_length < settings.max_tokens:
        variants.append(Variant(f"d2. packing, rows of {2 * settings.max_length}", fused=True, packed=True,
                                max_tokens=2 * settings.max_length))  # fmt: skip
    best_packed: tuple[dict[str, Any], int] | None = None  # (row, row capacity) of the faster packed row
    for variant in variants:
        row: dict[str, Any] = {"row": variant.row, "queries": settings.queries}
        if variant.skip:
            record({**row, "status": variant.skip})
            continue
        try:
            if variant.row.startswith("b."):
                apply_liger_kernels(encoder.model)
                bench.liger = True
            row = bench.run(variant, base)
            if variant.packed and (best_packed is None or row["tokens_per_s"] > best_packed[0]["tokens_per_s"]):
                best_packed = (row, variant.max_tokens)
        except Exception as exc:
            row["status"] = failure_status(exc)
        bench.release()
        record(row)

    # Seconds per real token of the layout the gradient-cache rows use, to predict their time.
    measured = [r for r in rows if r.get("status") == "ok"]
    reference = best_packed[0] if best_packed else (measured[-1] if measured else None)
    per_token = reference["step_s"] / reference["real_tokens"] if reference else None
    overhead = GC_OVERHEAD
    max_tokens = best_packed[1] if best_packed else settings.max_tokens
    for i, gc_queries in enumerate(settings.gc_batches):
        size = f"{gc_queries // 1024}k" if gc_queries % 1024 == 0 else str(gc_queries)
        label = f"e. + gradient cache, {size} queries"
        row = {"row": label, "queries": gc_queries}
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
        variant = Variant(label, fused=True, packed=True, max_tokens=max_tokens, gc_queries=gc_queries)
        try:
            batch = draw_batch(pool, gc_queries, settings.negatives, cfg.vocab_size, eos, settings.seed + 1 + i)
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

    from f2llm.trainer import Trainer, init_runtime

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
    parser.add_argument("--model", choices=sorted(QWEN3_DIMS), help="backbone dimensions (default 0.6b; CPU tiny)")
    parser.add_argument("--budget-s", type=float, help="skip gradient-cache rows that would end the run past this")
    parser.add_argument("--gc-batches", help="comma-separated effective batches (queries) of the gradient-cache rows")
    parser.add_argument("--steps", type=int, help="timed steps per row (rows a-d)")
    parser.add_argument("--gc-steps", type=int, help="timed steps per gradient-cache row")
    parser.add_argument("--gc-chunk-tokens", type=int, help="real tokens per gradient-cache chunk at most")
    parser.add_argument("--max-tokens", type=int, help="packed row capacity of row d")
    parser.add_argument("--comm", action="store_true", help="what each engine communicates per step (2 CPU ranks)")
    parser.add_argument("--comm-worker", type=Path, help=argparse.SUPPRESS)  # one rank of --comm, under torchrun
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    args = parser.parse_args(argv)
    if args.comm_worker is not None:
        return comm_worker(args.comm_worker, args.steps or 2)
    if args.comm:
        return run_comm(args.out, args.steps or 2)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    settings = default_settings(device, args.model, args.quick)
    gc_batches = tuple(int(b) for b in args.gc_batches.split(",") if b) if args.gc_batches is not None else None
    overrides = {"budget_s": args.budget_s, "gc_batches": gc_batches, "steps": args.steps, "gc_steps": args.gc_steps,
                 "gc_chunk_tokens": args.gc_chunk_tokens, "max_tokens": args.max_tokens}  # fmt: skip
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    rows = run_all(settings, args.out)
    failed = [r["row"] for r in rows if str(r.get("status", "")).startswith("error")]
    if failed:
        print(f"bench_train_step: rows failed with an error: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
