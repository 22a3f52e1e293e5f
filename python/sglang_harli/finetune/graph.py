"""The training graph: a Llama/Qwen2 decoder as plain functions over packed sequences.

The model-level functions (``decoder_layer``, ``head_loss_sum``, ...) call the ops through the
``Ops`` object of their ``GraphContext`` (``ops.py``), which is either the torch reference ops
(``torch_ops.py``) or the ``harli_kernels`` Triton kernels; the model itself is written once.
Activations are ``[tokens, features]`` with every sequence of a micro-batch packed end to end;
attention keeps sequences apart. Base weights are frozen views (no ``requires_grad``), so
autograd only ever produces gradients for adapters and activations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .base_model import BaseModelView, LayerWeights, ModelConfig, RopeConfig
from .data import IGNORE_INDEX, PackedBatch
from .lora import DropoutPlan, LoraAdapters, LoraConfig, LoraPair
from .ops import Ops, TorchOps
from .parallel import ROW_PARALLEL, TensorParallel, copy_to, reduce_from
from .torch_ops import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, chunked_cross_entropy


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op, not a copy, when dtypes match


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
    """``ops``: the backend (``ops.make_ops``); None: the torch reference ops (``torch_ops``)."""
    if ops is None:
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
