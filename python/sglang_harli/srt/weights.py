"""The served model's frozen weights as a :class:`BaseModelView` (no copy).

SGLang's Llama/Qwen2 keep q|k|v rows fused in ``qkv_proj`` and gate|up rows in
``gate_up_proj``; the view slices them, so training reads the very tensors decode uses. With
``--enable-lora`` SGLang wraps the projections (``*WithLoRA``); their ``base_layer`` holds the
frozen weight.
"""

from __future__ import annotations

import torch

from sglang_harli.finetune.base_model import BaseModelView, FusedLayerWeights, ModelConfig
from sglang_harli.finetune.parallel import TensorParallel


def base_model_view(model: torch.nn.Module, tp: TensorParallel | None = None) -> BaseModelView:
    """A view of SGLang's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``; with ``tp`` (tensor
    parallel size > 1), of this rank's shards, as SGLang holds them: column parallel q|k|v and
    gate|up rows, row parallel o/down columns, the vocabulary rows from the embedding's
    ``shard_indices`` (the lm_head, tied or not, is sharded alike)."""
    config = ModelConfig.from_hf_config(model.config)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o = _linear(attn.qkv_proj), _linear(attn.o_proj)
        layers.append(
            FusedLayerWeights(
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
                qkv_proj=qkv.weight,
                o_proj=o.weight,
                gate_up_proj=_linear(mlp.gate_up_proj).weight,
                down_proj=_linear(mlp.down_proj).weight,
                qkv_bias=getattr(qkv, "bias", None),
                o_bias=getattr(o, "bias", None),
            )
        )
    vocab_start = 0
    if tp is not None:
        vocab_start = model.model.embed_tokens.shard_indices.org_vocab_start_index
        head = getattr(model.lm_head, "shard_indices", None)
        if head is not None and head.org_vocab_start_index != vocab_start:
            raise ValueError("the lm_head's vocabulary shard is not the embedding's")
    return BaseModelView.from_fused_layers(
        config,
        embed_tokens=model.model.embed_tokens.weight,
        layers=layers,
        final_norm=model.model.norm.weight,
        lm_head=model.lm_head.weight,
        tp=tp,
        vocab_start=vocab_start,
    )


def _linear(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)
