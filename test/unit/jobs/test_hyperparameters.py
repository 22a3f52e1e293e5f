from __future__ import annotations

import pytest

from sglang_harli.finetune.base_model import PROJECTIONS
from sglang_harli.jobs import hyperparameters as hp

LIMITS = hp.ServingLimits(max_lora_rank=16, target_modules=PROJECTIONS, max_seq_length=512)


def test_auto_values_are_resolved():
    resolved = hp.resolve({"n_epochs": "auto"}, num_examples=45, limits=LIMITS)
    assert resolved == hp.Hyperparameters(
        n_epochs=3,
        batch_size=5,
        learning_rate_multiplier=1.0,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        lora_target_modules=PROJECTIONS,
        max_seq_length=512,
    )
    assert resolved.learning_rate == hp.BASE_LEARNING_RATE
    assert hp.Hyperparameters.from_dict(resolved.to_dict()) == resolved


@pytest.mark.parametrize(
    "examples, epochs",
    [(1, 25), (4, 25), (8, 13), (33, 4), (34, 3), (8333, 3), (8334, 2), (30_000, 1)],
)
def test_auto_epochs_train_a_small_file_more_often(examples, epochs):
    """As OpenAI resolves "auto": 3 epochs, unless that trains fewer than 100 or more than
    25,000 examples in all (8 pairs at 3 epochs teach a model nothing)."""
    resolved = hp.resolve({}, num_examples=examples, limits=LIMITS)
    assert resolved.n_epochs == epochs
    assert hp.resolve({"n_epochs": 2}, num_examples=examples, limits=LIMITS).n_epochs == 2


def test_given_values_are_kept_in_canonical_order():
    resolved = hp.resolve(
        {"lora_rank": 4, "lora_target_modules": ["v_proj", "q_proj"], "max_seq_length": 4096},
        num_examples=3,
        limits=LIMITS,
    )
    assert resolved.lora_target_modules == ("q_proj", "v_proj")
    assert resolved.lora_alpha == 8.0 and resolved.batch_size == 1
    assert resolved.max_seq_length == 512  # never above what the model serves


@pytest.mark.parametrize(
    "raw, param",
    [
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"n_epochs": -2}, "hyperparameters.n_epochs"),
        ({"n_epochs": 1.5}, "hyperparameters.n_epochs"),
        ({"batch_size": True}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier"),
        ({"learning_rate_multiplier": "x"}, "hyperparameters.learning_rate_multiplier"),
        ({"lora_rank": 0}, "hyperparameters.lora_rank"),
        ({"lora_rank": 32}, "hyperparameters.lora_rank"),
        ({"lora_dropout": 1.0}, "hyperparameters.lora_dropout"),
        ({"lora_target_modules": []}, "hyperparameters.lora_target_modules"),
        ({"lora_target_modules": "q_proj"}, "hyperparameters.lora_target_modules"),
        ({"lora_target_modules": ["embed_tokens"]}, "hyperparameters.lora_target_modules"),
        ({"warmup": 3}, "hyperparameters.warmup"),
    ],
)
def test_impossible_values_are_refused_by_name(raw, param):
    with pytest.raises(hp.InvalidParameter) as refused:
        hp.resolve(raw, num_examples=10, limits=LIMITS)
    assert refused.value.param == param


def test_targets_outside_the_served_ones_are_refused():
    limits = hp.ServingLimits(max_lora_rank=8, target_modules=("q_proj", "v_proj"))
    with pytest.raises(hp.InvalidParameter, match="not served"):
        hp.resolve({"lora_target_modules": ["o_proj"]}, 4, limits)
    assert hp.resolve({}, 4, limits).lora_target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "raw, param",
    [
        ({"n_epochs": hp.MAX_EPOCHS + 1}, "hyperparameters.n_epochs"),
        ({"n_epochs": 10**30}, "hyperparameters.n_epochs"),
        ({"batch_size": 10**6}, "hyperparameters.batch_size"),
        ({"batch_size": 128, "max_seq_length": 512}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 10**400}, "hyperparameters.learning_rate_multiplier"),
        ({"lora_alpha": float("inf")}, "hyperparameters.lora_alpha"),
        ({"lora_alpha": 10**400}, "hyperparameters.lora_alpha"),
    ],
)
def test_absurd_sizes_are_refused_by_name(raw, param):
    with pytest.raises(hp.InvalidParameter) as refused:
        hp.resolve(raw, num_examples=1000, limits=LIMITS)
    assert refused.value.param == param
    assert len(str(refused.value)) < 300  # a huge value is not echoed whole


@pytest.mark.parametrize("multiplier", [1e12, 1e300, 101])
def test_a_learning_rate_that_destroys_the_adapter_is_refused_by_name(multiplier):
    """Finite but absurd: refused at creation (a 400 naming it), not trained into an adapter
    that answers <unk>, nor failed half way; the bound itself is allowed."""
    with pytest.raises(hp.InvalidParameter) as refused:
        hp.resolve({"learning_rate_multiplier": multiplier}, num_examples=100, limits=LIMITS)
    assert refused.value.param == "hyperparameters.learning_rate_multiplier"
    assert "learning_rate_multiplier must be at most 100" in str(refused.value)
    most = hp.MAX_LEARNING_RATE_MULTIPLIER
    raw = {"learning_rate_multiplier": most}
    assert hp.resolve(raw, num_examples=100, limits=LIMITS).learning_rate_multiplier == most


def test_a_micro_batch_fits_the_token_budget():
    long_context = hp.ServingLimits(max_lora_rank=16, max_seq_length=131_072)
    # auto: the longest example, and as many sequences of it as the budget holds
    resolved = hp.resolve({}, num_examples=1000, limits=long_context, longest=10_000)
    assert resolved.max_seq_length == 10_000
    assert resolved.batch_size == hp.MICRO_BATCH_TOKENS // 10_000 == 3
    assert resolved.batch_size * resolved.max_seq_length <= hp.MICRO_BATCH_TOKENS
    # never longer than one micro-batch, whatever the context
    assert hp.resolve({}, 10, long_context).max_seq_length == hp.MICRO_BATCH_TOKENS
    assert long_context.max_example_tokens == hp.MICRO_BATCH_TOKENS
    exact = {"batch_size": 4, "max_seq_length": hp.MICRO_BATCH_TOKENS // 4}
    assert hp.resolve(exact, 10, long_context).batch_size == 4
    with pytest.raises(hp.InvalidParameter, match="tokens per micro-batch"):
        hp.resolve({**exact, "batch_size": 5}, 10, long_context)


def test_auto_max_seq_length_is_the_longest_example():
    resolved = hp.resolve({}, num_examples=45, limits=LIMITS, longest=37)
    assert resolved.max_seq_length == 37 and resolved.batch_size == 5
    assert hp.resolve({"max_seq_length": 100}, 45, LIMITS, longest=37).max_seq_length == 100
