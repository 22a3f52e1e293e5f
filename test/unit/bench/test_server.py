"""The server harness the benchmarks and the tests start servers with."""

from __future__ import annotations

import sys
import textwrap

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
