"""Rotary position embedding (neox / rotate-half style, as HF Llama) on a persistent grid.

Tensors are packed ``[tokens, heads, head_dim]`` with explicit per-token ``positions`` (packed
variable-length sequences restart their positions at 0).  For ``i < head_dim / 2``::

    y[i]        = x[i] * cos[p, i] - x[i + D/2] * sin[p, i]
    y[i + D/2]  = x[i + D/2] * cos[p, i] + x[i] * sin[p, i]

``cos``/``sin`` are ``[max_positions, head_dim / 2]`` fp32 tables indexed by position (the
finetune engine builds them with its own ``rope_inv_freq``/``rope_cos_sin``, see
``sglang_harli.finetune.ops.rope_position_tables``).  The rotation is computed in fp32 and
rounded once to x's dtype (HF rounds cos/sin to x's dtype first, so bf16 results can differ
from HF by one rounding).  The backward is the inverse
rotation (``sin -> -sin``) of the output gradient; only ``x`` gets a gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import check_device, check_float, next_pow2, num_programs
from .launch import check_num_sms, interpreting

__all__ = ["apply_rope"]


@triton.jit
def _rope_kernel(
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    T,
    H,
    HALF,
    stride_xt,
    stride_xh,
    stride_yt,
    stride_yh,
    stride_cs,
    sin_sign,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_hb = tl.cdiv(H, BLOCK_H)
    num_tiles = T * num_hb
    d = tl.arange(0, BLOCK_HALF)
    mask_d = d < HALF
    for tile in range(pid, num_tiles, nprog):
        t = tile // num_hb
        heads = (tile % num_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < H)[:, None] & mask_d[None, :]
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cos_ptr + pos * stride_cs + d, mask=mask_d, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_cs + d, mask=mask_d, other=0.0).to(tl.float32)
        s = s * sin_sign
        x_row = x_ptr + t.to(tl.int64) * stride_xt + heads[:, None] * stride_xh + d[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
        y_row = y_ptr + t.to(tl.int64) * stride_yt + heads[:, None] * stride_yh + d[None, :]
        tl.store(y_row, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_row + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, positions, cos, sin, sign, num_sms):
    T, H, D = x.shape
    half = D // 2
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_half = next_pow2(half)
    if interpreting():
        block_h = 2
    else:
        block_h = min(next_pow2(H), max(1, 4096 // block_half))
    tiles = T * triton.cdiv(H, block_h)
    _rope_kernel[(num_programs(tiles, num_sms),)](
        x,
        positions,
        cos,
        sin,
        y,
        T,
        H,
        half,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        cos.stride(0),
        float(sign),
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
    )
    return y


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, cos, sin, num_sms):
        ctx.save_for_backward(positions, cos, sin)
        ctx.num_sms = num_sms
        return _launch(x, positions, cos, sin, 1.0, num_sms)

    @staticmethod
    def backward(ctx, dy):
        positions, cos, sin = ctx.saved_tensors
        if dy.stride(2) != 1:
            dy = dy.contiguous()
        return _launch(dy, positions, cos, sin, -1.0, ctx.num_sms), None, None, None, None


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_sms: int,
) -> torch.Tensor:
    """Rotate ``x`` [T, H, D] by ``positions`` [T] (int32/int64) using ``cos``/``sin``
    [P, D/2] tables (positions must be < P; not checked, it would need a host sync)."""
    num_sms = check_num_sms(num_sms)
    check_float("x", x)
    check_float("cos", cos)
    check_float("sin", sin)
    check_device(("x", x), ("positions", positions), ("cos", cos), ("sin", sin))
    if x.dim() != 3:
        raise ValueError(f"x must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    T, _, D = x.shape
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.shape != (T,):
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected ({T},)")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D // 2:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [P, {D // 2}]"
        )
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    if x.stride(2) != 1:
        x = x.contiguous()
    return _RoPEFn.apply(x, positions.contiguous(), cos, sin, num_sms)
