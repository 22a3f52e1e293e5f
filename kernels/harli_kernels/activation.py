"""SwiGLU (``silu(gate) * up``) forward and backward on a persistent, SM-limited grid.

``gate`` and ``up`` are ``[..., I]`` tensors with a unit stride on the last dim (row strides are
free, so they can be the two halves of a fused gate_up projection).  Math is fp32, outputs are in
the inputs' dtype.  The backward recomputes ``silu`` from the saved inputs:

``d_gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))``,  ``d_up = dy * silu(g)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import check_device, check_float, num_programs
from .launch import check_num_sms, interpreting

__all__ = ["swiglu"]


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,
    u_ptr,
    y_ptr,
    n_rows,
    n_cols,
    stride_g,
    stride_u,
    stride_y,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_c = tl.cdiv(n_cols, BLOCK_COLS)
    num_tiles = tl.cdiv(n_rows, BLOCK_ROWS) * num_c
    for tile in range(pid, num_tiles, nprog):
        rows = (tile // num_c) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = (tile % num_c) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        y = g * tl.sigmoid(g) * u.to(tl.float32)
        tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n_rows,
    n_cols,
    stride_dy,
    stride_g,
    stride_u,
    stride_d,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_c = tl.cdiv(n_cols, BLOCK_COLS)
    num_tiles = tl.cdiv(n_rows, BLOCK_ROWS) * num_c
    for tile in range(pid, num_tiles, nprog):
        rows = (tile // num_c) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = (tile % num_c) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        g = g.to(tl.float32)
        u = u.to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        du = dy * silu
        offs = rows64 * stride_d + cols[None, :]
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


def _config(n_cols: int) -> dict:
    if interpreting():
        return dict(BLOCK_ROWS=2, BLOCK_COLS=16, num_warps=4)
    return dict(BLOCK_ROWS=4, BLOCK_COLS=1024, num_warps=4)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _grid(n_rows: int, n_cols: int, cfg: dict, num_sms: int) -> tuple[int]:
    tiles = triton.cdiv(n_rows, cfg["BLOCK_ROWS"]) * triton.cdiv(n_cols, cfg["BLOCK_COLS"])
    return (num_programs(tiles, num_sms),)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, num_sms):
        g2, u2 = _rows(gate), _rows(up)
        n, cols = g2.shape
        y = torch.empty((n, cols), dtype=gate.dtype, device=gate.device)
        cfg = _config(cols)
        if y.numel() > 0:
            _swiglu_fwd_kernel[_grid(n, cols, cfg, num_sms)](
                g2, u2, y, n, cols, g2.stride(0), u2.stride(0), y.stride(0), **cfg
            )
        ctx.save_for_backward(g2, u2)
        ctx.num_sms = num_sms
        ctx.shape = gate.shape
        return y.reshape(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n, cols = g2.shape
        dy2 = _rows(dy)
        dg = torch.empty((n, cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty_like(dg)
        cfg = _config(cols)
        if dg.numel() > 0:
            _swiglu_bwd_kernel[_grid(n, cols, cfg, ctx.num_sms)](
                dy2,
                g2,
                u2,
                dg,
                du,
                n,
                cols,
                dy2.stride(0),
                g2.stride(0),
                u2.stride(0),
                dg.stride(0),
                **cfg,
            )
        return dg.reshape(ctx.shape), du.reshape(ctx.shape), None


def swiglu(gate: torch.Tensor, up: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``/``up`` of equal shape [..., I] and dtype."""
    num_sms = check_num_sms(num_sms)
    check_float("gate", gate)
    check_float("up", up)
    check_device(("gate", gate), ("up", up))
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate dtype {gate.dtype} differs from up dtype {up.dtype}")
    return _SwiGLUFn.apply(gate, up, num_sms)
