"""InfoNCELoss and F2LLMLoss (single process) against losses written with F.cross_entropy, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from f2llm import distributed
from f2llm.kernels import infonce_reference
from f2llm.loss import F2LLMLoss, InfoNCELoss, LossOutput


def embeddings(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def test_infonce_loss_is_cross_entropy_drop_in() -> None:
    q, c = embeddings(7, 16, seed=0), embeddings(11, 16, seed=1)
    targets = torch.tensor([3, 0, 10, 5, -100, 5, 1])
    got = InfoNCELoss(temperature=0.07)(q, c, targets)
    want = F.cross_entropy(q @ c.T / 0.07, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(grads(got, q, c), grads(want, q, c), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_infonce_loss_mask_margin_and_ignore_index() -> None:
    q, c = embeddings(6, 8, seed=2), embeddings(9, 8, seed=3)
    targets = torch.tensor([0, 1, 2, -1, 4, 5])
    got = InfoNCELoss(temperature=0.05, mask_margin=0.1, ignore_index=-1)(q, c, targets)
    want = infonce_reference(q, c, targets, 0.05, mask_margin=0.1, ignore_index=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def f2llm_by_definition(q, pos, neg, temperature: float, in_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, in_batch) of the F2LLM recipe with plain cross-entropy."""
    docs = torch.cat([pos[:, None], neg], 1)
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    hard = F.cross_entropy(torch.einsum("bd,bgd->bg", q, docs) / temperature, zeros)
    if not in_batch:
        return hard, torch.zeros((), dtype=q.dtype)
    return hard, F.cross_entropy(q @ pos.T / temperature, torch.arange(q.shape[0]))


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("k", [0, 3])
def test_f2llm_loss_matches_definition(in_batch: bool, k: int) -> None:
    B, D = 5, 16
    q, pos, neg = embeddings(B, D, seed=4), embeddings(B, D, seed=5), embeddings(B, k, D, seed=6)
    out = F2LLMLoss(temperature=0.05)(q, pos, neg, in_batch=in_batch)
    assert isinstance(out, LossOutput) and all(t.dim() == 0 for t in out)
    hard, in_batch_loss = f2llm_by_definition(q, pos, neg, 0.05, in_batch)
    torch.testing.assert_close(out.hard, hard, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.in_batch, in_batch_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.total, hard + in_batch_loss, rtol=1e-12, atol=1e-15)
    inputs = (q, pos, neg) if k else (q, pos)
    for g, w in zip(grads(out.total, *inputs), grads(hard + in_batch_loss, *inputs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_hard_negatives_are_not_in_batch_negatives() -> None:
    q, pos = embeddings(4, 8, seed=7), embeddings(4, 8, seed=8)
    loss = F2LLMLoss()
    a = loss(q, pos, embeddings(4, 2, 8, seed=9), in_batch=True)
    b = loss(q, pos, embeddings(4, 2, 8, seed=10), in_batch=True)
    assert a.in_batch.item() == b.in_batch.item()
    assert a.hard.item() != b.hard.item()


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((4, 8), (3, 8), (4, 2, 8)), "query_emb and pos_emb must both be"),
        (((4, 8), (4, 8), (4, 8)), "neg_emb must be"),
        (((4, 8), (4, 8), (4, 2, 7)), "neg_emb must be"),
    ],
)
def test_f2llm_loss_shape_errors(shapes, message) -> None:
    q, pos, neg = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        F2LLMLoss()(q, pos, neg, in_batch=True)


def test_distributed_helpers_without_process_group() -> None:
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather_sizes(5, torch.device("cpu")) == [5]
    x = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(x) is x


def test_equal_batches_skip_the_size_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """equal_batches=True (the trainer's: its sampler gives every rank the same batch size): the loss never asks the
    ranks for their sizes, and gives the same result."""
    q, pos, neg = embeddings(4, 8, seed=1), embeddings(4, 8, seed=2), embeddings(4, 2, 8, seed=3)
    want = F2LLMLoss()(q, pos, neg, in_batch=True)

    def exchange(*args, **kwargs):
        raise AssertionError("sizes exchanged")

    monkeypatch.setattr(distributed, "all_gather_sizes", exchange)
    got = F2LLMLoss(equal_batches=True)(q, pos, neg, in_batch=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(AssertionError, match="sizes exchanged"):
        F2LLMLoss()(q, pos, neg, in_batch=True)


def test_queries_only_gives_positives_the_hard_gradient_alone() -> None:
    """in_batch_gradient='queries_only' (the official v1 code): the in-batch term's gradient reaches the queries,
    not the positives, which learn from the hard term only; the loss value is unchanged."""
    B, D, k = 6, 16, 2
    q, pos, neg = embeddings(B, D, seed=7), embeddings(B, D, seed=8), embeddings(B, k, D, seed=9)
    out = F2LLMLoss(temperature=0.05, in_batch_gradient="queries_only")(q, pos, neg, in_batch=True)
    hard, in_batch_full = f2llm_by_definition(q, pos, neg, 0.05, True)
    in_batch_detached = F.cross_entropy(q @ pos.detach().T / 0.05, torch.arange(B))
    torch.testing.assert_close(out.total, hard + in_batch_full, rtol=1e-12, atol=1e-15)
    dq, dpos, dneg = grads(out.total, q, pos, neg)
    want_q, want_neg = torch.autograd.grad(hard + in_batch_detached, (q, neg), retain_graph=True)
    (hard_pos,) = torch.autograd.grad(hard, pos)
    torch.testing.assert_close(dq, want_q, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dpos, hard_pos, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dneg, want_neg, rtol=1e-10, atol=1e-13)
    # Guard: the in-batch term does send positives gradient under the default.
    full = F2LLMLoss(temperature=0.05)(q, pos, neg, in_batch=True)
    assert not torch.allclose(grads(full.total, pos)[0], dpos)
    with pytest.raises(ValueError, match="in_batch_gradient must be 'full' or 'queries_only'"):
        F2LLMLoss(in_batch_gradient="none")
