"""Streaming decode load, as clients see it: the gaps between streamed tokens (used by the
profile tool, the benchmarks and the tests; it speaks HTTP only and imports no torch).

``stream_load`` keeps ``streams`` concurrent greedy ``/generate`` streams going for
``duration_s`` (each request ``max_new_tokens`` long, EOS ignored, so every request decodes the
same number of tokens), and returns every gap between two consecutive streamed chunks of one
request, in seconds (the first token of each request, which includes its prefill, is not a gap).

``StreamRamp`` keeps streams open while more join, one at a time, and measures the gaps of a
window at each step: the replay's probe of how much load a server sustains.
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


class StreamRamp:
    """Concurrent streams that stay open while more join: the load a capacity probe climbs.

    ``add()`` starts one more stream and waits for its first token (so each new prefill is
    measured on its own and is over before the next window); every stream then asks for its
    next request as soon as the last one ends, with the body ``body(n)`` gives for the
    ``n``-th request started. ``window(seconds)`` returns the gaps (seconds) that ended in the
    next ``seconds``; ``close()`` stops every stream mid-request, closing its connection
    (SGLang aborts a request whose client went away, about 2 s later).
    """

    def __init__(self, url: str, body, read_timeout_s: float = 60.0):
        self.url, self.body, self.read_timeout_s = url, body, read_timeout_s
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.gaps: list[tuple[float, float]] = []  # (when it ended, gap)
        self.ttfts: list[float] = []  # each stream's first token, from its start
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.started = 0  # requests started, all streams

    @property
    def streams(self) -> int:
        return len(self.threads)

    def add(self, timeout_s: float) -> float | None:
        """One more stream; its time to first token, or None if none came in ``timeout_s``
        (or the stream failed: see ``errors``)."""
        first = threading.Event()
        ttft: list[float] = []
        thread = threading.Thread(target=self._stream, args=(first, ttft), daemon=True)
        self.threads.append(thread)
        thread.start()
        first.wait(timeout_s)
        return ttft[0] if ttft else None

    def window(self, seconds: float) -> list[float]:
        """The gaps that end in the next ``seconds`` (this call sleeps through them)."""
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        with self.lock:
            return [gap for at, gap in self.gaps if start <= at < end]

    def close(self, join_s: float = 5.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + join_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _stream(self, first: threading.Event, ttft: list[float]) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    n, self.started = self.started, self.started + 1
                sent, last = time.perf_counter(), None
                with requests.post(
                    self.url + "/generate",
                    json=self.body(n),
                    stream=True,
                    timeout=(10.0, self.read_timeout_s),
                ) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line or not line.startswith(b"data:") or line == b"data: [DONE]":
                            continue
                        now = time.perf_counter()
                        if last is None and not first.is_set():
                            ttft.append(now - sent)
                            with self.lock:
                                self.ttfts.append(now - sent)
                            first.set()
                        elif last is not None:
                            with self.lock:
                                self.gaps.append((now, now - last))
                        last = now
                        if self.stop.is_set():
                            break  # leaving the with closes the connection: SGLang aborts it
        except (requests.RequestException, ValueError) as exc:
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            first.set()
