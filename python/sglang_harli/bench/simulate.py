"""Simulate a fleet of decode instances over hours of a trace: finetune throughput and SLO per mode.

    python -m sglang_harli.bench simulate --profile P.json --out DIR [--replay REPORT.json]
        [--modes off,idle-only,time-sliced,harli] [--instances N] [--hours H]
        [--trace conv|code --rate-scale X --duration-s S --start-s S --max-context-tokens N
         --max-output-tokens N] [--objective-ms S] [--margin F] [--finetune-budget-ms MS]
        [--idle-quantum-ms MS] [--start-from-profile] [--off-speed X] [--model-path M]
        [--workers K] [--seed N]

Each instance is a discrete-event simulation of one SGLang decode server running the server's
own co-run loop and policy on a simulated clock (:mod:`.instance`), on a machine drawn from a
latency profile (:mod:`.machine`), training the replay's job as the server cuts it into units
(:mod:`.job_shape`). Instance ``i`` of ``N`` replays the trace from an offset ``i / N`` of the
way through it (wrapping around at its end), at the same ``--rate-scale``: every instance sees
the load one replayed server saw, at a different time of the trace, rather than a 1/N share of
it (thinning a trace N ways smooths its bursts and lowers each server's load, which is not what
the replay measured). Every mode sees the same arrivals and the same random draws.

``--replay REPORT`` takes the trace window, the objective, the time slice, the job and plain
SGLang's speed (its calibration on the off server) from a replay report (``python -m
sglang_harli.bench replay``) and sets the simulation beside what was measured: the validation
of the simulation on the machine the replay ran on (its clock then stops with the last request,
as the replay's does). The servers of a replay learn online (no ``--harli-profile``), so the
simulated ones do too unless ``--start-from-profile``. See docs/simulation.md.

Outputs in ``--out``: ``report.json`` (per mode; the simulator's own speed, in instance-hours
simulated per wall-clock second) and ``report.md``; ``--json`` prints the summary on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from sglang_harli import durable
from sglang_harli.bench.instance import Instance, InstanceConfig, InstanceResult
from sglang_harli.bench.job_shape import (
    JobShape,
    embedded_model_path,
    job_from_chats,
    job_from_numbers,
)
from sglang_harli.bench.machine import Machine
from sglang_harli.bench.modes import SIMULATED, parse_modes
from sglang_harli.bench.report import host
from sglang_harli.bench.trace import (
    TraceRequest,
    TraceScaling,
    add_trace_arguments,
    load_trace,
    trace_duration_s,
)
from sglang_harli.bench.workload import JOB_PAIRS
from sglang_harli.config import HarliConfig, Mode
from sglang_harli.corun.predictor import PROFILE_FORMAT
from sglang_harli.corun.stats import DecodeStats

TRACE_FIELDS = [f.name for f in dataclasses.fields(TraceScaling)]
# what the validation compares, and how close is close (the 15%)
TOLERANCE = 0.15
# A replay calibrates its objective on the off server (plain SGLang) before replaying: the
# median gap of two streams of loadgen's short prompts, 48 new tokens each. In the middle of
# those streams a decode iteration has this shape.
CALIBRATION = DecodeStats(batch_size=2, seq_lens_sum=2 * 30, seq_len_max=30)
# The most requests one run may simulate over the fleet (per mode). Every instance's arrivals are
# built before it runs (about 150 bytes each; a run with workers also copies them to each
# process), and each pass over the recorded trace is a loop step: an unbounded duration or
# rate scale would loop for hours and take gigabytes (--rate-scale 1e12 took 2 GB before it
# was stopped). The runs in docs/benchmarks.md simulate about 16,000 requests; 8 instances for
# a day at the recorded rate, 3.8 million.
MAX_FLEET_REQUESTS = 5_000_000


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """Everything one simulation run needs, picklable for worker processes."""

    scaling: TraceScaling
    modes: tuple[Mode, ...]
    instances: int
    objective_s: float
    margin: float
    budget_s: float
    idle_quantum_s: float
    start_from_profile: bool
    seed: int
    # a replay's clock stops when its last request is done (its wall time); a fleet's runs to
    # the end of the window, idle (training) after its last request
    stop_with_last_request: bool = False
    off_speed: float = 1.0  # plain SGLang's decode and prefill durations over the profile's


@functools.cache
def trace_period_s(trace: str) -> float:
    """How long one pass of a recorded trace lasts, unscaled, when it repeats: its span plus
    one mean gap, so that its first request follows its last as the trace's requests follow
    each other (not at the same instant)."""
    span, count = trace_duration_s(trace), len(load_trace(TraceScaling(trace, duration_s=1e12)))
    return span * count / (count - 1)


def expected_requests(scaling: TraceScaling) -> float:
    """About how many requests one instance replays: the trace's passes its duration covers."""
    count = len(load_trace(TraceScaling(scaling.trace, duration_s=1e12)))
    return count * scaling.duration_s * scaling.rate_scale / trace_period_s(scaling.trace)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def instance_arrivals(scaling: TraceScaling, offset_s: float) -> list[TraceRequest]:
    """The trace from ``offset_s`` (unscaled, into the recorded trace) for ``duration_s``,
    wrapping around to its start as often as the duration needs."""
    period = trace_period_s(scaling.trace)
    out: list[TraceRequest] = []
    covered, start = 0.0, offset_s % period
    while covered < scaling.duration_s:
        left = scaling.duration_s - covered
        window = dataclasses.replace(
            scaling, start_s=start, duration_s=min(left, (period - start) / scaling.rate_scale)
        )
        out += [dataclasses.replace(r, arrival_s=r.arrival_s + covered) for r in load_trace(window)]
        covered += (period - start) / scaling.rate_scale
        start = 0.0
    return out


def _simulate_one(
    task: tuple[Mode, int, FleetConfig, dict, JobShape, list[TraceRequest]],
) -> tuple[Mode, int, InstanceResult, float]:
    mode, index, fleet, profile, job, arrivals = task
    began = time.perf_counter()
    config = InstanceConfig(
        mode=mode,
        objective_s=fleet.objective_s,
        margin=fleet.margin,
        budget_s=fleet.budget_s,
        idle_quantum_s=fleet.idle_quantum_s,
        start_from_profile=fleet.start_from_profile,
        seed=fleet.seed * 100_003 + index,  # the same draws for every mode
        sglang_speed=fleet.off_speed if mode == Mode.OFF else 1.0,
    )
    simulated = Machine.from_profile(profile, job.model)
    until_s = 0.0 if fleet.stop_with_last_request else fleet.scaling.duration_s
    result = Instance(config, simulated, job, profile).run(arrivals, until_s)
    return mode, index, result, time.perf_counter() - began


def simulate(
    fleet: FleetConfig, profile: dict, job: JobShape, workers: int = 1
) -> dict[Mode, tuple[InstanceResult, float]]:
    """Per mode: the instances' results merged, and the CPU seconds they took."""
    length = trace_period_s(fleet.scaling.trace)
    arrivals = [
        instance_arrivals(fleet.scaling, fleet.scaling.start_s + i * length / fleet.instances)
        for i in range(fleet.instances)
    ]
    tasks = [
        (mode, i, fleet, profile, job, arrivals[i])
        for mode in fleet.modes
        for i in range(fleet.instances)
    ]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_simulate_one, tasks))
    else:
        done = [_simulate_one(task) for task in tasks]
    out: dict[Mode, tuple[InstanceResult, float]] = {}
    for mode, _, result, seconds in done:
        merged, spent = out.get(mode, (InstanceResult(), 0.0))
        merged.merge(result)
        out[mode] = (merged, spent + seconds)
    return out


def summarize(mode: Mode, r: InstanceResult, fleet: FleetConfig) -> dict[str, Any]:
    """One mode's figures, named as the replay's report names them."""

    def ms(hist, q):
        value = hist.quantile(q)
        return None if value is None else round(value * 1e3, 3)

    gaps_share = r.gaps_within / r.gaps.total if r.gaps.total else None
    if mode == Mode.OFF:  # no co-run loop measures iterations: each gap is one (as the replay)
        per_iteration, measured, source = gaps_share, r.gaps.total, "gaps"
    else:
        per_iteration = r.within_slo / r.iterations if r.iterations else None
        measured, source = r.iterations, "co-run loop"
    seconds = r.simulated_s
    return {
        "tpot_p50_ms": ms(r.gaps, 0.5),
        "tpot_p99_ms": ms(r.gaps, 0.99),
        "ttft_p50_ms": ms(r.ttft, 0.5),
        "ttft_p99_ms": ms(r.ttft, 0.99),
        "slo_attainment": {
            "iterations": per_iteration,
            "requests": r.requests_within / r.requests_completed if r.requests_completed else None,
            "gaps": gaps_share,
            "iterations_measured": measured,
            "source": source,
        },
        "finetune_tokens_per_s": r.finetune_tokens / seconds if seconds else 0.0,
        "fleet_finetune_tokens_per_s": fleet.instances * r.finetune_tokens / seconds
        if seconds
        else 0.0,
        "finetune_tokens": r.finetune_tokens,
        "finetune_steps": r.finetune_steps,
        "misses_with_finetune": r.misses_with_finetune,
        "slack_used": r.finetune_s / r.slack_s if r.slack_s else None,
        "idle_share": r.idle_s / seconds if seconds else None,
        "requests": r.requests,
        "requests_completed": r.requests_completed,
        "decode_iterations": r.decode_iterations,
        "simulated_instance_hours": seconds / 3600,
    }


def compare(simulated: dict[str, dict], measured: dict[str, dict]) -> dict[str, dict]:
    """Per mode both ran: the simulation's figures beside the replay's, and their errors
    (relative for throughput; for attainment, a share, the difference in points of share)."""
    out = {}
    for mode, sim in simulated.items():
        real = measured.get(mode)
        if real is None:
            continue
        row: dict[str, Any] = {}
        s_tok, r_tok = sim["finetune_tokens_per_s"], real["finetune_tokens_per_s"]
        row["finetune_tokens_per_s"] = {
            "simulated": s_tok,
            "measured": r_tok,
            "relative_error": (s_tok - r_tok) / r_tok if r_tok else None,
        }
        for key in ("iterations", "requests"):
            s_att, r_att = sim["slo_attainment"][key], real["slo_attainment"][key]
            row[f"attainment_{key}"] = {
                "simulated": s_att,
                "measured": r_att,
                "error": None if s_att is None or r_att is None else s_att - r_att,
            }
        for key in ("tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms"):
            row[key] = {"simulated": sim[key], "measured": real[key]}
        row["within_tolerance"] = _within(row)
        out[mode] = row
    return out


def _within(row: dict) -> bool:
    tok = row["finetune_tokens_per_s"]
    ok_tok = (
        abs(tok["relative_error"]) <= TOLERANCE
        if tok["relative_error"] is not None
        else tok["simulated"] == 0
    )
    att = row["attainment_iterations"]["error"]
    return ok_tok and att is not None and abs(att) <= TOLERANCE


# --- inputs ------------------------------------------------------------------------------------


def load_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a profile, a replay's report)."""
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object but a {type(value).__name__}")
    return value


def load_profile(path: Path) -> dict:
    profile = load_json_object(path)
    if profile.get("format") != PROFILE_FORMAT or not profile.get("decode"):
        raise ValueError(f"{path} is not a {PROFILE_FORMAT} profile with decode rows")
    if not profile.get("units"):
        raise ValueError(f"{path} has no finetune units: record it with --train")
    return profile


def job_shape(args, replay: dict | None, profile: dict) -> JobShape:
    """The job every instance trains: explicit numbers, else the replay's job (its chats,
    tokenized by the model's tokenizer, with its resolved hyperparameters). The model is
    ``--model-path``, else the embedded one the profile was measured on."""
    model_path = args.model_path or embedded_model_path(profile["key"]["model"])
    if args.job_seq_tokens is not None:
        shape = job_from_numbers(
            args.job_seq_tokens, args.job_target_tokens, args.job_batch_size, model_path
        )
    else:
        job = (replay or {}).get("job") or {}
        hyperparameters = dict(job.get("hyperparameters") or {"n_epochs": 10_000})
        shape = job_from_chats(JOB_PAIRS, model_path, hyperparameters)
    return dataclasses.replace(shape, checkpoint_every=args.checkpoint_every)


def fleet_config(args, replay: dict | None) -> FleetConfig:
    """Flags first, then the replay's settings, then the server's defaults."""
    fields = dict((replay or {}).get("trace") or {})
    for name in TRACE_FIELDS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.hours is not None:
        fields["duration_s"] = args.hours * 3600
    scaling = TraceScaling(**fields)
    objective_ms = (
        args.objective_ms or (replay or {}).get("objective_ms") or HarliConfig.tpot_slo_ms
    )
    budget_ms = (
        args.finetune_budget_ms
        or (replay or {}).get("time_slice_ms")
        or HarliConfig.finetune_budget_ms
    )
    if args.modes is not None:
        modes = parse_modes(args.modes, SIMULATED)
    elif replay is not None:
        modes = [Mode(m) for m in replay["modes"]]
    else:
        modes = parse_modes(None, SIMULATED)
    if any(m not in (Mode.OFF, Mode.IDLE_ONLY, Mode.TIME_SLICED, Mode.HARLI) for m in modes):
        raise ValueError("the simulation runs off, idle-only, time-sliced and harli (CPU modes)")
    # a zero idle quantum never moves the simulated clock (the run hangs), NaN compares false
    # everywhere, and the server refuses both (config.py)
    for name, value in (
        ("--objective-ms", objective_ms),
        ("--finetune-budget-ms", budget_ms),
        ("--idle-quantum-ms", args.idle_quantum_ms),
    ):
        _check_positive(name, value)
    if not 0 <= args.margin < 1:
        raise ValueError(f"--margin must be in [0, 1), got {args.margin}")
    if args.instances < 1 or args.workers < 1:
        raise ValueError("--instances and --workers must be >= 1")
    expected = args.instances * expected_requests(scaling)
    if expected > MAX_FLEET_REQUESTS:
        raise ValueError(
            f"{args.instances} instance(s) x {scaling.duration_s:g} s at rate scale "
            f"{scaling.rate_scale:g} would simulate about {expected:.3g} requests, more than "
            f"{MAX_FLEET_REQUESTS:,}: shorten --hours/--duration-s or lower --rate-scale or "
            "--instances"
        )
    return FleetConfig(
        scaling=scaling,
        modes=tuple(modes),
        instances=args.instances,
        objective_s=objective_ms / 1e3,
        margin=args.margin,
        budget_s=budget_ms / 1e3,
        idle_quantum_s=args.idle_quantum_ms / 1e3,
        start_from_profile=args.start_from_profile,
        seed=args.seed,
        stop_with_last_request=replay is not None,
    )


def off_speed(args, replay: dict | None, machine: Machine) -> float:
    """Plain SGLang's decode and prefill durations over the profile's (a harli server's, with
    the LoRA serving harli mode turns on): ``--off-speed``, else the replay's calibration on
    its off server over what the profile predicts for the same decode, else 1."""
    if args.off_speed is not None:
        _check_positive("--off-speed", args.off_speed)
        return args.off_speed
    solo_ms = (replay or {}).get("solo_gap_ms")
    speed = solo_ms / 1e3 / machine.decode_s(CALIBRATION) if solo_ms else 1.0
    _check_positive("the replay's solo_gap_ms over the profile's decode", speed)
    return speed


# --- the report --------------------------------------------------------------------------------


def write_markdown(report: dict, path: Path) -> None:
    speed = report["speed"]
    lines = [
        f"# Fleet simulation: {report['instances']} instance(s) x "
        f"{report['trace']['duration_s'] / 3600:.3g} h of the {report['trace']['trace']} trace, "
        f"objective {report['objective_ms']:.2f} ms",
        "",
        "Trace scaling: "
        + ", ".join(f"{k} {v}" for k, v in report["trace"].items())
        + f". Profile `{report['profile']}` (spread: {report['spread_source']}; the "
        f"scheduler's time between idle quanta {report['idle_gap_ms']:.2f} ms); servers "
        + ("start from the profile" if report["start_from_profile"] else "learn online")
        + f". Job: {report['job']['target_tokens_per_step']:.1f} target tokens per step, "
        f"{report['job']['units_per_step']} units per step.",
        "",
        "| mode | TPOT p50 / p99 (ms) | TTFT p50 / p99 (ms) | iterations within S | requests "
        "within S | finetune tok/s per instance | fleet tok/s | idle share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in report["modes"].items():
        att = m["slo_attainment"]
        lines.append(
            f"| {mode} | {m['tpot_p50_ms']} / {m['tpot_p99_ms']} | {m['ttft_p50_ms']} / "
            f"{m['ttft_p99_ms']} | {_pct(att['iterations'])} ({att['source']}) | "
            f"{_pct(att['requests'])} | {m['finetune_tokens_per_s']:.1f} | "
            f"{m['fleet_finetune_tokens_per_s']:.1f} | {_pct(m['idle_share'])} |"
        )
    lines += [
        "",
        f"Simulator speed: {speed['instance_hours_per_s']:.3g} instance-hours per wall-clock "
        f"second ({speed['instance_hours']:.3g} instance-hours of {len(report['modes'])} "
        f"mode(s) in {speed['wall_s']:.1f} s, {speed['workers']} worker(s)).",
    ]
    if report.get("validation"):
        lines += [
            "",
            "## Against the replay",
            "",
            "| mode | finetune tok/s sim / replay (error) | iterations within S sim / replay | "
            "requests within S sim / replay | TPOT p50 sim / replay | within 15% |",
            "|---|---|---|---|---|---|",
        ]
        for mode, v in report["validation"].items():
            tok = v["finetune_tokens_per_s"]
            err = "-" if tok["relative_error"] is None else f"{100 * tok['relative_error']:+.1f}%"
            it, rq = v["attainment_iterations"], v["attainment_requests"]
            lines.append(
                f"| {mode} | {tok['simulated']:.1f} / {tok['measured']:.1f} ({err}) | "
                f"{_pct(it['simulated'])} / {_pct(it['measured'])} | {_pct(rq['simulated'])} / "
                f"{_pct(rq['measured'])} | {v['tpot_p50_ms']['simulated']} / "
                f"{v['tpot_p50_ms']['measured']} | {'yes' if v['within_tolerance'] else 'no'} |"
            )
    path.write_text("\n".join(lines) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# --- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=Path, required=True, help="the machine's profile")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument(
        "--replay", type=Path, help="a replay's report.json to simulate and compare"
    )
    parser.add_argument("--modes", help="comma-separated (default: the replay's, or all CPU modes)")
    add_trace_arguments(parser)
    # None: not given, so the replay's value (or TraceScaling's default) applies
    parser.set_defaults(**dict.fromkeys(TRACE_FIELDS))
    parser.add_argument("--hours", type=float, help="simulated duration (overrides --duration-s)")
    parser.add_argument("--instances", type=int, default=1, help="decode instances (default 1)")
    parser.add_argument(
        "--objective-ms", type=float, help="TPOT objective S (default: the replay's)"
    )
    parser.add_argument("--margin", type=float, default=HarliConfig.slo_margin)
    parser.add_argument(
        "--finetune-budget-ms", type=float, help="time-sliced's slice (default: the replay's)"
    )
    parser.add_argument("--idle-quantum-ms", type=float, default=HarliConfig.idle_quantum_ms)
    parser.add_argument("--checkpoint-every", type=int, default=HarliConfig.checkpoint_every)
    parser.add_argument(
        "--start-from-profile",
        action="store_true",
        help="the simulated servers load the profile (--harli-profile); default: learn online",
    )
    parser.add_argument(
        "--off-speed",
        type=float,
        help="plain SGLang's decode and prefill durations over the profile's (default: from "
        "the replay's calibration, else 1)",
    )
    parser.add_argument(
        "--model-path", help="the model (shape, tokenizer); default: the profile's embedded one"
    )
    parser.add_argument("--job-seq-tokens", type=int, help="a job of identical sequences...")
    parser.add_argument("--job-target-tokens", type=int, help="...of this many target tokens")
    parser.add_argument("--job-batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="processes (instances in parallel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print report.json, not report.md")


def run(args) -> dict:
    """The report of one simulation (what ``main`` writes)."""
    replay = load_json_object(args.replay) if args.replay else None
    profile = load_profile(args.profile)
    if (args.job_seq_tokens is None) != (args.job_target_tokens is None):
        raise ValueError("give --job-seq-tokens and --job-target-tokens together")
    try:
        fleet = fleet_config(args, replay)
        job = job_shape(args, replay, profile)
        simulated = Machine.from_profile(profile, job.model)
    except (TypeError, AttributeError) as exc:
        # a field of the profile or the replay's report of the wrong JSON type: bad input
        raise ValueError(f"a malformed profile or replay report ({exc})") from None
    fleet = dataclasses.replace(fleet, off_speed=off_speed(args, replay, simulated))
    began = time.perf_counter()
    results = simulate(fleet, profile, job, args.workers)
    wall = time.perf_counter() - began
    modes = {str(m): summarize(m, r, fleet) for m, (r, _) in results.items()}
    hours = sum(m["simulated_instance_hours"] for m in modes.values())
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": host(),  # the simulator's, not the simulated one's
        "profile": str(args.profile),
        "profile_key": profile["key"],
        "spread_source": simulated.spread_source,
        "tail_ms": simulated.tail_s * 1e3,
        "idle_gap_ms": simulated.idle_gap_s * 1e3,
        "off_speed": fleet.off_speed,
        "start_from_profile": fleet.start_from_profile,
        "trace": dataclasses.asdict(fleet.scaling),
        "instances": fleet.instances,
        "objective_ms": fleet.objective_s * 1e3,
        "margin": fleet.margin,
        "time_slice_ms": fleet.budget_s * 1e3,
        "idle_quantum_ms": fleet.idle_quantum_s * 1e3,
        "seed": fleet.seed,
        "job": job.to_dict(),
        "modes": modes,
        "speed": {
            "wall_s": wall,
            "instance_hours": hours,
            "instance_hours_per_s": hours / wall if wall else None,
            "cpu_s_per_mode": {str(m): round(s, 3) for m, (_, s) in results.items()},
            "workers": args.workers,
        },
    }
    if replay is not None:
        report["replay"] = str(args.replay)
        report["validation"] = compare(modes, replay.get("modes", {}))
    return report


def main(args) -> int:
    try:
        report = run(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(args.out / "report.json", json.dumps(report, indent=2).encode())
    write_markdown(report, args.out / "report.md")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print((args.out / "report.md").read_text())
    return 0
