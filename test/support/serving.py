"""What memory tests do to a running server: greedy generation, concurrent bursts, the memory
status, and waiting for a condition."""

from __future__ import annotations

import threading
import time


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
