"""A fine-tuning job's hyperparameters: OpenAI's names plus our LoRA settings, checked once.

OpenAI's ``hyperparameters`` object has ``n_epochs``, ``batch_size`` and
``learning_rate_multiplier`` (each may be ``"auto"``); we add ``lora_rank``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules`` and ``max_seq_length``. Everything is resolved to a
concrete value when the job is created, so a job's record says exactly what it trains with.

Limits, so that no request can ask for what the server cannot hold or run (each is a 400 that
names the parameter):

* ``n_epochs`` <= :data:`MAX_EPOCHS` (OpenAI allows 50; tiny datasets are often trained for
  hundreds of epochs, so we allow more, but not a job that would run for years);
* ``batch_size x max_seq_length`` <= :data:`MICRO_BATCH_TOKENS`: the trainer packs a batch into
  one micro-batch and keeps each layer's input for it, so this bounds its memory beside decode.
  ``max_seq_length`` is also at most the model's context length; ``"auto"`` is the longest
  example of the job's files, and an ``"auto"`` batch size shrinks to fit the budget;
* ``learning_rate_multiplier`` <= :data:`MAX_LEARNING_RATE_MULTIPLIER`: a larger one does not
  train, it destroys the adapter (see there);
* ``lora_rank`` <= the server's ``--max-lora-rank``, ``lora_target_modules`` among the ones it
  serves (an adapter beyond them could not be served);
* ``seed`` (a job field, not a hyperparameter) in ``0 .. MAX_SEED``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sglang_harli.finetune.base_model import PROJECTIONS

# AdamW learning rate that learning_rate_multiplier scales: a common LoRA choice.
BASE_LEARNING_RATE = 2e-4
# At most 100 x 2e-4 = 0.02. LoRA recipes use 1e-5 to 1e-3 (5e-3 at the very most, rsLoRA); AdamW
# moves every weight by about the learning rate each step whatever the gradient, so 0.02 already
# ruins most runs, and far beyond it the adapter's weights grow without bound: at 1e12 the job
# "succeeded" with weights near 1e9 and an adapter that answered nothing but <unk>, at 1e300 it
# failed mid-run. A 400 at creation says so before any time is spent.
MAX_LEARNING_RATE_MULTIPLIER = 100.0
AUTO = "auto"
MAX_EPOCHS = 10_000
MICRO_BATCH_TOKENS = 32_768  # tokens per micro-batch: about 8 GB of layer inputs for an 8B model
# "auto" epochs, as OpenAI resolves them: 3, unless that trains fewer than MIN_AUTO_EXAMPLES or
# more than MAX_AUTO_EXAMPLES examples in all, then as many as reach the bound, within 1 ..
# MAX_AUTO_EPOCHS. A handful of examples needs many passes to be learned at all: 8 question and
# answer pairs at 3 epochs leave SmolLM2 answering as before; at 13 it gives the trained answers.
DEFAULT_EPOCHS = 3
MIN_AUTO_EXAMPLES = 100
MAX_AUTO_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
MAX_SEED = 2**31 - 1  # every RNG we seed (torch, numpy, Python) takes it as is


class InvalidParameter(ValueError):
    """A hyperparameter we cannot train with; ``param`` names it the way the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    max_seq_length: int

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Hyperparameters:
        return cls(**{**values, "lora_target_modules": tuple(values["lora_target_modules"])})


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What the server's LoRA serving was sized for: an adapter beyond it could not be served."""

    max_lora_rank: int
    target_modules: tuple[str, ...] = PROJECTIONS
    max_seq_length: int = 2048  # the model's context length

    @property
    def max_example_tokens(self) -> int:
        """The longest example a job can train on: the context, within one micro-batch."""
        return min(self.max_seq_length, MICRO_BATCH_TOKENS)


def resolve(
    raw: Mapping[str, Any] | None,
    num_examples: int,
    limits: ServingLimits,
    longest: int | None = None,
) -> Hyperparameters:
    """Check ``raw`` and fill in every ``"auto"`` or missing value; raises InvalidParameter.

    ``longest``: the longest example of the job's files, in tokens (what an ``"auto"``
    ``max_seq_length`` becomes; without it, the longest the server accepts)."""
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidParameter(
            f"hyperparameters.{unknown[0]}", f"unknown hyperparameter {unknown[0]!r}"
        )
    ceiling = limits.max_example_tokens
    auto_length = ceiling if longest is None else max(1, min(longest, ceiling))
    max_seq_length = min(_int(raw, "max_seq_length", auto=auto_length), ceiling)
    fits = max(1, MICRO_BATCH_TOKENS // max_seq_length)
    batch_size = _int(raw, "batch_size", auto=max(1, min(8, math.ceil(num_examples / 10), fits)))
    if batch_size * max_seq_length > MICRO_BATCH_TOKENS:
        raise InvalidParameter(
            "hyperparameters.batch_size",
            f"batch_size {batch_size} x max_seq_length {max_seq_length} = "
            f"{batch_size * max_seq_length} tokens per micro-batch; the server trains at most "
            f"{MICRO_BATCH_TOKENS}: lower batch_size or max_seq_length",
        )
    rank = _int(raw, "lora_rank", auto=min(8, limits.max_lora_rank))
    if rank > limits.max_lora_rank:
        raise InvalidParameter(
            "hyperparameters.lora_rank",
            f"lora_rank {rank} exceeds the server's --max-lora-rank {limits.max_lora_rank}",
        )
    targets = raw.get("lora_target_modules", AUTO)
    targets = tuple(limits.target_modules) if targets == AUTO else _modules(targets, limits)
    return Hyperparameters(
        n_epochs=_int(raw, "n_epochs", auto=auto_epochs(num_examples), maximum=MAX_EPOCHS),
        batch_size=batch_size,
        learning_rate_multiplier=_learning_rate_multiplier(raw),
        lora_rank=rank,
        lora_alpha=_positive_float(raw, "lora_alpha", auto=2.0 * rank),
        lora_dropout=_dropout(raw),
        lora_target_modules=targets,
        max_seq_length=max_seq_length,
    )


def auto_epochs(num_examples: int) -> int:
    """What ``"n_epochs": "auto"`` means for a training file of ``num_examples`` examples."""
    if num_examples * DEFAULT_EPOCHS < MIN_AUTO_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_AUTO_EXAMPLES / max(num_examples, 1)))
    if num_examples * DEFAULT_EPOCHS > MAX_AUTO_EXAMPLES:
        return max(1, MAX_AUTO_EXAMPLES // num_examples)
    return DEFAULT_EPOCHS


def _value(raw: Mapping[str, Any], name: str, auto: Any) -> Any:
    value = raw.get(name, AUTO)
    return auto if value == AUTO else value


def _int(raw: Mapping[str, Any], name: str, auto: int, maximum: int | None = None) -> int:
    value = _value(raw, name, auto)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameter(
            f"hyperparameters.{name}",
            f"{name} must be a positive integer or 'auto', got {_shown(value)}",
        )
    if maximum is not None and value > maximum:
        raise InvalidParameter(
            f"hyperparameters.{name}", f"{name} must be at most {maximum}, got {value}"
        )
    return value


def _shown(value: Any) -> str:
    """A rejected value as the error message shows it: short whatever the client sent."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _positive_float(raw: Mapping[str, Any], name: str, auto: float) -> float:
    value = _value(raw, name, auto)
    # an integer too large for a float (JSON allows any) is as impossible as infinity
    as_float = float(value) if isinstance(value, float) or _small_int(value) else math.nan
    if not 0 < as_float < math.inf:
        raise InvalidParameter(
            f"hyperparameters.{name}",
            f"{name} must be a positive number or 'auto', got {_shown(value)}",
        )
    return as_float


def _learning_rate_multiplier(raw: Mapping[str, Any]) -> float:
    value = _positive_float(raw, "learning_rate_multiplier", auto=1.0)
    if value > MAX_LEARNING_RATE_MULTIPLIER:
        most = MAX_LEARNING_RATE_MULTIPLIER
        raise InvalidParameter(
            "hyperparameters.learning_rate_multiplier",
            f"learning_rate_multiplier must be at most {most:g} (a learning rate of "
            f"{most * BASE_LEARNING_RATE:g}; beyond it training destroys the adapter), "
            f"got {_shown(value)}",
        )
    return value


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1000


def _dropout(raw: Mapping[str, Any]) -> float:
    value = _value(raw, "lora_dropout", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InvalidParameter(
            "hyperparameters.lora_dropout", f"lora_dropout must be in [0, 1), got {_shown(value)}"
        )
    return float(value)


def _modules(value: Any, limits: ServingLimits) -> tuple[str, ...]:
    param = "hyperparameters.lora_target_modules"
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise InvalidParameter(param, "lora_target_modules must be a non-empty list")
    outside = [m for m in value if m not in limits.target_modules]
    if outside:
        raise InvalidParameter(
            param,
            f"lora_target_modules {outside} are not served by this server "
            f"(--lora-target-modules: {list(limits.target_modules)})",
        )
    return tuple(m for m in PROJECTIONS if m in value)
