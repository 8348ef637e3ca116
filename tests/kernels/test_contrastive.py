"""infonce / grouped_infonce against their float64 definitions: loss and both gradients, Triton (interpreter) and
PyTorch paths, odd shapes, dtypes, temperatures, ignored queries, false-negative masking, input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from f2llm.kernels import InfoNCEConfig, grouped_infonce, grouped_infonce_reference, infonce, infonce_reference, utils

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
# Small tiles so that interpreter tests cover several candidate/query tiles, several D chunks, split forward
# programs (partial log-sum-exps) and several backward chunks (dq accumulated across chunks, a last partial one).
SMALL_TILES = InfoNCEConfig(block_b=16, block_n=16, block_d=32, splits_n=2, chunk_n=24)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf for any nan/inf in x, so that a non-finite result never passes."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B: int, N: int, D: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """L2-normalized q [B, D], c [N, D] rounded to ``dtype``, random targets in [0, N)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(dtype)
    c = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    return q, c, torch.randint(0, N, (B,), generator=g)


def reference(q, c, targets, temperature=0.05, **kwargs):
    """(loss, dq, dc) of the float64 definition on the (already rounded) inputs."""
    rq, rc = q.double().requires_grad_(), c.double().requires_grad_()
    loss = infonce_reference(rq, rc, targets, temperature, **kwargs)
    loss.backward()
    return loss.detach(), rq.grad, rc.grad


def ours(q, c, targets, temperature=0.05, **kwargs):
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss = infonce(qq, cc, targets, temperature, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, cc.grad


def loss_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Loss error relative to max(|ref|, 1): a loss near 0 is a difference of log-sum-exps of size ~1/T, whose
    float32 rounding (~1e-6 absolute) no implementation avoids; relative to 1 it is still held to ``tol``."""
    if not torch.isfinite(x):
        return float("inf")
    return abs(x.item() - ref.item()) / max(abs(ref.item()), 1.0)


def assert_matches(got, want, tol: float) -> None:
    errs = {"loss": loss_err(got[0], want[0]), "dq": rel_err(got[1], want[1]), "dc": rel_err(got[2], want[2])}
    for name, err in errs.items():
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def backend_kwargs(backend: str, tiles: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    if tiles == "small":
        if backend == "triton":
            return {"backend": backend, "config": SMALL_TILES}
        monkeypatch.setattr(utils, "_TORCH_TILE_ELEMENTS", 64)  # several row blocks on the PyTorch path
    return {"backend": backend}


# ------------------------------------------------------------------------------------------------ infonce
def test_reference_is_cross_entropy() -> None:
    q, c, targets = make_inputs(9, 13, 8, torch.float64)
    targets[[2, 5]] = -100
    want = F.cross_entropy(q @ c.T / 0.07, targets, ignore_index=-100)
    torch.testing.assert_close(infonce_reference(q, c, targets, 0.07), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize(
    ("B", "N", "D"),
    [(1, 2, 16), (1, 70, 97), (40, 3, 97), (37, 70, 97)],
    ids=["B1-N2", "N>>B", "B>>N", "odd"],
)
def test_infonce_matches_reference(backend, tiles, B, N, D, monkeypatch) -> None:
    q, c, targets = make_inputs(B, N, D, seed=B + N)
    if B > 3:
        targets[[0, 3]] = -100
    got = ours(q, c, targets, **backend_kwargs(backend, tiles, monkeypatch))
    assert_matches(got, reference(q, c, targets), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3])
def test_infonce_single_candidate(backend, B) -> None:
    # N = 1: every query's softmax is [1], the loss is 0 up to rounding and the gradients are exactly 0.
    q, c, targets = make_inputs(B, 1, 16, seed=B)
    loss, dq, dc = ours(q, c, targets, backend=backend)
    assert abs(loss.item()) < 1e-5
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dc) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_infonce_dtypes(backend, dtype, tiles, monkeypatch) -> None:
    q, c, targets = make_inputs(24, 50, 97, dtype, seed=1)
    loss, dq, dc = got = ours(q, c, targets, **backend_kwargs(backend, tiles, monkeypatch))
    assert loss.dtype == torch.float32 and dq.dtype == dtype and dc.dtype == dtype
    assert_matches(got, reference(q, c, targets), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_infonce_temperature(backend, temperature) -> None:
    q, c, targets = make_inputs(20, 33, 40, seed=2)
    got = ours(q, c, targets, temperature, backend=backend)
    assert_matches(got, reference(q, c, targets, temperature), TOL[torch.float32])


def test_infonce_unnormalized_float64_torch_path() -> None:
    # float64 stays float64 on the PyTorch path: agreement to rounding, with raw (unnormalized) logits.
    g = torch.Generator().manual_seed(8)
    q, c = torch.randn(11, 23, generator=g, dtype=torch.float64), torch.randn(29, 23, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 29, (11,), generator=g)
    loss, dq, dc = ours(q, c, targets, 1.0, backend="torch")
    assert loss.dtype == torch.float64
    assert_matches((loss, dq, dc), reference(q, c, targets, 1.0), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_ignore_index(backend) -> None:
    q, c, targets = make_inputs(12, 30, 24, seed=3)
    targets[[1, 4, 5, 11]] = -1
    got = ours(q, c, targets, ignore_index=-1, backend=backend)
    want = reference(q, c, targets, ignore_index=-1)
    assert_matches(got, want, TOL[torch.float32])
    assert torch.all(got[1][[1, 4, 5, 11]] == 0), "ignored queries must get exactly zero gradient"
    torch.testing.assert_close(
        got[0].double(), F.cross_entropy(q.double() @ c.double().T / 0.05, targets, ignore_index=-1)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_all_ignored_is_zero(backend) -> None:
    q, c, _ = make_inputs(5, 9, 16, seed=4)
    loss, dq, dc = ours(q, c, torch.full((5,), -100), backend=backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dc) == 0


def pick_margin(q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> float:
    """A margin that drops some candidates and leaves no score within 1e-5 of the threshold (so float32 and
    float64 agree on every drop decision)."""
    s = q.double() @ c.double().T
    gap = s - s.gather(1, targets[:, None])
    gap[torch.arange(len(targets)), targets] = -10.0  # the target is never dropped
    for margin in (0.1, 0.15, 0.2, 0.05, 0.25, 0.12, 0.17):
        if (gap > margin).any() and ((gap - margin).abs() > 1e-5).all():
            return margin
    raise AssertionError("no clean margin for these inputs: change the seed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_infonce_mask_margin(backend, dtype, tiles, monkeypatch) -> None:
    q, c, targets = make_inputs(19, 37, 24, dtype, seed=5)
    targets[7] = -100
    margin = pick_margin(q, c, torch.where(targets >= 0, targets, 0))
    want = reference(q, c, targets, mask_margin=margin)
    assert loss_err(want[0], reference(q, c, targets)[0]) > 1e-3, "the margin must change the loss"
    got = ours(q, c, targets, mask_margin=margin, **backend_kwargs(backend, tiles, monkeypatch))
    assert_matches(got, want, TOL[dtype] if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_grad_of_one_input_and_no_grad(backend) -> None:
    q, c, targets = make_inputs(10, 21, 16, seed=6)
    want_loss, want_dq, _ = reference(q, c, targets)
    qq = q.clone().requires_grad_()
    loss = infonce(qq, c, targets, backend=backend)
    loss.backward(retain_graph=True)
    assert rel_err(qq.grad, want_dq) < 1e-5
    loss.backward()  # a retained graph runs backward again: gradients accumulate
    assert rel_err(qq.grad, 2 * want_dq) < 1e-5
    with torch.no_grad():
        assert loss_err(infonce(q, c, targets, backend=backend), want_loss) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infonce_backward_in_workspace_chunks(dtype, monkeypatch) -> None:
    # A workspace of 128 candidates' (p - y) for 40 queries: three backward chunks (128, 128, 44), dq summed over
    # them in float32, dc written per chunk; with the mask margin on, as the recipe's loss runs.
    monkeypatch.setattr(utils, "_BWD_WORKSPACE_ELEMENTS", 40 * 128 + 7)
    cfg = utils.infonce_config(40, 300, 97, dtype, torch.device("cpu"))
    assert utils.bwd_chunk_n(cfg, 40, 300) == 128
    q, c, targets = make_inputs(40, 300, 97, dtype, seed=3)
    targets[5] = -100
    margin = pick_margin(q, c, torch.where(targets >= 0, targets, 0))
    got = ours(q, c, targets, mask_margin=margin, backend="triton")
    assert_matches(got, reference(q, c, targets, mask_margin=margin), TOL[dtype])


def test_backward_chunk_size() -> None:
    cfg = utils.InfoNCEConfig()
    budget = utils._BWD_WORKSPACE_ELEMENTS
    assert utils.bwd_chunk_n(cfg, 16384, 131072) == budget // 16384  # 1024: a multiple of 128
    assert utils.bwd_chunk_n(cfg, 16, 4096) == 4096  # all candidates at once
    assert utils.bwd_chunk_n(cfg, budget, 4096) == 128  # never below one 128-wide step
    assert utils.bwd_chunk_n(utils.InfoNCEConfig(chunk_n=40), 16, 4096) == 40


def test_infonce_auto_backend_on_cpu_is_torch_path() -> None:
    q, c, targets = make_inputs(8, 20, 16, seed=7)
    assert torch.equal(infonce(q, c, targets), infonce(q, c, targets, backend="torch"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q": torch.zeros(4, 8, 1)}, "q must be"),
        ({"c": torch.zeros(6, 7)}, "embedding dims differ"),
        ({"c": torch.zeros(0, 8)}, "empty input"),
        ({"c": torch.zeros(6, 8, dtype=torch.float64)}, "share one floating dtype"),
        ({"targets": torch.zeros(3, dtype=torch.long)}, "targets must be an integer tensor of shape"),
        ({"targets": torch.zeros(4)}, "targets must be an integer tensor"),
        ({"targets": torch.tensor([0, 6, 1, 2])}, r"row\(s\) \[1\] are \[6\]"),
        ({"targets": torch.tensor([0, -5, 1, 2])}, r"row\(s\) \[1\] are \[-5\]"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"mask_margin": float("nan")}, "mask_margin must be"),
        ({"backend": "cuda"}, "backend must be"),
        ({"fp32_precision": "tf16"}, "fp32_precision must be"),
    ],
)
def test_infonce_validation(kwargs, message) -> None:
    args = {"q": torch.randn(4, 8), "c": torch.randn(6, 8), "targets": torch.tensor([0, 1, 2, 5])} | kwargs
    with pytest.raises(ValueError, match=message):
        infonce(**args)


def test_infonce_triton_needs_cuda_or_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        infonce(torch.randn(2, 8), torch.randn(3, 8), torch.tensor([0, 1]), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="take float16, bfloat16, float32 inputs"):
        infonce(torch.randn(2, 8).double(), torch.randn(3, 8).double(), torch.tensor([0, 1]), backend="triton")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        InfoNCEConfig(block_n=24)
    with pytest.raises(ValueError, match="chunk_n must be >= 1"):
        InfoNCEConfig(chunk_n=0)


# ------------------------------------------------------------------------------------------------ grouped
def make_groups(B: int, G: int, D: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(dtype)
    docs = F.normalize(torch.randn(B, G, D, generator=g), dim=-1).to(dtype)
    return q, docs


def test_grouped_reference_is_cross_entropy() -> None:
    q, docs = make_groups(6, 4, 8, torch.float64)
    logits = torch.einsum("bd,bgd->bg", q, docs) / 0.05
    want = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(grouped_infonce_reference(q, docs), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("B", "G", "D", "dtype", "temperature"),
    [
        (1, 1, 16, torch.float32, 0.05),
        (5, 8, 97, torch.float32, 0.05),
        (33, 3, 300, torch.float32, 1.0),  # D > one chunk of 256, B over several programs
        (7, 8, 64, torch.bfloat16, 0.05),
        (7, 8, 64, torch.float16, 0.05),
    ],
)
def test_grouped_matches_reference(backend, B, G, D, dtype, temperature, monkeypatch) -> None:
    monkeypatch.setattr(utils, "_TORCH_TILE_ELEMENTS", 4 * G * D)  # several chunks on the PyTorch path
    q, docs = make_groups(B, G, D, dtype, seed=B + G)
    rq, rd = q.double().requires_grad_(), docs.double().requires_grad_()
    want = grouped_infonce_reference(rq, rd, temperature)
    want.backward()
    qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
    loss = grouped_infonce(qq, dd, temperature, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and qq.grad.dtype == dtype and dd.grad.dtype == dtype
    assert_matches((loss, qq.grad, dd.grad), (want, rq.grad, rd.grad), TOL[dtype])


@pytest.mark.parametrize(
    ("q", "docs", "message"),
    [
        (torch.randn(3, 8), torch.randn(3, 8), "need q"),
        (torch.randn(3, 8), torch.randn(4, 2, 8), "need q"),
        (torch.randn(3, 8), torch.randn(3, 0, 8), "empty input"),
        (torch.randn(3, 8), torch.randn(3, 2, 8).half(), "share one floating dtype"),
    ],
)
def test_grouped_validation(q, docs, message) -> None:
    with pytest.raises(ValueError, match=message):
        grouped_infonce(q, docs)
