"""The hooks fire in SGLang's PD-disaggregation decode loop too (fake transfer backend)."""

from __future__ import annotations

import pytest

from test.support.server_process import harli_server

pytestmark = pytest.mark.server

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang's fake backend admits requests that name this host


@pytest.fixture(scope="module")
def decode_server(tiny_model_dir, tmp_path_factory):
    server = harli_server(
        tmp_path_factory.mktemp("pd") / "server.log",
        "--model-path",
        str(tiny_model_dir),
        "--disaggregation-mode",
        "decode",
        "--disaggregation-transfer-backend",
        "fake",
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_decode_iterations_counted_in_pd_decode_mode(decode_server):
    before = decode_server.get("/harli/status")
    out = decode_server.post(
        "/generate",
        {
            "input_ids": [10, 11, 12, 13, 14],
            "bootstrap_host": FAKE_BOOTSTRAP_HOST,
            "bootstrap_room": 101,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        },
    )
    assert len(out["output_ids"]) == 6
    after = decode_server.get("/harli/status")
    assert after["decode_iterations"] > before["decode_iterations"]
    [scheduler] = after["schedulers"]
    # the PD-decode twin of get_next_batch_to_run is wrapped as well
    assert (
        scheduler["hooks"]["reclaim_kv"]["calls"]
        > before["schedulers"][0]["hooks"].get("reclaim_kv", {"calls": 0})["calls"]
    )
