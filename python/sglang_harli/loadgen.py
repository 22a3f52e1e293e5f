"""Streaming decode load, as clients see it: the gaps between streamed tokens (used by the
profile tool, the benchmarks and the tests; it speaks HTTP only and imports no torch).

``stream_load`` keeps ``streams`` concurrent greedy ``/generate`` streams going for
``duration_s`` (each request ``max_new_tokens`` long, EOS ignored, so every request decodes the
same number of tokens), and returns every gap between two consecutive streamed chunks of one
request, in seconds (the first token of each request, which includes its prefill, is not a gap).
"""

from __future__ import annotations

import json
import threading
import time

import requests

PROMPTS = ["def hello(world):", "import os, sys", "class Foo:", "x = [i for i in", "while True:"]


def stream_one(
    url: str, prompt: str, max_new_tokens: int, retractions: list[int] | None = None
) -> list[float]:
    """One streamed request's gaps; its retractions (SGLang's count) appended to
    ``retractions`` if given."""
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    gaps, last, chunk = [], None, {}
    with requests.post(url + "/generate", json=body, stream=True, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line or not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])  # a real chunk
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    if retractions is not None:
        retractions.append(chunk.get("meta_info", {}).get("num_retractions", 0))
    return gaps


def stream_load(
    url: str,
    duration_s: float,
    streams: int = 3,
    max_new_tokens: int = 48,
    prompts: list[str] = PROMPTS,
    retractions: list[int] | None = None,
) -> list[float]:
    """Client-side inter-token gaps (seconds) of ``streams`` concurrent streams; with
    ``retractions``, each request's retraction count (SGLang's) is appended to it."""
    gaps: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            got = stream_one(url, prompts[(i + n) % len(prompts)], max_new_tokens, retractions)
            n += 1
            with lock:
                gaps.extend(got)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return gaps
