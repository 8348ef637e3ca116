"""Low-rank token embeddings (ML-Embed's embedding-rank Matryoshka, "MEL"): the embedding matrix ``W`` [vocab, H]
trained as ``U @ V`` (``U`` [vocab, r], ``V`` [r, H]) from its truncated SVD, ``U`` scaled by the singular values.

With sampled ranks (``model.sample_embedding_rank``) each step uses the first k factors, ``U[:, :k] @ V[:k]``, k
drawn from ML-Embed's ranks ``64, 128, 256, ... <= r`` plus r, with probability proportional to k, so that one
model serves at every rank. The draw is a function of (seed, step): every process, and both passes of the
gradient cache, use the same k.

Only the looked-up rows are computed (``U[ids, :k] @ V[:k]``): the same values as indexing the product
``(U[:, :k] @ V[:k])[ids]``, without building a [vocab, H] matrix every step. A saved model holds ``U @ V`` as its
embedding matrix (any transformers / sentence-transformers loader reads it) and the factors beside it
(:data:`FACTORS_FILE`), from which a later run with the same rank continues.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FACTORS_FILE = "embedding_factors.safetensors"
ML_EMBED_RANKS = tuple(2**i for i in range(6, 15))  # 64 ... 16384, ML-Embed's list before its cut at r


class LowRankEmbedding(nn.Module):
    """``nn.Embedding``'s lookup with the weight ``U[:, :rank] @ V[:rank]``; ``rank`` (at most ``U``'s width) is
    the rank the next forward uses."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"LowRankEmbedding: U [vocab, r] and V [r, H] expected, got {tuple(U.shape)} and {tuple(V.shape)}"
            )
        self.U = nn.Parameter(U)
        self.V = nn.Parameter(V)
        self.padding_idx = padding_idx
        self.rank = U.shape[1]

    @property
    def max_rank(self) -> int:
        return self.U.shape[1]

    @property
    def embedding_dim(self) -> int:
        return self.V.shape[1]

    @property
    def num_embeddings(self) -> int:
        return self.U.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The embedding matrix at the current rank, [vocab, H] (built on each access: for saving and inspection;
        the forward never builds it)."""
        return self.U[:, : self.rank] @ self.V[: self.rank]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.U[:, : self.rank]) @ self.V[: self.rank]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank} of {self.max_rank}"

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
        """Factors of ``embedding.weight`` from its SVD (float64, on the weight's device), truncated at ``rank``:
        ``U = u[:, :r] diag(s[:r])``, ``V = v^T[:r]``, in the weight's dtype. At full rank ``U @ V`` is the weight up
        to rounding; below, its best rank-r approximation."""
        weight = embedding.weight.detach()
        u, s, vt = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        # Contiguous: LAPACK's factors come column-major; engines flatten parameters (DeepSpeed views them as bytes).
        U = (u[:, :rank] * s[:rank]).to(weight.dtype).contiguous()
        V = vt[:rank].to(weight.dtype).contiguous()
        return cls(U, V, getattr(embedding, "padding_idx", None))

    @classmethod
    def load(cls, folder: str | Path, rank: int, like: nn.Embedding) -> LowRankEmbedding | None:
        """The factors a run saved in ``folder`` when they have rank ``rank`` and ``like``'s shape, else None."""
        path = Path(folder) / FACTORS_FILE
        if not path.is_file():
            return None
        factors = load_file(str(path))
        U, V = factors["U"], factors["V"]
        if U.shape != (like.num_embeddings, rank) or V.shape != (rank, like.embedding_dim):
            return None
        dtype, device = like.weight.dtype, like.weight.device
        return cls(U.to(device, dtype), V.to(device, dtype), getattr(like, "padding_idx", None))

    def save_factors(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        U, V = (p.detach().to("cpu", dtype or p.dtype).contiguous() for p in (self.U, self.V))
        save_file({"U": U, "V": V}, str(Path(folder) / FACTORS_FILE))


def sampled_ranks(rank: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """ML-Embed's ranks for a model factorized at ``rank`` (64, 128, ... below it, and ``rank``), descending, and
    their probabilities, proportional to the rank."""
    ranks = sorted({k for k in ML_EMBED_RANKS if k <= rank} | {rank}, reverse=True)
    total = sum(ranks)
    return tuple(ranks), tuple(k / total for k in ranks)


def rank_of_step(rank: int, seed: int, step: int) -> int:
    """The rank step ``step`` trains with (the same on every process and in both gradient-cache passes)."""
    ranks, weights = sampled_ranks(rank)
    return random.Random(f"f2llm-embedding-rank:{seed}:{step}").choices(ranks, weights=weights)[0]


def factorize(model: nn.Module, rank: int, where: str, resume_from: str | Path | None = None) -> LowRankEmbedding:
    """Replace ``model``'s input embeddings by their rank-``rank`` factors (read from ``resume_from`` when a run
    saved factors of that rank there, else from the SVD); refuses a rank above the embedding's width."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, LowRankEmbedding):
        raise ValueError(f"model.embedding_rank: the input embeddings of {where} are already factorized")
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"model.embedding_rank: the input embeddings of {where} are {type(embedding).__name__}, not nn.Embedding"
        )
    width = min(embedding.num_embeddings, embedding.embedding_dim)
    if not 1 <= rank <= width:
        raise ValueError(
            f"model.embedding_rank: {rank} is not in [1, {width}] (the embedding matrix of {where} is "
            f"{embedding.num_embeddings} x {embedding.embedding_dim}); lower it or set null"
        )
    low_rank = None if resume_from is None else LowRankEmbedding.load(resume_from, rank, embedding)
    if low_rank is None:
        low_rank = LowRankEmbedding.from_embedding(embedding, rank)
    model.set_input_embeddings(low_rank)
    return low_rank


def materialized_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with its low-rank embedding's factors replaced by the full-rank matrix ``U @ V``
    under the name an ``nn.Embedding`` has there (``...embed_tokens.weight``), on the CPU; None when the model's
    embeddings are not factorized."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, LowRankEmbedding):
        return None
    prefix = next(name for name, module in model.named_modules() if module is embedding)
    state = {}
    for key, value in model.state_dict().items():
        if key in (f"{prefix}.U", f"{prefix}.V"):
            continue
        state[key] = value.detach().to("cpu", dtype) if dtype is not None and value.is_floating_point() else value
    with torch.no_grad():
        full = embedding.U.detach().double() @ embedding.V.detach().double()
    state[f"{prefix}.weight"] = full.to("cpu", dtype or embedding.U.dtype)
    return state
