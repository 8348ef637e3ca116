"""Contrastive losses as drop-in nn.Modules, built on the fused ops of :mod:`f2llm.kernels`.

* :class:`InfoNCELoss` replaces ``F.cross_entropy(q @ c.T / t, targets)`` without the score matrix.
* :class:`F2LLMLoss` is the F2LLM training loss: a hard-negative loss (each query against its own positive and
  hard negatives) plus, for retrieval batches, an in-batch loss (each local query against the positives of the
  whole global batch, gathered from every rank with gradient). ``total = hard + in_batch`` (unweighted); with
  ``matryoshka_dims``, each term is F2LLM v2's weighted sum over nested prefix dimensions (Matryoshka).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from f2llm import distributed
from f2llm.kernels import grouped_infonce, infonce, matryoshka_levels


class InfoNCELoss(nn.Module):
    """Mean InfoNCE of queries ``q`` [B, D] against candidates ``c`` [N, D]; ``targets`` [B] index the positives.

    Args:
        temperature: logits are ``q . c / temperature``.
        mask_margin: drop candidate j != target from a query's denominator when its score exceeds the positive's
            by more than ``mask_margin`` (raw dot products, cosine domain for normalized embeddings). None = off.
        ignore_index: target value of queries that do not count (all ignored: loss 0, zero gradients).
    """

    def __init__(self, temperature: float = 0.05, mask_margin: float | None = None, ignore_index: int = -100) -> None:
        super().__init__()
        self.temperature = temperature
        self.mask_margin = mask_margin
        self.ignore_index = ignore_index

    def forward(self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return infonce(q, c, targets, self.temperature, mask_margin=self.mask_margin, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mask_margin={self.mask_margin}, ignore_index={self.ignore_index}"


class LossOutput(NamedTuple):
    """Loss terms of one step: ``total = hard + in_batch``. ``in_batch`` is a 0-tensor when that term is off.
    With Matryoshka, ``hard`` and ``in_batch`` are each the weighted sum of that term over the levels."""

    total: torch.Tensor
    hard: torch.Tensor
    in_batch: torch.Tensor


class F2LLMLoss(nn.Module):
    """The F2LLM loss: hard-negative InfoNCE plus optional in-batch InfoNCE over the global batch.

    * hard: query i against ``[pos_i, neg_i1, ..., neg_ik]`` only (its own hard negatives, target 0).
    * in-batch: query i against the positives of every rank (gathered with gradient; hard negatives are not
      in-batch negatives), target its own positive at ``offset_rank + i``.

    Matryoshka (F2LLM v2, ``matryoshka_dims``): levels ``d_1 = D > d_2 > ... > d_L`` (the given dims below D, plus
    D; dims >= D are ignored, as in v2). Level n scores the first ``d_n`` coordinates of every embedding,
    L2-normalized again (the full level too), and weighs its terms by ``w_n = 1 / (n sqrt(D / d_n))``::

        hard = sum_n w_n hard(d_n)      in_batch = sum_n w_n in_batch(d_n)      total = hard + in_batch

    (summed, not averaged). With layer exits (``[B, E, D]`` inputs, ML-Embed), each term is the mean over the exits
    of the exit's term. Each term is one fused call over all levels (f2llm.kernels with ``matryoshka_dims``), not
    a loop; the in-batch term gathers the positives once, at full D, and truncates inside the op.

    Each rank's terms are means over its local queries. With equal local batch sizes and DDP-style gradient
    averaging this trains on the global-batch loss exactly (the gather sums, over ranks, the gradient each
    rank's loss sends to every positive). Ranks may hold different batch sizes (the gather handles it); the
    averaged gradient is then that of the mean of per-rank means rather than the global mean.

    Args:
        temperature: logits are cosine / temperature (0.05 in the recipe).
        mask_margin: optional false-negative filter of the in-batch term (see :class:`InfoNCELoss`; with
            Matryoshka, applied at each level on that level's cosines). None = off, as in the recipe.
        group: process group to gather positives over (default: the world).
        in_batch_gradient: ``"full"`` (default): the in-batch term sends gradient to every positive, local and
            gathered. ``"queries_only"``: to the queries only, no positive gets gradient from the in-batch term
            (positives learn from the hard term alone), which is what the official F2LLM v1 code computes: its
            ``accelerator.gather`` has no autograd, even on one GPU. Use it to reproduce the published models.
        equal_batches: every rank passes the same number of queries (f2llm's sampler guarantees it): the gather
            then skips the exchange of batch sizes (a collective and a host sync per step). False: sizes are
            exchanged, and may differ.
        matryoshka_dims: prefix dimensions of the Matryoshka levels (e.g. ``(64, 128, 256, 512)``; the full
            embedding dimension is always added), positive ints. None (default): off, the single full-dimension
            loss on the embeddings as given (no normalization).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        mask_margin: float | None = None,
        group: torch.distributed.ProcessGroup | None = None,
        in_batch_gradient: Literal["full", "queries_only"] = "full",
        equal_batches: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_batch_gradient not in ("full", "queries_only"):
            raise ValueError(
                f"F2LLMLoss: in_batch_gradient must be 'full' or 'queries_only', got {in_batch_gradient!r}"
            )
        if matryoshka_dims is not None:
            dims = list(matryoshka_dims)
            bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or d <= 0]
            if not dims or bad:
                raise ValueError(
                    f"F2LLMLoss: matryoshka_dims must be a non-empty list of positive ints (prefix dimensions; the "
                    f"full dimension is added), got {matryoshka_dims!r}; use None to turn Matryoshka off"
                )
            matryoshka_dims = tuple(dims)
        self.temperature = temperature
        self.mask_margin = mask_margin
        self.group = group
        self.in_batch_gradient = in_batch_gradient
        self.equal_batches = equal_batches
        self.matryoshka_dims = matryoshka_dims

    def levels(self, D: int) -> tuple[tuple[int, ...], tuple[float, ...]] | tuple[None, None]:
        """(dims, weights) of the Matryoshka levels for embeddings of dimension ``D``, descending from D;
        (None, None) when Matryoshka is off."""
        if self.matryoshka_dims is None:
            return None, None
        return matryoshka_levels(D, self.matryoshka_dims)

    def matryoshka_summary(self, D: int) -> str:
        """One line on the Matryoshka levels that embeddings of dimension ``D`` train (a run's start says it)."""
        dims, weights = self.levels(D)
        if dims is None:
            return "Matryoshka: off"
        levels = ", ".join(f"{d} (x{w:.3g})" for d, w in zip(dims, weights, strict=True))
        line = f"Matryoshka: {len(dims)} levels {levels}"
        ignored = sorted({d for d in self.matryoshka_dims if d >= D} - {D})
        return line + (f"; loss.matryoshka_dims {ignored} >= the embedding dimension {D} ignored" if ignored else "")

    def forward(
        self, query_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, in_batch: bool
    ) -> LossOutput:
        """``query_emb`` [B, D], ``pos_emb`` [B, D], ``neg_emb`` [B, k, D] (k >= 0) -> :class:`LossOutput`.

        Layer exits (ML-Embed's depth Matryoshka): ``query_emb`` [B, E, D], ``pos_emb`` [B, E, D], ``neg_emb``
        [B, k, E, D], the embeddings of E exits; each term is then the mean over the exits of that exit's term
        (ML-Embed's ``(in_batch + hard) / len(outputs)``). The hard term of every exit and level is one fused call
        (a query's exits are independent queries of the same group op); the in-batch term gathers every exit's
        positives at once, then scores each exit against its own: one fused call with the exits as its problems
        (every exit and level in the same kernel launches).
        """
        exits = query_emb.dim() == 3
        if query_emb.dim() not in (2, 3) or pos_emb.shape != query_emb.shape:
            raise ValueError(
                f"F2LLMLoss: query_emb and pos_emb must both be [B, D] (or [B, E, D] with layer exits), got "
                f"{tuple(query_emb.shape)} and {tuple(pos_emb.shape)}"
            )
        B, D = query_emb.shape[0], query_emb.shape[-1]
        if neg_emb.dim() != query_emb.dim() + 1 or neg_emb.shape[0] != B or neg_emb.shape[2:] != query_emb.shape[1:]:
            rest = ", ".join(map(str, query_emb.shape[1:]))
            layout = "[B, k, E, D]" if exits else "[B, k, D]"
            raise ValueError(f"F2LLMLoss: neg_emb must be {layout} = [{B}, k, {rest}], got {tuple(neg_emb.shape)}")
        dims, weights = self.levels(D)
        matryoshka = {} if dims is None else dict(matryoshka_dims=dims, matryoshka_weights=weights)
        docs = torch.cat([pos_emb[:, None], neg_emb], dim=1)  # [B, G, D] or [B, G, E, D]
        if exits:
            # Exit e of query i is query (i, e) of one grouped call against its own group at exit e: the mean over
            # B * E queries is the mean over exits of each exit's mean.
            E = query_emb.shape[1]
            hard = grouped_infonce(
                query_emb.reshape(B * E, D), docs.transpose(1, 2).reshape(B * E, docs.shape[1], D), self.temperature,
                **matryoshka,
            )  # fmt: skip
        else:
            hard = grouped_infonce(query_emb, docs, self.temperature, **matryoshka)
        if not in_batch:
            return LossOutput(hard, hard, torch.zeros((), device=hard.device, dtype=hard.dtype))
        if self.equal_batches:
            sizes = [B] * distributed.world_size(self.group)
        else:
            sizes = distributed.all_gather_sizes(B, query_emb.device, self.group)
        # queries_only: a detached input gathers without autograd, as the reference's accelerator.gather does.
        in_batch_pos = pos_emb if self.in_batch_gradient == "full" else pos_emb.detach()
        all_pos = distributed.all_gather_with_grad(in_batch_pos, self.group, sizes=sizes)
        offset = sum(sizes[: distributed.rank(self.group)])
        targets = torch.arange(offset, offset + B, device=query_emb.device)
        options = dict(mask_margin=self.mask_margin, validate=False, **matryoshka)
        if exits:  # exit e's queries against exit e's positives: E problems of one call, averaged
            q_by_exit, pos_by_exit = query_emb.transpose(0, 1), all_pos.transpose(0, 1)
            in_batch_loss = infonce(q_by_exit, pos_by_exit, targets, self.temperature, **options)
        else:
            in_batch_loss = infonce(query_emb, all_pos, targets, self.temperature, **options)
        return LossOutput(hard + in_batch_loss, hard, in_batch_loss)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, mask_margin={self.mask_margin}, "
            f"in_batch_gradient={self.in_batch_gradient}, equal_batches={self.equal_batches}, "
            f"matryoshka_dims={self.matryoshka_dims}"
        )
