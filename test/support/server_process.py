"""The checkout's servers for the tests: our launcher started the way the README says
(``scripts/serve.sh``) and plain SGLang given what it needs on this machine; the harness itself
is ``sglang_harli.bench.server``."""

from __future__ import annotations

import sys
from pathlib import Path

from sglang_harli.bench import server
from sglang_harli.bench.server import COMMON_FLAGS, START_TIMEOUT_S, Server, free_port
from sglang_harli.srt import cpu

REPO = Path(__file__).resolve().parents[2]  # the checkout (scripts/serve.sh lives there)
SERVE = [str(REPO / "scripts" / "serve.sh")]
__all__ = ["COMMON_FLAGS", "REPO", "START_TIMEOUT_S", "Server", "free_port", "harli_server"]


def harli_server(log_path: Path, *flags: str) -> Server:
    """Our launcher, started the way the README says (scripts/serve.sh)."""
    return server.harli_server(log_path, *flags, launcher=SERVE, cwd=REPO)


def plain_sglang_server(log_path: Path, model_dir: Path, *flags: str) -> Server:
    """Plain ``python -m sglang.launch_server``, given what SGLang needs on this machine."""
    argv = ["--model-path", str(model_dir), *COMMON_FLAGS, *flags]
    env = None
    if not cpu.cuda_available():
        argv += cpu.server_flags(argv)
        env = cpu.child_env()
    return Server([sys.executable, "-m", "sglang.launch_server", *argv], log_path, env, cwd=REPO)
