"""Start, query and stop real servers (ours or plain SGLang) as process groups.

For the benchmarks and the tests, in the spirit of SGLang's own ``popen_launch_server``: a server
is started with our launcher (:func:`harli_server`) or any command, and ``stop()`` kills it with
every process it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

START_TIMEOUT_S = 420
# uvicorn's line when the HTTP port was taken between free_port() and the server's bind (another
# process's port): SGLang's shutdown then waits minutes for its warmup, so we start it again
BIND_FAILED = "error while attempting to bind"
START_ATTEMPTS = 3
# Same for every server a test or benchmark compares: sleep-on-idle keeps an idle scheduler from
# spinning a core of a 2-core CI machine; it does not change what is computed.
COMMON_FLAGS = ["--sleep-on-idle"]
LAUNCHER = [sys.executable, "-m", "sglang_harli.launch_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process group; ``stop()`` kills the launcher and every child it spawned."""

    scheme = "http"

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self._command = argv
        self._env = dict(os.environ if env is None else env)
        self._env.pop("TRITON_INTERPRET", None)  # set for the kernel tests; servers run as users'
        self._cwd = cwd
        self._spawn()

    def _spawn(self) -> None:
        self.port = free_port()
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.argv = [*self._command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self._cwd,
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        return requests.get(self.url + "/health", timeout=5).status_code == 200

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Server:
        """The server, once healthy; stopped (its whole process group) if it never gets there
        or the wait is interrupted (Ctrl-C, a SIGTERM the caller turned into SystemExit)."""
        try:
            return self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> Server:
        deadline = time.monotonic() + timeout_s
        attempts = 1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.healthy():
                    return self
            except requests.RequestException:
                pass
            if attempts < START_ATTEMPTS and self._bind_failures() >= attempts:
                attempts += 1
                self._kill()
                self._spawn()  # same log, a fresh port
                continue
            time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log_tail()}")

    def _bind_failures(self) -> int:
        self._log.flush()
        return self.log_path.read_text(errors="replace").count(BIND_FAILED)

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        response = requests.post(self.url + path, json=body, timeout=timeout)
        assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
        return response.json()

    def get(self, path: str, timeout: float = 30) -> dict:
        response = requests.get(self.url + path, timeout=timeout)
        assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
        return response.json()

    def log_tail(self, lines: int = 40) -> str:
        if not self._log.closed:  # still readable once stopped
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self._kill()
        self._log.close()

    def _kill(self) -> None:
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


def harli_server(
    log_path: Path, *flags: str, launcher: Sequence[str] = LAUNCHER, cwd: Path | None = None
) -> Server:
    """Our launcher (default: this Python's ``-m sglang_harli.launch_server``; a checkout's
    benchmarks and tests pass ``scripts/serve.sh``, the README's command) with ``flags``."""
    return Server([*launcher, *COMMON_FLAGS, *flags], log_path, cwd=cwd)
