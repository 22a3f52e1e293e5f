"""Fine-tuning jobs on a real server (CPU, tiny model), through the official ``openai`` client.

One server trains a few fixed prompt -> answer pairs, serves the adapter, keeps serving while a
long job trains, cancels it, refuses bad input, drives the CLI, and is finally restarted over
the same state directory to show that a running job resumes and earlier adapters come back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from test.support.finetuning import LEARN, PAIRS, answer, wait_for, write_dataset
from test.support.server_process import REPO, harli_server
from test.support.serving import openai_client

pytestmark = pytest.mark.server


def ft_server(log_path, model_dir, state_dir):
    """Our server over ``state_dir``, checkpointing every 3 steps (both runs use the same)."""
    return harli_server(
        log_path,
        "--model-path",
        str(model_dir),
        "--harli-state-dir",
        str(state_dir),
        "--harli-checkpoint-every",
        "3",
    )


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(tiny_model_dir, state_dir, tmp_path_factory):
    server = ft_server(tmp_path_factory.mktemp("ft") / "server.log", tiny_model_dir, state_dir)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def trained(client, dataset, tiny_model_dir):
    """The 'demo' job, trained to the end."""
    upload = client.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        suffix="demo",
        seed=1,
        hyperparameters=LEARN,
    )
    assert job.status == "queued"
    return wait_for(client, job.id)


def test_trained_adapter_answers_with_the_trained_answers(client, trained, tiny_model_dir):
    assert trained.status == "succeeded", trained.error
    assert trained.fine_tuned_model == f"{tiny_model_dir}:demo"
    assert trained.trained_tokens > 0
    for question, expected in PAIRS:
        assert answer(client, trained.fine_tuned_model, question).startswith(expected[:-1])
        assert not answer(client, str(tiny_model_dir), question).startswith(expected[:8])
    served = {m.id: m for m in client.models.list().data}
    # listed under the id a client uses (<base>:<adapter>), with its base as parent
    assert served[trained.fine_tuned_model].parent == str(tiny_model_dir)


def test_progress_events_and_checkpoints(client, trained):
    events = list(client.fine_tuning.jobs.list_events(trained.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == LEARN["n_epochs"]
    losses = [e.data["train_loss"] for e in sorted(metrics, key=lambda e: e.data["step"])]
    # the tiny random model's small lm_head bounds its logits: loss halves, answers match
    assert losses[-1] < 0.6 * losses[0]
    assert {"tokens_per_second", "eta_seconds"} <= set(metrics[0].data)
    assert events[0].message.startswith("The job has successfully completed")
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(trained.id))
    # every 3 steps, pruned to the newest --harli-keep-checkpoints (default 3)
    assert [c.step_number for c in checkpoints] == [30, 27, 24]


def generate(server, prompt: str) -> dict:
    out = server.post(
        "/generate",
        {
            "text": prompt,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
        },
    )
    return {"ids": out["output_ids"], "retractions": out["meta_info"]["num_retractions"]}


def test_requests_during_training_match_an_idle_server(client, server, dataset, tiny_model_dir):
    questions = [q for q, _ in PAIRS] * 2
    idle_chat = [answer(client, str(tiny_model_dir), q) for q in questions]
    idle_generate = [generate(server, q) for q in questions]
    upload = client.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        hyperparameters={**LEARN, "n_epochs": 2000},
    )
    wait_for(client, job.id, states=("running",))
    while client.fine_tuning.jobs.retrieve(job.id).step < 1:
        time.sleep(0.2)

    busy_chat: list = [None] * len(questions)
    busy_generate: list = [None] * len(questions)

    def ask(i):
        busy_chat[i] = answer(client, str(tiny_model_dir), questions[i])
        busy_generate[i] = generate(server, questions[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert busy_chat == idle_chat
    assert busy_generate == idle_generate  # same tokens, and none was retracted
    assert all(g["retractions"] == 0 for g in busy_generate)
    status = server.get("/harli/status")["schedulers"][0]
    assert status["running_job"] == job.id
    assert status["finetune"]["finetune_slice"]["calls"] > 0  # it trained between decode steps

    # cancel: the job stops promptly. The scheduler sees the flag within the agent's tick (50 ms)
    # plus one slice, and the step the store reports trails the trainer by the rows still
    # queued, so a tiny-model job (a step takes a few ms) may record a few more steps, not more.
    step_before = client.fine_tuning.jobs.retrieve(job.id).step
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait_for(client, job.id, timeout_s=10)
    assert final.status == "cancelled"
    assert final.step <= step_before + 5
    time.sleep(1.5)
    assert client.fine_tuning.jobs.retrieve(job.id).step == final.step
    assert server.get("/harli/status")["schedulers"][0]["running_job"] is None


BAD_JOBS = [
    ({"model": "no-such-model"}, "model"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"hyperparameters": {"lora_rank": 0}}, "hyperparameters.lora_rank"),
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"lora_rank": 64}}, "hyperparameters.lora_rank"),  # > --max-lora-rank
    ({"hyperparameters": {"lora_target_modules": ["lm_head"]}}, None),
    ({"suffix": "has spaces"}, "suffix"),
]


@pytest.mark.parametrize("override, param", BAD_JOBS)
def test_bad_jobs_are_refused_and_change_nothing(client, server, dataset, override, param):
    upload = client.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    body = {"model": server.get("/v1/models")["data"][0]["id"], "training_file": upload.id}
    before = server.get("/v1/fine_tuning/jobs?limit=100")["data"]
    response = requests.post(server.url + "/v1/fine_tuning/jobs", json={**body, **override})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
    assert server.get("/v1/fine_tuning/jobs?limit=100")["data"] == before


def test_file_of_another_purpose_cannot_train(client, server, dataset):
    other = client.files.create(file=open(dataset, "rb"), purpose="batch")
    model = server.get("/v1/models")["data"][0]["id"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=model, training_file=other.id)
    assert "not 'fine-tune'" in refused.value.body["message"]


def test_malformed_dataset_is_refused_with_its_line(client, server, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text(f"{good}\n{{not json\n{good}\n{json.dumps({'messages': []})}\n")
    files_before = server.get("/v1/files")["data"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=open(path, "rb"), purpose="fine-tune")
    message = refused.value.body["message"]
    assert "line 2: not JSON" in message and "line 4" in message
    assert server.get("/v1/files")["data"] == files_before
    assert answer(client, server.get("/v1/models")["data"][0]["id"], "still serving?")


def run_cli(server, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_harli.finetune", "--server", server.url, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_create_wait_shows_progress_and_exits_0(server, client, tmp_path):
    data = write_dataset(tmp_path / "cli.jsonl", PAIRS[:2])
    result = run_cli(
        server, "create", data, "--wait", "--suffix", "cli", "--n-epochs", "6",
        "--batch-size", "2", "--learning-rate-multiplier", "20", "--poll", "0.2",
        "--validation-file", data,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "loss " in result.stdout and "step 6/6" in result.stdout
    assert ':cli"' in result.stdout.splitlines()[-1]
    job_id = result.stdout.split()[1]
    [final] = [c for c in client.fine_tuning.jobs.checkpoints.list(job_id) if c.step_number == 6]
    assert 0 < final.metrics.valid_loss < 20  # the validation file is evaluated
    listing = run_cli(server, "list")
    assert listing.returncode == 0 and "succeeded" in listing.stdout


def test_cli_exit_codes_on_failure(server, tmp_path):
    data = write_dataset(tmp_path / "cli.jsonl", PAIRS[:1])
    refused = run_cli(server, "create", data, "--lora-rank", "0")
    assert refused.returncode == 2 and "lora_rank" in refused.stderr
    assert run_cli(server, "get", "ftjob-nope").returncode == 2

    started = run_cli(server, "create", data, "--n-epochs", "5000")
    job_id = started.stdout.split()[1]
    waiter = subprocess.Popen(
        [sys.executable, "-m", "sglang_harli.finetune", "--server", server.url, "events", job_id,
         "--follow", "--poll", "0.2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2)
    assert run_cli(server, "cancel", job_id).returncode == 0
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 1  # the followed job ended cancelled
    assert "Job cancelled" in out


def test_restart_resumes_running_job_and_serves_earlier_adapters(
    server, client, trained, dataset, state_dir, tiny_model_dir, tmp_path
):
    upload = client.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        suffix="resumed",
        seed=2,
        hyperparameters={**LEARN, "n_epochs": 14},
    )
    while not list(client.fine_tuning.jobs.checkpoints.list(job.id)):
        time.sleep(0.2)
    server.stop()  # mid-training: the last checkpoint is at step 3 or later

    again = ft_server(tmp_path / "server2.log", tiny_model_dir, state_dir)
    try:
        again.wait_ready()
        client2 = openai.OpenAI(base_url=again.url + "/v1", api_key="unused", max_retries=0)
        done = wait_for(client2, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client2.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(m.startswith("Resumed from the checkpoint at step") for m in messages)
        metrics = [e for e in client2.fine_tuning.jobs.list_events(job.id, limit=100)]
        steps = sorted(e.data["step"] for e in metrics if e.type == "metrics")
        assert steps[-1] == 14
        question, expected = PAIRS[0]
        assert answer(client2, trained.fine_tuned_model, question).startswith(expected[:-1])
        served = {m.id for m in client2.models.list().data}
        assert {f"{tiny_model_dir}:{n}" for n in ("demo", "resumed", "cli")} <= served
    finally:
        again.stop()
