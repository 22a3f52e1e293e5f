"""Replay a production trace against one server per co-run mode; write a report and plots.

    python -m sglang_harli.bench replay --out DIR [--modes off,idle-only,time-sliced,harli]
        [--trace conv|code] [--rate-scale X] [--duration-s S] [--max-context-tokens N]
        [--max-output-tokens N] [--objective-ms S] [--model-path M] [-- extra server flags]

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

Outputs in ``--out``: ``report.json`` (per mode and the run's settings, see :func:`summarize`),
``report.md`` (the table, finetune throughput as a ratio to the best baseline's), ``raw.json``
(every request's timings and the status timeline), ``profile.json`` (what the harli server
measured: the latency profile ``bench simulate --profile`` takes) and the PNG plots of
:mod:`.plots`.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from sglang_harli import durable
from sglang_harli.bench.server import Server
from sglang_harli.bench.trace import TraceRequest, TraceScaling, load_trace
from sglang_harli.config import Mode
from sglang_harli.corun.stats import quantile
from sglang_harli.loadgen import stream_load

logger = logging.getLogger(__name__)

CPU_MODES = (Mode.OFF, Mode.IDLE_ONLY, Mode.TIME_SLICED, Mode.HARLI)
GPU_MODES = (*CPU_MODES, Mode.NAIVE, Mode.STATIC)
POLL_S = 0.5  # status timeline resolution
# a mode "keeps the objective" when this share of its decode iterations met S (the issue's
# design target is 99.9% on a GPU; a 2-core CPU's own decode jitter allows 99%)
OBJECTIVE_KEPT = 0.99
DRAIN_TIMEOUT_S = 300.0  # after the last arrival, for the requests still decoding
# The job every mode trains: short chats, many epochs, so it runs through the whole replay.
JOB_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("What color is grass?", "Grass is green."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("Say something kind.", "You are doing great today."),
    ("What is water made of?", "Hydrogen and oxygen."),
    ("Which planet is red?", "Mars is the red planet."),
    ("What do bees make?", "Bees make honey."),
]


def chat_jsonl(pairs: list[tuple[str, str]]) -> str:
    """One chat example (a user turn, the assistant's answer) per pair, as JSONL text: the
    fine-tuning API's training file."""
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        + "\n"
        for q, a in pairs
    )


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
    error: str | None = None
    done_s: float | None = None


# --- the client --------------------------------------------------------------------------------


def prompt_ids(request: TraceRequest, index: int, vocab_size: int) -> list[int]:
    """A prompt of exactly the trace's length: seeded token ids away from the special tokens
    (which tokenizers put at either end of the vocabulary)."""
    rng = random.Random(index)
    low, high = vocab_size // 10, vocab_size // 2
    return [rng.randrange(low, high) for _ in range(request.context_tokens)]


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
                log.tokens = chunk.get("meta_info", {}).get("completion_tokens", log.tokens + 1)
        if log.tokens < request.output_tokens:
            log.error = f"{log.tokens} of {request.output_tokens} tokens"
    except (requests.RequestException, ValueError) as exc:
        log.error = f"{type(exc).__name__}: {exc}"
    log.done_s = time.perf_counter() - t0


class StatusPoller(threading.Thread):
    """``GET /harli/status`` every ``POLL_S``: the timeline of one mode's run."""

    def __init__(self, url: str, t0: float):
        super().__init__(daemon=True)
        self.url, self.t0 = url, t0
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                status = requests.get(self.url + "/harli/status", timeout=10).json()
            except (requests.RequestException, ValueError):
                continue
            schedulers = status.get("schedulers") or []
            if schedulers:
                self.rows.append(timeline_row(schedulers[0], time.perf_counter() - self.t0))


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
    }


def corun_counters(url: str) -> dict[str, Any] | None:
    schedulers = requests.get(url + "/harli/status", timeout=30).json().get("schedulers") or []
    return schedulers[0]["corun"] if schedulers else None


def replay(url: str, trace: list[TraceRequest], vocab_size: int, progress: Progress) -> dict:
    """Every request of ``trace`` sent at its arrival time; returns the logs and the timeline."""
    t0 = time.perf_counter()
    poller = StatusPoller(url, t0)
    poller.start()
    logs = [
        RequestLog(i, r.arrival_s, r.context_tokens, r.output_tokens) for i, r in enumerate(trace)
    ]
    threads = []
    for request, log in zip(trace, logs, strict=True):
        ids = prompt_ids(request, log.index, vocab_size)
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
    argv = [sys.executable, "-m", "sglang_harli.launch_server", "--harli-mode", str(mode)]
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


def start_job(server: Server, model_id: str, workdir: Path, n_epochs: int) -> dict:
    """The same job on every mode's server: returns it once its first step is done."""
    upload = requests.post(
        server.url + "/v1/files",
        files={"file": ("replay-job.jsonl", chat_jsonl(JOB_PAIRS).encode())},
        data={"purpose": "fine-tune"},
        timeout=60,
    ).json()
    job = server.post(
        "/v1/fine_tuning/jobs",
        {
            "model": model_id,
            "training_file": upload["id"],
            "hyperparameters": {"n_epochs": n_epochs},
        },
    )
    deadline = time.monotonic() + 300
    while (job := server.get(f"/v1/fine_tuning/jobs/{job['id']}"))["step"] < 1:
        if job["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"the replay's job did not start training: {job}")
        time.sleep(0.2)
    return job


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
        job = None
        if mode != Mode.OFF:
            job = start_job(server, model_id, workdir, args.n_epochs)
        before = corun_counters(server.url) if mode != Mode.OFF else None
        progress = Progress(str(mode), trace[-1].arrival_s if trace else 0.0, len(trace))
        run = replay(server.url, trace, vocab_size, progress)
        after = corun_counters(server.url) if mode != Mode.OFF else None
        measured = machine_profile(server) if mode == Mode.HARLI else None
        if job is not None:
            requests.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=30)
            job = server.get(f"/v1/fine_tuning/jobs/{job['id']}")
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


def machine_profile(server: Server) -> dict | None:
    """What the harli server measured during the replay, as a latency profile (the fleet
    simulation's input for this machine: ``bench/simulate.py --profile``)."""
    from sglang_harli.profile import from_status

    schedulers = server.get("/harli/status").get("schedulers") or []
    try:
        return from_status(schedulers[0], min_samples=3, grid=None) if schedulers else None
    except SystemExit:  # it measured no decode shape often enough
        return None


# --- the report --------------------------------------------------------------------------------


def first_token_times(requests_: list[dict]) -> list[float]:
    """When each request's prefill ended (its first token), sorted, in replay time."""
    return sorted(r["arrival_s"] + r["ttft_s"] for r in requests_ if r["ttft_s"] is not None)


def spans_a_prefill(end_s: float, gap_s: float, prefills: list[float]) -> bool:
    """Whether another request's prefill ran inside this gap (SGLang runs it between two decode
    iterations, so the gap holds a prefill, not only decode and finetune). The client sees that
    request's first token up to one gap late (detokenizer, HTTP), so a first token seen within
    a gap's length after the gap ends counts too."""
    i = bisect.bisect_right(prefills, end_s - gap_s)
    return i < len(prefills) and prefills[i] < end_s + gap_s


def decode_gaps(requests_: list[dict]) -> list[float]:
    """The client gaps with no prefill inside: what decode iterations (and the finetune beside
    them) cost, the clients' view of the server's per-iteration measure."""
    prefills = first_token_times(requests_)
    return [
        g
        for r in requests_
        for g, end in zip(r["gaps_s"], r["gap_times_s"], strict=True)
        if not spans_a_prefill(end, g, prefills)
    ]


def summarize(result: dict, objective_ms: float) -> dict:
    """One mode's figures: client latencies, attainment, finetune throughput."""
    reqs = result["run"]["requests"]
    ok = [r for r in reqs if r["error"] is None]
    gaps = [g for r in ok for g in r["gaps_s"]]
    decode_only = decode_gaps(reqs)
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    limit = objective_ms / 1e3

    def ms(values, q):
        return None if not values else round(quantile(values, q) * 1e3, 3)

    before, after = result["counters"]["before"], result["counters"]["after"]
    wall = result["run"]["wall_s"]
    if after is not None:
        iterations = after["iterations"] - before["iterations"]
        within = after["within_slo"] - before["within_slo"]
        per_iteration = within / iterations if iterations else None
        tokens = after["finetune_tokens"] - before["finetune_tokens"]
        # misses with finetune in the iteration: the ones the mode may be blamed for
        caused = after["misses_with_finetune"] - before["misses_with_finetune"]
        source = "server"
    else:  # plain SGLang measures no iterations: each client gap without a prefill is one
        within = sum(g <= limit for g in decode_only)
        per_iteration = within / len(decode_only) if decode_only else None
        iterations, tokens, caused, source = len(decode_only), 0, 0, "client decode gaps"
    per_request = sum(all(g <= limit for g in r["gaps_s"]) for r in ok) / len(ok) if ok else None
    return {
        "tpot_p50_ms": ms(gaps, 0.5),
        "tpot_p99_ms": ms(gaps, 0.99),
        "ttft_p50_ms": ms(ttfts, 0.5),
        "ttft_p99_ms": ms(ttfts, 0.99),
        "slo_attainment": {
            "iterations": per_iteration,
            "requests": per_request,
            "gaps": sum(g <= limit for g in gaps) / len(gaps) if gaps else None,
            "decode_gaps": (
                sum(g <= limit for g in decode_only) / len(decode_only) if decode_only else None
            ),
            "iterations_measured": iterations,
            "misses_with_finetune": caused,
            "source": source,
        },
        "finetune_tokens_per_s": tokens / wall if wall else 0.0,
        "finetune_tokens": tokens,
        "requests_completed": len(ok),
        "requests_failed": len(reqs) - len(ok),
        "errors": sorted({r["error"] for r in reqs if r["error"]})[:5],
        "wall_s": wall,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_markdown(report: dict, path: Path) -> None:
    modes = report["modes"]
    baselines = [m for m in modes if m not in (str(Mode.HARLI), str(Mode.OFF))]
    best = max((modes[m]["finetune_tokens_per_s"] for m in baselines), default=0.0)
    # a baseline that misses the objective buys its throughput with decode's latency
    keeping = [m for m in baselines if meets_objective(modes[m])]
    best_keeping = max((modes[m]["finetune_tokens_per_s"] for m in keeping), default=0.0)
    host = report["machine"]
    gpu = f", {host['gpu']}" if "gpu" in host else ""
    lines = [
        f"# Trace replay: {report['trace']['trace']} trace, objective "
        f"{report['objective_ms']:.2f} ms",
        "",
        f"Model `{report['model']}`; machine: {host['processor']}, {host['cpus']} CPUs{gpu}; "
        f"{report['date']}. Trace scaling: "
        + ", ".join(f"{k} {v}" for k, v in report["trace"].items())
        + f"; {report['requests']} requests.",
        "",
        "| mode | TPOT p50 / p99 (ms) | TTFT p50 / p99 (ms) | iterations within S | gaps within "
        "S | requests within S | finetune tok/s | vs best baseline | vs best baseline within "
        "S | completed / failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in modes.items():
        att = m["slo_attainment"]
        ratios = [
            "-" if mode == str(Mode.OFF) or not b else f"{m['finetune_tokens_per_s'] / b:.2f}x"
            for b in (best, best_keeping)
        ]
        lines.append(
            f"| {mode} | {m['tpot_p50_ms']} / {m['tpot_p99_ms']} | {m['ttft_p50_ms']} / "
            f"{m['ttft_p99_ms']} | {_pct(att['iterations'])} ({att['source']}) | "
            f"{_pct(att['gaps'])} | {_pct(att['requests'])} | "
            f"{m['finetune_tokens_per_s']:.1f} | {ratios[0]} | {ratios[1]} | "
            f"{m['requests_completed']} / {m['requests_failed']} |"
        )
    lines += [
        "",
        "Iterations within S: the server's own per-iteration measurement of its decode "
        "iterations (plain SGLang, `off`, has none: its client gaps with no prefill inside "
        "stand in). Gaps within S: every streamed inter-token gap the clients saw, the same "
        "measure for every mode, including the gaps another request's prefill lengthened "
        "(SGLang runs a prefill between two decode iterations; no co-run mode causes or can "
        "avoid those). Requests within S: completed requests whose every gap met S. TPOT: the "
        "inter-token gaps. Finetune tok/s: target tokens of finished optimizer steps over the "
        "mode's wall time. The best baseline is the best of the modes other than harli and "
        f"off; within S, the best of those whose iterations met S {OBJECTIVE_KEPT:.0%} of the "
        "time.",
    ]
    path.write_text("\n".join(lines) + "\n")


def meets_objective(mode: dict) -> bool:
    share = mode["slo_attainment"]["iterations"]
    return share is not None and share >= OBJECTIVE_KEPT


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


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
    parser.add_argument("--n-epochs", type=int, default=10_000, help="the job's (it is cancelled)")
    parser.add_argument("server_args", nargs="*", help="after --: more flags for every server")


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """TraceScaling's fields as flags (shared with the simulation)."""
    defaults = TraceScaling()
    parser.add_argument("--trace", default=defaults.trace, help="conv or code (Azure 2023)")
    parser.add_argument("--rate-scale", type=float, default=defaults.rate_scale)
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--start-s", type=float, default=defaults.start_s)
    parser.add_argument("--max-context-tokens", type=int, default=defaults.max_context_tokens)
    parser.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)


def scaling_of(args) -> TraceScaling:
    return TraceScaling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TraceScaling)})


def parse_modes(text: str | None, has_cuda: bool) -> list[Mode]:
    if text is None:
        return list(GPU_MODES if has_cuda else CPU_MODES)
    modes = [Mode(m.strip()) for m in text.split(",") if m.strip()]
    if Mode.AUTO in modes or len(set(modes)) != len(modes):
        raise ValueError("--modes: each concrete mode at most once")
    # off first: the objective is calibrated on plain SGLang, and decode alone is the reference
    return sorted(modes, key=lambda m: m != Mode.OFF)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s replay] %(message)s")
    try:
        scaling = scaling_of(args)
        from sglang_harli.srt.cpu import cuda_available

        modes = parse_modes(args.modes, cuda_available())
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
    results = {}
    with tempfile.TemporaryDirectory(prefix="harli-replay-") as tmp:
        workdir = Path(tmp)
        for mode in modes:
            try:
                results[str(mode)] = run_mode(args, mode, trace, objective, workdir)
            except (RuntimeError, TimeoutError, requests.RequestException) as exc:
                logger.error("mode %s could not run: %s", mode, exc)
                results[str(mode)] = {"mode": str(mode), "error": str(exc)}
                if "ms" not in objective:  # off failed before calibrating: nothing to compare
                    print(f"replay: error: no objective: {exc}", file=sys.stderr)
                    return 1
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "model": next((r["model"] for r in results.values() if "model" in r), None),
        "trace": dataclasses.asdict(scaling),
        "requests": len(trace),
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
    from sglang_harli.bench import plots

    plots.write_all(report, results, args.out)
    print((args.out / "report.md").read_text())
    failed = report["modes_failed"] or any(m["requests_failed"] for m in report["modes"].values())
    return 1 if failed else 0
