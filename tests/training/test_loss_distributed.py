"""Two torchrun ranks (gloo) x B/2 queries give the single-process F2LLM loss and gradients of all B queries.

Gradient semantics under test: each rank backpropagates its local mean loss; all_gather_with_grad sums, over
ranks, the gradient every rank's loss sends to each gathered positive. DDP then averages over the W ranks, so
(rank's gradient) / W must equal the gradient of the single-process loss over the global batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from f2llm.distributed import free_port
from f2llm.loss import F2LLMLoss
from tests.helpers import HANG_BOUND, training_env

WORKER = Path(__file__).with_name("dist_loss_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("dist_loss")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(out)]  # fmt: skip
    env = training_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return torch.load(out / "inputs.pt"), [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(rank_results) -> None:
    batch, ranks = rank_results
    assert all(r["world"] == WORLD for r in ranks)
    full = {name: t.clone().requires_grad_() for name, t in batch.items()}
    out = F2LLMLoss(0.05)(full["query"], full["pos"], full["neg"], in_batch=True)
    out.total.backward()
    # Loss: the mean over ranks of the local means is the global mean (equal local batch sizes).
    for term in ("total", "hard", "in_batch"):
        mean_over_ranks = sum(r[term] for r in ranks) / WORLD
        torch.testing.assert_close(mean_over_ranks, getattr(out, term).detach(), rtol=1e-6, atol=1e-6)
    # Gradients: every rank's rows, averaged over ranks as DDP does, equal the single-process gradients,
    # including positives' gradients that come from the other rank's queries through the gather.
    for name in ("query", "pos", "neg"):
        distributed_grad = torch.cat([r["grads"][name] for r in ranks]) / WORLD
        torch.testing.assert_close(distributed_grad, full[name].grad, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_all_gather_with_grad_unequal_sizes(rank_results) -> None:
    _, ranks = rank_results
    # Rank r held r + 1 rows: arange((r + 1) * 3).reshape(r + 1, 3) + 100 r.
    want = torch.cat([torch.arange((r + 1) * 3, dtype=torch.float64).reshape(r + 1, 3) + 100 * r for r in range(WORLD)])
    weights = torch.arange(want.numel(), dtype=torch.float64).reshape(want.shape)
    offset = 0
    for r, result in enumerate(ranks):
        torch.testing.assert_close(result["unequal"]["gathered"], want, rtol=0, atol=0)
        # Rank r' weighs gathered rows by (r' + 1) * weights: rank r's rows get the sum over r' of those weights.
        rows = slice(offset, offset + r + 1)
        want_grad = weights[rows] * sum(rp + 1 for rp in range(WORLD))
        torch.testing.assert_close(result["unequal"]["grad"], want_grad, rtol=0, atol=0)
        offset += r + 1


@pytest.mark.slow
@pytest.mark.distributed
def test_queries_only_on_two_ranks(rank_results) -> None:
    """queries_only (the official v1 code): no positive, local or on the other rank, gets in-batch gradient; the
    queries' gradient is the full one; the loss value is unchanged."""
    batch, ranks = rank_results
    full = {name: t.clone().requires_grad_() for name, t in batch.items()}
    q, pos, neg = full["query"], full["pos"], full["neg"]
    logits_hard = torch.einsum("bd,bgd->bg", q, torch.cat([pos[:, None], neg], 1)) / 0.05
    hard = torch.nn.functional.cross_entropy(logits_hard, torch.zeros(q.shape[0], dtype=torch.long))
    in_batch = torch.nn.functional.cross_entropy(q @ pos.detach().T / 0.05, torch.arange(q.shape[0]))
    (hard + in_batch).backward()
    mean_over_ranks = sum(r["queries_only"]["total"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_over_ranks, (hard + in_batch).detach(), rtol=1e-6, atol=1e-6)
    for name in ("query", "pos", "neg"):
        distributed_grad = torch.cat([r["queries_only"]["grads"][name] for r in ranks]) / WORLD
        torch.testing.assert_close(distributed_grad, full[name].grad, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["full", "queries_only"])
def test_matryoshka_on_two_ranks_equals_one_process(rank_results, mode: str) -> None:
    """With Matryoshka levels the positives are gathered once at full D and truncated inside the op: per-rank terms
    average to the global batch's, and the rank gradients averaged as DDP does equal those of the global-batch
    loss written from the formula (float64), for the in-batch term with gradient to positives and queries_only."""
    from tests.training.dist_loss_worker import MATRYOSHKA_DIMS
    from tests.training.test_matryoshka_loss import reference_terms

    batch, ranks = rank_results
    full = {name: t.double().requires_grad_() for name, t in batch.items()}
    q, pos, neg = full["query"], full["pos"], full["neg"]
    candidates = pos if mode == "full" else pos.detach()
    hard, in_batch = reference_terms(q, pos, neg, MATRYOSHKA_DIMS, True, positives_for_in_batch=candidates)
    (hard + in_batch).backward()
    results = [r["matryoshka"][mode] for r in ranks]
    for term, want in (("total", hard + in_batch), ("hard", hard), ("in_batch", in_batch)):
        mean_over_ranks = sum(r[term].double() for r in results) / WORLD
        torch.testing.assert_close(mean_over_ranks, want.detach(), rtol=1e-5, atol=1e-6)
    for name in ("query", "pos", "neg"):
        distributed_grad = torch.cat([r["grads"][name] for r in results]).double() / WORLD
        torch.testing.assert_close(distributed_grad, full[name].grad, rtol=1e-5, atol=1e-6)
