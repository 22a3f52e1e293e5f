"""``POST /harli/mode`` in the HTTP process, before any scheduler: a bad body is a 400 in
OpenAI's error shape and nothing is sent; a good one goes out on SGLang's RPC as numbers and
is answered with what the scheduler reads back. SGLang's TokenizerManager is a stand-in here
(the real one, and the scheduler behind it, are ``test/srt/test_runtime_control.py``'s);
whether our keys survive SGLang's real msgpack transport is checked in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sglang_harli.config import HarliConfig
from sglang_harli.corun.control import to_wire
from sglang_harli.srt import cpu
from sglang_harli.srt.http_api import mount_routes

READ_BACK = {
    "mode": "idle-only",
    "control": {"mode": "idle-only", "switches": 1},
    "corun": {"objective": {"tpot_slo_ms": 50.0, "fits": True}},
}


class FakeManager:
    """What the route asks of SGLang's TokenizerManager."""

    def __init__(self, updated: bool = True):
        self.sent: list[dict] = []
        self.updated = updated
        self.server_args = types.SimpleNamespace(api_key=None, admin_api_key=None)

    async def set_internal_state(self, req) -> list[bool]:
        self.sent.append(dict(req.server_args))
        return [self.updated]

    async def get_internal_state(self) -> list[dict]:
        return [{"harli": READ_BACK}]


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The route on a bare FastAPI app, SGLang's global state replaced by a fake manager."""
    manager = FakeManager()
    http_server = types.ModuleType("sglang.srt.entrypoints.http_server")
    http_server.get_global_state = lambda: types.SimpleNamespace(tokenizer_manager=manager)
    io_struct = types.ModuleType("sglang.srt.managers.io_struct")
    io_struct.SetInternalStateReq = lambda server_args: types.SimpleNamespace(
        server_args=server_args
    )
    monkeypatch.setitem(sys.modules, "sglang.srt.entrypoints.http_server", http_server)
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.io_struct", io_struct)
    monkeypatch.setattr("sglang_harli.srt.http_api._has_cuda", lambda: False)

    def start(mode: str = "harli"):
        app = FastAPI()
        config = HarliConfig(mode=mode, state_dir=str(tmp_path)).resolved(has_cuda=False)
        mount_routes(app, config, limits=None)
        return TestClient(app), manager

    return start


@pytest.mark.parametrize(
    "body, param",
    [
        (b"", None),  # no body
        (b"{not json", None),
        (b"{}", None),
        (b"[]", None),
        (b'{"mode": "turbo"}', "mode"),
        (b'{"mode": "off"}', "mode"),
        (b'{"mode": "Naive"}', "mode"),
        (b'{"tpot_slo_ms": -1}', "tpot_slo_ms"),
        (b'{"tpot_slo_ms": "50"}', "tpot_slo_ms"),
        (b'{"slo_margin": 1.0}', "slo_margin"),
        (b'{"mode": "idle-only", "colour": "blue"}', "colour"),
    ],
)
def test_a_bad_body_is_a_400_in_openais_shape_and_sends_nothing(server, body, param):
    client, manager = server()
    response = client.post("/harli/mode", content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    assert manager.sent == []


def test_a_good_body_goes_out_as_numbers_and_the_answer_is_read_back(server):
    client, manager = server()
    response = client.post("/harli/mode", json={"mode": "idle-only", "tpot_slo_ms": "auto"})
    assert response.status_code == 200, response.text
    assert manager.sent == [to_wire({"mode": "idle-only", "tpot_slo_ms": "auto"})]
    assert response.json() == {
        "object": "harli.control",
        "control": READ_BACK["control"],
        "objective": READ_BACK["corun"]["objective"],
    }


def test_a_scheduler_that_refuses_is_a_500(server):
    client, manager = server()
    manager.updated = False
    response = client.post("/harli/mode", json={"slo_margin": 0.1})
    assert response.status_code == 500
    assert "refused" in response.json()["error"]["message"]


def test_mode_off_has_nothing_to_switch(server):
    client, manager = server("off")
    response = client.post("/harli/mode", json={"mode": "harli"})
    assert response.status_code == 409
    assert "--harli-mode off" in response.json()["error"]["message"]
    assert manager.sent == []


def test_the_route_is_marked_as_a_write_for_sglangs_key_middleware(server):
    from sglang.srt.utils.auth import AuthLevel

    client, _ = server()
    [route] = [r for r in client.app.routes if getattr(r, "path", "") == "/harli/mode"]
    assert route.endpoint._auth_level == AuthLevel.ADMIN_OPTIONAL


TRANSPORT_PROBE = """
import json, sys
from sglang.srt.managers.io_struct import SetInternalStateReq, msgpack_decode, msgpack_encode
wire = json.loads(sys.argv[1])
print(json.dumps(msgpack_decode(msgpack_encode(SetInternalStateReq(server_args=wire))).server_args))
try:
    msgpack_decode(msgpack_encode(SetInternalStateReq(server_args={"harli": {"mode": "harli"}})))
    print("nested survived")
except Exception as exc:
    print("nested refused:", type(exc).__name__)
"""


def test_our_keys_survive_sglangs_msgpack_transport_and_a_nested_value_would_not():
    """Why the settings are spelled as flat numeric keys: SGLang's IPC decodes
    SetInternalStateReq.server_args as Dict[str, int | float]."""
    wire = to_wire({"mode": "time-sliced", "tpot_slo_ms": "auto", "slo_margin": 0.25})
    done = subprocess.run(
        [sys.executable, "-c", TRANSPORT_PROBE, json.dumps(wire)],
        env=cpu.child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    arrived, nested = done.stdout.strip().splitlines()[-2:]
    assert json.loads(arrived) == wire
    assert nested == "nested refused: ValidationError"
