"""The fine-tuning CLI is a thin HTTP client: it must start fast, without torch."""

from __future__ import annotations

import subprocess
import sys


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

    class Answers:
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

    assert cli.cmd_checkpoints(Answers(), argparse.Namespace(job="ftjob-x")) == cli.EXIT_OK
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
