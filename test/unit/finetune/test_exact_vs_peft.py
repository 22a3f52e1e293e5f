"""Our engine against HF transformers + PEFT, float32, same data and same initial adapter.

Tolerances (see helpers.py): every gradient within REL_TOL = 1e-5 of the reference tensor's
largest magnitude; losses within LOSS_RTOL = 1e-5 relative; adapters after AdamW steps within
ADAM_TOL = 2e-3 of the summed learning rates.
"""

import pytest
import torch

from sglang_harli.finetune import LoraConfig, TrainConfig, Trainer, graph, lr_at, pack

from .helpers import (
    ADAM_TOL,
    LOSS_RTOL,
    PeftReference,
    assert_rel_close,
    load_hf,
    observe,
    random_examples,
    view_and_adapters,
)

ARCHS = ["llama", "qwen2"]


def _our_step(view, adapters, examples, how):
    """Loss and gradients of one step, through the whole graph or through work units."""
    num_targets = sum(e.num_targets for e in examples)
    if how == "graph":
        loss = graph.loss_sum(view, adapters, pack(examples)) / num_targets
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in adapters.named_parameters()}
    checkpointing, micro_batch_size = how
    config = TrainConfig(
        global_batch_size=len(examples),
        micro_batch_size=micro_batch_size,
        checkpointing=checkpointing,
        shuffle=False,
        vocab_chunk=300,
        lr=0.0,
    )
    trainer = Trainer(view, adapters, examples, config)
    *units, optimizer = trainer.pending_work()
    for unit in units:
        unit.run()
    grads = {k: p.grad.clone() for k, p in adapters.named_parameters()}
    return optimizer.run().loss, grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "how,use_rslora",
    [
        ("graph", False),
        ("graph", True),
        ((True, 1), False),  # work units, checkpointing, 4 micro-batches of 1
        ((True, 4), False),  # 1 micro-batch of 4
        ((False, 1), False),  # no checkpointing
        ((False, 4), True),
    ],
    ids=["graph", "graph-rslora", "ckpt-1x4", "ckpt-4x1", "nockpt-1x4", "nockpt-4x1-rslora"],
)
def test_one_step_loss_and_grads_equal_peft(model_dirs, arch, how, use_rslora):
    """B starts random (not zero) so that every gradient, A's included, is non-trivial."""
    hf = load_hf(model_dirs[arch])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4, alpha=8, use_rslora=use_rslora))
    examples = random_examples(4, view.config.vocab_size, seed=3)
    ref = PeftReference(hf, adapters)

    our_loss, our_grads = _our_step(view, adapters, examples, how)
    theirs = ref.loss_sum(examples) / sum(e.num_targets for e in examples)
    theirs.backward()

    observe("loss, relative", abs(our_loss - theirs.item()) / theirs.item())
    assert abs(our_loss - theirs.item()) <= LOSS_RTOL * theirs.item()
    for name, ref_grad in ref.grads().items():
        assert ref_grad.abs().max() > 0, f"{name}: trivial gradient, the test would be blind"
        assert_rel_close(our_grads[name], ref_grad, what=name)


def _train_ours(view, adapters, examples, config):
    trainer = Trainer(view, adapters, examples, config)
    return [r.loss for r in trainer.train()], trainer


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "checkpointing,micro_batch_size",
    [(True, 1), (True, 4), (False, 1), (False, 4), (True, 3)],
)
def test_several_steps_equal_peft(model_dirs, arch, checkpointing, micro_batch_size):
    """Three AdamW steps (warm-up, cosine, clipping, weight decay), adapters from PEFT's init
    (B = 0), the step sliced 1 x 4, 4 x 1 or 3 + 1 micro-batches, with and without
    checkpointing."""
    hf = load_hf(model_dirs[arch])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4, alpha=8, seed=5), perturb=False)
    examples = random_examples(12, view.config.vocab_size, seed=4)
    config = TrainConfig(
        lr=2e-3,
        warmup_steps=1,
        lr_schedule="cosine",
        total_steps=3,
        global_batch_size=4,
        micro_batch_size=micro_batch_size,
        weight_decay=0.01,
        max_grad_norm=0.05,  # small enough to clip
        checkpointing=checkpointing,
        shuffle=False,
        vocab_chunk=512,  # several vocabulary chunks (vocab 2000)
    )
    ref = PeftReference(hf, adapters)
    ref_losses = ref.train([examples[i : i + 4] for i in range(0, 12, 4)], config, 3)
    our_losses, trainer = _train_ours(view, adapters, examples, config)

    assert trainer.state.step == 3 and trainer.state.last_grad_norm > config.max_grad_norm
    for ours, theirs in zip(our_losses, ref_losses, strict=True):
        observe("loss, relative", abs(ours - theirs) / theirs)
    torch.testing.assert_close(our_losses, ref_losses, rtol=LOSS_RTOL, atol=0)
    lr_sum = sum(lr_at(config, s, 3) for s in range(3))
    for name, p in adapters.named_parameters():
        err = (p - ref.params[name]).abs().max().item()
        observe("adapter after 3 AdamW steps, relative to the lr sum", err / lr_sum)
        assert err <= ADAM_TOL * lr_sum, f"{name}: max err {err:.3e} vs lr sum {lr_sum:.3e}"
        assert p.abs().max() > 0
