"""The training graph's ops: chunked loss, packed attention, checkpointing, dtypes."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from sglang_harli.finetune import (
    BaseModelView,
    LoraConfig,
    TrainConfig,
    Trainer,
    graph,
    pack,
    torch_ops,
)

from .helpers import load_hf, random_examples, view_and_adapters


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(7, 5), (64, 1000), (1000, 3)])
def test_chunked_cross_entropy_equals_full(vocab_chunk, token_chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(61, 16, generator=gen)
    targets = torch.randint(0, 61, (23,), generator=gen)
    ours = torch_ops.chunked_cross_entropy(x, weight, targets, vocab_chunk, token_chunk)
    (grad_ours,) = torch.autograd.grad(ours * 0.3, x)
    ref = F.cross_entropy(x @ weight.T, targets, reduction="sum")
    (grad_ref,) = torch.autograd.grad(ref * 0.3, x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)


@pytest.mark.parametrize("token_chunk", [5, 1000])
def test_chunked_cross_entropy_casts_a_narrower_lm_head_by_chunks(token_chunk):
    """fp32 hidden states over a bf16 lm_head: the same loss and gradient as over the lm_head
    upcast, with or without a gradient asked for."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(61, 16, generator=gen).bfloat16()
    targets = torch.randint(0, 61, (23,), generator=gen)
    ours = torch_ops.chunked_cross_entropy(x, weight, targets, 7, token_chunk)
    (grad_ours,) = torch.autograd.grad(ours, x)
    ref = F.cross_entropy(x @ weight.float().T, targets, reduction="sum")
    (grad_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)
    with torch.no_grad():
        torch.testing.assert_close(torch_ops.chunked_cross_entropy(x, weight, targets, 7, 5), ref)


def test_attention_batches_runs_of_equal_lengths_exactly():
    """Consecutive sequences of one length go through SDPA as a batch: the same output as one
    call per sequence, and still no attention across sequences."""
    lengths = (5, 5, 3, 0, 7, 7, 7, 2)
    cu = (0, *itertools.accumulate(lengths))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(cu[-1], 4, 8, generator=gen)
    k, v = (torch.randn(cu[-1], 2, 8, generator=gen) for _ in range(2))
    one_by_one = [
        F.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
        .transpose(0, 1)
        .reshape(e - s, 4 * 8)
        for s, e in zip(cu[:-1], cu[1:], strict=True)
    ]
    torch.testing.assert_close(torch_ops.attention(q, k, v, cu), torch.cat(one_by_one))


def test_chunked_cross_entropy_never_holds_full_logits(monkeypatch):
    """Every logits tile the loss makes is at most token_chunk x vocab_chunk."""
    shapes = []
    real_linear = F.linear

    def spy(x, w, b=None):
        shapes.append((x.shape[0], w.shape[0]))
        return real_linear(x, w, b)

    monkeypatch.setattr(graph.F, "linear", spy)
    x = torch.randn(40, 8, requires_grad=True)
    loss = torch_ops.chunked_cross_entropy(
        x, torch.randn(100, 8), torch.randint(0, 100, (40,)), 32, 16
    )
    loss.backward()
    assert shapes and max(r * c for r, c in shapes) <= 16 * 32


def test_packed_sequences_do_not_see_each_other(model_dirs):
    hf = load_hf(model_dirs["qwen2"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4))
    examples = random_examples(3, view.config.vocab_size, seed=7)
    packed = graph.logits(view, adapters, pack(examples))
    alone = torch.cat([graph.logits(view, adapters, pack([e])) for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def _saved_bytes_per_unit(trainer):
    """Bytes autograd saves for backward while each unit of one step runs."""
    per_unit = []
    for unit in trainer.pending_work():
        saved = []

        def pack_hook(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            unit.run()
        per_unit.append((unit.kind, sum(saved)))
    return per_unit


def test_checkpointing_keeps_only_layer_inputs(model_dirs):
    hf = load_hf(model_dirs["llama"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4))
    data = random_examples(4, view.config.vocab_size)
    cfg = TrainConfig(global_batch_size=4, micro_batch_size=4, total_steps=1)

    trainer = Trainer(view, adapters, data, cfg)
    units = trainer.pending_work()
    for unit in units[:2]:  # the two forward units
        unit.run()
    inputs = trainer._step.micro[0].saved
    tokens = sum(len(e.input_ids) for e in data)
    # Between forward and backward: one [tokens, hidden] tensor per layer, no autograd graph.
    assert all(t.shape == (tokens, view.config.hidden_size) and t.grad_fn is None for t in inputs)
    trainer.abandon_step()

    def forward_saved(config):
        per_unit = _saved_bytes_per_unit(Trainer(view, adapters, data, config))
        return [n for kind, n in per_unit if kind == "forward"]

    assert forward_saved(cfg) == [0, 0]  # forward units keep nothing for autograd
    assert min(forward_saved(dataclasses.replace(cfg, checkpointing=False))) > 0


def test_bf16_base_trains_fp32_masters(model_dirs):
    """The served dtype: bf16 base, bf16 compute, fp32 adapters; loss near the fp32 one."""
    hf32 = load_hf(model_dirs["qwen2"])
    hf16 = load_hf(model_dirs["qwen2"], dtype=torch.bfloat16)
    view32, adapters = view_and_adapters(hf32, LoraConfig(r=4))
    view16 = BaseModelView.from_hf(hf16)
    assert view16.dtype == torch.bfloat16
    batch = pack(random_examples(2, view16.config.vocab_size))
    loss16 = graph.loss_sum(view16, adapters, batch)
    loss16.backward()
    torch.testing.assert_close(loss16, graph.loss_sum(view32, adapters, batch), rtol=1e-2, atol=0)
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in adapters.parameters()
    )
    assert all(torch.isfinite(p.grad).all() for p in adapters.parameters())
    # fp32 compute over bf16 weights (weights upcast per op) matches the fp32-cast model.
    loss_fp32_compute = graph.loss_sum(view16, adapters, batch, dtype=torch.float32)
    hf16_as_32 = load_hf(model_dirs["qwen2"])  # the file is bf16, so this is the same values
    ref = graph.loss_sum(BaseModelView.from_hf(hf16_as_32), adapters, batch)
    torch.testing.assert_close(loss_fp32_compute, ref, rtol=1e-6, atol=0)
