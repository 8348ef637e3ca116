"""SentenceTransformerTrainer under DeepSpeed ZeRO-2 with f2llm's losses trains to the weights of the same DDP run.

2 gloo ranks under torchrun, on CPU: a tiny random BERT in MiniLM's modules (dropout on), SNLI triplets, 2 optimizer
steps of 2 accumulated micro-batches of 4 triplets per rank, SGD without clipping (a gradient off by any factor
moves the weights elsewhere; Adam and clipping would hide a uniform one). ``CachedMultipleNegativesRankingLoss``
with 2 mini-batches per column runs pass 2 as 6 backwards inside the backward of the returned loss, which ZeRO-2 must
reduce once; so does it on a max-pooled model, which packing does not take (sentence-transformers' padded forward,
through the DeepSpeed engine, in both passes); ``MultipleNegativesRankingLoss`` embeds every column in one packed
forward. ZeRO-2 runs with small buckets, so that reductions also happen in the middle of a backward (``overlap_comm``,
``contiguous_gradients``). The control: the weights moved (runs that did nothing would agree too).

This file is also the torchrun worker:
``python -m torch.distributed.run --nproc-per-node 2 tests/integrations/test_st_deepspeed.py OUT_DIR``.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from f2llm.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
SNLI = ROOT / "data" / "training" / "snli" / "snli_devtest_triplets.tsv"
COLUMNS = ("anchor", "positive", "negative")
WORLD = 2
RANK_BATCH = 4  # triplets per rank and micro-batch
ACCUMULATION = 2
STEPS = 2
MINI_BATCH = 2  # 2 mini-batches per column and micro-batch
# The loss of each pair of runs; "_padded": on the max-pooled model.
LOSSES = ("cached_mnrl", "cached_mnrl_padded", "mnrl")
ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        # Elements: the word embeddings (1M) exceed a bucket, the encoder layers fill several.
        "reduce_bucket_size": 20_000,
        "allgather_bucket_size": 20_000,
    },
    "steps_per_print": 1_000_000,
}


def _rows() -> list[dict[str, str]]:
    with SNLI.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))[: WORLD * RANK_BATCH * ACCUMULATION * STEPS]


def _see_ranks_without_accelerator() -> None:
    """On a machine without an accelerator, accelerate finds no distributed backend for a DeepSpeed run and makes
    every torchrun rank a world of its own (accelerate/state.py: ``_prepare_backend`` returns none, then "No backend
    == no distributed training"), each training on the whole dataset; told gloo, it counts the ranks as on GPUs."""
    from accelerate.state import PartialState

    prepare = PartialState._prepare_backend

    def prepare_backend(self: PartialState, cpu: bool = False, sagemaker_dp: bool = False, backend: Any = None):
        return prepare(self, cpu, sagemaker_dp, backend or "gloo")

    PartialState._prepare_backend = prepare_backend


def _train(initial: torch.nn.Module, out: Path, loss_name: str, deepspeed: dict | None) -> dict[str, Any]:
    """One training run of a copy of ``initial`` under DDP (``deepspeed`` None) or DeepSpeed: the final weights, the
    logged losses and gradient norms."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from f2llm.integrations.sentence_transformers import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    if deepspeed is None:  # a DeepSpeed run before leaves it set, and accelerate would make this run DeepSpeed's too
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    model = copy.deepcopy(initial)
    rows = _rows()
    dataset = Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS})
    if loss_name == "mnrl":
        loss = MultipleNegativesRankingLoss(model)
    else:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=RANK_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping (DeepSpeed's "auto" takes it too)
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        deepspeed=deepspeed,
        use_cpu=deepspeed is None,  # DDP over gloo; accelerate turns DeepSpeed off under use_cpu
        ddp_backend="gloo",
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    wrapper = "DeepSpeedEngine" if deepspeed is not None else "DistributedDataParallel"
    assert type(trainer.model_wrapped).__name__ == wrapper and trainer.accelerator.num_processes == WORLD
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "losses": [h["loss"] for h in logged],
        "grad_norms": [h["grad_norm"] for h in logged],
    }


def _worker(out: Path) -> None:
    """torchrun rank: every loss trained under DDP and under ZeRO-2; saves this rank's results."""
    import torch.distributed as dist

    from tests.integrations.st_helpers import tiny_model

    torch.set_num_threads(1)
    _see_ranks_without_accelerator()
    packed, padded = tiny_model(), tiny_model(pooling="max")  # the same weights (pooling has none)
    result: dict[str, Any] = {"initial": {k: v.clone() for k, v in packed.state_dict().items()}}
    for loss_name in LOSSES:
        initial = padded if loss_name.endswith("_padded") else packed
        result[loss_name] = {
            "ddp": _train(initial, out / loss_name / "ddp", loss_name, None),
            "zero2": _train(initial, out / loss_name / "zero2", loss_name, ZERO2),
        }
    torch.save(result, out / f"rank{dist.get_rank()}.pt")


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    assert a.keys() == b.keys() and b
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return (num / den).sqrt().item()


@pytest.mark.distributed
def test_zero2_trains_to_the_weights_of_ddp(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, str(tmp_path)]  # fmt: skip
    from tests.helpers import HANG_BOUND, training_env  # here: this file is also the torchrun worker, run as a script

    # CPU and gloo on any machine; the worker imports this repository's tests and f2llm.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = training_env(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", PYTHONPATH=path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for loss_name in LOSSES:
        ddp, zero2 = ranks[0][loss_name]["ddp"], ranks[0][loss_name]["zero2"]
        assert len(ddp["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(zero2["losses"]), torch.tensor(ddp["losses"]), rtol=1e-6, atol=0)
        # Every step's gradient, at its scale (accumulation's 1/2 applied once): SGD without clipping follows it.
        torch.testing.assert_close(
            torch.tensor(zero2["grad_norms"]), torch.tensor(ddp["grad_norms"]), rtol=1e-5, atol=0
        )
        assert _rel(zero2["weights"], ddp["weights"]) < 1e-5, loss_name
        # The control: both runs trained (weights that never moved would agree too).
        assert _rel(ddp["weights"], ranks[0]["initial"]) > 1e-2, loss_name
        for other in ranks[1:]:  # every rank ends at the same weights
            for engine in ("ddp", "zero2"):
                assert _rel(other[loss_name][engine]["weights"], ranks[0][loss_name][engine]["weights"]) == 0.0


def test_zero3_refused_before_the_first_mini_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached losses reduce pass 2's gradients once for ZeRO-1/2 only: a ZeRO-3 engine is refused, naming it,
    before any mini-batch is embedded; ZeRO-2 goes on to them."""
    from f2llm.integrations import sentence_transformers as integration
    from tests.integrations.st_helpers import features, tiny_model

    class MiniBatches(Exception):
        pass

    def mini_batches(*args, **kwargs):
        raise MiniBatches

    model = tiny_model()
    loss = integration.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    monkeypatch.setattr(loss, "_mini_batches", mini_batches)
    # The model stands in for the engine: what the loss reads of one is its stage.
    monkeypatch.setattr(integration, "_is_deepspeed_engine", lambda m: m is model)
    monkeypatch.setattr(integration, "_unwrap", lambda m: m)
    batch = features(model, ["a man sleeps", "rain"], ["someone is asleep", "it is wet"])
    for stage, raised in ((3, ValueError), (2, MiniBatches)):
        monkeypatch.setattr(model, "zero_optimization_stage", lambda stage=stage: stage, raising=False)
        with pytest.raises(raised, match=r"ZeRO stage 3 .*use ZeRO stage 1 or 2" if stage == 3 else None):
            loss(batch, None)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
