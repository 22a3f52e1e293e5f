"""The finetune engine on the Triton kernels (``kernels="triton"``) against its torch path.

One optimizer step's loss and every LoRA gradient, on the tiny fp32 Llama and Qwen2, through the
trainer's work units. On CPU the kernels run in Triton's interpreter (this directory's conftest
turns it on), which costs about 5 ms per tile operation: hence two sequences of a few tokens and
the first 256 rows of the vocabulary (the loss head's cost grows with it).

Tolerance (fp32, interpreter): loss within 1e-5 relative, every gradient within
1e-5 x max |torch gradient| (the finetune tests' REL_TOL), i.e. the per-op bound of the kernel
tests held over a whole step (observed: loss equal, gradients 1.9e-6). On a GPU, fp32 dots use
TF32 and the kernel tests' fp32 bound, 5e-3, applies.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from kernel_testutil import LaunchSpy, rel_tol

import harli_kernels.attention as attention_mod
import harli_kernels.cross_entropy as ce_mod
import harli_kernels.lora as lora_mod
import harli_kernels.matmul as matmul_mod
import harli_kernels.norm as norm_mod
from harli_kernels.launch import interpreting
from sglang_harli.finetune import (
    BaseModelView,
    LoraAdapters,
    LoraConfig,
    TrainConfig,
    Trainer,
    make_ops,
    torch_ops,
)
from sglang_harli.tiny_model import ensure_tiny_model
from test.unit.finetune.helpers import (
    LOSS_RTOL,
    SPECS,
    assert_rel_close,
    load_hf,
    observe,
    perturb_b,
    random_examples,
)

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """As in test/unit/finetune: tiny torch ops only suffer from a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(arch: str, lora: LoraConfig, device: str) -> tuple[BaseModelView, LoraAdapters]:
    view = BaseModelView.from_hf(load_hf(ensure_tiny_model(SPECS[arch])).to(device))
    # The same weights with a 256-token vocabulary: the view keeps the first rows (as it does
    # for a server's padded vocabulary).
    small = BaseModelView(
        dataclasses.replace(view.config, vocab_size=VOCAB),
        view.embed_tokens,
        view.layers,
        view.final_norm,
        view.lm_head,
    )
    adapters = LoraAdapters.create(small.config, lora, device=small.device)
    perturb_b(adapters)  # B non-zero: A gets a gradient too
    return small, adapters


def _step(view, adapters, examples, run=None, **config):
    """Run one step's units, through ``run(trainer, index, unit)`` if given; the loss and the
    gradient of every adapter (lr 0: the adapters do not move)."""
    config = TrainConfig(
        global_batch_size=len(examples), shuffle=False, lr=0.0, vocab_chunk=96, **config
    )
    trainer = Trainer(view, adapters, examples, config)
    *units, optimizer = trainer.pending_work()
    for i, unit in enumerate(units):
        if run is None:
            unit.run()
        else:
            run(trainer, i, unit)
    grads = {k: p.grad.clone() for k, p in adapters.named_parameters()}
    return optimizer.run().loss, grads  # the optimizer unit also drops the gradients


def _assert_same_step(ours, ref):
    (loss, grads), (ref_loss, ref_grads) = ours, ref
    tol = rel_tol(torch.float32)  # 1e-5 in the interpreter (= LOSS_RTOL and REL_TOL)
    observe("kernels: loss vs torch, relative", abs(loss - ref_loss) / ref_loss)
    assert abs(loss - ref_loss) <= max(tol, LOSS_RTOL) * ref_loss, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert ref_grad.abs().max() > 0, f"{name}: trivial gradient, the test would be blind"
        assert_rel_close(grads[name], ref_grad, rel=tol, what=name)


def _budgeted(budgets: list[int]):
    """A ``run`` for :func:`_step` that sets ``budgets[i]`` before unit i (cycling) and records,
    per unit, (its budget, the largest grid it launched) in the list returned with it."""
    spies = [
        LaunchSpy(norm_mod, "_rmsnorm_fwd_kernel"),
        LaunchSpy(norm_mod, "_rmsnorm_bwd_kernel"),
        LaunchSpy(lora_mod, "_base_plus_lowrank_kernel"),
        LaunchSpy(matmul_mod, "_persistent_mm_kernel"),
        LaunchSpy(attention_mod, "_attn_fwd_kernel"),
        LaunchSpy(attention_mod, "_attn_bwd_dq_kernel"),
    ]
    seen = []

    def run(trainer, i, unit):
        trainer.set_num_sms(budgets[i % len(budgets)])
        with contextlib.ExitStack() as stack:
            for spy in spies:
                spy.grids.clear()
                stack.enter_context(spy)
            unit.run()
        seen.append((trainer.num_sms, max(g[0] for spy in spies for g in spy.grids)))

    return run, seen


def test_llama_checkpointed_sliced_step_with_changing_num_sms(device):
    """Checkpointing, two micro-batches, LoRA dropout, every projection adapted, and a new
    ``num_sms`` before every unit: same loss and gradients as the torch path; every launch of
    a unit stays within the budget set for it."""
    view, adapters = _tiny("llama", LoraConfig(r=4, alpha=8, dropout=0.1), device)
    examples = random_examples(2, VOCAB, seed=3, lo=5, hi=8)
    kw = dict(checkpointing=True, micro_batch_size=1)
    ref = _step(view, adapters, examples, kernels="torch", **kw)
    run, seen = _budgeted([1, 3, 8, 1000])
    ours = _step(view, adapters, examples, run, kernels="triton", num_sms=2, **kw)
    _assert_same_step(ours, ref)
    # two micro-batches: 2 forward, head, 2 recompute, 2 backward
    assert len(seen) == 2 * (2 + 1 + 2 + 2)
    assert all(grid <= n for n, grid in seen), seen
    if interpreting():  # 16-wide tiles: enough of them to fill each budget
        assert {n for n, grid in seen if grid == n} >= {1, 3, 8}, seen


def test_qwen2_step_without_checkpointing_on_some_projections(device):
    """Qwen2 (q/k/v biases), no checkpointing, one micro-batch of two sequences, rsLoRA on three
    projections (k_proj and v_proj run as plain linears plus bias). The backward units replay
    graphs recorded under num_sms=8 with smaller budgets: their launches follow the new ones."""
    targets = ("q_proj", "o_proj", "up_proj")
    view, adapters = _tiny(
        "qwen2", LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=targets), device
    )
    examples = random_examples(2, VOCAB, seed=5, lo=5, hi=8)
    kw = dict(checkpointing=False, micro_batch_size=2)
    ref = _step(view, adapters, examples, kernels="torch", **kw)
    run, seen = _budgeted([8, 8, 2, 1, 3])  # forward 0, forward 1, head, backward 1, backward 0
    ours = _step(view, adapters, examples, run, kernels="triton", **kw)
    _assert_same_step(ours, ref)
    assert all(grid <= n for n, grid in seen), seen
    if interpreting():
        assert [grid for _, grid in seen] == [8, 8, 2, 1, 3], seen


def test_loss_head_falls_back_to_torch_only_for_fp32_over_a_16_bit_head(device):
    """The fused CE computes in the narrower operand dtype: fp32 states over a bf16 lm_head go
    to torch_ops.chunked_cross_entropy (same result, bit for bit); every other mix runs the
    kernel."""
    ops = make_ops("triton", 3, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen).to(device)
    w = torch.randn(40, 16, generator=gen).to(device)
    t = torch.randint(0, 40, (5,), generator=gen).to(device)
    with LaunchSpy(ce_mod, "_lce_fwd_kernel") as spy:
        fallback = ops.cross_entropy_sum(x, w.bfloat16(), t, 16, 4096)
        assert not spy.grids
        torch.testing.assert_close(
            fallback, torch_ops.chunked_cross_entropy(x, w.bfloat16(), t, 16, 4096), rtol=0, atol=0
        )
        for xs, ws in ((x, w), (x.bfloat16(), w.bfloat16()), (x.bfloat16(), w)):
            loss = ops.cross_entropy_sum(xs, ws, t, 16, 4096)
            ref = torch_ops.chunked_cross_entropy(xs, ws, t, 16, 4096)
            tol = rel_tol(xs.dtype)
            torch.testing.assert_close(loss, ref.float(), rtol=tol, atol=0)
        assert len(spy.grids) == 3
