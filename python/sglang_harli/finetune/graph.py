"""The training graph: a Llama/Qwen2 decoder as plain functions over packed sequences.

Each op is a small function here, in torch: the reference implementation. The model-level
functions (``decoder_layer``, ``head_loss_sum``, ...) call the ops through the ``Ops`` object
of their ``GraphContext`` (``ops.py``), which is either these torch functions or the
``harli_kernels`` Triton kernels; the model itself is written once. Activations are
``[tokens, features]`` with every sequence of a micro-batch packed end to end; attention keeps
sequences apart. Base weights are frozen views (no ``requires_grad``), so autograd only ever
produces gradients for adapters and activations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .base_model import BaseModelView, LayerWeights, ModelConfig, RopeConfig
from .data import IGNORE_INDEX, PackedBatch
from .lora import DropoutPlan, LoraAdapters, LoraConfig, LoraPair
from .parallel import ROW_PARALLEL, TensorParallel, copy_to, reduce_from

if TYPE_CHECKING:
    from .ops import Ops

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 4096


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op, not a copy, when dtypes match


# --- ops -------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled in the input dtype (as Llama/Qwen2 do)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _as(weight, x.dtype) * xf.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, device: torch.device | None = None):
    """Inverse frequencies [head_dim / 2] in fp32, with linear or Llama 3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


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


# --- the model -------------------------------------------------------------------------------


@dataclasses.dataclass
class GraphContext:
    """What every layer of one micro-batch shares: the batch, the ops backend and what it
    precomputed (RoPE tables, sequence boundaries), dtype, dropout."""

    batch: PackedBatch
    dtype: torch.dtype
    ops: Ops
    rope: Any  # ops.rope_tables(...): handed back to ops.apply_rope
    seqs: Any  # ops.sequences(...): handed back to ops.attention
    lora: LoraConfig | None
    dropout: DropoutPlan | None
    tp: TensorParallel | None = None  # the view's: its ranks hold shards of every layer


def make_context(
    view: BaseModelView,
    adapters: LoraAdapters | None,
    batch: PackedBatch,
    dtype: torch.dtype | None = None,
    training: bool = False,
    ops: Ops | None = None,
) -> GraphContext:
    """``ops``: the backend (``ops.make_ops``); None: the torch functions of this module."""
    if ops is None:
        from .ops import TorchOps  # ops.py imports this module

        ops = TorchOps()
    dtype = dtype or view.dtype
    inv_freq = rope_inv_freq(view.config.rope, view.config.head_dim, batch.positions.device)
    rope = ops.rope_tables(batch, inv_freq, dtype)
    lora = adapters.config if adapters is not None else None
    dropout = None
    if training and lora is not None and lora.dropout > 0:
        dropout = DropoutPlan(lora.dropout, batch.seeds, batch.lengths)
    return GraphContext(batch, dtype, ops, rope, ops.sequences(batch), lora, dropout, view.tp)


def embed(view: BaseModelView, ctx: GraphContext) -> torch.Tensor:
    if view.tp is None:
        return _as(F.embedding(ctx.batch.input_ids, view.embed_tokens), ctx.dtype)
    # vocabulary parallel: each rank looks up the ids in its rows, zeros elsewhere, then a sum
    ids = ctx.batch.input_ids - view.vocab_start
    inside = (ids >= 0) & (ids < view.embed_tokens.shape[0])
    h = F.embedding(torch.where(inside, ids, torch.zeros_like(ids)), view.embed_tokens)
    return view.tp.all_reduce(_as(h * inside[:, None], ctx.dtype))


def decoder_layer(
    h: torch.Tensor,
    index: int,
    weights: LayerWeights,
    lora: dict[str, LoraPair] | None,
    config: ModelConfig,
    ctx: GraphContext,
) -> torch.Tensor:
    """One pre-norm decoder layer: h + attn(norm(h)), then + swiglu MLP(norm(.)).

    ``config`` holds this rank's shapes (``view.local``). At tensor parallel size > 1 the
    normed inputs of the column parallel projections pass :func:`~.parallel.copy_to` (their
    gradient is summed over the ranks) and the row parallel outputs are summed
    (:func:`~.parallel.reduce_from`), their bias added once after the sum.
    """
    lora = lora or {}
    scaling = ctx.lora.scaling if ctx.lora is not None else 0.0
    ops, tp = ctx.ops, ctx.tp

    def proj(name: str, x: torch.Tensor) -> torch.Tensor:
        row_parallel = tp is not None and name in ROW_PARALLEL
        mask = None
        if ctx.dropout is not None and name in lora:
            if row_parallel:  # this rank's columns of the whole input's mask
                whole = x.shape[-1] * tp.size
                mask = ctx.dropout.mask(index, name, whole, x.device, x.dtype)[:, tp.slice(whole)]
            else:
                mask = ctx.dropout.mask(index, name, x.shape[-1], x.device, x.dtype)
        bias = weights.biases.get(name)
        w, a = weights.weight(name), lora.get(name)
        if not row_parallel:
            return ops.lora_linear(x, w, bias, a, scaling, mask)
        y = reduce_from(ops.lora_linear(x, w, None, a, scaling, mask), tp)
        return y if bias is None else y + _as(bias, y.dtype)

    tokens, hd = h.shape[0], config.head_dim
    x = ops.rms_norm(h, weights.input_norm, config.rms_norm_eps)
    if tp is not None:
        x = copy_to(x, tp)
    q = proj("q_proj", x).view(tokens, config.num_heads, hd)
    k = proj("k_proj", x).view(tokens, config.num_kv_heads, hd)
    v = proj("v_proj", x).view(tokens, config.num_kv_heads, hd)
    q, k = ops.apply_rope(q, ctx.rope), ops.apply_rope(k, ctx.rope)
    h = h + proj("o_proj", ops.attention(q, k, v, ctx.seqs))
    x = ops.rms_norm(h, weights.post_norm, config.rms_norm_eps)
    if tp is not None:
        x = copy_to(x, tp)
    return h + proj("down_proj", ops.swiglu(proj("gate_proj", x), proj("up_proj", x)))


def layer_forward(
    view: BaseModelView,
    adapters: LoraAdapters | None,
    index: int,
    h: torch.Tensor,
    ctx: GraphContext,
) -> torch.Tensor:
    lora = adapters.layers[index] if adapters is not None else None
    return decoder_layer(h, index, view.layers[index], lora, view.local, ctx)


def head_loss_sum(
    view: BaseModelView,
    h: torch.Tensor,
    ctx: GraphContext,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> torch.Tensor:
    """Summed next-token loss over the batch's targets (final norm + chunked lm_head CE)."""
    valid = ctx.batch.targets != IGNORE_INDEX
    x = ctx.ops.rms_norm(h[valid], view.final_norm, view.config.rms_norm_eps)
    if view.tp is not None:  # the vocabulary-parallel loss (the torch one, whatever the ops)
        return chunked_cross_entropy(
            x,
            view.lm_head,
            ctx.batch.targets[valid],
            vocab_chunk,
            token_chunk,
            vocab_start=view.vocab_start,
            vocab_size=view.config.vocab_size,
            tp=view.tp,
        )
    return ctx.ops.cross_entropy_sum(
        x, view.lm_head, ctx.batch.targets[valid], vocab_chunk, token_chunk
    )


def final_hidden(
    view: BaseModelView, adapters: LoraAdapters | None, ctx: GraphContext
) -> torch.Tensor:
    h = embed(view, ctx)
    for i in range(view.config.num_layers):
        h = layer_forward(view, adapters, i, h, ctx)
    return h


def logits(
    view: BaseModelView,
    adapters: LoraAdapters | None,
    batch: PackedBatch,
    dtype: torch.dtype | None = None,
    ops: Ops | None = None,
) -> torch.Tensor:
    """Full logits [tokens, vocab] in fp32, no dropout (evaluation and checks; not training)."""
    if view.tp is not None:
        raise NotImplementedError("whole logits of a tensor-parallel shard (use loss_sum)")
    with torch.no_grad():
        ctx = make_context(view, adapters, batch, dtype, ops=ops)
        h = final_hidden(view, adapters, ctx)
        h = ctx.ops.rms_norm(h, view.final_norm, view.config.rms_norm_eps)
        return ctx.ops.lora_linear(h, view.lm_head, None, None, 0.0).float()


def loss_sum(
    view: BaseModelView,
    adapters: LoraAdapters | None,
    batch: PackedBatch,
    dtype: torch.dtype | None = None,
    training: bool = True,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    ops: Ops | None = None,
) -> torch.Tensor:
    """The whole micro-batch in one autograd graph (no checkpointing): for checks and tools.

    The trainer runs the same functions layer by layer instead (see ``trainer.py``).
    """
    ctx = make_context(view, adapters, batch, dtype, training, ops)
    return head_loss_sum(view, final_hidden(view, adapters, ctx), ctx, vocab_chunk)


# --- cost model ------------------------------------------------------------------------------


def layer_forward_flops(config: ModelConfig, lora: LoraConfig | None, lengths) -> float:
    """Multiply-adds x 2 of one layer's forward over sequences of ``lengths`` tokens."""
    tokens = sum(lengths)
    linear = 0
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        fan_in, fan_out = config.projection_shape(name)
        linear += fan_in * fan_out
        if lora is not None and name in lora.target_modules:
            linear += lora.r * (fan_in + fan_out)
    # QK^T and PV over the causal half of each sequence.
    attn = 2 * sum(n * (n + 1) // 2 for n in lengths) * config.num_heads * config.head_dim
    return 2.0 * (tokens * linear + attn)


def head_forward_flops(config: ModelConfig, num_targets: int) -> float:
    return 2.0 * num_targets * config.hidden_size * config.vocab_size
