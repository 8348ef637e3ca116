"""Atomic, pruned checkpoints that are safe to load.

A checkpoint is a folder ``<root>/step-<N>``. It is written under ``<root>/.tmp-step-<N>``, every file and the
folder are fsynced, and only then is it renamed into place (an atomic rename on POSIX file systems). A job
killed while writing leaves a ``.tmp-*`` folder that is never read (and is removed by the next save), so the
newest ``step-*`` folder is always complete. The last ``keep_last`` checkpoints are kept.

Nothing here unpickles arbitrary objects: tensors go through safetensors, other state through JSON, and
``torch.load`` is only used with ``weights_only=True`` (tensors, numbers, strings, lists and dicts).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every folder, deepest first, so a rename after it is durable."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed; the message names the checkpoint, the rank and the newest intact one."""


class CheckpointWriter:
    """Writes checkpoints from one or many ranks.

    Every rank calls :meth:`save` with the same step; each writes its own files through ``write(folder)``; rank 0
    publishes the folder once all have written. ``any_failed(flag)`` tells every rank whether any rank passed
    True (an all-reduce in a distributed run; the flag itself otherwise): ranks agree on a failure, so a
    checkpoint with a missing or half-written file is never published and no rank is left waiting.
    """

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        rank: int = 0,
        any_failed: Callable[[bool], bool] | None = None,
    ):
        if keep_last < 1:
            raise ValueError(f"CheckpointWriter: keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.any_failed = any_failed or (lambda failed: failed)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Checkpoint ``step`` as ``root/step-N`` (see :meth:`publish`), keeping the newest ``keep_last``."""

        def rotate() -> None:
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

        # Any step's temporary: a killed job's save of another step than this one must go too.
        return self.publish(self.root / f"step-{step:08d}", write, after=rotate, stale="step-*")

    def publish(
        self,
        final: Path,
        write: Callable[[Path], None],
        after: Callable[[], None] | None = None,
        stale: str | None = None,
    ) -> Path:
        """Write the folder ``final`` from every rank, all or nothing: each rank's ``write(folder)`` fills a
        temporary sibling (``.tmp-NAME``), which rank 0 fsyncs and renames to ``final`` (replacing an older one)
        once every rank has written; then ``after()`` on rank 0. A job killed or failing halfway never leaves a
        partial folder where a complete one is expected. Used for checkpoints and for the final model. Temporary
        siblings ``.tmp-STALE`` (a glob; default ``final``'s name) left by a job killed mid-save are removed first."""
        tmp = final.with_name(f".tmp-{final.name}")
        error = None
        if self.rank == 0:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                for leftover in final.parent.glob(f".tmp-{stale or final.name}"):
                    shutil.rmtree(leftover, ignore_errors=True)
                tmp.mkdir()
            except Exception as e:
                error = e
        self._agree(error, final, "creating")  # also the barrier: the folder exists before anyone writes
        try:
            write(tmp)
        except Exception as e:
            error = e
        except BaseException:  # interrupted (KeyboardInterrupt, SystemExit): leave nothing half-written behind
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._agree(error, final, "writing", cleanup=tmp)
        if self.rank == 0:
            try:
                fsync_tree(tmp)
                if final.exists():  # the same step saved again (e.g. end of a resumed run): replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(final.parent)
                if after is not None:
                    after()
            except Exception as e:
                error = e
        self._agree(error, final, "publishing", cleanup=tmp)
        return final

    def _agree(self, error: Exception | None, final: Path, doing: str, cleanup: Path | None = None) -> None:
        """Raise on every rank when any rank failed; rank 0 removes the unpublished folder first."""
        if not self.any_failed(error is not None):
            return
        if self.rank == 0 and cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        intact = latest_checkpoint(self.root)
        intact_text = f"the newest intact checkpoint is {intact}" if intact else "there is no earlier checkpoint"
        if error is not None:
            raise CheckpointError(
                f"{doing} checkpoint {final} failed on rank {self.rank}: {type(error).__name__}: {error}; nothing "
                f"was published, {intact_text} (a rerun resumes from it)"
            ) from error
        raise CheckpointError(
            f"{doing} checkpoint {final} failed on another rank; nothing was published, {intact_text}"
        )


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Every generator the training loop draws from, in weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {
            "algorithm": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(obj: Any, path: Path) -> None:
    """torch.save of plain data (tensors, numbers, strings, lists, dicts): loadable with weights_only=True."""
    torch.save(obj, path)


def load_state(path: Path) -> Any:
    """Load a file written by :func:`save_state`; refuses anything that would need unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"{path}: refusing to load: not a plain-data checkpoint file (weights_only=True failed: {e}). "
            "f2llm never unpickles arbitrary objects; was this file written by f2llm?"
        ) from e
