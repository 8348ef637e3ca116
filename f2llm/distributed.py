"""torch.distributed helpers: joining the process group (:func:`init_runtime`), this rank's :class:`Runtime`
(rank, device, the small agreements ranks make), process-group queries and an autograd-aware all-gather.

Everything works without an initialized process group (single process): rank 0 of a world of 1, agreements return
this rank's own value, and the gather returns its input.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------------------ the runtime
@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if is_distributed():
            dist.barrier()

    def any_failed(self, failed: bool) -> bool:
        """True on every rank when any rank passes True (one all-reduce; no-op in a single process)."""
        return self.max(int(failed)) > 0

    def failed_anywhere(self, flags: torch.Tensor) -> list[bool]:
        """Each flag of a bool vector OR-ed over the ranks, on every rank: one all-reduce, one host read."""
        flags = flags.to(self.device, torch.int64)
        if is_distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    def max(self, value: int) -> int:
        """The largest ``value`` of all ranks, on every rank (one all-reduce; no-op in a single process)."""
        if not is_distributed():
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def init_runtime(timeout_minutes: float = 30.0, group_of_one: bool = False) -> Runtime:
    """Join the torchrun process group (when launched by torchrun) and pick this rank's device.

    A rank that waits longer than ``timeout_minutes`` in a collective raises instead of hanging forever.
    ``group_of_one``: a single process started without torchrun gets a process group of its own (DeepSpeed
    needs one even alone).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if (world > 1 or group_of_one) and not is_distributed():
        if "MASTER_ADDR" not in os.environ:  # started without a launcher: what torchrun would set for one process
            alone = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.update(alone, MASTER_PORT=str(free_port()))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = restart_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank_, world_ = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world_, timeout=timeout)
    return Runtime(rank(), world_size(), device)


def restart_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store the process group meets in under torchrun's agent: the agent's store, under a prefix of this
    attempt of the workers (``TORCHELASTIC_RESTART_COUNT``); None without the agent's store (``env://`` then).

    torchrun hands its workers the store its agent keeps for the whole job, across restarts (``--max-restarts``, a
    node lost or joining), and the process group's keys (each rank's gloo / NCCL address) are written under the same
    names in every attempt: restarted workers would read their peers' addresses from the attempt that died and fail
    to connect ("Gloo connectFullMesh failed ... Connection refused"). A prefix per attempt keeps each attempt's
    addresses apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"f2llm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
