"""The training-step benchmark: its CPU mode runs every ablation row through the trainer's own step, and its FLOP
count (--flops) matches torch's counter and a count by hand."""

from __future__ import annotations

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
    rows = {r["key"]: r for r in result["rows"] if not r["row"].startswith("e.")}
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
    # Rows a-c checkpoint (the recipe's); d and later decide by the memory budget (a tiny model always fits).
    checkpointing = [rows[k]["checkpointing"] for k in ("a", "c", "d")]
    assert checkpointing == ["on (fixed)", "on (fixed)", "off (by the memory budget)"]
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
    """6 N T + the causal pairs of attention equals torch's count of forward + backward matmuls.

    Eager attention computes the full (non-causal) QK^T and AV products, which FlopCounterMode counts as bmm over
    len^2 scores per text; the ideal credits the len (len + 1) / 2 causal pairs of them.
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
    pairs, squares = (lengths * (lengths + 1) // 2).sum(), (lengths**2).sum()
    assert bench_module.ideal_flops(config, n_params, lengths) == pytest.approx(
        counted["mm"] + counted["bmm"] * pairs / squares, rel=1e-12
    )
    assert 6 * n_params * lengths.sum() == counted["mm"]


def test_plain_loss_flops_match_torch_flop_counter(bench_module) -> None:
    """The baseline's loss really runs (timed rows); --flops adds it analytically: 6 BND + 6 BGD."""
    B, k, D = 5, 3, 24
    q, p = (torch.randn(B, D, requires_grad=True) for _ in range(2))
    n = torch.randn(B, k, D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        bench_module.PlainF2LLMLoss()(q, p, n, in_batch=True).total.backward()
    assert counter.get_total_flops() == bench_module.loss_flops(B, B, 1 + k, D, fused=False)


ONE_LAYER = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=1000)  # fmt: skip


@pytest.mark.parametrize("torch_varlen", [True, False], ids=["f2llm_varlen", "stand-in"])
def test_flops_of_one_step_match_a_count_by_hand(bench_module, monkeypatch, torch_varlen: bool) -> None:
    """One Trainer.train_step of a 1-layer Qwen3 on meta: executed and ideal FLOPs equal a hand count, and the padded
    baseline computes more linear FLOPs than the packed step by exactly its padding.

    Hand count: N = the layer's weight matrices (q 64x64, k and v 64x32, o 64x64, gate / up / down 64x128);
    linear 6 N x positions (+ checkpointing's recompute: 2 (N - down projection) x positions, torch's checkpoint
    stopping after the last tensor it needs); attention 4 d_attn per score (varlen: each segment's causal pairs;
    padded sdpa: every row's L^2) x (1 forward + 2.5 backward, + 1 recompute); loss 6 BGD + 8 BND fused, 6 BND
    plain; ideal 6 N T + 3 x 4 d_attn x the texts' causal pairs.
    """
    if not torch_varlen:
        monkeypatch.setattr(bench_module, "varlen_available", lambda: False)
    from f2llm.data import Collator

    b = bench_module
    model = b.build_backbone(ONE_LAYER, "meta", b.COUNT_ATTENTION)
    N, h, inter, d_attn = 36864, 64, 128, 64
    assert b.matmul_params(model) == N
    batch = b.draw_batch(b.LengthPool(np.array([5, 9]), np.array([7, 12, 30])), 2, 1, 1000, 0, seed=3)
    lengths = b.batch_lengths(batch)
    settings = b.Settings(model="one-layer", device="meta", max_tokens=64)
    packed = b.Variant("p", "packed", fused=True, packed=True, attention="varlen", max_tokens=64, checkpointing=False)
    padded = b.Variant("a", "padded", fused=False, packed=False, attention="padded", checkpointing=True)
    got_packed = b.count_step(model, packed, batch, settings, 10**12, None)
    got_padded = b.count_step(model, padded, batch, settings, 10**12, None)
    assert ("f2llm_varlen" in got_packed["attention"]) == torch_varlen

    seqs = batch.sequences()
    pk, pd = Collator(0, "packed", 64)(seqs), Collator(0, "padded")(seqs)
    segments = np.diff(pk.attn_cu_seqlens.numpy()).astype(np.int64)
    B, G = 2, 2
    ideal = 6 * N * lengths.sum() + 3 * 4 * d_attn * (lengths * (lengths + 1) // 2).sum()
    packed_by_hand = (6 * N * pk.input_ids.numel() + 4 * d_attn * (segments * (segments + 1) // 2).sum() * 3.5
                      + 6 * B * G * h + 8 * B * B * h)  # fmt: skip
    rows, width = pd.input_ids.shape
    recompute = 2 * (N - h * inter) * rows * width
    padded_by_hand = (6 * N * rows * width + recompute + 4 * d_attn * rows * width**2 * 4.5
                      + 6 * B * G * h + 6 * B * B * h)  # fmt: skip
    assert got_packed["ideal_flops"] == got_padded["ideal_flops"] == ideal
    assert got_packed["executed_flops"] == packed_by_hand
    assert got_padded["executed_flops"] == padded_by_hand
    assert got_packed["ratio"] == pytest.approx(packed_by_hand / ideal)
    assert got_padded["checkpointing"] == "on (fixed)" and got_packed["checkpointing"] == "off (fixed)"
    assert got_packed["recompute_flops"] == 0 and got_padded["linear_recompute_flops"] == recompute
    # Padding: the forward's linear FLOPs grow with the positions computed, padding included.
    share = got_padded["positions"] / got_packed["positions"]
    assert share == rows * width / pk.input_ids.numel() > 1
    assert got_padded["linear_forward_flops"] == pytest.approx(share * got_packed["linear_forward_flops"], rel=1e-12)
    assert got_padded["executed_flops"] > share * got_packed["executed_flops"]


def test_flops_mode_writes_rows_and_summary(bench_module, tmp_path: Path) -> None:
    """--flops on the tiny Qwen3: every row counted, the summary's three ratios, in the order the stack predicts."""
    assert bench_module.main(["--flops", "--model", "tiny", "--gc-batches", "8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train_step_flops.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"a", "b", "c", "d", "d0", "d2", "e8"}
    assert all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        parts = r["linear_flops"] + r["attention_flops"] + r["loss_flops"]
        assert r["executed_flops"] == parts and r["ratio"] == pytest.approx(r["executed_flops"] / r["ideal_flops"])
    summary = result["summary"]["Qwen3-tiny"]
    assert summary["baseline_ratio"] == rows["a"]["ratio"] and summary["grad_cache_ratio"] == rows["e8"]["ratio"]
    # A tiny model fits any budget: no checkpointing in d; the gradient cache adds its no-grad forward.
    assert rows["d"]["checkpointing"] == "off (by the memory budget)" and rows["d"]["ratio"] == rows["d0"]["ratio"]
    assert 1 < summary["full_stack_ratio"] < summary["grad_cache_ratio"] < summary["baseline_ratio"]
    assert rows["e8"]["chunks"] >= 1 and rows["e8"]["linear_no_grad_flops"] > 0


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
