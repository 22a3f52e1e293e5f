"""A job that waits for memory says so; one that can never fit fails (CPU, tiny model).

The issue-18 scenario with the flags that starve a job: no reserve (``--harli-reserve-mb 0``)
and the cache never evicted for lending (``--harli-lend-cache-floor 1``), a 4096-slot pool,
``--harli-arena-poison``. A burst fills the pool with cached prefixes: the job, its leases taken
back, waits, and its events, ``/harli/status`` and ``/metrics`` say so; ``POST /flush_cache``
frees the pool and the job trains again, with an event saying how long it waited. A flush while
the job holds leases takes them back first (decode's outputs stay the idle server's). A job
whose longest example's layer inputs cannot fit in all the memory it may ever be lent fails
with ``insufficient_memory`` instead of waiting forever.
"""

from __future__ import annotations

import pytest
import requests

from test.support.finetuning import LEARN, write_dataset
from test.support.serving import (
    concurrently,
    generate,
    lending_server,
    memory,
    openai_client,
    wait_until,
)

pytestmark = pytest.mark.server

POOL = 4096
PROMPTS = [f"Question {i}: what comes after {i * 3}?" for i in range(4)]
# 12 x (about 12 prompt tokens + 320 new) = about 4,000 slots: the whole pool, then cached
BURST = [f"Fill {i}: count with me slowly." for i in range(12)]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    flags = ["--harli-reserve-mb", "0", "--harli-lend-cache-floor", "1", "--enable-metrics"]
    with lending_server(tiny_model_dir, tmp_path_factory.mktemp("waits"), POOL, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def idle_outputs(server):
    return [generate(server, p)["ids"] for p in PROMPTS]


def create_job(client, model, path, pairs=None, **hyper) -> str:
    data = write_dataset(path, pairs) if pairs is not None else write_dataset(path)
    upload = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model=model, training_file=upload.id, seed=1, hyperparameters={**LEARN, **hyper}
    ).id


def messages(client, job_id) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]


def test_a_starved_job_says_so_and_trains_again_after_a_flush(
    server, client, tiny_model_dir, idle_outputs, tmp_path
):
    job = create_job(client, str(tiny_model_dir), tmp_path / "train.jsonl", n_epochs=10_000)
    try:
        wait_until(lambda: memory(server)["kv_lent_slots"] > 0, what="the job borrowing")
        outs = concurrently(lambda p: generate(server, p, max_new_tokens=320), BURST)
        assert sum(o["retractions"] for o in outs) == 0
        # the cache holds the pool, nothing is evicted for lending: the job waits, and says so
        status = wait_until(
            lambda: (
                (j := memory(server)["job"])
                and (j.get("memory_wait") or {}).get("waiting_s", 0) > 2
                and j
            ),
            30,
            "a long wait",
        )
        assert status["waiting_for_memory"] and "no room" in status["memory_wait"]["reason"]
        wait_until(
            lambda: any(m.startswith("Waiting for memory") for m in messages(client, job)),
            10,
            "the wait's event",
        )
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert "sglang:harli_job_waiting_for_memory" in metrics
        tokens = client.fine_tuning.jobs.retrieve(job).trained_tokens or 0

        assert requests.post(server.url + "/flush_cache", timeout=30).status_code == 200
        wait_until(
            lambda: any(m.startswith("Memory available again") for m in messages(client, job)),
            30,
            "the wait's end",
        )
        wait_until(
            lambda: (client.fine_tuning.jobs.retrieve(job).trained_tokens or 0) > tokens,
            30,
            "the job training again",
        )
        assert memory(server)["job"]["memory_waits_reported"] >= 1

        # a flush while the job holds leases takes them back first: decode never writes into
        # the job's (poisoned) blocks, nor they into its KV
        wait_until(lambda: memory(server)["kv_lent_slots"] > 0, what="leases out again")
        released = memory(server)["kv_lend_stats"]["released_all"]
        assert requests.post(server.url + "/flush_cache", timeout=30).status_code == 200
        assert memory(server)["kv_lend_stats"]["released_all"] > released
        assert concurrently(lambda p: generate(server, p)["ids"], PROMPTS) == idle_outputs
        assert "memory leak" not in server.log_tail(400)
    finally:
        client.fine_tuning.jobs.cancel(job)


def test_a_job_that_can_never_fit_fails_with_the_reason(server, client, tiny_model_dir, tmp_path):
    # a lease is 1/16 of the pool: 256 slots, each 512 bytes of every layer's K (and V) rows,
    # so a layer input (1 KiB a token, fp32) of more than ~127 tokens fits in no lent chunk
    story = " ".join(f"word{i}" for i in range(300))
    pairs = [("Tell me the whole story.", story)] * 2
    job = create_job(client, str(tiny_model_dir), tmp_path / "long.jsonl", pairs, n_epochs=1)
    wait_until(
        lambda: client.fine_tuning.jobs.retrieve(job).status in ("failed", "succeeded"),
        120,
        "the job ending",
    )
    final = client.fine_tuning.jobs.retrieve(job)
    assert final.status == "failed" and final.error.code == "insufficient_memory"
    assert "--harli-reserve-mb" in final.error.message
