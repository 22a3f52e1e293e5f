"""Tensor parallelism, measured: what training at TP N costs decode and what it trains, against
TP 1, side by side in one run (one server at a time: a 2-core machine cannot host two fairly).

For each TP size in ``--tp``:

1. plain SGLang at that size (``--harli-mode off``): the median streamed inter-token gap of
   ``--streams`` concurrent greedy streams, and the objective ``S`` = twice that;
2. a Harli server at that size with that ``S``: the same load with no job (the machine's own
   misses), then while a job trains (SLO attainment, misses in iterations that ran finetune,
   finetune tokens/s, SGLang's retractions), then the job alone on the idle server for
   ``--idle-seconds`` (the engine's speed at that size); and what the ranks' exchanges cost
   (``/harli/status``: their count and the ``tp_sync`` hook's time).

All servers serve the tiny model in float32. The JSON report goes to stdout (and ``--out``);
``docs/benchmarks.md`` records runs.

    .venv/bin/python scripts/bench_tp.py [--tp 1 2] [--seconds 12] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sglang_harli.bench.server import harli_server
from sglang_harli.bench.workload import SHORT_CHATS
from sglang_harli.client import HarliClient, corun_delta
from sglang_harli.loadgen import stream_load
from sglang_harli.tiny_model import ensure_tiny_model

DTYPE = ["--dtype", "float32"]


def plain_gap_s(model: Path, tp: int, streams: int, seconds: float, workdir: Path) -> float:
    server = harli_server(
        workdir / f"plain-tp{tp}.log",
        "--harli-mode",
        "off",
        "--model-path",
        str(model),
        "--tp-size",
        str(tp),
        *DTYPE,
    )
    try:
        server.wait_ready()
        stream_load(server.url, 3.0, streams)  # warm-up
        return statistics.median(stream_load(server.url, seconds, streams))
    finally:
        server.stop()


def hooks(server) -> dict:
    return HarliClient(server.url).scheduler()["hooks"]


def sync_us(before: dict, after: dict) -> dict | None:
    """The tp_sync hook between two reads: calls and mean microseconds per call."""
    if "tp_sync" not in after:
        return None
    b = before.get("tp_sync", {"calls": 0, "total_us": 0.0})
    calls = after["tp_sync"]["calls"] - b["calls"]
    return {
        "calls": calls,
        "mean_us": (after["tp_sync"]["total_us"] - b["total_us"]) / max(calls, 1),
    }


def measured(server, streams: int, seconds: float, retractions: list[int] | None = None):
    client = HarliClient(server.url)
    before, h0 = client.corun(), hooks(server)
    stream_load(server.url, seconds, streams, retractions=retractions)
    d = corun_delta(before, client.corun())
    d["tp_sync"] = sync_us(h0, hooks(server))
    d["finetune_tokens_per_s"] = d["finetune_tokens"] / seconds
    d["misses_with_finetune_share"] = d["misses_with_finetune"] / max(d["iterations"], 1)
    return d


def harli_at(model: Path, tp: int, objective_ms: float, args, workdir: Path) -> dict:
    server = harli_server(
        workdir / f"harli-tp{tp}.log",
        "--model-path",
        str(model),
        "--tp-size",
        str(tp),
        "--harli-tpot-slo-ms",
        f"{objective_ms:.3f}",
        "--harli-state-dir",
        str(workdir / f"state-tp{tp}"),
        *DTYPE,
    )
    try:
        server.wait_ready()
        stream_load(server.url, 3.0, args.streams)  # warm-up
        alone = measured(server, args.streams, args.seconds)
        client = HarliClient(server.url)
        job = client.start_training(str(model), SHORT_CHATS, first_step_timeout_s=120)["id"]
        stream_load(server.url, 3.0, args.streams)  # the predictor learns this load's shape
        retractions: list[int] = []
        loaded = measured(server, args.streams, args.seconds, retractions)
        loaded["retractions"] = sum(retractions)
        tokens0 = client.job(job)["trained_tokens"]
        time.sleep(args.idle_seconds)
        idle_tokens = client.job(job)["trained_tokens"] - tokens0
        client.cancel(job)
        status = client.scheduler()
        return {
            "alone": alone,
            "with_job": loaded,
            "idle_tokens_per_s": idle_tokens / args.idle_seconds,
            "tensor_parallel": status["tensor_parallel"],
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workdir", type=Path, help="keep the servers' logs and state here")
    args = parser.parse_args()
    model = ensure_tiny_model()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for tp in args.tp:
            gap_s = plain_gap_s(model, tp, args.streams, args.seconds, workdir)
            objective_ms = 2 * gap_s * 1e3
            print(f"TP {tp}: plain median gap {gap_s * 1e3:.2f} ms", file=sys.stderr)
            report["tp"][tp] = {
                "plain_gap_ms": gap_s * 1e3,
                "objective_ms": objective_ms,
                **harli_at(model, tp, objective_ms, args, workdir),
            }
    first, *rest = args.tp
    base = report["tp"][first]
    report["ratios"] = {
        tp: {
            "plain_gap": report["tp"][tp]["plain_gap_ms"] / base["plain_gap_ms"],
            "finetune_tokens_per_s_with_load": report["tp"][tp]["with_job"]["finetune_tokens_per_s"]
            / max(base["with_job"]["finetune_tokens_per_s"], 1e-9),
            "idle_tokens_per_s": report["tp"][tp]["idle_tokens_per_s"]
            / max(base["idle_tokens_per_s"], 1e-9),
        }
        for tp in rest
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
