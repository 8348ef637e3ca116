"""infonce over several problems at once (``q`` [E, B, D] against ``c`` [E, N, D], one target list): the layer exits
of ML-Embed's in-batch term. Against the float64 definition taken problem by problem (the mean over e of
``infonce_reference(q[e], c[e])``, and of the Matryoshka reference), loss and both gradients, on the Triton
(interpreter) and PyTorch paths: single level and Matryoshka, odd shapes, B = 1, ignored queries, the margin, small
tiles (split forward programs, several backward chunks and query tiles), bf16. E = 1 is the 2-D call exactly, and the
Triton path launches as many kernels for E problems as for one."""

from __future__ import annotations

import pytest
import torch

from f2llm.kernels import (
    InfoNCEConfig,
    contrastive,
    infonce,
    infonce_reference,
    matryoshka,
    matryoshka_infonce_reference,
    matryoshka_levels,
    utils,
)

BACKENDS = ["torch", "triton"]
# Several query / candidate tiles, D steps, 2 split forward programs and 5 backward chunks of 8 candidates.
SMALL_TILES = InfoNCEConfig(block_b=16, block_n=16, block_d=16, splits_n=2, chunk_n=8)


def make_inputs(E: int, B: int, N: int, D: int, seed: int):
    """Unnormalized q [E, B, D] and c [E, N, D] (rows of different norms), targets [B] with two ignored."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(E, B, D, generator=g) * torch.rand(E, B, 1, generator=g).add(0.5)
    c = torch.randn(E, N, D, generator=g) * torch.rand(E, N, 1, generator=g).add(0.5)
    t = torch.randint(0, N, (B,), generator=g)
    if B > 3:
        t[[0, 3]] = -100
    return q, c, t


def reference(q, c, t, temperature, dims, mask_margin=None):
    """Mean over problems of the float64 definition of each one (a loop, as ML-Embed computes its exits)."""
    rq, rc = q.double().requires_grad_(), c.double().requires_grad_()
    if dims is None:
        terms = [infonce_reference(rq[e], rc[e], t, temperature, mask_margin=mask_margin) for e in range(len(q))]
    else:
        levels = matryoshka_levels(q.shape[-1], dims)
        terms = [
            matryoshka_infonce_reference(rq[e], rc[e], t, temperature, *levels, mask_margin=mask_margin)
            for e in range(len(q))
        ]
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.detach(), rq.grad, rc.grad


def ours(q, c, t, temperature, dims, **kwargs):
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss = infonce(qq, cc, t, temperature, matryoshka_dims=dims, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, cc.grad


def assert_matches(got, want, tol: float) -> None:
    loss_err = abs(got[0].item() - want[0].item()) / max(abs(want[0].item()), 1.0)
    errs = {"loss": loss_err}
    for name, x, ref in (("dq", got[1], want[1]), ("dc", got[2], want[2])):
        errs[name] = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()  # a masked-out B = 1: 0
    assert all(err < tol for err in errs.values()), f"relative errors {errs} (tolerance {tol:g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize(("E", "B", "N", "D"), [(3, 13, 29, 40), (2, 1, 5, 40), (7, 6, 11, 40)])
def test_problems_match_reference(backend, dims, margin, E, B, N, D) -> None:
    q, c, t = make_inputs(E, B, N, D, seed=E + B + N)
    temperature = 0.5 if dims is None else 0.05
    got = ours(q, c, t, temperature, dims, backend=backend, mask_margin=margin)
    assert_matches(got, reference(q, c, t, temperature, dims, mask_margin=margin), 1e-5)


@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
def test_problems_small_tiles(dims) -> None:
    q, c, t = make_inputs(3, 21, 37, 40, seed=5)
    temperature = 0.5 if dims is None else 0.05
    for margin in (None, 0.05):
        got = ours(q, c, t, temperature, dims, backend="triton", config=SMALL_TILES, mask_margin=margin)
        assert_matches(got, reference(q, c, t, temperature, dims, mask_margin=margin), 1e-5)


@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
def test_problems_torch_row_blocks(dims, monkeypatch) -> None:
    monkeypatch.setattr(utils, "_TORCH_TILE_ELEMENTS", 64 * 6)  # several query row blocks per problem
    q, c, t = make_inputs(3, 21, 37, 40, seed=6)
    temperature = 0.5 if dims is None else 0.05
    got = ours(q, c, t, temperature, dims, backend="torch")
    assert_matches(got, reference(q, c, t, temperature, dims), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [None, (16, 40)], ids=["one-level", "matryoshka"])
def test_problems_bf16(backend, dims) -> None:
    q, c, t = make_inputs(3, 12, 25, 72, seed=8)
    q, c = q.bfloat16(), c.bfloat16()
    temperature = 0.5 if dims is None else 0.05
    loss, dq, dc = got = ours(q, c, t, temperature, dims, backend=backend)
    assert loss.dtype == torch.float32 and dq.dtype == torch.bfloat16 and dc.dtype == torch.bfloat16
    assert_matches(got, reference(q, c, t, temperature, dims), 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
def test_one_problem_is_the_2d_call_exactly(backend, dims) -> None:
    q, c, t = make_inputs(1, 13, 29, 40, seed=9)
    three = ours(q, c, t, 0.05, dims, backend=backend)
    two = ours(q[0], c[0], t, 0.05, dims, backend=backend)
    assert torch.equal(three[0], two[0])
    assert torch.equal(three[1][0], two[1]) and torch.equal(three[2][0], two[2])


@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
def test_ignored_queries_get_no_gradient_in_any_problem(dims) -> None:
    q, c, t = make_inputs(3, 9, 14, 40, seed=7)
    for backend in BACKENDS:
        loss, dq, dc = ours(q, c, t, 0.05, dims, backend=backend)
        assert torch.count_nonzero(dq[:, [0, 3]]) == 0
        loss, dq, dc = ours(q, c, torch.full((9,), -100), 0.05, dims, backend=backend)
        assert loss.item() == 0.0 and torch.count_nonzero(dq) == 0 and torch.count_nonzero(dc) == 0


class _Launches:
    """A Triton kernel whose launches are counted (``kernel[grid](...)``), delegating to the real one."""

    def __init__(self, kernel, counts: dict[str, int], name: str) -> None:
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.mark.parametrize("dims", [None, (8, 24)], ids=["one-level", "matryoshka"])
def test_problems_share_every_launch(dims, monkeypatch) -> None:
    """E problems cost the kernel launches of one: the problem is a grid axis of every kernel, not a loop."""
    kernels = {
        contrastive: ["_infonce_fwd_kernel", "_infonce_bwd_probs_kernel", "scaled_matmul"],
        matryoshka: ["_mrl_fwd_kernel", "_mrl_bwd_probs_kernel", "scaled_matmul"],
    }
    counts: dict[str, int] = {}
    for module, names in kernels.items():
        for name in names:
            if name == "scaled_matmul":
                monkeypatch.setattr(
                    utils, "_scaled_matmul_kernel", _Launches(utils._scaled_matmul_kernel, counts, name)
                )
            else:
                monkeypatch.setattr(module, name, _Launches(getattr(module, name), counts, name))

    def launches(E: int) -> dict[str, int]:
        counts.clear()
        q, c, t = make_inputs(E, 13, 29, 40, seed=E)
        ours(q, c, t, 0.05, dims, backend="triton", config=SMALL_TILES)
        return dict(counts)

    one = launches(1)
    assert one and all(n > 0 for n in one.values()), one
    assert launches(5) == one
