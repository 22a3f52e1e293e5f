"""The hooks fire in SGLang's PD-disaggregation decode loop too (fake transfer backend)."""

from __future__ import annotations

import threading
import time

import pytest

from test.support.finetuning import start_training
from test.support.server_process import harli_server

pytestmark = pytest.mark.server

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang's fake backend admits requests that name this host
POOL = 4096


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
        "--max-total-tokens",
        str(POOL),
        "--harli-max-lend-fraction",
        "0.9",
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


def pd_generate(server, room: int, max_new_tokens: int) -> dict:
    return server.post(
        "/generate",
        {
            "input_ids": [10, 11, 12, 13, 14],
            "bootstrap_host": FAKE_BOOTSTRAP_HOST,
            "bootstrap_room": room,
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        },
    )


def test_lent_slots_come_back_before_pd_preallocation(decode_server, tiny_model_dir, tmp_path):
    """A PD decode server pre-allocates KV for each incoming transfer, keeping SGLang's
    reserved decode tokens free: with a job holding most of the pool, the lender gives slots
    back before that check, so transfers are admitted and decode without retraction. (The
    fake backend transfers no KV, so the tokens themselves are not compared.)"""
    job = start_training(decode_server, str(tiny_model_dir), tmp_path)
    try:
        deadline = time.monotonic() + 60
        while (memory := decode_server.get("/harli/status")["schedulers"][0]["memory"])[
            "kv_lent_slots"
        ] < POOL // 2:
            assert time.monotonic() < deadline, memory
            time.sleep(0.1)
        before = memory["kv_lend_stats"]
        # together about 3000 slots with the reserved decode tokens: more than is free
        lengths = [1200, 1200, 6]
        outs: list = [None] * len(lengths)

        def run(i):
            outs[i] = pd_generate(decode_server, 200 + i, lengths[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(lengths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [len(o["output_ids"]) for o in outs] == lengths
        assert all(o["meta_info"]["num_retractions"] == 0 for o in outs)
        after = decode_server.get("/harli/status")["schedulers"][0]["memory"]["kv_lend_stats"]
        assert after["reclaims"] > before["reclaims"]
    finally:
        decode_server.post(f"/v1/fine_tuning/jobs/{job}/cancel", {})
