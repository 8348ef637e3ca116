"""Malformed training data (tests/data/bad/) is refused before any training step, with an error naming the file,
the line or row and the field; the good sources beside it stay untouched and no partial cache entry is left
that a later run would misread."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from f2llm.config import load_config
from f2llm.data import DataError, SourceOverride, TextTokenizer, load_source, load_sources
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder
from f2llm.trainer import Trainer
from tests.helpers import HANG_BOUND, ROOT, make_rows, tiny_qwen3, training_env, write_source

CORPUS = Path(__file__).resolve().parent / "bad"
WORKER = ROOT / "tests" / "training" / "fault_worker.py"  # the fault-injection worker of tests/training
GOOD = ("good_jsonl.jsonl", "good_parquet.parquet")
MAX_LENGTH = 64
# A refusal is a check of the file, not a tokenization of the corpus: far below this on any machine.
FAIL_FAST_SECONDS = 10.0


@dataclass(frozen=True)
class BadFile:
    name: str
    error: str  # regex the message must match after the file path
    num_negatives: int = 0


BAD_FILES = [
    BadFile("malformed_json.jsonl", r"line 3: malformed JSON"),
    BadFile("not_an_object.jsonl", r"line 2: expected a JSON object, got list"),
    BadFile("int_text.jsonl", r"line 2, field 'passage': expected a string, got int"),
    BadFile("null_text.jsonl", r"row 1, field 'negative_2': missing \(null\)"),
    BadFile("empty_text.jsonl", r"row 1, field 'query': empty text"),
    BadFile("missing_column.jsonl", r"line 1: missing column 'passage'"),
    BadFile("non_utf8.jsonl", r"line 2: not UTF-8"),
    BadFile("empty.jsonl", r"no rows"),
    BadFile("inconsistent_fields.jsonl", r"line 2: field\(s\) \['negative_3'\] are not in the first row's fields"),
    BadFile("mixed_instructions.jsonl", r"1 of 3 queries start with 'Instruct:'.*row 1"),
    BadFile("truncated.parquet", r"not a readable parquet file"),
    BadFile("empty.parquet", r"not a readable parquet file"),
    BadFile("zero_rows.parquet", r"no rows"),
    BadFile("null_text.parquet", r"row 1, field 'passage': missing \(null\)"),
    BadFile("empty_text.parquet", r"row 1, field 'passage': empty text"),
    BadFile("int_column.parquet", r"column 'passage' has type int64, expected string"),
    BadFile("binary_column.parquet", r"column 'query' has type binary"),
    BadFile("missing_column.parquet", r"missing column 'passage'"),
    BadFile("few_negatives.parquet", r"1 negative column\(s\).*num_negatives=7", num_negatives=7),
    BadFile("negative_gap.parquet", r"missing \['negative_2'\]"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TextTokenizer:
    return Encoder.from_pretrained(model_dir, max_length=MAX_LENGTH).text_tokenizer


def overrides(bad: BadFile) -> dict[str, SourceOverride]:
    settings = {Path(g).stem: SourceOverride(kind="retrieval", num_negatives=2) for g in GOOD}
    settings[Path(bad.name).stem] = SourceOverride(kind="retrieval", num_negatives=bad.num_negatives)
    return settings


def corpus_hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(CORPUS.iterdir())}


def load_with_good_files(bad: BadFile, tokenizer: TextTokenizer, cache_dir: Path) -> None:
    files = [CORPUS / g for g in GOOD] + [CORPUS / bad.name]
    load_sources(files, tokenizer, cache_dir, overrides=overrides(bad))


def assert_cache_is_clean(cache_dir: Path) -> None:
    """Every tokenized entry is complete (Arrow file + metadata naming its row count); no temporary or incomplete
    file is left anywhere under the cache (datasets' own lock files excepted)."""
    for arrow in cache_dir.glob("*.arrow"):
        meta = arrow.with_suffix(".json")
        assert meta.is_file(), f"{arrow} has no metadata: a partial cache entry"
        assert len(datasets.Dataset.from_file(str(arrow))) == json.loads(meta.read_text())["rows"], arrow
    leftovers = [
        p
        for p in cache_dir.rglob("*")
        if not p.name.endswith(".lock") and (p.name.startswith("tmp") or "incomplete" in p.name or ".tmp" in p.name)
    ]
    assert not leftovers, f"temporary files left in the cache: {leftovers}"


def assert_names(error: BaseException, bad: BadFile) -> None:
    message, path = str(error), str(CORPUS / bad.name)
    assert message.startswith(path), f"the error does not start with the file {path}: {message}"
    assert re.search(bad.error, message[len(path) :]), f"{bad.error!r} not found in: {message}"


# ------------------------------------------------------------------------------------------------ the corpus
def test_corpus_is_documented() -> None:
    readme = (CORPUS / "README.md").read_text()
    files = {p.name for p in CORPUS.iterdir() if p.name != "README.md"}
    assert files == {b.name for b in BAD_FILES} | set(GOOD)
    for name in files:
        assert f"`{name}`" in readme, f"{name} is not listed in {CORPUS / 'README.md'}"


def test_good_files_load(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    # The reference point of the corpus: the good files are valid and agree with each other.
    settings = {Path(g).stem: SourceOverride(kind="retrieval", num_negatives=2) for g in GOOD}
    jsonl, parquet = load_sources([CORPUS / g for g in GOOD], tokenizer, tmp_path, overrides=settings)
    assert len(jsonl) == len(parquet) == 12
    assert jsonl.dataset[:] == parquet.dataset[:]


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.name for b in BAD_FILES])
def test_bad_file_fails_before_training_and_leaves_no_trace(
    bad: BadFile, tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    before = corpus_hashes()
    started = time.perf_counter()
    with pytest.raises(Exception) as first:
        load_with_good_files(bad, tokenizer, tmp_path)
    assert time.perf_counter() - started < FAIL_FAST_SECONDS
    assert corpus_hashes() == before, "loading changed a file of the corpus"
    assert_cache_is_clean(tmp_path)
    # The good sources loaded before the bad one are complete cache entries that a later run reuses as they are.
    for good in GOOD:
        hit = load_source(CORPUS / good, tokenizer, tmp_path, override=overrides(bad)[Path(good).stem])
        assert hit.cache_hit and len(hit) == 12
    # A second run over the same cache fails the same way: nothing half-written is taken for a valid entry.
    with pytest.raises(type(first.value)) as second:
        load_with_good_files(bad, tokenizer, tmp_path)
    assert str(second.value) == str(first.value)


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.name for b in BAD_FILES])
def test_bad_file_error_names_file_row_and_field(bad: BadFile, tokenizer: TextTokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_with_good_files(bad, tokenizer, tmp_path)
    assert_names(error.value, bad)


@pytest.mark.parametrize("name", ["malformed_json.jsonl", "null_text.parquet", "few_negatives.parquet"])
def test_trainer_refuses_bad_data_before_any_step(name: str, model_dir: Path, tmp_path: Path) -> None:
    """Trainer.from_config loads the data before it creates the run folder: a bad file stops it there."""
    bad = next(b for b in BAD_FILES if b.name == name)
    config = {
        "model": {"name_or_path": str(model_dir), "max_length": MAX_LENGTH, "gradient_checkpointing": False},
        "data": {
            "paths": [str(CORPUS / g) for g in GOOD] + [str(CORPUS / name)],
            "batch_size": 2,
            "cache_dir": str(tmp_path / "cache"),
            "sources": {s: {"kind": "retrieval", "num_negatives": o.num_negatives} for s, o in overrides(bad).items()},
        },
        "output_dir": str(tmp_path / "run"),
        "tensorboard": False,
        "plot": False,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError) as error:
        Trainer.from_config(load_config(tmp_path / "config.yaml"), Runtime(0, 1, torch.device("cpu")))
    assert_names(error.value, bad)
    assert not (tmp_path / "run").exists(), "the run folder (metrics, checkpoints) was created before the data check"
    assert_cache_is_clean(tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ a 10 MB line
TEN_MB = 10 * 2**20


def ten_megabyte_text() -> str:
    sentence = "The quick brown fox jumps over the lazy dog. "
    return (sentence * (TEN_MB // len(sentence) + 1))[:TEN_MB]


def test_ten_megabyte_broken_line_fails_fast_with_a_short_message(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    rows = make_rows(2, 0)
    path = tmp_path / "msmarco.jsonl"
    huge = json.dumps({"query": "q", "passage": ten_megabyte_text()})
    path.write_text(json.dumps(rows[0]) + "\n" + huge[:-2] + "\n" + json.dumps(rows[1]) + "\n")  # line 2 cut off
    assert path.stat().st_size > TEN_MB
    started = time.perf_counter()
    with pytest.raises(DataError, match=re.escape(str(path)) + r": line 2: malformed JSON") as error:
        load_sources([path], tokenizer, tmp_path / "cache", overrides={"msmarco": SourceOverride(num_negatives=0)})
    assert time.perf_counter() - started < FAIL_FAST_SECONDS
    assert len(str(error.value)) < 1000, "the error message must not carry the line itself"
    assert_cache_is_clean(tmp_path / "cache")


@pytest.mark.slow
def test_ten_megabyte_row_is_truncated_in_bounded_memory(model_dir: Path, tmp_path: Path) -> None:
    """A valid 10 MB passage is truncated to max_length tokens (EOS last) with at most 256 MiB of extra memory."""
    rows = make_rows(2, 0)
    path = tmp_path / "msmarco.jsonl"
    huge = {"query": "q huge", "passage": ten_megabyte_text()}
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], huge, rows[1])))
    cmd = [sys.executable, str(WORKER), "tokenize", str(path), str(tmp_path / "cache"), str(model_dir)]
    cmd += ["--max-length", str(MAX_LENGTH), "--max-extra-rss-mib", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=training_env(), check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["passage_lengths"][1] == MAX_LENGTH and report["passage_last"][1] == report["eos"]


# ------------------------------------------------------------------------------------------------ killed mid-cache
@pytest.mark.slow
def test_kill_9_during_tokenization_leaves_no_entry_a_later_run_misreads(
    model_dir: Path, tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    """SIGKILL while datasets writes the tokenized Arrow file (2nd of 3 batches): the next load rebuilds the entry
    and gets exactly what a load into an empty cache gets."""
    source = write_source(tmp_path / "msmarco.jsonl", make_rows(2500, 0))
    cache = tmp_path / "cache"
    cmd = [sys.executable, str(WORKER), "tokenize", str(source), str(cache), str(model_dir), "--die-at-call", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=training_env(), check=False)
    assert proc.returncode == -9, f"the worker was not killed mid-tokenization: {proc.returncode} {proc.stderr[-2000:]}"
    assert not list(cache.glob("*.json")), "an entry was published although tokenization never finished"

    override = SourceOverride(kind="retrieval", num_negatives=0)
    again = load_source(source, tokenizer, cache, override=override)
    fresh = load_source(source, tokenizer, tmp_path / "fresh", override=override)
    assert not again.cache_hit and len(again) == 2500
    assert again.dataset[:] == fresh.dataset[:]
    assert load_source(source, tokenizer, cache, override=override).cache_hit
