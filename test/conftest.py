"""Shared fixtures: the tiny model every test serves or trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_harli.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded default model (the one the server uses without --model-path)."""
    return ensure_tiny_model()
