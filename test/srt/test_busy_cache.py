"""Unified memory on a busy server (CPU, tiny model, default flags): cached prefixes are lent.

SGLang's radix cache keeps every finished request's KV until a request needs the room, so after
a burst it holds nearly the whole pool and nothing is free. Before the cache floor, the lender
lent nothing then and the job sat in ``running`` training nothing (issue 18). Here: a 16384-slot
pool, the default flags (up to half lent, a quarter kept cached, a per-job reserve) plus
``--harli-arena-poison``; a job holding slots, then a burst of 24 requests needing about 90% of
the pool. The burst completes with zero retractions; with no flush the job trains again within
seconds in slots evicted from the cache; a second identical burst is served token for token as
on an idle server; the job succeeds and learned what it was taught.
"""

from __future__ import annotations

import time

import pytest
import requests

from test.support.finetuning import LEARN, PAIRS, answer, wait_for, write_dataset
from test.support.serving import (
    concurrently,
    generate,
    lending_server,
    memory,
    openai_client,
    wait_until,
)

pytestmark = pytest.mark.server

POOL = 16384
# 24 x (about 12 prompt tokens + 580 new) = about 14,200 slots: 87% of the pool
BURST = [f"Burst {i}: count with me slowly." for i in range(24)]
NEW_TOKENS = 580


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with lending_server(tiny_model_dir, tmp_path_factory.mktemp("busy"), POOL) as server:
        yield server  # the default flags


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def burst(server) -> list[dict]:
    return concurrently(lambda p: generate(server, p, max_new_tokens=NEW_TOKENS), BURST)


@pytest.fixture(scope="module")
def idle_outputs(server):
    """The burst on the idle server (no job, nothing lent), then the cache flushed."""
    assert memory(server)["kv_lent_slots"] == 0
    outs = burst(server)
    assert requests.post(server.url + "/flush_cache", timeout=30).status_code == 200
    return [o["ids"] for o in outs]


@pytest.fixture(scope="module")
def job(server, client, tiny_model_dir, idle_outputs, tmp_path_factory):
    upload = client.files.create(
        file=open(write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl"), "rb"),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        suffix="busy",
        seed=1,
        # long enough to train through both bursts (about 400 steps in by the second here)
        hyperparameters={**LEARN, "n_epochs": 1000},
    )
    yield job.id
    requests.post(f"{server.url}/v1/fine_tuning/jobs/{job.id}/cancel", timeout=30)


def trained_tokens(client, job_id) -> int:
    return client.fine_tuning.jobs.retrieve(job_id).trained_tokens or 0


def test_after_a_burst_cached_prefixes_are_lent_and_the_job_trains_on(server, client, job):
    wait_until(lambda: memory(server)["kv_lent_slots"] >= POOL // 4, what="the job borrowing")
    outs = burst(server)
    assert client.fine_tuning.jobs.retrieve(job).status == "running"  # it outlasts the burst
    assert all(len(o["ids"]) == NEW_TOKENS for o in outs)
    assert sum(o["retractions"] for o in outs) == 0
    after_burst = memory(server)
    assert after_burst["kv_lend_stats"]["reclaims"] > 0  # the burst took lent slots back
    tokens = trained_tokens(client, job)
    # no flush: within seconds the job trains again, in slots evicted from the cache
    started = time.monotonic()
    wait_until(lambda: trained_tokens(client, job) > tokens, 30, "the job training again")
    print(f"the job trained again {time.monotonic() - started:.1f} s after the burst")
    status = wait_until(
        lambda: (
            (m := memory(server))["kv_lent_slots"] > 0
            and m["kv_lend_stats"]["cache_evicted_slots"] > 0
            and m
        ),
        30,
        "cached prefixes lent",
    )
    # the cache keeps its floor (a quarter of the pool), give or take one cached request
    assert status["kv_cache_floor_slots"] == POOL // 4
    assert status["kv_cached_slots"] >= POOL // 4 - NEW_TOKENS - 64
    assert not status["job"]["waiting_for_memory"]


def test_a_second_burst_is_served_as_on_an_idle_server(server, client, job, idle_outputs):
    wait_until(
        lambda: (
            memory(server)["kv_lend_stats"]["cache_evicted_slots"] > 0
            and memory(server)["kv_lent_slots"] > 0
        ),
        what="the job in cache-evicted slots",
    )
    assert client.fine_tuning.jobs.retrieve(job).status == "running"
    outs = burst(server)
    assert sum(o["retractions"] for o in outs) == 0
    # poisoned arena blocks never touched live KV: token for token the idle server's outputs
    assert [o["ids"] for o in outs] == idle_outputs
    final = wait_for(client, job, timeout_s=600)
    assert final.status == "succeeded", final.error
    for question, expected in PAIRS:
        assert answer(client, final.fine_tuned_model, question).startswith(expected[:-1])
    wait_until(lambda: memory(server)["kv_lent_slots"] == 0, what="leases returned")
    assert "memory leak" not in server.log_tail(400)
