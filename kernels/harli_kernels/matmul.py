"""Persistent, SM-limited matmul for the three GEMM shapes of a linear layer.

``C[M, N] = alpha * A[M, K] @ B[K, N]`` with arbitrary strides, so the transposes a linear layer
needs are free views:

* forward           ``Y  = X  @ W^T``   (:func:`linear_forward`)
* input gradient    ``dX = dY @ W``     (:func:`linear_input_grad`)
* weight gradient   ``dW = dY^T @ X``   (:func:`linear_weight_grad`, used for the adapter weights)

Operands are bf16/fp16 (fp32 accepted too), the accumulator is always fp32.  The kernel runs
exactly ``min(num_sms, tiles)`` programs that stride over the output tiles.  Skinny outputs (the
LoRA weight gradients ``[r, in]`` / ``[out, r]`` reduce over all tokens) are split along K so that
the SM budget is actually used; split-K partial sums are combined with fp32 atomics, which makes
the summation order (not the math) non-deterministic.  Pass ``split_k=1`` to disable it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import (
    check_device,
    check_float,
    check_ndim,
    compute_dtype,
    grouped_tile,
    mma,
    next_pow2,
    num_programs,
    tl_dtype,
    upcast_dots,
)
from .launch import check_num_sms, interpreting

__all__ = [
    "persistent_matmul",
    "linear",
    "linear_forward",
    "linear_input_grad",
    "linear_weight_grad",
    "mm_config",
]


@triton.jit
def _persistent_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    am_ptr,
    bm_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_amm,
    stride_amk,
    stride_bmk,
    stride_bmn,
    alpha,
    k_per_split,
    HAS_AMUL: tl.constexpr,
    HAS_BMUL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ATOMIC: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_mn = num_m * num_n
    num_tiles = tiles_mn * SPLIT_K
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    for tile in range(pid, num_tiles, nprog):
        split = tile // tiles_mn
        pid_m, pid_n = grouped_tile(tile - split * tiles_mn, num_m, num_n, GROUP_M)
        rm = pid_m * BLOCK_M + offs_m0
        rn = pid_n * BLOCK_N + offs_n0
        mask_m = rm < M
        mask_n = rn < N
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
        b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
        am_rows = am_ptr + rm.to(tl.int64)[:, None] * stride_amm
        bm_cols = bm_ptr + rn.to(tl.int64)[None, :] * stride_bmn
        k_lo = split * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + offs_k0
            mask_k = rk < k_hi
            mask_a = mask_m[:, None] & mask_k[None, :]
            mask_b = mask_k[:, None] & mask_n[None, :]
            a = tl.load(a_rows + rk[None, :] * stride_ak, mask=mask_a, other=0.0)
            b = tl.load(b_cols + rk[:, None] * stride_bk, mask=mask_b, other=0.0)
            if HAS_AMUL:  # elementwise multiplier of A (e.g. a dropout mask), applied on load
                am = tl.load(am_rows + rk[None, :] * stride_amk, mask=mask_a, other=0.0)
                a = a.to(tl.float32) * am.to(tl.float32)
            if HAS_BMUL:
                bmul = tl.load(bm_cols + rk[:, None] * stride_bmk, mask=mask_b, other=0.0)
                b = b.to(tl.float32) * bmul.to(tl.float32)
            acc = mma(a.to(COMPUTE), b.to(COMPUTE), acc, UPCAST)
        acc = acc * alpha
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
        mask_c = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(c_ptrs, acc, mask=mask_c)
        else:
            if ACCUMULATE:
                acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def mm_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Block sizes / launch options.  Small fixed tiles under the interpreter (so tiny test shapes
    still produce several tiles), tensor-core friendly tiles on a GPU."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
    bm = min(128, max(16, next_pow2(M)))
    bn = min(128, max(16, next_pow2(N)))
    bk = 32 if dtype == torch.float32 else 64
    warps = 8 if bm * bn >= 128 * 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=3)


def _auto_split_k(tiles_mn: int, K: int, block_k: int, num_sms: int) -> int:
    if tiles_mn >= num_sms:
        return 1
    # only split when every split still gets a few K blocks of work
    max_split = max(1, K // (4 * block_k))
    return max(1, min(triton.cdiv(num_sms, tiles_mn), max_split))


def persistent_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    num_sms: int,
    *,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    accumulate: bool = False,
    split_k: int | None = None,
    a_mul: torch.Tensor | None = None,
    b_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * (a * a_mul) @ (b * b_mul)`` (``a`` [M, K], ``b`` [K, N], any strides) on
    ``num_sms`` programs; ``a_mul``/``b_mul`` are optional elementwise multipliers of the
    operands' shapes (LoRA dropout masks), applied on load.

    ``out`` receives the result (``accumulate=True`` adds it to what ``out`` holds); otherwise a
    new ``[M, N]`` tensor of ``out_dtype`` (default ``a.dtype``) is returned.  ``split_k`` None
    picks a split automatically when there are fewer output tiles than programs.
    """
    num_sms = check_num_sms(num_sms)
    check_float("a", a)
    check_float("b", b)
    check_ndim("a", a, 2)
    check_ndim("b", b, 2)
    device = check_device(("a", a), ("b", b), ("out", out), ("a_mul", a_mul), ("b_mul", b_mul))
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    N = b.shape[1]
    for name, mul, ref in (("a_mul", a_mul, a), ("b_mul", b_mul, b)):
        if mul is not None:
            check_float(name, mul)
            if mul.shape != ref.shape:
                raise ValueError(
                    f"{name} has shape {tuple(mul.shape)}, expected {tuple(ref.shape)}"
                )
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out tensor")
        dtype = out_dtype or a.dtype
        check_float("out_dtype", torch.empty(0, dtype=dtype))
        out = torch.empty((M, N), dtype=dtype, device=device)
    else:
        check_float("out", out)
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(M, N)}")
        if out_dtype is not None and out.dtype != out_dtype:
            raise ValueError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
    if split_k is not None and (isinstance(split_k, bool) or int(split_k) < 1):
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        return out

    cfg = mm_config(M, N, K, compute_dtype(a.dtype, b.dtype))
    bk = cfg["BLOCK_K"]
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = int(split_k) if split_k is not None else _auto_split_k(tiles_mn, K, bk, num_sms)
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)

    target = out
    if split > 1:
        if out.dtype == torch.float32:
            if not accumulate:
                out.zero_()
        else:
            target = out.float() if accumulate else torch.zeros((M, N), device=device)
    grid = (num_programs(tiles_mn * split, num_sms),)
    am = a_mul if a_mul is not None else a
    bm = b_mul if b_mul is not None else b
    _persistent_mm_kernel[grid](
        a,
        b,
        target,
        am,
        bm,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        target.stride(0),
        target.stride(1),
        am.stride(0),
        am.stride(1),
        bm.stride(0),
        bm.stride(1),
        float(alpha),
        k_per_split,
        HAS_AMUL=a_mul is not None,
        HAS_BMUL=b_mul is not None,
        SPLIT_K=split,
        ACCUMULATE=bool(accumulate),
        ATOMIC=split > 1,
        COMPUTE=tl_dtype(compute_dtype(a.dtype, b.dtype)),
        UPCAST=upcast_dots(),
        **cfg,
    )
    if target is not out:
        out.copy_(target)
    return out


def linear_forward(x: torch.Tensor, weight: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``x [M, in] @ weight[out, in]^T`` -> ``[M, out]``."""
    return persistent_matmul(x, weight.t(), num_sms)


def linear_input_grad(dy: torch.Tensor, weight: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``dy [M, out] @ weight [out, in]`` -> ``dx [M, in]``."""
    return persistent_matmul(dy, weight, num_sms)


def linear_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, num_sms: int, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``dy[M, out]^T @ x [M, in]`` -> ``dW [out, in]`` (reduction over tokens, split-K)."""
    return persistent_matmul(dy.t(), x, num_sms, out_dtype=out_dtype or x.dtype)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, num_sms):
        ctx.num_sms = num_sms
        ctx.save_for_backward(x2, weight)
        return linear_forward(x2, weight, num_sms)

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = linear_input_grad(dy, weight, ctx.num_sms).to(x2.dtype)
        if ctx.needs_input_grad[1]:
            dw = linear_weight_grad(dy, x2, ctx.num_sms, out_dtype=weight.dtype)
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``y = x @ weight^T`` (nn.Linear layout, no bias) with autograd for x and weight."""
    num_sms = check_num_sms(num_sms)
    check_float("x", x)
    check_float("weight", weight)
    check_ndim("weight", weight, 2)
    check_device(("x", x), ("weight", weight))
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; its last dim must equal weight.shape[1] "
            f"({weight.shape[1]}) for weight {tuple(weight.shape)}"
        )
    lead = x.shape[:-1]
    y = _LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, num_sms)
    return y.reshape(*lead, weight.shape[0])
