"""Gradient cache: contrastive batches far larger than what fits in memory, with exact gradients.

The contrastive loss couples every text of a batch, so the batch cannot simply be split into micro-batches
with gradient accumulation (that shrinks the pool of in-batch negatives). The gradient cache (Gao et al.,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021) splits the *encoder* work
instead:

1. pass 1, no grad: encode every chunk, keep only the embeddings [n_texts, D];
2. compute the loss on all embeddings at once and back-propagate it to the embeddings only: d(loss)/d(emb);
3. pass 2: re-encode each chunk with grad and back-propagate ``emb_chunk . cached_grad_chunk``.

Step 3 gives every parameter exactly the gradient of step 2's loss, because the loss depends on the parameters
only through the embeddings (chain rule). Two details make it exact in practice:

* randomness (dropout) is replayed: each chunk's RNG state is captured before pass 1 and restored for pass 2,
  so both passes compute the same function;
* gradient synchronization across ranks is deferred where the engine can defer it: every chunk but the last
  runs under the engine's ``no_sync`` context, so DDP all-reduces the gradients once, after the last chunk
  (DeepSpeed ZeRO-2/3 still reduce-scatter in every chunk's backward: see f2llm.engine);
* with several ranks, every rank runs the same number of chunks (:func:`split_to_count`): a forward or backward
  may be a collective (ZeRO-3 gathers weights, ZeRO-2 reduce-scatters gradients), and unequal counts would
  leave the ranks' collectives mismatched.

Peak activation memory is that of one chunk; the embeddings and their gradients are the only per-batch cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

Chunk = TypeVar("Chunk")
Text = TypeVar("Text", bound=Sized)


def chunk_by_tokens(seqs: Sequence[Text], chunk_tokens: int) -> list[list[Text]]:
    """Consecutive groups of token sequences holding at most ``chunk_tokens`` tokens each (a longer sequence is a
    group of its own): the gradient cache's chunks when their size is set in tokens."""
    groups: list[list[Text]] = []
    current: list[Text] = []
    tokens = 0
    for s in seqs:
        if current and tokens + len(s) > chunk_tokens:
            groups.append(current)
            current, tokens = [], 0
        current.append(s)
        tokens += len(s)
    groups.append(current)
    return groups


def split_to_count(groups: Sequence[Sequence[Text]], count: int) -> list[list[Text]]:
    """``groups`` split further into exactly ``count`` consecutive non-empty groups (order kept).

    While there are fewer than ``count`` groups, the group with the most tokens among those holding two or more
    sequences is cut where its tokens are halved; no group grows, so a token budget ``groups`` respected still
    holds. Used to give every rank the same chunk count (the largest any rank needs) when chunks are sized in
    tokens.
    """
    out = [list(g) for g in groups if len(g)]
    total = sum(len(g) for g in out)
    if not 1 <= count <= total:
        raise ValueError(f"split_to_count: cannot make {count} non-empty groups of {total} sequences")
    if len(out) > count:
        raise ValueError(f"split_to_count: already {len(out)} groups, more than {count}")
    while len(out) < count:
        i = max((j for j, g in enumerate(out) if len(g) > 1), key=lambda j: sum(len(s) for s in out[j]))
        group = out[i]
        half, acc, cut = sum(len(s) for s in group) / 2, 0, 1
        for cut in range(1, len(group)):
            acc += len(group[cut - 1])
            if acc >= half:
                break
        out[i : i + 1] = [group[:cut], group[cut:]]
    return out


@dataclass
class RngState:
    """The CPU generator's state and, for a model on a GPU, that GPU's, captured before a chunk's first forward.

    Only the model's device is captured and restored (as GradCache and torch.utils.checkpoint do): forking every
    visible GPU for every chunk costs a device sync per GPU and touches devices the model does not use.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device | None

    @classmethod
    def capture(cls, device: torch.device | None = None) -> RngState:
        """``device``: the model's; None: the current CUDA device when CUDA is in use, else the CPU only."""
        if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device())
        on_cuda = device is not None and device.type == "cuda"
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None, device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with this state, then put the generators back where they were."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class CachedStep:
    """What one gradient-cache step produced: the loss value, the loss function's extra output, the embeddings."""

    loss: torch.Tensor
    aux: Any
    embeddings: torch.Tensor


class GradientCache(Generic[Chunk]):
    """Runs one training step's forward and backward with the gradient cache.

    Args:
        encode: chunk -> embeddings [n_chunk_texts, D] (with autograd when grad is enabled).
        no_sync: a context manager factory that suppresses cross-rank gradient synchronization (DDP's
            ``model.no_sync``); used for every chunk but the last. None when there is nothing to suppress.
        backward: how to back-propagate a scalar (``loss.backward()`` by default; a DeepSpeed engine's
            ``engine.backward``).
        device: the model's device, whose random generator is replayed with the CPU's (None: the current CUDA
            device when CUDA is in use).
    """

    def __init__(
        self,
        encode: Callable[[Chunk], torch.Tensor],
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.encode = encode
        self.no_sync = no_sync
        self.backward = backward or (lambda t: t.backward())
        self.device = device

    def embed_without_grad(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, list[RngState]]:
        """Pass 1: embeddings of all chunks (concatenated in order) and each chunk's RNG state."""
        states, outs = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RngState.capture(self.device))
                outs.append(self.encode(chunk))
        return torch.cat(outs), states

    def step(
        self,
        chunks: Sequence[Chunk],
        loss_fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, Any]],
    ) -> CachedStep:
        """Forward + backward of ``loss_fn(embeddings of all chunks)``; parameter gradients are accumulated.

        ``loss_fn`` gets the embeddings of all chunks concatenated in order (a leaf tensor) and returns the scalar
        loss, or (loss, aux) where aux is passed through (e.g. loss parts for logging).
        """
        if not chunks:
            raise ValueError("GradientCache.step: got no chunks")
        embeddings, states = self.embed_without_grad(chunks)
        emb = embeddings.detach().requires_grad_()
        out = loss_fn(emb)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        if loss.dim() != 0:
            raise ValueError(f"GradientCache.step: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, emb)
        offset = 0
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or self.no_sync is None else self.no_sync()
            with sync, state.replay():
                chunk_emb = self.encode(chunk)
                n = chunk_emb.shape[0]
                chunk_grad = grad[offset : offset + n].to(chunk_emb.dtype)
                offset += n
                # A scalar surrogate whose gradient w.r.t. chunk_emb is the cached gradient; an engine's
                # backward (DeepSpeed) only accepts scalars.
                self.backward((chunk_emb * chunk_grad).sum())
        if offset != embeddings.shape[0]:
            raise RuntimeError(
                f"GradientCache.step: pass 2 produced {offset} embeddings but pass 1 produced {embeddings.shape[0]}; "
                "encode must be deterministic in shape"
            )
        return CachedStep(loss=loss.detach(), aux=aux, embeddings=embeddings)
