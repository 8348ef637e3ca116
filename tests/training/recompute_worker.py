"""Worker of tests/training/test_recompute.py, launched by torchrun (gloo, CPU): a training run whose ranks recompute
differently.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/training/recompute_worker.py MODE CONFIG [key=value ...]

MODE ``mixed``: rank 0 recomputes every forward with grad, rank 1 none; ``none``: no rank recomputes. Each rank
writes ``rank{r}.json`` to the output directory: its forwards with grad and the decoder layers' recomputations (a
layer's MLP runs once per forward, and once more in backward when the layer recomputes).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from f2llm.config import load_config
from f2llm.trainer import Trainer


def main() -> None:
    mode, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    trainer = Trainer.from_config(config)
    rank = trainer.runtime.rank
    # The trainer's own policy (under ZeRO-3 the ranks agree through it), with this rank's forced decision.
    trainer.recompute = dataclasses.replace(trainer.recompute_policy(), mode=mode == "mixed" and rank == 0, budget=None)
    counts = {"forwards": 0, "grad_forwards": 0, "mlp_calls": 0}

    def count_mlp(module, args) -> None:
        counts["mlp_calls"] += 1

    trainer.encoder.model.layers[0].mlp.register_forward_pre_hook(count_mlp)
    forward = trainer.engine.forward

    def counting_forward(batch, normalize=None):
        counts["forwards"] += 1
        counts["grad_forwards"] += int(torch.is_grad_enabled())
        return forward(batch, normalize)

    trainer.engine.forward = counting_forward
    trainer.train()
    counts["recomputed"] = counts["mlp_calls"] - counts["forwards"]
    (Path(config.output_dir) / f"rank{rank}.json").write_text(json.dumps(counts))
    del trainer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
