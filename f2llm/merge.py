"""Checkpoint merging: the uniform or weighted average of the weights of several saved models.

Inputs are model folders as f2llm writes them (``final/``, ``extra/step-N/``, or any Hugging Face folder with
safetensors weights, single file or sharded with ``model.safetensors.index.json``). Every input must hold the same
tensors (names, shapes, dtypes). Floating-point tensors are averaged in float32 and written in the inputs' dtype;
other tensors (integer buffers) must be equal in every input and are copied. The output folder holds the first
input's other files (config, tokenizer, sentence-transformers modules) and the averaged weights, laid out in the
first input's shards, so it loads wherever the inputs do. Only safetensors are read: a pickled ``.bin`` can run
code when loaded.

Refused: a folder that is not a model (no ``config.json``: e.g. a training checkpoint ``checkpoints/step-N``),
adapter-only weights (a LoRA run's checkpoint ``trainable.safetensors`` or a peft adapter folder: averaging A and
B separately means nothing; merge the LoRA run's merged ``final/`` or ``extra/step-N/`` instead), and an ``--out``
inside an input. Nothing is left behind by a failed merge: it writes into a temporary sibling of ``--out``, removed
on any failure, and renamed to ``--out`` at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"  # what makes a folder a model folder (transformers' AutoConfig reads it)
# Adapter-only weights: a LoRA run's training checkpoint (f2llm.engine.TRAINABLE_FILE) and a peft adapter folder.
ADAPTER_FILES = ("trainable.safetensors", "adapter_model.safetensors", "adapter_config.json")
ADAPTER_TENSOR_MARKS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
MODEL_FOLDERS_HINT = "merge model folders: a run's final/ or extra/step-N/ (LoRA runs save merged full models there)"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Not copied into the merged folder: the inputs' weights (replaced by the average), a LoRA adapter (it belongs to
# one input's weights, not to the average), and an earlier merge's record (a new one is written).
SKIPPED_ENTRIES = frozenset({"adapter", "merge.json"})


class MergeError(ValueError):
    """The inputs cannot be merged as asked; the message names the file and the tensor, and what to do."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding ``folder``'s weights, in the order of its index (or by name)."""
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a folder; give model folders such as runs/x/final or runs/x/extra/step-N")
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MergeError(f"{index} lists {missing}, which are not in {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise MergeError(
            f"{folder}: weights only in pickle files {pickled}; f2llm merge reads safetensors only (unpickling can "
            "run code). Convert them first, e.g. AutoModel.from_pretrained(folder).save_pretrained(new_folder)"
        )
    raise MergeError(f"{folder}: no *.safetensors weights found")


def check_model_folder(folder: Path) -> None:
    """Raise :class:`MergeError` unless ``folder`` is a model folder holding full weights (not adapters)."""
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a folder; give model folders such as runs/x/final or runs/x/extra/step-N")
    adapters = [name for name in ADAPTER_FILES if (folder / name).is_file()]
    if adapters:
        raise MergeError(
            f"{folder}: holds adapter-only weights ({', '.join(adapters)}), not a model: the LoRA A and B matrices "
            f"averaged one by one make no merged adapter; {MODEL_FOLDERS_HINT}"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise MergeError(
            f"{folder}: not a model folder (no {CONFIG_FILE}); a training checkpoint (checkpoints/step-N) holds the "
            f"training state, not a loadable model: {MODEL_FOLDERS_HINT}"
        )


def _tensor_layout(folder: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
    """name -> (file, dtype, shape) of every tensor in the folder, read from the safetensors headers only."""
    from safetensors import safe_open

    layout: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in layout:
                    raise MergeError(f"{file}: tensor {name} is also in {layout[name][0]}")
                if any(mark in name for mark in ADAPTER_TENSOR_MARKS):
                    raise MergeError(
                        f"{file}: tensor {name} is a LoRA adapter matrix, not a model weight (an unmerged peft "
                        f"model?); {MODEL_FOLDERS_HINT}, or merge the adapters into their base model first"
                    )
                sliced = f.get_slice(name)
                layout[name] = (file, _DTYPES[sliced.get_dtype()], tuple(sliced.get_shape()))
    return layout


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` scaled to sum to 1 (None: uniform); every weight must be a finite number > 0."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights: {len(weights)} weights for {count} checkpoints; give one per checkpoint")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise MergeError(f"--weights: every weight must be a finite number > 0, got {list(weights)}")
    total = math.fsum(weights)
    return [w / total for w in weights]


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, weights: Sequence[float] | None = None
) -> Path:
    """Average the weights of the model folders ``inputs`` into the new folder ``out``; returns ``out``.

    ``weights``: one positive number per input, normalized to sum to 1 (None: the plain mean). The weights used
    and the inputs are recorded in ``out/merge.json``. Raises :class:`MergeError` before writing anything when an
    input is not a model folder with full weights, when the inputs differ in tensor names, shapes or dtypes, or when
    ``out`` exists and is not empty or lies inside an input; on a failure while writing (integer tensors that
    differ), after removing what it wrote.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folders = [Path(p) for p in inputs]
    out = Path(out)
    if len(folders) < 2:
        raise MergeError(f"merge needs at least 2 checkpoints, got {len(folders)}")
    coefficients = normalized_weights(weights, len(folders))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not an empty folder; choose a new folder (or remove it)")
    for folder in folders:
        check_model_folder(folder)
        if out.resolve() == folder.resolve():
            raise MergeError(f"--out {out} is one of the inputs; write the merge to a new folder")
        if out.resolve().is_relative_to(folder.resolve()):
            raise MergeError(
                f"--out {out} is inside the input {folder}: the merge would be copied into its own input; write it "
                "outside every input (e.g. a sibling such as runs/x/merged)"
            )
    layouts = [_tensor_layout(f) for f in folders]
    reference = layouts[0]
    for folder, layout in zip(folders[1:], layouts[1:], strict=True):
        missing, extra = sorted(reference.keys() - layout.keys()), sorted(layout.keys() - reference.keys())
        if missing or extra:
            raise MergeError(
                f"{folder} does not hold the tensors of {folders[0]}: missing {missing[:5]}, not in the first "
                f"{extra[:5]}; only models of one architecture (one base model, full weights) can be merged"
            )
        for name, (file, dtype, shape) in layout.items():
            _, ref_dtype, ref_shape = reference[name]
            if shape != ref_shape:
                raise MergeError(f"{file}: tensor {name} has shape {list(shape)}, {folders[0]} has {list(ref_shape)}")
            if dtype != ref_dtype:
                raise MergeError(
                    f"{file}: tensor {name} is {dtype}, {folders[0]} has {ref_dtype}; save the checkpoints in one "
                    "dtype (model.final_dtype) to merge them"
                )

    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _copy_non_weight_files(folders[0], tmp)
        handles = [{file: safe_open(str(file), framework="pt") for file in weight_files(f)} for f in folders]
        for first_file in weight_files(folders[0]):
            averaged: dict[str, torch.Tensor] = {}
            names = [n for n, (file, _, _) in reference.items() if file == first_file]
            for name in names:
                tensors = [h[layout[name][0]].get_tensor(name) for h, layout in zip(handles, layouts, strict=True)]
                averaged[name] = _average(name, tensors, coefficients, folders)
            metadata = handles[0][first_file].metadata()
            save_file(averaged, str(tmp / first_file.name), metadata=metadata)
        record = {"inputs": [str(f) for f in folders], "weights": coefficients}
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # an empty folder
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _average(name: str, tensors: list[torch.Tensor], coefficients: list[float], folders: list[Path]) -> torch.Tensor:
    dtype = tensors[0].dtype
    if not dtype.is_floating_point:
        for folder, t in zip(folders[1:], tensors[1:], strict=True):
            if not torch.equal(t, tensors[0]):
                raise MergeError(f"{folder}: non-float tensor {name} differs from {folders[0]}'s; not averageable")
        return tensors[0]
    total = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for c, t in zip(coefficients, tensors, strict=True):
        total.add_(t.to(torch.float32), alpha=c)
    return total.to(dtype)


def _copy_non_weight_files(source: Path, target: Path) -> None:
    weights = {f.name for f in weight_files(source)}
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name in weights or entry.name in SKIPPED_ENTRIES or entry.suffix in PICKLE_SUFFIXES:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
