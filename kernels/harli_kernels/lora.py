"""Fused LoRA linear on a persistent, SM-limited grid.

``y = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias)`` with nn.Linear layouts: ``W [out, in]``,
``A [r, in]``, ``B [out, r]``.  The base weight (and bias) are frozen; the backward produces
``dX``, ``dA`` and ``dB``.

Where fusing pays:

* forward: the rank-r "shrink" ``xa = x @ A^T`` ([M, r], tiny) is one persistent GEMM; the base GEMM
  and the "expand" ``scaling * xa @ B^T`` then run in **one** kernel, the low-rank product being
  one extra rank-r dot per output tile added into the same fp32 accumulator (no second pass over
  ``y``).
* backward: ``dxa = scaling * dY @ B`` ([M, r]) is one GEMM, and ``dX = dY @ W + dxa @ A`` is the
  same fused kernel again (base input-gradient GEMM plus a rank-r dot per tile).  ``dB =
  scaling * dY^T @ xa`` and ``dA = dxa^T @ x`` are weight-gradient GEMMs reducing over tokens
  (split-K, see :mod:`harli_kernels.matmul`).

Adapter weights may be fp32 while ``x``/``W`` are bf16 (peft's default upcast); the dots then run
in ``x``'s dtype with fp32 accumulation, and ``dA``/``dB`` are returned in the adapter dtype.
LoRA dropout: pass ``dropout_mask`` (x's shape, 0 or ``1/(1-p)``); it multiplies the adapter
input on load in the shrink GEMM and in ``dA``, and the low-rank term of ``dX`` in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import (
    check_device,
    check_float,
    check_ndim,
    grouped_tile,
    mma,
    next_pow2,
    num_programs,
    tl_dtype,
    upcast_dots,
)
from .launch import check_num_sms, interpreting
from .matmul import mm_config, persistent_matmul

__all__ = ["lora_linear", "fused_base_lowrank_matmul"]


@triton.jit
def _base_plus_lowrank_kernel(
    a_ptr,
    b_ptr,
    l_ptr,
    r_ptr,
    bias_ptr,
    lm_ptr,
    c_ptr,
    M,
    N,
    K,
    R,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    stride_cm,
    stride_cn,
    stride_lmm,
    stride_lmn,
    scaling,
    HAS_BIAS: tl.constexpr,
    HAS_LMUL: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[M, N] = A[M, K] @ B[K, N] + scaling * (L[M, R] @ Rm[R, N]) * LM[M, N] (+ bias[N])
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_r0 = tl.arange(0, BLOCK_R)
    for tile in range(pid, num_tiles, nprog):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        rm = pid_m * BLOCK_M + offs_m0
        rn = pid_n * BLOCK_N + offs_n0
        mask_m = rm < M
        mask_n = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + offs_k0
            mask_k = rk < K
            a = tl.load(
                a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + rk[:, None] * stride_bk + rn64[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = mma(a.to(COMPUTE), b.to(COMPUTE), acc, UPCAST)
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r0
            mask_r = rr < R
            lt = tl.load(
                l_ptr + rm64[:, None] * stride_lm + rr[None, :] * stride_lr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            rt = tl.load(
                r_ptr + rr[:, None] * stride_rr + rn64[None, :] * stride_rn,
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            low = mma(lt.to(COMPUTE), rt.to(COMPUTE), low, UPCAST)
        if HAS_LMUL:  # elementwise multiplier of the low-rank term (dropout mask in dX)
            lm = tl.load(
                lm_ptr + rm64[:, None] * stride_lmm + rn64[None, :] * stride_lmn,
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            )
            low = low * lm.to(tl.float32)
        acc += scaling * low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(
            c_ptr + rm64[:, None] * stride_cm + rn[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


def fused_base_lowrank_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    low_l: torch.Tensor,
    low_r: torch.Tensor,
    scaling: float,
    num_sms: int,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    low_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a [M,K] @ b [K,N] + scaling * (low_l [M,R] @ low_r [R,N]) * low_mul [M,N] (+ bias [N])``
    in one persistent kernel (any strides; ``low_mul`` optional).  Dots run in ``a``'s dtype,
    accumulate in fp32."""
    num_sms = check_num_sms(num_sms)
    for name, t in (("a", a), ("b", b), ("low_l", low_l), ("low_r", low_r)):
        check_float(name, t)
        check_ndim(name, t, 2)
    device = check_device(
        ("a", a), ("b", b), ("low_l", low_l), ("low_r", low_r), ("bias", bias), ("low_mul", low_mul)
    )
    M, K = a.shape
    N = b.shape[1]
    R = low_l.shape[1]
    if b.shape[0] != K or low_l.shape[0] != M or tuple(low_r.shape) != (R, N):
        raise ValueError(
            f"shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, "
            f"low_l {tuple(low_l.shape)}, low_r {tuple(low_r.shape)}"
        )
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    if low_mul is not None:
        check_float("low_mul", low_mul)
        if tuple(low_mul.shape) != (M, N):
            raise ValueError(f"low_mul has shape {tuple(low_mul.shape)}, expected {(M, N)}")
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=device)
    lm = low_mul if low_mul is not None else out
    if M == 0 or N == 0:
        return out
    cfg = mm_config(M, N, K, a.dtype)
    block_r = 16 if interpreting() else min(64, max(16, next_pow2(R)))
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    _base_plus_lowrank_kernel[(num_programs(tiles, num_sms),)](
        a,
        b,
        low_l,
        low_r,
        bias if bias is not None else out,
        lm,
        out,
        M,
        N,
        K,
        R,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        low_l.stride(0),
        low_l.stride(1),
        low_r.stride(0),
        low_r.stride(1),
        out.stride(0),
        out.stride(1),
        lm.stride(0),
        lm.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None,
        HAS_LMUL=low_mul is not None,
        COMPUTE=tl_dtype(a.dtype),
        UPCAST=upcast_dots(),
        BLOCK_R=block_r,
        **cfg,
    )
    return out


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, bias, mask2, scaling, num_sms):
        # shrink: xa = (x * mask) @ A^T  [M, r], kept in x's dtype (it feeds a 16-bit dot)
        xa = persistent_matmul(x2, lora_a.t(), num_sms, out_dtype=x2.dtype, a_mul=mask2)
        # base + expand in one pass
        y = fused_base_lowrank_matmul(
            x2, weight.t(), xa, lora_b.t(), scaling, num_sms, bias=bias, out_dtype=x2.dtype
        )
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa, mask2)
        ctx.scaling = scaling
        ctx.num_sms = num_sms
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, xa, mask2 = ctx.saved_tensors
        s, ns = ctx.scaling, ctx.num_sms
        need_x, need_a, need_b = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        dx = da = db = None
        dxa = None
        if need_x or need_a:
            # dxa = s * dY @ B   [M, r], fp32 (tiny)
            dxa = persistent_matmul(dy, lora_b, ns, alpha=s, out_dtype=torch.float32)
        if need_b:
            # dB = s * dY^T @ xa   [out, r]
            db = persistent_matmul(dy.t(), xa, ns, alpha=s, out_dtype=lora_b.dtype)
        if need_a:
            # dA = dxa^T @ (x * mask)   [r, in]
            da = persistent_matmul(dxa.t(), x2, ns, out_dtype=lora_a.dtype, b_mul=mask2)
        if need_x:
            # dX = dY @ W + (dxa @ A) * mask   (fused)
            dx = fused_base_lowrank_matmul(
                dy, weight, dxa, lora_a, 1.0, ns, out_dtype=x2.dtype, low_mul=mask2
            )
        return dx, None, da, db, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    num_sms: int,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + scaling * ((x * dropout_mask) @ A^T) @ B^T (+ bias)``; grads for x, A, B.

    ``x`` [..., in] (fp16/bf16/fp32), ``weight`` [out, in] same dtype as x (frozen),
    ``lora_a`` [r, in], ``lora_b`` [out, r] (x's dtype or fp32), ``bias`` [out] or None (frozen),
    ``dropout_mask`` None or x's shape (0 or ``1/(1-p)``; LoRA dropout on the adapter input only).
    """
    num_sms = check_num_sms(num_sms)
    check_float("x", x)
    check_float("weight", weight)
    check_float("lora_a", lora_a)
    check_float("lora_b", lora_b)
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_ndim(name, t, 2)
    check_device(
        ("x", x),
        ("weight", weight),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("bias", bias),
        ("dropout_mask", dropout_mask),
    )
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name} dtype {t.dtype} must be x's dtype ({x.dtype}) or float32")
    n_out, n_in = weight.shape
    r = lora_a.shape[0]
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"x has shape {tuple(x.shape)}; last dim must be in_features={n_in}")
    if lora_a.shape[1] != n_in:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}, expected [r, {n_in}]")
    if tuple(lora_b.shape) != (n_out, r):
        raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}, expected [{n_out}, {r}]")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    if torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        raise ValueError(
            "lora_linear keeps the base weight and bias frozen: set requires_grad=False"
        )
    mask2 = None
    if dropout_mask is not None:
        check_float("dropout_mask", dropout_mask)
        if dropout_mask.shape != x.shape:
            raise ValueError(
                f"dropout_mask has shape {tuple(dropout_mask.shape)}, expected {tuple(x.shape)}"
            )
        mask2 = dropout_mask.reshape(-1, n_in)
    lead = x.shape[:-1]
    y = _LoRALinearFn.apply(
        x.reshape(-1, n_in), weight, lora_a, lora_b, bias, mask2, float(scaling), num_sms
    )
    return y.reshape(*lead, n_out)
