"""The ``f2llm`` command: ``f2llm train``, ``f2llm prepare``, ``f2llm evaluate``, ``f2llm mine``, ``f2llm encode``,
``f2llm merge``, ``f2llm export``.

Each subcommand is registered by an ``add_<name>_parser(subparsers)`` function that sets ``func`` on its parser;
adding a subcommand means writing one such function and listing it in :data:`SUBCOMMANDS`. Heavy libraries
(torch models, mteb) are imported inside the subcommands so that ``f2llm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from f2llm.evaluation.encoding import TextEncoder


class UsageError(Exception):
    """A command-line value that cannot be used (unknown task, bad filter setting, unsupported file type)."""


# ----------------------------------------------------------------------------------------------------------
# Shared options
# ----------------------------------------------------------------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="model directory or hub name (loaded with f2llm.encoder.Encoder)")
    group.add_argument(
        "--pooling", choices=("last", "mean", "first"), default=None, help="default: last for decoders, mean otherwise"
    )
    group.add_argument("--max-length", type=int, default=None, help="max tokens per text (default: the Encoder's)")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_encoder(args: argparse.Namespace) -> TextEncoder:
    """Load ``--model`` with f2llm's Encoder: ``Encoder.load`` for a folder it saved, else ``from_pretrained``.

    Options left unset keep the saved settings (``Encoder.load``) or the Encoder's defaults.
    """
    import torch

    from f2llm.encoder import Encoder
    from f2llm.export import F2LLM_CONFIG

    options: dict[str, Any] = {"pooling": args.pooling, "max_length": args.max_length}
    if args.dtype is not None:
        options["dtype"] = getattr(torch, args.dtype)
    options = {k: v for k, v in options.items() if v is not None}
    if (Path(args.model) / F2LLM_CONFIG).is_file():
        return Encoder.load(args.model, **options)
    return Encoder.from_pretrained(args.model, normalize=True, **options)


def _model_key(args: argparse.Namespace) -> str:
    from f2llm.evaluation.encoding import model_fingerprint

    return model_fingerprint(args.model, pooling=args.pooling, max_length=args.max_length, dtype=args.dtype)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


# ----------------------------------------------------------------------------------------------------------
# f2llm evaluate
# ----------------------------------------------------------------------------------------------------------
def add_evaluate_parser(subparsers: Any) -> None:
    from_tasks = "scifact, stsb, banking77, emotion, twentynewsgroups"
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on the built-in MTEB tasks (local data)",
        description=(
            "Run MTEB's task classes and evaluators on the datasets under data/: prints a table with the published "
            "score of the same model when data/reference_scores has one, and writes a JSON report."
        ),
    )
    _add_model_arguments(p)
    p.add_argument("--tasks", nargs="+", default=from_tasks.split(", "), help=f"built-in tasks (default: {from_tasks})")
    p.add_argument(
        "--model-name",
        default=None,
        help="name for results and for matching published scores, e.g. all-MiniLM-L6-v2 (default: from --model)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="dataset root (default: the repository's data/)")
    p.add_argument("--output", type=Path, default=None, help="JSON report (default: outputs/eval/<model>-<time>.json)")
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse / store embeddings as .npy here")
    p.add_argument(
        "--instructions",
        choices=("auto", "on", "off"),
        default="auto",
        help="task instructions on queries and symmetric texts; auto: only for last-token pooling (decoders)",
    )
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from f2llm.evaluation.run import evaluate_model, format_table, write_report
    from f2llm.evaluation.tasks import resolve_task_name

    for name in args.tasks:  # fail on a typo before loading the model
        try:
            resolve_task_name(name)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
    encoder = load_encoder(args)
    model_name = args.model_name or args.model
    scores = evaluate_model(
        encoder,
        args.tasks,
        model_name=model_name,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        use_instructions={"auto": None, "on": True, "off": False}[args.instructions],
        cache_dir=args.cache_dir,
        model_key=_model_key(args) if args.cache_dir else None,
        show_progress=not args.no_progress,
    )
    print(format_table(scores))
    output = args.output
    if output is None:
        stamp = datetime.datetime.now(tz=datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        output = Path("outputs") / "eval" / f"{_slug(Path(model_name).name)}-{stamp}.json"
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    print(f"report: {write_report(output, scores, model_name=model_name, settings=settings)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# f2llm mine
# ----------------------------------------------------------------------------------------------------------
def add_mine_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives into F2LLM-format parquet",
        description=(
            "Rank the corpus for each query with the model and keep negatives by the F2LLM recipe: top --depth, "
            "skip --skip-top, score < --max-score and < --max-positive-ratio x the positive's, first "
            "--num-negatives, positives excluded."
        ),
    )
    _add_model_arguments(p)
    p.add_argument("input", type=Path, help="BEIR directory, or F2LLM-format .parquet / .jsonl with query, passage")
    p.add_argument("--output", type=Path, required=True, help="output parquet (query, passage, negative_1..K)")
    p.add_argument("--split", default="train", help="qrels split of a BEIR directory (default: train)")
    p.add_argument(
        "--instruction",
        default=None,
        help="query instruction for decoder models (default for a BEIR directory named after a built-in task: "
        "that task's instruction)",
    )
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--skip-top", type=int, default=5)
    p.add_argument("--max-score", type=float, default=0.8)
    p.add_argument("--max-positive-ratio", type=float, default=0.95)
    p.add_argument("--num-negatives", type=int, default=24)
    p.add_argument(
        "--shortfall",
        choices=("drop", "fill"),
        default="drop",
        help="rows with too few negatives: drop them (counted), or fill from ranks past --depth",
    )
    p.add_argument("--fill-depth", type=int, default=1000, help="deepest rank used by --shortfall fill")
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse / store corpus embeddings as .npy here")
    p.set_defaults(func=run_mine)


def _default_mining_instruction(args: argparse.Namespace, encoder: TextEncoder) -> str | None:
    from f2llm.evaluation.encoding import TASK_INSTRUCTIONS, uses_instructions
    from f2llm.evaluation.tasks import resolve_task_name

    if args.instruction is not None or not uses_instructions(encoder):
        return args.instruction
    if not args.input.is_dir():
        print("note: queries used as they are (F2LLM-format data carries its instructions in the query text)")
        return None
    try:
        instruction = TASK_INSTRUCTIONS[resolve_task_name(args.input.name).metadata.name]
    except KeyError:
        print(f"warning: no instruction known for {args.input.name!r}; queries encoded without one (--instruction)")
        return None
    print(f"query instruction: {instruction!r}")
    return instruction


def run_mine(args: argparse.Namespace) -> int:
    from f2llm.mine import MiningConfig, load_mining_input, mine_hard_negatives, write_parquet

    try:
        config = MiningConfig(
            depth=args.depth,
            skip_top=args.skip_top,
            max_score=args.max_score,
            max_positive_ratio=args.max_positive_ratio,
            num_negatives=args.num_negatives,
            shortfall=args.shortfall,
            fill_depth=args.fill_depth,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.output.suffix != ".parquet":
        raise UsageError(f"--output {args.output}: the mined data is written as .parquet")
    data = load_mining_input(args.input, args.split)
    print(f"{len(data.rows)} rows, {len(data.queries)} queries, {len(data.documents)} documents")
    encoder = load_encoder(args)
    table, report = mine_hard_negatives(
        encoder,
        data,
        config,
        instruction=_default_mining_instruction(args, encoder),
        cache_dir=args.cache_dir,
        model_key=_model_key(args),
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    print(report.summary())
    print(f"written: {write_parquet(table, args.output)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# f2llm encode
# ----------------------------------------------------------------------------------------------------------
def add_encode_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode texts into embeddings (.npy or parquet)",
        description="Texts from .txt (one per line), .jsonl (--field) or .parquet (--field column) -> embeddings. "
        "With --config TRAIN.yaml [key.path=value ...] instead of an input: a distillation teacher's raw embeddings "
        "of the texts training with that config reads, for distill.embeddings.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "input",
        nargs="*",
        metavar="INPUT | key.path=value",
        help="one .txt, .jsonl or .parquet; with --config: the training config's overrides, as for f2llm train",
    )
    p.add_argument("--output", type=Path, required=True, help=".npy (float32 [n, D]) or .parquet (text, embedding)")
    p.add_argument("--field", default="text", help="JSON field / parquet column holding the text (default: text)")
    p.add_argument("--instruction", default=None, help="instruction given to every text (decoder query side)")
    p.add_argument(
        "--config",
        default=None,
        metavar="TRAIN.yaml",
        help="instead of an input: the training config (data.paths, data.sources, model.max_length, the student "
        "model.name_or_path); --model is the teacher, and the output a parquet of its raw (un-normalized) "
        "embedding of every distinct text that training reads, for distill.embeddings",
    )
    p.set_defaults(func=run_encode)


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Texts of a .txt (one per line), .jsonl (``field``) or .parquet (column ``field``); errors name file and line."""
    from f2llm.evaluation.data import DataFormatError, read_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    texts: list[str] = []
    if path.suffix == ".txt":
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                raise DataFormatError(path, line_no, "empty line (one text per line expected)")
            texts.append(line)
    elif path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        for line_no, obj in read_jsonl(path, required=(field,)):
            if not isinstance(obj[field], str):
                raise DataFormatError(path, line_no, f"field {field!r} is {type(obj[field]).__name__}, not a string")
            texts.append(obj[field])
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataFormatError(path, None, f"no column {field!r}; columns: {table.column_names} (use --field)")
        for row, value in enumerate(table.column(field).to_pylist()):
            if not isinstance(value, str):
                raise DataFormatError(path, None, f"row {row}: column {field!r} is {value!r}, not a string")
            texts.append(value)
    else:
        raise DataFormatError(path, None, "unsupported input; expected .txt, .jsonl or .parquet")
    if not texts:
        raise DataFormatError(path, None, "no texts")
    return texts


def write_embeddings(path: Path, texts: Sequence[str], embeddings: np.ndarray) -> Path:
    """``.npy``: the float32 matrix; ``.parquet``: columns ``text`` and ``embedding`` (fixed-size float32 list)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if path.suffix == ".npy":
        np.save(path, embeddings)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(embeddings.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])
        pq.write_table(pa.table({"text": pa.array(list(texts), pa.string()), "embedding": column}), path)
    else:
        raise ValueError(f"{path}: unsupported output; expected .npy or .parquet")
    return path


def run_encode(args: argparse.Namespace) -> int:
    if args.config is not None:
        return run_encode_training_texts(args)
    if len(args.input) != 1:
        raise UsageError(
            f"give one input file (.txt, .jsonl or .parquet), got {len(args.input)}: {args.input}; or --config "
            "TRAIN.yaml for a teacher's embeddings of the training texts"
        )
    if args.output.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--output {args.output}: expected a .npy or .parquet file")
    texts = read_texts(Path(args.input[0]), args.field)
    encoder = load_encoder(args)
    embeddings = encoder.encode(
        texts, batch_size=args.batch_size, instruction=args.instruction, show_progress=not args.no_progress
    )
    path = write_embeddings(args.output, texts, embeddings)
    print(f"{len(texts)} embeddings of dimension {embeddings.shape[1]} written to {path}")
    return 0


def run_encode_training_texts(args: argparse.Namespace) -> int:
    """Teacher embeddings of the texts training with ``--config`` reads, for distillation
    (f2llm.distill.write_teacher_embeddings); the teacher is loaded as a live ``distill.teacher`` would be."""
    import torch

    from f2llm.config import load_config
    from f2llm.distill import load_teacher_encoder, write_teacher_embeddings
    from f2llm.engine import resolve_dtype

    if args.output.suffix != ".parquet":
        raise UsageError(f"--output {args.output}: teacher embeddings of training data are written as .parquet")
    if args.instruction is not None or args.field != "text":
        raise UsageError("--instruction and --field do not apply with --config (its sources decide both)")
    if args.pooling is not None or args.max_length is not None:
        raise UsageError(
            "--pooling and --max-length do not apply with --config: the teacher reads the config's model.max_length "
            "(override it as model.max_length=N) with its own pooling, as a live distill.teacher does"
        )
    config = load_config(args.config, args.input)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype is not None else resolve_dtype(config.model.dtype, device)
    encoder = load_teacher_encoder(args.model, device, dtype, config.model.max_length, where=f"--model {args.model}")
    path, count = write_teacher_embeddings(
        encoder, config, args.output, batch_size=args.batch_size, show_progress=not args.no_progress
    )
    print(f"{count} distinct texts, raw embeddings of dimension {encoder.embedding_dim} written to {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
def add_train_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an embedding model with the F2LLM recipe (under torchrun for several processes)",
        description="Train with a YAML config and key.path=value overrides. --config takes a path or the name of a "
        "shipped config (f2llm-0.6b, f2llm-v2-4b, ...: train/configs/, installed with the package). Several "
        "processes: torchrun --nproc-per-node N -m f2llm.cli train --config ... (or train/train.py).",
    )
    parser.add_argument(
        "--config", required=True, help="a YAML file, or a shipped config's name, e.g. f2llm-0.6b (see the README)"
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-5 data.batch_size=8")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from f2llm.config import load_config
    from f2llm.trainer import train

    train(load_config(args.config, args.overrides))
    return 0


# ----------------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------------
def add_prepare_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize a training config's data into its cache (what f2llm train does first), on every core",
        description="Validate and tokenize every source of a training config's data.paths into data.cache_dir, "
        "exactly as f2llm train would (same tokenizer identity and settings: the training run that follows finds "
        "every source cached). Runs on every core of the machine; under torchrun the ranks split the sources "
        "(torchrun --nproc-per-node N -m f2llm.cli prepare --config ...; each rank uses its share of the cores). "
        "Prints, per source, its rows, distinct texts, seconds and cache bytes.",
    )
    parser.add_argument("--config", required=True, help="a YAML file, or a shipped config's name (as for f2llm train)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, as for f2llm train")
    parser.add_argument(
        "--num-proc", type=int, default=None, help="tokenizing processes per rank (default: the rank's share of cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_prepare)


def training_text_tokenizer(name_or_path: str, max_length: int) -> Any:
    """The :class:`f2llm.data.TextTokenizer` that training builds for ``model.name_or_path`` (the Encoder's rule:
    EOS appended for decoders), without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    from f2llm.data import TextTokenizer, is_decoder_model_type

    decoder = is_decoder_model_type(AutoConfig.from_pretrained(name_or_path).model_type)
    return TextTokenizer(AutoTokenizer.from_pretrained(name_or_path), max_length, append_eos=decoder)


def run_prepare(args: argparse.Namespace) -> int:
    import os
    import time

    from f2llm.config import load_config
    from f2llm.data.readers import cache_summary
    from f2llm.trainer import training_sources

    if args.num_proc is not None and args.num_proc < 1:
        raise UsageError(f"--num-proc must be >= 1, got {args.num_proc}")
    config = load_config(args.config, args.overrides)
    tokenizer = training_text_tokenizer(config.model.name_or_path, config.model.max_length)
    # torchrun's variables; no process group is needed: the ranks meet through the cache's file locks.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    started = time.perf_counter()
    sources = training_sources(  # the very caches f2llm train reads
        config, tokenizer, rank, world_size, num_proc=args.num_proc, show_progress=False if args.no_progress else None
    )
    seconds = time.perf_counter() - started
    where = f"rank {rank}: " if world_size > 1 else ""
    print(f"{where}{'source':<32} {'rows':>10} {'texts':>10} {'seconds':>9} {'cache MB':>9}  built by")
    total_rows = total_bytes = 0
    for source in sources:
        s = cache_summary(source)
        total_rows += s["rows"]
        total_bytes += s["bytes"]
        by = "this process" if not s["cache_hit"] else "cached"
        print(
            f"{where}{s['name']:<32} {s['rows']:>10} {s['texts'] or 0:>10} {s['seconds'] or 0:>9.1f} "
            f"{s['bytes'] / 2**20:>9.1f}  {by}"
        )
    print(
        f"{where}{len(sources)} sources, {total_rows} rows, {total_bytes / 2**20:.1f} MB in {config.data.cache_dir}, "
        f"{seconds:.1f} s"
    )
    return 0


# ----------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------
def add_merge_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="average the weights of saved models (checkpoint merging)",
        description="Uniform or weighted average of model folders with safetensors weights (final/, extra/step-N/ "
        "of f2llm train with save_extra). Tensors are averaged in float32 and written in the inputs' dtype; the "
        "output holds the first input's config, tokenizer and sentence-transformers files.",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="model folders, e.g. runs/x/extra/step-*")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the merged model")
    parser.add_argument(
        "--weights", nargs="+", type=float, default=None, help="one weight > 0 per checkpoint (normalized to sum 1)"
    )
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from f2llm.merge import MergeError, merge_checkpoints, normalized_weights

    try:
        weights = normalized_weights(args.weights, len(args.checkpoints))
        out = merge_checkpoints(args.checkpoints, args.out, weights)
    except MergeError as e:
        raise UsageError(str(e)) from None
    if args.weights is not None:
        print("weights normalized to sum 1: " + ", ".join(f"{w:.4g}" for w in weights))
    print(f"merged {len(args.checkpoints)} checkpoints into {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------
def add_export_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write one member of a model trained with layer exits / Matryoshka dimensions (first k layers, first d "
        "coordinates)",
        description="Write a model folder (weights, tokenizer, sentence-transformers modules, f2llm_config.json) "
        "holding the first --layers k layers of --model (a folder saved by f2llm, e.g. runs/x/final) and embedding "
        "with the first --dim d coordinates, L2-normalized after the cut. Its embeddings equal the trained model's "
        "exit-k embeddings (layer k's output, through the final norm for a decoder, pooled as the model pools) cut "
        "to d. Encoder.load and sentence_transformers.SentenceTransformer read it as is; transformers.AutoModel "
        "reads the cut backbone. Give --layers, --dim or both. The source folder, k and d are recorded in its "
        "f2llm_config.json.",
    )
    parser.add_argument("--model", type=Path, required=True, help="a folder saved by f2llm (Encoder.save_pretrained)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the member (must not hold files)")
    parser.add_argument("--layers", type=int, default=None, metavar="K", help="keep the first K layers (default all)")
    parser.add_argument("--dim", type=int, default=None, metavar="D", help="keep the first D coordinates (default all)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from f2llm.export import ExportError, export_member, read_f2llm_config

    try:
        out = export_member(args.model, args.out, layers=args.layers, dim=args.dim)
    except ExportError as e:
        raise UsageError(str(e)) from None
    origin = read_f2llm_config(out)["exported_from"]
    dim = origin["dim"] if origin["dim"] is not None else "all"
    print(f"exported {args.model} with {origin['layers']} layers and {dim} dimensions to {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_evaluate_parser, add_mine_parser, add_encode_parser, add_prepare_parser, add_train_parser, add_merge_parser,
    add_export_parser,
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="f2llm", description="Train, evaluate and use F2LLM-style embedding models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status. Bad inputs print one line and give status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as e:
        # imported here: f2llm.evaluation pulls in mteb, which `f2llm --help` should not wait for
        from f2llm.config import ConfigError
        from f2llm.data.sources import DataError
        from f2llm.evaluation.data import DataFormatError

        if not isinstance(e, DataFormatError | DataError | ConfigError | FileNotFoundError | UsageError):
            raise
        print(f"f2llm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
