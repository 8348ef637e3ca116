"""Benchmark recipe-scale data preparation: ``f2llm prepare``'s tokenization against F2LLM v2's official script.

Commands:
    python benchmarks/bench_prepare.py                # 200,000 rows x 24 negatives, 2 processes (several minutes)
    python benchmarks/bench_prepare.py --quick        # 2,000 rows; what CI runs
Writes prepare.json and prepare.md under --out (default benchmarks/results/local).

The source: one F2LLM-format parquet file (query, passage, negative_1..24) of --rows rows whose texts are drawn from
the texts shipped in data/ (data/f2llm's converted sources and the SciFact corpus): every query a distinct word
window of that text, documents a pool of --docs-per-row x rows distinct windows, lengths drawn from the shipped
texts' word counts; each row's passage and 24 negatives are drawn from the pool, so documents recur across rows as
mined hard negatives do. The tokenizer: a byte-level BPE (32k entries, EOS ``<|endoftext|>``) trained here on the
same texts with the ``tokenizers`` library. Qwen3's real tokenizer is not reachable offline, so absolute rates
differ from Qwen3's (its 151k vocabulary and pre-tokenizer cost more per text); both sides use the same tokenizer.

Each side runs in a fresh process with the same number of processes (--num-proc), reading the same file:

* ``official``: F2LLM v2's ``tokenize_data_qwen.py`` (codefuse-ai/CodeFuse-Embeddings, F2LLM/), reimplemented
  faithfully below (:func:`official_prepare`): pandas, queries tokenized row by row, passages and negatives
  deduplicated with ``set`` and each distinct document tokenized once, every text by one ``tokenizer(sentence,
  max_length=2047, truncation=True)`` call + EOS, in a ``multiprocessing.Pool`` of --num-proc processes over
  ``np.array_split`` shares; query and corpus parquet files written. Its ``df.sample(n=80000)`` cap is left out
  (both sides tokenize every row).
* ``f2llm``: ``f2llm.data.load_source`` with ``num_proc=--num-proc`` into an empty cache (what ``f2llm prepare``
  runs per source), max_length 2048 under the decoder rule (2047 tokens + EOS: the official ids).
* ``f2llm-rust-threads``: the same in one process with the Rust tokenizer's own threads
  (TOKENIZERS_PARALLELISM=true, num_proc=1): the alternative to worker processes.

Measured per side: wall seconds; texts/s/core = rows x (2 + K) source texts / seconds / --num-proc; peak memory of
the process tree (sum of RSS, and of PSS, which counts pages shared by forked or memory-mapping processes once),
sampled every 0.1 s; cache bytes per row (the files each side writes). The ids are checked equal on a sample of
rows. The projection for F2LLM v2's full data (60M rows) on a 64-core node uses the measured per-core rate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
EOS = "<|endoftext|>"
MAX_LENGTH = 2048  # f2llm's max_length: 2047 tokens + EOS, the official script's max_seq_length = 2047 + EOS
FULL_V2_ROWS = 60_000_000
NODE_CORES = 64


# ------------------------------------------------------------------------------------------------ inputs
def shipped_texts() -> list[str]:
    """Distinct texts shipped with the repository: data/f2llm's sources (every text column) and SciFact's corpus."""
    texts: set[str] = set()
    for path in sorted((DATA / "f2llm").glob("*.parquet")):
        table = pq.read_table(path)
        for column in table.column_names:
            if column in ("query", "passage") or column.startswith("negative_"):
                texts.update(t for t in table.column(column).to_pylist() if t)
    with gzip.open(DATA / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            doc = json.loads(line)
            texts.add(f"{doc.get('title', '')} {doc['text']}".strip())
    return sorted(texts)


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int) -> None:
    """A byte-level BPE like Qwen's (any text tokenizes), EOS = pad, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS).save_pretrained(folder)


def write_source(texts: list[str], path: Path, rows: int, negatives: int, docs_per_row: float, seed: int) -> None:
    """The synthetic F2LLM-format source (see the module docstring)."""
    rng = np.random.default_rng(seed)
    words = " ".join(texts).split()
    lengths = np.minimum(np.array([len(t.split()) for t in texts]), 512)

    def windows(n: int) -> list[str]:
        size = rng.choice(lengths, size=n)
        start = rng.integers(0, len(words) - 513, size=n)
        return [" ".join(words[s : s + max(int(k), 1)]) for s, k in zip(start, size, strict=True)]

    queries = windows(rows)
    docs = pa.array(windows(max(1, int(docs_per_row * rows))), pa.string())
    columns = {"query": pa.array(queries, pa.string())}
    for column in ["passage", *(f"negative_{i}" for i in range(1, negatives + 1))]:
        columns[column] = docs.take(pa.array(rng.integers(0, len(docs), size=rows)))
    pq.write_table(pa.table(columns), path)


# ------------------------------------------------------------------------------------------------ the official method
# F2LLM v2's tokenize_data_qwen.py, as its code runs (module-level tokenizer inherited by the forked Pool workers).
_official_tokenizer = None
_official_max_seq_length = MAX_LENGTH - 1  # the script's max_seq_length = 2047


def _official_process_sent(sentence: str) -> np.ndarray:
    # "We make sure there's always an eos token at the end of each sequence"
    tokenizer_outputs = _official_tokenizer(sentence, max_length=_official_max_seq_length, truncation=True)
    return np.array(tokenizer_outputs.input_ids + [_official_tokenizer.eos_token_id])  # noqa: RUF005 - as written


def _official_process_sent_batch(s):
    return s.apply(_official_process_sent)


def _official_parallelize(data, func, num_of_processes):
    from multiprocessing import Pool

    import pandas as pd

    indices = np.array_split(data.index, num_of_processes)
    data_split = [data.iloc[idx] for idx in indices]
    with Pool(num_of_processes) as pool:
        data = pd.concat(pool.map(func, data_split))
    return data


def official_prepare(source: Path, tokenizer_dir: Path, out: Path, num_proc: int) -> list[Path]:
    """tokenize_data_qwen.py's loop body for one source file (its 80,000-row sample left out); returns its files."""
    import pandas as pd
    from transformers import AutoTokenizer

    global _official_tokenizer
    _official_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ds_prefix = source.name.split(".")[0]
    df = pd.read_parquet(source)
    df["query_input_ids"] = _official_parallelize(df["query"], _official_process_sent_batch, num_proc)
    num_neg = 24 if "negative_2" in df.keys() else 1
    ls = df.passage.to_list()
    for i in range(1, num_neg + 1):
        ls += df[f"negative_{i}"].to_list()
    ls = list(set(ls))
    df_tmp = pd.DataFrame({"text": ls})
    df_tmp["input_ids"] = _official_parallelize(df_tmp["text"], _official_process_sent_batch, num_proc)
    df_tmp["doc_id"] = [f"{ds_prefix}_{i}" for i in range(len(df_tmp))]
    mapping_dict = df_tmp.set_index("text")["doc_id"].to_dict()
    df["passage_input_ids"] = df.passage.map(mapping_dict)
    for i in range(1, num_neg + 1):
        df[f"negative_{i}_input_ids"] = df[f"negative_{i}"].map(mapping_dict)
    df.drop(columns=[f"negative_{i}" for i in range(1, num_neg + 1)] + ["passage", "query"], inplace=True)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{ds_prefix}_query.parquet", out / f"{ds_prefix}_corpus.parquet"]
    df.to_parquet(files[0], index=False)
    df_tmp = df_tmp.drop(columns=["text"]).set_index("doc_id")
    df_tmp.to_parquet(files[1])
    return files


# ------------------------------------------------------------------------------------------------ f2llm
def f2llm_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    from f2llm.data import TextTokenizer

    return TextTokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), MAX_LENGTH, append_eos=True)


def f2llm_prepare(source: Path, tokenizer_dir: Path, cache: Path, num_proc: int):
    from f2llm.data import SourceOverride, load_source

    # The official script adds no instruction; the source's kind is any (it only decides the sampler's rules).
    override = SourceOverride(kind="retrieval", add_instruction=False, num_negatives=0)
    return load_source(
        source, f2llm_tokenizer(tokenizer_dir), cache, override=override, validation_fraction=0.0, num_proc=num_proc
    )


def run_side(side: str, source: Path, tokenizer_dir: Path, out: Path, num_proc: int) -> dict:
    """One side in this (fresh) process: seconds and the files written. Libraries are imported before the clock
    starts (f2llm.data imports torch: seconds that are no part of preparing data); loading the tokenizer counts."""
    if side == "official":
        import pandas  # noqa: F401
        import transformers  # noqa: F401
    else:
        import f2llm.data.readers  # noqa: F401
    started = time.perf_counter()
    if side == "official":
        files = official_prepare(source, tokenizer_dir, out, num_proc)
    else:
        loaded = f2llm_prepare(source, tokenizer_dir, out, num_proc)
        files = [loaded.cache_file, loaded.cache_file.with_suffix(".texts")]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "files": [str(f) for f in files]}


def measure(side: str, args: argparse.Namespace, source: Path, tokenizer_dir: Path, work: Path) -> dict:
    """Run ``side`` in a fresh process, sampling its process tree's memory; returns its row of the table."""
    out = work / side
    env = dict(os.environ)
    num_proc = args.num_proc
    if side == "f2llm-rust-threads":
        env["TOKENIZERS_PARALLELISM"], num_proc = "true", 1
    else:
        env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, __file__, "--side", side, "--source", str(source), "--tokenizer", str(tokenizer_dir)]
    cmd += ["--side-out", str(out), "--num-proc", str(num_proc)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    stdout = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed with exit status {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    texts = args.rows * (2 + args.negatives)
    cache_bytes = sum(Path(f).stat().st_size for f in result["files"])
    return {
        "side": side,
        "processes": args.num_proc,
        "rows": args.rows,
        "texts": texts,
        "seconds": result["seconds"],
        "texts_per_s": texts / result["seconds"],
        "texts_per_s_per_core": texts / result["seconds"] / args.num_proc,
        "peak_rss_mb": peak_rss / 2**20,
        "peak_pss_mb": peak_pss / 2**20,
        "cache_bytes_per_row": cache_bytes / args.rows,
        "files": result["files"],
    }


def check_same_ids(official: dict, f2llm: dict, source: Path, tokenizer_dir: Path, rows: int) -> int:
    """Compare the two sides' ids on a sample of rows (query, passage, every negative); returns rows compared."""
    from f2llm.data import SourceOverride, load_source

    query_file, corpus_file = (Path(f) for f in official["files"])
    queries = pq.read_table(query_file)
    corpus = pq.read_table(corpus_file)
    doc_ids = dict(zip(corpus.column("doc_id").to_pylist(), range(corpus.num_rows), strict=True))
    cache = Path(f2llm["files"][0]).parent
    override = SourceOverride(kind="retrieval", add_instruction=False, num_negatives=0)
    loaded = load_source(source, f2llm_tokenizer(tokenizer_dir), cache, override=override, validation_fraction=0.0)
    assert loaded.cache_hit
    sample = np.random.default_rng(0).choice(rows, size=min(rows, 200), replace=False)
    k = loaded.available_negatives
    q, p, n = loaded.take(sample, list(range(k)))
    corpus_ids = corpus.column("input_ids")
    for i, row in enumerate(sample.tolist()):
        assert q[i].tolist() == queries.column("query_input_ids")[row].as_py(), f"query of row {row} differs"
        docs = [queries.column("passage_input_ids")[row].as_py()]
        docs += [queries.column(f"negative_{j}_input_ids")[row].as_py() for j in range(1, k + 1)]
        ours = [p[i], *n[i * k : (i + 1) * k]]
        for doc, mine in zip(docs, ours, strict=True):
            assert mine.tolist() == corpus_ids[doc_ids[doc]].as_py(), f"a document of row {row} differs"
    return len(sample)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--negatives", type=int, default=24)
    parser.add_argument("--docs-per-row", type=float, default=2.0, help="distinct documents in the pool per row")
    parser.add_argument("--num-proc", type=int, default=2, help="processes of each side")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--quick", action="store_true", help="2,000 rows (smoke test)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the source and caches (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/local)")
    # One side, in its own process (run by measure()).
    parser.add_argument("--side", choices=("official", "f2llm", "f2llm-rust-threads"), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        print(json.dumps(run_side(args.side, args.source, args.tokenizer, args.side_out, args.num_proc)))
        return 0
    # Imported here, not at the top: common imports torch, which the sides' processes (and the spawned tokenizer
    # workers, which import this file as their __main__) must not pay for.
    import tempfile

    from common import DEFAULT_OUT, write_results

    args.out = args.out or DEFAULT_OUT
    if args.quick:
        args.rows = 2_000

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        texts = shipped_texts()
        tokenizer_dir = work / "tokenizer"
        train_tokenizer(texts, tokenizer_dir, args.vocab_size)
        source = work / "source" / "bench.parquet"
        source.parent.mkdir()
        write_source(texts, source, args.rows, args.negatives, args.docs_per_row, seed=0)
        setup_s = time.perf_counter() - started
        print(f"setup: {len(texts)} shipped texts, tokenizer and source in {setup_s:.0f} s", flush=True)
        rows = []
        for side in ("official", "f2llm", "f2llm-rust-threads"):
            rows.append(measure(side, args, source, tokenizer_dir, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "files"}), flush=True)
        checked = check_same_ids(rows[0], rows[1], source, tokenizer_dir, args.rows)
        meta_file = Path(rows[1]["files"][0]).with_suffix(".json")
        distinct = json.loads(meta_file.read_text())["texts"]
        for row in rows:
            del row["files"]
        official, ours = rows[0], rows[1]
        rate = ours["texts_per_s_per_core"]
        full_texts = FULL_V2_ROWS * (2 + args.negatives)
        projection = {
            "rows": FULL_V2_ROWS,
            "texts": full_texts,
            "cores": NODE_CORES,
            "f2llm_texts_per_s_per_core": rate,
            "f2llm_hours": full_texts / (rate * NODE_CORES) / 3600,
            "official_hours": full_texts / (official["texts_per_s_per_core"] * NODE_CORES) / 3600,
            "f2llm_cache_gb": ours["cache_bytes_per_row"] * FULL_V2_ROWS / 1e9,
            "assumes": "the measured per-core rate (this source's repetition of documents, this machine's cores, "
            "the locally trained 32k BPE) scales linearly to 64 cores",
        }
        summary = {
            "speedup_per_core": rate / official["texts_per_s_per_core"],
            "f2llm_peak_rss_under_2gb": ours["peak_rss_mb"] < 2048,
            "distinct_texts": distinct,
            "rows_checked_equal": checked,
            "projection_full_v2": projection,
        }
        meta = {
            "source": f"{args.rows} rows x (query, passage, {args.negatives} negatives), documents from a pool of "
            f"{int(args.docs_per_row * args.rows)} distinct word windows of the shipped texts",
            "tokenizer": f"byte-level BPE, {args.vocab_size} entries, trained locally (Qwen3's is not reachable "
            "offline)",
            "max_length": MAX_LENGTH,
            "cpu": f"{os.cpu_count()} cores",
        }
        columns = ["side", "processes", "seconds", "texts_per_s_per_core", "peak_rss_mb", "peak_pss_mb"]
        columns += ["cache_bytes_per_row"]
        write_results(args.out, "prepare", rows, columns, "Data preparation", meta=meta, extra={"summary": summary})
        print(
            f"projection: {FULL_V2_ROWS / 1e6:.0f}M rows ({full_texts / 1e9:.2f}B texts) on {NODE_CORES} cores at "
            f"{rate:.0f} texts/s/core: {projection['f2llm_hours']:.2f} h (official: "
            f"{projection['official_hours']:.2f} h); cache {projection['f2llm_cache_gb']:.0f} GB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
