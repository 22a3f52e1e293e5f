"""What memory tests do to a running server: start one with a poisoned arena, greedy generation,
concurrent bursts, the memory status, and waiting for a condition."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai

from test.support.server_process import harli_server


@contextlib.contextmanager
def lending_server(model_dir: Path, workdir: Path, pool: int, *flags: str) -> Iterator:
    """A ready server of ``model_dir`` with a ``pool``-slot KV pool and ``--harli-arena-poison``
    (any overlap of the job's blocks with live KV shows in outputs), stopped on leaving."""
    server = harli_server(
        workdir / "server.log",
        "--model-path",
        str(model_dir),
        "--harli-state-dir",
        str(workdir / "state"),
        "--max-total-tokens",
        str(pool),
        "--harli-arena-poison",
        *flags,
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def openai_client(server) -> openai.OpenAI:
    """The official client against ``server`` (no retries: a test sees each answer)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def generate(server, prompt: str, max_new_tokens: int = 16) -> dict:
    """Greedy ``/generate`` (EOS ignored): the output ids and SGLang's retraction count."""
    out = server.post(
        "/generate",
        {
            "text": prompt,
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        },
    )
    return {"ids": out["output_ids"], "retractions": out["meta_info"]["num_retractions"]}


def memory(server) -> dict:
    """The first scheduler's unified-memory status (``/harli/status``)."""
    return server.get("/harli/status")["schedulers"][0]["memory"]


def wait_until(predicate, timeout_s: float = 60, what: str = ""):
    """``predicate()``'s first truthy value within ``timeout_s``, else TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"not within {timeout_s} s: {what}")


def concurrently(fn, items) -> list:
    """``fn`` on every item at once, one thread each; results in the items' order."""
    results: list = [None] * len(items)

    def run(i):
        results[i] = fn(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results
