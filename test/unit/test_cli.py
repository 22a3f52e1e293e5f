"""The fine-tuning CLI is a thin HTTP client: it must start fast, without torch."""

from __future__ import annotations

import subprocess
import sys
import time


def test_cli_help_imports_no_torch_and_no_engine():
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['python -m sglang_harli.finetune', '--help']\n"
        "try:\n"
        "    runpy.run_module('sglang_harli.finetune', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('torch', 'sglang', 'sglang_harli.finetune.graph', 'sqlite3')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "create" in out.stdout  # the real help was printed
    assert "HEAVY []" in out.stdout


def test_engine_names_still_import_from_the_package():
    from sglang_harli.finetune import Trainer, graph

    assert callable(graph.loss_sum) and Trainer.__name__ == "Trainer"


def test_checkpoints_with_a_null_loss_are_listed(capsys):
    """A diverged job's metrics hold null (non-finite numbers are stored so): still listed."""
    import argparse

    from sglang_harli import cli
    from sglang_harli.client import HarliClient

    class Answers(HarliClient):
        def request(self, method, path, **kwargs):
            return {
                "data": [
                    {
                        "step_number": 3,
                        "metrics": {"train_loss": None},
                        "fine_tuned_model_checkpoint": "m:a:ckpt-step-3",
                    },
                    {
                        "step_number": 2,
                        "metrics": {"train_loss": 1.5},
                        "fine_tuned_model_checkpoint": "m:a:ckpt-step-2",
                    },
                ]
            }

    answers = Answers("http://unused")
    assert cli.cmd_checkpoints(answers, argparse.Namespace(job="ftjob-x")) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert "n/a" in out[0] and "1.5000" in out[1]


def test_an_https_server_with_a_self_signed_certificate(tmp_path, capsys):
    """--ca-cert trusts the server's own certificate; without it the CLI says what to pass."""
    import http.server
    import json
    import ssl
    import threading

    from sglang_harli import cli
    from test.unit.srt.test_publisher import self_signed_cert

    cert, key = self_signed_cert(tmp_path)

    class Jobs(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            raw = json.dumps({"object": "list", "data": [], "has_more": False}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jobs)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert cli.main(["--server", url, "list"]) == cli.EXIT_UNREACHABLE
        assert "--ca-cert" in capsys.readouterr().err
        assert cli.main(["--server", url, "--ca-cert", str(cert), "list"]) == cli.EXIT_OK
    finally:
        httpd.shutdown()
        httpd.server_close()


class _StandIn:
    """A stand-in for the server's API on a local port: answers what the CLI asks, after
    ``delay_s`` for the routes in ``slow``; an upload's body is written to ``body_path`` as it
    arrives (not kept in memory, so the test measures only the client's memory)."""

    def __init__(self, body_path, delay_s: float = 0.0, slow: tuple[str, ...] = ()):
        import http.server
        import json
        import threading

        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: dict) -> None:
                if any(self.path.startswith(p) for p in slow):
                    time.sleep(delay_s)
                raw = json.dumps(body).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up (the timeout test)

            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.startswith("/v1/models"):
                    self._answer({"data": [{"id": "base"}]})
                else:
                    self._answer({"object": "list", "data": [], "has_more": False})

            def do_POST(self):  # noqa: N802
                length = int(self.headers["Content-Length"])
                if self.path == "/v1/files":
                    stand_in.content_type = self.headers["Content-Type"]
                    with open(body_path, "wb") as out:
                        while length:
                            chunk = self.rfile.read(min(length, 1 << 16))
                            out.write(chunk)
                            length -= len(chunk)
                    self._answer({"id": "file-1"})
                else:
                    self.rfile.read(length)
                    self._answer({"id": "ftjob-1", "status": "queued"})

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_read_timeout_is_a_clear_error_with_its_own_exit_code(tmp_path, capsys):
    """No answer within --timeout: one line saying so and exit 4, not a traceback and not 1
    (which says the job failed)."""
    from sglang_harli import cli

    server = _StandIn(tmp_path / "body", delay_s=3.0, slow=("/v1/fine_tuning/jobs",))
    try:
        began = time.monotonic()
        code = cli.main(["--server", server.url, "--timeout", "0.5", "list"])
        assert code == cli.EXIT_NO_ANSWER == 4
        assert time.monotonic() - began < 2.5
        err = capsys.readouterr().err
        assert err.startswith("error:") and "no answer" in err and "Traceback" not in err
    finally:
        server.close()


def test_a_large_upload_is_streamed_and_waits_past_the_request_timeout(tmp_path, capsys):
    """A 40 MB dataset: sent whole, without holding it in memory, and its answer (which the
    server gives only after validating the file) is waited for past --timeout."""
    import tracemalloc

    from sglang_harli import cli
    from sglang_harli.client import chat_jsonl

    data = tmp_path / "big.jsonl"
    line = chat_jsonl([("hi", "yo")]).encode()
    with open(data, "wb") as f:
        for _ in range(40 * (1 << 20) // len(line) + 1):
            f.write(line)
    body = tmp_path / "body"
    server = _StandIn(body, delay_s=1.5, slow=("/v1/files",))
    try:
        tracemalloc.start()
        code = cli.main(["--server", server.url, "--timeout", "1", "create", str(data)])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        server.close()
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert "created ftjob-1 (training file file-1)" in capsys.readouterr().out
    assert peak < 16 * (1 << 20), f"the upload held {peak / (1 << 20):.0f} MB in memory"
    # the body is a form with the purpose and the whole file, byte for byte
    boundary = server.content_type.split("boundary=")[1].encode()
    raw = body.read_bytes()
    parts = raw.split(b"--" + boundary)
    assert parts[-1] == b"--\r\n"
    purpose = next(p for p in parts if b'name="purpose"' in p)
    assert purpose.endswith(b"\r\n\r\nfine-tune\r\n")
    file_part = next(p for p in parts if b'filename="big.jsonl"' in p)
    assert file_part.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")] == data.read_bytes()


def test_a_missing_dataset_is_a_clear_error(tmp_path, capsys):
    from sglang_harli import cli

    server = _StandIn(tmp_path / "body")
    try:
        code = cli.main(["--server", server.url, "create", str(tmp_path / "missing.jsonl")])
    finally:
        server.close()
    assert code == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.jsonl" in err


def test_mode_switches_with_the_admin_key_and_shows_what_is_in_force(capsys):
    """``mode --tpot-slo-ms auto --mode idle-only`` posts exactly those settings as a write (the
    admin key); with no option it only reads the status and prints the reason a decode does
    not fit."""
    from sglang_harli import cli
    from sglang_harli.client import HarliClient

    control = {
        "mode": "idle-only",
        "tpot_slo_ms": "auto",
        "slo_margin": 0.05,
        "static_share": 0.5,
        "finetune_budget_ms": 20.0,
        "switches": 1,
    }
    objective = {"tpot_slo_ms": 12.0, "reason": None}
    sent = []

    class Answers(HarliClient):
        def request(self, method, path, write=False, **kwargs):
            sent.append((method, path, write, kwargs.get("json")))
            if method == "POST":
                return {"control": control, "objective": objective}
            slow = {**objective, "reason": "the solo decode at batch 1 takes 70.00 ms, above"}
            return {"schedulers": [{"control": control, "corun": {"objective": slow}}]}

    args = cli._parser().parse_args(["mode", "--mode", "idle-only", "--tpot-slo-ms", "auto"])
    assert args.run(Answers("http://unused"), args) == cli.EXIT_OK
    assert sent == [("POST", "/harli/mode", True, {"mode": "idle-only", "tpot_slo_ms": "auto"})]
    out = capsys.readouterr().out
    assert "mode idle-only  objective auto" in out and "auto objective now 12.00 ms" in out

    args = cli._parser().parse_args(["mode"])
    assert args.run(Answers("http://unused"), args) == cli.EXIT_OK
    assert sent[-1][:3] == ("GET", "/harli/status", False)
    assert "takes 70.00 ms" in capsys.readouterr().out
