"""Replay a production trace against one server per co-run mode; write a report and plots.

    python -m sglang_harli.bench replay --out DIR [--modes off,idle-only,time-sliced,harli]
        [--trace conv|code] [--rate-scale X] [--duration-s S] [--max-context-tokens N]
        [--max-output-tokens N] [--objective-ms S] [--model-path M] [--shared-prefix-tokens N]
        [-- extra server flags]

For each mode in turn (one server at a time: a machine cannot host several fairly), it starts
``python -m sglang_harli.launch_server --harli-mode MODE`` with the same model and objective,
starts the same fine-tuning job on it (every mode but ``off``, which is plain SGLang: decode
alone, the reference), waits for the job's first step, then replays the trace's requests at their
scaled arrival times as streaming ``/generate`` calls (prompts of the trace's length made of
token ids, the trace's output length forced with ``ignore_eos``). While it runs, it reads
``GET /harli/status`` twice a second for the timeline. After the last arrival it waits for the
requests still running, cancels the job and stops the server.

The objective ``S``: ``--objective-ms``, or calibrated on the ``off`` server before its replay as
``--objective-factor`` times the median inter-token gap of two solo greedy streams. Time-sliced
runs with a slice of ``S`` minus that solo gap (``--time-slice-ms`` to choose): the slice an
operator would derive from the solo TPOT, which load then overruns.

Outputs in ``--out``: ``report.json`` (per mode and the run's settings, see
:func:`.report.summarize`),
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
from sglang_harli.bench.modes import parse_modes
from sglang_harli.bench.report import host, summarize, write_markdown
from sglang_harli.bench.server import Server
from sglang_harli.bench.trace import TraceRequest, add_trace_arguments, load_trace, scaling_of
from sglang_harli.bench.workload import JOB_PAIRS, prompt_ids
from sglang_harli.client import ClientError, HarliClient
from sglang_harli.config import Mode
from sglang_harli.loadgen import stream_load
from sglang_harli.profile import from_status

logger = logging.getLogger(__name__)

POLL_S = 0.5  # status timeline resolution
DRAIN_TIMEOUT_S = 300.0  # after the last arrival, for the requests still decoding


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
    if mode == Mode.TIME_SLICED and slice_ms is not None:
        argv += ["--harli-finetune-budget-ms", f"{slice_ms:.3f}"]
    server = Server([*argv, *args.server_args], workdir / f"server-{mode}.log")
    logger.info("starting the %s server", mode)
    return server.wait_ready()


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


def run_mode(args, mode: Mode, trace, objective: dict, workdir: Path) -> dict:
    server = start_server(args, mode, objective.get("ms"), objective.get("slice_ms"), workdir)
    try:
        model_id, vocab_size = model_info(server)
        if "ms" not in objective:  # the first server is off: calibrate on plain SGLang
            objective["ms"], objective["solo_ms"] = calibrate(server, args.objective_factor)
            objective["slice_ms"] = args.time_slice_ms or objective["ms"] - objective["solo_ms"]
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
        help="comma-separated --harli-mode values (default: off,idle-only,time-sliced,harli on "
        "a CPU; plus naive,static on a GPU)",
    )
    add_trace_arguments(parser)
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
    parser.add_argument("server_args", nargs="*", help="after --: more flags for every server")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s replay] %(message)s")
    try:
        scaling = scaling_of(args)
        modes = parse_modes(args.modes, torch.cuda.is_available())
    except ValueError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return 2
    if args.objective_ms is None and Mode.OFF not in modes:
        print("replay: error: give --objective-ms, or include off to calibrate it", file=sys.stderr)
        return 2
    trace = load_trace(scaling)
    if not trace:
        print("replay: error: no request of the trace falls in that window", file=sys.stderr)
        return 2
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
        workdir = Path(tmp)
        for mode in modes:
            try:
                results[str(mode)] = run_mode(args, mode, trace, objective, workdir)
            except (RuntimeError, TimeoutError, requests.RequestException, ClientError) as exc:
                logger.error("mode %s could not run: %s", mode, exc)
                results[str(mode)] = {"mode": str(mode), "error": str(exc)}
                if "ms" not in objective:  # off failed before calibrating: nothing to compare
                    print(f"replay: error: no objective: {exc}", file=sys.stderr)
                    return 1
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": host(),
        "model": next((r["model"] for r in results.values() if "model" in r), None),
        "trace": dataclasses.asdict(scaling),
        "requests": len(trace),
        "shared_prefix_tokens": args.shared_prefix_tokens,
        "objective_ms": objective["ms"],
        "solo_gap_ms": objective.get("solo_ms"),
        "time_slice_ms": objective.get("slice_ms"),
        "job": next((r["job"] for r in results.values() if r.get("job")), None),
        "modes": {m: summarize(r, objective["ms"]) for m, r in results.items() if "run" in r},
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
    failed = report["modes_failed"] or any(m["requests_failed"] for m in report["modes"].values())
    return 1 if failed else 0


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise SystemExit(128 + signum)
