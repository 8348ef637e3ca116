"""Worker of tests/training/test_loss_distributed.py, launched by torchrun (gloo, CPU).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/training/dist_loss_worker.py OUT_DIR

1. Every rank builds the same global batch from a fixed seed (rank 0 saves it to OUT_DIR/inputs.pt), takes its
   equal slice of queries, positives and hard negatives, computes F2LLMLoss with the in-batch term (positives
   gathered from all ranks with gradient), runs backward, and saves its loss terms and the gradients of its own
   rows to OUT_DIR/rank{r}.pt; the same with ``in_batch_gradient="queries_only"``, and both again with Matryoshka
   levels (``MATRYOSHKA_DIMS``).
2. all_gather_with_grad with unequal sizes: rank r holds r + 1 rows; each rank's loss weighs the gathered rows
   with a rank-dependent weight. Saves the gathered tensor and the gradient of its own rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from f2llm import distributed
from f2llm.loss import F2LLMLoss

B, K, D, TEMPERATURE = 8, 3, 16, 0.05
MATRYOSHKA_DIMS = (4, 8)  # levels 16, 8, 4


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "query": F.normalize(torch.randn(B, D, generator=g), dim=-1),
        "pos": F.normalize(torch.randn(B, D, generator=g), dim=-1),
        "neg": F.normalize(torch.randn(B, K, D, generator=g), dim=-1),
    }


def unequal_gather(rank: int) -> dict[str, torch.Tensor]:
    x = (torch.arange((rank + 1) * 3, dtype=torch.float64).reshape(rank + 1, 3) + 100 * rank).requires_grad_()
    gathered = distributed.all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    return {"gathered": gathered.detach(), "grad": x.grad}


def local_loss(
    batch: dict[str, torch.Tensor], rows: slice, in_batch_gradient: str, matryoshka_dims: tuple[int, ...] | None
) -> dict:
    """This rank's F2LLMLoss terms on its rows of the global batch, and the gradients of those rows."""
    local = {name: t[rows].clone().requires_grad_() for name, t in batch.items()}
    loss_fn = F2LLMLoss(TEMPERATURE, in_batch_gradient=in_batch_gradient, matryoshka_dims=matryoshka_dims)
    out = loss_fn(local["query"], local["pos"], local["neg"], in_batch=True)
    out.total.backward()
    return {**{term: t.detach() for term, t in out._asdict().items()}, "grads": {n: t.grad for n, t in local.items()}}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch()
    if rank == 0:
        torch.save(batch, out_dir / "inputs.pt")
    rows = slice(rank * B // world, (rank + 1) * B // world)
    local = {name: t[rows].clone().requires_grad_() for name, t in batch.items()}
    out = F2LLMLoss(TEMPERATURE)(local["query"], local["pos"], local["neg"], in_batch=True)
    out.total.backward()
    v1 = {name: t[rows].clone().requires_grad_() for name, t in batch.items()}
    v1_out = F2LLMLoss(TEMPERATURE, in_batch_gradient="queries_only")(v1["query"], v1["pos"], v1["neg"], in_batch=True)
    v1_out.total.backward()
    result = {
        "queries_only": {"total": v1_out.total.detach(), "grads": {name: t.grad for name, t in v1.items()}},
        "total": out.total.detach(),
        "hard": out.hard.detach(),
        "in_batch": out.in_batch.detach(),
        "grads": {name: t.grad for name, t in local.items()},
        "unequal": unequal_gather(rank),
        "matryoshka": {mode: local_loss(batch, rows, mode, MATRYOSHKA_DIMS) for mode in ("full", "queries_only")},
        "world": world,
    }
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
