"""The kinds of F2LLM v2's 502 sources: a v2 data folder trains with no data.sources settings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from f2llm.config import load_config
from f2llm.data import DataError, SourceOverride, TextTokenizer, load_sources
from f2llm.data.sources import (
    CLASSIFICATION_SOURCES,
    CLUSTERING_SOURCES,
    EXTRA_SOURCES,
    RETRIEVAL_SOURCES,
    SOURCE_KINDS,
    _kind_table,
)
from f2llm.data.v2_sources import V2_CLASSIFICATION_SOURCES, V2_CLUSTERING_SOURCES, V2_RETRIEVAL_SOURCES
from f2llm.distributed import Runtime
from f2llm.trainer import Trainer
from tests.helpers import make_rows, metrics, tiny_tokenizer, trainer_workdir, write_source

datasets.disable_progress_bars()


def test_tables_hold_the_official_v2_lists() -> None:
    v2 = {"retrieval": V2_RETRIEVAL_SOURCES, "classification": V2_CLASSIFICATION_SOURCES}
    v2["clustering"] = V2_CLUSTERING_SOURCES
    assert {kind: (len(names), len(set(names))) for kind, names in v2.items()} == {
        "retrieval": (459, 459),
        "classification": (10, 10),
        "clustering": (33, 33),
    }
    for kind, names in v2.items():
        assert {SOURCE_KINDS[n] for n in names} == {kind}
    v1 = {"retrieval": RETRIEVAL_SOURCES, "classification": CLASSIFICATION_SOURCES, "clustering": CLUSTERING_SOURCES}
    for kind, names in v1.items():  # v1's names kept, with their kinds; v2's lists contain them
        assert {SOURCE_KINDS[n] for n in names} == {kind} and set(names) <= set(v2[kind])
    assert SOURCE_KINDS["mrpc"] == "retrieval" and EXTRA_SOURCES == {"mrpc": "retrieval"}
    assert len(SOURCE_KINDS) == 502 + 1
    assert Counter(SOURCE_KINDS.values()) == {"retrieval": 460, "classification": 10, "clustering": 33}
    # Names of each family, as v2 spells them (suffixes with '-', '#', '+', capitals included).
    for name in ("webfaq_eng", "mmarco_german", "xcodeeval_nl2code_C#", "xcodeeval_code2code_C++", "clirmatrix_ja-de"):
        assert SOURCE_KINDS[name] == "retrieval", name
    assert SOURCE_KINDS["mela"] == SOURCE_KINDS["waimai"] == "classification"
    assert SOURCE_KINDS["sib200"] == SOURCE_KINDS["mlsum_clustering_de"] == "clustering"


def test_a_name_with_two_kinds_is_refused() -> None:
    with pytest.raises(ValueError, match=r"listed with two kinds: \{'b': \['clustering', 'retrieval'\]\}"):
        _kind_table([(["a", "b"], "retrieval"), (["b"], "clustering")])


# ------------------------------------------------------------------------------------------------ a v2 folder
def write_v2_folder(folder: Path, sources: dict[str, list[dict]]) -> Path:
    """``<name>_query.parquet`` per source, passage / negative_i as ids into one corpus.parquet (v2's layout)."""
    corpus: dict[str, str] = {}
    for name, rows in sources.items():
        query_rows = []
        for row in rows:
            query_rows.append(
                {c: v if c == "query" else corpus.setdefault(v, f"doc{len(corpus)}") for c, v in row.items()}
            )
        write_source(folder / f"{name}_query.parquet", query_rows)
    pq.write_table(pa.table({"doc_id": list(corpus.values()), "text": list(corpus)}), folder / "corpus.parquet")
    return folder


def test_v2_only_sources_train_without_settings(tmp_path: Path) -> None:
    """webfaq_eng (retrieval), mela (classification), sib200 (clustering): none in v1's tables nor in data.sources;
    they train with their v2 kinds, and only the retrieval source's steps get the in-batch term."""
    workdir = trainer_workdir(tmp_path / "work")
    v2 = write_v2_folder(
        tmp_path / "v2",
        {  # negatives: the defaults per kind (7 / 1 / 7)
            "webfaq_eng": make_rows(12, 7, prefix="w "),
            "mela": make_rows(8, 1, prefix="m "),
            "sib200": make_rows(8, 7, prefix="s "),
        },
    )
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.paths=[{v2}]", "data.sources={}", "optim.max_steps=null"]
    config = load_config(workdir / "base.yaml", [*overrides, "validate_every=100", "save_every=100"])
    trainer = Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))
    assert {s.name: s.kind for s in trainer.sampler.sources} == {
        "mela": "classification",
        "sib200": "clustering",
        "webfaq_eng": "retrieval",
    }
    trainer.train()
    steps = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert len(steps) == trainer.total_steps == trainer.sampler.steps_per_epoch == 3 + 2 + 2
    assert {r["source"] for r in steps} == {"webfaq_eng", "mela", "sib200"}
    for r in steps:
        assert (r["train/in_batch"] > 0) == (r["source"] == "webfaq_eng"), r
        assert r["train/hard"] > 0


def test_an_unknown_source_is_refused_before_anything_is_tokenized(tmp_path: Path) -> None:
    v2 = write_v2_folder(
        tmp_path / "v2", {"msmarco": make_rows(4, 7), "webfaq_engl": make_rows(4, 7), "zz_mine": make_rows(4, 1)}
    )
    tokenizer = TextTokenizer(tiny_tokenizer(), max_length=32, append_eos=True)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        load_sources(v2, tokenizer, cache)
    message = str(e.value)
    for expected in ("2 unknown sources", "'webfaq_engl'", "webfaq_engl_query.parquet", "'zz_mine'"):
        assert expected in message, message
    assert "data.sources.<name>.kind" in message
    assert not list(cache.glob("*.arrow"))  # refused before msmarco (first in name order) was tokenized

    (v2 / "zz_mine_query.parquet").unlink()
    with pytest.raises(DataError) as e:
        load_sources(v2, tokenizer, cache)
    message = str(e.value)
    assert str(v2 / "webfaq_engl_query.parquet") in message and "data.sources.webfaq_engl.kind" in message
    assert "Did you mean 'webfaq_eng'" in message
    assert not list(cache.glob("*.arrow"))
    # Its kind given (data.sources.webfaq_engl.kind), it loads.
    loaded = load_sources(v2, tokenizer, cache, overrides={"webfaq_engl": SourceOverride(kind="retrieval")})
    assert [(s.name, s.kind) for s in loaded] == [("msmarco", "retrieval"), ("webfaq_engl", "retrieval")]
