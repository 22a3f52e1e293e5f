"""Fine-tuning beside decode (``--harli-executor cpu-concurrent``) on a real server (CPU, tiny
model): one server in ``naive`` mode (every resource finetune may have, beside every decode
iteration), an 8192-slot KV pool of which up to 90% may be lent, ``--harli-arena-poison``.

It checks what a user would see: the job's units run at the same time as decode iterations
(from the server's recorded timestamps, not its configuration); greedy outputs of concurrent
requests while the job trains in lent slots are token-identical to the idle server's; a burst
needing about 90% of the pool while units run on lent slots completes with zero retractions
(the give-back waits for the units in flight: the executor's fence); and the job succeeds.
"""

from __future__ import annotations

import pytest
import requests

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
    flags = ["--harli-mode", "naive", "--harli-executor", "cpu-concurrent"]
    flags += ["--harli-max-lend-fraction", "0.9", "--harli-relend-delay-ms", "200"]
    flags += ["--harli-reserve-mb", "0"]  # every block the job holds is in lent slots
    workdir = tmp_path_factory.mktemp("concurrent")
    with lending_server(tiny_model_dir, workdir, POOL, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def idle_outputs(server):
    assert memory(server)["kv_lent_slots"] == 0
    return [generate(server, p, max_new_tokens=32) for p in PROMPTS]


@pytest.fixture(scope="module")
def long_job(server, tiny_model_dir, idle_outputs, tmp_path_factory):
    job = start_training(server, str(tiny_model_dir), tmp_path_factory.mktemp("long"))
    yield job
    requests.post(f"{server.url}/v1/fine_tuning/jobs/{job}/cancel", timeout=30)


def corun(server) -> dict:
    return server.get("/harli/status")["schedulers"][0]["corun"]


def overlaps(decodes, units) -> int:
    """Decode iterations during which some unit was running."""
    return sum(any(u0 < d1 and d0 < u1 for u0, u1 in units) for d0, d1 in decodes)


def test_units_run_beside_decode_iterations(server, long_job):
    status = corun(server)
    assert status["executor"]["kind"] == "cpu-concurrent"
    wait_until(lambda: corun(server)["corun_units"] > 0, what="units run by the worker")
    # decode load while the job trains: the worker's units overlap the decode iterations
    concurrently(lambda p: generate(server, p, max_new_tokens=64), PROMPTS)
    timeline = corun(server)["timeline"]
    decodes, units = timeline["decodes"], timeline["units"]
    assert decodes and units
    beside = overlaps(decodes, units)
    assert beside >= len(decodes) // 4, (beside, len(decodes))


def test_outputs_beside_the_job_in_lent_slots_match_an_idle_server(server, long_job, idle_outputs):
    wait_until(lambda: memory(server)["kv_lent_slots"] > 0, what="slots lent")
    step_before = server.get(f"/v1/fine_tuning/jobs/{long_job}")["step"]
    units_before = corun(server)["corun_units"]
    busy = concurrently(lambda p: generate(server, p, max_new_tokens=32), PROMPTS)
    assert busy == idle_outputs  # same tokens: no block of the job overlapped live KV
    assert corun(server)["corun_units"] > units_before
    wait_until(
        lambda: server.get(f"/v1/fine_tuning/jobs/{long_job}")["step"] > step_before,
        what="the job training on",
    )


def test_burst_with_units_on_lent_slots_completes_without_retractions(
    server, client, tiny_model_dir, tmp_path
):
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
        suffix="beside",
        seed=1,
        hyperparameters={**LEARN, "n_epochs": 300},
    )
    wait_until(
        lambda: memory(server)["kv_lent_slots"] >= POOL // 2, what="the job holding most of it"
    )
    before = memory(server)["kv_lend_stats"]
    # 32 requests x (about 16 prompt tokens + 210 new tokens) = about 7200 slots: 88% of the pool
    prompts = [f"Burst {i}: count with me slowly." for i in range(32)]
    outs = concurrently(lambda p: generate(server, p, max_new_tokens=210), prompts)
    assert all(len(o["ids"]) == 210 for o in outs)
    assert sum(o["retractions"] for o in outs) == 0
    stats = memory(server)["kv_lend_stats"]
    assert stats["reclaimed_slots"] > before["reclaimed_slots"]
    final = wait_for(client, job.id)
    assert final.status == "succeeded", final.error
    for question, expected in PAIRS:
        assert answer(client, final.fine_tuned_model, question).startswith(expected[:-1])
    assert "memory leak" not in server.log_tail(400)
