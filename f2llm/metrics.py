"""Run metrics: metrics.jsonl and TensorBoard scalars (rank 0), the loss curve PNG, peak memory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class MetricLogger:
    """Rank 0 writes metrics.jsonl and (optionally) TensorBoard scalars; other ranks write nothing.

    :meth:`start` is called with the step a run starts from: a resumed run first drops what the killed run logged
    after its last checkpoint (those steps run again), so every step is in the log once.
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.writer = None

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
            tmp = self.path.with_name(f".tmp-{self.path.name}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of steps after the checkpoint that an earlier run wrote.
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill counts as after every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_loss_curve(metrics_file: Path, out: Path) -> None:
    """PNG of training (and validation) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [("train/loss", "-"), ("train/hard", ":"), ("train/in_batch", "--"), ("train/kd", "-.")]
    curves.append(("val/loss", "o-"))
    for key, style in curves:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("f2llm training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
