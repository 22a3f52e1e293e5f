"""Start, query and stop real SGLang servers (ours or plain) as process groups.

For tests and benchmarks, in the spirit of SGLang's own ``popen_launch_server``: a server is
started with the README's command or with plain ``python -m sglang.launch_server`` (given what
SGLang needs on this machine), and ``stop()`` kills it with every process it spawned.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sglang_harli.bench.server import START_TIMEOUT_S, Server, free_port
from sglang_harli.srt import cpu

REPO = Path(__file__).resolve().parents[2]  # the checkout (scripts/serve.sh lives there)
__all__ = ["COMMON_FLAGS", "REPO", "START_TIMEOUT_S", "Server", "free_port", "harli_server"]


# Same for every server a test or benchmark compares: sleep-on-idle keeps an idle scheduler from
# spinning a core of a 2-core CI machine; it does not change what is computed.
COMMON_FLAGS = ["--sleep-on-idle"]


def harli_server(log_path: Path, *flags: str) -> Server:
    """Our launcher, started the way the README says (scripts/serve.sh)."""
    return Server([str(REPO / "scripts" / "serve.sh"), *COMMON_FLAGS, *flags], log_path, cwd=REPO)


def plain_sglang_server(log_path: Path, model_dir: Path, *flags: str) -> Server:
    """Plain ``python -m sglang.launch_server``, given what SGLang needs on this machine."""
    argv = ["--model-path", str(model_dir), *COMMON_FLAGS, *flags]
    env = None
    if not cpu.cuda_available():
        argv += cpu.server_flags(argv)
        env = cpu.child_env()
    return Server([sys.executable, "-m", "sglang.launch_server", *argv], log_path, env, cwd=REPO)
