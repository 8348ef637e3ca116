"""Render committed benchmark results into the README's Performance section, PNG plots and the GPU suite's summary.

Commands (from the repository root):
    python benchmarks/report.py                   # PNGs in every results folder + README performance section
    python benchmarks/report.py --check           # exit 1 when README.md differs from what the results render
    python benchmarks/report.py plots DIR         # PNGs of one results folder
    python benchmarks/report.py summary DIR       # short pass/fail + key-number table of one folder (GPU suite)

Results live in ``benchmarks/results/<device>/<yyyy-mm-dd>/`` as the JSON files the benchmark scripts write
(``benchmarks/common.py`` write_results); ``local/`` (uncommitted runs) is ignored. The README shows the latest run
of each device (GPU devices first, then CPU, clearly labelled), with links to the source files and earlier runs; a
benchmark the latest run did not repeat is shown from the newest earlier run of the device that has it (its heading
and links name that run), so that a run of a few benchmarks does not hide the others.
Only the region between the ``<!-- performance:start ... -->`` and ``<!-- performance:end -->`` lines is rewritten.

Plots (one PNG per benchmark, saved next to its JSON): time and memory for each kernel implementation at each size
(pooling.png, contrastive.png), tokens/s and peak memory per ablation row (train_step.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START = re.compile(r"^<!-- performance:start.*-->$", re.MULTILINE)
END = "<!-- performance:end -->"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SCRIPTS = {"pooling": "bench_pooling.py", "contrastive": "bench_contrastive.py", "train_step": "bench_train_step.py",
           "train_step_comm": "bench_train_step.py", "train_step_flops": "bench_train_step.py",
           "train_step_flops_configs": "bench_train_step.py"}  # fmt: skip
TITLES = {"pooling": "Pooling + L2 norm", "contrastive": "Contrastive loss (InfoNCE)",
          "train_step": "Training step ablation", "train_step_comm": "Communication per training step",
          "train_step_flops": "FLOPs of one training step, executed vs ideal",
          "train_step_flops_configs": "FLOPs of one training step per shipped config, executed vs ideal"}  # fmt: skip
COMM_TABLE = [("row", "engine, gradient-cache chunks"), ("collectives", "collectives per step"),
              ("comm_mib", "MiB sent per rank"), ("per_gradient", "x gradient size per step"),
              ("per_chunk_gradients", "x gradient size per chunk")]  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    """One results folder: ``<device>/<date>/`` and the JSON payloads in it, by benchmark name."""

    folder: Path
    device_dir: str
    date: str
    results: dict[str, dict[str, Any]]
    # Results carried from an earlier run of the device (with_earlier_results), by benchmark name: their run.
    origins: dict[str, Run] = field(default_factory=dict)

    def source(self, name: str) -> Run:
        """The run whose folder holds ``<name>.json``: this one, or the earlier one it was carried from."""
        return self.origins.get(name, self)

    @property
    def device(self) -> str:
        """The device as the results name it (the first JSON's env), else the folder name."""
        for payload in self.results.values():
            if "device" in payload.get("env", {}):
                return str(payload["env"]["device"])
        return self.device_dir

    @property
    def is_cpu(self) -> bool:
        return self.device.lower().startswith("cpu")

    def get(self, kind: str, variant: str) -> dict[str, Any] | None:
        """The payload of ``<kind>_<variant>`` (e.g. pooling_cuda), where ``variant`` is cuda, cpu, check_cuda..."""
        return self.results.get(f"{kind}_{variant}")

    def first(self, kind: str, variants: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
        for v in variants:
            if (payload := self.get(kind, v)) is not None:
                return f"{kind}_{v}", payload
        return None


def load_run(folder: Path) -> Run:
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"report: {path} is not valid JSON ({exc}); fix or remove it") from exc
        if isinstance(payload, dict) and "rows" in payload and "benchmark" in payload:
            results[payload["benchmark"]] = payload
    return Run(folder, folder.parent.name, folder.name, results)


def find_runs(results_root: Path) -> list[Run]:
    """Every ``<device>/<date>/`` folder holding benchmark JSON, ``local/`` excluded, sorted by device then date."""
    runs = []
    for folder in sorted(results_root.glob("*/*/")):
        if folder.parent.name == "local" or not DATE.match(folder.name):
            continue
        run = load_run(folder)
        if run.results:
            runs.append(run)
    return runs


def with_earlier_results(run: Run, runs: Sequence[Run]) -> Run:
    """``run`` with every benchmark it lacks taken from the newest earlier run of its device that has one."""
    results, origins = dict(run.results), {}
    earlier = sorted((r for r in runs if r.device_dir == run.device_dir and r.date < run.date), key=lambda r: r.date)
    for older in reversed(earlier):
        for name, payload in older.results.items():
            if name not in results:
                results[name], origins[name] = payload, older
    return Run(run.folder, run.device_dir, run.date, results, origins)


def latest_per_device(runs: Sequence[Run]) -> list[Run]:
    """The newest run of each device folder: GPU devices first (by name), then CPU."""
    latest: dict[str, Run] = {}
    for run in runs:
        if run.device_dir not in latest or run.date > latest[run.device_dir].date:
            latest[run.device_dir] = run
    return sorted(latest.values(), key=lambda r: (r.is_cpu, r.device_dir))


# ------------------------------------------------------------------------------------------------ tables
def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def num_range(values: Sequence[Any], fmt: str = "{:.3g}", suffix: str = "") -> str:
    """'lo-hi' (or the single value) of the numeric ``values``; '-' when there are none."""
    nums = sorted(float(v) for v in values if is_num(v))
    if not nums:
        return "-"
    lo, hi = fmt.format(nums[0]), fmt.format(nums[-1])
    return f"{lo}{suffix}" if lo == hi else f"{lo}-{hi}{suffix}"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``columns`` = [(key, header)]; missing values are blank."""
    renamed = [{header: row.get(key, "") for key, header in columns} for row in rows]
    return markdown_table(renamed, [header for _, header in columns])


POOLING_CUDA = [("B", "B"), ("L", "L"), ("D", "D"), ("mode", "mode"), ("impl", "impl"), ("fwd_ms", "fwd ms"),
                ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_bwd_speedup_vs_ref", "speedup vs ref"),
                ("peak_extra_mib", "peak extra MiB"), ("fwd_pct_copy_bw", "fwd % of copy bandwidth")]  # fmt: skip
POOLING_CPU = [("B", "B"), ("L", "L"), ("D", "D"), ("mode", "mode"), ("f2llm_cpu_ms", "f2llm CPU path ms"),
               ("reference_ms", "reference ms"), ("speedup", "speedup")]  # fmt: skip
CONTRASTIVE_CUDA = [("B", "B"), ("N", "N"), ("D", "D"), ("impl", "impl"), ("fwd_ms", "fwd ms"),
                    ("fwd_bwd_ms", "fwd+bwd ms"), ("speedup_vs_ref", "speedup vs ref"),
                    ("peak_extra_mib", "peak extra MiB"), ("mem_vs_ref", "memory vs ref"), ("tflops", "TFLOP/s"),
                    ("pct_of_matmul", "% of matmul")]  # fmt: skip
CONTRASTIVE_CPU = [("impl", "impl"), ("B", "B"), ("N", "N"), ("D", "D"), ("median_s", "median s"),
                   ("peak_extra_mib", "peak extra MiB"), ("mem_ratio_naive_over_chunked", "naive / chunked memory"),
                   ("time_ratio_chunked_over_naive", "chunked / naive time")]  # fmt: skip
TRAIN_STEP = [("row", "row"), ("status", "status"), ("attention", "attention"), ("queries", "queries"),
              ("real_share", "real-token share"), ("step_s", "step s"), ("tokens_per_s", "tokens/s"),
              ("mfu_pct", "MFU %"), ("peak_mib", "peak MiB")]  # fmt: skip
FLOPS_TABLE = [("model", "model"), ("row", "row"), ("checkpointing", "checkpointing"), ("chunks", "chunks"),
               ("real_share", "real-token share"), ("executed_tflop", "executed TFLOP"),
               ("ideal_tflop", "ideal TFLOP"), ("ratio", "executed / ideal"), ("attention_pct", "attention %"),
               ("recompute_pct", "recompute %")]  # fmt: skip
TABLES = {
    ("pooling", "cuda"): POOLING_CUDA,
    ("pooling", "cpu"): POOLING_CPU,
    ("contrastive", "cuda"): CONTRASTIVE_CUDA,
    ("contrastive", "cpu"): CONTRASTIVE_CPU,
    ("train_step", "cuda"): TRAIN_STEP,
    ("train_step", "cpu"): TRAIN_STEP,
}


def shown_command(payload: dict[str, Any], kind: str) -> str:
    """The command that produced ``payload`` without its --out argument (default: the script of ``kind``)."""
    command = payload.get("env", {}).get("command") or f"python benchmarks/{SCRIPTS[kind]}"
    return re.sub(r"\s--out\s+\S+", "", command)


def check_line(run: Run, kind: str, link: Callable[[Path], str]) -> str | None:
    """'pooling correctness vs float64: 48/48 PASS (...)' from ``<kind>_check_*``, or None."""
    found = run.first(f"{kind}_check", ["cuda", "cpu"])
    if found is None:
        return None
    name, payload = found
    rows = payload["rows"]
    passed = sum(r.get("pass") == "PASS" for r in rows)
    errs = [v for r in rows for k, v in r.items() if k.endswith("rel_err")]
    return (
        f"- {TITLES[kind]} correctness vs float64 (`{shown_command(payload, kind)}`): **{passed}/{len(rows)} PASS**, "
        f"largest relative error {num_range([max((e for e in errs if is_num(e)), default=None)])} "
        f"([{name}.json]({link(run.source(name).folder / f'{name}.json')}))"
    )


def train_step_note(meta: dict[str, Any]) -> str:
    """One paragraph on what the training-step rows ran: model, batch, lengths, the matmul rate of the MFU."""
    lengths, settings = meta.get("lengths", {}), meta.get("settings", {})

    def spread(which: str) -> str:
        stats = lengths.get(which, {})
        return f"mean {stats.get('mean', '?')} ({stats.get('min', '?')}-{stats.get('max', '?')})"

    params, matmul = meta.get("params", 0) / 1e6, meta.get("matmul_params", 0) / 1e6
    dtype = str(meta.get("dtype", "?")).removeprefix("torch.")
    return (
        f"{meta.get('model', '?')}: {params:.1f}M parameters ({matmul:.1f}M in weight matrices outside the "
        f"embedding), {dtype}, {meta.get('attn_implementation', '?')} attention, gradient checkpointing; "
        f"{settings.get('queries', '?')} "
        f"queries x (1 + {settings.get('negatives', '?')}) documents per step. Text lengths in tokens, drawn from "
        f"SciFact: queries {spread('queries')}, documents {spread('documents')}. MFU is against "
        f"{meta.get('peak_measured', '?')}: {num_range([meta.get('peak_tflops')])} TFLOP/s, measured in the same run."
    )


def flops_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """train_step_flops rows with their shares as percentages (what the README table shows)."""
    out = []
    for r in payload["rows"]:
        row = dict(r)
        for share, pct in (("attention_share", "attention_pct"), ("recompute_share", "recompute_pct")):
            if is_num(r.get(share)):
                row[pct] = 100 * r[share]
        out.append(row)
    return out


def flops_summary_lines(payload: dict[str, Any]) -> list[str]:
    """One line per model: the summary's baseline, full-stack and gradient-cache ratios."""
    lines = []
    for model, s in payload.get("summary", {}).items():

        def x(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]:.2f}x" if is_num(s.get(key)) else "-"

        lines.append(
            f"- {model}: baseline **{x('baseline_ratio')}**, full stack **{x('full_stack_ratio')}** "
            f"({x('full_stack_no_checkpointing_ratio')} where its activations fit without checkpointing), "
            f"gradient cache ({s.get('grad_cache_queries')} queries) **{x('grad_cache_ratio')}** of the ideal; "
            f"activation budget {num_range([s.get('activation_budget_gib')])} GiB"
        )
    return lines


def flops_note(payload: dict[str, Any]) -> str:
    meta = payload.get("meta", {})
    return (
        "One `Trainer.train_step` per row on the meta device (no hardware, so these are counts, not measurements of "
        "a device): the linear layers' FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (padding, "
        "checkpointing's recompute and the gradient cache's no-grad pass included), attention by the kernel's work "
        "per call (dense sdpa masks: every row's full W x W; varlen: the causal pairs of each segment; backward "
        f"{meta.get('attention_backward_factor', '?')}x forward) and the loss from its shapes. Ideal: "
        f"{meta.get('ideal', '?')}. Real Qwen3 dimensions, SciFact lengths, 16 queries x (1 + 7) documents, "
        f"gradient-checkpointing rows decided by `model.gradient_checkpointing: auto` against an "
        f"{num_range([meta.get('gpu_memory_gb')])} GB GPU less {meta.get('state_bytes_per_param', '?')} bytes per "
        "parameter of training state."
    )


CONFIGS_TABLE = [("config", "config (+ overrides)"), ("engine", "engine"), ("world_size", "GPUs"),
                 ("state_gib", "training state GiB / GPU"), ("budget_gib", "activation budget GiB"),
                 ("checkpointing", "checkpointing"), ("chunks", "forwards with grad"),
                 ("real_share", "real-token share"), ("executed_tflop", "executed TFLOP / GPU"),
                 ("ideal_tflop", "ideal TFLOP / GPU"), ("ratio", "executed / ideal")]  # fmt: skip


def configs_note(payload: dict[str, Any]) -> str:
    meta = payload.get("meta", {})
    share = meta.get("activation_memory_share")
    share_text = f"{100 * share:.0f}%" if is_num(share) else "the trainer's share"
    return (
        "One GPU's `Trainer.train_step` of each shipped recipe config (and of the README's gradient-cache launches), "
        "counted on the meta device as the table above is: the config's model dimensions, its batch (data.batch_size "
        "queries x (1 + the retrieval negatives) documents, SciFact lengths), packing, gradient cache and "
        "`gradient_checkpointing: auto`, decided by the trainer's RecomputePolicy against the budget the trainer "
        f"derives on an {num_range([meta.get('gpu_memory_gb')])} GB GPU: {share_text} of the memory left after the "
        "training state one GPU holds under the config's engine at that many GPUs (`f2llm.engine."
        "training_state_bytes`). GPUs: the recipe's global batch of "
        f"{meta.get('recipe_global_queries', '?')} queries / data.batch_size. Each row's own command is its "
        "`command` in the JSON."
    )


def render_run(run: Run, link: Callable[[Path], str]) -> str:
    """Markdown of one results folder: correctness lines, then one table (+ plot) per benchmark."""
    env = next(iter(run.results.values())).get("env", {})
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "triton") if k in env)
    if run.is_cpu:
        heading = f"### CPU: {run.device}, {run.date}"
        intro = (
            "CPU numbers of the CPU code paths (PyTorch paths of the ops, a tiny random Qwen3 for the training step) "
            "on the development machine, shared with other work. They show that every path runs and how the "
            "paths compare on a CPU; they are not GPU performance figures."
        )
    else:
        heading = f"### {run.device}, {run.date}"
        intro = "Measured by `benchmarks/gpu_suite.sh` (see `benchmarks/README.md`)."
    parts = [
        heading,
        "",
        f"{intro} Versions: {versions}. Files: [{run.device_dir}/{run.date}]({link(run.folder)}).",
        "",
    ]
    carried: set[str] = set()

    def source(name: str) -> Run:
        """The run ``name`` is shown from (noted when it is an earlier one)."""
        if name in run.origins:
            carried.add(run.origins[name].date)
        return run.source(name)

    checks = [line for kind in ("pooling", "contrastive") if (line := check_line(run, kind, link))]
    for kind in ("pooling", "contrastive"):
        if found := run.first(f"{kind}_check", ["cuda", "cpu"]):
            source(found[0])
    if checks:
        parts += [*checks, ""]
    for kind in ("pooling", "contrastive", "train_step"):
        found = run.first(kind, ["cuda", "cpu"])
        if found is None:
            continue
        name, payload = found
        variant = name.rsplit("_", 1)[1]
        script = SCRIPTS[kind]
        device = payload.get("env", {}).get("device", run.device)  # its own: thread counts may differ
        origin = source(name)
        parts += [
            f"#### {TITLES[kind]} ({device}, {origin.date})",
            "",
            f"`{shown_command(payload, kind)}`; source: [{name}.json]({link(origin.folder / f'{name}.json')}), "
            f"script: [{script}]({link(ROOT / 'benchmarks' / script)})",
            "",
        ]
        if kind == "train_step" and "meta" in payload:
            parts += [train_step_note(payload["meta"]), ""]
        parts += [table(payload["rows"], TABLES[(kind, variant)]), ""]
        parts += [f"![{TITLES[kind]}, {device}]({link(origin.folder / f'{kind}.png')})", ""]

    def section_head(name: str, payload: dict, where: str) -> list[str]:
        """A results section's heading (``where`` it ran, and when) and its command, source and script links."""
        origin = source(name)
        return [
            f"#### {TITLES[name]} ({where}, {origin.date})",
            "",
            f"`{shown_command(payload, name)}`; source: [{name}.json]({link(origin.folder / f'{name}.json')}), "
            f"script: [{SCRIPTS[name]}]({link(ROOT / 'benchmarks' / SCRIPTS[name])})",
            "",
        ]

    flops = run.results.get("train_step_flops")
    if flops is not None:
        parts += [
            *section_head("train_step_flops", flops, "meta device"),
            flops_note(flops),
            "",
            *flops_summary_lines(flops),
            "",
            table(flops_rows(flops), FLOPS_TABLE),
            "",
        ]
    configs = run.results.get("train_step_flops_configs")
    if configs is not None:
        parts += [
            *section_head("train_step_flops_configs", configs, "meta device"),
            configs_note(configs),
            "",
            table(configs["rows"], CONFIGS_TABLE),
            "",
        ]
    comm = run.results.get("train_step_comm")
    if comm is not None:
        meta = comm.get("meta", {})
        parts += [
            *section_head("train_step_comm", comm, f"{meta.get('ranks')} CPU ranks, {meta.get('backend')}"),
            "The trainer's own step; bytes of the tensors handed to collectives on one rank, also as multiples of one "
            f"full set of gradients ({num_range([comm['rows'][0].get('gradient_mib')])} MiB here), which holds for "
            f"any model size. {meta.get('queries_per_rank')} queries x {meta.get('texts_per_query')} texts per rank; "
            f"{meta.get('zero3', '')}.",
            "",
            table(comm["rows"], COMM_TABLE),
            "",
        ]
    if carried:
        dates = ", ".join(sorted(carried))
        parts[2] += f" Benchmarks this run did not repeat are shown from the device's earlier runs ({dates})."
    return "\n".join(parts)


def render_readme_region(results_root: Path, readme: Path) -> str:
    """The text between the performance markers, rendered from every run under ``results_root``."""

    def link(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), readme.resolve().parent)).as_posix()

    runs = find_runs(results_root)
    latest = latest_per_device(runs)
    lines = [
        "GPU numbers come only from runs of `benchmarks/gpu_suite.sh` on a GPU machine, committed under "
        "`benchmarks/results/<gpu>/<date>/`; this section is rendered from those files by "
        "`python benchmarks/report.py`.",
        "",
    ]
    if not any(not r.is_cpu for r in latest):
        lines += ["No GPU run has been committed yet, so this section has no GPU figures.", ""]
    for run in latest:
        lines.append(render_run(with_earlier_results(run, runs), link))
    earlier = [r for r in runs if r not in latest]
    if earlier:
        lines += ["Earlier runs: " + ", ".join(f"[{r.device_dir}/{r.date}]({link(r.folder)})" for r in earlier), ""]
    return "\n".join(lines).rstrip() + "\n"


def linked_files(region: str, readme: Path) -> list[Path]:
    return [readme.parent / target for target in re.findall(r"\]\(([^)]+)\)", region)]


def replace_region(text: str, region: str, readme: Path) -> str:
    start = START.search(text)
    end = text.find(END)
    if start is None or end < start.end():
        raise SystemExit(
            f"report: {readme} has no '<!-- performance:start ... -->' line followed by '{END}'; add both markers "
            "where the Performance section goes"
        )
    return text[: start.end()] + "\n" + region + text[end:]


# ------------------------------------------------------------------------------------------------ plots
def _grouped_bars(ax: Any, cases: list[str], series: dict[str, dict[str, float | str]], ylabel: str) -> None:
    """One group of bars per case, one bar per series (implementation); a failed case (e.g. "OOM") is written
    where its bar would be. Log scale for widely spread values."""
    width = 0.8 / max(1, len(series))
    numbers = [v for values in series.values() for v in values.values() if is_num(v) and v > 0]
    for i, (name, values) in enumerate(series.items()):
        at = {j + i * width: values[case] for j, case in enumerate(cases) if case in values}
        bars = {x: v for x, v in at.items() if is_num(v)}
        ax.bar(list(bars), list(bars.values()), width, label=name, color=f"C{i}")
        for x, v in at.items():
            if not is_num(v):
                ax.text(x, min(numbers, default=1.0), str(v), rotation=90, ha="center", va="bottom", fontsize=7,
                        color=f"C{i}")  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    if numbers and max(numbers) > 20 * min(numbers):  # log only where values span orders of magnitude
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def kernel_series(
    rows: list[dict[str, Any]], case: Callable[[dict], str], metric: str
) -> dict[str, dict[str, float | str]]:
    """{impl: {case: value}} of ``metric``: numbers, and failure markers such as "OOM" (missing values left out)."""
    series: dict[str, dict[str, float | str]] = {}
    for r in rows:
        value = r.get(metric)
        if is_num(value) or (isinstance(value, str) and value):
            series.setdefault(str(r["impl"]), {})[case(r)] = float(value) if is_num(value) else value
    return series


def long_pooling_cpu(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pooling_cpu rows (both implementations in one row) as one row per implementation."""
    out = []
    for r in rows:
        for impl, key in (("f2llm-cpu", "f2llm_cpu_ms"), ("reference", "reference_ms")):
            out.append({**r, "impl": impl, "fwd_bwd_ms": r.get(key)})
    return out


def plot_run(run: Run) -> list[Path]:
    """Write pooling.png, contrastive.png and train_step.png (those whose results exist) into the run's folder."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except ImportError as exc:
        print(f"report: matplotlib not importable ({exc}): no PNGs for {run.folder}", file=sys.stderr)
        return []
    written = []

    def title(payload: dict[str, Any]) -> str:
        return f"{payload.get('env', {}).get('device', run.device)}, {run.date}"

    def save(fig: Any, name: str) -> None:
        path = run.folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)

    def kernel_figure(payload: dict, rows: list[dict], case: Callable[[dict], str], metrics: list, what: str) -> Any:
        """One panel per metric that has numbers; a note instead when none has (every size failed)."""

        def measured(metric: str) -> bool:
            return any(is_num(v) for values in kernel_series(rows, case, metric).values() for v in values.values())

        panels = [(m, label) for m, label in metrics if measured(m)]
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
        for ax, (metric, label) in zip(axes[0], panels, strict=False):
            _grouped_bars(ax, list(dict.fromkeys(case(r) for r in rows)), kernel_series(rows, case, metric), label)
        if not panels:
            axes[0][0].text(0.5, 0.5, "no measured values", ha="center", va="center")
        fig.suptitle(f"{what} ({title(payload)})", fontsize=9)
        return fig

    if found := run.first("pooling", ["cuda", "cpu"]):
        name, payload = found
        rows = payload["rows"] if name.endswith("cuda") else long_pooling_cpu(payload["rows"])

        def pool_case(r: dict) -> str:
            return f"B{r['B']} L{r['L']} D{r['D']} {r['mode']}"

        metrics = [("fwd_bwd_ms", "fwd+bwd ms"), ("peak_extra_mib", "peak extra MiB")]
        save(kernel_figure(payload, rows, pool_case, metrics, "pooling + L2 norm"), "pooling.png")

    if found := run.first("contrastive", ["cuda", "cpu"]):
        name, payload = found
        time_metric = ("fwd_bwd_ms", "fwd+bwd ms") if name.endswith("cuda") else ("median_s", "fwd+bwd s (median)")

        def loss_case(r: dict) -> str:
            return f"B{r['B']} N{r['N']} D{r['D']}"

        metrics = [time_metric, ("peak_extra_mib", "peak extra MiB")]
        save(kernel_figure(payload, payload["rows"], loss_case, metrics, "InfoNCE loss"), "contrastive.png")

    if found := run.first("train_step", ["cuda", "cpu"]):
        _, payload = found
        rows = payload["rows"]
        labels = [r["row"] if r.get("status") == "ok" else f"{r['row']} [{str(r.get('status')).split(':')[0]}]"
                  for r in rows][::-1]  # fmt: skip
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
        for ax, (metric, label) in zip(axes, (("tokens_per_s", "real tokens / s"), ("peak_mib", "peak MiB")),
                                       strict=True):  # fmt: skip
            values = [float(r[metric]) if is_num(r.get(metric)) else 0.0 for r in rows][::-1]
            ax.barh(range(len(rows)), values, color="tab:blue" if metric == "tokens_per_s" else "tab:orange")
            ax.set_xlabel(label)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(rows)))
        axes[0].set_yticklabels(labels, fontsize=7)
        fig.suptitle(f"training step ablation ({title(payload)})", fontsize=9)
        save(fig, "train_step.png")
    return written


# ------------------------------------------------------------------------------------------------ summary
def read_steps(folder: Path) -> list[dict[str, str]]:
    """The GPU suite's steps.txt: lines 'name exit_code seconds limit_s'."""
    path = folder / "steps.txt"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            steps.append({"name": fields[0], "rc": fields[1], "seconds": fields[2],
                          "limit": fields[3] if len(fields) > 3 else ""})  # fmt: skip
    return steps


def step_result(rc: str) -> str:
    return {"0": "PASS", "124": "TIMEOUT", "137": "TIMEOUT (killed)", "skipped": "SKIPPED (no time left)"}.get(
        rc, f"FAIL (exit {rc})"
    )


def key_numbers(run: Run) -> dict[str, str]:
    """Step name -> the few numbers worth a glance."""
    out: dict[str, str] = {}
    for kind in ("pooling", "contrastive"):
        if found := run.first(f"{kind}_check", ["cuda", "cpu"]):
            rows = found[1]["rows"]
            passed = sum(r.get("pass") == "PASS" for r in rows)
            out[f"{kind}_check"] = f"{passed}/{len(rows)} cases PASS"
    if payload := run.get("pooling", "cuda"):
        ours = [r for r in payload["rows"] if r.get("impl") == "f2llm"]
        out["pooling_bench"] = (
            f"f2llm fwd at {num_range([r.get('fwd_pct_copy_bw') for r in ours], '{:.0f}', '%')} of copy bandwidth; "
            f"fwd+bwd speedup vs reference {num_range([r.get('fwd_bwd_speedup_vs_ref') for r in ours], suffix='x')}"
        )
    elif payload := run.get("pooling", "cpu"):
        out["pooling_bench"] = (
            f"CPU path speedup vs reference {num_range([r.get('speedup') for r in payload['rows']])}x"
        )
    if payload := run.get("contrastive", "cuda"):
        by_impl: dict[str, list[dict]] = {}
        for r in payload["rows"]:
            by_impl.setdefault(str(r.get("impl")), []).append(r)
        parts = []
        for impl, rows in by_impl.items():
            if impl == "reference":
                continue
            ooms = sum(r.get("fwd_bwd_ms") == "OOM" for r in rows)
            parts.append(
                f"{impl}: speedup {num_range([r.get('speedup_vs_ref') for r in rows], suffix='x')}, memory "
                f"{num_range([r.get('mem_vs_ref') for r in rows], suffix='x')} of ref"
                + (f", {ooms} OOM" if ooms else "")
            )
        ref_ooms = sum(r.get("fwd_bwd_ms") == "OOM" for r in by_impl.get("reference", []))
        out["contrastive_bench"] = "; ".join(parts) + (f"; reference OOM at {ref_ooms} sizes" if ref_ooms else "")
    elif payload := run.get("contrastive", "cpu"):
        chunked = next((r for r in payload["rows"] if r.get("impl") == "chunked"), {})
        out["contrastive_bench"] = (
            f"chunked vs naive: memory / {num_range([chunked.get('mem_ratio_naive_over_chunked')])}, "
            f"time x {num_range([chunked.get('time_ratio_chunked_over_naive')])}"
        )
    if found := run.first("train_step", ["cuda", "cpu"]):
        rows = found[1]["rows"]
        ok = [r for r in rows if r.get("status") == "ok"]
        out["train_step"] = f"{len(ok)}/{len(rows)} rows measured (table below)"
    if flops := run.results.get("train_step_flops"):
        out["train_step_flops"] = "; ".join(
            f"{model}: executed / ideal FLOPs baseline {num_range([s.get('baseline_ratio')])}x, full stack "
            f"{num_range([s.get('full_stack_ratio')])}x, gradient cache {num_range([s.get('grad_cache_ratio')])}x"
            for model, s in flops.get("summary", {}).items()
        )
    return out


def attention_kind(label: Any) -> str:
    """What a row's attention computes, from its label: "varlen", "mask <row width>" or "padded"."""
    text = str(label)
    if text.startswith("varlen"):
        return "varlen"
    if "block-diagonal" in text:
        return "mask " + "".join(c for c in text.split("rows of", 1)[-1] if c.isdigit())
    return "padded"


def with_executed_mfu(timed: dict[str, Any], flops: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The timed rows with ``exec_mfu_pct``: executed FLOPs per real token of the --flops row of the same
    configuration (row key and attention; a gradient-cache row of another batch: the per-token count of the
    counted one) x tokens/s / the run's measured matmul rate. ``mfu_pct`` stays the model-FLOPs MFU."""
    meta = timed.get("meta", {})
    peak = meta.get("peak_tflops")
    model = str(meta.get("settings", {}).get("model", ""))
    label = f"Qwen3-{model[:-1]}B" if model.endswith("b") else f"Qwen3-{model}"
    counted = [r for r in (flops or {}).get("rows", []) if r.get("model") == label and r.get("status") == "ok"]
    out = []
    for row in timed["rows"]:
        row = dict(row)
        # Rows of results written before rows had keys: the label's "a." / "d2." / "e." prefix.
        key = str(row.get("key") or str(row.get("row", "")).split(".", 1)[0])
        kind = attention_kind(row.get("attention"))
        same = [r for r in counted if attention_kind(r.get("attention")) == kind]
        match = next((r for r in same if r.get("key") == key), None)
        if match is None and key.startswith("e"):
            match = next((r for r in same if str(r.get("key", "")).startswith("e")), None)
        if match and is_num(row.get("tokens_per_s")) and is_num(peak) and peak > 0:
            per_token = match["executed_flops"] / match["real_tokens"]
            row["exec_mfu_pct"] = 100 * per_token * row["tokens_per_s"] / (peak * 1e12)
            row["executed_per_ideal"] = match["ratio"]
        out.append(row)
    return out


def render_summary(run: Run) -> str:
    """The GPU suite's closing summary: one line per step, then the training-step rows."""
    numbers = key_numbers(run)
    steps = read_steps(run.folder)
    rows = [{"step": s["name"], "result": step_result(s["rc"]), "seconds": s["seconds"], "limit s": s["limit"],
             "key numbers": numbers.get(s["name"], "")} for s in steps]  # fmt: skip
    if not steps:  # a folder without the suite's steps.txt: one line per benchmark found
        rows = [{"step": k, "result": "", "seconds": "", "limit s": "", "key numbers": v} for k, v in numbers.items()]
    parts = [f"## f2llm GPU suite summary: {run.device}, {run.date}", "",
             markdown_table(rows, ["step", "result", "seconds", "limit s", "key numbers"]), ""]  # fmt: skip
    if found := run.first("train_step", ["cuda", "cpu"]):
        cols = [("row", "row"), ("status", "status"), ("tokens_per_s", "tokens/s"), ("mfu_pct", "model MFU %"),
                ("exec_mfu_pct", "executed MFU %"), ("executed_per_ideal", "executed / ideal FLOPs"),
                ("peak_mib", "peak MiB"), ("step_s", "step s"), ("real_share", "real share")]  # fmt: skip
        rows = with_executed_mfu(found[1], run.results.get("train_step_flops"))
        parts += [f"training step ({found[1].get('meta', {}).get('model', '')}); executed MFU from the --flops rows of "
                  "the same configuration", "", table(rows, cols), ""]  # fmt: skip
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="readme", choices=["readme", "plots", "summary"])
    parser.add_argument("folder", nargs="?", type=Path, help="plots / summary: one results folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="readme: root of <device>/<date>/ folders")
    parser.add_argument("--readme", type=Path, default=README, help="readme: the file whose region is rewritten")
    parser.add_argument("--check", action="store_true", help="readme: only compare; exit 1 when out of date")
    args = parser.parse_args(argv)

    if args.command in ("plots", "summary"):
        if args.folder is None or not args.folder.is_dir():
            parser.error(f"{args.command} needs an existing results folder, got {args.folder}")
        run = load_run(args.folder)
        if args.command == "plots":
            for path in plot_run(run):
                print(f"wrote {path}")
        else:
            text = render_summary(run)
            (args.folder / "summary.md").write_text(text)
            print(text)
        return 0

    readme = args.readme
    text = readme.read_text()
    region = render_readme_region(args.results, readme)
    if args.check:
        current = replace_region(text, region, readme)
        missing = [p for p in linked_files(region, readme) if not p.exists()]
        if current != text:
            print(f"report: the performance section of {readme} is out of date: run python benchmarks/report.py")
            return 1
        if missing:
            print(f"report: {readme} links files that do not exist: {[str(p) for p in missing]}; run "
                  "python benchmarks/report.py to write the plots")  # fmt: skip
            return 1
        print(f"report: {readme} is up to date")
        return 0
    for run in find_runs(args.results):
        plot_run(run)
    readme.write_text(replace_region(text, region, readme))
    print(f"report: wrote the performance section of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
