"""Tensor parallelism on the CPU engine (issue 12, part 1): SGLang 0.5.23 cannot start
``--tp-size 2`` on a CPU by itself; with the launcher's CPU guards it does, and plain SGLang
semantics hold: greedy outputs at TP 2 equal TP 1's, token for token.

Fine-tuning at TP > 1 is not built yet (the launcher refuses it outside ``--harli-mode off``), so
both servers run in ``off`` mode: SGLang's own scheduler.
"""

from __future__ import annotations

import pytest

from test.srt.test_server import greedy_outputs
from test.support.server_process import harli_server

pytestmark = pytest.mark.server


def outputs_at(tp: int, model_dir, workdir) -> dict:
    server = harli_server(
        workdir / f"tp{tp}.log",
        "--harli-mode",
        "off",
        "--model-path",
        str(model_dir),
        "--tp-size",
        str(tp),
    )
    try:
        server.wait_ready()
        return greedy_outputs(server, str(model_dir))
    finally:
        server.stop()


def test_greedy_outputs_at_tp2_equal_tp1(tiny_model_dir, tmp_path):
    tp2 = outputs_at(2, tiny_model_dir, tmp_path)
    tp1 = outputs_at(1, tiny_model_dir, tmp_path)
    assert tp2["generate"][2]["cached_tokens"] > 0  # a radix-cache hit is compared too
    assert tp2["chat"] == tp1["chat"]
    for at2, at1 in zip(tp2["generate"], tp1["generate"], strict=True):
        assert at2["output_ids"] == at1["output_ids"]
