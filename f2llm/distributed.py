"""torch.distributed helpers: process-group queries and an autograd-aware all-gather.

Everything works without an initialized process group (single process): rank 0 of a world of 1, and the
gather returns its input.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a launcher's rendezvous port (torchrun --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's ``n`` (e.g. its local batch size), in rank order. One small collective, one host sync."""
    if not is_distributed():
        return [n]
    mine = torch.tensor([n], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient over ranks, keep this rank's rows.

    Each rank's loss uses every rank's rows, so the gradient of this rank's rows is the sum of what every rank's
    loss sends them. ``all_reduce`` + slice rather than ``reduce_scatter``: the gloo backend has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
        me = dist.get_rank(group)
        longest = max(sizes)
        # all_gather needs equal shapes: pad shorter inputs, cut the padding off after.
        padded = x
        if x.shape[0] < longest:
            padded = x.new_zeros((longest, *x.shape[1:]))
            padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.sizes, ctx.offset, ctx.group = sizes, sum(sizes[:me]), group
        ctx.local = x.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.contiguous().clone()  # all_reduce writes in place: never into autograd's own buffer
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed[ctx.offset : ctx.offset + ctx.local], None, None


def all_gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank along dim 0 (rank order), with gradient flowing back to each rank.

    Ranks may hold different numbers of rows. ``sizes`` (every rank's ``n_r``, e.g. from :func:`all_gather_sizes`)
    saves the size exchange when the caller already has it. Gradient semantics: rank r receives, for its rows,
    the sum over all ranks of d(loss_rank)/d(rows). With DDP-style gradient averaging over W ranks and equal
    local batch sizes, training then follows the gradient of the mean of the per-rank losses, i.e. of the
    global-batch loss. Every rank must run the backward pass (the gradient is summed by a collective).

    Without an initialized process group (or with a world of 1) returns ``x`` itself.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    me = dist.get_rank(group)
    if len(sizes) != dist.get_world_size(group) or sizes[me] != x.shape[0]:
        raise ValueError(
            f"all_gather_with_grad: sizes {sizes} do not match world size {dist.get_world_size(group)} and this "
            f"rank's ({me}) {x.shape[0]} rows"
        )
    return _AllGatherWithGrad.apply(x.contiguous(), sizes, group)
