"""Cross-entropy fused with the LM head, in vocabulary chunks, on a persistent grid.

``loss = CE(hidden @ lm_head_w^T, labels)`` without ever materialising the ``[T, V]`` logits:

* forward: one persistent kernel over tiles ``(token block, vocabulary chunk)``.  A tile computes
  its logits block by block (``hidden @ W_chunk^T``, fp32 accumulation) and keeps an online
  (max, sum-exp) per token; it writes these two numbers per token and chunk (``[n_chunks, T]``)
  plus the target logit when the label falls in its chunk.  A tiny torch reduction turns the
  per-chunk statistics into ``lse`` and the loss.
* backward (d_hidden only, the LM head is frozen): for each vocabulary chunk one persistent
  kernel recomputes the chunk's logits and writes ``g_t * (softmax - onehot)`` into a
  ``[T, chunk_size]`` scratch buffer, then a persistent GEMM adds ``scratch @ W_chunk`` into an
  fp32 ``d_hidden``.  Peak extra memory is ``T * chunk_size`` elements, not ``T * V``.

Labels equal to ``ignore_index`` (default -100) contribute neither loss nor gradient.
``reduction="mean"`` (default) divides by the number of non-ignored tokens (0 when every label
is ignored, instead of torch's NaN); ``"sum"`` returns the plain sum.  The loss is fp32.
Labels outside ``[0, V)`` other than ``ignore_index`` are not checked (host sync) and give
garbage.
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
    mma,
    num_programs,
    tl_dtype,
    upcast_dots,
)
from .launch import check_num_sms, interpreting
from .matmul import persistent_matmul

__all__ = ["fused_linear_cross_entropy"]


@triton.jit
def _logits_block(
    h_ptr,
    w_ptr,
    rt,
    rv,
    mask_t,
    mask_v,
    H,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    z = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rt.to(tl.int64)[:, None] * stride_ht
    w_cols = w_ptr + rv.to(tl.int64)[None, :] * stride_wv
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        mask_h = rh < H
        hb = tl.load(
            h_rows + rh[None, :] * stride_hh, mask=mask_t[:, None] & mask_h[None, :], other=0.0
        )
        wb = tl.load(
            w_cols + rh[:, None] * stride_wh, mask=mask_h[:, None] & mask_v[None, :], other=0.0
        )
        z = mma(hb.to(COMPUTE), wb.to(COMPUTE), z, UPCAST)
    return z


@triton.jit
def _lce_fwd_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    zt_ptr,
    T,
    V,
    H,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    chunk,
    n_chunks,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tb = tl.cdiv(T, BLOCK_T)
    num_tiles = num_tb * n_chunks
    for tile in range(pid, num_tiles, nprog):
        # neighbouring tiles share a vocabulary chunk (its W rows stay in L2)
        c = tile // num_tb
        rt = (tile % num_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rt < T
        labels = tl.load(labels_ptr + rt, mask=mask_t, other=-1).to(tl.int32)
        v_lo = c * chunk
        v_hi = tl.minimum(V, v_lo + chunk)
        m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        ssum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            rv = v0 + tl.arange(0, BLOCK_V)
            mask_v = rv < v_hi
            z = _logits_block(
                h_ptr,
                w_ptr,
                rt,
                rv,
                mask_t,
                mask_v,
                H,
                stride_ht,
                stride_hh,
                stride_wv,
                stride_wh,
                COMPUTE,
                UPCAST,
                BLOCK_T,
                BLOCK_V,
                BLOCK_H,
            )
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            zt += tl.sum(tl.where(rv[None, :] == labels[:, None], z, 0.0), axis=1)
        tl.store(m_ptr + c * T + rt, m, mask=mask_t)
        tl.store(s_ptr + c * T + rt, ssum, mask=mask_t)
        tl.store(zt_ptr + rt, zt, mask=mask_t & (labels >= v_lo) & (labels < v_hi))


@triton.jit
def _lce_dlogits_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    lse_ptr,
    g_ptr,
    d_ptr,
    T,
    H,
    v_lo,
    width,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dt,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # d[t, j] = g[t] * (softmax(z[t])[v_lo + j] - (labels[t] == v_lo + j)),  j < width
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tb = tl.cdiv(T, BLOCK_T)
    num_tiles = num_tb * tl.cdiv(width, BLOCK_V)
    for tile in range(pid, num_tiles, nprog):
        rj = (tile // num_tb) * BLOCK_V + tl.arange(0, BLOCK_V)
        rt = (tile % num_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rt < T
        mask_v = rj < width
        rv = v_lo + rj
        labels = tl.load(labels_ptr + rt, mask=mask_t, other=-1).to(tl.int32)
        lse = tl.load(lse_ptr + rt, mask=mask_t, other=0.0)
        g = tl.load(g_ptr + rt, mask=mask_t, other=0.0)
        z = _logits_block(
            h_ptr,
            w_ptr,
            rt,
            rv,
            mask_t,
            mask_v,
            H,
            stride_ht,
            stride_hh,
            stride_wv,
            stride_wh,
            COMPUTE,
            UPCAST,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
        )
        p = tl.exp(z - lse[:, None])
        p = tl.where(rv[None, :] == labels[:, None], p - 1.0, p)
        d = p * g[:, None]
        tl.store(
            d_ptr + rt.to(tl.int64)[:, None] * stride_dt + rj[None, :],
            d.to(d_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_v[None, :],
        )


def _config() -> dict:
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_V=16, BLOCK_H=16, num_warps=4)
    return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, num_sms, chunk_size, ignore_index, reduction):
        T, H = hidden.shape
        V = weight.shape[0]
        device = hidden.device
        cfg = _config()
        cd = compute_dtype(hidden.dtype, weight.dtype)
        chunk = min(chunk_size, V)
        n_chunks = triton.cdiv(V, chunk)
        valid = labels != ignore_index
        n_valid = valid.sum()
        if reduction == "mean":
            tok_w = valid.float() / n_valid.clamp_min(1).float()
        else:
            tok_w = valid.float()
        if T == 0:
            ctx.empty = True
            ctx.shape = (T, H)
            return torch.zeros((), dtype=torch.float32, device=device)
        ctx.empty = False
        m = torch.empty((n_chunks, T), dtype=torch.float32, device=device)
        s = torch.empty_like(m)
        zt = torch.zeros((T,), dtype=torch.float32, device=device)
        tiles = triton.cdiv(T, cfg["BLOCK_T"]) * n_chunks
        _lce_fwd_kernel[(num_programs(tiles, num_sms),)](
            hidden,
            weight,
            labels,
            m,
            s,
            zt,
            T,
            V,
            H,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            chunk,
            n_chunks,
            COMPUTE=tl_dtype(cd),
            UPCAST=upcast_dots(),
            **cfg,
        )
        m_max = m.max(dim=0).values
        lse = m_max + torch.log((s * torch.exp(m - m_max[None, :])).sum(dim=0))
        loss = ((lse - zt) * tok_w).sum()
        ctx.save_for_backward(hidden, weight, labels, lse, tok_w)
        ctx.num_sms = num_sms
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.empty:
            return None, None, None, None, None, None, None
        hidden, weight, labels, lse, tok_w = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        T, H = hidden.shape
        V = weight.shape[0]
        cfg = _config()
        cd = compute_dtype(hidden.dtype, weight.dtype)
        g = (tok_w * grad_loss.float()).contiguous()
        dh = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
        scratch = torch.empty((T, ctx.chunk), dtype=cd, device=hidden.device)
        num_tb = triton.cdiv(T, cfg["BLOCK_T"])
        for v_lo in range(0, V, ctx.chunk):
            width = min(ctx.chunk, V - v_lo)
            tiles = num_tb * triton.cdiv(width, cfg["BLOCK_V"])
            _lce_dlogits_kernel[(num_programs(tiles, ctx.num_sms),)](
                hidden,
                weight,
                labels,
                lse,
                g,
                scratch,
                T,
                H,
                v_lo,
                width,
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                scratch.stride(0),
                COMPUTE=tl_dtype(cd),
                UPCAST=upcast_dots(),
                **cfg,
            )
            persistent_matmul(
                scratch[:, :width],
                weight[v_lo : v_lo + width],
                ctx.num_sms,
                out=dh,
                accumulate=True,
                split_k=1,
            )
        return dh.to(hidden.dtype), None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_w: torch.Tensor,
    labels: torch.Tensor,
    num_sms: int,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden [T, H] @ lm_head_w [V, H]^T`` against ``labels [T]``.

    Returns an fp32 scalar: the mean over non-ignored tokens (``reduction="mean"``, default) or
    the sum (``"sum"``).  Backward gives ``d_hidden`` only; ``lm_head_w`` must be frozen.
    ``chunk_size`` is the vocabulary chunk (work unit of a tile; size of the backward scratch).
    """
    num_sms = check_num_sms(num_sms)
    check_float("hidden", hidden)
    check_float("lm_head_w", lm_head_w)
    check_ndim("hidden", hidden, 2)
    check_ndim("lm_head_w", lm_head_w, 2)
    check_device(("hidden", hidden), ("lm_head_w", lm_head_w), ("labels", labels))
    if hidden.shape[1] != lm_head_w.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and lm_head_w {tuple(lm_head_w.shape)} disagree on H"
        )
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({hidden.shape[0]},)")
    if lm_head_w.shape[0] < 1:
        raise ValueError("lm_head_w has an empty vocabulary")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if torch.is_grad_enabled() and lm_head_w.requires_grad:
        raise ValueError(
            "fused_linear_cross_entropy keeps lm_head_w frozen: set requires_grad=False"
        )
    return _FusedLinearCEFn.apply(
        hidden, lm_head_w, labels.contiguous(), num_sms, chunk_size, int(ignore_index), reduction
    )
