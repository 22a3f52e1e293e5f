"""BaseModelView: views not copies, fused and split layouts, model config and RoPE."""

import dataclasses
import types

import pytest
import torch

from sglang_harli.finetune import (
    BaseModelView,
    FusedLayerWeights,
    LoraConfig,
    ModelConfig,
    RopeConfig,
    graph,
    pack,
)

from .helpers import PeftReference, load_hf, perturb_b, random_examples, view_and_adapters


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_view_aliases_every_weight_and_never_grads_it(model_dirs, arch):
    hf = load_hf(model_dirs[arch])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4))
    hf_params = list(hf.parameters())
    # Every view tensor lives in a storage of the HF model: nothing was copied.
    assert _storages(view.tensors()) <= _storages(hf_params)
    assert all(not t.requires_grad for t in view.tensors())
    has_bias = all(set(layer.biases) == {"q_proj", "k_proj", "v_proj"} for layer in view.layers)
    assert has_bias == (arch == "qwen2")

    batch = pack(random_examples(2, view.config.vocab_size))
    graph.loss_sum(view, adapters, batch).backward()
    assert all(p.grad is None for p in hf_params)  # base weights never get .grad
    assert all(p.grad is not None for p in adapters.parameters())


def _fuse(hf):
    """SGLang's layout, built the way its loader does: new tensors, rows q|k|v and gate|up."""
    layers = []
    for layer in hf.model.layers:
        a, m = layer.self_attn, layer.mlp
        bias = None
        if a.q_proj.bias is not None:
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
        layers.append(
            FusedLayerWeights(
                input_norm=layer.input_layernorm.weight.detach().clone(),
                post_norm=layer.post_attention_layernorm.weight.detach().clone(),
                qkv_proj=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                o_proj=a.o_proj.weight.detach().clone(),
                gate_up_proj=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                down_proj=m.down_proj.weight.detach().clone(),
                qkv_bias=bias,
            )
        )
    return layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_view_shares_storage_and_matches_split_loss(model_dirs, arch):
    hf = load_hf(model_dirs[arch])
    split, adapters = view_and_adapters(hf, LoraConfig(r=4))
    fused = _fuse(hf)
    # SGLang pads vocabulary rows; the view keeps the real ones (as a view).
    vocab, hidden = split.config.vocab_size, split.config.hidden_size
    padded_embed = torch.cat([split.embed_tokens, torch.zeros(48, hidden)])
    padded_head = torch.cat([split.lm_head, torch.zeros(48, hidden)])
    view = BaseModelView.from_fused_layers(
        split.config, padded_embed, fused, split.final_norm, padded_head
    )

    assert view.lm_head.shape == (vocab, hidden)
    assert _storages(view.tensors()) <= _storages(
        [padded_embed, padded_head, split.final_norm]
        + [t for fl in fused for t in vars(fl).values() if t is not None]
    )
    for fl, layer in zip(fused, view.layers, strict=True):
        assert layer.q_proj.untyped_storage().data_ptr() == fl.qkv_proj.untyped_storage().data_ptr()
        assert layer.v_proj.data_ptr() > layer.k_proj.data_ptr() > layer.q_proj.data_ptr()
        assert layer.up_proj.untyped_storage().data_ptr() == (
            fl.gate_up_proj.untyped_storage().data_ptr()
        )
    batch = pack(random_examples(3, vocab, seed=2))
    torch.testing.assert_close(
        graph.loss_sum(view, adapters, batch), graph.loss_sum(split, adapters, batch)
    )
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert torch.equal(view.layers[1].weight(name), split.layers[1].weight(name)), name
    for name in split.layers[1].biases:
        assert torch.equal(view.layers[1].biases[name], split.layers[1].biases[name]), name


def test_fused_view_rejects_wrong_shapes(model_dirs):
    hf = load_hf(model_dirs["llama"])
    split = BaseModelView.from_hf(hf)
    fused = _fuse(hf)
    fused[0] = FusedLayerWeights(**{**vars(fused[0]), "qkv_proj": fused[0].qkv_proj[:-16]})
    with pytest.raises(ValueError, match="do not match the config"):
        BaseModelView.from_fused_layers(
            split.config, split.embed_tokens, fused, split.final_norm, split.lm_head
        )


def test_rope_config_from_transformers_4_and_5_styles():
    llama3 = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    v5 = types.SimpleNamespace(rope_parameters={"rope_theta": 5e5, **llama3})
    v4 = types.SimpleNamespace(rope_theta=5e5, rope_scaling=dict(llama3))
    v4_plain = types.SimpleNamespace(rope_theta=1e6, rope_scaling=None)
    want = RopeConfig(theta=5e5, **llama3)
    assert RopeConfig.from_hf_config(v5) == want
    assert RopeConfig.from_hf_config(v4) == want
    assert RopeConfig.from_hf_config(v4_plain) == RopeConfig(theta=1e6)
    with pytest.raises(NotImplementedError, match="yarn"):
        RopeConfig.from_hf_config(types.SimpleNamespace(rope_parameters={"rope_type": "yarn"}))


def test_model_config_from_hf(model_dirs):
    cfg = ModelConfig.from_hf_config(load_hf(model_dirs["qwen2"]).config)
    assert (cfg.arch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", 4, 2, 16)
    assert cfg.projection_shape("k_proj") == (64, 32)
    assert cfg.projection_shape("down_proj") == (128, 64)


def test_llama3_rope_matches_hf(model_dirs):
    """Llama 3 scaling, with the three frequency bands all present at head_dim 16."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    }
    hf = load_hf(model_dirs["llama"], rope_parameters=rope)
    view, adapters = view_and_adapters(hf, LoraConfig(r=4))
    assert view.config.rope.rope_type == "llama3"
    ours = graph.rope_inv_freq(view.config.rope, view.config.head_dim)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    plain = graph.rope_inv_freq(RopeConfig(theta=10000.0), view.config.head_dim)
    changed = ~torch.isclose(ours, plain)
    assert 0 < changed.sum() < len(ours) - 1  # some kept, some interpolated, some divided

    perturb_b(adapters)
    batch = pack(random_examples(1, view.config.vocab_size, lo=40, hi=41))
    with torch.no_grad():
        theirs = PeftReference(hf, adapters).model(input_ids=batch.input_ids[None]).logits[0]
    ours = graph.logits(view, adapters, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # ...and the check can see the scaling: unscaled RoPE is off by far more than that.
    view.config = dataclasses.replace(view.config, rope=RopeConfig(theta=10000.0))
    assert (graph.logits(view, adapters, batch) - theirs).abs().max() > 1e-3
