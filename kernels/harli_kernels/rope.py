"""Rotary position embedding (neox / rotate-half style, as HF Llama) on a persistent grid.

Tensors are packed ``[tokens, heads, head_dim]`` with explicit per-token ``positions`` (packed
variable-length sequences restart their positions at 0).  For ``i < head_dim / 2``::

    y[i]        = x[i] * cos[p, i] - x[i + D/2] * sin[p, i]
    y[i + D/2]  = x[i + D/2] * cos[p, i] + x[i] * sin[p, i]

``cos``/``sin`` are ``[max_positions, head_dim / 2]`` fp32 tables built by
:func:`rope_cos_sin_cache` from ``theta`` and the rope type (``default`` or ``llama3`` with
``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
The rotation is computed in fp32 and rounded once to x's dtype (HF rounds cos/sin to x's dtype
first, so bf16 results can differ from HF by one rounding).  The backward is the inverse
rotation (``sin -> -sin``) of the output gradient; only ``x`` gets a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from ._grid import check_device, check_float, check_num_sms, interpreting, next_pow2, num_programs

__all__ = [
    "apply_rope",
    "apply_rope_reference",
    "rope_inv_freq",
    "rope_cos_sin",
    "rope_cos_sin_cache",
]


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


def apply_rope_reference(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Torch reference (HF ``rotate_half`` formulation in fp32; differentiable)."""
    c = cos.float()[positions.long()][:, None, :]
    s = sin.float()[positions.long()][:, None, :]
    c = torch.cat([c, c], dim=-1)
    s = torch.cat([s, s], dim=-1)
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    rope_type: str = "default",
    *,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (fp32, CPU) for ``default`` or ``llama3`` RoPE.

    llama3 (Llama 3.1+): wavelengths longer than ``original_max / low_freq_factor`` are stretched
    by ``factor``, those shorter than ``original_max / high_freq_factor`` are kept, and the band
    in between interpolates linearly in ``original_max / wavelength``.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r} (expected 'default' or 'llama3')")
    if factor <= 0 or high_freq_factor <= low_freq_factor or low_freq_factor <= 0:
        raise ValueError(
            "llama3 rope needs factor > 0 and high_freq_factor > low_freq_factor > 0, got "
            f"factor={factor}, low_freq_factor={low_freq_factor}, "
            f"high_freq_factor={high_freq_factor}"
        )
    orig = float(original_max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > orig / low_freq_factor
    short_wave = wavelen < orig / high_freq_factor
    ratio = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - ratio) * (inv_freq / factor) + ratio * inv_freq
    out = torch.where(long_wave, inv_freq / factor, blended)
    return torch.where(short_wave, inv_freq, out)


def rope_cos_sin(
    max_positions: int, inv_freq: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables ``[max_positions, D/2]`` (fp32) for positions ``0..max-1``."""
    inv = inv_freq.to(device=device, dtype=torch.float32)
    t = torch.arange(max_positions, device=inv.device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def rope_cos_sin_cache(
    max_positions: int,
    head_dim: int,
    theta: float = 10000.0,
    rope_scaling: Mapping | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables from HF-style config values: ``rope_scaling`` is None or a dict with ``rope_type``
    (or ``type``) in {default, llama3} and the llama3 keys (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``); a ``rope_theta`` key overrides
    ``theta`` (transformers 5 keeps it in ``rope_parameters``)."""
    kwargs = {}
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        theta = float(rope_scaling.get("rope_theta", theta))
        for key in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ):
            if rope_type == "llama3" and rope_scaling.get(key) is not None:
                kwargs[key] = rope_scaling[key]
    inv = rope_inv_freq(head_dim, theta, rope_type, **kwargs)
    return rope_cos_sin(max_positions, inv, device)
