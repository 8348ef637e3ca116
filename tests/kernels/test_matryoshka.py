"""Matryoshka infonce / grouped_infonce against the float64 definition (one full loss per level on re-normalized
prefixes): loss and gradients, Triton (interpreter) and PyTorch paths, odd D, dims not dividing the tiles, ignored
queries, false-negative masking, several backward chunks, bf16; the level resolution and its errors; and the
fused PyTorch path's matmul FLOPs (one level's worth, not L)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from f2llm.kernels import (
    InfoNCEConfig,
    grouped_infonce,
    infonce,
    matryoshka,
    matryoshka_grouped_infonce_reference,
    matryoshka_infonce_reference,
    matryoshka_levels,
    utils,
)

BACKENDS = ["torch", "triton"]
# Small tiles: several query / candidate tiles, D steps, split forward programs and backward chunks.
SMALL_TILES = InfoNCEConfig(block_b=16, block_n=16, block_d=16, splits_n=2, chunk_n=8)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def loss_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative to max(|ref|, 1), as in test_contrastive (a loss near 0 is a difference of large log-sum-exps)."""
    return abs(x.item() - ref.item()) / max(abs(ref.item()), 1.0) if torch.isfinite(x) else float("inf")


def make_inputs(B: int, N: int, D: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Unnormalized q [B, D], c [N, D] (rows of different norms: every level must normalize) and targets."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, D, generator=g) * torch.rand(B, 1, generator=g).add(0.5)).to(dtype)
    c = (torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g).add(0.5)).to(dtype)
    return q, c, torch.randint(0, N, (B,), generator=g)


def reference(q, c, targets, dims, temperature=0.05, **kwargs):
    levels = matryoshka_levels(q.shape[1], dims)
    rq, rc = q.double().requires_grad_(), c.double().requires_grad_()
    loss = matryoshka_infonce_reference(rq, rc, targets, temperature, *levels, **kwargs)
    loss.backward()
    return loss.detach(), rq.grad, rc.grad


def ours(q, c, targets, dims, temperature=0.05, **kwargs):
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss = infonce(qq, cc, targets, temperature, matryoshka_dims=dims, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, cc.grad


def assert_matches(got, want, tol: float) -> None:
    errs = {"loss": loss_err(got[0], want[0]), "dq": rel_err(got[1], want[1]), "dc": rel_err(got[2], want[2])}
    for name, err in errs.items():
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g} ({errs})"


# ------------------------------------------------------------------------------------------------ levels
def test_levels_v2_defaults() -> None:
    dims, weights = matryoshka_levels(1024)
    assert dims == (1024, 512, 256, 128, 64, 32, 16, 8)
    # n-th level (1-based) weighs 1 / (n sqrt(1024 / d)): 1, 1/(2 sqrt 2), 1/(3 * 2), 1/(4 sqrt 8), ...
    assert weights == pytest.approx([1.0, 1 / (2 * 2**0.5), 1 / 6, 1 / (4 * 8**0.5), 1 / 20, 1 / (6 * 32**0.5),
                                     1 / 56, 1 / (8 * 128**0.5)], rel=1e-12)  # fmt: skip
    assert matryoshka_levels(2560)[0] == (2560, 2048, 1024, 512, 256, 128, 64, 32, 16, 8)
    assert matryoshka_levels(8) == ((8,), (1.0,))
    assert matryoshka_levels(40)[0] == (40, 32, 16, 8)


def test_levels_given_dims_and_weights() -> None:
    dims, weights = matryoshka_levels(40, [8, 24])
    assert dims == (40, 24, 8)
    assert weights == pytest.approx([1.0, 1 / (2 * math.sqrt(40 / 24)), 1 / (3 * math.sqrt(5))], rel=1e-12)
    assert matryoshka_levels(40, [64, 40, 8, 8])[0] == (40, 8)  # >= D dropped, D added once, duplicates merged
    assert matryoshka_levels(40, [8, 40], [0.5, 2.0]) == ((40, 8), (2.0, 0.5))  # weights follow their dims
    resolved = matryoshka_levels(72)
    assert matryoshka_levels(72, *resolved) == resolved  # resolved levels pass through unchanged


@pytest.mark.parametrize(
    ("dims", "weights", "match"),
    [
        ([0, 8], None, "positive integers"),
        ([8, -4], None, "positive integers"),
        ([8.5], None, "positive integers"),
        ([True], None, "positive integers"),
        ([], None, "empty"),
        ([8, 16], [1.0], "one weight per dim"),
        ([8, 16], [1.0, 0.5], "must include the full size D = 40"),
        ([8, 40], [float("nan"), 1.0], "finite and > 0"),
        ([8, 40], [-1.0, 1.0], "finite and > 0"),
        ([8, 8, 40], [1.0, 0.5, 1.0], "given twice"),
    ],
)
def test_levels_errors(dims, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        matryoshka_levels(40, dims, weights)


def test_public_ops_refuse_bad_levels() -> None:
    q, c, t = make_inputs(3, 4, 40)
    with pytest.raises(ValueError, match=r"infonce: matryoshka_dims / matryoshka_weights: .*positive integers"):
        infonce(q, c, t, matryoshka_dims=[0])
    with pytest.raises(ValueError, match="matryoshka_weights given without matryoshka_dims"):
        infonce(q, c, t, matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="grouped_infonce: matryoshka_dims"):
        grouped_infonce(q, c[None].expand(3, 4, 40), matryoshka_dims=[8, 16], matryoshka_weights=[1.0])


# ------------------------------------------------------------------------------------------------ references
def test_reference_is_weighted_sum_of_cross_entropies() -> None:
    q, c, t = make_inputs(6, 9, 40, torch.float64, seed=1)
    t[2] = -100
    want = 0.0
    for d, w in ((40, 1.0), (24, 0.3), (8, 0.2)):
        qn = q[:, :d] / q[:, :d].norm(dim=1, keepdim=True)
        cn = c[:, :d] / c[:, :d].norm(dim=1, keepdim=True)
        want += w * F.cross_entropy(qn @ cn.T / 0.05, t, ignore_index=-100)
    got = matryoshka_infonce_reference(q, c, t, 0.05, (40, 24, 8), (1.0, 0.3, 0.2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    docs = torch.randn(6, 3, 40, dtype=torch.float64)
    want = 0.0
    for d, w in ((40, 1.0), (8, 0.5)):
        qn = q[:, :d] / q[:, :d].norm(dim=1, keepdim=True)
        dn = docs[..., :d] / docs[..., :d].norm(dim=-1, keepdim=True)
        want += w * F.cross_entropy(torch.einsum("bd,bgd->bg", qn, dn) / 0.05, torch.zeros(6, dtype=torch.long))
    got = matryoshka_grouped_infonce_reference(q, docs, 0.05, (40, 8), (1.0, 0.5))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ infonce
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize(
    ("B", "N", "D", "dims"),
    [(1, 5, 40, (8, 24)), (13, 29, 40, (8, 24)), (9, 17, 72, None), (11, 21, 100, (12,))],
    ids=["B1", "dims-8-24-40", "D72-v2-defaults", "D100-dim12"],
)
def test_infonce_matches_reference(backend, margin, B, N, D, dims) -> None:
    q, c, t = make_inputs(B, N, D, seed=B + N)
    if B > 3:
        t[[0, 3]] = -100
    got = ours(q, c, t, dims if dims is not None else matryoshka_levels(D)[0], backend=backend, mask_margin=margin)
    want = reference(q, c, t, dims, mask_margin=margin)
    assert got[0].dtype == torch.float32
    assert_matches(got, want, 1e-5)


def test_margin_masks_per_level() -> None:
    # A margin this tight drops candidates at some levels and not others: the masked loss differs from the
    # unmasked one, and the kernels agree with the reference on it (the test above), so masking is per level.
    q, c, t = make_inputs(13, 29, 40, seed=3)
    masked = reference(q, c, t, (8, 24), mask_margin=0.05)[0]
    plain = reference(q, c, t, (8, 24))[0]
    assert masked < plain - 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_chunks_and_row_blocks(backend, monkeypatch) -> None:
    q, c, t = make_inputs(21, 37, 40, seed=5)
    t[[1, 7]] = -100
    kwargs = {"backend": backend}
    if backend == "triton":
        kwargs["config"] = SMALL_TILES  # 5 backward chunks of 8 candidates, 2 forward splits, 2 query tiles
    else:
        monkeypatch.setattr(utils, "_TORCH_TILE_ELEMENTS", 64 * 6)  # several query row blocks
    for margin in (None, 0.05):
        got = ours(q, c, t, (8, 24), mask_margin=margin, **kwargs)
        assert_matches(got, reference(q, c, t, (8, 24), mask_margin=margin), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_full_level_is_infonce_on_normalized_inputs(backend) -> None:
    q, c, t = make_inputs(10, 19, 40, seed=6)
    got = ours(q, c, t, (40,), backend=backend)
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    want = infonce(F.normalize(qq, dim=-1), F.normalize(cc, dim=-1), t, backend="torch")
    want.backward()
    assert_matches(got, (want.detach(), qq.grad, cc.grad), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_queries(backend) -> None:
    q, c, t = make_inputs(9, 14, 40, seed=7)
    t[[2, 5]] = -1
    got = ours(q, c, t, (8, 24), ignore_index=-1, backend=backend)
    assert_matches(got, reference(q, c, t, (8, 24), ignore_index=-1), 1e-5)
    assert torch.count_nonzero(got[1][[2, 5]]) == 0, "ignored queries must get exactly zero gradient"
    loss, dq, dc = ours(q, c, torch.full((9,), -100), (8, 24), backend=backend)
    assert loss.item() == 0.0 and torch.count_nonzero(dq) == 0 and torch.count_nonzero(dc) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend) -> None:
    q, c, t = make_inputs(12, 25, 72, torch.bfloat16, seed=8)
    loss, dq, dc = got = ours(q, c, t, (16, 40), backend=backend)
    assert loss.dtype == torch.float32 and dq.dtype == torch.bfloat16 and dc.dtype == torch.bfloat16
    assert_matches(got, reference(q, c, t, (16, 40)), 2e-2)


def test_float64_torch_path() -> None:
    q, c, t = make_inputs(7, 11, 40, torch.float64, seed=9)
    got = ours(q, c, t, (8, 24), 1.0, backend="torch", mask_margin=0.1)
    assert got[0].dtype == torch.float64
    assert_matches(got, reference(q, c, t, (8, 24), 1.0, mask_margin=0.1), 1e-10)


class MatmulFlops(TorchDispatchMode):
    """Counts 2 M K N per matrix product, in-place ones included (FlopCounterMode misses addmm_)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_torch_path_costs_one_level_of_matmul_flops() -> None:
    # Fused: 2BND for the scores (segment matmuls accumulate), 2BND per gradient (one GEMM per segment), whatever
    # the number of levels. Level by level it would be sum_l 6 B N d_l (about 2x this at v2's levels).
    B, N, D = 16, 32, 64
    q, c, t = make_inputs(B, N, D, seed=10)
    dims = matryoshka_levels(D)[0]
    assert len(dims) == 4
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    with MatmulFlops() as counter:
        infonce(qq, cc, t, matryoshka_dims=dims, backend="torch").backward()
    assert counter.flops == 6 * B * N * D


# ------------------------------------------------------------------------------------------------ grouped
def grouped_reference(q, docs, dims, temperature=0.05):
    levels = matryoshka_levels(q.shape[1], dims)
    rq, rd = q.double().requires_grad_(), docs.double().requires_grad_()
    loss = matryoshka_grouped_infonce_reference(rq, rd, temperature, *levels)
    loss.backward()
    return loss.detach(), rq.grad, rd.grad


def grouped_ours(q, docs, dims, temperature=0.05, **kwargs):
    qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
    loss = grouped_infonce(qq, dd, temperature, matryoshka_dims=dims, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, dd.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("B", "G", "D", "dims", "dtype", "tol"),
    [
        (1, 1, 40, (8, 24), torch.float32, 1e-5),
        (7, 5, 40, (8, 24), torch.float32, 1e-5),
        (6, 8, 72, None, torch.float32, 1e-5),
        (5, 3, 100, (12,), torch.float32, 1e-5),
        (6, 8, 72, (16, 40), torch.bfloat16, 2e-2),
    ],
    ids=["B1-G1", "dims-8-24-40", "D72-v2-defaults", "D100-dim12", "bf16"],
)
def test_grouped_matches_reference(backend, B, G, D, dims, dtype, tol) -> None:
    g = torch.Generator().manual_seed(B * G)
    q = (torch.randn(B, D, generator=g) * 2).to(dtype)
    docs = (torch.randn(B, G, D, generator=g) * torch.rand(B, G, 1, generator=g).add(0.5)).to(dtype)
    got = grouped_ours(q, docs, dims if dims is not None else matryoshka_levels(D)[0], backend=backend)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert_matches(got, grouped_reference(q, docs, dims), tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_single_full_level_is_grouped_infonce_on_normalized_inputs(backend) -> None:
    g = torch.Generator().manual_seed(11)
    q, docs = torch.randn(5, 40, generator=g), torch.randn(5, 4, 40, generator=g)
    got = grouped_ours(q, docs, (40,), backend=backend)
    qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
    want = grouped_infonce(F.normalize(qq, dim=-1), F.normalize(dd, dim=-1), backend="torch")
    want.backward()
    assert_matches(got, (want.detach(), qq.grad, dd.grad), 1e-5)


@pytest.mark.parametrize("temperature", [0.02, 0.05])
def test_torch_path_temperatures_and_row_blocks(temperature, monkeypatch) -> None:
    # The PyTorch path shifts the logits by 1/T when exp cannot underflow over their +-1/T range (T = 0.05) and by
    # the row maximum otherwise (T = 0.02); both against the float64 definition, over several row blocks (3 query
    # rows per block, the last one shorter) with ignored queries and an 8-wide segment (transposed gradient GEMMs).
    q, c, t = make_inputs(11, 29, 40, seed=13)
    t[[0, 6]] = -100
    monkeypatch.setattr(utils, "_TORCH_TILE_ELEMENTS", 29 * 4 * 3 // 2)
    assert matryoshka._torch_mrl_block_rows(29, 2) == 3
    for margin in (None, 0.05):
        got = ours(q, c, t, (8, 24), temperature, backend="torch", mask_margin=margin)
        assert_matches(got, reference(q, c, t, (8, 24), temperature, mask_margin=margin), 1e-5)


def test_torch_path_high_cosines_small_temperature() -> None:
    # Near-duplicate candidates: logits close to 1/T = 100, where exp without a shift would overflow in float32.
    g = torch.Generator().manual_seed(14)
    base = torch.randn(1, 40, generator=g)
    q = base + 0.01 * torch.randn(6, 40, generator=g)
    c = base + 0.01 * torch.randn(9, 40, generator=g)
    t = torch.randint(0, 9, (6,), generator=g)
    got = ours(q, c, t, (8, 24), 0.01, backend="torch")
    assert_matches(got, reference(q, c, t, (8, 24), 0.01), 1e-4)


def test_grouped_torch_path_several_query_blocks(monkeypatch) -> None:
    # 2 queries per block (B = 7: the last block has one) in both the forward's prefix sums and the backward.
    monkeypatch.setattr(matryoshka, "_GROUPED_TORCH_BLOCK", 2 * 5 * 40)
    g = torch.Generator().manual_seed(15)
    q = torch.randn(7, 40, generator=g) * 2
    docs = torch.randn(7, 5, 40, generator=g) * torch.rand(7, 5, 1, generator=g).add(0.5)
    assert_matches(grouped_ours(q, docs, (8, 24), backend="torch"), grouped_reference(q, docs, (8, 24)), 1e-5)
