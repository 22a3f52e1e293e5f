"""Runtime control on a real server (CPU, tiny model): ``POST /harli/mode`` and the objective's
diagnosis, as a user sees them through the API, ``/harli/status``, ``/metrics`` and the log.

One server for the module, with an admin key (the route is a write) and metrics on:

- a bad body is a 4xx in OpenAI's error shape and the settings stay as they were;
- a switch of mode, objective and margin shows in the status, in ``/metrics`` and in the answer;
- a job keeps training across three switches while requests decode, and succeeds;
- a tiny objective is said not to fit, with the reason, once in the log; ``auto`` fits;
- the profile tool's share sweep switches the server through every share and back, and writes
  stage 2's interference table and finetune's rate at each share.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests

from sglang_harli import profile
from sglang_harli.bench.workload import SHORT_CHATS
from sglang_harli.client import ApiError, HarliClient
from sglang_harli.corun.predictor import MIN_SAMPLES, Predictor
from test.support.server_process import harli_server
from test.support.serving import generate, wait_until

pytestmark = pytest.mark.server

ADMIN_KEY = "control-admin-key"
EPOCHS = 100  # of 8 short chats in batches of 4: 200 steps
SETTINGS = ("mode", "tpot_slo_ms", "slo_margin", "static_share", "finetune_budget_ms")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("control")
    started = harli_server(
        workdir / "server.log",
        "--model-path",
        str(tiny_model_dir),
        "--harli-state-dir",
        str(workdir / "state"),
        "--admin-api-key",
        ADMIN_KEY,
        "--enable-metrics",
    )
    try:
        yield started.wait_ready()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def admin(server) -> HarliClient:
    return HarliClient(server.url, admin_api_key=ADMIN_KEY)


def settings(client: HarliClient) -> dict:
    control = client.control()
    return {name: control[name] for name in (*SETTINGS, "switches")}


def metrics(server) -> dict[str, float]:
    """Our series on /metrics: name (with the mode label, if any) -> value."""
    values = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sglang:harli_") and "_bucket" not in line:
            name = line.split("{")[0]
            if 'harli_mode="' in line:
                name += "/" + line.split('harli_mode="')[1].split('"')[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({}, 400, None),
        ({"mode": "turbo"}, 400, "mode"),
        ({"mode": "off"}, 400, "mode"),
        ({"mode": "Harli"}, 400, "mode"),  # modes are lower case
        ({"slo_margin": 1.5}, 400, "slo_margin"),
        ({"tpot_slo_ms": 0}, 400, "tpot_slo_ms"),
        ({"tpot_slo_ms": "fast"}, 400, "tpot_slo_ms"),
        ({"mode": "idle-only", "speed": 2}, 400, "speed"),  # one bad field: none applied
    ],
)
def test_a_bad_body_is_refused_and_changes_nothing(server, admin, body, status, param):
    before = settings(admin)
    response = requests.post(
        server.url + "/harli/mode",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    assert settings(admin) == before


def test_a_switch_needs_the_admin_key(server, admin):
    before = settings(admin)
    for client in (HarliClient(server.url), HarliClient(server.url, admin_api_key="wrong")):
        with pytest.raises(ApiError) as refused:
            client.set_mode("idle-only")
        assert refused.value.status == 401
    assert settings(admin) == before


def test_a_switch_shows_in_the_answer_the_status_and_the_metrics(server, admin):
    before = settings(admin)
    answer = admin.set_mode("idle-only", tpot_slo_ms=80, slo_margin=0.2)
    assert answer["control"]["mode"] == "idle-only"
    assert answer["objective"]["tpot_slo_ms"] == 80.0
    assert answer["objective"]["source"] == "request"

    status = admin.status()
    assert status["mode"] == "idle-only"
    [scheduler] = status["schedulers"]
    control = scheduler["control"]
    assert (control["mode"], control["tpot_slo_ms"], control["slo_margin"]) == (
        "idle-only",
        80.0,
        0.2,
    )
    assert control["switches"] == before["switches"] + 1
    assert control["last_switch"]["changed"]["mode"] == [before["mode"], "idle-only"]
    assert control["since_switch"]["iterations"] == 0
    assert scheduler["corun"]["objective_ms"] == 80.0
    # the next decode iterations are planned by the new mode's policy and judged against 80 ms
    generate(server, "x = 1", max_new_tokens=8)
    corun = admin.corun()
    assert corun["last_plan"]["reason"] == "idle-only"
    assert admin.control()["since_switch"]["iterations"] > 0

    series = metrics(server)
    assert series["sglang:harli_tpot_slo_seconds"] == pytest.approx(0.080)
    assert series["sglang:harli_slo_margin"] == pytest.approx(0.2)
    assert series["sglang:harli_mode/idle-only"] == 1 and series["sglang:harli_mode/harli"] == 0
    assert series["sglang:harli_control_switches_total"] >= 1

    admin.set_mode("harli", tpot_slo_ms=50, slo_margin=0.05)  # as the server started
    assert settings(admin)["mode"] == "harli"


class Decoding:
    """Requests decoding in the background, with pauses (idle passes) between them."""

    def __init__(self, server):
        self.server, self.stop = server, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            generate(self.server, "def f(x):", max_new_tokens=24)
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def test_a_job_keeps_training_across_switches_and_succeeds(server, admin, tiny_model_dir):
    """Four switches while a job trains and requests decode: after each its step count still
    rises, time-sliced runs finetune after each decode at once, naive beside it on the worker
    (and its units come back before the next mode runs any), and the job succeeds."""
    upload = admin.upload_chats(SHORT_CHATS, name="train.jsonl")
    # 200 steps: about 17 s on the 2-core dev machine with requests decoding, long enough for
    # the three switches below (each waits for one more step), short enough to finish here
    hyperparameters = {"n_epochs": EPOCHS, "batch_size": 4}
    job = admin.create_job(str(tiny_model_dir), upload["id"], hyperparameters)
    with Decoding(server):
        step = admin.wait_for_step(job["id"], 1, timeout_s=120)["step"]
        for mode in ("time-sliced", "naive", "idle-only", "harli"):
            admin.set_mode(mode)
            assert admin.control()["mode"] == mode
            if mode == "time-sliced":  # its fixed slice runs beside every decode iteration
                wait_until(
                    lambda: admin.control()["since_switch"]["finetune_s"] > 0,
                    60,
                    "time-sliced ran finetune beside decode",
                )
            if mode == "naive":  # its units go to the concurrent worker, beside decode
                units = admin.corun()["corun_units"]
                wait_until(
                    lambda units=units: admin.corun()["corun_units"] > units,
                    60,
                    "naive ran units on the worker",
                )
                assert admin.corun()["executor"]["kind"] == "cpu-concurrent"
            # still training under the new mode: a step more, before the job ends
            now = admin.job(job["id"])["step"]
            step = admin.wait_for_step(job["id"], now + 1, timeout_s=120)["step"]
            print(f"{mode}: step {step} of {EPOCHS * len(SHORT_CHATS) // 4}")
    done = admin.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done
    assert done["trained_tokens"] > 0
    assert admin.control()["switches"] >= 4


def test_a_tiny_objective_does_not_fit_and_says_why_once(server, admin):
    generate(server, "import os", max_new_tokens=MIN_SAMPLES + 8)  # stage 1 has measured
    answer = admin.set_mode("harli", tpot_slo_ms=0.001)
    objective = answer["objective"]
    assert objective["fits"] is False and objective["tpot_slo_ms"] == 0.001
    assert objective["reason"].startswith("the solo decode at batch 1 takes ")
    assert "(the 0.001 ms objective less its 5% margin)" in objective["reason"]
    assert "harli cannot train beside decode" in objective["reason"]
    assert objective["reason"].endswith("raise tpot_slo_ms (POST /harli/mode) or set it to auto")

    generate(server, "import sys", max_new_tokens=16)  # more misses: no more warnings
    corun = admin.corun()
    assert corun["objective"]["fits"] is False and corun["planned_finetune"] >= 0
    assert corun["last_plan"]["reason"] == "paused: no slack"
    log = server.log_path.read_text(errors="replace")
    assert log.count("Harli objective: the solo decode at batch") == 1

    answer = admin.set_mode(tpot_slo_ms="auto")  # the objective that fits the machine
    objective = answer["objective"]
    assert objective["source"] == "auto" and objective["fits"] is True
    assert objective["tpot_slo_ms"] == pytest.approx(1.5 * objective["solo_decode_ms"], rel=0.11)
    assert answer["control"]["tpot_slo_ms"] == "auto"


def test_the_share_sweep_measures_interference_on_one_server_start(server, admin, tmp_path):
    before = settings(admin)
    out = tmp_path / "profile.json"
    argv = ["--url", server.url, "--out", str(out), "--admin-api-key", ADMIN_KEY]
    argv += ["--sweep-shares", "0,1", "--seconds", "3", "--streams", "1", "--prompt-words", "8"]
    assert profile.main(argv) == 0
    written = json.loads(out.read_text())
    alone, beside = written["share_sweep"]
    assert (alone["share"], beside["share"]) == (0.0, 1.0)
    assert alone["worker_busy"] == 0 and beside["worker_busy"] > 0  # units ran beside decode
    assert beside["slowdown"] is not None and alone["gap_ms"] > 0
    # stage 2 as the server learned it, per unit kind, loaded with the profile
    assert {row["share"] for row in written["interference"]} == {1.0}
    predictor = Predictor.from_profile(written)
    assert predictor.interference.factor_at(1.0) is not None
    # the operator's settings are back (two switches more: the sweep's, then the restore)
    after = settings(admin)
    assert {k: after[k] for k in SETTINGS} == {k: before[k] for k in SETTINGS}
    assert after["switches"] > before["switches"]
