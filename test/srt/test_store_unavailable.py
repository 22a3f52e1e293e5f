"""A server whose job store cannot be opened still serves (CPU, tiny model, one server).

The state dir's ``harli.db`` is garbage bytes before the server starts. What an operator sees:
chat completions answer; every fine-tuning route answers 503 naming the reason; ``/harli/status``
says the store is unavailable, in the main process and in the scheduler, which logs it once.
The same server (``--admin-api-key`` only: ordinary routes are open, writes need the key) shows
the rest of what a client may and may not learn or do: status shows the scheduler's host and pid
and the K/V buffers' memory addresses only to the admin key; a suffix that names the base model
is refused; a malformed event cursor is a 400.
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from test.support.server_process import harli_server

pytestmark = pytest.mark.server

ADMIN_KEY = "admin-key-789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("state")
    (state_dir / "harli.db").write_bytes(b"\x00garbage, not SQLite\xff" * 512)
    server = harli_server(
        tmp_path_factory.mktemp("logs") / "server.log",
        "--model-path", str(tiny_model_dir),
        "--harli-state-dir", str(state_dir),
        "--admin-api-key", ADMIN_KEY,
    )  # fmt: skip
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def call(server, method: str, path: str, headers=None, **kwargs) -> requests.Response:
    return requests.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def status(server, headers=None) -> dict:
    response = call(server, "GET", "/harli/status", headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_inference_is_served_without_the_job_store(server, tiny_model_dir):
    response = call(
        server,
        "POST",
        "/v1/chat/completions",
        json={
            "model": str(tiny_model_dir),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        (
            "POST",
            "/v1/files",
            {"files": {"file": ("t.jsonl", b"{}\n")}, "data": {"purpose": "batch"}},
        ),
        ("GET", "/v1/files", {}),
        ("GET", "/v1/fine_tuning/jobs", {}),
        ("GET", "/v1/fine_tuning/jobs/ftjob-x/events", {}),
    ],
)
def test_fine_tuning_routes_answer_503_with_the_reason(server, method, path, kwargs):
    response = call(server, method, path, ADMIN, **kwargs)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert "job store" in error["message"] and "not a database" in error["message"]
    assert error["code"] == "store_unavailable"


def test_status_says_the_store_is_unavailable_and_the_scheduler_logs_it_once(server):
    shown = status(server)
    assert shown["job_store"]["available"] is False
    assert "not a database" in shown["job_store"]["error"]
    deadline = time.monotonic() + 30
    while shown["schedulers"][0]["jobs"]["store_ok"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the scheduler's agent tries the store on its own thread
        shown = status(server)
    [scheduler] = shown["schedulers"]
    assert scheduler["jobs"]["store_ok"] is False
    assert "not a database" in scheduler["jobs"]["store_error"]
    assert shown["decode_iterations"] >= 1  # it decoded the chat of the test above
    time.sleep(3)  # a few of the agent's retries
    log = server.log_path.read_text()
    assert log.count("job store unavailable") == 1, log[-3000:]
    assert "Traceback" not in log


def test_status_shows_host_pid_and_addresses_only_to_the_admin_key(server):
    anonymous = call(server, "GET", "/harli/status")
    admin = call(server, "GET", "/harli/status", ADMIN)
    assert anonymous.status_code == admin.status_code == 200
    for response in (anonymous, admin):
        assert not re.search(r"0x[0-9a-fA-F]{6,}", response.text), response.text
    [seen] = anonymous.json()["schedulers"]
    assert "owner" not in seen["jobs"]
    assert "kv_buffers" not in seen["memory"] and "arena_blocks" not in seen["memory"]
    assert seen["memory"]["kv_pool_slots"] > 0  # the rest is shown
    [full] = admin.json()["schedulers"]
    assert " pid " in full["jobs"]["owner"]
    assert len(full["memory"]["kv_buffers"]) == 4  # K and V of the tiny model's 2 layers


@pytest.mark.parametrize("suffix", ["default", "Default", "gpt-4", "gpt-4o-mini", "o1", "tiny"])
def test_a_suffix_that_names_the_base_model_is_refused(server, tiny_model_dir, suffix):
    if suffix == "tiny":  # the model directory's own name
        suffix = tiny_model_dir.name
    body = {"model": str(tiny_model_dir), "training_file": "file-x", "suffix": suffix}
    response = call(server, "POST", "/v1/fine_tuning/jobs", ADMIN, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "suffix" and error["code"] == "suffix_reserved"
    assert "base model" in error["message"]


@pytest.mark.parametrize("after", ["ftevent-\u00b2", "ftevent-\u0661", "x" * 300, "a b"])
def test_a_malformed_page_cursor_is_a_400(server, after):
    response = call(server, "GET", "/v1/fine_tuning/jobs/ftjob-x/events", params={"after": after})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "after"
