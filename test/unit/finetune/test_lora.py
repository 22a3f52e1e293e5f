"""Adapters: PEFT's initialisation and scaling, target modules, seeds, dropout."""

import math

import pytest
import torch

from sglang_harli.finetune import LoraAdapters, LoraConfig, TrainConfig, Trainer, pack
from sglang_harli.finetune.lora import DropoutPlan

from .helpers import load_hf, random_examples, view_and_adapters


def test_init_like_peft_and_deterministic(model_dirs):
    import peft

    hf = load_hf(model_dirs["qwen2"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=8, seed=3), perturb=False)
    again = LoraAdapters.create(view.config, LoraConfig(r=8, seed=3))
    other = LoraAdapters.create(view.config, LoraConfig(r=8, seed=4))
    for (name, a), (_, b), (_, c) in zip(
        adapters.named_parameters(), again.named_parameters(), other.named_parameters(), strict=True
    ):
        assert a.dtype == torch.float32 and a.requires_grad
        assert torch.equal(a, b), name
        assert ("lora_B" in name) == (not a.any()), name  # B zero, A not
        assert ("lora_B" in name) or not torch.equal(a, c), name

    # PEFT draws A from U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)): same law.
    reference = peft.get_peft_model(
        hf, peft.LoraConfig(r=8, target_modules=["down_proj", "q_proj"])
    )
    peft_a = reference.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight
    ours_a = adapters.layers[0]["down_proj"].A
    assert peft_a.shape == ours_a.shape == (8, 128)
    bound = 1 / math.sqrt(128)
    for a in (peft_a, ours_a):
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_config_scaling_and_targets(model_dirs):
    assert LoraConfig(r=16, alpha=32).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0
    cfg = LoraConfig(target_modules=("down_proj", "q_proj"))
    assert cfg.target_modules == ("q_proj", "down_proj")  # canonical order
    with pytest.raises(ValueError, match="lm_head"):
        LoraConfig(target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError):
        LoraConfig(dropout=1.0)
    hf = load_hf(model_dirs["llama"])
    view, adapters = view_and_adapters(hf, cfg, perturb=False)
    names = [n for n, _ in adapters.named_parameters()]
    assert names[:4] == [
        "layers.0.q_proj.lora_A",
        "layers.0.q_proj.lora_B",
        "layers.0.down_proj.lora_A",
        "layers.0.down_proj.lora_B",
    ]
    assert adapters.layers[1]["down_proj"].A.shape == (8, 128)
    assert adapters.layers[1]["down_proj"].B.shape == (64, 8)


def test_dropout_masks_keyed_by_sequence_not_packing():
    both = DropoutPlan(0.25, seeds=(11, 12), lengths=(3, 5))
    first, second = DropoutPlan(0.25, (11,), (3,)), DropoutPlan(0.25, (12,), (5,))
    args = (1, "v_proj", 6, torch.device("cpu"), torch.float32)
    mask = both.mask(*args)
    assert torch.equal(mask, torch.cat([first.mask(*args), second.mask(*args)]))
    assert set(mask.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert not torch.equal(mask, both.mask(1, "k_proj", 6, torch.device("cpu"), torch.float32))


def test_dropout_training_independent_of_slicing_and_checkpointing(model_dirs):
    """With dropout, 1 x 4 and 4 x 1 micro-batches, with or without checkpointing (which
    recomputes each layer), give the same adapters; and dropout does change the result."""
    hf = load_hf(model_dirs["qwen2"])
    view, _ = view_and_adapters(hf, LoraConfig(r=4))
    data = random_examples(8, view.config.vocab_size, seed=9)
    results = {}
    for key, dropout, mbs, ckpt in [
        ("a", 0.3, 4, True),
        ("b", 0.3, 1, False),
        ("c", 0.3, 2, True),
        ("nodrop", 0.0, 4, True),
    ]:
        adapters = LoraAdapters.create(view.config, LoraConfig(r=4, dropout=dropout))
        cfg = TrainConfig(
            lr=1e-2, total_steps=2, global_batch_size=4, micro_batch_size=mbs, checkpointing=ckpt
        )
        Trainer(view, adapters, data, cfg).train()
        results[key] = torch.cat([p.detach().flatten() for p in adapters.parameters()])
    torch.testing.assert_close(results["a"], results["b"], rtol=0, atol=1e-6)
    torch.testing.assert_close(results["a"], results["c"], rtol=0, atol=1e-6)
    assert (results["a"] - results["nodrop"]).abs().max() > 1e-3


def test_no_dropout_outside_training(model_dirs):
    from sglang_harli.finetune import graph

    hf = load_hf(model_dirs["llama"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4, dropout=0.5))
    batch = pack(random_examples(2, view.config.vocab_size))
    assert torch.equal(graph.logits(view, adapters, batch), graph.logits(view, adapters, batch))
    train_loss = graph.loss_sum(view, adapters, batch, training=True)
    eval_loss = graph.loss_sum(view, adapters, batch, training=False)
    assert train_loss != eval_loss
