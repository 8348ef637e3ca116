"""Subprocess worker of the reliability tests: runs f2llm with faults injected at exact points.

Usage::

    python tests/training/fault_worker.py train --config CFG [key=value ...]     (also under torchrun)
    python tests/training/fault_worker.py checkpoint-writer ROOT
    python tests/training/fault_worker.py tokenize SOURCE CACHE_DIR MODEL_DIR [--die-at-call N] [--max-extra-rss-mib M]
    python tests/training/fault_worker.py deepspeed-resume CONFIG PAYLOAD

``train`` runs ``f2llm train`` with the faults listed in the ``F2LLM_FAULTS`` environment variable (a JSON list);
``F2LLM_FAULT_DIR`` is where it writes the ``held`` marker and one ``error-rank{r}.json`` per rank that raised.
A fault fires on rank ``rank`` (default 0) at trainer step ``step`` (1-based), in every attempt of the job or, with
``"attempt": n``, only in the n-th (torchrun's ``TORCHELASTIC_RESTART_COUNT``: 0 for the first, 1 after one restart):

* ``{"at": "step", "phase": "before" | "after_backward" | "after_update", "action": ...}`` with action
  ``hold`` (write the marker and sleep: the test kills the whole job with SIGKILL), ``die`` (this rank writes
  ``died-rank{r}`` with the time, then SIGKILLs itself), ``raise`` (this rank raises RuntimeError) or
  ``limit_file_size`` (``bytes``: from then on a write past that size fails with a real OS error, RLIMIT_FSIZE);
* ``{"at": "save", "file": NAME, "action": "hold" | "raise"}``: write the first half of checkpoint file NAME, then
  hold or raise (a write that fails halfway, as on a full disk);
* ``{"at": "final", "action": "hold"}``: hold inside the final model save, after the weights, before
  ``f2llm_config.json``;
* ``{"at": "loss", "action": "nan"}``: this rank's training loss is NaN at that step;
* ``{"at": "grad", "action": "nan"}``: this rank's local gradient of one weight is NaN at that step (before the
  data-parallel all-reduce).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

HELD = "held"
HOLD_SECONDS = 600


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def attempt() -> int:
    """How often torchrun's agent has restarted the workers (0: the first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def hold(description: str) -> None:
    """Tell the test where this process stopped, then wait to be killed."""
    marker = Path(os.environ["F2LLM_FAULT_DIR"]) / HELD
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(description)
    os.replace(tmp, marker)
    time.sleep(HOLD_SECONDS)
    raise SystemExit(f"fault_worker: held at {description} for {HOLD_SECONDS} s and was not killed")


def limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def act(fault: dict[str, Any], where: str) -> None:
    action = fault["action"]
    if action == "hold":
        hold(where)
    elif action == "die":
        (Path(os.environ["F2LLM_FAULT_DIR"]) / f"died-rank{rank()}").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"fault_worker: injected failure at {where}")
    elif action == "limit_file_size":
        limit_file_size(int(fault["bytes"]))
    else:
        raise ValueError(f"fault_worker: unknown action {action!r} in {fault}")


def install_faults(faults: list[dict[str, Any]]) -> None:
    """Patch the trainer so that each fault fires at its place."""
    from f2llm import engine as engine_module
    from f2llm import export as export_module
    from f2llm import trainer as trainer_module
    from f2llm.encoder import Encoder
    from f2llm.loss import LossOutput
    from f2llm.trainer import Trainer

    mine = [f for f in faults if f.get("rank", 0) == rank() and f.get("attempt", attempt()) == attempt()]

    def matching(at: str, step: int | None = None, **fields: Any) -> list[dict[str, Any]]:
        found = [f for f in mine if f["at"] == at and (step is None or f.get("step") == step)]
        return [f for f in found if all(f.get(k) == v for k, v in fields.items())]

    train_step, batch_loss, train = Trainer.train_step, Trainer.batch_loss, Trainer.train
    save_state, write_st_files = trainer_module.save_state, export_module.write_sentence_transformers_files
    engines = (engine_module.DDPEngine, engine_module.DeepSpeedEngine)
    backwards = {cls: cls.backward for cls in engines}
    # The step being run (1-based) and whether its first backward has fired its faults.
    current = {"step": 0, "backward_done": False}

    def patched_train_step(self: Trainer, batch: Any) -> Any:
        step = self.step + 1
        current.update(step=step, backward_done=False)
        for fault in matching("step", step, phase="before"):
            act(fault, f"step {step} before")
        hooks = []
        if matching("grad", step):
            param = next(self.encoder.parameters())
            hooks.append(param.register_hook(lambda g: g * float("nan")))
        try:
            result = train_step(self, batch)
        finally:
            for h in hooks:
                h.remove()
        for fault in matching("step", step, phase="after_update"):
            act(fault, f"step {step} after_update")
        return result

    def patched_backward(self: Any, loss: torch.Tensor) -> None:
        backwards[type(self)](self, loss)
        step = current["step"]
        if not current["backward_done"]:
            current["backward_done"] = True
            for fault in matching("step", step, phase="after_backward"):
                act(fault, f"step {step} after_backward")

    def patched_batch_loss(self: Trainer, emb: torch.Tensor, batch: Any) -> LossOutput:
        out = batch_loss(self, emb, batch)
        if torch.is_grad_enabled() and matching("loss", self.step + 1):
            return LossOutput(*(t * float("nan") for t in out))
        return out

    def patched_train(self: Trainer) -> Path:
        try:
            return train(self)
        except BaseException as e:
            record = {"rank": rank(), "type": type(e).__name__, "message": str(e), "time": time.time()}
            (Path(os.environ["F2LLM_FAULT_DIR"]) / f"error-rank{rank()}.json").write_text(json.dumps(record))
            raise

    def patched_save_state(obj: Any, path: Path) -> None:
        step = int(path.parent.name.rsplit("-", 1)[-1])
        for fault in matching("save", step, file=path.name):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            act(fault, f"writing {path}")
        save_state(obj, path)

    def patched_write_st_files(encoder: Encoder, path: Path) -> None:
        for fault in matching("final"):
            act(fault, f"final save in {path}")
        write_st_files(encoder, path)

    Trainer.train_step = patched_train_step
    for cls in engines:
        cls.backward = patched_backward
    Trainer.batch_loss = patched_batch_loss
    Trainer.train = patched_train
    trainer_module.save_state = patched_save_state
    engine_module.save_state = patched_save_state
    export_module.write_sentence_transformers_files = patched_write_st_files


def run_train(argv: list[str]) -> int:
    install_faults(json.loads(os.environ.get("F2LLM_FAULTS", "[]")))
    from f2llm.cli import main

    return main(["train", *argv])


def run_checkpoint_writer(root: Path) -> int:
    """Publish step 1, then die (SIGKILL) halfway through the files of step 2."""
    from f2llm.checkpoint import CheckpointWriter, save_state

    writer = CheckpointWriter(root, keep_last=2)

    def write(step: int, die: bool) -> Any:
        def files(folder: Path) -> None:
            save_state({"step": step, "weights": torch.full((4, 4), float(step))}, folder / "state.pt")
            if die:
                with open(folder / "optimizer.pt", "wb") as f:
                    f.write(b"PK\x03\x04 half a zip archive")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            save_state({"moments": torch.ones(3) * step}, folder / "optimizer.pt")

        return files

    writer.save(1, write(1, die=False))
    writer.save(2, write(2, die=True))
    return 1  # unreachable: the second save kills the process


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_tokenize(args: argparse.Namespace) -> int:
    """load_sources with the encoder's tokenizer, optionally dying mid-tokenization or capped in memory."""
    from f2llm.data import SourceOverride, TextTokenizer, load_sources
    from f2llm.encoder import Encoder

    encoder = Encoder.from_pretrained(args.model_dir, max_length=args.max_length)
    tokenizer = encoder.text_tokenizer
    if args.die_at_call is not None:

        class DyingTokenizer(TextTokenizer):
            calls = 0

            def __call__(self, texts: Any) -> list[list[int]]:
                DyingTokenizer.calls += 1
                if DyingTokenizer.calls == args.die_at_call:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().__call__(texts)

        tokenizer = DyingTokenizer(tokenizer.tokenizer, tokenizer.max_length, tokenizer.append_eos)
    baseline, peak = rss_bytes(), [0]
    if args.max_extra_rss_mib is not None:

        def watchdog() -> None:
            while True:
                extra = rss_bytes() - baseline
                peak[0] = max(peak[0], extra)
                if extra > args.max_extra_rss_mib * 2**20:
                    print(f"fault_worker: RSS grew by {extra / 2**20:.0f} MiB", file=sys.stderr, flush=True)
                    os._exit(3)
                time.sleep(0.02)

        threading.Thread(target=watchdog, daemon=True).start()
    source = Path(args.source)
    started = time.perf_counter()
    (loaded,) = load_sources(
        [source], tokenizer, args.cache_dir, overrides={source.stem: SourceOverride(kind="retrieval", num_negatives=0)}
    )
    seconds = time.perf_counter() - started
    passages = loaded.dataset["passage_ids"]
    report = {
        "rows": len(loaded),
        "passage_lengths": [len(p) for p in passages],
        "passage_last": [p[-1] for p in passages],
        "eos": tokenizer.eos_token_id,
        "seconds": seconds,
        "peak_extra_rss_mib": max(peak[0], rss_bytes() - baseline) / 2**20,
    }
    print(json.dumps(report))
    return 0


def run_deepspeed_resume(config_path: Path, payload: Path) -> int:
    """Train 2 steps with DeepSpeed (one process), put ``payload`` in place of the checkpoint's model states,
    resume from it, and print what happened."""
    import shutil

    import torch.distributed as dist

    from f2llm.config import load_config
    from f2llm.trainer import Trainer

    dist.init_process_group("gloo")  # DeepSpeed needs a process group, even for one process
    config = load_config(config_path)
    Trainer.from_config(config).train()
    checkpoint = Path(config.output_dir) / "checkpoints" / "step-00000002"
    target = checkpoint / "deepspeed" / "mp_rank_00_model_states.pt"
    shutil.copyfile(payload, target)
    outcome: dict[str, Any] = {"replaced": str(target)}
    try:
        Trainer.from_config(config)
        outcome["resumed"] = True
    except Exception as e:
        outcome.update(resumed=False, error=f"{type(e).__name__}: {e}"[:2000])
    print(json.dumps(outcome))
    dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run_train(rest)
    if command == "checkpoint-writer":
        return run_checkpoint_writer(Path(rest[0]))
    if command == "deepspeed-resume":
        return run_deepspeed_resume(Path(rest[0]), Path(rest[1]))
    if command == "tokenize":
        parser = argparse.ArgumentParser(prog="fault_worker.py tokenize")
        parser.add_argument("source")
        parser.add_argument("cache_dir")
        parser.add_argument("model_dir")
        parser.add_argument("--max-length", type=int, default=64)
        parser.add_argument("--die-at-call", type=int, default=None)
        parser.add_argument("--max-extra-rss-mib", type=float, default=None)
        return run_tokenize(parser.parse_args(rest))
    raise SystemExit(f"fault_worker: unknown command {command!r}; see the module docstring")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
