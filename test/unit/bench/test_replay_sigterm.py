"""``bench replay`` stopped with SIGTERM (a CI timeout, ``kill``) stops the server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# Stands in for the launcher: spawns a child in its process group (as SGLang's scheduler and
# detokenizer are), answers /health, and never answers anything else, so the replay is waiting
# on it when the SIGTERM comes.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import http.server, os, pathlib, subprocess, sys, time
    marker = pathlib.Path(sys.argv[1])
    port = int(sys.argv[sys.argv.index("--port") + 1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                return
            marker.write_text(str(os.getpgid(0)))
            time.sleep(600)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_servers_the_replay_started(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    marker = tmp_path / "asked"
    argv = [sys.executable, "-m", "sglang_harli.bench", "replay", "--out", str(tmp_path / "out")]
    argv += ["--modes", "off", "--objective-ms", "10", "--duration-s", "5"]
    argv += ["--launcher", f"{sys.executable} {launcher} {marker}"]
    replay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pgid = None
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert replay.poll() is None, replay.communicate()[0]
            assert time.monotonic() < deadline, "the replay never asked its server anything"
            time.sleep(0.2)
        pgid = int(marker.read_text())
        assert _group_alive(pgid)
        replay.send_signal(signal.SIGTERM)
        out = replay.communicate(timeout=60)[0]
        assert replay.returncode != 0, out
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(pgid), "the server's process group outlived the replay"
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        if pgid is not None and _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
