"""Peak memory of one gradient-cache training step as the effective batch grows (CPU, tiny Qwen3).

Commands:
    python benchmarks/bench_gradcache_memory.py                    # effective batches 1k, 4k, 16k, 64k queries
    python benchmarks/bench_gradcache_memory.py --quick            # 1024 and 2048 queries (seconds; CI)

Each effective batch runs in a fresh subprocess: one step of f2llm's GradientCache (pass 1 without grad over all
chunks, F2LLMLoss on all embeddings with the chunked InfoNCE, pass 2 chunk by chunk) on a tiny random Qwen3, every
query with 1 positive and 1 hard negative (short random texts). The chunk size is fixed, so activation memory is
that of one chunk whatever the batch; what grows is the embeddings of the step and their gradient
(3 x queries x D x 4 bytes each). The table shows peak extra resident memory during the step next to that
predicted growth. Peak memory is the process's peak RSS during the step minus its RSS before it (see common.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_OUT, cpu_peak_extra_mib, run_json_subprocess, write_results

TEXT_TOKENS = 8  # tokens per text (random ids)
CHUNK_TEXTS = 1024
HIDDEN = 64


def one_step(queries: int) -> dict:
    """Run one gradient-cache step in this process; returns its measurements."""
    from transformers import Qwen3Config, Qwen3Model

    from f2llm.gradcache import GradientCache
    from f2llm.kernels import pool
    from f2llm.loss import F2LLMLoss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = Qwen3Config(
        vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = Qwen3Model(config).train()
    n_texts = 3 * queries  # query, positive, negative
    ids = torch.randint(1, 512, (n_texts, TEXT_TOKENS))
    mask = torch.ones_like(ids)
    chunks = [(ids[i : i + CHUNK_TEXTS], mask[i : i + CHUNK_TEXTS]) for i in range(0, n_texts, CHUNK_TEXTS)]
    loss_fn = F2LLMLoss(temperature=0.05)

    def encode(chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=chunk[0], attention_mask=chunk[1]).last_hidden_state
        return pool(hidden, chunk[1], mode="last")

    def loss(emb: torch.Tensor) -> torch.Tensor:
        q, p, n = emb[:queries], emb[queries : 2 * queries], emb[2 * queries :]
        return loss_fn(q, p, n[:, None], in_batch=True).total

    cache = GradientCache(encode)
    started = time.perf_counter()
    result, peak = cpu_peak_extra_mib(lambda: cache.step(chunks, loss))
    seconds = time.perf_counter() - started
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return {
        "queries": queries,
        "texts": n_texts,
        "chunks": len(chunks),
        "loss": float(result.loss),
        "step_s": seconds,
        "peak_extra_mib": peak,
        # embeddings of the step + their gradient, fp32
        "embeddings_and_grad_mib": 2 * n_texts * HIDDEN * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 and 2048 queries only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_step(args.one)))
        return 0
    sizes = [1024, 2048] if args.quick else [1024, 4096, 16384, 65536]
    rows = [run_json_subprocess([__file__, "--one", str(q)], timeout=3600) for q in sizes]
    base = rows[0]
    for row in rows:
        row["growth_mib"] = row["peak_extra_mib"] - base["peak_extra_mib"]
        row["predicted_growth_mib"] = row["embeddings_and_grad_mib"] - base["embeddings_and_grad_mib"]
    cols = ["queries", "texts", "chunks", "step_s", "peak_extra_mib", "embeddings_and_grad_mib", "growth_mib",
            "predicted_growth_mib", "loss"]  # fmt: skip
    title = f"gradient cache: peak memory of one step vs effective batch (CPU, tiny Qwen3, {CHUNK_TEXTS}-text chunks)"
    write_results(args.out, "gradcache_memory_cpu", rows, cols, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
