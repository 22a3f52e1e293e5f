"""Start, query and stop real SGLang servers (ours or plain) as process groups.

For tests and benchmarks, in the spirit of SGLang's own ``popen_launch_server``: a server is
started with the README's command or with plain ``python -m sglang.launch_server`` (given what
SGLang needs on this machine), and ``stop()`` kills it with every process it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from sglang_harli.srt import cpu

REPO = Path(__file__).resolve().parents[2]  # the checkout (scripts/serve.sh lives there)
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process group; ``stop()`` kills the launcher and every child it spawned."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ if env is None else env)
        env.pop("TRITON_INTERPRET", None)  # set for the kernel tests; a server runs as users run it
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        tail = self.log_tail()  # before stop() closes the log
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{tail}")

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        response = requests.post(self.url + path, json=body, timeout=timeout)
        assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
        return response.json()

    def get(self, path: str, timeout: float = 30) -> dict:
        response = requests.get(self.url + path, timeout=timeout)
        assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
        return response.json()

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children left behind by a launcher that died first
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


# Same for every server a test or benchmark compares: sleep-on-idle keeps an idle scheduler from
# spinning a core of a 2-core CI machine; it does not change what is computed.
COMMON_FLAGS = ["--sleep-on-idle"]


def harli_server(log_path: Path, *flags: str) -> Server:
    """Our launcher, started the way the README says (scripts/serve.sh)."""
    return Server([str(REPO / "scripts" / "serve.sh"), *COMMON_FLAGS, *flags], log_path)


def plain_sglang_server(log_path: Path, model_dir: Path, *flags: str) -> Server:
    """Plain ``python -m sglang.launch_server``, given what SGLang needs on this machine."""
    argv = ["--model-path", str(model_dir), *COMMON_FLAGS, *flags]
    env = None
    if not cpu.cuda_available():
        argv += cpu.server_flags(argv)
        env = cpu.child_env()
    return Server([sys.executable, "-m", "sglang.launch_server", *argv], log_path, env)
