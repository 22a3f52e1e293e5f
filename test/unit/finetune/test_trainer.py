"""The trainer: work units, abandon and redo, schedules, counters, and learning for real."""

import math

import pytest
import torch

from sglang_harli.client import chat_jsonl
from sglang_harli.finetune import (
    BaseModelView,
    Example,
    LoraAdapters,
    LoraConfig,
    TrainConfig,
    Trainer,
    graph,
    lr_at,
    pack,
    parse_jsonl_lines,
)

from .helpers import load_hf, observe, random_examples, view_and_adapters


@pytest.fixture(scope="module")
def llama(model_dirs):
    return BaseModelView.from_hf(load_hf(model_dirs["llama"]))


def _flat(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


def test_step_is_a_list_of_costed_units(llama):
    adapters = LoraAdapters.create(llama.config, LoraConfig(r=4))
    data = random_examples(8, llama.config.vocab_size)
    trainer = Trainer(llama, adapters, data, TrainConfig(global_batch_size=4, micro_batch_size=2))
    units = trainer.pending_work()
    per_micro = ["forward", "forward", "head", "recompute", "backward", "recompute", "backward"]
    assert [u.kind for u in units] == per_micro * 2 + ["optimizer"]
    assert [u.layer for u in units[:7]] == [0, 1, None, 1, 1, 0, 0]
    assert [u.micro_batch for u in units] == [0] * 7 + [1] * 7 + [None]
    assert all(u.cost > 0 and u.step == 0 for u in units)
    # checkpointing: the forward recomputed in a unit of its own, then backward = 2 x forward
    assert units[3].cost == units[0].cost and units[4].cost == 2 * units[0].cost
    assert trainer.next_unit() is units[0]

    with pytest.raises(RuntimeError, match="out of order"):
        units[1].run()
    for unit in units[:-1]:
        assert unit.run() is None
        assert trainer.pending_work()[0] is not unit
    result = units[-1].run()
    assert result.step == 0 and result.num_sequences == 4
    assert result.num_targets == trainer.state.tokens > 0
    assert trainer.state.step == 1 and trainer.state.units_run == 15
    assert trainer.next_unit().step == 1


def test_abandoned_step_is_redone_identically(llama):
    data = random_examples(8, llama.config.vocab_size, seed=2)
    cfg = TrainConfig(lr=1e-2, total_steps=2, global_batch_size=4, micro_batch_size=2)

    def make():
        adapters = LoraAdapters.create(llama.config, LoraConfig(r=4, dropout=0.2))
        return adapters, Trainer(llama, adapters, data, cfg)

    ref_adapters, ref = make()
    ref_losses = [r.loss for r in ref.train()]

    adapters, trainer = make()
    losses = [trainer.run_step().loss]
    units = trainer.pending_work()
    for unit in units[:7]:  # halfway through the second step's backward passes
        unit.run()
    assert any(p.grad is not None for p in adapters.parameters())
    trainer.abandon_step()
    assert all(p.grad is None for p in adapters.parameters())
    assert trainer.state.abandoned_steps == 1 and trainer.state.step == 1
    with pytest.raises(RuntimeError, match="stale"):
        units[7].run()
    redo = trainer.pending_work()
    assert redo[0] is not units[0] and len(redo) == len(units)
    losses += [r.loss for r in trainer.train()]
    assert losses == ref_losses
    assert torch.equal(_flat(adapters), _flat(ref_adapters))


def test_units_run_inside_inference_mode(llama):
    """A server's scheduler loop runs under torch.inference_mode(); units must still train."""
    adapters = LoraAdapters.create(llama.config, LoraConfig(r=2))
    data = random_examples(2, llama.config.vocab_size)
    trainer = Trainer(llama, adapters, data, TrainConfig(lr=1e-2, global_batch_size=2))
    with torch.inference_mode():
        result = trainer.run_step()
    assert result.grad_norm > 0 and any(p.abs().max() > 0 for p in adapters.parameters()[1::2])


def test_micro_batch_token_cap(llama):
    data = [Example(tuple(range(6, 6 + n)), (False,) + (True,) * (n - 1)) for n in (5, 4, 3, 6)]
    cfg = TrainConfig(global_batch_size=4, micro_batch_size=4, micro_batch_tokens=9, shuffle=False)
    trainer = Trainer(llama, LoraAdapters.create(llama.config, LoraConfig(r=2)), data, cfg)
    trainer.pending_work()
    assert [mb.batch.lengths for mb in trainer._step.micro] == [(5, 4), (3, 6)]


def test_counters_epochs_and_data_order(llama):
    data = random_examples(6, llama.config.vocab_size, seed=4)
    adapters = LoraAdapters.create(llama.config, LoraConfig(r=2))
    trainer = Trainer(llama, adapters, data, TrainConfig(epochs=2, global_batch_size=4, seed=1))
    assert trainer.total_steps == 3
    seen = []
    while not trainer.done:
        trainer.pending_work()  # plans the step
        seen += trainer._step.examples
        trainer.run_step()
    assert trainer.next_unit() is None and trainer.run_step() is None
    s = trainer.state
    assert (s.step, s.samples) == (3, 12)
    # Each epoch is a permutation of the dataset (shuffled by the seed).
    ids = [data.index(e) for e in seen]
    assert sorted(ids[:6]) == sorted(ids[6:]) == list(range(6)) and ids[:6] != list(range(6))
    assert s.tokens == 2 * sum(e.num_targets for e in data)
    assert s.last_loss > 0 and s.last_lr is not None and s.last_grad_norm > 0


def test_learning_rate_schedules():
    base = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(base, s, 10) for s in (0, 1)] == [0.5, 1.0]
    cosine = [lr_at(base, s, 10) for s in range(2, 11)]
    assert cosine[0] == 1.0 and math.isclose(cosine[4], 0.55) and math.isclose(cosine[-1], 0.1)
    assert all(a > b for a, b in zip(cosine[:-1], cosine[1:], strict=True))
    linear = TrainConfig(lr=1.0, lr_schedule="linear", warmup_steps=2)
    assert [lr_at(linear, s, 6) for s in range(2, 7)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    constant = TrainConfig(lr=0.3, lr_schedule="constant")
    assert lr_at(constant, 50, 10) == 0.3


PAIRS = [
    ("Who wrote the code?", "Ada Lovelace"),
    ("What is the magic number?", "forty two"),
    ("Name a colour.", "vermilion"),
    ("Which planet is red?", "Mars"),
    ("Best sorting algorithm?", "merge sort"),
    ("What do cats say?", "meow meow"),
    ("Capital of France?", "Paris"),
    ("Favourite drink?", "green tea"),
]
# The loss over the answers must fall at least this much (observed: about 25x).
LOSS_FALL_FACTOR = 10.0


def _greedy(view, adapters, tokenizer, question, max_new_tokens=12):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    stop, out = tokenizer.convert_tokens_to_ids("<|im_end|>"), []
    for _ in range(max_new_tokens):
        seq = tuple(ids + out)
        nxt = int(
            graph.logits(view, adapters, pack([Example(seq, (False,) * len(seq))]))[-1].argmax()
        )
        if nxt == stop:
            break
        out.append(nxt)
    return tokenizer.decode(out)


def test_tiny_model_learns_fixed_answers(model_dirs, tokenizer):
    lines = chat_jsonl(PAIRS).splitlines()
    data = parse_jsonl_lines(lines, tokenizer, max_length=64)
    hf = load_hf(model_dirs["qwen2"])
    # A random model's lm_head rows (std 0.02) over an RMS-normed state cannot produce a logit
    # much above 1: no answer could ever be confident. Give it a trained model's logit range.
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    view, adapters = view_and_adapters(hf, LoraConfig(r=8, alpha=16), perturb=False)
    assert [_greedy(view, adapters, tokenizer, q) for q, _ in PAIRS] != [a for _, a in PAIRS]

    cfg = TrainConfig(
        lr=1e-2, total_steps=40, warmup_steps=5, global_batch_size=8, micro_batch_size=4
    )
    results = Trainer(view, adapters, data, cfg).train()
    # Every step sees the whole dataset, so first and last losses are comparable.
    observe("learning: loss fall factor (higher is better)", results[0].loss / results[-1].loss)
    assert results[0].loss / results[-1].loss > LOSS_FALL_FACTOR, (
        results[0].loss,
        results[-1].loss,
    )
    assert [_greedy(view, adapters, tokenizer, q) for q, _ in PAIRS] == [a for _, a in PAIRS]
