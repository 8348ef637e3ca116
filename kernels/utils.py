"""What the kernel modules share: backend choice, casts, constants, tile choice, and two Triton building blocks.

Imports run one way: :mod:`utils` (this module) <- the kernel modules :mod:`contrastive`, :mod:`matryoshka` and
:mod:`pooling`, which never import each other <- :mod:`losses`, the public ``infonce`` / ``grouped_infonce``.
Anything two of them need lives here, so a leaf never reaches into another:

* Backend choice, one rule for every op: ``backend="auto"`` takes the kernels for CUDA tensors and PyTorch for CPU
  tensors; ``"triton"`` forces the kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``: how the tests run
  them without a GPU); ``"torch"`` forces the PyTorch path. :func:`cast_fp32` says when loaded blocks must be
  upcast (the interpreter's bf16 arithmetic is wrong).
* Tiles of the InfoNCE kernels (:class:`InfoNCEConfig`, :func:`infonce_config`, the forward's candidate splits,
  the backward's chunk width, the grouped kernels' blocks) and of the PyTorch paths' row blocks. Chosen by plain
  functions: multi-config ``triton.autotune`` cannot run under the interpreter.
* The InfoNCE loss of a materialized score matrix, the core of both modules' references (the definitions).
* :func:`load_rows` (a ``@triton.jit`` row-block load) and :func:`scaled_matmul` (the GEMM that turns both
  backwards' (p - y) tiles into gradients).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import triton
import triton.language as tl

Backend = Literal["auto", "triton", "torch"]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_TEMPERATURE = 0.05
IGNORE_INDEX = -100
# The kernels' softmax runs in base 2 (exp2 / log2): z = s * LOG2E / T, and a base-2 log-sum-exp times LN2 is in nats.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------------------
# Backend choice.
# ----------------------------------------------------------------------------------------------------------
def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(
    backend: Backend, x: torch.Tensor, op: str, dtypes: tuple[torch.dtype, ...] | None = TRITON_DTYPES
) -> bool:
    """Whether ``op`` on tensors like ``x`` runs its Triton kernels; raises on a backend that cannot run here
    (``dtypes``: what the kernels take; None: any floating dtype)."""
    if backend == "auto":
        return x.is_cuda
    if backend not in ("triton", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if not x.is_cuda and not triton_interpreting():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: the Triton kernels take {names} inputs, got {x.dtype}")
    return True


def cast_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast loaded blocks of ``dtype`` to float32: the interpreter computes bf16 arithmetic
    and bf16 ``tl.dot`` wrongly (triton#11584). On a GPU 16-bit blocks stay 16-bit for the tensor cores."""
    return dtype == torch.bfloat16 and triton_interpreting()


# ----------------------------------------------------------------------------------------------------------
# InfoNCE tiles. Both modules' infonce kernels take an InfoNCEConfig; Matryoshka's adapts infonce_config's.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfoNCEConfig:
    """Tiles and launch parameters of the :func:`~f2llm.kernels.losses.infonce` kernels.

    The forward and the backward's probability kernel compute [block_b, block_n] score tiles whose dot products
    step through D in chunks of ``block_d`` (when one chunk covers D the forward keeps its query block in
    registers). ``splits_n`` splits the forward's candidates across programs (for few query blocks: B << N);
    None picks it from the GPU's SM count. The backward turns ``chunk_n`` candidates at a time into (p - y)
    tiles ([B, chunk_n] in the inputs' dtype; None: about ``_BWD_WORKSPACE_ELEMENTS`` of them) and multiplies
    them into dq and dc with :func:`scaled_matmul`, whose tiles :func:`matmul_config` picks.
    """

    block_b: int = 64
    block_n: int = 64
    block_d: int = 64
    splits_n: int | None = None
    chunk_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_b", "block_n", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"InfoNCEConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        for name in ("splits_n", "chunk_n"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"InfoNCEConfig.{name} must be >= 1 or None, got {value}")


def cuda_capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number (sm_90: 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def infonce_config(
    B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, capability: int | None = None
) -> InfoNCEConfig:
    """Default tiles for ``q`` [B, D] against ``c`` [N, D] (``capability``: the GPU's, e.g. 90; None: asked)."""
    d_pow2 = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        # Interpreter: every program and loop step costs milliseconds of Python, so take the largest tiles that
        # cover small test shapes in one step. Programs run one after another: splitting only adds work.
        return InfoNCEConfig(
            block_b=min(64, max(16, triton.next_power_of_2(B))),
            block_n=min(64, max(16, triton.next_power_of_2(N))),
            block_d=min(128, d_pow2),
            splits_n=1,
        )
    # GPU: 128 x 64 score tiles with a k-loop over D (tensor cores for 16-bit inputs). One chunk covers D up to
    # 128 (16-bit) or 32 (fp32: a 128 x 64 fp32 query block in registers beside the score tile spills under
    # ieee's FMA dot); beyond, the k-loop steps by 64 (16-bit) or 32 (fp32). Pipeline stages as they compile
    # without spills: 16-bit on Ampere spills 16 B with 3 stages, fp32 there 32 B with 2; Hopper takes 3.
    # tests/kernels/test_compile_hopper.py compiles every choice made here for sm_90 and sm_80 and checks
    # spills, shared memory, registers and tensor-core use (table: benchmarks/results/compile/).
    capability = cuda_capability(device) if capability is None else capability
    block_b = 128 if B >= 128 else max(16, triton.next_power_of_2(B))
    one_chunk, step = (32, 32) if dtype == torch.float32 else (128, 64)
    block_d = d_pow2 if d_pow2 <= one_chunk else step
    return InfoNCEConfig(
        block_b=block_b,
        block_n=64,
        block_d=block_d,
        num_warps=8 if block_b >= 128 else 4,
        num_stages=3 if capability >= 90 or dtype == torch.float32 else 2,
    )


# Split programs write float32 partial log-sum-exps (splits x B): cap the splits so that stays small.
_MAX_PARTIAL_ELEMENTS = 1 << 24


def resolve_splits(cfg: InfoNCEConfig, B: int, N: int, sms: int, problems: int = 1) -> InfoNCEConfig:
    """Fill ``splits_n``: when there are fewer query blocks than the GPU has SMs (``sms``; e.g. 16 local queries
    against 512 gathered positives), split the forward's candidate loop across programs, up to one program per
    SM. Deterministic (no atomics): the partial log-sum-exps are combined afterwards (:func:`logsumexp2`).
    ``problems``: independent problems of B queries each in the same launch (layer exits), whose query blocks
    fill the SMs together."""
    if cfg.splits_n is not None:
        return cfg
    b_blocks, n_blocks = problems * triton.cdiv(B, cfg.block_b), triton.cdiv(N, cfg.block_n)
    return replace(cfg, splits_n=max(1, min(n_blocks, sms // b_blocks, _MAX_PARTIAL_ELEMENTS // (problems * B))))


def split_ranges(n_items: int, block: int, splits: int) -> tuple[int, int]:
    """(tiles per split, number of non-empty splits) covering ``n_items`` in tiles of ``block``."""
    tiles = triton.cdiv(n_items, block)
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return per_split, triton.cdiv(tiles, per_split)


def logsumexp2(parts: torch.Tensor) -> torch.Tensor:
    """log2(sum_s 2**parts[s]) over dim 0 (-inf where every part is -inf): base-2 partial log-sum-exps combined."""
    top = parts.max(0).values
    shift = torch.where(torch.isinf(top), 0.0, top)
    return shift + torch.exp2(parts - shift).sum(0).log2()


# The backward's (p - y) workspace: [B, chunk_n] elements in the inputs' dtype (32 MiB in bf16). Each chunk's
# two products read it once each and read-modify-write the float32 dq once: wider chunks amortize that
# (B x D x 8 bytes per chunk) over more multiply-adds, narrower ones save memory.
_BWD_WORKSPACE_ELEMENTS = 1 << 24


def bwd_chunk_n(cfg: InfoNCEConfig, B: int, N: int) -> int:
    """Candidates per backward chunk: ``cfg.chunk_n``, or a multiple of 128 filling the workspace budget (the
    Matryoshka backward passes B x levels rows: its level tiles share the one budget)."""
    if cfg.chunk_n is not None:
        return min(cfg.chunk_n, N)
    return min(N, max(128, _BWD_WORKSPACE_ELEMENTS // max(1, B) // 128 * 128))


def grouped_blocks(B: int, G: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_G, BLOCK_D, num_warps) of the grouped kernels (each query against its own G docs): about 8k
    elements of the [B, G, D] block in flight per program, over 8 warps (with 4, the fp32 backward needs up to
    254 registers a thread on sm_90: no margin; with 8, 170)."""
    block_g = triton.next_power_of_2(G)
    block_d = min(256, triton.next_power_of_2(D))
    block_b = max(1, min(triton.next_power_of_2(B), 8192 // (block_g * block_d)))
    return block_b, block_g, block_d, 8


# The PyTorch paths' tiles: at most this many scores (16 MiB in float32) per block of query rows. Smaller tiles
# save memory but cost time: every row block read-modify-writes all of the float32 dc buffer.
_TORCH_TILE_ELEMENTS = 1 << 22


def for_each_problem(
    one: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    c: torch.Tensor,
    need_q: bool,
    need_c: bool,
    *args: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A PyTorch path over the problems of ``q`` [E, B, D] and ``c`` [E, N, D], one after the other (each one's
    tiles fill the paths' budget; on a CPU a launch costs nothing worth batching): ``one(q[e], c[e], *args, dq_e,
    dc_e) -> (lse, pos)`` writes its unscaled gradients into dq_e and adds them into dc_e (zeros), slices of buffers
    allocated once in the compute dtype (float32, float64 for float64 inputs), so they become the gradients without
    a copy. Returns (lse, pos) stacked over problems, then dq and dc (None when not needed)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=compute) if need_q else None
    dc = torch.zeros(c.shape, device=c.device, dtype=compute) if need_c else None
    stats = [
        one(q[e], c[e], *args, None if dq is None else dq[e], None if dc is None else dc[e]) for e in range(len(q))
    ]
    lse, pos = (torch.stack(part) for part in zip(*stats, strict=True))
    return lse, pos, dq, dc


def torch_tile_rows(row_elements: int, tiles: int = 1) -> int:
    """Query rows per block of a PyTorch path whose rows take ``row_elements`` each, within ``tiles`` x the tile
    budget (at least one row)."""
    return max(1, tiles * _TORCH_TILE_ELEMENTS // row_elements)


# ----------------------------------------------------------------------------------------------------------
# The loss of a materialized score matrix: both modules' references (the definitions) build their scores and
# end here, so one level of the Matryoshka definition is the plain definition on its cosines.
# ----------------------------------------------------------------------------------------------------------
def infonce_of_scores(
    scores: torch.Tensor, targets: torch.Tensor, temperature: float, mask_margin: float | None, ignore_index: int
) -> torch.Tensor:
    """Mean over queries with a target of ``logsumexp_j(s_ij / T) - s_it / T`` for scores [B, N]; with
    ``mask_margin`` the candidates j != t with ``s_ij > s_it + m`` leave the denominator."""
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0)
    pos = scores.gather(1, tgt[:, None])
    logits = scores / temperature
    if mask_margin is not None:
        cols = torch.arange(scores.shape[1], device=scores.device)
        drop = (scores > pos + mask_margin) & (cols[None, :] != tgt[:, None])
        logits = logits.masked_fill(drop, float("-inf"))
    per_query = torch.logsumexp(logits, 1) - pos[:, 0] / temperature
    return torch.where(valid, per_query, 0).sum() / valid.sum().clamp_min(1)


def grouped_infonce_of_scores(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of ``logsumexp_g(s_ig / T) - s_i0 / T`` for scores [B, G] (positive first)."""
    logits = scores / temperature
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


# ----------------------------------------------------------------------------------------------------------
# Triton building blocks of both modules' infonce kernels. Row offsets are int64: N * D passes 2**31 for large
# candidate pools at D = 2560.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def load_rows(ptr, row_off, row_mask, d0, D, BLOCK_D: tl.constexpr, CAST_FP32: tl.constexpr):
    """[rows, BLOCK_D] block of a row-major [*, D] matrix: rows at element offsets ``row_off``, columns
    ``d0 .. d0 + BLOCK_D``, zero outside ``row_mask`` and D. Cast to float32 when CAST_FP32."""
    cols = d0 + tl.arange(0, BLOCK_D)
    x = tl.load(ptr + row_off[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
    if CAST_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scaled_matmul_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    alpha_ptr,  # [1] float32, read on the device (grad_out / (n_valid T): no host sync)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_om,
    stride_ab,  # batch strides (grid axis 2: one product per batch entry, e.g. per layer exit)
    stride_bb,
    stride_ob,
    ACCUMULATE: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out [M, N] = alpha * a [M, K] @ b [K, N]``, or with ACCUMULATE ``out += a @ b`` (no alpha: the caller
    scales the finished sum once), with float32 accumulation. ``b`` and ``out`` have unit column stride, ``a``
    any strides (the dc product reads the (p - y) chunk transposed).

    A GEMM of its own rather than cuBLAS: it adds a 16-bit product into a float32 accumulator in one pass (the
    dq sum over candidate chunks keeps full precision, no [B, D] float32 temporary per chunk) and follows
    ``fp32_precision`` instead of torch's global matmul setting.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    a_ptr += batch * stride_ab
    b_ptr += batch * stride_bb
    out_ptr += batch * stride_ob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        # The running sum seeds the accumulator (no second tile live in the epilogue). Each program reads and
        # writes only its own tile, once: no ordering between programs is needed.
        acc = tl.load(ptrs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_rows = offs_m.to(tl.int64) * stride_am
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] + offs_k.to(tl.int64)[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if CAST_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if not ACCUMULATE:
        acc = acc * tl.load(alpha_ptr)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of :func:`_scaled_matmul_kernel` for one product ``out [M, N] (+)= alpha * a [M, K] @ b [K, N]``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> MatmulConfig:
    """Default tiles of the backward's products (M, N, K as in :class:`MatmulConfig`)."""

    def fit(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    if device.type != "cuda":  # interpreter: few, large programs
        return MatmulConfig(fit(M, 64), fit(N, 64), fit(K, 64), num_warps=4, num_stages=1)
    # 128 x 128 output tiles (a 64 KiB float32 accumulator over 8 warps), K steps of 64 (16-bit) / 32 (fp32).
    # fp32 takes 128 x 64: ieee's FMA dot holds its operands in registers and 128 x 128 spills. 4 warps only
    # below 128 x 64 (there 4 warps spill fp32 on Ampere).
    block_m, block_n = fit(M, 128), fit(N, 64 if dtype == torch.float32 else 128)
    block_k = fit(K, 32 if dtype == torch.float32 else 64)
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return MatmulConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=3)


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alpha: torch.Tensor,
    *,
    transpose_a: bool,
    accumulate: bool,
    precision: str,
) -> None:
    """``out[e] = alpha * op(a[e]) @ b[e]``, or ``out[e] += op(a[e]) @ b[e]`` when ``accumulate``, for every e of
    3-D operands ``[E, ., .]`` in one launch (the problems of infonce), with op(a) = a.T when ``transpose_a``; b and
    out row-major."""
    if not a.dim() == b.dim() == out.dim() == 3:
        raise ValueError(f"scaled_matmul: a, b and out must be 3-D [E, ., .], got {a.dim()}, {b.dim()}, {out.dim()}")
    am, ak = (-1, -2) if transpose_a else (-2, -1)
    M, K = a.shape[am], a.shape[ak]
    N = b.shape[-1]
    mc = matmul_config(M, N, K, a.dtype, a.device)
    _scaled_matmul_kernel[(triton.cdiv(M, mc.block_m), triton.cdiv(N, mc.block_n), a.shape[0])](
        a,
        b,
        out,
        alpha,
        M,
        N,
        K,
        a.stride(am),
        a.stride(ak),
        b.stride(-2),
        out.stride(-2),
        a.stride(0),
        b.stride(0),
        out.stride(0),
        ACCUMULATE=accumulate,
        CAST_FP32=cast_fp32(a.dtype),
        PRECISION=precision,
        BLOCK_M=mc.block_m,
        BLOCK_N=mc.block_n,
        BLOCK_K=mc.block_k,
        num_warps=mc.num_warps,
        num_stages=mc.num_stages,
    )
