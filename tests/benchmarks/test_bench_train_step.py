"""The training-step benchmark: its CPU mode runs every ablation row through the trainer's own step, and its FLOP
count (--flops) matches torch's counter and a count by hand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, Qwen3Config

from tests.helpers import HANG_BOUND, benchmark_module, training_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_train_step.py"


def run_bench(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--quick", *args, "--out", str(out)]
    result = subprocess.run(cmd, env=training_env(), capture_output=True, text=True, timeout=HANG_BOUND)
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
    cmd = [sys.executable, str(SCRIPT), "--comm", "--steps", "2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=training_env(), capture_output=True, text=True, timeout=HANG_BOUND)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = {(r["engine"], r["chunks"]): r for r in json.loads((tmp_path / "train_step_comm.json").read_text())["rows"]}
    assert set(rows) == {(e, c) for e in ("ddp", "zero1", "zero2", "zero3") for c in (1, 4)}
    assert all(r["status"] == "ok" and r["same_every_step"] for r in rows.values())
    gradients = {key: r["per_gradient"] for key, r in rows.items()}
    assert 1.0 <= gradients["ddp", 1] < 1.1 and gradients["ddp", 4] == pytest.approx(gradients["ddp", 1])
    assert gradients["zero1", 4] == pytest.approx(gradients["zero1", 1])
    assert gradients["zero2", 4] - gradients["zero2", 1] == pytest.approx(3.0, abs=0.1)
    assert gradients["zero3", 4] >= gradients["zero2", 4]


# ------------------------------------------------------------------------------------------------ --flops --config
def test_training_state_bytes_by_hand() -> None:
    """f2llm.engine.training_state_bytes (the engines' step_state_bytes and the --config budget) against hand counts:
    P parameters, T trainable, N ranks."""
    from f2llm.engine import TrainingState, training_state_bytes

    P, T = 1200, 1200
    # DDP: fp32 weights 4P; fp32 gradients 4T (+ 4T of DDP buckets on several ranks); two fp32 moments 8T.
    assert training_state_bytes("ddp", P, T, 1, torch.bfloat16) == TrainingState(4 * P, 0, 4 * T + 8 * T)
    assert training_state_bytes("ddp", P, T, 1, torch.bfloat16).total == 16 * P
    assert training_state_bytes("ddp", P, T, 4, torch.bfloat16) == TrainingState(4 * P, 0, 4 * T + 4 * T + 8 * T)
    assert training_state_bytes("ddp", 1000, 100, 2, torch.bfloat16) == TrainingState(4000, 0, 400 + 400 + 800)
    # DeepSpeed bf16 at N = 4: bf16 weights 2P (ZeRO-3: 2P / 4); the fp32 master partition 4T / 4 from ZeRO-1 on
    # (ZeRO-0: the whole 4T); step: bf16 gradients 2T (/ 4 from ZeRO-2 on), the master partition's fp32 gradient
    # 4T / 4 (ZeRO >= 1), moments 8T (/ 4 from ZeRO-1 on).
    ds = {stage: training_state_bytes("deepspeed", P, T, 4, torch.bfloat16, stage) for stage in range(4)}
    assert ds[0] == TrainingState(2400, 4800, 2400 + 9600)
    assert ds[1] == TrainingState(2400, 1200, 2400 + 1200 + 2400)
    assert ds[2] == TrainingState(2400, 1200, 600 + 1200 + 2400)
    assert ds[3] == TrainingState(600, 1200, 600 + 1200 + 2400)
    assert ds[2].resident == 3600 and ds[2].total == 7800
    # fp32 compute: fp32 weights, no master copy.
    assert training_state_bytes("deepspeed", P, T, 4, torch.float32, 2) == TrainingState(4800, 0, 1200 + 2400)
    # ZeRO-2 at 32 ranks, per parameter: 2 + (4 + 2 + 4 + 8) / 32.
    assert training_state_bytes("deepspeed", 32, 32, 32, torch.bfloat16, 2).total == 2 * 32 + 4 + 2 + 4 + 8


def test_engine_step_state_is_the_state_function(bench_module) -> None:
    """DDPEngine.step_state_bytes is the ``step`` of training_state_bytes (one rank: fp32 gradients + moments)."""
    from f2llm.config import TrainConfig
    from f2llm.engine import build_engine

    model = bench_module.build_backbone(ONE_LAYER, "meta", bench_module.COUNT_ATTENTION)
    engine = build_engine(TrainConfig(), bench_module.make_encoder(model, True, 64), 10, world_size=1)
    P = sum(p.numel() for p in model.parameters())
    assert engine.step_state_bytes() == engine.training_state().step == 12 * P
    assert engine.training_state().total == 16 * P == bench_module.STATE_BYTES_PER_PARAM * P


def test_default_world_size_is_the_recipe_global_batch(bench_module) -> None:
    from f2llm.config import load_config

    assert bench_module.default_world_size(load_config("f2llm-0.6b"))[0] == 32
    # The README's gradient-cache launches: 512 queries on one GPU, 64 on each of 8.
    launches = [load_config(name, list(overrides)) for name, overrides in bench_module.README_LAUNCHES]
    assert all(c.grad_cache.enabled for c in launches)
    assert [bench_module.default_world_size(c)[0] for c in launches] == [1, 8]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> list[str]:
    """Overrides that make the shipped f2llm-0.6b config train a tiny local Qwen3 on short texts."""
    from tests.helpers import tiny_qwen3

    folder = tiny_qwen3(tmp_path_factory.mktemp("bench-config"))
    return [f"model.name_or_path={folder}", "data.batch_size=4", "model.max_length=128", "data.max_tokens=512"]


def count_config(bench_module, capsys, out: Path, *args: str) -> tuple[str, dict]:
    """--flops --config f2llm-0.6b ARGS: (the last line printed, the row written)."""
    capsys.readouterr()
    assert bench_module.main(["--flops", "--config", "f2llm-0.6b", *args, "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    (row,) = json.loads((out / "train_step_flops_configs.json").read_text())["rows"]
    return last, row


def test_flops_of_a_config_follow_its_layout(bench_module, tiny_config, capsys, tmp_path: Path) -> None:
    """--flops --config on a tiny local Qwen3: the last line is the ratio; packing, padding and the gradient cache
    are the config's (the same texts; padding computes more positions, the cache a no-grad pass and its chunks)."""
    fixed = [*tiny_config, "model.gradient_checkpointing=false"]
    last, packed = count_config(bench_module, capsys, tmp_path, *fixed)
    assert re.fullmatch(r"executed/ideal FLOPs: \d+\.\d\d", last) and last.endswith(f"{packed['ratio']:.2f}")
    assert packed["model"].startswith("tiny-qwen3") and packed["engine"] == "deepspeed ZeRO-2"
    assert packed["world_size"] == 128 and "512" in packed["world_size_rule"]  # 512 queries / 4 per rank
    assert packed["texts"] == 4 * (1 + 1 + 7) and packed["layout"] == "packed (rows of 512)"
    assert packed["checkpointing"] == "off (fixed)" and packed["chunks"] == 1 and packed["recompute_flops"] == 0
    assert packed["command"].endswith(" ".join(fixed) + " --world-size 128")

    _, padded = count_config(bench_module, capsys, tmp_path, *fixed, "data.packing=false")
    assert padded["layout"] == "padded" and padded["real_tokens"] == packed["real_tokens"]
    assert padded["positions"] > packed["positions"] and padded["ratio"] > packed["ratio"]
    assert padded["ideal_flops"] == packed["ideal_flops"]

    _, cached = count_config(
        bench_module, capsys, tmp_path, *fixed, "grad_cache.enabled=true", "grad_cache.chunk_texts=9"
    )
    assert cached["chunks"] == 4 and cached["chunk_texts"] == 9 and cached["linear_no_grad_flops"] > 0
    assert cached["ratio"] > packed["ratio"] and cached["ideal_flops"] == packed["ideal_flops"]


def test_world_size_sets_the_budget_by_the_engine_state(bench_module, tiny_config, capsys, tmp_path: Path) -> None:
    """The budget is 0.7 x (memory - the DeepSpeed ZeRO-2 state of one rank at N ranks): on a GPU sized so that the
    step's activations just miss the budget at 1 rank, it checkpoints there and fits (no recompute) at 8."""
    from dataclasses import asdict

    from f2llm.engine import training_state_bytes
    from f2llm.recompute import ACTIVATION_MEMORY_SHARE as SHARE

    _, roomy = count_config(bench_module, capsys, tmp_path, *tiny_config, "--world-size", "1", "--memory-gb", "1000")
    P, activations = roomy["params"], roomy["largest_forward_activations_gib"] * 2**30
    one, eight = (training_state_bytes("deepspeed", P, P, n, torch.bfloat16, 2) for n in (1, 8))
    assert roomy["state"] == asdict(one) and roomy["checkpointing"] == "off (by the memory budget)"
    margin = SHARE * (one.total - eight.total) / 2
    memory_gb = ((activations - margin) / SHARE + one.total) / 1e9
    rows = {}
    for n in (1, 8):
        _, rows[n] = count_config(
            bench_module, capsys, tmp_path, *tiny_config, "--world-size", str(n), "--memory-gb", repr(memory_gb)
        )
    for n, state in ((1, one), (8, eight)):
        assert rows[n]["state"] == asdict(state)
        assert rows[n]["budget_gib"] * 2**30 == pytest.approx(SHARE * (memory_gb * 1e9 - state.total), abs=2)
    assert rows[1]["checkpointing"] != "off (by the memory budget)" and rows[1]["recompute_flops"] > 0
    assert rows[8]["checkpointing"] == "off (by the memory budget)" and rows[8]["recompute_flops"] == 0
    assert rows[1]["ratio"] > rows[8]["ratio"]
