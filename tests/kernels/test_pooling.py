"""f2llm.kernels.pool against its float64 definition: both backends, both layouts, every mode, every dtype."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from f2llm.kernels import pool
from f2llm.kernels.pooling import MODES, pool_reference
from f2llm.kernels.utils import triton_interpreting

BACKENDS = ["triton", "torch"]
# Relative error bounds vs float64: fp32 is exact to rounding; bf16/fp16 are bounded by input/output rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "NaN/Inf in result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def padded_mask(lengths: list[int], L: int, side: str) -> torch.Tensor:
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, L - n :] = 1
    return mask


def check_against_reference(hidden64: torch.Tensor, dtype: torch.dtype, backend: str, **layout_and_mode) -> None:
    """Forward and backward of pool() in `dtype` vs the float64 reference on the same (rounded) inputs."""
    x = hidden64.to(dtype)
    ref_in = x.double().requires_grad_()
    ref = pool_reference(ref_in, **layout_and_mode)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)

    inp = x.clone().requires_grad_()
    out = pool(inp, backend=backend, **layout_and_mode)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(grad_out.to(dtype))
    assert rel_err(out, ref) < TOL[dtype], f"forward rel err {rel_err(out, ref):.2e}"
    assert rel_err(inp.grad, ref_in.grad) < TOL[dtype], f"backward rel err {rel_err(inp.grad, ref_in.grad):.2e}"


def test_interpreter_is_on() -> None:
    # Without it the triton backend would not run on CPU tensors and half of this file would be skipped silently.
    assert triton_interpreting()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("normalize", [True, False])
def test_padded_fp32(backend: str, mode: str, side: str, normalize: bool) -> None:
    B, L, D = 5, 13, 97  # D not a power of two, L not a multiple of the L block
    lengths = [13, 1, 7, 12, 4]
    hidden = torch.randn(B, L, D, dtype=torch.float64) * 3
    mask = padded_mask(lengths, L, side)
    check_against_reference(hidden, torch.float32, backend, attention_mask=mask, mode=mode, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_packed_fp32(backend: str, mode: str, normalize: bool) -> None:
    lengths = [1, 9, 3, 70, 2]  # one sequence longer than an L block
    T, D = sum(lengths) + 3, 130  # 3 trailing rows belong to no sequence: they must get zero gradient
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    hidden = torch.randn(T, D, dtype=torch.float64)
    check_against_reference(hidden, torch.float32, backend, cu_seqlens=cu, mode=mode, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision(backend: str, dtype: torch.dtype, mode: str) -> None:
    hidden = torch.randn(3, 17, 64, dtype=torch.float64)
    mask = padded_mask([17, 5, 9], 17, "right")
    check_against_reference(hidden, dtype, backend, attention_mask=mask, mode=mode, normalize=True)
    cu = torch.tensor([0, 4, 5, 17], dtype=torch.int32)
    check_against_reference(hidden[0], dtype, backend, cu_seqlens=cu, mode=mode, normalize=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_bf16_states_give_fp32_embeddings(backend: str, mode: str, normalize: bool) -> None:
    """out_dtype=float32 keeps the fp32 result of the pooling arithmetic for bf16 states (what a loss needs): as
    exact as the fp32 op on the same bf16 inputs, far more exact than a bf16 output, and it back-propagates."""
    hidden = torch.randn(4, 19, 96, dtype=torch.float64)
    mask = padded_mask([19, 3, 11, 8], 19, "right")
    x = hidden.to(torch.bfloat16)
    ref_in = x.double().requires_grad_()
    ref = pool_reference(ref_in, mask, mode=mode, normalize=normalize)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    inp = x.clone().requires_grad_()
    out = pool(inp, mask, mode=mode, normalize=normalize, backend=backend, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    out.backward(grad_out.float())
    assert inp.grad.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-6, rel_err(out, ref)
    bf16_out = pool(x, mask, mode=mode, normalize=normalize, backend=backend)
    assert bf16_out.dtype == torch.bfloat16
    if normalize or mode == "mean":  # arithmetic: a bf16 output rounds its fp32 result away
        assert rel_err(bf16_out, ref) > 10 * rel_err(out, ref)
    else:  # a gather of bf16 values: exact either way
        assert torch.equal(bf16_out.float(), out)
    assert rel_err(inp.grad, ref_in.grad) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_single_row_single_token(backend: str, mode: str) -> None:
    hidden = torch.randn(1, 1, 33, dtype=torch.float64)  # B = 1, L = 1
    check_against_reference(hidden, torch.float32, backend, attention_mask=torch.ones(1, 1), mode=mode)
    check_against_reference(hidden[0], torch.float32, backend, cu_seqlens=torch.tensor([0, 1]), mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_with_holes_and_bool_mask(backend: str) -> None:
    """`mean` averages exactly the masked positions even if they are not contiguous; bool masks work."""
    hidden = torch.randn(2, 8, 40, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for mode in MODES:
        check_against_reference(hidden, torch.float32, backend, attention_mask=mask, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_backends_agree_and_mask_positions(mode: str) -> None:
    hidden = torch.randn(4, 11, 50)
    mask = padded_mask([11, 2, 6, 3], 11, "left")
    outs, grads = [], []
    for backend in BACKENDS:
        x = hidden.clone().requires_grad_()
        y = pool(x, mask, mode=mode, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append(y)
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    # Gradient flows only to pooled positions: never to padding.
    assert (grads[0][mask == 0] == 0).all()
    touched = (grads[0] != 0).any(-1)
    if mode == "mean":
        assert torch.equal(touched, mask.bool())
    else:
        assert touched.sum(1).eq(1).all()


def test_mean_gradient_is_spread_evenly() -> None:
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    pool(hidden, torch.tensor([[1, 1, 1, 0, 0, 0]]), mode="mean", normalize=False).sum().backward()
    torch.testing.assert_close(hidden.grad[0, :3], torch.full((3, 8), 1 / 3))
    assert (hidden.grad[0, 3:] == 0).all()


def test_last_pools_eos_with_left_and_right_padding() -> None:
    """Right and left padded copies of the same sequences give the same embeddings."""
    lengths, L, D = [4, 7, 1], 7, 24
    seqs = [torch.randn(n, D) for n in lengths]
    right = torch.zeros(3, L, D)
    left = torch.zeros(3, L, D)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = s
        left[i, L - len(s) :] = s
    for backend in BACKENDS:
        a = pool(right, padded_mask(lengths, L, "right"), mode="last", backend=backend)
        b = pool(left, padded_mask(lengths, L, "left"), mode="last", backend=backend)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, torch.nn.functional.normalize(torch.stack([s[-1] for s in seqs]), dim=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden(backend: str) -> None:
    base = torch.randn(12, 3, 70, dtype=torch.float64)
    hidden = base.transpose(0, 1)[:, ::2]  # [3, 6, 70], strided in B and L
    mask = padded_mask([6, 2, 5], 6, "right")
    for mode in MODES:
        check_against_reference(hidden, torch.float32, backend, attention_mask=mask, mode=mode)


def test_zero_vector_normalizes_to_zero_not_nan() -> None:
    hidden = torch.zeros(2, 3, 16)
    for backend in BACKENDS:
        out = pool(hidden, torch.ones(2, 3), mode="mean", backend=backend)
        assert torch.equal(out, torch.zeros(2, 16))


def test_gradcheck_reference() -> None:
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = padded_mask([5, 3], 5, "left")
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda h, m=mode: pool_reference(h, mask, mode=m), (hidden,))
    packed = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 7])
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda h, m=mode: pool_reference(h, cu_seqlens=cu, mode=m), (packed,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fused(backend: str) -> None:
    """The hand-written backward is the true derivative (finite differences in float64 inputs)."""
    hidden = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = padded_mask([4, 2], 4, "right")
    for mode in MODES:
        # The op computes in float32, so finite differences need a coarse step and tolerance.
        assert torch.autograd.gradcheck(
            lambda h, m=mode: pool(h, mask, mode=m, backend=backend), (hidden,), eps=1e-3, atol=1e-3, rtol=1e-3
        )


def test_empty_row_is_an_error_naming_it() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"row\(s\) \[1, 3\]"):
            pool(torch.randn(4, 3, 8), mask, backend=backend)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\]"):
        pool(torch.randn(5, 8), cu_seqlens=torch.tensor([0, 2, 2, 5]))
    with pytest.raises(ValueError, match="hidden has 5 rows"):
        pool(torch.randn(5, 8), cu_seqlens=torch.tensor([0, 2, 6]))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        pool(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="does not match"):
        pool(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        pool(torch.randn(2, 3, 4), torch.ones(2, 3), mode="max")
    with pytest.raises(ValueError, match=r"packed hidden must be \[T, D\]"):
        pool(torch.randn(2, 3, 4), cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="floating-point"):
        pool(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3))


def test_not_mistaken_for_hugging_face_kernels() -> None:
    """transformers probes the import name `kernels`; f2llm's kernels live at f2llm.kernels only."""
    from transformers.utils import is_kernels_available

    assert importlib.util.find_spec("f2llm.kernels") is not None
    assert not is_kernels_available()
    # Also from the repository root, where the kernels/ folder is on sys.path (python -c adds the cwd).
    root = importlib.util.find_spec("f2llm").submodule_search_locations[0].rsplit("/", 1)[0]
    probe = "from transformers.utils import is_kernels_available as k; print(k())"
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
