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
