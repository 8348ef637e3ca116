"""The training-step benchmark: its CPU mode runs every ablation row, and its FLOP count matches torch's counter."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, Qwen3Config

from tests.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train_step.py"


def run_bench(out: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--quick", *args, "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads((out / "train_step_cpu.json").read_text())


@pytest.fixture(scope="module")
def bench_module():
    """benchmarks/bench_train_step.py imported as a module."""
    with benchmark_module("bench_train_step") as module:
        yield module


@pytest.mark.slow
def test_cpu_mode_runs_every_row(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--gc-batches", "8,16")
    rows = {r["row"].split(".")[0]: r for r in result["rows"] if not r["row"].startswith("e.")}
    gc_rows = [r for r in result["rows"] if r["row"].startswith("e.")]
    assert set(rows) >= {"a", "b", "c", "d"}, [r["row"] for r in result["rows"]]
    assert rows["b"]["status"].startswith("skipped: Liger"), rows["b"]
    measured = [rows[k] for k in ("a", "c", "d")] + gc_rows
    for row in measured:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["peak_mib"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["real_tokens"] / row["step_s"])
        assert 0 < row["mfu_pct"] < 100
    assert rows["a"]["layout"] == "padded" and rows["a"]["pooling_loss"] == "plain torch"
    assert rows["c"]["pooling_loss"] == "f2llm fused"
    # Packing removes the padding the padded rows compute: same texts, a larger share of real tokens.
    assert rows["d"]["real_tokens"] == rows["a"]["real_tokens"]
    assert rows["d"]["real_share"] > rows["a"]["real_share"]
    assert rows["a"]["real_share"] < 1
    assert "block-diagonal causal mask" in rows["d"]["attention"]
    # Gradient-cache rows: the requested effective batches, 9 texts per query, several chunks each.
    assert [r["queries"] for r in gc_rows] == [8, 16]
    for row in gc_rows:
        assert row["texts"] == 9 * row["queries"] and row["chunks"] > 1 and row["layout"].startswith("packed")
    meta = result["meta"]
    assert meta["settings"]["gc_batches"] == [8, 16] and meta["peak_tflops"] > 0
    assert meta["lengths"]["queries"]["n"] == 1109 and meta["lengths"]["documents"]["n"] == 5183


def test_budget_skips_gradient_cache_rows(bench_module, tmp_path: Path) -> None:
    settings = bench_module.default_settings("cpu", None, quick=True)
    settings = bench_module.replace(settings, gc_batches=(8, 16), budget_s=0.0, warmup=0, steps=1)
    threads = torch.get_num_threads()
    try:
        rows = bench_module.run_all(settings, tmp_path)
    finally:
        torch.set_num_threads(threads)  # run_all pins CPU runs to one thread
    gc_rows = [r for r in rows if r["row"].startswith("e.")]
    assert [r["queries"] for r in gc_rows] == [8, 16]
    for row in gc_rows:
        assert row["status"].startswith("skipped: predicted") and "--budget-s 0" in row["status"], row
    assert all(r["status"] == "ok" for r in rows if r["row"][0] in "acd")
    saved = json.loads((tmp_path / "train_step_cpu.json").read_text())["rows"]
    assert [r["row"] for r in saved] == [r["row"] for r in rows]


def test_model_flops_match_torch_flop_counter(bench_module) -> None:
    """6 N T + the causal half of attention equals torch's count of forward + backward matmuls.

    Eager attention computes the full (non-causal) QK^T and AV products, which FlopCounterMode counts as bmm; the
    benchmark credits half of them (the causal mask's useful part).
    """
    config = Qwen3Config(**bench_module.QWEN3_DIMS["tiny"], max_position_embeddings=512)
    model = AutoModel.from_config(config, dtype=torch.float64, attn_implementation="eager")
    lengths = np.array([37, 50, 3])
    counted = {"mm": 0, "bmm": 0}
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (1, int(length)))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids).last_hidden_state.sum().backward()
        flops = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
        assert set(flops) == {"mm", "bmm"}, flops
        for op in counted:
            counted[op] += flops[op]
    n_params = bench_module.matmul_params(model)
    expected = counted["mm"] + counted["bmm"] / 2
    assert bench_module.model_flops(config, n_params, lengths) == expected
    assert 6 * n_params * lengths.sum() == counted["mm"]


def test_chunks_keep_order_and_respect_the_token_limit(bench_module) -> None:
    rng = np.random.default_rng(0)
    seqs = [np.arange(n) for n in rng.integers(1, 40, 100)]
    groups = bench_module.chunk_by_tokens(seqs, 64)
    flat = [s for g in groups for s in g]
    assert len(flat) == len(seqs) and all(a is b for a, b in zip(flat, seqs, strict=True))
    assert all(sum(len(s) for s in g) <= 64 for g in groups)
    # Greedy: a group closes only when the next text would not fit.
    assert all(sum(len(s) for s in g) + len(nxt[0]) > 64 for g, nxt in itertools.pairwise(groups))


@pytest.mark.slow
@pytest.mark.distributed
def test_comm_mode_measures_what_each_engine_sends(tmp_path: Path) -> None:
    """The trainer's own step under 2 ranks: DDP and ZeRO-1 send one set of gradients per step whatever the chunk
    count (no_sync defers it); ZeRO-2 one more reduce-scatter of the gradients for every further chunk."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    cmd = [sys.executable, str(SCRIPT), "--comm", "--steps", "2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = {(r["engine"], r["chunks"]): r for r in json.loads((tmp_path / "train_step_comm.json").read_text())["rows"]}
    assert set(rows) == {(e, c) for e in ("ddp", "zero1", "zero2", "zero3") for c in (1, 4)}
    assert all(r["status"] == "ok" and r["same_every_step"] for r in rows.values())
    gradients = {key: r["per_gradient"] for key, r in rows.items()}
    assert 1.0 <= gradients["ddp", 1] < 1.1 and gradients["ddp", 4] == pytest.approx(gradients["ddp", 1])
    assert gradients["zero1", 4] == pytest.approx(gradients["zero1", 1])
    assert gradients["zero2", 4] - gradients["zero2", 1] == pytest.approx(3.0, abs=0.1)
    assert gradients["zero3", 4] >= gradients["zero2", 4]
