"""CPU kernel tests: run every Triton kernel in Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels (i.e. before
``harli_kernels`` is imported), hence the environment is set at import time of this conftest.
"""

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> str:
    """Device the kernels run on: CUDA when present, else CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
