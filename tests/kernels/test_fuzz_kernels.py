"""Property-based tests of the fused ops (pool, infonce, grouped_infonce) against their float64 definitions.

Hypothesis draws each case's shapes (1, primes, non-powers of two), layout, dtype, temperature, ignored rows, masks
and value ranges (large norms, tiny values, near-duplicate candidates); the tensors themselves come from a drawn
seed. Every case runs forward and backward through both the Triton kernels (interpreter, ``backend="triton"``) and
the CPU path (``backend="torch"``) and compares them with the float64 reference on the same rounded inputs.

Tolerance: the fixed bounds of tests/kernels (fp32 1e-5, bf16 1e-2, fp16 2e-3 / 3e-3), widened only where float32
arithmetic itself cannot reach them (ill-conditioned cases: a loss that is a difference of huge logits, a mean that
cancels) to the larger of 8x the error of the plain float32 PyTorch reference on the same inputs and, for the
losses, the error float32 softmax arithmetic carries (see :func:`arithmetic_floors`). NaN never passes.

Each op runs at least ``MIN_CASES`` cases per run (a counter is asserted), ``derandomize=True`` so CI sees the same
cases every run, and no example database is written.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from f2llm.kernels import (
    InfoNCEConfig,
    grouped_infonce,
    grouped_infonce_reference,
    infonce,
    infonce_reference,
    pool,
    pool_reference,
    utils,
)
from f2llm.kernels.pooling import MODES
from f2llm.kernels.utils import triton_interpreting

MIN_CASES = 200
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
POOL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
# Widening factor over the float32 PyTorch reference's own error (see the module docstring).
YARDSTICK = 8.0
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
UNIT_ROUNDOFF_FP32 = UNIT_ROUNDOFF[torch.float32]
FUZZ = settings(
    max_examples=MIN_CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf for any NaN/inf in x; 0 when both are exactly zero."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    diff = (x - ref).norm().item()
    return 0.0 if diff == 0.0 else diff / max(ref.norm().item(), 1e-30)


def loss_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Loss error relative to max(|ref|, 1), as tests/kernels/test_contrastive.py measures it."""
    if not torch.isfinite(x):
        return math.inf
    return abs(x.item() - ref.item()) / max(abs(ref.item()), 1.0)


@dataclass
class Tally:
    """Cases checked, and the checks that passed only with the tolerance widened, by quantity and dtype: by the
    float32 reference's own error (``widened``), and of those, by the arithmetic floor alone (``floor_only``)."""

    op: str
    cases: int = 0
    checks: int = 0
    widened: Counter = field(default_factory=Counter)
    floor_only: Counter = field(default_factory=Counter)

    def check(self, name: str, err: float, tol: float, fp32_err: float, context: tuple, floor: float = 0.0) -> None:
        """``context`` ends with the case (its dtype keys the tally)."""
        bound = max(tol, YARDSTICK * fp32_err, floor)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (fp32 reference error {fp32_err:.3g}); {context}"
        self.checks += 1
        key = f"{name} {str(context[-1].dtype).removeprefix('torch.')}"
        if err > tol:
            self.widened[key] += 1
        if err > max(tol, YARDSTICK * fp32_err):
            self.floor_only[key] += 1

    def report(self) -> str:
        def listed(counts: Counter) -> str:
            return f"{sum(counts.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items())) or '-'})"

        return (
            f"{self.op}: {self.cases} cases x {len(BACKENDS)} backends, {self.checks} checks; beyond the fixed "
            f"tolerance: {listed(self.widened)}; of those beyond 8x the float32 reference's error: "
            f"{listed(self.floor_only)}"
        )


@pytest.fixture(autouse=True)
def _interpreter_on() -> None:
    # Without the interpreter backend="triton" would raise on CPU tensors instead of testing the kernels.
    assert triton_interpreting(), "run with TRITON_INTERPRET=1 (tests/conftest.py sets it)"


# ------------------------------------------------------------------------------------------------ pool
@dataclass
class PoolCase:
    layout: str  # padded | packed
    mode: str
    normalize: bool
    dtype: torch.dtype
    D: int
    scale: float
    storage: str  # contiguous | transposed | strided: how hidden sits in memory
    seed: int
    lengths: list[int]
    L: int = 0  # padded only
    padding: str = "right"  # right | left | holes (padded only)
    mask_dtype: torch.dtype = torch.long
    tail: int = 0  # packed only: rows after the last sequence (belong to none)


POOL_SCALES = {
    torch.float32: (1e-6, 1.0, 1e3, 1e12),
    torch.bfloat16: (1e-3, 1.0, 1e4),
    torch.float16: (1e-2, 1.0, 1e3),
}


@st.composite
def pool_cases(draw: st.DrawFn) -> PoolCase:
    dtype = draw(st.sampled_from(DTYPES))
    case = PoolCase(
        layout=draw(st.sampled_from(["padded", "packed"])),
        mode=draw(st.sampled_from(MODES)),
        normalize=draw(st.booleans()),
        dtype=dtype,
        D=draw(st.sampled_from([1, 2, 3, 7, 13, 31, 64, 97, 130])),
        scale=draw(st.sampled_from(POOL_SCALES[dtype])),
        storage=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        lengths=[],
    )
    if case.layout == "padded":
        B = draw(st.sampled_from([1, 2, 3, 5, 7]))
        case.L = draw(st.sampled_from([1, 2, 3, 5, 8, 11, 13]))
        case.lengths = draw(st.lists(st.integers(1, case.L), min_size=B, max_size=B))
        case.padding = draw(st.sampled_from(["right", "left", "holes"]))
        case.mask_dtype = draw(st.sampled_from([torch.long, torch.bool, torch.int32]))
    else:
        case.lengths = draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 9]), min_size=1, max_size=7))
        case.tail = draw(st.integers(0, 3))
    return case


def pool_inputs(case: PoolCase) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], dict]:
    """(storage tensor rounded to the case's dtype, storage -> hidden view, layout kwargs of pool)."""
    g = torch.Generator().manual_seed(case.seed)
    if case.layout == "padded":
        B, L, D = len(case.lengths), case.L, case.D
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, n in enumerate(case.lengths):
            if case.padding == "right":
                mask[i, :n] = 1
            elif case.padding == "left":
                mask[i, L - n :] = 1
            else:
                mask[i, torch.randperm(L, generator=g)[:n]] = 1
        layout = {"attention_mask": mask.to(case.mask_dtype)}
        shape = (B, L, D)
    else:
        cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int32)
        layout = {"cu_seqlens": cu}
        shape = (int(cu[-1]) + case.tail, case.D)
    if case.storage == "transposed":  # the two leading dims swapped in memory (packed: D-major)
        if len(shape) == 3:
            storage_shape, view = (shape[1], shape[0], shape[2]), lambda s: s.transpose(0, 1)
        else:
            storage_shape, view = (shape[1], shape[0]), lambda s: s.T
    elif case.storage == "strided":  # every other element of the last dim
        storage_shape, view = (*shape[:-1], 2 * shape[-1]), lambda s: s[..., ::2]
    else:
        storage_shape, view = shape, lambda s: s
    storage = (torch.randn(storage_shape, generator=g, dtype=torch.float64) * case.scale).to(case.dtype)
    return storage, view, layout


def run_pool(
    storage: torch.Tensor, view: Callable, grad_out: torch.Tensor, fn: Callable, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = storage.clone().requires_grad_()
    out = fn(view(leaf), **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), leaf.grad


@pytest.mark.slow
def test_pool_fuzzed_against_float64() -> None:
    tally = Tally("pool")

    @FUZZ
    @given(case=pool_cases())
    def check(case: PoolCase) -> None:
        storage, view, layout = pool_inputs(case)
        kwargs = {"mode": case.mode, "normalize": case.normalize, **layout}
        ref_shape = pool_reference(view(storage.double()), **kwargs).shape
        grad_out = torch.randn(ref_shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
        ref = run_pool(storage.double(), view, grad_out, pool_reference, **kwargs)
        fp32 = run_pool(storage, view, grad_out, pool_reference, **kwargs)  # plain PyTorch, float32 arithmetic
        errors32 = [rel_err(fp32[0], ref[0]), rel_err(fp32[1], ref[1])]
        for backend in BACKENDS:
            out, grad = run_pool(storage, view, grad_out, pool, backend=backend, **kwargs)
            assert out.dtype == case.dtype and out.shape == ref[0].shape, (backend, case)
            tally.check("forward", rel_err(out, ref[0]), POOL_TOL[case.dtype], errors32[0], (backend, case))
            if case.normalize and case.D == 1:
                # A normalized scalar is its sign, constant almost everywhere: the exact gradient is 0.
                assert (grad == 0).all(), (backend, case)
            else:
                tally.check("backward", rel_err(grad, ref[1]), POOL_TOL[case.dtype], errors32[1], (backend, case))
            if case.layout == "padded":  # padding never receives gradient
                real = layout["attention_mask"] != 0
                assert (view(grad).abs().sum(-1)[~real] == 0).all(), (backend, case)
        tally.cases += 1

    check()
    assert tally.cases >= MIN_CASES, f"only {tally.cases} pool cases ran"
    print(tally.report())


# ------------------------------------------------------------------------------------------------ infonce
@dataclass
class InfoNCECase:
    B: int
    N: int
    D: int
    dtype: torch.dtype
    temperature: float
    values: str  # normalized | scaled | raw: unit vectors, unit vectors x scale, plain randn (norm ~ sqrt(D))
    scale: float
    near_duplicates: int  # candidates that copy a target's row up to 1e-3 noise
    ignored: float  # share of queries with target = ignore_index
    ignore_index: int
    use_margin: bool
    tiles: str  # default | small: Triton tiles; the PyTorch path gets small row blocks for "small"
    config: InfoNCEConfig | None
    seed: int


def temperatures() -> st.SearchStrategy[float]:
    """0.01 .. 1, log-uniform, plus the recipe's 0.05 and both ends."""
    drawn = st.floats(math.log(0.01), 0.0).map(lambda x: round(math.exp(x), 6))
    return st.one_of(st.sampled_from([0.01, 0.05, 1.0]), drawn)


@st.composite
def infonce_cases(draw: st.DrawFn) -> InfoNCECase:
    B = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 17, 24]))
    N = draw(st.sampled_from([1, 2, 3, 5, 11, 19, 31, 40]))
    tiles = draw(st.sampled_from(["default", "default", "small"]))
    config = None
    if tiles == "small":
        config = InfoNCEConfig(
            block_b=draw(st.sampled_from([16, 32])),
            block_n=draw(st.sampled_from([16, 32])),
            block_d=draw(st.sampled_from([32, 64])),
            splits_n=draw(st.integers(1, 3)),
            chunk_n=draw(st.sampled_from([None, 5, 16, 33])),
        )
    return InfoNCECase(
        B=B,
        N=N,
        D=draw(st.sampled_from([1, 3, 8, 16, 29, 64, 97])),
        dtype=draw(st.sampled_from(DTYPES)),
        temperature=draw(temperatures()),
        values=draw(st.sampled_from(["normalized", "normalized", "scaled", "raw"])),
        scale=draw(st.sampled_from([0.05, 4.0, 16.0])),
        near_duplicates=draw(st.integers(0, min(3, N - 1))),
        ignored=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, N + 3])),
        use_margin=draw(st.booleans()),
        tiles=tiles,
        config=config,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def norms(x: torch.Tensor) -> torch.Tensor:
    return x.double().norm(dim=-1).flatten()


def vectors(shape: tuple[int, ...], case, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if case.values != "raw":
        x = F.normalize(x, dim=-1) * (case.scale if case.values == "scaled" else 1.0)
    return x


def pick_margin(q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, safety: float):
    """A margin that drops at least one candidate and leaves every score at least ``safety`` (relative to the
    largest score) away from the threshold, so float32 and float64 agree on every drop; None if there is none."""
    s = q.double() @ c.double().T
    tgt = torch.where(valid, targets, 0)
    gap = s - s.gather(1, tgt[:, None])
    gap[torch.arange(len(tgt)), tgt] = -math.inf  # the target is never dropped
    gap = gap[valid]
    if gap.numel() == 0:
        return None
    top = s.abs().max().item()
    for fraction in (0.1, 0.15, 0.2, 0.05, 0.25, 0.12, 0.17, 0.3):
        margin = fraction * top
        if (gap > margin).any() and ((gap - margin).abs() > safety * max(top, 1.0)).all():
            return margin
    return None


def infonce_inputs(case: InfoNCECase):
    g = torch.Generator().manual_seed(case.seed)
    q = vectors((case.B, case.D), case, g)
    c = vectors((case.N, case.D), case, g)
    targets = torch.randint(0, case.N, (case.B,), generator=g)
    for j in range(case.near_duplicates):  # candidate j + 1 nearly equals query j's positive
        src = int(targets[j % case.B])
        dst = (src + 1 + j) % case.N
        if dst != src:
            c[dst] = c[src] + 1e-3 * c[src].norm() * torch.randn(case.D, generator=g, dtype=torch.float64)
    ignored = torch.rand(case.B, generator=g) < case.ignored
    targets = torch.where(ignored, case.ignore_index, targets)
    return q.to(case.dtype), c.to(case.dtype), targets


def arithmetic_floors(
    logit_scale: float,
    candidates: int,
    D: int,
    dtype: torch.dtype,
    ref: tuple[torch.Tensor, ...],
    grad_scales: tuple[float, float],
) -> list[float]:
    """What float32 arithmetic can promise, as relative errors of (loss, grad, grad).

    ``logit_scale`` L = max|q| max|c| / T bounds every |logit| z, and |lse| <= L + log(candidates). A logit is a
    D-term float32 dot product (rounding error about sqrt(D) u L, however much its terms cancel) and the exponent
    ``z - lse`` of every softmax probability is then off by about (4 + sqrt(D)) u (L + log(candidates)): that is
    the relative (hence absolute, p <= 1) error of each probability. For 16-bit inputs the kernels also round
    ``p - y`` to the input dtype before the gradient product (tensor-core operands), adding u16 |p - y| with
    sum_j |p_j - y_j| <= 2. The loss is off by that slack (relative as loss_err measures it), and a gradient
    ``sum (p - y) x / (n T)`` by at most the slack plus 2 u16, times ``grad_scale`` = (sum over rows of the
    largest |x|) / (n T).
    """
    loss_slack = (4 + math.sqrt(D)) * UNIT_ROUNDOFF_FP32 * (logit_scale + math.log(candidates))
    grad_slack = loss_slack + 2 * UNIT_ROUNDOFF[dtype]
    loss_floor = loss_slack / max(abs(ref[0].item()), 1.0)
    return [
        loss_floor,
        *(grad_slack * scale / max(r.norm().item(), 1e-30) for r, scale in zip(ref[1:], grad_scales, strict=True)),
    ]


def run_infonce(fn: Callable, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, **kwargs):
    qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss = fn(qq, cc, targets, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, cc.grad


@pytest.mark.slow
def test_infonce_fuzzed_against_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    tally = Tally("infonce")

    @FUZZ
    @given(case=infonce_cases())
    def check(case: InfoNCECase) -> None:
        q, c, targets = infonce_inputs(case)
        valid = targets != case.ignore_index
        margin = None
        if case.use_margin:
            margin = pick_margin(q, c, targets, valid, 1e-5 if case.dtype == torch.float32 else 1e-3)
        kwargs = {"temperature": case.temperature, "mask_margin": margin, "ignore_index": case.ignore_index}
        ref = run_infonce(infonce_reference, q.double(), c.double(), targets, **kwargs)
        fp32 = run_infonce(infonce_reference, q, c, targets, **kwargs)  # unfused PyTorch in float32
        errors32 = [loss_err(fp32[0], ref[0]), rel_err(fp32[1], ref[1]), rel_err(fp32[2], ref[2])]
        logit_scale = norms(q).max().item() * norms(c).max().item() / case.temperature
        per_query = case.B / (max(int(valid.sum()), 1) * case.temperature)
        grad_scales = (per_query * norms(c).max().item(), per_query * norms(q).max().item())
        floors = arithmetic_floors(logit_scale, case.N, case.D, case.dtype, ref, grad_scales)
        for backend in BACKENDS:
            with contextlib.ExitStack() as stack:
                extra = {}
                if case.tiles == "small" and backend == "triton":
                    extra["config"] = case.config
                elif case.tiles == "small":  # several row blocks on the PyTorch path
                    patch = stack.enter_context(monkeypatch.context())
                    patch.setattr(utils, "_TORCH_TILE_ELEMENTS", 3 * case.N)
                got = run_infonce(infonce, q, c, targets, backend=backend, **kwargs, **extra)
            assert got[0].dtype == torch.float32 and got[1].dtype == case.dtype and got[2].dtype == case.dtype
            context = (backend, margin, case)
            for i, name in enumerate(("loss", "dq", "dc")):
                err = loss_err(got[0], ref[0]) if i == 0 else rel_err(got[i], ref[i])
                tally.check(name, err, LOSS_TOL[case.dtype], errors32[i], context, floors[i])
            if not valid.all():
                assert (got[1][~valid] == 0).all(), f"ignored queries must get exactly zero gradient; {context}"
            if not valid.any():
                assert got[0].item() == 0.0 and (got[2] == 0).all(), context
        tally.cases += 1

    check()
    assert tally.cases >= MIN_CASES, f"only {tally.cases} infonce cases ran"
    print(tally.report())


# ------------------------------------------------------------------------------------------------ grouped_infonce
@dataclass
class GroupedCase:
    B: int
    G: int
    D: int
    dtype: torch.dtype
    temperature: float
    values: str
    scale: float
    near_duplicates: bool  # the first hard negative nearly equals the positive
    small_chunks: bool  # PyTorch path: several query chunks
    seed: int


@st.composite
def grouped_cases(draw: st.DrawFn) -> GroupedCase:
    return GroupedCase(
        B=draw(st.sampled_from([1, 2, 3, 5, 7, 11, 17])),
        G=draw(st.sampled_from([1, 2, 3, 5, 8, 9])),
        D=draw(st.sampled_from([1, 3, 16, 31, 64, 97, 300])),
        dtype=draw(st.sampled_from(DTYPES)),
        temperature=draw(temperatures()),
        values=draw(st.sampled_from(["normalized", "normalized", "scaled", "raw"])),
        scale=draw(st.sampled_from([0.05, 4.0, 16.0])),
        near_duplicates=draw(st.booleans()),
        small_chunks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_grouped(fn: Callable, q: torch.Tensor, docs: torch.Tensor, **kwargs):
    qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
    loss = fn(qq, dd, **kwargs)
    loss.backward()
    return loss.detach(), qq.grad, dd.grad


@pytest.mark.slow
def test_grouped_infonce_fuzzed_against_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    tally = Tally("grouped_infonce")

    @FUZZ
    @given(case=grouped_cases())
    def check(case: GroupedCase) -> None:
        g = torch.Generator().manual_seed(case.seed)
        q = vectors((case.B, case.D), case, g)
        docs = vectors((case.B, case.G, case.D), case, g)
        if case.near_duplicates and case.G > 1:
            noise = torch.randn(case.B, case.D, generator=g, dtype=torch.float64)
            docs[:, 1] = docs[:, 0] + 1e-3 * docs[:, 0].norm(dim=-1, keepdim=True) * noise
        q, docs = q.to(case.dtype), docs.to(case.dtype)
        ref = run_grouped(grouped_infonce_reference, q.double(), docs.double(), temperature=case.temperature)
        fp32 = run_grouped(grouped_infonce_reference, q, docs, temperature=case.temperature)
        errors32 = [loss_err(fp32[0], ref[0]), rel_err(fp32[1], ref[1]), rel_err(fp32[2], ref[2])]
        logit_scale = norms(q).max().item() * norms(docs).max().item() / case.temperature
        floors = arithmetic_floors(
            logit_scale,
            case.G,
            case.D,
            case.dtype,
            ref,
            (norms(docs).max().item() / case.temperature, norms(q).max().item() / case.temperature),
        )
        for backend in BACKENDS:
            with monkeypatch.context() as patch:
                if case.small_chunks:
                    patch.setattr(utils, "_TORCH_TILE_ELEMENTS", 2 * case.G * case.D)
                got = run_grouped(grouped_infonce, q, docs, temperature=case.temperature, backend=backend)
            assert got[0].dtype == torch.float32 and got[1].dtype == case.dtype and got[2].dtype == case.dtype
            context = (backend, case)
            for i, name in enumerate(("loss", "dq", "ddocs")):
                err = loss_err(got[0], ref[0]) if i == 0 else rel_err(got[i], ref[i])
                tally.check(name, err, LOSS_TOL[case.dtype], errors32[i], context, floors[i])
        tally.cases += 1

    check()
    assert tally.cases >= MIN_CASES, f"only {tally.cases} grouped_infonce cases ran"
    print(tally.report())
