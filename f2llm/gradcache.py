"""Gradient cache: contrastive batches far larger than what fits in memory, with exact gradients.

The contrastive loss couples every text of a batch, so the batch cannot simply be split into micro-batches
with gradient accumulation (that shrinks the pool of in-batch negatives). The gradient cache (Gao et al.,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021) splits the *encoder* work
instead:

1. pass 1, no grad: encode every chunk, keep only the embeddings [n_texts, D];
2. compute the loss on all embeddings at once and back-propagate it to the embeddings only: d(loss)/d(emb);
3. pass 2: re-encode each chunk with grad and back-propagate ``emb_chunk . cached_grad_chunk``.

Passes 1 and 3 are written once, as functions (:func:`embed_chunks`, :func:`backward_chunks`), as GradCache
(luyug/GradCache) shares its passes between its class and its functional decorator. :class:`GradientCache` runs them
for f2llm's trainer (:meth:`GradientCache.step`: both passes and the loss between) and for the sentence-transformers
loss (:mod:`f2llm.integrations.sentence_transformers`), which calls its :meth:`~GradientCache.embed_without_grad` in
its forward and its :meth:`~GradientCache.backward_chunks` in the backward of the loss it returns, every column's
mini-batches in one call.

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
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
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


def embed_chunks(
    chunks: Iterable[Chunk], encode: Callable[[Chunk], torch.Tensor], device: torch.device | None = None
) -> tuple[torch.Tensor, list[RngState]]:
    """Pass 1: the embeddings of all chunks, concatenated in order, computed without grad, and each chunk's RNG state
    captured just before its forward (``device``: the model's, see :meth:`RngState.capture`)."""
    states, outs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture(device))
            outs.append(encode(chunk))
    return torch.cat(outs), states


def backward_chunks(
    chunks: Sequence[Chunk],
    states: Sequence[RngState],
    grad: torch.Tensor,
    encode: Callable[[Chunk], torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    progress: Callable[[list[tuple[Chunk, RngState]]], Iterable[tuple[Chunk, RngState]]] | None = None,
) -> None:
    """Pass 2: accumulate into the parameters' gradients what back-propagating ``grad`` through ``encode`` gives.

    Each chunk is encoded again with grad, its RNG state (from :func:`embed_chunks`) replayed, and a scalar whose
    gradient w.r.t. the chunk's embeddings is the chunk's rows of ``grad`` is back-propagated.

    Args:
        chunks: the chunks of pass 1, in its order; ``grad`` holds their embeddings' rows consecutively (chunks of
            several inputs, e.g. sentence-transformers' columns, go in one call: their cached gradients concatenated).
        states: each chunk's RNG state.
        grad: d(loss)/d(embeddings) [n_texts, D], times any factor the caller applies (a loss scale).
        encode: chunk -> embeddings [n_chunk_texts, D], with autograd; must give pass 1's shapes.
        no_sync: as :class:`GradientCache`'s: entered for every chunk but the last, so that gradients are
            synchronized once, in the last chunk's backward.
        backward: how to back-propagate a scalar (``t.backward()`` by default).
        progress: wraps the (chunk, state) pairs, yielding them all in order (a progress bar).
    """
    backward = backward or (lambda t: t.backward())
    pairs = list(zip(chunks, states, strict=True))
    offset = 0
    for i, (chunk, state) in enumerate(progress(pairs) if progress is not None else pairs):
        last = i == len(pairs) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync, state.replay():
            chunk_emb = encode(chunk)
            n = chunk_emb.shape[0]
            # In the embeddings' dtype (bf16 / fp16 under mixed precision), the dtype autograd hands them.
            chunk_grad = grad[offset : offset + n].to(chunk_emb.dtype)
            if chunk_grad.shape != chunk_emb.shape:
                raise RuntimeError(
                    f"gradient cache: pass 2 gave chunk {i} embeddings of shape {tuple(chunk_emb.shape)}, but the "
                    f"cached gradient has {tuple(chunk_grad.shape)} for it; encode must be deterministic in shape"
                )
            offset += n
            # The surrogate: the gradient of sum(chunk_emb * chunk_grad) w.r.t. chunk_emb is exactly chunk_grad
            # (sum's backward hands ones, the product's multiplies them by chunk_grad: no rounding), so the chain rule
            # gives every parameter the loss's gradient. It is a scalar, which an engine's backward requires
            # (DeepSpeed's engine.backward takes a loss, not a tensor and its gradient). Its value is never used, so
            # computing it in the embeddings' dtype loses nothing.
            backward((chunk_emb * chunk_grad).sum())
    if offset != grad.shape[0]:
        raise RuntimeError(
            f"gradient cache: pass 2 produced {offset} embeddings but pass 1 produced {grad.shape[0]}; "
            "encode must be deterministic in shape"
        )


@dataclass
class CachedStep:
    """What one gradient-cache step produced: the loss value, the loss function's extra output, the embeddings."""

    loss: torch.Tensor
    aux: Any
    embeddings: torch.Tensor


class GradientCache(Generic[Chunk]):
    """Runs one training step's forward and backward with the gradient cache: :func:`embed_chunks`, the loss and
    its gradient w.r.t. the embeddings, :func:`backward_chunks`.

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
        return embed_chunks(chunks, self.encode, self.device)

    def backward_chunks(
        self,
        chunks: Sequence[Chunk],
        states: Sequence[RngState],
        grad: torch.Tensor,
        progress: Callable[[list[tuple[Chunk, RngState]]], Iterable[tuple[Chunk, RngState]]] | None = None,
    ) -> None:
        """Pass 2 with this cache's encode, no-sync and backward: :func:`backward_chunks`."""
        backward_chunks(chunks, states, grad, self.encode, self.no_sync, self.backward, progress)

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
        self.backward_chunks(chunks, states, grad)
        return CachedStep(loss=loss.detach(), aux=aux, embeddings=embeddings)
