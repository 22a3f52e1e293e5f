import os

import pytest
import torch

from sglang_harli.tiny_model import ensure_tiny_model

from .helpers import OBSERVED, SPECS


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("HARLI_REPORT_ERRORS") and OBSERVED:
        terminalreporter.section("finetune: worst errors observed")
        for kind, value in sorted(OBSERVED.items()):
            terminalreporter.write_line(f"{kind}: {value:.2e}")


@pytest.fixture(autouse=True, scope="package")
def one_cpu_thread():
    """The models are tiny: a second intra-op thread only adds contention (50x on a busy
    2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dirs():
    """Tiny random Llama and Qwen2 (built once into the user cache, then reused)."""
    return {arch: ensure_tiny_model(spec) for arch, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tokenizer(model_dirs):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dirs["qwen2"])
