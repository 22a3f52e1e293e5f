"""The served model's own weights, viewed through srt/weights.py, give the HF view's loss."""

from __future__ import annotations

import json
import sys
import time

import pytest

from sglang_harli.srt.cpu import bf16_arithmetic, cuda_available
from test.support.server_process import COMMON_FLAGS, Server

from .weights_probe import fp32_loss

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def probe_report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "report.json"
    argv = [sys.executable, "-m", "test.srt.weights_probe", str(out)]
    server = Server(
        [*argv, "--model-path", str(tiny_model_dir), *COMMON_FLAGS],
        out.with_suffix(".log"),
    )
    try:
        server.wait_ready()
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(1)
        return json.loads(out.read_text())
    finally:
        server.stop()


def test_sglang_weights_give_the_hf_loss(probe_report, tiny_model_dir):
    import transformers

    from sglang_harli.finetune.base_model import BaseModelView

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # bf16, as saved
    expected = fp32_loss(BaseModelView.from_hf(hf))
    # served as saved, or in fp32 on a CPU without bf16 arithmetic (the CPU recipe's choice)
    served = "torch.bfloat16" if cuda_available() or bf16_arithmetic() else "torch.float32"
    assert probe_report["dtype"] == served
    # same bf16 values (fp32 holds them exactly), same fp32 maths: equal up to summation order
    assert probe_report["loss"] == pytest.approx(expected, rel=1e-5)


def test_view_aliases_the_served_tensors(probe_report):
    assert probe_report["shares_storage"]
    assert not probe_report["requires_grad"]
