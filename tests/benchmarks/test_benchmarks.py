"""Every benchmark's CPU mode runs end to end (small sizes) and writes its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


def test_bench_pooling_check_cpu(tmp_path: Path) -> None:
    run_benchmark("bench_pooling.py", "--check", "--cpu", out=tmp_path)
    rows = json.loads((tmp_path / "pooling_check_cpu.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"triton", "torch"}
    assert all(r["pass"] == "PASS" for r in rows)


@pytest.mark.slow
def test_bench_pooling_cpu_quick(tmp_path: Path) -> None:
    run_benchmark("bench_pooling.py", "--cpu", "--quick", out=tmp_path)
    result = json.loads((tmp_path / "pooling_cpu.json").read_text())
    assert result["rows"] and all(r["f2llm_cpu_ms"] > 0 and r["reference_ms"] > 0 for r in result["rows"])


def test_bench_contrastive_check_cpu(tmp_path: Path) -> None:
    run_benchmark("bench_contrastive.py", "--check", "--cpu", out=tmp_path)
    rows = json.loads((tmp_path / "contrastive_check_cpu.json").read_text())["rows"]
    assert rows and all(r["pass"] == "PASS" for r in rows)


@pytest.mark.slow
def test_bench_contrastive_cpu_quick(tmp_path: Path) -> None:
    run_benchmark("bench_contrastive.py", "--cpu", "--quick", out=tmp_path)
    rows = json.loads((tmp_path / "contrastive_cpu.json").read_text())["rows"]
    assert rows


@pytest.mark.slow
def test_bench_data_quick(tmp_path: Path) -> None:
    run_benchmark("bench_data.py", "--quick", out=tmp_path)
    rows = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    packed = [r for r in rows if r["measure"] == "tokenize+collate" and r["layout"].startswith("packed")]
    padded = [r for r in rows if r["measure"] == "tokenize+collate" and r["layout"] == "padded"]
    assert packed and padded and all(r["texts_per_s"] > 0 for r in rows if r["measure"] == "tokenize")
    assert min(r["real_token_share"] for r in packed) >= 0.95  # packing removes the padding
    assert max(r["real_token_share"] for r in padded) < 0.95


@pytest.mark.slow
def test_bench_gradcache_memory_quick(tmp_path: Path) -> None:
    """Doubling the effective batch (same chunk size) must not double the step's peak memory."""
    run_benchmark("bench_gradcache_memory.py", "--quick", out=tmp_path)
    small, large = json.loads((tmp_path / "gradcache_memory_cpu.json").read_text())["rows"]
    assert large["queries"] == 2 * small["queries"] and large["chunks"] == 2 * small["chunks"]
    assert large["peak_extra_mib"] < 1.5 * small["peak_extra_mib"]


@pytest.mark.slow
def test_bench_prepare_quick(tmp_path: Path) -> None:
    """f2llm's data preparation and the official v2 script's method side by side (2,000 rows): same ids."""
    run_benchmark("bench_prepare.py", "--quick", out=tmp_path)
    result = json.loads((tmp_path / "prepare.json").read_text())
    assert [r["side"] for r in result["rows"]] == ["official", "f2llm", "f2llm-rust-threads"]
    assert all(r["texts_per_s_per_core"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert result["summary"]["rows_checked_equal"] == 200
    assert result["summary"]["projection_full_v2"]["f2llm_hours"] > 0


@pytest.mark.slow
def test_bench_st_matryoshka_quick(tmp_path: Path) -> None:
    """The three ways of computing MatryoshkaLoss's loss part run, each in its own process, and give one loss."""
    run_benchmark("bench_st_matryoshka.py", "--quick", "--cpu", out=tmp_path)
    rows = json.loads((tmp_path / "st_matryoshka_cpu.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["sentence-transformers", "st-loop-f2llm-loss", "f2llm"]
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-5 * abs(losses[0]) and losses[0] > 1.0
    assert all(r["loss_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_layer_exits_check_cpu(tmp_path: Path) -> None:
    """F2LLMLoss with the exit axis equals ML-Embed's loop over exits and dims (float64), every backend."""
    run_benchmark("bench_layer_exits.py", "--check", "--cpu", out=tmp_path)
    result = json.loads((tmp_path / "layer_exits_check_cpu.json").read_text())
    assert result["meta"]["levels_equal"]
    assert {r["case"].rsplit(", ", 1)[1] for r in result["rows"]} == {"torch", "triton"}
    assert all(r["pass"] == "PASS" for r in result["rows"])


@pytest.mark.slow
def test_bench_layer_exits_quick(tmp_path: Path) -> None:
    """The three parts run: the loss (each implementation in its own process), the FLOPs of the trainer's step on
    meta (exits add loss FLOPs only) and the trainer's step on MiniLM."""
    run_benchmark("bench_layer_exits.py", "--cpu", "--quick", out=tmp_path)
    loss = json.loads((tmp_path / "layer_exits_loss_cpu.json").read_text())["rows"]
    assert [r["impl"] for r in loss] == ["f2llm", "loop", "f2llm_1exit"]
    assert loss[0]["loss"] == pytest.approx(loss[1]["loss"], rel=1e-5) and loss[0]["exits"] == 7
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_extra_mib"] > 0 for r in loss)
    flops = json.loads((tmp_path / "layer_exits_flops.json").read_text())
    plain, exits = flops["rows"]
    assert plain["layer_exits"] is None and exits["layer_exits"] == "ml-embed"
    assert exits["linear_flops"] == plain["linear_flops"]  # the exits add no matmul
    assert exits["loss_flops"] == 3 * plain["loss_flops"]  # 4 layers: exits 1, 2, 4
    assert flops["summary"]["meets_target"]
    step = json.loads((tmp_path / "layer_exits_step_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in step] == ["plain", "matryoshka", "exits+matryoshka"]
    assert step[0]["layer_exits"] is None and step[-1]["layer_exits"] == [1, 2, 4, 6]
    assert [r["levels"] for r in step] == [1, 4, 4]
    assert all(r["step_s"] > 0 and r["real_tokens"] == step[0]["real_tokens"] for r in step)
