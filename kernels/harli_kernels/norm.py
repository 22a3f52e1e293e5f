"""RMSNorm (Llama style) forward and backward on a persistent, SM-limited grid.

``y = weight * round_to_x_dtype(x * rsqrt(mean(x^2) + eps))`` computed in fp32, exactly as
``LlamaRMSNorm`` does (it normalises in fp32, casts back to the input dtype, then multiplies by
the weight); the output dtype is always ``x``'s dtype.  Each program owns blocks of rows and
strides over them.  The backward recomputes the normalised rows from the saved ``rstd``; the
weight gradient (only when the weight requires grad) is reduced per program into an fp32
``[programs, hidden]`` buffer and summed in torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import check_device, check_float, next_pow2, num_programs, tl_dtype
from .launch import check_num_sms, interpreting

__all__ = ["rms_norm"]


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    H,
    stride_x,
    stride_y,
    eps,
    IN_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask_c = cols < H
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask_r = rows < n_rows
        mask = mask_r[:, None] & mask_c[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
        xn = (x * rstd[:, None]).to(IN_DTYPE).to(tl.float32)
        y = xn * w[None, :]
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(IN_DTYPE), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    n_rows,
    H,
    stride_dy,
    stride_x,
    stride_dx,
    HAS_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask_c = cols < H
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask_r = rows < n_rows
        mask = mask_r[:, None] & mask_c[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / H
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows64[:, None] * stride_dx + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask,
        )
        if HAS_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(dw_part_ptr + pid * H + cols, dw_acc, mask=mask_c)


def _config(H: int) -> dict:
    block_h = next_pow2(H)
    if interpreting():
        return dict(BLOCK_ROWS=2, BLOCK_H=block_h, num_warps=4)
    rows = max(1, min(16, 4096 // block_h))
    warps = 8 if block_h >= 4096 else 4
    return dict(BLOCK_ROWS=rows, BLOCK_H=block_h, num_warps=warps)


def _as_rows(t: torch.Tensor, H: int) -> torch.Tensor:
    t2 = t.reshape(-1, H)
    if t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, num_sms):
        H = x.shape[-1]
        x2 = _as_rows(x, H)
        n = x2.shape[0]
        y = torch.empty((n, H), dtype=x.dtype, device=x.device)
        rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
        cfg = _config(H)
        if n > 0:
            grid = (num_programs(triton.cdiv(n, cfg["BLOCK_ROWS"]), num_sms),)
            _rmsnorm_fwd_kernel[grid](
                x2,
                weight,
                y,
                rstd,
                n,
                H,
                x2.stride(0),
                y.stride(0),
                float(eps),
                IN_DTYPE=tl_dtype(x.dtype),
                **cfg,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.num_sms = num_sms
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, H = x2.shape
        dy2 = _as_rows(dy, H)
        dx = torch.empty((n, H), dtype=x2.dtype, device=x2.device)
        need_dw = ctx.needs_input_grad[1]
        cfg = _config(H)
        nprog = num_programs(triton.cdiv(n, cfg["BLOCK_ROWS"]), ctx.num_sms)
        dw_part = (
            torch.zeros((nprog, H), dtype=torch.float32, device=x2.device) if need_dw else rstd
        )
        if n > 0:
            _rmsnorm_bwd_kernel[(nprog,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_part,
                n,
                H,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                HAS_DW=need_dw,
                **cfg,
            )
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        dx_out = dx.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx_out, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, num_sms: int) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., H] with ``weight`` [H]; grads for x and weight."""
    num_sms = check_num_sms(num_sms)
    check_float("x", x)
    check_float("weight", weight)
    check_device(("x", x), ("weight", weight))
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: weight must be 1-D of size "
            "x.shape[-1]"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _RMSNormFn.apply(x, weight, float(eps), num_sms)
