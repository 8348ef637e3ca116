"""benchmarks/report.py: README tables and PNGs from a fixture result set, the suite summary, and README drift."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import HANG_BOUND, benchmark_module, training_env

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "report.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
GPU_RUN = Path("FIXTURE-GPU") / "2000-01-01"
CPU_RUN = Path("cpu") / "2000-01-01"
BEFORE = "# project\n\nintro text\n\n## Performance\n\n"
START = "<!-- performance:start (rendered by benchmarks/report.py; do not edit by hand) -->\n"
AFTER = "<!-- performance:end -->\n\n## Licence\n\ntext after\n"


@pytest.fixture(scope="module")
def report():
    """benchmarks/report.py imported as a module."""
    with benchmark_module("report") as module:
        yield module


@pytest.fixture(scope="module")
def rendered(report, tmp_path_factory) -> Path:
    """A copy of the fixture results and a README with markers, rendered once; returns the folder holding both."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(FIXTURES, root / "results")
    (root / "README.md").write_text(BEFORE + START + "stale text\n" + AFTER)
    assert report.main(["--results", str(root / "results"), "--readme", str(root / "README.md")]) == 0
    return root


def region_of(readme: Path) -> str:
    text = readme.read_text()
    return text[text.index(START) + len(START) : text.index(AFTER)]


def tables(region: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table of the region, keyed by the '#### ' heading above it, as dicts header -> cell."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, lines = "", region.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#### "):
            heading = line[5:]
        if line.startswith("| ") and lines[i + 1].startswith("|---"):
            headers = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in row.strip("|").split("|")), strict=True)))
            out[heading] = rows
    return out


def cell(value: float | str) -> str:
    """How a results value must appear in a table: 3 significant digits, whole numbers from 1000 on."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


def load(run: Path, name: str) -> dict:
    return json.loads((FIXTURES / run / f"{name}.json").read_text())


def test_readme_region_replaced_and_ordered(rendered: Path) -> None:
    text = (rendered / "README.md").read_text()
    assert text.startswith(BEFORE + START) and text.endswith(AFTER)
    region = region_of(rendered / "README.md")
    assert "stale text" not in region
    gpu = region.index("### FIXTURE GPU (synthetic test numbers), 2000-01-01")
    cpu = region.index("### CPU: ")
    assert gpu < cpu, "GPU runs come before CPU runs"
    assert "not GPU performance figures" in region[cpu:]
    assert "No GPU run has been committed yet" not in region
    # The earlier run of the same device is linked, not rendered; local/ runs are never shown.
    assert region.count("1999-12-31") == 2 and "Earlier runs: [FIXTURE-GPU/1999-12-31]" in region
    assert "local/" not in region
    assert "**16/16 PASS**" in region and "**3/4 PASS**" in region
    # Commands are shown without their --out folder.
    assert "`python benchmarks/bench_train_step.py --budget-s 200`" in region and "--out" not in region


def test_tables_hold_the_results(rendered: Path) -> None:
    found = tables(region_of(rendered / "README.md"))
    device = "FIXTURE GPU (synthetic test numbers), 2000-01-01"
    pooling = found[f"Pooling + L2 norm ({device})"]
    expected = load(GPU_RUN, "pooling_cuda")["rows"]
    assert len(pooling) == len(expected)
    for want, got in zip(expected, pooling, strict=True):
        assert (got["B"], got["L"], got["D"], got["mode"], got["impl"]) == tuple(
            str(want[k]) for k in ("B", "L", "D", "mode", "impl")
        )
        assert got["fwd+bwd ms"] == cell(want["fwd_bwd_ms"])
        assert got["peak extra MiB"] == cell(want["peak_extra_mib"])
        assert got["fwd % of copy bandwidth"] == cell(want["fwd_pct_copy_bw"])

    contrastive = found[f"Contrastive loss (InfoNCE) ({device})"]
    expected = load(GPU_RUN, "contrastive_cuda")["rows"]
    assert [(r["impl"], r["fwd+bwd ms"]) for r in contrastive] == [(w["impl"], cell(w["fwd_bwd_ms"])) for w in expected]
    assert [r["speedup vs ref"] for r in contrastive] == [cell(w.get("speedup_vs_ref", "")) for w in expected]
    assert "OOM" in {r["peak extra MiB"] for r in contrastive}

    train = found[f"Training step ablation ({device})"]
    expected = load(GPU_RUN, "train_step_cuda")["rows"]
    assert [r["row"] for r in train] == [w["row"] for w in expected]
    assert [r["status"] for r in train] == [w["status"] for w in expected]
    assert [r["tokens/s"] for r in train] == [cell(w.get("tokens_per_s", "")) for w in expected]
    assert [r["MFU %"] for r in train] == [cell(w.get("mfu_pct", "")) for w in expected]

    cpu = found["Training step ablation (cpu (2 cores, 2 torch threads), 2000-01-01)"]
    assert [r["row"] for r in cpu] == [w["row"] for w in load(CPU_RUN, "train_step_cpu")["rows"]]
    cpu_pool = found["Pooling + L2 norm (cpu (2 cores, 2 torch threads), 2000-01-01)"]
    want = load(CPU_RUN, "pooling_cpu")["rows"]
    assert [r["speedup"] for r in cpu_pool] == [cell(w["speedup"]) for w in want]


def test_links_and_plots_exist(rendered: Path) -> None:
    import matplotlib.image

    region = region_of(rendered / "README.md")
    readme = rendered / "README.md"
    links = [os.path.normpath(readme.parent / t) for t in re.findall(r"\]\(([^)]+)\)", region)]
    assert links and all(Path(p).exists() for p in links), [p for p in links if not Path(p).exists()]
    for run, names in ((GPU_RUN, ("pooling", "contrastive", "train_step")), (CPU_RUN, ("pooling", "contrastive"))):
        for name in names:
            png = rendered / "results" / run / f"{name}.png"
            assert str(png) in links
            image = matplotlib.image.imread(png)
            assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01, (png, image.shape)


def test_check_detects_drift(report, rendered: Path, tmp_path: Path) -> None:
    shutil.copytree(rendered, tmp_path / "copy")
    args = ["--results", str(tmp_path / "copy" / "results"), "--readme", str(tmp_path / "copy" / "README.md")]
    assert report.main(args) == 0  # links to the scripts depend on where the README is
    assert report.main([*args, "--check"]) == 0
    train = tmp_path / "copy" / "results" / GPU_RUN / "train_step_cuda.json"
    payload = json.loads(train.read_text())
    payload["rows"][0]["tokens_per_s"] = 12345.0
    train.write_text(json.dumps(payload))
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0  # re-render
    assert report.main([*args, "--check"]) == 0
    (tmp_path / "copy" / "results" / GPU_RUN / "pooling.png").unlink()
    assert report.main([*args, "--check"]) == 1, "a linked plot that is missing is drift too"


def test_summary(report, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    shutil.copytree(FIXTURES / GPU_RUN, folder)
    assert report.main(["summary", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert printed == (folder / "summary.md").read_text() + "\n"
    lines = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert "| PASS | 20 | 60 | 16/16 cases PASS |" in lines["pooling_check"]
    assert "FAIL (exit 1)" in lines["contrastive_check"] and "3/4 cases PASS" in lines["contrastive_check"]
    assert "TIMEOUT" in lines["contrastive_bench"] and "reference OOM at 1 sizes" in lines["contrastive_bench"]
    assert "f2llm fwd at 12-90% of copy bandwidth" in lines["pooling_bench"]
    assert "4.2-4.67x" in lines["pooling_bench"]
    assert "5/7 rows measured" in lines["train_step"]
    assert "| e. + gradient cache, 4k queries | OOM |" in printed


def test_committed_readme_matches_committed_results() -> None:
    """README's performance section is exactly what report.py renders from benchmarks/results/ (no drift)."""
    result = subprocess.run(
        [sys.executable, str(REPORT), "--check"], env=training_env(), capture_output=True, text=True, timeout=HANG_BOUND
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_suite.sh --dry-run: steps in CPU mode, then plots, summary (printed last) and tarball.

    Two steps only (--only), to keep the test short: every step goes through the same plumbing.
    """
    env = training_env(PYTHON=sys.executable, RESULTS_ROOT=str(tmp_path / "results"), OUT=str(tmp_path / "out"))
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--only", "contrastive_check,train_step"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_BOUND,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    runs = list((tmp_path / "results" / "cpu-dry-run").iterdir())
    assert len(runs) == 1
    run = runs[0]
    steps = [line.split() for line in (run / "steps.txt").read_text().splitlines()]
    names = ["contrastive_check", "train_step"]
    assert [s[0] for s in steps] == names and all(s[1] == "0" for s in steps), steps
    # $OUT holds few files (the device tool brings back at most 8): the tarball, the summary and the plots.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md", "train_step.png"]
    with tarfile.open(out / "results.tar.gz") as tar:
        members = set(tar.getnames())
    prefix = f"cpu-dry-run/{run.name}/"
    for name in ["contrastive_check_cpu.json", "contrastive_check.log", "train_step_cpu.json", "train_step.log",
                 "train_step.png", "steps.txt", "summary.md", "environment.txt"]:  # fmt: skip
        assert prefix + name in members, (name, sorted(members))
    summary = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip()), "the summary is printed last"
    for name in names:
        assert f"| {name} | PASS |" in summary
    assert "| pooling_check |" not in summary
    assert "| e. + gradient cache, 16 queries | ok |" in summary


def test_flops_table_and_executed_mfu(report, tmp_path: Path) -> None:
    """A train_step_flops.json beside a run's timed rows: its table and ratios in the README, and the suite summary's
    executed-FLOPs MFU per timed row (executed FLOPs per real token of the --flops row of the same configuration x
    tokens/s / the measured matmul rate), next to the model-FLOPs MFU."""
    shutil.copytree(FIXTURES, tmp_path / "results")
    run = tmp_path / "results" / GPU_RUN
    timed = load(GPU_RUN, "train_step_cuda")
    peak = timed["meta"]["peak_tflops"]
    mask = "sdpa, block-diagonal causal mask (rows of 8192); counted by call (stand-in)"
    counted = [("a", "a. baseline", "sdpa, padding mask; counted by call (stand-in)", 3.5e14, 36000, 3.6),
               ("d", "d. + packing", mask, 1.3e14, 36000, 1.3),
               ("e512", "e. + gradient cache, 512 queries", mask, 4.0e15, 1150000, 1.36)]  # fmt: skip
    rows = [{"model": "Qwen3-0.6B", "key": k, "row": label, "status": "ok", "attention": attention,
             "executed_flops": flops, "ideal_flops": flops / ratio, "ratio": ratio, "real_tokens": tokens,
             "executed_tflop": flops / 1e12, "attention_share": 0.05, "recompute_share": 0.2}
            for k, label, attention, flops, tokens, ratio in counted]  # fmt: skip
    summary = {"Qwen3-0.6B": {"baseline_ratio": 3.6, "full_stack_ratio": 1.3, "grad_cache_ratio": 1.36,
                              "full_stack_no_checkpointing_ratio": 1.02, "grad_cache_queries": 512,
                              "activation_budget_gib": 65.6}}  # fmt: skip
    payload = {"benchmark": "train_step_flops", "env": {"command": "python benchmarks/bench_train_step.py --flops"},
               "rows": rows, "meta": {"ideal": "6 N T + attention"}, "summary": summary}  # fmt: skip
    (run / "train_step_flops.json").write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + START + AFTER)
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    region = region_of(readme)
    assert "`python benchmarks/bench_train_step.py --flops`" in region
    assert "Qwen3-0.6B: baseline **3.60x**, full stack **1.30x** (1.02x" in region
    assert "gradient cache (512 queries) **1.36x**" in region
    flops_table = tables(region)["FLOPs of one training step, executed vs ideal (meta device, 2000-01-01)"]
    assert [r["executed / ideal"] for r in flops_table] == ["3.6", "1.3", "1.36"]
    assert report.main(["summary", str(run)]) == 0
    lines = {line.split("|")[1].strip(): line for line in (run / "summary.md").read_text().splitlines()
             if line.startswith("| ")}  # fmt: skip
    by_row = {r["row"]: r for r in timed["rows"]}

    def mfu_cell(row: str, flops: float, tokens: int) -> str:
        return cell(100 * flops / tokens * by_row[row]["tokens_per_s"] / (peak * 1e12))

    for row, flops, tokens in (("a. baseline (padded, plain pooling + loss)", 3.5e14, 36000),
                               ("d. + packing", 1.3e14, 36000),
                               ("e. + gradient cache, 1k queries", 4.0e15, 1150000)):  # fmt: skip
        assert f"| {mfu_cell(row, flops, tokens)} |" in lines[row], lines[row]
    # No --flops row of the same configuration (b was not counted): no executed MFU, the model MFU stays.
    cells = [c.strip() for c in lines["b. + Liger RMSNorm/RoPE/SwiGLU"].strip("|").split("|")]
    assert cells[3] == cell(by_row["b. + Liger RMSNorm/RoPE/SwiGLU"]["mfu_pct"]) and cells[4] == ""


def test_config_flops_table_and_earlier_results(report, tmp_path: Path) -> None:
    """A later CPU run holding only train_step_flops_configs.json (bench_train_step.py --flops --config all): its table
    in the README, and the device's other benchmarks still shown, from the earlier run that has them."""
    shutil.copytree(FIXTURES, tmp_path / "results")
    later = tmp_path / "results" / "cpu" / "2000-01-02"
    later.mkdir()
    rows = [{"config": "f2llm-0.6b", "engine": "deepspeed ZeRO-2", "world_size": 32, "state_gib": 1.42,
             "budget_gib": 51.2, "checkpointing": "8 of 28 layers (by the memory budget)", "chunks": 1,
             "real_share": 0.985, "executed_tflop": 109.4, "ideal_tflop": 99.4, "ratio": 1.101},
            {"config": "f2llm-0.6b engine=ddp data.batch_size=512 grad_cache.enabled=true", "engine": "ddp",
             "world_size": 1, "state_gib": 8.88, "budget_gib": 45.9, "checkpointing": "off (by the memory budget)",
             "chunks": 72, "real_share": 0.989, "executed_tflop": 4325.0, "ideal_tflop": 3195.0,
             "ratio": 1.354}]  # fmt: skip
    command = "python benchmarks/bench_train_step.py --flops --config all --out x"
    meta = {"gpu_memory_gb": 80.0, "activation_memory_share": 0.7, "recipe_global_queries": 512}
    env = {"command": command, "device": "cpu (2 cores, 2 torch threads)"}
    payload = {"benchmark": "train_step_flops_configs", "rows": rows, "env": env, "meta": meta}
    (later / "train_step_flops_configs.json").write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + START + AFTER)
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    region = region_of(readme)
    assert "### CPU: cpu (2 cores, 2 torch threads), 2000-01-02" in region
    assert "`python benchmarks/bench_train_step.py --flops --config all`" in region
    assert "70% of the memory left after the training state" in region and "an 80 GB GPU" in region
    found = tables(region)
    configs = found["FLOPs of one training step per shipped config, executed vs ideal (meta device, 2000-01-02)"]
    assert [(r["config (+ overrides)"], r["GPUs"], r["executed / ideal"]) for r in configs] == [
        (w["config"], str(w["world_size"]), cell(w["ratio"])) for w in rows
    ]
    assert configs[0]["checkpointing"] == rows[0]["checkpointing"] and configs[1]["forwards with grad"] == "72"
    # The earlier run's benchmarks, under their own date and links.
    cpu = found["Training step ablation (cpu (2 cores, 2 torch threads), 2000-01-01)"]
    assert [r["row"] for r in cpu] == [w["row"] for w in load(CPU_RUN, "train_step_cpu")["rows"]]
    assert "shown from the device's earlier runs (2000-01-01)" in region
    assert "cpu/2000-01-01/train_step_cpu.json" in region and "cpu/2000-01-02/train_step_flops_configs.json" in region
    links = [readme.parent / t for t in re.findall(r"\]\(([^)]+)\)", region)]
    assert all(p.exists() for p in links), [p for p in links if not p.exists()]
