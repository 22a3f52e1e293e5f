"""Unified memory on a real server (CPU, tiny model): the job's activations live in free KV slots.

One server, an 8192-slot KV pool of which up to 90% may be lent, no reserve, with
``--harli-arena-poison``:
every block the job gets from lent slots is filled with NaN first, so a block that overlapped
live KV would show up as garbage in decode's outputs. It checks that a training job's
checkpointed inputs lie inside SGLang's K/V buffers, that concurrent greedy outputs are
token-identical to the idle server's, that a burst needing about 90% of the pool while the job
holds most of it completes with zero retractions and takes slots back, that SGLang's idle leak
check stays on (with leases out and with none), and that the job goes on and succeeds.
"""

from __future__ import annotations

import time

import pytest
import requests
import torch

from test.support.finetuning import LEARN, PAIRS, answer, start_training, wait_for, write_dataset
from test.support.serving import (
    concurrently,
    generate,
    lending_server,
    memory,
    openai_client,
    wait_until,
)

pytestmark = pytest.mark.server

POOL = 8192
PROMPTS = [f"Request {i}: tell me about the number {i * 7}." for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    flags = ["--harli-max-lend-fraction", "0.9", "--harli-relend-delay-ms", "200"]
    # no per-job reserve (a CPU's default): every block the job holds is in lent slots
    flags += ["--harli-reserve-mb", "0"]
    with lending_server(tiny_model_dir, tmp_path_factory.mktemp("lend"), POOL, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def idle_outputs(server):
    """Greedy outputs before any job trains (nothing lent)."""
    assert memory(server)["kv_lent_slots"] == 0
    return [generate(server, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def long_job(server, tiny_model_dir, idle_outputs, tmp_path_factory):
    """A job that trains until cancelled; cancelled (and its leases returned) at the end."""
    job = start_training(server, str(tiny_model_dir), tmp_path_factory.mktemp("long"))
    yield job
    requests.post(f"{server.url}/v1/fine_tuning/jobs/{job}/cancel", timeout=30)  # if still running


def inside(block, buffers) -> bool:
    ptr, n = block
    return any(lo <= ptr and ptr + n <= lo + size for lo, size in buffers)


def test_activations_live_in_lent_kv_slots(server, long_job):
    status = wait_until(
        lambda: (m := memory(server))["kv_lent_slots"] > 0 and m["arena_blocks"] and m,
        what="slots lent and activations in them",
    )
    elem_bytes = torch.empty(0, dtype=getattr(torch, status["kv_dtype"])).element_size()
    assert status["kv_lent_bytes"] == status["kv_lent_slots"] * (2 * 2 * 2 * 64 * elem_bytes)
    assert status["kv_lent_slots"] <= status["kv_lent_limit_slots"] == int(0.9 * POOL)
    blocks, buffers = status["arena_blocks"], status["kv_buffers"]
    assert len(buffers) == 2 * 2  # K and V of each of the tiny model's 2 layers
    assert all(inside(b, buffers) for b in blocks), (blocks, buffers)
    assert status["job"]["micro_batch_tokens"] > 0
    # greedy lending: the job soon holds most of the pool
    wait_until(lambda: memory(server)["kv_lent_slots"] >= POOL // 2, what="most of the pool lent")


def test_outputs_while_the_job_trains_in_lent_slots_match_an_idle_server(
    server, long_job, idle_outputs
):
    wait_until(lambda: memory(server)["kv_lent_slots"] > 0, what="slots lent")
    step_before = server.get(f"/v1/fine_tuning/jobs/{long_job}")["step"]
    busy = concurrently(lambda p: generate(server, p), PROMPTS)
    assert (
        busy == idle_outputs
    )  # same tokens (poisoned blocks never touched live KV), no retraction
    status = memory(server)
    assert status["kv_lent_slots"] > 0 and status["arena"]["allocations"] > 0
    assert server.get(f"/v1/fine_tuning/jobs/{long_job}")["step"] > step_before


def test_leak_check_stays_on_with_leases_out(server, long_job):
    """SGLang's idle pool check raises on a mismatch (and would stop the server); lent slots
    are accounted, so idling with leases out is fine."""
    wait_until(lambda: memory(server)["kv_lent_slots"] > 0, what="slots lent")
    time.sleep(1.0)  # idle passes: the check runs on each
    assert memory(server)["kv_lent_slots"] > 0
    assert "memory leak" not in server.log_tail(400)


def test_burst_takes_slots_back_before_decode_needs_them(server, client, tiny_model_dir, tmp_path):
    """A job holding most of the pool, then requests needing about 90% of it at once: every one
    completes with zero retractions, the slots come back in time, and the job goes on and
    succeeds (and learned what it was taught)."""
    for job in client.fine_tuning.jobs.list():
        if job.status in ("queued", "running"):
            client.fine_tuning.jobs.cancel(job.id)
            wait_for(client, job.id)
    wait_until(lambda: memory(server)["kv_lent_slots"] == 0, what="the last job's leases back")
    upload = client.files.create(
        file=open(write_dataset(tmp_path / "train.jsonl"), "rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        suffix="burst",
        seed=1,
        hyperparameters={**LEARN, "n_epochs": 300},
    )
    wait_until(
        lambda: memory(server)["kv_lent_slots"] >= POOL // 2, what="the job holding most of it"
    )
    before = memory(server)["kv_lend_stats"]
    step_before = client.fine_tuning.jobs.retrieve(job.id).step
    # 32 requests x (about 16 prompt tokens + 210 new tokens) = about 7200 slots: 88% of the pool
    prompts = [f"Burst {i}: count with me slowly." for i in range(32)]
    outs = concurrently(lambda p: generate(server, p, max_new_tokens=210), prompts)
    assert all(len(o["ids"]) == 210 for o in outs)
    assert sum(o["retractions"] for o in outs) == 0
    after = memory(server)
    stats = after["kv_lend_stats"]
    assert stats["reclaims"] > before["reclaims"]  # lent slots came back for the burst
    assert stats["reclaimed_slots"] > before["reclaimed_slots"]
    assert after["kv_reclaim_ms"]["max"] is not None
    # the job goes on (in the leases it kept, or new ones: during the burst it may have had
    # none, and a relend waits out the delay after a reclaim) and finishes
    wait_until(
        lambda: client.fine_tuning.jobs.retrieve(job.id).step > step_before,
        what="the job training again after the burst",
    )
    final = wait_for(client, job.id)
    assert final.status == "succeeded", final.error
    for question, expected in PAIRS:
        assert answer(client, final.fine_tuned_model, question).startswith(expected[:-1])
    # no job: every lease back, and the idle leak check still passes without leases
    wait_until(lambda: memory(server)["kv_lent_slots"] == 0, what="leases returned")
    time.sleep(1.0)
    assert "memory leak" not in server.log_tail(400)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
