"""The fine-tuning API under hostile or careless clients, on one real server (CPU, tiny model).

The server runs with ``--api-key``, ``--admin-api-key``, a 1 MB upload cap, at most 4 uploads in
flight and a 2 s upload timeout. Writes need the admin key and reads the api key (SGLang's own
rules); uploads stop at the cap, beyond the in-flight cap (503) and when their body stalls (408);
dataset work runs off SGLang's event loop and one dataset does not hold up another; every
malformed request is a 4xx in OpenAI's error shape that writes nothing; a file that an
unfinished job needs cannot be deleted.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from test.support.finetuning import chat_jsonl, wait_for
from test.support.server_process import REPO, harli_server

pytestmark = pytest.mark.server

API_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"
CAP = 2**20  # --harli-max-upload-mb 1
IN_FLIGHT = 4  # --harli-max-uploads-in-flight
UPLOAD_TIMEOUT_S = 2.0  # --harli-upload-timeout-s
PAIRS = [("What color is the sky?", "Blue."), ("Name a fruit.", "A mango.")]


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


USER, ADMIN = auth(API_KEY), auth(ADMIN_KEY)


def jsonl(pairs=PAIRS) -> bytes:
    return chat_jsonl(pairs).encode()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(tiny_model_dir, state_dir, tmp_path_factory):
    server = harli_server(
        tmp_path_factory.mktemp("hardening") / "server.log",
        "--model-path", str(tiny_model_dir),
        "--harli-state-dir", str(state_dir),
        "--api-key", API_KEY,
        "--admin-api-key", ADMIN_KEY,
        "--harli-max-upload-mb", "1",
        "--harli-max-uploads-in-flight", str(IN_FLIGHT),
        "--harli-upload-timeout-s", str(UPLOAD_TIMEOUT_S),
    )  # fmt: skip
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def admin(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture(scope="module")
def user(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def call(server, method: str, path: str, headers=None, **kwargs) -> requests.Response:
    return requests.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def upload(server, content: bytes, purpose="fine-tune", headers=ADMIN, name="train.jsonl"):
    return call(
        server,
        "POST",
        "/v1/files",
        headers,
        files={"file": (name, content)},
        data={"purpose": purpose},
    )


def openai_error(response: requests.Response, status: int) -> dict:
    """The response is ``status`` with OpenAI's error body; its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def snapshot(server, state_dir) -> tuple:
    """What a refused request must leave as it was: jobs, files, and the state dir's files."""
    jobs = call(server, "GET", "/v1/fine_tuning/jobs?limit=100", USER).json()["data"]
    files = call(server, "GET", "/v1/files?limit=100", USER).json()["data"]
    on_disk = sorted(str(p.relative_to(state_dir)) for p in state_dir.glob("[fj]*/**/*"))
    return jobs, files, on_disk


@pytest.fixture(scope="module")
def small_file(server) -> str:
    response = upload(server, jsonl())
    assert response.status_code == 200, response.text
    return response.json()["id"]


# --- 1. authentication ---------------------------------------------------------------------


def test_writes_need_the_admin_key(server, state_dir, small_file, model, admin, user):
    before = snapshot(server, state_dir)
    job_body = {"model": model, "training_file": small_file, "hyperparameters": {"n_epochs": 1}}
    writes = [
        (
            "POST",
            "/v1/files",
            {"files": {"file": ("a.jsonl", jsonl())}, "data": {"purpose": "batch"}},
        ),
        ("GET", f"/v1/files/{small_file}/content", {}),
        ("DELETE", f"/v1/files/{small_file}", {}),
        ("POST", "/v1/fine_tuning/jobs", {"json": job_body}),
        ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}),
    ]
    for method, path, kwargs in writes:
        for headers in ({}, auth("wrong"), USER, {"Authorization": ADMIN_KEY}):
            response = call(server, method, path, headers, **kwargs)
            assert response.status_code == 401, (method, path, headers, response.text)
    assert snapshot(server, state_dir) == before

    # the official client with the admin key: upload, read back, train, cancel
    content = admin.files.content(small_file).read()
    assert content == jsonl()
    job = admin.fine_tuning.jobs.create(**job_body)
    cancelled = admin.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelled", "cancelling")
    with pytest.raises(openai.AuthenticationError):
        user.fine_tuning.jobs.create(**job_body)


def test_reads_follow_sglang_ordinary_routes(server, small_file, user):
    job_id = user.fine_tuning.jobs.list().data[0].id
    reads = [
        "/v1/models",  # SGLang's own ordinary route, for comparison
        "/v1/files",
        f"/v1/files/{small_file}",
        "/v1/fine_tuning/jobs",
        f"/v1/fine_tuning/jobs/{job_id}",
        f"/v1/fine_tuning/jobs/{job_id}/events",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
    ]
    for path in reads:
        # with both keys, ordinary routes take the api key only (as SGLang's /v1/models does)
        observed = {
            name: call(server, "GET", path, headers).status_code
            for name, headers in (("none", {}), ("api", USER), ("admin", ADMIN))
        }
        assert observed == {"none": 401, "api": 200, "admin": 401}, (path, observed)
    assert user.files.retrieve(small_file).purpose == "fine-tune"


# --- 2. uploads: a cap, streamed, nothing left behind ---------------------------------------


def leftovers(state_dir) -> list:
    return [p.name for p in (state_dir / "files").iterdir() if ".tmp-" in p.name]


def test_a_declared_size_past_the_cap_is_refused_before_the_body(server, state_dir):
    before = snapshot(server, state_dir)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Authorization", f"Bearer {ADMIN_KEY}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Content-Length", str(50 * CAP))
    conn.endheaders()  # and no body: the answer comes without it
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413
    assert body["error"]["code"] == "file_too_large" and "1 MB" in body["error"]["message"]
    assert snapshot(server, state_dir) == before and not leftovers(state_dir)


def test_a_streamed_upload_stops_at_the_cap(server, state_dir):
    before = snapshot(server, state_dir)
    boundary = "harli-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
    ).encode()

    def body():  # chunked: no Content-Length to refuse it early
        yield head
        for _ in range(24):
            yield b"x" * 65536  # 1.5 MB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    response = call(
        server,
        "POST",
        "/v1/files",
        {**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        data=body(),
    )
    assert openai_error(response, 413)["code"] == "file_too_large"
    assert snapshot(server, state_dir) == before and not leftovers(state_dir)


def test_the_official_client_gets_413_and_a_file_under_the_cap_is_stored(server, admin, user):
    with pytest.raises(openai.APIStatusError) as refused:
        admin.files.create(file=("big.bin", b"y" * (CAP + 1)), purpose="batch")
    assert refused.value.status_code == 413
    stored = admin.files.create(file=("fits.bin", b"z" * (CAP - 1000)), purpose="batch")
    assert stored.bytes == CAP - 1000
    assert admin.files.content(stored.id).read() == b"z" * (CAP - 1000)


# --- 3. nothing heavy on SGLang's event loop ------------------------------------------------


def heavy_dataset() -> bytes:
    """Just under the cap, and slow to check: long conversations, each turn rendered twice."""
    messages = []
    for t in range(16):
        messages += [
            {"role": "user", "content": f"question {t}"},
            {"role": "assistant", "content": f"answer {t}"},
        ]
    line = json.dumps({"messages": messages}).encode() + b"\n"
    return line * ((CAP - 4096) // len(line))


def worst_latency(server, work) -> tuple[float, int, float, object]:
    """Run ``work`` in a thread while polling ``GET /v1/models`` (answered by the HTTP process
    itself; /health waits for the scheduler, which --sleep-on-idle lets sleep up to a second):
    the slowest answer, the number of polls, the work's time and its result."""
    done = threading.Event()
    result = {}

    def run():
        started = time.monotonic()
        try:
            result["value"] = work()
        finally:
            result["seconds"] = time.monotonic() - started
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    worst, polls = 0.0, 0
    while not done.is_set():
        started = time.monotonic()
        assert requests.get(server.url + "/v1/models", headers=USER, timeout=60).ok
        worst, polls = max(worst, time.monotonic() - started), polls + 1
        time.sleep(0.05)
    thread.join()
    return worst, polls, result["seconds"], result["value"]


def test_the_event_loop_answers_while_datasets_are_checked(server, state_dir, model, admin, user):
    content = heavy_dataset()
    worst, polls, seconds, response = worst_latency(
        server, lambda: upload(server, content, name="heavy.jsonl")
    )
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    print(f"upload: {seconds:.2f}s, {polls} polls of /v1/models, slowest {worst * 1000:.0f} ms")
    assert worst < 0.5 and polls >= 3

    # the upload kept its tokens for job creation; without them (a file an older version
    # stored) the job's creation tokenizes the file again, which must not hold the loop either
    cache = state_dir / "files" / f"{file_id}.tokens.npz"
    assert cache.is_file()
    cache.unlink()
    body = {
        "model": model,
        "training_file": file_id,
        "validation_file": file_id,
        "hyperparameters": {"n_epochs": 1},
    }
    worst, polls, seconds, response = worst_latency(
        server, lambda: call(server, "POST", "/v1/fine_tuning/jobs", ADMIN, json=body)
    )
    assert response.status_code == 200, response.text
    job = response.json()
    admin.fine_tuning.jobs.cancel(job["id"])
    print(f"create: {seconds:.2f}s, {polls} polls of /v1/models, slowest {worst * 1000:.0f} ms")
    assert worst < 0.5 and polls >= 3
    # the tokenized datasets were written before the job was queued
    assert job["status"] in ("queued", "running")
    for split in ("train", "validation"):
        assert (state_dir / "jobs" / job["id"] / f"{split}.npz").is_file()
    events = [e.message for e in user.fine_tuning.jobs.list_events(job["id"], limit=100)]
    assert any(m.startswith("Files validated") for m in events)


def test_a_small_upload_is_not_held_up_by_a_big_one(server):
    # one dataset used to be checked at a time, behind one tokenizer lock: a small upload
    # waited for a big one to finish (32 s behind a 300 KB line); each now has its own copy
    big, small = heavy_dataset(), jsonl()
    timings = {}

    def timed(name, content):
        started = time.monotonic()
        response = upload(server, content, name=f"{name}.jsonl")
        timings[name] = (time.monotonic() - started, time.monotonic(), response)

    thread = threading.Thread(target=timed, args=("big", big))
    thread.start()
    time.sleep(0.3)  # the big one is being checked
    timed("small", small)
    thread.join()
    big_s, big_done, big_response = timings["big"]
    small_s, small_done, small_response = timings["small"]
    assert big_response.status_code == 200 and small_response.status_code == 200
    print(f"big upload {big_s:.2f} s, small upload beside it {small_s:.2f} s")
    assert small_done < big_done, "the big upload finished first: no overlap measured"
    assert small_s < 0.5 * big_s


def slow_upload(server, purpose="batch") -> socket.socket:
    """An upload whose body starts and then stalls: headers and a first piece only."""
    boundary = "slow-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.bin"\r\n\r\n'
        "some bytes"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        (
            "POST /v1/files HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + 1000}\r\n\r\n"
        ).encode()
        + head
    )
    return sock


def status_of(sock: socket.socket) -> int:
    """The status line's code of the response the server sends on ``sock``."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_uploads_past_the_in_flight_cap_get_503_and_stalled_ones_408(server, state_dir):
    before = snapshot(server, state_dir)
    slow = [slow_upload(server) for _ in range(IN_FLIGHT)]
    try:
        time.sleep(0.5)  # all of them are being received
        started = time.monotonic()
        refused = upload(server, b"one too many", purpose="batch")
        error = openai_error(refused, 503)
        assert int(refused.headers["Retry-After"]) > 0 and error["code"] == "server_busy"
        assert "--harli-max-uploads-in-flight" in error["message"]
        # each stalled body is cut off after the timeout, its temporary file removed
        assert [status_of(s) for s in slow] == [408] * IN_FLIGHT
        waited = time.monotonic() - started
        assert UPLOAD_TIMEOUT_S / 4 < waited < UPLOAD_TIMEOUT_S + 10, waited
    finally:
        for s in slow:
            s.close()
    assert snapshot(server, state_dir) == before and not leftovers(state_dir)
    assert upload(server, b"fits now", purpose="batch").status_code == 200


# --- 4, 6. files -----------------------------------------------------------------------------


def test_file_content_is_served_as_stored_bytes(server, admin):
    raw = b"\xff\xfe\x00binary, not UTF-8\n\x80"
    stored = admin.files.create(file=("blob.bin", raw), purpose="batch")
    response = call(server, "GET", f"/v1/files/{stored.id}/content", ADMIN)
    assert response.status_code == 200 and response.content == raw


def test_a_non_utf8_fine_tune_file_is_refused_by_line(server, state_dir):
    before = snapshot(server, state_dir)
    error = openai_error(upload(server, jsonl() + b"\xc3\x28 broken\n"), 400)
    assert "line 3" in error["message"] and "not UTF-8" in error["message"]
    assert snapshot(server, state_dir) == before and not leftovers(state_dir)


def test_json_lines_may_hold_u2028_and_u2029(admin):
    record = {"prompt": "one\u2028two\u2029three", "completion": "four"}
    content = (json.dumps(record, ensure_ascii=False) + "\r\n").encode() * 2
    assert admin.files.create(file=("seps.jsonl", content), purpose="fine-tune").bytes == len(
        content
    )


def test_files_are_listed_in_pages(server, admin, user):
    ids = [admin.files.create(file=(f"{i}.txt", b"x"), purpose="batch").id for i in range(3)]
    first = call(server, "GET", "/v1/files?limit=2&purpose=batch", USER).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = call(server, "GET", f"/v1/files?limit=2&purpose=batch&after={ids[1]}", USER).json()
    assert second["data"][0]["id"] == ids[0]
    every = [f.id for f in user.files.list(limit=2)]  # the client follows the pages
    assert every[:3] == ids[::-1] and len(every) == len(set(every)) > 3


def test_running_job_cancel_says_cancelling_and_guards_its_file(server, model, admin, user):
    upload_id = admin.files.create(file=("long.jsonl", jsonl()), purpose="fine-tune").id
    job = admin.fine_tuning.jobs.create(
        model=model, training_file=upload_id, hyperparameters={"n_epochs": 5000}
    )
    wait_for(user, job.id, ("running",))
    refused = call(server, "DELETE", f"/v1/files/{upload_id}", ADMIN)
    error = openai_error(refused, 409)
    assert error["code"] == "file_in_use" and job.id in error["message"]
    assert admin.files.content(upload_id).read() == jsonl()  # nothing changed

    cancelling = admin.fine_tuning.jobs.cancel(job.id)  # the official client parses it
    assert cancelling.status in ("cancelling", "cancelled")
    assert wait_for(user, job.id, ("cancelled",), timeout_s=60).status == "cancelled"
    assert admin.files.delete(upload_id).deleted  # the job is over: the file may go


# --- 5. malformed requests: a 4xx in OpenAI's shape, nothing written ------------------------

BAD_JOBS = [
    ({"seed": 2**31}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"method": "supervised"}, "method"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": "x"}}, "method.supervised"),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": [1]}}},
        "method.supervised.hyperparameters",
    ),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
        "method.supervised.hyperparameters.n_epochs",
    ),
    ({"suffix": "fine\n"}, "suffix"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"hyperparameters": {"n_epochs": 10**6}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 10**6}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 10**400}}, None),
    ({"hyperparameters": {"max_seq_length": 4}}, "training_file"),  # every example is longer
    ({"training_file": ["file-x"]}, "training_file"),
    ({"validation_file": 3}, "validation_file"),
]


@pytest.mark.parametrize("override, param", BAD_JOBS)
def test_malformed_jobs_are_refused_and_write_nothing(
    server, state_dir, small_file, model, override, param
):
    body = {"model": model, "training_file": small_file, **override}
    before = snapshot(server, state_dir)
    error = openai_error(call(server, "POST", "/v1/fine_tuning/jobs", ADMIN, json=body), 400)
    if param:
        assert error["param"] == param, error
    assert str(state_dir) not in error["message"]
    assert snapshot(server, state_dir) == before


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'{"model": '])
def test_bodies_that_are_not_a_json_object_are_400(server, state_dir, raw):
    before = snapshot(server, state_dir)
    response = call(
        server,
        "POST",
        "/v1/fine_tuning/jobs",
        {**ADMIN, "Content-Type": "application/json"},
        data=raw,
    )
    openai_error(response, 400)
    assert snapshot(server, state_dir) == before


@pytest.mark.parametrize("limit", ["abc", "0", "1000", "-1", "2.5", ""])
def test_bad_page_sizes_are_400_on_every_list(server, small_file, user, limit):
    job_id = user.fine_tuning.jobs.list().data[0].id
    for path in (
        "/v1/files",
        "/v1/fine_tuning/jobs",
        f"/v1/fine_tuning/jobs/{job_id}/events",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
    ):
        error = openai_error(call(server, "GET", f"{path}?limit={limit}", USER), 400)
        assert error["param"] == "limit", (path, error)


def test_the_server_still_serves(server, model):
    reply = call(
        server,
        "POST",
        "/v1/chat/completions",
        USER,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert reply.status_code == 200, reply.text


def run_cli(server, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_harli.finetune", "--server", server.url, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_cli_sends_each_key_where_sglang_wants_it(server, tmp_path):
    data = tmp_path / "cli.jsonl"
    data.write_bytes(jsonl())
    refused = run_cli(server, "--api-key", API_KEY, "create", str(data))
    assert refused.returncode == 2 and "401" in refused.stderr
    keys = ("--api-key", API_KEY, "--admin-api-key", ADMIN_KEY)
    created = run_cli(server, *keys, "create", str(data), "--n-epochs", "5000")
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.split()[1]
    cancelled = run_cli(server, *keys, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    followed = run_cli(server, *keys, "events", job_id, "--follow", "--poll", "0.2")
    assert followed.returncode == 1 and "Created fine-tuning job" in followed.stdout


# --- without a server ------------------------------------------------------------------------


def test_job_errors_and_events_show_no_server_paths(tmp_path):
    from sglang_harli.jobs.hyperparameters import ServingLimits
    from sglang_harli.jobs.lifecycle import JobStatus
    from sglang_harli.jobs.store import JobStore
    from sglang_harli.srt.http_api import FineTuningApi

    store = JobStore(tmp_path)
    api = FineTuningApi(store, ServingLimits(max_lora_rank=8), max_upload_bytes=CAP)
    upload_id = store.add_file("t.jsonl", "fine-tune", jsonl()).id
    job = store.create_job("m", upload_id, {}, seed=0, status=JobStatus.QUEUED)
    where = f"{tmp_path}/jobs/{job.id}/train.npz"
    store.set_status(job.id, JobStatus.FAILED, error={"code": "x", "message": f"no {where}"})
    store.add_event(job.id, f"Job failed: no {where}", level="error")
    assert api.job_json(store.get_job(job.id))["error"]["message"] == (
        f"no jobs/{job.id}/train.npz"
    )
    event = api.event_json(store.list_events(job.id)[0][0])
    assert event["message"] == f"Job failed: no jobs/{job.id}/train.npz"


def test_a_running_job_with_a_cancel_requested_is_cancelling(tmp_path):
    from sglang_harli.jobs.lifecycle import JobStatus
    from sglang_harli.jobs.store import JobStore
    from sglang_harli.srt.openai_shapes import job_json

    store = JobStore(tmp_path)
    upload_id = store.add_file("t.jsonl", "fine-tune", jsonl()).id
    job = store.create_job("m", upload_id, {}, seed=0, status=JobStatus.QUEUED)
    store.claim_next()
    assert job_json(store.request_cancel(job.id))["status"] == "cancelling"
    store.set_status(job.id, JobStatus.CANCELLED)
    assert job_json(store.get_job(job.id))["status"] == "cancelled"


# --- start-up --------------------------------------------------------------------------------


def test_several_tokenizer_workers_are_refused(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "sglang_harli.launch_server", "--model-path", str(tiny_model_dir),
         "--tokenizer-worker-num", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--tokenizer-worker-num" in result.stderr and "--harli-mode off" in result.stderr
