"""The replay's offered load (``bench/replay.py``, "The offered load"): the capacity the off
server sustains within S turned into a rate scale, an explicit rate judged against it, and what
an overload does to the report and the exit status. No SGLang server: recorded numbers, and a
fake streaming server whose decode slows with the streams it serves."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time

import pytest

from sglang_harli.bench import replay
from sglang_harli.bench.__main__ import main as bench_main
from sglang_harli.bench.replay import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OVERLOADED,
    EXIT_USAGE,
    LOAD_FRACTION,
    Load,
    LoadStep,
    capacity_of,
    exit_status,
    load_summary,
    probe_capacity,
    request_rate,
)
from sglang_harli.bench.report import classify_failures, load_failure, summarize, write_markdown
from sglang_harli.bench.trace import TraceScaling, load_trace, rate_scale_for

# --- the capacity -> rate scale arithmetic ---------------------------------------------------


@pytest.mark.parametrize("trace", ["conv", "code"])
@pytest.mark.parametrize("start_s", [0.0, 600.0])
@pytest.mark.parametrize("duration_s", [15.0, 60.0, 120.0])
def test_the_rate_scale_offers_the_rate_asked(trace, start_s, duration_s):
    scaling = TraceScaling(trace=trace, start_s=start_s, duration_s=duration_s)
    scales = []
    for offered in (0.03, 0.1, 0.25, 0.5, 1.0, 2.5):
        scale = rate_scale_for(scaling, offered)
        window = load_trace(dataclasses.replace(scaling, rate_scale=scale))
        assert len(window) == max(1, round(offered * duration_s)), (offered, scale)
        if offered * duration_s >= 1:  # else one request, the least a replay has
            assert len(window) / duration_s == pytest.approx(offered, abs=0.5 / duration_s)
        assert all(r.arrival_s < duration_s for r in window)
        scales.append(scale)
    assert scales == sorted(scales)  # a higher rate is never a lower scale


def test_the_rate_scale_refuses_what_the_trace_cannot_offer():
    scaling = TraceScaling(duration_s=60.0)
    with pytest.raises(ValueError, match="requests after start_s"):
        rate_scale_for(scaling, 1e6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            rate_scale_for(scaling, bad)


def test_the_request_rate_counts_decode_and_prefill():
    # 4 streams at 100 ms a token, 100-token requests, 300 ms prefill: 4 / (10 + 1.2)
    assert request_rate(4, 0.1, 100, 0.3) == pytest.approx(4 / 11.2)
    assert request_rate(1, 0.08, 108, 0.0) == pytest.approx(1 / 8.64)


# rungs shaped like SmolLM2's on 2 cores (the recorded replay's solo gap 77 ms, S = 154 ms)
SMOL = [LoadStep(1, 80.0, 37), LoadStep(2, 95.0, 63), LoadStep(4, 130.0, 92)]
SMOL.append(LoadStep(8, 190.0, 126))


def test_capacity_is_the_best_rate_within_the_objective():
    got = capacity_of(SMOL, 154.0, 108, 340.0)
    assert got["concurrency"] == 4 and got["gap_ms"] == 130.0
    assert got["capacity_rps"] == pytest.approx(4 / (108 * 0.130 + 4 * 0.340))
    assert got["within_objective"] and not got["capacity_is_lower_bound"]
    assert [s["within"] for s in got["steps"]] == [True, True, True, False]
    # every rung within S: what the probe saw is a lower bound
    assert capacity_of(SMOL[:3], 154.0, 108, 340.0)["capacity_is_lower_bound"]
    # a rung whose rate fell (the gap grew faster than the streams) is not the capacity
    flat = [LoadStep(1, 50.0, 40), LoadStep(2, 140.0, 40)]
    assert capacity_of(flat, 154.0, 100, 0.0)["concurrency"] == 1


def test_an_objective_below_one_stream_gives_one_streams_rate():
    got = capacity_of(SMOL, 60.0, 108, 340.0)
    assert not got["within_objective"] and got["concurrency"] == 1
    assert got["capacity_rps"] == pytest.approx(1 / (108 * 0.080 + 0.340))
    with pytest.raises(ValueError):
        capacity_of([], 60.0, 108, 340.0)


def probe(capacity_rps: float, concurrency: int = 4, gap_ms: float = 130.0, **kw) -> dict:
    return {
        "capacity_rps": capacity_rps,
        "concurrency": concurrency,
        "gap_ms": gap_ms,
        "within_objective": True,
        "capacity_is_lower_bound": False,
        "prefill_ms": 340.0,
        "context_tokens": 397,
        "output_tokens": 109,
        "objective_ms": 154.0,
        "steps": [],
        "seconds": 21.0,
        **kw,
    }


def test_without_a_rate_the_load_is_a_fraction_of_the_capacity():
    scaling = TraceScaling(duration_s=60.0)
    load = Load(scaling, explicit=False)
    assert load.trace is None and load.overloaded is None
    load.choose(probe(0.5))
    assert load.trace == load_trace(load.scaling)  # every mode replays this
    assert len(load.trace) == round(LOAD_FRACTION * 0.5 * 60)
    summary = load_summary(load)
    assert summary["calibrated"] and summary["measured"] and not summary["overloaded"]
    assert summary["capacity_rps"] == 0.5 and summary["concurrency"] == 4
    assert summary["gap_ms"] == 130.0 and summary["target_fraction"] == LOAD_FRACTION
    assert summary["offered_rps"] == pytest.approx(LOAD_FRACTION * 0.5, abs=0.5 / 60)
    assert summary["fraction"] == pytest.approx(LOAD_FRACTION, abs=0.5 / 60 / 0.5)
    assert summary["rate_scale"] == load.scaling.rate_scale < 1.0
    json.dumps(summary)  # report.json's


def test_an_explicit_rate_over_the_capacity_is_an_overload():
    # the new user's run: the conv trace at its full rate, 191 requests in 60 s
    load = Load(TraceScaling(rate_scale=1.0, duration_s=60.0), explicit=True)
    assert len(load.trace) == 191 and load.overloaded is None  # not measured yet
    load.choose(probe(0.3))
    assert load.scaling.rate_scale == 1.0  # given: kept
    summary = load_summary(load)
    assert summary["overloaded"] is True and not summary["calibrated"]
    assert summary["offered_rps"] == pytest.approx(191 / 60)
    assert summary["fraction"] == pytest.approx(191 / 60 / 0.3)
    # a rate the machine sustains is not
    light = Load(TraceScaling(rate_scale=0.05, duration_s=60.0), explicit=True)
    light.choose(probe(0.3, capacity_is_lower_bound=True))
    assert light.offered_rps < 0.3 and load_summary(light)["overloaded"] is False


# --- what an overload does to the counts, the report and the exit status ----------------------

ERRORS = [
    "ReadTimeout: HTTPConnectionPool(host='127.0.0.1', port=1): Read timed out.",
    "ConnectionError: ('Connection aborted.', RemoteDisconnected())",
    "12 of 128 tokens",
    "still running 300 s after the last arrival",
    "HTTPError: 503 Server Error: Service Unavailable for url: http://x/generate",
    "HTTPError: 429 Client Error: Too Many Requests for url: http://x/generate",
    "HTTPError: 400 Client Error: Bad Request for url: http://x/generate",
]


def test_failures_under_an_overload_are_dropped_unless_the_request_was_wrong():
    assert [load_failure(e) for e in ERRORS] == [True] * 6 + [False]
    requests_ = [{"error": e} for e in ERRORS] + [{"error": None}] * 3
    assert classify_failures(requests_, overloaded=False) == (7, 0)
    assert classify_failures(requests_, overloaded=True) == (1, 6)


def run_result(errors: list[str | None]) -> dict:
    requests_ = [
        {
            "arrival_s": float(i),
            "context_tokens": 10,
            "output_tokens": 3,
            "ttft_s": 0.1,
            "gaps_s": [0.05, 0.05] if e is None else [],
            "gap_times_s": [i + 0.15, i + 0.2] if e is None else [],
            "tokens": 3 if e is None else 0,
            "cached_tokens": 0,
            "error": e,
            "done_s": i + 0.2,
        }
        for i, e in enumerate(errors)
    ]
    return {
        "run": {"wall_s": 10.0, "requests": requests_, "timeline": []},
        "counters": {"before": None, "after": None},
    }


def report_of(errors, load: dict | None, modes_failed=None) -> dict:
    overloaded = bool(load and load.get("overloaded"))
    return {
        "date": "today",
        "machine": {"processor": "x86_64", "cpus": 2},
        "model": "m",
        "trace": {"trace": "conv", "rate_scale": 1.0},
        "requests": len(errors),
        "objective_ms": 154.0,
        "load": load,
        "modes": {"off": summarize(run_result(errors), 154.0, overloaded)},
        "modes_failed": modes_failed or {},
    }


def test_the_exit_status_tells_an_overload_from_a_failure():
    timeouts = [None, ERRORS[0], ERRORS[3]]
    over = load_summary_of(overloaded=True)
    fine = load_summary_of(overloaded=False)
    assert exit_status(report_of([None, None], fine)) == EXIT_OK
    assert exit_status(report_of([None, None], None)) == EXIT_OK  # not judged (no off)
    assert exit_status(report_of(timeouts, fine)) == EXIT_FAILED
    report = report_of(timeouts, over)
    assert report["modes"]["off"]["requests_failed"] == 0
    assert report["modes"]["off"]["dropped_under_overload"] == 2
    assert exit_status(report) == EXIT_OVERLOADED
    assert exit_status(report_of([None], over)) == EXIT_OVERLOADED  # nothing dropped: still
    assert exit_status(report_of([None, ERRORS[-1]], over)) == EXIT_FAILED  # a wrong request
    assert exit_status(report_of([None], over, {"harli": "no server"})) == EXIT_FAILED


def load_summary_of(overloaded: bool) -> dict:
    load = Load(TraceScaling(rate_scale=1.0, duration_s=60.0), explicit=True)
    load.choose(probe(0.3 if overloaded else 10.0))
    return load_summary(load)


def test_the_report_says_an_overload_first(tmp_path):
    path = tmp_path / "report.md"
    write_markdown(report_of([None, ERRORS[0]], load_summary_of(overloaded=True)), path)
    text = path.read_text()
    assert text.index("**Overloaded") < text.index("| mode |")
    assert "3.18 requests/s (`--rate-scale 1`), given: 10.61x the 0.3 requests/s" in text
    assert "| off |" in text and "/ 0 / 1 |" in text  # completed / failed / dropped

    calibrated = Load(TraceScaling(duration_s=60.0), explicit=False)
    calibrated.choose(probe(0.5))
    write_markdown(report_of([None], load_summary(calibrated)), path)
    text = path.read_text()
    assert "Overloaded" not in text and "Load: calibrated" in text
    assert "sustained 0.5 requests/s within S (4 concurrent streams of 397 prompt" in text
    assert "offered 0.5 of it: 0.25 requests/s" in text

    write_markdown(report_of([None], None), path)  # a report from before `load`
    assert "Load:" not in path.read_text()


def test_without_off_a_rate_must_be_given(tmp_path, capsys):
    out = tmp_path / "x"
    base = ["replay", "--out", str(out)]
    assert bench_main([*base, "--modes", "harli", "--objective-ms", "100"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--rate-scale" in err and "--objective-ms" not in err.split("give")[1]
    assert bench_main([*base, "--modes", "harli"]) == EXIT_USAGE
    assert "give --objective-ms and --rate-scale" in capsys.readouterr().err
    assert not out.exists()


# --- the probe against a fake server whose decode slows with its streams ----------------------

GAP_S, GAP_PER_STREAM_S = 0.004, 0.0025  # a decode iteration: fixed, plus per sequence
PREFILL_S = 0.02


class FakeDecode(http.server.ThreadingHTTPServer):
    """``/generate``: a stream's tokens come every 4 ms plus 2.5 ms per stream being served,
    after a 20 ms prefill."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.active = 0
        self.most = 0
        self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked, as uvicorn streams: each chunk reaches the client

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: FakeDecode = self.server  # type: ignore[assignment]
        if not body.get("stream"):
            data = json.dumps({"text": ""}).encode()
            self.send_response(200)
            self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        with server.lock:
            server.active += 1
            server.most = max(server.most, server.active)
        try:
            time.sleep(PREFILL_S)
            for i in range(body["sampling_params"]["max_new_tokens"]):
                if i:
                    time.sleep(GAP_S + GAP_PER_STREAM_S * server.active)
                chunk = {"text": "x", "meta_info": {"completion_tokens": i + 1}}
                self.chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with server.lock:
                server.active -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(monkeypatch):
    monkeypatch.setattr(replay, "STEP_WINDOW_S", 0.6)
    monkeypatch.setattr(replay, "ABORT_GRACE_S", 0.0)
    server = FakeDecode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_probe_climbs_until_decode_passes_the_objective(fake_server):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    # S = 20 ms: 4 streams decode at 14 ms a token, 8 at 24 ms
    got = probe_capacity(url, 20.0, context_tokens=16, output_tokens=20, vocab_size=1000)
    assert [s["concurrency"] for s in got["steps"]] == [1, 2, 4, 8]
    assert got["concurrency"] == 4 and got["within_objective"]
    assert not got["capacity_is_lower_bound"]
    assert 13.0 < got["gap_ms"] < 18.0
    assert got["steps"][-1]["gap_ms"] > 20.0
    assert got["capacity_rps"] == pytest.approx(4 / (20 * 0.014 + 4 * PREFILL_S), rel=0.25)
    assert got["seconds"] < 20
    # the probe's streams are closed: the server serves nothing once it returns
    deadline = time.monotonic() + 5
    while fake_server.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_server.active == 0


def test_an_explicit_rate_stops_the_probe_once_it_is_sustained(fake_server):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    got = probe_capacity(url, 20.0, 16, 20, 1000, enough_rps=1.0)
    assert [s["concurrency"] for s in got["steps"]] == [1]  # one stream does 6.7 requests/s
    assert got["capacity_is_lower_bound"] and got["capacity_rps"] > 1.0
    assert fake_server.most <= 2  # never climbed


def test_the_probe_keeps_to_its_budget(fake_server):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    started = time.monotonic()
    got = probe_capacity(url, 1000.0, 16, 20, 1000, budget_s=2.0)  # S never passed
    assert time.monotonic() - started < 2.0 + 3.0  # the budget, the last window, closing
    assert got["capacity_is_lower_bound"] and len(got["steps"]) < len(replay.LOAD_LADDER)
