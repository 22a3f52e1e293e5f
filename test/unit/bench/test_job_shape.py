"""The simulated job cuts its steps into the units (kinds and costs) the server's trainer and
job runner run, so each unit has the cost of the profile row the server measured for it."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from sglang_harli.bench.job_shape import (
    ENCODE_YIELDS_PER_TENSOR,
    embedded_model_path,
    job_from_chats,
    job_from_numbers,
)
from sglang_harli.bench.workload import JOB_PAIRS
from sglang_harli.client import chat_jsonl
from sglang_harli.finetune import BaseModelView, LoraAdapters, TrainConfig
from sglang_harli.finetune.data import parse_jsonl_lines
from sglang_harli.finetune.trainer import Trainer
from sglang_harli.jobs.runner import ENCODE_TENSORS


@pytest.fixture(scope="module")
def tiny_path():
    return embedded_model_path("tiny-llama")


@pytest.fixture(scope="module")
def job(tiny_path):
    return job_from_chats(JOB_PAIRS, tiny_path, {"n_epochs": 10_000})


@pytest.fixture(scope="module")
def trainer(tiny_path, job):
    """The server's trainer on the same chats, model and LoRA settings."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_path))
    examples = parse_jsonl_lines(chat_jsonl(JOB_PAIRS).splitlines(), tokenizer, max_length=1 << 30)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32)
    view = BaseModelView.from_hf(model)
    adapters = LoraAdapters.create(view.config, job.lora)
    batch = job.batch_size
    config = TrainConfig(global_batch_size=batch, micro_batch_size=batch, epochs=1.0)
    return Trainer(view, adapters, examples, config)


def test_the_replays_job_on_the_tiny_model(job):
    assert job.batch_size == 1  # 8 chats: the API's "auto" batch size
    assert len(job.sequences) == len(JOB_PAIRS)
    assert all(0 < targets < tokens for tokens, targets in job.sequences)
    assert job.model.num_layers == 2


def test_steps_are_the_trainers_units(job, trainer):
    """One epoch: each step's (kind, cost) sequence is JobShape's for that sequence."""
    ran = []
    while not trainer.done:
        units = trainer.pending_work()
        ran.append(tuple((u.kind, u.cost) for u in units))
        trainer.run_step()
    simulated = [
        tuple((kind, pytest.approx(cost, rel=1e-9)) for kind, cost in job.step_units([i])[1:])
        for i in range(len(job.sequences))
    ]
    assert len(ran) == len(simulated)
    for step in ran:  # the trainer's order is its own shuffle: match each step to a sequence
        assert step in simulated
        simulated.remove(step)


def test_a_checkpoint_is_its_host_copy_then_the_encoding_of_its_files(job, trainer):
    adapter_elements = sum(p.numel() for p in trainer.adapters.parameters())
    snapshot = trainer.snapshot()
    yields = sum(1 for _ in snapshot.encoding(torch.bfloat16))
    units = job.checkpoint_units()
    assert units[0] == ("checkpoint", 3.0 * adapter_elements)
    # the runner calls ENCODE_TENSORS steps per unit until the encoding ends
    assert yields == ENCODE_YIELDS_PER_TENSOR * job.adapter_tensors
    assert units[1:] == [("encode", float(ENCODE_TENSORS))] * (yields // ENCODE_TENSORS + 1)


def test_steps_go_through_every_sequence_each_epoch_with_checkpoints(tiny_path):
    job = dataclasses.replace(job_from_chats(JOB_PAIRS, tiny_path), checkpoint_every=3)
    steps = job.steps(seed=7)
    first = [next(steps) for _ in range(2 * len(job.sequences))]
    for epoch in (first[:8], first[8:]):
        assert sorted(targets for _, targets in epoch) == sorted(t for _, t in job.sequences)
    for index, (units, _) in enumerate(first, start=1):
        assert (units[-1][0] == "encode") == (index % 3 == 0)
        assert units[0] == ("plan", 1.0) and ("optimizer" in dict(units))
    again = job.steps(seed=7)
    assert [next(again) for _ in first] == first


def test_a_batch_of_several_sequences_is_one_micro_batch(tiny_path):
    job = job_from_numbers(40, 16, 4, tiny_path)
    units, targets = next(job.steps(0))
    kinds = collections.Counter(kind for kind, _ in units)
    assert targets == 4 * 16
    assert kinds == {
        "plan": 1,
        "forward": 2,
        "head": 1,
        "recompute": 2,
        "backward": 2,
        "optimizer": 1,
    }
    with pytest.raises(ValueError):
        job_from_numbers(16, 16, 1, tiny_path)
