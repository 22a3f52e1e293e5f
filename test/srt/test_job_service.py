"""The job service on real servers (CPU, tiny model): two servers share one state directory.

What an operator observes: each job is trained by exactly one server and lists each step once;
concurrent creates with one suffix, on both servers at once, create one job and refuse the rest
with a 409; another process locking the job store does not slow decode or stop the server, and
the job goes on afterwards; a server restarted while another one trains a job does not take it;
a server killed (-9) mid-training leaves a job that the other server resumes, past a torn
checkpoint, to success.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from test.support.finetuning import write_dataset
from test.support.server_process import harli_server

pytestmark = pytest.mark.server

HYPER = {"batch_size": 4, "learning_rate_multiplier": 20, "lora_rank": 8}
LOCK_S = 6.0
EPOCHS = 400  # the locked-store job: one step per epoch (4 examples, batch 4)


def start(log_dir, name, model_dir, state_dir):
    return harli_server(
        log_dir / f"{name}.log",
        "--model-path",
        str(model_dir),
        "--harli-state-dir",
        str(state_dir),
        "--harli-checkpoint-every",
        "3",
    )


def kill_9(server) -> None:
    """The whole server (launcher, scheduler, detokenizer) dies at once, as on a crash."""
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.stop()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def servers(tiny_model_dir, state_dir, tmp_path_factory):
    """Two servers over one state directory, started together (tests may replace one)."""
    log_dir = tmp_path_factory.mktemp("logs")
    pair = {name: start(log_dir, name, tiny_model_dir, state_dir) for name in ("first", "second")}
    try:
        for server in pair.values():
            server.wait_ready()
        yield pair
    finally:
        for server in pair.values():
            server.stop()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def upload(servers, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_dataset(path)
    return client_of(servers["first"]).files.create(file=open(path, "rb"), purpose="fine-tune")


def create(server, upload, model_dir, n_epochs: int):
    return client_of(server).fine_tuning.jobs.create(
        model=str(model_dir),
        training_file=upload.id,
        hyperparameters={**HYPER, "n_epochs": n_epochs},
    )


def wait_for(server, job_id, done, timeout_s=300.0):
    client = client_of(server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id}: {job.status}, step {job.step}")


def ended(job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


def events(server, job_id) -> list:
    return list(client_of(server).fine_tuning.jobs.list_events(job_id, limit=100))


def metric_steps(server, job_id) -> list[int]:
    return sorted(e.data["step"] for e in events(server, job_id) if e.type == "metrics")


def trainer_of(server):
    return server.get("/harli/status")["schedulers"][0]["running_job"]


def generate_s(server) -> float:
    started = time.monotonic()
    server.post(
        "/generate",
        {
            "text": "Tell me about the sky.",
            "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True},
        },
        timeout=120,
    )
    return time.monotonic() - started


def test_two_servers_train_each_job_exactly_once(servers, upload, tiny_model_dir):
    first, second = servers["first"], servers["second"]
    jobs = [create(first, upload, tiny_model_dir, n_epochs=15) for _ in range(2)]
    owners = []
    for job in jobs:
        done = wait_for(first, job.id, ended)
        assert done.status == "succeeded", done.error
        assert metric_steps(second, job.id) == list(range(1, 16))  # each step once
        messages = [e.message for e in events(first, job.id)]
        [started] = [m for m in messages if m.startswith("Fine-tuning started")]
        assert not any(m.startswith("Resumed") for m in messages)
        owners.append(started.rsplit("(on ", 1)[1])
    assert owners[0] != owners[1]  # one job each: the idle server took the second


def test_concurrent_creates_with_one_suffix_on_two_servers_accept_exactly_one(
    servers, upload, tiny_model_dir
):
    """Eight creates at once, half on each server, one suffix: one job, seven 409s."""
    targets = [servers["first"], servers["second"]] * 4
    start = threading.Barrier(len(targets))
    body = {
        "model": str(tiny_model_dir),
        "training_file": upload.id,
        "suffix": "twin",
        "hyperparameters": {**HYPER, "n_epochs": 1},
    }

    def post(server) -> requests.Response:
        start.wait()
        return requests.post(server.url + "/v1/fine_tuning/jobs", json=body, timeout=120)

    before = {j.id for j in client_of(servers["first"]).fine_tuning.jobs.list(limit=100)}
    with ThreadPoolExecutor(len(targets)) as pool:
        responses = list(pool.map(post, targets))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * 7, [r.text for r in responses]
    [accepted] = [r.json() for r in responses if r.status_code == 200]
    for refused in (r for r in responses if r.status_code == 409):
        error = refused.json()["error"]
        assert error["param"] == "suffix" and "twin" in error["message"]
    after = {j.id for j in client_of(servers["first"]).fine_tuning.jobs.list(limit=100)}
    assert after - before == {accepted["id"]}  # the refused ones wrote nothing
    done = wait_for(servers["first"], accepted["id"], ended)
    assert done.status == "succeeded", done.error  # and its adapter loads: no duplicate name


def test_a_locked_store_slows_no_request_and_the_job_goes_on(
    servers, upload, tiny_model_dir, state_dir
):
    first, second = servers["first"], servers["second"]
    # long enough to still be training when the lock is taken (100 steps took 10 s on CPU)
    job = create(first, upload, tiny_model_dir, n_epochs=EPOCHS)
    wait_for(first, job.id, lambda j: j.step >= 3)
    server = first if trainer_of(first) == job.id else second
    baseline = max(generate_s(server) for _ in range(3))

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n",
            str(state_dir / "harli.db"),
            str(LOCK_S),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked_at, during, status = time.monotonic(), [], None
        while time.monotonic() - locked_at < LOCK_S - 0.5:
            during.append(generate_s(server))
            if status is None and time.monotonic() - locked_at > LOCK_S / 2:
                # mid-lock (the agent's own wait for the lock, 1 s, is over by now)
                status = server.get("/harli/status")["schedulers"][0]
    finally:
        holder.wait(timeout=LOCK_S + 30)
    assert len(during) >= 2
    assert max(during) < baseline + 2.0, (baseline, during)  # not the 6 s the lock lasted
    assert status["job_paused"] and not status["jobs"]["store_ok"]  # the job waited instead
    assert "locked" in status["jobs"]["store_error"]

    done = wait_for(first, job.id, ended)
    assert done.status == "succeeded", done.error
    assert metric_steps(first, job.id) == list(range(1, EPOCHS + 1))  # none lost, none twice
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_a_restart_beside_a_live_owner_takes_nothing_and_a_crash_resumes_elsewhere(
    servers, upload, tiny_model_dir, state_dir
):
    first = servers["first"]
    long = create(first, upload, tiny_model_dir, n_epochs=5000)
    wait_for(first, long.id, lambda j: j.step >= 1)
    owner_name = "first" if trainer_of(first) == long.id else "second"
    other_name = "second" if owner_name == "first" else "first"
    owner = servers[owner_name]

    # The server that does not train the long job is restarted (killed first): it must leave
    # the job, whose lease its owner keeps renewing, alone.
    kill_9(servers[other_name])
    restarted = servers[other_name] = start(
        owner.log_path.parent, f"{other_name}-again", tiny_model_dir, state_dir
    )
    restarted.wait_ready()
    time.sleep(2)  # a few of its polls for work
    assert trainer_of(owner) == long.id and trainer_of(restarted) is None
    messages = [e.message for e in events(owner, long.id)]
    assert not any("lease" in m or m.startswith("Resumed") for m in messages)

    # A second job goes to the idle, restarted server; it is killed right after a checkpoint,
    # and its newest checkpoint is found torn.
    job = create(owner, upload, tiny_model_dir, n_epochs=60)
    checkpoints = client_of(owner).fine_tuning.jobs.checkpoints
    wait_for(owner, job.id, lambda j: len(list(checkpoints.list(job.id))) >= 2)
    assert trainer_of(restarted) == job.id
    kill_9(restarted)
    newest = list(checkpoints.list(job.id))[0].step_number
    job_dir = state_dir / "jobs" / job.id / "checkpoints"
    (job_dir / f"step-{newest}" / "trainer_state.pt").write_bytes(b"torn by the crash")
    (job_dir / f"step-{newest + 3}.tmp-0badc0de").mkdir()  # a write the crash cut short

    # The owner of the long job gives it up (cancelled) and takes over the orphan once its
    # lease has expired.
    client_of(owner).fine_tuning.jobs.cancel(long.id)
    done = wait_for(owner, job.id, ended, timeout_s=240)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in events(owner, job.id)]
    assert any(f"checkpoint at step {newest} could not be read" in m for m in messages)
    assert any(m.startswith(f"Resumed from the checkpoint at step {newest - 3}") for m in messages)
    assert metric_steps(owner, job.id) == list(range(1, 61))  # the lost steps once each
    assert not list(job_dir.glob("*.tmp-*"))
    assert len(list(checkpoints.list(job.id))) == 3  # --harli-keep-checkpoints' default
