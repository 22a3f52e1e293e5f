"""The reference ops in torch: what ``kernels="torch"`` runs, and what the Triton kernels are
checked against.

Each op of the training graph (``graph.py``) is a small function here: RMSNorm, RoPE, packed
causal grouped-query attention, the LoRA projection, SwiGLU and the chunked cross-entropy of the
lm_head (vocabulary-parallel at TP > 1). ``ops.py``'s ``TorchOps`` calls them; ``TritonOps``
calls the ``harli_kernels`` kernels with the same maths, and the kernel tests compare the two
against these very functions. Imports run one way: ``graph`` -> ``ops`` -> ``torch_ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LoraPair
from .parallel import TensorParallel

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 4096


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op, not a copy, when dtypes match


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled in the input dtype (as Llama/Qwen2 do)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _as(weight, x.dtype) * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [tokens, head_dim] (computed in fp32) for the rotate-half layout."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by position (NeoX/rotate-half style)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: tuple[int, ...]
) -> torch.Tensor:
    """Causal attention within each packed sequence, grouped-query.

    q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]. One SDPA call per run of consecutive
    sequences of equal length, batched ([n, heads, length, D] views of the packed rows): memory
    stays linear in the micro-batch (no [T, T] block-diagonal mask), and a batch of equal
    lengths, the common case, costs one call per layer instead of one per sequence (each call
    is a handful of ops forward and backward: on a busy CPU or a GPU their count is the cost).
    """
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, count, length in _equal_length_runs(cu_seqlens):
        qs, ks, vs = (_heads_first(x, start, count, length) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).reshape(count * length, q.shape[1] * q.shape[2]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _heads_first(x: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """Rows ``start ..`` of ``x`` [T, H, D] as ``count`` sequences: [count, H, length, D]."""
    return x[start : start + count * length].unflatten(0, (count, length)).transpose(1, 2)


def _equal_length_runs(cu_seqlens: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(first row, number of sequences, length) of each run of consecutive equal lengths."""
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        if runs and runs[-1][2] == end - start:
            first, count, length = runs[-1]
            runs[-1] = (first, count + 1, length)
        else:
            runs.append((start, 1, end - start))
    return runs


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: LoraPair | None,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T``; adapters cast to ``x``'s dtype."""
    y = F.linear(x, _as(weight, x.dtype), None if bias is None else _as(bias, x.dtype))
    if lora is None:
        return y
    x_in = x if dropout_mask is None else x * dropout_mask
    down = F.linear(x_in, _as(lora.A, x.dtype))
    # y += scaling * down B^T, one GEMM accumulating into y in place: no [tokens, out]
    # temporaries for the scaled product, the sum or a copy of y, forward or backward (where
    # the scaling lands on the rank-r factors instead), unlike PEFT's
    # `y + lora_B(lora_A(x)) * scaling`. In place is safe: no backward reads y (a linear's
    # backward reads its input and weight), and autograd's version check would catch it.
    y2 = y.view(-1, y.shape[-1])
    y2.addmm_(down.reshape(-1, down.shape[-1]), _as(lora.B, x.dtype).t(), alpha=scaling)
    return y


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``x @ weight^T`` without materialising all logits at once.

    Rows go in blocks whose fp32 logits over the whole vocabulary hold at most
    ``token_chunk x vocab_chunk`` values. When ``x`` needs a gradient (``with_grad``), the
    forward forms it from the very logits it just computed, ``(softmax - onehot) @ weight``,
    and keeps only that ([tokens, hidden]); backward scales it by the incoming gradient. So the
    lm_head GEMM runs twice per step (logits, gradient), not three times (logits, then the
    logits again in backward, then the gradient). ``weight`` is frozen: it gets no gradient.

    With ``tp`` the vocabulary is split across tensor-parallel ranks: ``weight`` holds the rows
    from ``vocab_start``, and per block the ranks agree on the logits' max (one all-reduce) and
    on the sum of their exponentials and the target's logit (another), so every rank gets the
    whole loss; the gradient of the (replicated) ``x`` is summed once at the end. Blocks are
    sized by the whole vocabulary (``vocab_size``), so every rank runs as many.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_start, vocab_size, chunks, with_grad, tp):
        vocab_chunk, token_chunk = chunks
        local = targets - vocab_start
        inside = (local >= 0) & (local < weight.shape[0])
        local = torch.where(inside, local, torch.zeros_like(local))[:, None]
        losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if with_grad else None
        block = max(1, (token_chunk * vocab_chunk) // vocab_size)
        for r0 in range(0, x.shape[0], block):
            rows = slice(r0, r0 + block)
            logits = _logits(x[rows], weight, vocab_chunk)  # fp32 [rows, (local) vocab]
            top = _reduce(logits.amax(dim=-1, keepdim=True), tp, "max")
            t, here = local[rows], inside[rows, None]
            picked = logits.gather(1, t) * here  # the target's logit, on the rank that has it
            e = logits.sub_(top).exp_()  # in place: exp(logit - max)
            sums = _reduce(torch.cat((e.sum(dim=-1, keepdim=True), picked), dim=1), tp, "sum")
            total = sums[:, :1]
            losses[rows] = (total.log() - (sums[:, 1:] - top))[:, 0]  # lse - logit[target]
            if with_grad:
                prob = e.div_(total)  # softmax, in place
                prob.scatter_add_(1, t, -here.to(prob.dtype))  # - onehot, where it is ours
                grad_x[rows] = _times_weight(prob, weight, x.dtype, vocab_chunk)
        if with_grad:
            _reduce(grad_x, tp, "sum")
        ctx.save_for_backward(grad_x)
        ctx.x_dtype = x.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError("chunked_cross_entropy ran without with_grad: no gradient kept")
        return (grad_x * grad_loss).to(ctx.x_dtype), None, None, None, None, None, None, None


def _reduce(t: torch.Tensor, tp: TensorParallel | None, op: str) -> torch.Tensor:
    return t if tp is None else tp.all_reduce(t, op=op)


def _logits(x: torch.Tensor, weight: torch.Tensor, vocab_chunk: int) -> torch.Tensor:
    """fp32 ``x @ weight^T``, the GEMM in ``x``'s dtype; a ``weight`` of another dtype is cast
    one vocabulary chunk at a time (never a copy of the whole lm_head)."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight).float()  # .float(): no copy in float32
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk]
        out[:, v0 : v0 + w.shape[0]] = F.linear(x, w.to(x.dtype))
    return out


def _times_weight(
    prob: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, vocab_chunk: int
) -> torch.Tensor:
    """fp32 ``prob @ weight``, the GEMM in ``dtype`` (``weight`` cast chunk by chunk if needed)."""
    if weight.dtype == dtype:
        return (prob.to(dtype) @ weight).float()
    out = torch.zeros(prob.shape[0], weight.shape[1], dtype=torch.float32, device=prob.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk]
        out += (prob[:, v0 : v0 + w.shape[0]].to(dtype) @ w.to(dtype)).float()
    return out


def chunked_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    tp: TensorParallel | None = None,
) -> torch.Tensor:
    """Sum over rows of ``-log softmax(x @ weight^T)[target]``; every target must be valid.
    With ``tp``, ``weight`` is this rank's rows of a ``vocab_size`` vocabulary, from
    ``vocab_start``."""
    with_grad = torch.is_grad_enabled() and x.requires_grad
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    chunks = (vocab_chunk, token_chunk)
    return _ChunkedCrossEntropy.apply(
        x, weight, targets, vocab_start, vocab_size, chunks, with_grad, tp
    )
