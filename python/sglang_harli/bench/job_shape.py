"""The fine-tuning job a simulated instance trains, cut into work units as the server cuts it.

A server's job runner (``jobs/runner.py``) runs, for every optimizer step, a ``plan`` unit (packing
the step's sequences), then the trainer's units (``finetune/trainer.py``: per micro-batch a
``forward`` per layer, the ``head``, a ``recompute`` and a ``backward`` per layer from the last;
then the ``optimizer``), and every ``--harli-checkpoint-every`` steps a ``checkpoint`` unit (the
host copy) and the ``encode`` units of its files. :class:`JobShape` gives the same (kind, cost)
sequence from the job's sequence lengths, the model's shape and the LoRA settings, with the
costs computed by the functions the trainer itself uses (``finetune/graph.py``), so that a unit
here has the cost of the profile row the server measured for it.

Not modelled: validation units (the jobs simulated have no validation file), micro-batches cut
by the memory lent to the job (one micro-batch per step, as with enough memory), steps redone
after a memory revoke.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from sglang_harli.client import chat_jsonl
from sglang_harli.config import HarliConfig
from sglang_harli.finetune import graph
from sglang_harli.finetune.base_model import PROJECTIONS, ModelConfig
from sglang_harli.finetune.lora import LoraConfig
from sglang_harli.jobs.hyperparameters import ServingLimits, resolve
from sglang_harli.jobs.runner import ENCODE_TENSORS

# a snapshot's encoding yields once per adapter tensor (finiteness check), twice per adapter
# tensor (PEFT file: conversion, then safetensors) and once per tensor of the trainer state
# (the adapters again, AdamW's two moments and its step count): 7 per adapter tensor
ENCODE_YIELDS_PER_TENSOR = 7

Unit = tuple[str, float]  # (kind, cost), as the runner hands it to admission and the predictor


@dataclasses.dataclass(frozen=True)
class JobShape:
    """What one optimizer step of a job is made of (see the module docstring)."""

    model: ModelConfig
    lora: LoraConfig
    sequences: tuple[tuple[int, int], ...]  # (tokens, target tokens) of each training example
    batch_size: int = 1  # sequences per optimizer step (one micro-batch)
    checkpoint_every: int = HarliConfig.checkpoint_every
    checkpointing: bool = True  # activation checkpointing (the server's TrainConfig default)

    def __post_init__(self) -> None:
        if not self.sequences or self.batch_size < 1:
            raise ValueError("a job needs sequences and a batch size >= 1")

    @property
    def adapter_params(self) -> int:
        c = self.model
        per_layer = sum(self.lora.r * sum(c.projection_shape(m)) for m in self.lora.target_modules)
        return c.num_layers * per_layer

    @property
    def adapter_tensors(self) -> int:
        return 2 * self.model.num_layers * len(self.lora.target_modules)  # an A and a B each

    def step_units(self, batch: Sequence[int]) -> list[Unit]:
        """The units of one step over the sequences at indices ``batch``, in the order the
        runner runs them (``Trainer._units``, after the runner's ``plan`` unit)."""
        c, lora = self.model, self.lora
        lengths = [self.sequences[i][0] for i in batch]
        targets = sum(self.sequences[i][1] for i in batch)
        fwd = graph.layer_forward_flops(c, lora, lengths)
        units: list[Unit] = [("plan", float(self.batch_size))]
        units += [("forward", fwd)] * c.num_layers
        # the lm_head GEMM twice, as the trainer counts it: logits, then their gradient
        units.append(("head", graph.head_forward_flops(c, targets) * 2.0))
        for _ in range(c.num_layers):
            if self.checkpointing:
                units.append(("recompute", fwd))
            units.append(("backward", fwd * 2.0))
        units.append(("optimizer", 12.0 * self.adapter_params))
        return units

    def checkpoint_units(self) -> list[Unit]:
        """After every ``checkpoint_every`` steps: the host copy, then the files' encoding."""
        encode = self.adapter_tensors * ENCODE_YIELDS_PER_TENSOR // ENCODE_TENSORS + 1
        return [("checkpoint", 3.0 * self.adapter_params)] + [
            ("encode", float(ENCODE_TENSORS))
        ] * encode

    def steps(self, seed: int) -> Iterator[tuple[tuple[Unit, ...], int]]:
        """``(units, target tokens)`` of each step, forever: the sequences in a new random
        order every epoch, ``batch_size`` at a time (a batch may straddle two epochs), as the
        trainer takes them; checkpoint units after every ``checkpoint_every`` steps. Steps of
        the same sequences are the same tuple object (callers may cache by identity)."""
        rng = np.random.default_rng(seed)
        n, cache = len(self.sequences), {}
        order, cursor, step = rng.permutation(n).tolist(), 0, 0
        while True:
            batch = []
            for _ in range(self.batch_size):
                if cursor == n:
                    order, cursor = rng.permutation(n).tolist(), 0
                batch.append(order[cursor])
                cursor += 1
            step += 1
            key = (tuple(sorted(batch)), step % self.checkpoint_every == 0)
            if key not in cache:
                units = self.step_units(key[0]) + (self.checkpoint_units() if key[1] else [])
                cache[key] = (tuple(units), sum(self.sequences[i][1] for i in key[0]))
            yield cache[key]

    def to_dict(self) -> dict[str, Any]:
        """The job as a report shows it."""
        tokens = [t for t, _ in self.sequences]
        targets = [t for _, t in self.sequences]
        return {
            "batch_size": self.batch_size,
            "sequences": len(self.sequences),
            "seq_tokens_mean": sum(tokens) / len(tokens),
            "seq_tokens_max": max(tokens),
            "target_tokens_per_step": self.batch_size * sum(targets) / len(targets),
            "layers": self.model.num_layers,
            "lora_rank": self.lora.r,
            "lora_targets": list(self.lora.target_modules),
            "units_per_step": len(self.step_units(range(min(self.batch_size, len(tokens))))),
            "checkpoint_every": self.checkpoint_every,
        }


def model_config(model_path: str | Path) -> ModelConfig:
    """The shape of the model at ``model_path`` (its ``config.json``)."""
    raw = json.loads((Path(model_path) / "config.json").read_text())
    return ModelConfig.from_hf_config(SimpleNamespace(**raw.get("text_config", raw)))


def embedded_model_path(served_name: str) -> Path:
    """The checkpoint of a model the server embeds (served without ``--model-path``), by the
    name profiles and replays record it under; ValueError for any other model."""
    from sglang_harli import default_model

    if served_name == default_model.SMOLLM2.served_name:
        try:
            return default_model.ensure_default_model(default_model.SMOLLM2)
        except default_model.DefaultModelUnavailable as exc:
            raise ValueError(f"cannot build {served_name}: {exc}") from exc
    if served_name.startswith("tiny-"):  # "tiny-llama", or older profiles' cache names
        from sglang_harli.tiny_model import ensure_tiny_model

        return ensure_tiny_model(default_model.TINY_SPEC)
    raise ValueError(f"the profile's model {served_name!r} is not embedded: give --model-path")


def server_lora(hyperparameters: dict[str, Any]) -> LoraConfig:
    """The LoRA settings a server trains a job with (resolved hyperparameters)."""
    return LoraConfig(
        r=int(hyperparameters["lora_rank"]),
        alpha=float(hyperparameters["lora_alpha"]),
        target_modules=tuple(hyperparameters["lora_target_modules"]),
    )


def job_from_chats(
    pairs: Sequence[tuple[str, str]],
    model_path: str | Path,
    hyperparameters: dict[str, Any] | None = None,
) -> JobShape:
    """The job a server would train on these (question, answer) chats: tokenized with the
    model's tokenizer and chat template, hyperparameters resolved (``"auto"`` values filled in)
    as the server's API resolves them."""
    import transformers

    from sglang_harli.finetune.data import parse_jsonl_lines

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    lines = chat_jsonl(pairs).splitlines()
    examples = parse_jsonl_lines(lines, tokenizer, max_length=1 << 30)
    longest = max(len(e.input_ids) for e in examples)
    # the server's limits only refuse jobs; the ones simulated ran (or would): none binds, and
    # an "auto" rank resolves to its default as under the server's own limit
    limits = ServingLimits(max_lora_rank=1 << 16, target_modules=PROJECTIONS)
    hp = resolve(hyperparameters, len(examples), limits, longest)
    return JobShape(
        model=model_config(model_path),
        lora=server_lora(hp.to_dict()),
        sequences=tuple((len(e.input_ids), e.num_targets) for e in examples),
        batch_size=hp.batch_size,
    )


def job_from_numbers(
    seq_tokens: int,
    target_tokens: int,
    batch_size: int,
    model_path: str | Path,
    lora_rank: int = 8,
) -> JobShape:
    """A job of identical sequences (when no tokenizer is at hand)."""
    if not 0 < target_tokens < seq_tokens:
        raise ValueError("need 0 < target tokens < sequence tokens")
    return JobShape(
        model=model_config(model_path),
        lora=LoraConfig(r=lora_rank, alpha=2.0 * lora_rank, target_modules=PROJECTIONS),
        sequences=((seq_tokens, target_tokens),),
        batch_size=batch_size,
    )
