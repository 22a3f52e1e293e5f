"""The server harness the benchmarks and the tests start servers with."""

from __future__ import annotations

import signal
import sys
import textwrap

import pytest
import requests

from sglang_harli.bench.server import BIND_FAILED, Server

# Stands in for the launcher: the first start loses its port as uvicorn reports it and then hangs
# (as SGLang's shutdown does), the second serves /health on the port it was given.
FAKE_LAUNCHER = textwrap.dedent(
    f"""
    import http.server, pathlib, sys, time
    marker = pathlib.Path(sys.argv[1])
    port = int(sys.argv[sys.argv.index("--port") + 1])
    if not marker.exists():
        marker.write_text(str(port))
        print("ERROR:    [Errno 98] {BIND_FAILED} on address ('127.0.0.1', %d)" % port, flush=True)
        time.sleep(600)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


def test_a_server_that_lost_its_port_is_started_again_on_another(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(FAKE_LAUNCHER)
    marker = tmp_path / "first-port"
    server = Server([sys.executable, str(script), str(marker)], tmp_path / "server.log")
    first = server.proc
    try:
        server.wait_ready(timeout_s=60)
        assert first.poll() is not None, "the hung first launcher is left running"
        assert server.port != int(marker.read_text())
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        server.stop()


def test_an_interrupted_start_leaves_no_server_behind(tmp_path):
    """A SIGTERM (which the replay turns into SystemExit) while a server starts: the process
    group is stopped, not left serving (found when a replay killed mid-start left its server)."""
    script = tmp_path / "launcher.py"
    script.write_text("import time\ntime.sleep(600)\n")  # never healthy
    server = Server([sys.executable, str(script)], tmp_path / "server.log")

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGALRM, terminate)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(SystemExit):
            server.wait_ready(timeout_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert server.proc.poll() is not None
    assert isinstance(server.log_tail(), str)  # the log still reads once stopped
