"""MTEB tasks that read the datasets shipped under ``data/`` instead of the Hugging Face hub.

Each class subclasses MTEB's own task class (same name, metadata, splits, main metric, evaluator settings such as
``samples_per_label`` or the clustering protocol) and only replaces ``load_data``; the numbers are therefore
computed by MTEB's evaluators exactly as for the hub datasets:

* ``SciFact`` (retrieval, nDCG@10; corpus text ``title + " " + text``);
* ``STSBenchmark`` (test split, Spearman of cosine similarity);
* ``Banking77Classification``, ``EmotionClassification`` (logistic regression on embeddings of
  ``samples_per_label`` training texts per label, averaged over ``n_experiments`` draws; accuracy);
* ``TwentyNewsgroupsClustering.v2`` (MiniBatchKMeans, v-measure) -- *approximate*: MTEB clusters its own
  sub-samples of 20 Newsgroups subject lines, which are not available; this task clusters the subject lines of the
  7,532 bydate test posts and embeds as many of them (2,381) as MTEB's v2 task embeds of its 59,545 lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from datasets import Dataset, DatasetDict
from mteb.abstasks.abstask import AbsTask
from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
from mteb.tasks.classification.eng.emotion_classification import EmotionClassification
from mteb.tasks.clustering.eng.twenty_newsgroups_clustering import TwentyNewsgroupsClusteringFast
from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact
from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

from f2llm.evaluation.data import read_banking77, read_beir, read_emotion, read_newsgroup_subjects, read_sts_benchmark


def default_data_dir() -> Path:
    """The repository's ``data/`` folder (the datasets ship with the source tree, not the wheel)."""
    return Path(__file__).resolve().parents[2] / "data"


class LocalTask:
    """Mixin for MTEB tasks whose data comes from ``data_dir``; subclasses implement :meth:`read`."""

    short_name: ClassVar[str]
    # Set when the task approximates MTEB's (its data differs from the benchmark's); printed with the score.
    approximation_note: ClassVar[str | None] = None

    def __init__(self, data_dir: Path | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()

    def read(self) -> Any:
        raise NotImplementedError

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = self.read()
        self.dataset_transform(num_proc=num_proc)
        self.data_loaded = True


def _local_metadata(task_cls: type[AbsTask], where: str) -> Any:
    # The older task versions name their successor; here the version is chosen on purpose (the published scores
    # are for it), so the "superseded" warning is dropped.
    meta = task_cls.metadata
    return meta.model_copy(
        update={"superseded_by": None, "description": f"{meta.description} Read from f2llm's local copy: {where}."}
    )


class LocalSciFact(LocalTask, SciFact):
    short_name = "scifact"
    metadata = _local_metadata(SciFact, "data/retrieval/scifact")

    def read(self) -> dict[str, dict[str, Any]]:
        split = read_beir(self.data_dir / "retrieval" / "scifact", "test")
        corpus = Dataset.from_dict({"id": split.corpus_ids, "title": split.corpus_titles, "text": split.corpus_texts})
        queries = Dataset.from_dict({"id": split.query_ids, "text": split.query_texts})
        test = {"corpus": corpus, "queries": queries, "relevant_docs": split.qrels, "top_ranked": None}
        return {"default": {"test": test}}


class LocalSTSBenchmark(LocalTask, STSBenchmarkSTS):
    short_name = "stsb"
    metadata = _local_metadata(STSBenchmarkSTS, "data/sts/stsbenchmark/sts-test.csv")

    def read(self) -> DatasetDict:
        pairs = read_sts_benchmark(self.data_dir / "sts" / "stsbenchmark" / "sts-test.csv")
        test = Dataset.from_dict({"sentence1": pairs.sentence1, "sentence2": pairs.sentence2, "score": pairs.score})
        return DatasetDict({"test": test})


class LocalBanking77(LocalTask, Banking77Classification):
    short_name = "banking77"
    metadata = _local_metadata(Banking77Classification, "data/classification/banking77")

    def read(self) -> DatasetDict:
        root = self.data_dir / "classification" / "banking77"
        splits = {s: read_banking77(root / f"{s}.csv", root / "categories.json") for s in ("train", "test")}
        return DatasetDict({s: Dataset.from_dict({"text": d.text, "label": d.label}) for s, d in splits.items()})


class LocalEmotion(LocalTask, EmotionClassification):
    short_name = "emotion"
    metadata = _local_metadata(EmotionClassification, "data/classification/emotion")

    def read(self) -> DatasetDict:
        root = self.data_dir / "classification" / "emotion"
        splits = {s: read_emotion(root / f"{s}.txt") for s in ("train", "test")}
        return DatasetDict({s: Dataset.from_dict({"text": d.text, "label": d.label}) for s, d in splits.items()})


# MTEB's v2 task embeds 4% of its 59,545 test lines: int(0.04 * 59545) documents.
_MTEB_20NG_EMBEDDED_DOCUMENTS = 2381


class LocalTwentyNewsgroups(LocalTask, TwentyNewsgroupsClusteringFast):
    short_name = "twentynewsgroups"
    approximation_note = (
        "approximate: MTEB's 20 Newsgroups sub-samples are not available; clusters 2,381 of the 7,532 bydate "
        "test subject lines"
    )
    metadata = _local_metadata(TwentyNewsgroupsClusteringFast, "data/clustering/twentynewsgroups (approximation)")
    max_fraction_of_documents_to_embed = None
    max_document_to_embed = _MTEB_20NG_EMBEDDED_DOCUMENTS

    def read(self) -> DatasetDict:
        subjects, groups = read_newsgroup_subjects(
            self.data_dir / "clustering" / "twentynewsgroups" / "20news_bydate_subjects.tsv", "test"
        )
        return DatasetDict({"test": Dataset.from_dict({"sentences": subjects, "labels": groups})})

    def dataset_transform(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """The local file is already one row per subject line (MTEB's transform flattens its nested subsets)."""


_TASK_CLASSES = (LocalSciFact, LocalSTSBenchmark, LocalBanking77, LocalEmotion, LocalTwentyNewsgroups)
BUILTIN_TASKS: dict[str, type[LocalTask]] = {cls.short_name: cls for cls in _TASK_CLASSES}


def resolve_task_name(name: str) -> type[LocalTask]:
    """A built-in task by short name (``scifact``) or MTEB name (``SciFact``, ``Banking77Classification``)."""
    wanted = name.lower()
    aliases = {"stsbenchmark": "stsb", "twentynewsgroupsclustering": "twentynewsgroups"}
    wanted = aliases.get(wanted, wanted)
    for short, cls in BUILTIN_TASKS.items():
        if wanted in (short, cls.metadata.name.lower()):
            return cls
    choices = ", ".join(f"{s} ({c.metadata.name})" for s, c in BUILTIN_TASKS.items())
    raise KeyError(f"unknown task {name!r}; built-in tasks: {choices}")


def get_local_tasks(names: list[str], data_dir: Path | str | None = None) -> list[AbsTask]:
    """Instantiate built-in tasks by name, reading from ``data_dir`` (default: the repository's ``data/``)."""
    return [resolve_task_name(n)(data_dir=data_dir) for n in names]  # type: ignore[misc]
