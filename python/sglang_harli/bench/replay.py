"""Replay a production trace against one server per co-run mode; write a report and plots.

    python -m sglang_harli.bench replay --out DIR [--modes off,idle-only,time-sliced,harli]
        [--trace conv|code] [--rate-scale X] [--duration-s S] [--max-context-tokens N]
        [--max-output-tokens N] [--objective-ms S] [--model-path M] [--shared-prefix-tokens N]
        [-- extra server flags]

For each mode in turn (one server at a time: a machine cannot host several fairly), it starts
``python -m sglang_harli.launch_server --harli-mode MODE`` with the same model and objective,
starts the same fine-tuning job on it (every mode but ``off``, which is plain SGLang with the
same LoRA serving flags a Harli server adds: decode alone on the same decode path, the
reference), waits for the job's first step, then replays the trace's requests at their
scaled arrival times as streaming ``/generate`` calls (prompts of the trace's length made of
token ids, the trace's output length forced with ``ignore_eos``). While it runs, it reads
``GET /harli/status`` twice a second for the timeline. After the last arrival it waits for the
requests still running, cancels the job and stops the server.

The objective ``S``: ``--objective-ms``, or calibrated on the ``off`` server before its replay as
``--objective-factor`` times the median inter-token gap of two solo greedy streams. Time-sliced
runs with a slice of ``S`` minus that solo gap (``--time-slice-ms`` to choose): the slice an
operator would derive from the solo TPOT, which load then overruns.

The offered load. A trace's full rate is a large deployment's, not one machine's, so the replay
measures what this machine sustains. On the ``off`` server (plain SGLang), after ``S``, a probe
(:func:`probe_capacity`, within ``LOAD_BUDGET_S`` = 25 s, each step in the log) keeps 1, 2, 4, 8,
16 concurrent greedy streams of the trace's mean capped request open, adding them one at a
time, and measures the median inter-token gap ``g`` of 3 s at each step, up to the first
that passes ``S``. The capacity is the largest request rate of the steps within ``S``:
``c / (L g + c p)`` for ``c`` streams, the mean capped output length ``L`` and the measured
prefill ``p``. Without ``--rate-scale`` the replay offers ``LOAD_FRACTION`` = 0.5 of it (the
trace's bursts run at two or more times its mean, and a harli server decodes slower than plain
SGLang): the rate scale at which the window holds that many requests
(:func:`.trace.rate_scale_for`), the same trace for every mode. An explicit ``--rate-scale``
is judged against the same probe (stopped as soon as a step sustains the rate): a mean rate
over the capacity is an overload, said at the top of ``report.md``, in ``report.json``'s
``load`` and in the log, and the requests that fail under it count as
``dropped_under_overload``, not as failures. Without ``off`` in ``--modes`` nothing is measured:
``--rate-scale`` (and ``--objective-ms``) must be given. So a first run needs only::

    python -m sglang_harli.bench replay --out DIR --duration-s 60 --modes off,harli

Exit status (what a script running the benchmark branches on):

- 0: every mode ran and every request completed, at a load the machine sustains (or one not
  judged, without ``off``);
- 1: a mode could not run, or a request failed at a load the machine sustains: something to
  look at (the report's ``errors``); it wins over 3;
- 2: bad flags, nothing run or written;
- 3: the report is written, but the offered mean rate was over what plain SGLang sustains
  within ``S``: its figures measure a queue, not co-running, and requests dropped under it are
  not counted as failures.

Outputs in ``--out``: ``report.json`` (per mode, see :func:`.report.summarize`, the run's
settings, and ``load``: what was offered and measured, :func:`load_summary`),
``report.md`` (the table, finetune throughput as a ratio to the best baseline's), ``raw.json``
(every request's timings and the status timeline), ``profile.json`` (what the harli server
measured: the latency profile ``bench simulate --profile`` takes) and the PNG plots of
:mod:`.plots`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import torch

from sglang_harli import durable
from sglang_harli.bench import plots
from sglang_harli.bench.modes import parse_modes, replay_modes
from sglang_harli.bench.report import host, summarize, write_markdown
from sglang_harli.bench.server import Server
from sglang_harli.bench.trace import (
    TraceRequest,
    TraceScaling,
    add_trace_arguments,
    load_trace,
    mean_lengths,
    rate_scale_for,
    scaling_of,
    trace_duration_s,
)
from sglang_harli.bench.workload import JOB_PAIRS, prompt_ids
from sglang_harli.client import ClientError, HarliClient
from sglang_harli.config import Mode
from sglang_harli.loadgen import StreamRamp, stream_load
from sglang_harli.lora_serving import lora_serving_flags
from sglang_harli.profile import from_status

logger = logging.getLogger(__name__)

POLL_S = 0.5  # status timeline resolution
DRAIN_TIMEOUT_S = 300.0  # after the last arrival, for the requests still decoding

# The exit status (the module's docstring says when each is given).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OVERLOADED = 0, 1, 2, 3

# The offered load. Without --rate-scale the replay offers this fraction of the request rate
# plain SGLang sustained within S on the off server. Not all of it: the trace is bursty (a
# calibrated minute of the conv trace has 10-s stretches at 2-2.5 times its mean rate, the code
# trace more), and the harli servers decode slower than plain SGLang (their LoRA serving: about
# 1.3x TPOT on the CPU, docs/benchmarks.md), so a mean load at capacity would overrun S in
# every burst and leave no slack to train in. Half puts conv's bursts at about the capacity.
LOAD_FRACTION = 0.5
# The probe: concurrent streams of the trace's mean capped request, added one at a time up this
# ladder, STEP_WINDOW_S of gaps measured at each rung once the new streams' prefills are over,
# until the median gap passes S (or the rate is known to suffice, or the budget is spent).
LOAD_LADDER = (1, 2, 4, 8, 16)
STEP_WINDOW_S = 3.0
# the probe's rungs, warm-up included (then at most 2.5 s to let its streams go): with the 11 s of
# the objective's calibration before it, under 40 s on the off server before its replay
LOAD_BUDGET_S = 25.0
MIN_GAPS = 10  # a window with fewer says nothing (a stalled server)
ABORT_GRACE_S = 2.5  # SGLang aborts a request 2 s after its client closed the stream
PROBE_INDEX = 1_000_000  # the probe's prompts are not the replay's (indices 0..N)


@dataclasses.dataclass
class RequestLog:
    """One replayed request as the client saw it (times relative to the replay's start)."""

    index: int
    arrival_s: float
    context_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    gaps_s: list[float] = dataclasses.field(default_factory=list)
    gap_times_s: list[float] = dataclasses.field(default_factory=list)  # when each gap ended
    tokens: int = 0
    cached_tokens: int = 0  # prompt tokens SGLang's radix cache held (meta_info)
    error: str | None = None
    done_s: float | None = None


# --- the client --------------------------------------------------------------------------------


def send(url: str, request: TraceRequest, log: RequestLog, ids: list[int], t0: float) -> None:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {
            "max_new_tokens": request.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    }
    sent = time.perf_counter()
    last = None
    try:
        with requests.post(url + "/generate", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line or not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = time.perf_counter()
                if last is None:
                    log.ttft_s = now - sent
                else:
                    log.gaps_s.append(now - last)
                    log.gap_times_s.append(now - t0)
                last = now
                meta = chunk.get("meta_info", {})
                log.tokens = meta.get("completion_tokens", log.tokens + 1)
                log.cached_tokens = meta.get("cached_tokens", log.cached_tokens)
        if log.tokens < request.output_tokens:
            log.error = f"{log.tokens} of {request.output_tokens} tokens"
    except (requests.RequestException, ValueError) as exc:
        log.error = f"{type(exc).__name__}: {exc}"
    log.done_s = time.perf_counter() - t0


class StatusPoller(threading.Thread):
    """``GET /harli/status`` every ``POLL_S``: the timeline of one mode's run."""

    def __init__(self, url: str, t0: float):
        super().__init__(daemon=True)
        self.client, self.t0 = HarliClient(url, timeout_s=10), t0
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                scheduler = self.client.scheduler()
            except (ClientError, ValueError):
                continue
            if scheduler is not None:
                self.rows.append(timeline_row(scheduler, time.perf_counter() - self.t0))


def timeline_row(s: dict[str, Any], t: float) -> dict[str, Any]:
    """What the plots need of one status read (cumulative counters; the plots difference them)."""
    corun = s.get("corun") or {}
    memory = s.get("memory") or {}
    return {
        "t": t,
        "decode_iterations": s.get("decode_iterations", 0),
        "decode_tokens": s.get("decode_tokens", 0),
        "iterations": corun.get("iterations", 0),
        "within_slo": corun.get("within_slo", 0),
        # wall time spent training, in decode slices and idle quanta alike
        "finetune_s": sum(t["total_us"] for t in (s.get("finetune") or {}).values()) / 1e6,
        "finetune_tokens": corun.get("finetune_tokens", 0),
        "kv_lent_slots": memory.get("kv_lent_slots", 0),
        "kv_cached_slots": memory.get("kv_cached_slots"),
    }


def replay(
    url: str,
    trace: list[TraceRequest],
    vocab_size: int,
    progress: Progress,
    shared_prefix: int = 0,
) -> dict:
    """Every request of ``trace`` sent at its arrival time; returns the logs and the timeline."""
    t0 = time.perf_counter()
    poller = StatusPoller(url, t0)
    poller.start()
    logs = [
        RequestLog(i, r.arrival_s, r.context_tokens, r.output_tokens) for i, r in enumerate(trace)
    ]
    threads = []
    for request, log in zip(trace, logs, strict=True):
        ids = prompt_ids(request, log.index, vocab_size, shared_prefix)
        while (wait := request.arrival_s - (time.perf_counter() - t0)) > 0:
            progress.show(logs, time.perf_counter() - t0)
            time.sleep(min(wait, 0.25))
        thread = threading.Thread(target=send, args=(url, request, log, ids, t0), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    for thread in threads:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.25)
            progress.show(logs, time.perf_counter() - t0)
    for log in logs:
        if log.done_s is None:
            log.error = f"still running {DRAIN_TIMEOUT_S:.0f} s after the last arrival"
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    progress.show(logs, wall, final=True)
    return {
        "wall_s": wall,
        "requests": [dataclasses.asdict(log) for log in logs],
        "timeline": poller.rows,
    }


class Progress:
    """One status line on stderr: the mode, time, requests sent, done and failed."""

    def __init__(self, mode: str, duration_s: float, total: int):
        self.mode, self.duration_s, self.total = mode, duration_s, total
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, logs: list[RequestLog], elapsed: float, final: bool = False) -> None:
        if not final and time.monotonic() - self._last < (0.5 if self.tty else 10.0):
            return
        self._last = time.monotonic()
        done = sum(log.done_s is not None for log in logs)
        failed = sum(log.error is not None for log in logs)
        width = 30
        filled = int(width * min(elapsed / self.duration_s, 1.0))
        line = (
            f"{self.mode:>11} [{'#' * filled}{'.' * (width - filled)}] {elapsed:5.0f}/"
            f"{self.duration_s:.0f} s  {done}/{self.total} done, {failed} failed"
        )
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


# --- servers and the job -----------------------------------------------------------------------


def start_server(args, mode: Mode, objective_ms: float | None, slice_ms, workdir: Path) -> Server:
    argv = [*shlex.split(args.launcher), "--harli-mode", str(mode)]
    argv += ["--sleep-on-idle", "--harli-state-dir", str(workdir / f"state-{mode}")]
    if args.model_path:
        argv += ["--model-path", args.model_path]
    if objective_ms is not None and mode != Mode.OFF:
        argv += ["--harli-tpot-slo-ms", f"{objective_ms:.3f}"]
    if mode == Mode.OFF:  # the Harli modes' LoRA serving: the same decode path, measured alone
        argv += lora_serving_flags(lambda flag: flag in args.server_args)
    if mode != Mode.OFF and slice_ms is not None:  # time-sliced's, now or after a switch
        argv += ["--harli-finetune-budget-ms", f"{slice_ms:.3f}"]
    server = Server([*argv, *args.server_args], workdir / f"server-{mode}.log")
    logger.info("starting the %s server", mode)
    return server.wait_ready()


def flush_cache(server: Server, timeout_s: float = 60.0) -> None:
    """SGLang's ``POST /flush_cache``: the radix cache emptied, so the next mode's prompts
    find nothing of the previous mode's replay (the same prompts) cached. SGLang flushes only
    when no request runs (the previous mode's job was cancelled; its last units may still end):
    try again until it does."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = requests.post(server.url + "/flush_cache", timeout=30)
        if answer.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cache was not flushed: {answer.status_code} {answer.text}")
        time.sleep(0.5)


class Servers:
    """Where each mode runs: plain SGLang for ``off``; for every other mode one Harli server,
    started for the first and switched to each next one at runtime (``POST /harli/mode``: on a
    GPU a start costs minutes), or one each with ``--server-per-mode``."""

    def __init__(self, args, objective: dict, workdir: Path):
        self.args, self.objective, self.workdir = args, objective, workdir
        self.shared: Server | None = None

    def start(self, mode: Mode) -> tuple[Server, bool]:
        """The server for ``mode``, and whether the caller stops it after the mode's run."""
        objective = self.objective
        if mode == Mode.OFF or self.args.server_per_mode:
            return start_server(
                self.args, mode, objective.get("ms"), objective.get("slice_ms"), self.workdir
            ), True
        if self.shared is None:
            self.shared = start_server(
                self.args, mode, objective.get("ms"), objective.get("slice_ms"), self.workdir
            )
        else:
            logger.info("switching the Harli server to %s", mode)
            flush_cache(self.shared)  # each mode starts cold, as on its own server
            HarliClient(self.shared.url).set_mode(str(mode))
        return self.shared, False

    def stop(self) -> None:
        if self.shared is not None:
            self.shared.stop()
            self.shared = None


def model_info(server: Server) -> tuple[str, int]:
    """The served model's id and its vocabulary size (the server runs on this machine)."""
    model_id = server.get("/v1/models")["data"][0]["id"]
    path = Path(server.get("/get_model_info")["model_path"])
    config = json.loads((path / "config.json").read_text())
    return model_id, config.get("text_config", config)["vocab_size"]


def calibrate(server: Server, factor: float) -> tuple[float, float]:
    """``(S, solo gap)`` in ms: ``factor`` times the median gap of two solo greedy streams."""
    stream_load(server.url, 3.0, streams=2)  # warm-up
    solo_ms = statistics.median(stream_load(server.url, 8.0, streams=2)) * 1e3
    return factor * solo_ms, solo_ms


# --- the offered load: what plain SGLang sustains within S -------------------------------------


@dataclasses.dataclass
class LoadStep:
    """One rung of the probe: ``concurrency`` streams, the median gap of its window."""

    concurrency: int
    gap_ms: float
    gaps: int


def request_rate(concurrency: int, gap_s: float, output_tokens: float, prefill_s: float) -> float:
    """Requests per second a server finishes with ``concurrency`` requests decoding, each
    iteration taking ``gap_s``, each request ``output_tokens`` long and stalling decode for
    ``prefill_s`` once: in a time T it prefills ``rate x T`` requests and decodes in the rest,
    ``concurrency`` tokens an iteration, so ``rate = c / (L g + c p)``."""
    return concurrency / (output_tokens * gap_s + concurrency * prefill_s)


def capacity_of(
    steps: list[LoadStep], objective_ms: float, output_tokens: float, prefill_ms: float
) -> dict[str, Any]:
    """The largest request rate of the rungs whose median gap met S. If none did (S is below
    even one stream's decode), the first rung's rate, with ``within_objective`` false."""
    if not steps:
        raise ValueError("the load probe measured no rung")

    def rate(step: LoadStep) -> float:
        return request_rate(step.concurrency, step.gap_ms / 1e3, output_tokens, prefill_ms / 1e3)

    within = [step for step in steps if step.gap_ms <= objective_ms]
    best = max(within, key=rate) if within else steps[0]
    return {
        "capacity_rps": rate(best),
        "concurrency": best.concurrency,
        "gap_ms": best.gap_ms,
        "within_objective": bool(within),
        # the probe stopped before a rung missed S (rate enough, the ladder's end, the budget)
        "capacity_is_lower_bound": bool(within) and steps[-1].gap_ms <= objective_ms,
        "steps": [
            {**dataclasses.asdict(step), "rps": rate(step), "within": step.gap_ms <= objective_ms}
            for step in steps
        ],
    }


def overloaded(offered_rps: float, capacity_rps: float | None) -> bool | None:
    """Whether the offered mean rate is more than plain SGLang sustains within S (None: the
    capacity was not measured). Bursts above it inside a window whose mean is under it are the
    trace's nature, not an overload."""
    return None if capacity_rps is None else offered_rps > capacity_rps


def probe_capacity(
    url: str,
    objective_ms: float,
    context_tokens: float,
    output_tokens: float,
    vocab_size: int,
    shared_prefix: int = 0,
    enough_rps: float | None = None,
    budget_s: float = LOAD_BUDGET_S,
) -> dict[str, Any]:
    """Climb LOAD_LADDER on the server at ``url`` (plain SGLang) with streams of the trace's
    mean capped request; what it sustained within ``objective_ms`` (:func:`capacity_of`). With
    ``enough_rps`` (an explicit rate to judge) it stops as soon as a rung sustains that."""
    started = time.monotonic()
    deadline = started + budget_s
    length, context = max(1, round(output_tokens)), max(1, round(context_tokens))

    def body(n: int, max_new_tokens: int = length) -> dict[str, Any]:
        shape = TraceRequest(0.0, context, max_new_tokens)
        return {
            "input_ids": prompt_ids(shape, PROBE_INDEX + n, vocab_size, shared_prefix),
            "stream": True,
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }

    logger.info(
        "load probe: streams of %d prompt and %d new tokens, 1 to %d of them, against S = "
        "%.1f ms (at most %.0f s)",
        context,
        length,
        LOAD_LADDER[-1],
        objective_ms,
        budget_s,
    )
    # the first prefill of a new prompt length is slow: not a rung's
    warm = requests.post(url + "/generate", json={**body(-1, 2), "stream": False}, timeout=120)
    warm.raise_for_status()
    ramp = StreamRamp(url, body)
    steps: list[LoadStep] = []
    try:
        for concurrency in LOAD_LADDER:
            while ramp.streams < concurrency and not ramp.errors:
                if ramp.add(deadline - time.monotonic() - STEP_WINDOW_S) is None:
                    break
            if ramp.errors or ramp.streams < concurrency:
                why = ramp.errors[0] if ramp.errors else "no first token within the budget"
                logger.info("load probe: stopped at %d streams: %s", concurrency, why)
                break
            gaps = ramp.window(STEP_WINDOW_S)
            if len(gaps) < MIN_GAPS:
                logger.info("load probe: %d streams gave %d gaps: stopped", concurrency, len(gaps))
                break
            steps.append(LoadStep(concurrency, statistics.median(gaps) * 1e3, len(gaps)))
            prefill_s = statistics.median(ramp.ttfts)
            rps = request_rate(concurrency, steps[-1].gap_ms / 1e3, length, prefill_s)
            logger.info(
                "load probe: %2d streams: median gap %.1f ms (S %.1f ms), prefill %.0f ms: "
                "%.3g requests/s (%.0f s)",
                concurrency,
                steps[-1].gap_ms,
                objective_ms,
                prefill_s * 1e3,
                rps,
                time.monotonic() - started,
            )
            if steps[-1].gap_ms > objective_ms:
                break
            if enough_rps is not None and rps >= enough_rps:
                break
            if deadline - time.monotonic() < 2 * STEP_WINDOW_S:
                logger.info("load probe: out of time after %d streams", concurrency)
                break
    finally:
        ramp.close()
        time.sleep(ABORT_GRACE_S)  # the probe's last requests aborted before the replay
    if not steps:
        raise RuntimeError(f"the load probe measured nothing: {(ramp.errors or ['no gaps'])[0]}")
    prefill_ms = statistics.median(ramp.ttfts) * 1e3
    out = capacity_of(steps, objective_ms, length, prefill_ms)
    out.update(
        prefill_ms=prefill_ms,
        context_tokens=context,
        output_tokens=length,
        objective_ms=objective_ms,
        seconds=time.monotonic() - started,
    )
    return out


@dataclasses.dataclass
class Load:
    """The replay's offered load: the trace at its rate scale, and what the off server
    sustained (``probe``) once measured. Every mode replays ``trace``."""

    scaling: TraceScaling
    explicit: bool  # --rate-scale given; otherwise calibrated on the off server
    trace: list[TraceRequest] | None = None
    probe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.explicit and self.trace is None:
            self.trace = load_trace(self.scaling)

    @property
    def offered_rps(self) -> float | None:
        return None if self.trace is None else len(self.trace) / self.scaling.duration_s

    @property
    def overloaded(self) -> bool | None:
        if self.probe is None or self.offered_rps is None:
            return None
        return overloaded(self.offered_rps, self.probe["capacity_rps"])

    def choose(self, probe: dict[str, Any]) -> None:
        """Take the off server's ``probe``; without an explicit rate, the scale that offers
        LOAD_FRACTION of its capacity, and the trace at it."""
        self.probe = probe
        if not self.explicit:
            scale = rate_scale_for(self.scaling, LOAD_FRACTION * probe["capacity_rps"])
            self.scaling = dataclasses.replace(self.scaling, rate_scale=scale)
            self.trace = load_trace(self.scaling)

    def calibrate(self, url: str, objective_ms: float, vocab_size: int, shared_prefix: int):
        """Measure what the off server at ``url`` sustains within S and :meth:`choose`."""
        if self.explicit:  # judge the given rate: the trace's own mean request, stop when enough
            assert self.trace
            context = sum(r.context_tokens for r in self.trace) / len(self.trace)
            output = sum(r.output_tokens for r in self.trace) / len(self.trace)
            try:
                probe = probe_capacity(
                    url,
                    objective_ms,
                    context,
                    output,
                    vocab_size,
                    shared_prefix,
                    enough_rps=self.offered_rps,
                )
            except (RuntimeError, requests.RequestException) as exc:
                logger.warning("load probe failed (%s): the load is not judged", exc)
                return
        else:
            context, output = mean_lengths(self.scaling)
            probe = probe_capacity(url, objective_ms, context, output, vocab_size, shared_prefix)
        try:
            self.choose(probe)
        except ValueError as exc:  # the trace has too few requests for that rate
            raise RuntimeError(str(exc)) from exc
        log_load(self)


def log_load(load: Load) -> None:
    probe = load.probe
    assert probe is not None and load.offered_rps is not None
    if load.explicit:
        logger.info(
            "load: --rate-scale %g offers %.3g requests/s; plain SGLang sustains %s%.3g within S",
            load.scaling.rate_scale,
            load.offered_rps,
            "at least " if probe["capacity_is_lower_bound"] else "",
            probe["capacity_rps"],
        )
    else:
        logger.info(
            "load: plain SGLang sustains %.3g requests/s within S (%d streams, median gap "
            "%.1f ms); offering %g of it: --rate-scale %.4g, %d requests in %g s (%.3g/s)",
            probe["capacity_rps"],
            probe["concurrency"],
            probe["gap_ms"],
            LOAD_FRACTION,
            load.scaling.rate_scale,
            len(load.trace or ()),
            load.scaling.duration_s,
            load.offered_rps,
        )
    if not probe["within_objective"]:
        logger.warning(
            "load: even one stream's decode (%.1f ms) misses S (%.1f ms): the capacity is one "
            "stream's rate, and no mode can keep the objective",
            probe["gap_ms"],
            probe["objective_ms"],
        )
    if load.overloaded:
        warn_overloaded(load)


def warn_overloaded(load: Load) -> None:
    assert load.probe is not None
    logger.warning(
        "load: OVERLOADED: the trace offers %.3g requests/s, more than the %.3g plain SGLang "
        "sustains within S on this machine; requests that fail count as dropped under "
        "overload, and the exit status is %d (leave out --rate-scale to offer %g of the "
        "capacity)",
        load.offered_rps,
        load.probe["capacity_rps"],
        EXIT_OVERLOADED,
        LOAD_FRACTION,
    )


def load_summary(load: Load) -> dict[str, Any]:
    """``report.json``'s ``load``: what was offered, and what plain SGLang sustained."""
    probe = load.probe or {}
    capacity, offered = probe.get("capacity_rps"), load.offered_rps
    return {
        "calibrated": not load.explicit and load.probe is not None,
        "measured": load.probe is not None,
        "rate_scale": load.scaling.rate_scale,
        "offered_rps": offered,
        "capacity_rps": capacity,
        "fraction": offered / capacity if capacity and offered is not None else None,
        "target_fraction": None if load.explicit else LOAD_FRACTION,
        "overloaded": load.overloaded,
        **{k: v for k, v in probe.items() if k != "capacity_rps"},
    }


def exit_status(report: dict) -> int:
    """A mode that could not run, or a request that failed at a load the machine sustains:
    EXIT_FAILED. Else an offered load over the capacity: EXIT_OVERLOADED. Else EXIT_OK."""
    if report["modes_failed"] or any(m["requests_failed"] for m in report["modes"].values()):
        return EXIT_FAILED
    if (report.get("load") or {}).get("overloaded"):
        return EXIT_OVERLOADED
    return EXIT_OK


def run_mode(args, mode: Mode, load: Load, objective: dict, servers: Servers) -> dict:
    server, own = servers.start(mode)
    try:
        model_id, vocab_size = model_info(server)
        if "ms" not in objective:  # the first server is off: calibrate on plain SGLang
            objective["ms"], objective["solo_ms"] = calibrate(server, args.objective_factor)
            objective["slice_ms"] = args.time_slice_ms or objective["ms"] - objective["solo_ms"]
            logger.info(
                "objective: S = %.1f ms (%g x the solo gap, %.1f ms)",
                objective["ms"],
                args.objective_factor,
                objective["solo_ms"],
            )
        if mode == Mode.OFF:  # plain SGLang: what the machine sustains, the load from it
            load.calibrate(server.url, objective["ms"], vocab_size, args.shared_prefix_tokens)
        trace = load.trace
        assert trace is not None  # explicit, or calibrated on off (the first mode)
        client = HarliClient(server.url)
        job = None
        if mode != Mode.OFF:  # the same job on every mode's server, once its first step is done
            job = client.start_training(model_id, JOB_PAIRS, args.n_epochs)
        before = client.corun() if mode != Mode.OFF else None
        progress = Progress(str(mode), trace[-1].arrival_s if trace else 0.0, len(trace))
        run = replay(server.url, trace, vocab_size, progress, args.shared_prefix_tokens)
        after = client.corun() if mode != Mode.OFF else None
        measured = machine_profile(client) if mode == Mode.HARLI else None
        if job is not None:
            client.cancel(job["id"])
            job = client.job(job["id"])
        return {
            "mode": str(mode),
            "model": model_id,
            "run": run,
            "counters": {"before": before, "after": after},
            "job": job,
            "profile": measured,
        }
    finally:
        if own:
            server.stop()


def machine_profile(client: HarliClient) -> dict | None:
    """What the harli server measured during the replay, as a latency profile (the fleet
    simulation's input for this machine: ``bench/simulate.py --profile``)."""
    scheduler = client.scheduler()
    try:
        return from_status(scheduler, min_samples=3, grid=None) if scheduler else None
    except SystemExit:  # it measured no decode shape often enough
        return None


# --- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated --harli-mode values (default: off and every mode this machine "
        "runs, corun/modes.py: on a CPU harli, time-sliced, idle-only, naive, static)",
    )
    add_trace_arguments(
        parser,
        rate_scale_help="arrival rate multiplier: the trace's gaps are divided by it (default: "
        f"calibrated, {LOAD_FRACTION:g} of the request rate the off server sustains within S)",
    )
    parser.set_defaults(rate_scale=None)  # not given: calibrated on the off server
    parser.add_argument(
        "--objective-ms", type=float, help="the TPOT objective S (default: calibrated)"
    )
    parser.add_argument("--objective-factor", type=float, default=2.0, help="S = factor x solo gap")
    parser.add_argument(
        "--time-slice-ms", type=float, help="time-sliced's slice (default S - solo)"
    )
    parser.add_argument("--model-path", help="default: the server's embedded default model")
    parser.add_argument(
        "--launcher",
        default=f"{shlex.quote(sys.executable)} -m sglang_harli.launch_server",
        help="the command that starts a server (given --harli-mode, --host, --port and the rest)"
        ", e.g. scripts/serve.sh (default: %(default)s)",
    )
    parser.add_argument("--n-epochs", type=int, default=10_000, help="the job's (it is cancelled)")
    parser.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=0,
        help="the first N tokens of every prompt are the same, as a system prompt is, so the "
        "radix cache has something to reuse (default 0: the trace's random prompts share none)",
    )
    parser.add_argument(
        "--server-per-mode",
        action="store_true",
        help="start a server for each mode (default: one Harli server for every mode but off, "
        "switched at runtime with POST /harli/mode)",
    )
    parser.add_argument("server_args", nargs="*", help="after --: more flags for every server")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s replay] %(message)s")
    explicit = args.rate_scale is not None
    try:
        # without --rate-scale, 1 until the off server has been measured (Load.choose)
        flags = args if explicit else argparse.Namespace(**{**vars(args), "rate_scale": 1.0})
        scaling = scaling_of(flags)
        modes = parse_modes(args.modes, replay_modes(torch.cuda.is_available()))
    except ValueError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    given = {"--objective-ms": args.objective_ms is not None, "--rate-scale": explicit}
    missing = [flag for flag, there in given.items() if not there]
    if missing and Mode.OFF not in modes:
        print(
            "replay: error: without off in --modes nothing is calibrated (the objective and the "
            f"offered load are measured on plain SGLang): give {' and '.join(missing)}, or "
            "include off",
            file=sys.stderr,
        )
        return EXIT_USAGE
    load = Load(scaling, explicit)
    if explicit:
        empty = not load.trace
    else:  # at any scale: whether a request comes after the start
        empty = scaling.start_s > trace_duration_s(scaling.trace)
    if empty:
        print("replay: error: no request of the trace falls in that window", file=sys.stderr)
        return EXIT_USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    objective: dict[str, float] = {}
    if args.objective_ms is not None:
        objective = {
            "ms": args.objective_ms,
            "slice_ms": args.time_slice_ms or args.objective_ms / 2,
        }
    # a SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the server of the mode running is
    # stopped with every process it spawned (run_mode's finally) instead of left serving
    signal.signal(signal.SIGTERM, _terminate)
    results = {}
    with tempfile.TemporaryDirectory(prefix="harli-replay-") as tmp:
        servers = Servers(args, objective, Path(tmp))
        try:
            for mode in modes:
                try:
                    results[str(mode)] = run_mode(args, mode, load, objective, servers)
                except (RuntimeError, TimeoutError, requests.RequestException, ClientError) as exc:
                    logger.error("mode %s could not run: %s", mode, exc)
                    results[str(mode)] = {"mode": str(mode), "error": str(exc)}
                    if "ms" not in objective or load.trace is None:
                        # off failed before calibrating: no objective or no load to replay
                        what = "objective" if "ms" not in objective else "offered load"
                        print(f"replay: error: no {what}: {exc}", file=sys.stderr)
                        return EXIT_FAILED
        finally:  # the shared Harli server, whatever happened (a SIGTERM unwinds to here)
            servers.stop()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": host(),
        "model": next((r["model"] for r in results.values() if "model" in r), None),
        "trace": dataclasses.asdict(load.scaling),
        "requests": len(load.trace),
        "load": load_summary(load),
        "shared_prefix_tokens": args.shared_prefix_tokens,
        "objective_ms": objective["ms"],
        "solo_gap_ms": objective.get("solo_ms"),
        "time_slice_ms": objective.get("slice_ms"),
        "job": next((r["job"] for r in results.values() if r.get("job")), None),
        "modes": {
            m: summarize(r, objective["ms"], overloaded=bool(load.overloaded))
            for m, r in results.items()
            if "run" in r
        },
        "modes_failed": {m: r["error"] for m, r in results.items() if "error" in r},
    }
    durable.write_bytes(args.out / "report.json", json.dumps(report, indent=2).encode())
    (args.out / "raw.json").write_text(json.dumps(results))
    profile = results.get(str(Mode.HARLI), {}).get("profile")
    if profile is not None:
        durable.write_bytes(args.out / "profile.json", json.dumps(profile, indent=1).encode())
    write_markdown(report, args.out / "report.md")
    plots.write_all(report, results, args.out)
    print((args.out / "report.md").read_text())
    if load.overloaded:
        warn_overloaded(load)  # again, after the table
    return exit_status(report)


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise SystemExit(128 + signum)
