"""Causal attention for training on packed variable-length sequences (GQA), persistent grid.

``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` hold several sequences back to back; ``cu_seqlens``
(int32 ``[n + 1]``, ``cu[0] = 0``, ``cu[n] = T``) delimits them and every token attends causally
to the earlier tokens of its own sequence only.  Query head ``h`` uses kv head
``h // (Hq // Hkv)`` (the layout of HF ``repeat_kv``).

Flash-attention style (online softmax, fp32 statistics, ``log2`` domain), written for a
persistent grid:

* forward: tiles ``(query block, sequence, query head)``; the query blocks with the most keys come
  first so the persistent programs finish together.  Saves ``o`` and the row log-sum-exp.
* backward, two persistent kernels without atomics (deterministic):
  ``dq`` over the forward's tiles (it also computes ``delta = rowsum(dO * O)``), then
  ``dk``/``dv`` over tiles ``(key block, sequence, kv head)``, each looping over the query heads
  of its GQA group and the query blocks at or after the key block.

Tiles beyond a sequence's length (the grid is sized by ``max_seqlen``) exit immediately.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._grid import (
    check_device,
    check_float,
    compute_dtype,
    mma,
    next_pow2,
    num_programs,
    tl_dtype,
    upcast_dots,
)
from .launch import check_num_sms, interpreting

__all__ = ["causal_attention_varlen"]

_LOG2E = 1.4426950408889634
_NEG = -1.0e30


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_ptr,
    n_seqs,
    max_blocks,
    HQ,
    GROUP,
    D,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    qk_scale,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = max_blocks * n_seqs * HQ
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for tile in range(pid, num_tiles, nprog):
        head = tile % HQ
        rest = tile // HQ
        seq = rest % n_seqs
        blk = max_blocks - 1 - rest // n_seqs
        start = tl.load(cu_ptr + seq)
        L = tl.load(cu_ptr + seq + 1) - start
        m_start = blk * BLOCK_M
        if m_start < L:
            kvh = head // GROUP
            rows = m_start + tl.arange(0, BLOCK_M)
            mask_m = rows < L
            tok = (start + rows).to(tl.int64)
            q = tl.load(
                q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            ).to(COMPUTE)
            m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            kv_hi = tl.minimum(L, m_start + BLOCK_M)
            for n0 in range(0, kv_hi, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                mask_n = cols < kv_hi
                ktok = (start + cols).to(tl.int64)
                kt = tl.load(
                    k_ptr + ktok[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                    mask=mask_d[:, None] & mask_n[None, :],
                    other=0.0,
                ).to(COMPUTE)
                s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
                s = s * qk_scale
                valid = (cols[None, :] <= rows[:, None]) & mask_n[None, :]
                s = tl.where(valid, s, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vb = tl.load(
                    v_ptr + ktok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(COMPUTE)
                acc = acc * alpha[:, None]
                acc = mma(p.to(COMPUTE), vb, acc, UPCAST)
                m_i = m_new
            acc = acc / l_i[:, None]
            tl.store(
                o_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                acc.to(o_ptr.dtype.element_ty),
                mask=mask_m[:, None] & mask_d[None, :],
            )
            tl.store(lse_ptr + head * stride_lh + start + rows, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_ptr,
    n_seqs,
    max_blocks,
    HQ,
    GROUP,
    D,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    qk_scale,
    sm_scale,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = max_blocks * n_seqs * HQ
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for tile in range(pid, num_tiles, nprog):
        head = tile % HQ
        rest = tile // HQ
        seq = rest % n_seqs
        blk = max_blocks - 1 - rest // n_seqs
        start = tl.load(cu_ptr + seq)
        L = tl.load(cu_ptr + seq + 1) - start
        m_start = blk * BLOCK_M
        if m_start < L:
            kvh = head // GROUP
            rows = m_start + tl.arange(0, BLOCK_M)
            mask_m = rows < L
            mask_md = mask_m[:, None] & mask_d[None, :]
            tok = (start + rows).to(tl.int64)
            q = tl.load(
                q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_md,
                other=0.0,
            ).to(COMPUTE)
            do = tl.load(
                do_ptr + tok[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                mask=mask_md,
                other=0.0,
            )
            o = tl.load(
                o_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=mask_md,
                other=0.0,
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            tl.store(delta_ptr + head * stride_lh + start + rows, delta, mask=mask_m)
            do = do.to(COMPUTE)
            lse = tl.load(lse_ptr + head * stride_lh + start + rows, mask=mask_m, other=0.0)
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            kv_hi = tl.minimum(L, m_start + BLOCK_M)
            for n0 in range(0, kv_hi, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                mask_n = cols < kv_hi
                ktok = (start + cols).to(tl.int64)
                kb = tl.load(
                    k_ptr + ktok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(COMPUTE)
                vt = tl.load(
                    v_ptr + ktok[None, :] * stride_vt + kvh * stride_vh + offs_d[:, None],
                    mask=mask_d[:, None] & mask_n[None, :],
                    other=0.0,
                ).to(COMPUTE)
                s = mma(q, tl.trans(kb), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
                valid = (cols[None, :] <= rows[:, None]) & mask_n[None, :] & mask_m[:, None]
                p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
                dp = mma(do, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
                ds = p * (dp - delta[:, None])
                dq = mma(ds.to(COMPUTE), kb, dq, UPCAST)
            dq = dq * sm_scale
            tl.store(
                dq_ptr + tok[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                dq.to(dq_ptr.dtype.element_ty),
                mask=mask_md,
            )


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_ptr,
    n_seqs,
    max_blocks,
    HKV,
    GROUP,
    D,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    qk_scale,
    sm_scale,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = max_blocks * n_seqs * HKV
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for tile in range(pid, num_tiles, nprog):
        kvh = tile % HKV
        rest = tile // HKV
        seq = rest % n_seqs
        blk = rest // n_seqs  # early key blocks see the most queries: schedule them first
        start = tl.load(cu_ptr + seq)
        L = tl.load(cu_ptr + seq + 1) - start
        n_start = blk * BLOCK_N
        if n_start < L:
            cols = n_start + tl.arange(0, BLOCK_N)
            mask_n = cols < L
            mask_nd = mask_n[:, None] & mask_d[None, :]
            ktok = (start + cols).to(tl.int64)
            kb = tl.load(
                k_ptr + ktok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=mask_nd,
                other=0.0,
            ).to(COMPUTE)
            vb = tl.load(
                v_ptr + ktok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=mask_nd,
                other=0.0,
            ).to(COMPUTE)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            m_lo = (n_start // BLOCK_M) * BLOCK_M
            for g in range(0, GROUP):
                head = kvh * GROUP + g
                for m0 in range(m_lo, L, BLOCK_M):
                    rows = m0 + tl.arange(0, BLOCK_M)
                    mask_m = rows < L
                    mask_md = mask_m[:, None] & mask_d[None, :]
                    tok = (start + rows).to(tl.int64)
                    q = tl.load(
                        q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                        mask=mask_md,
                        other=0.0,
                    ).to(COMPUTE)
                    do = tl.load(
                        do_ptr + tok[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                        mask=mask_md,
                        other=0.0,
                    ).to(COMPUTE)
                    lse = tl.load(lse_ptr + head * stride_lh + start + rows, mask=mask_m, other=0.0)
                    delta = tl.load(
                        delta_ptr + head * stride_lh + start + rows, mask=mask_m, other=0.0
                    )
                    st = mma(
                        kb, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), UPCAST
                    )
                    valid = (rows[None, :] >= cols[:, None]) & mask_m[None, :] & mask_n[:, None]
                    pt = tl.where(valid, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
                    dv = mma(pt.to(COMPUTE), do, dv, UPCAST)
                    dpt = mma(
                        vb, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), UPCAST
                    )
                    dst = pt * (dpt - delta[None, :])
                    dk = mma(dst.to(COMPUTE), q, dk, UPCAST)
            dk = dk * sm_scale
            tl.store(
                dk_ptr + ktok[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                dk.to(dk_ptr.dtype.element_ty),
                mask=mask_nd,
            )
            tl.store(
                dv_ptr + ktok[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
                dv.to(dv_ptr.dtype.element_ty),
                mask=mask_nd,
            )


def _config(D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    block_d = max(16, next_pow2(D))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4)
    # fp32 tiles take twice the shared memory: halve the blocks (sm_80 allows ~163 KiB per CTA)
    bm = 64 if block_d <= 128 and dtype != torch.float32 else 32
    warps = 8 if block_d >= 128 else 4  # two [64, D] fp32 accumulators in the dk/dv kernel
    return dict(BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=block_d, num_warps=warps, num_stages=2)


class _AttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, num_sms):
        T, HQ, D = q.shape
        HKV = k.shape[1]
        n_seqs = cu_seqlens.numel() - 1
        cfg = _config(D, q.dtype)
        cd = tl_dtype(compute_dtype(q.dtype, k.dtype, v.dtype))
        o = torch.empty((T, HQ, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((HQ, T), dtype=torch.float32, device=q.device)
        max_blocks = triton.cdiv(max_seqlen, cfg["BLOCK_M"])
        tiles = max_blocks * n_seqs * HQ
        if tiles > 0 and T > 0:
            _attn_fwd_kernel[(num_programs(tiles, num_sms),)](
                q,
                k,
                v,
                o,
                lse,
                cu_seqlens,
                n_seqs,
                max_blocks,
                HQ,
                HQ // HKV,
                D,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                v.stride(0),
                v.stride(1),
                o.stride(0),
                o.stride(1),
                lse.stride(0),
                softmax_scale * _LOG2E,
                COMPUTE=cd,
                UPCAST=upcast_dots(),
                **cfg,
            )
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        ctx.num_sms = num_sms
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        T, HQ, D = q.shape
        HKV = k.shape[1]
        n_seqs = cu_seqlens.numel() - 1
        cfg = _config(D, q.dtype)
        cd = tl_dtype(compute_dtype(q.dtype, k.dtype, v.dtype))
        if do.stride(2) != 1:
            do = do.contiguous()
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        delta = torch.empty_like(lse)
        scale = ctx.softmax_scale
        if T == 0 or n_seqs == 0:
            return dq, dk, dv, None, None, None, None
        max_blocks_m = triton.cdiv(ctx.max_seqlen, cfg["BLOCK_M"])
        max_blocks_n = triton.cdiv(ctx.max_seqlen, cfg["BLOCK_N"])
        _attn_bwd_dq_kernel[(num_programs(max_blocks_m * n_seqs * HQ, ctx.num_sms),)](
            q,
            k,
            v,
            o,
            do,
            lse,
            delta,
            dq,
            cu_seqlens,
            n_seqs,
            max_blocks_m,
            HQ,
            HQ // HKV,
            D,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            o.stride(0),
            o.stride(1),
            do.stride(0),
            do.stride(1),
            dq.stride(0),
            dq.stride(1),
            lse.stride(0),
            scale * _LOG2E,
            scale,
            COMPUTE=cd,
            UPCAST=upcast_dots(),
            **cfg,
        )
        _attn_bwd_dkdv_kernel[(num_programs(max_blocks_n * n_seqs * HKV, ctx.num_sms),)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            cu_seqlens,
            n_seqs,
            max_blocks_n,
            HKV,
            HQ // HKV,
            D,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            do.stride(0),
            do.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            lse.stride(0),
            scale * _LOG2E,
            scale,
            COMPUTE=cd,
            UPCAST=upcast_dots(),
            **cfg,
        )
        return dq, dk, dv, None, None, None, None


def causal_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_sms: int,
    *,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention inside each packed sequence; returns ``o [T, Hq, D]`` in q's dtype.

    ``max_seqlen`` (longest sequence) sizes the grid; when None it is read from ``cu_seqlens``
    (one host sync, which also validates ``cu_seqlens``; when given, ``cu_seqlens`` is
    trusted: ``cu[0] == 0``, non-decreasing, ``cu[-1] == T``).  ``softmax_scale`` defaults to
    ``1/sqrt(D)``.  Gradients for q, k and v.
    """
    num_sms = check_num_sms(num_sms)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got {tuple(t.shape)}")
    check_device(("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens))
    T, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [{T}, Hkv, {D}]")
    HKV = k.shape[1]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({HKV})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [n + 1] with n >= 1, got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if max_seqlen is None:
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if bounds[0] != 0 or bounds[-1] != T or min(lengths) < 0:
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {bounds}"
            )
        max_seqlen = max(lengths)
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= 0, got {max_seqlen!r}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a unit stride on head_dim")
    return _AttnFn.apply(q, k, v, cu_seqlens.contiguous(), int(max_seqlen), scale, num_sms)
