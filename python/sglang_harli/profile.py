"""``python -m sglang_harli.profile``: measure a latency profile on a running Harli server.

The predictor (``corun/predictor.py``) starts from a profile when the server is given one
(``--harli-profile FILE``) and learns online without. This tool drives a grid of decode loads
(concurrent streams x prompt lengths) against the server, optionally while a fine-tuning job
trains (``--train``: a throwaway job, cancelled at the end, so the server also measures its work
units and whole co-run iterations), then reads what the server measured from
``GET /harli/status`` and writes the profile: JSON keyed by model, device, dtype and TP size.

    python -m sglang_harli.profile --url http://127.0.0.1:30000 --out profile.json --train
    python -m sglang_harli.profile --url ... --out profile.json --sweep-shares 0,0.5,1

``--sweep-shares`` measures stage 2's interference table: with a throwaway job training, it
switches the running server (``POST /harli/mode``, no restart) to ``static`` at each share in
turn (share 0: ``idle-only``, decode alone), drives the same decode load at each, and records
decode's slowdown against share 0 and finetune's rate there (``share_sweep``); the server's
predictor learns the table per unit kind from those iterations, and the profile keeps it
(``interference``: loaded with the profile, corrected online). The server's settings are put
back at the end.

It speaks HTTP only (no torch, no SGLang), so it runs from any machine that reaches the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

from sglang_harli import durable
from sglang_harli.bench.workload import JOB_PAIRS
from sglang_harli.client import ClientError, HarliClient, corun_delta
from sglang_harli.corun.predictor import PROFILE_FORMAT
from sglang_harli.loadgen import stream_load

WORDS = "the quick brown fox jumps over the lazy dog while a model decodes tokens".split()


def prompt_of(words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + i) % len(WORDS)] for i in range(words))


def start_job(client: HarliClient, model: str) -> str:
    """A throwaway job that trains until cancelled, so the server measures its units: the trace
    replay's job (``bench/workload.py``), whose chats differ in length, so each unit kind is
    measured at several costs (the predictor fits an overhead and a rate, not a ratio alone)
    and at the costs the replay and the fleet simulation train with."""
    upload = client.upload_chats(JOB_PAIRS, name="profile.jsonl")
    return client.create_job(model, upload["id"], {"n_epochs": 10_000})["id"]


def profile(args: argparse.Namespace) -> dict[str, Any]:
    client = HarliClient(args.url, args.api_key, args.admin_api_key, timeout_s=30)
    url = client.base
    job, sweep = None, None
    if args.train or args.sweep_shares:
        job = start_job(client, client.model_id())
    try:
        if args.sweep_shares:
            sweep = sweep_shares(client, args)
        for streams in args.streams:
            for words in args.prompt_words:
                prompts = [prompt_of(words, seed) for seed in range(streams)]
                gaps = stream_load(url, args.seconds, streams, args.max_new_tokens, prompts)
                print(
                    f"{streams} streams x {words}-word prompts: {len(gaps)} tokens",
                    file=sys.stderr,
                )
        measured = client.scheduler()
        if measured is None:
            raise SystemExit("the server runs no Harli scheduler (--harli-mode off?)")
    finally:
        if job is not None:
            client.cancel(job)
    result = from_status(
        measured, args.min_samples, {"streams": args.streams, "prompt_words": args.prompt_words}
    )
    if sweep is not None:
        result["share_sweep"] = sweep
    return result


def sweep_shares(client: HarliClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per share of ``args.sweep_shares``: the same decode load (``--sweep-streams`` streams
    for ``--seconds``) beside the job's units at that share (``static``; 0: ``idle-only``),
    the client's median inter-token gap, decode's slowdown against share 0, the server's
    attainment there, and finetune's rate (target tokens/s, and the worker's busy fraction)."""
    saved = client.control()
    if saved is None:
        raise SystemExit("the server runs no Harli scheduler (--harli-mode off?)")
    streams = args.sweep_streams
    prompts = [prompt_of(8, seed) for seed in range(streams)]
    rows: list[dict[str, Any]] = []
    try:
        for share in sorted(args.sweep_shares):
            if share == 0:
                client.set_mode("idle-only")
            else:
                client.set_mode("static", static_share=share)
            stream_load(client.base, 1.0, streams, args.max_new_tokens, prompts)  # settle
            before, began = client.corun(), time.monotonic()
            gaps = stream_load(client.base, args.seconds, streams, args.max_new_tokens, prompts)
            after, elapsed = client.corun(), time.monotonic() - began
            delta = corun_delta(before, after)
            gaps.sort()
            row = {
                "share": share,
                "gap_ms": round(gaps[len(gaps) // 2] * 1e3, 3) if gaps else None,
                "attainment": round(delta["attainment"], 4),
                "finetune_tokens_per_s": round(delta["finetune_tokens"] / elapsed, 3),
                "worker_busy": round((after["corun_unit_s"] - before["corun_unit_s"]) / elapsed, 4),
            }
            base = rows[0]["gap_ms"] if rows and rows[0]["share"] == 0 else None
            row["slowdown"] = None if not base or not row["gap_ms"] else row["gap_ms"] / base - 1
            rows.append(row)
            print(f"share {share}: {row}", file=sys.stderr)
    finally:  # the operator's settings back, whatever happened
        client.set_mode(
            saved["mode"],
            tpot_slo_ms=saved["tpot_slo_ms"],
            slo_margin=saved["slo_margin"],
            static_share=saved["static_share"],
            finetune_budget_ms=saved["finetune_budget_ms"],
        )
    return rows


def from_status(measured: dict[str, Any], min_samples: int, grid: dict | None) -> dict[str, Any]:
    """The profile in one scheduler's ``/harli/status`` (what it measured so far): decode
    shapes seen at least ``min_samples`` times, finetune units and co-run iterations. Also how
    the trace replay saves what its harli server measured (``bench/replay.py``)."""
    samples = measured["samples"]
    decode = [row for row in samples["decode"] if row["n"] >= min_samples]
    if not decode:
        raise SystemExit("the server measured no decode iterations: is it serving?")
    return {
        "format": PROFILE_FORMAT,
        "key": measured["profile_key"],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "grid": grid,
        "decode": decode,
        "units": samples["units"],
        "corun": samples["corun"],
        # for the fleet simulation: the rows' spread, SGLang's tail after a decode, its own
        # time between idle quanta (when the job does not train) and prefills
        "quantile_levels": samples.get("quantile_levels"),
        "tail": samples.get("tail"),
        "idle_gap": samples.get("idle_gap"),
        "prefill": samples.get("prefill"),
        # stage 2: decode's slowdown beside units of each kind at each share, as the server's
        # predictor learned it (from --sweep-shares, or whatever ran beside decode)
        "interference": [
            {"kind": kind, "share": float(share), "slowdown": slowdown}
            for kind, points in measured["corun"]["predictor"].get("interference", {}).items()
            for share, slowdown in points.items()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_harli.profile", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--out", required=True, type=Path, help="where to write the profile")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--admin-api-key", default=None, help="the server's admin key (--sweep-shares switches it)"
    )
    parser.add_argument("--streams", type=_ints, default=[1, 2, 4, 8], help="e.g. 1,2,4,8")
    parser.add_argument("--prompt-words", type=_ints, default=[8, 200], help="e.g. 8,200")
    parser.add_argument("--seconds", type=float, default=5.0, help="per grid point")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-samples", type=int, default=3, help="per decode shape kept")
    parser.add_argument(
        "--train", action="store_true", help="also measure finetune units (a throwaway job)"
    )
    parser.add_argument(
        "--sweep-shares",
        type=_shares,
        default=None,
        help="e.g. 0,0.5,1: decode's slowdown and finetune's rate at each share of the device "
        "beside decode (switches the server's mode at runtime; implies --train)",
    )
    parser.add_argument("--sweep-streams", type=int, default=2, help="decode streams per share")
    args = parser.parse_args(argv)
    try:
        result = profile(args)
    except (ClientError, requests.RequestException) as exc:
        print(f"profile: {args.url}: {exc}", file=sys.stderr)
        return 1
    durable.write_bytes(args.out, json.dumps(result, indent=1).encode())
    print(
        f"wrote {args.out}: {len(result['decode'])} decode shapes, {len(result['units'])} unit "
        f"sizes, {len(result['corun'])} co-run iterations, {len(result['interference'])} "
        "interference points",
        file=sys.stderr,
    )
    for row in result.get("share_sweep") or []:
        print(json.dumps(row))
    return 0


def _shares(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of shares: {text}") from None
    if not values or values[0] < 0 or values[-1] > 1:
        raise argparse.ArgumentTypeError(f"shares are fractions in [0, 1]: {text}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return values


if __name__ == "__main__":
    sys.exit(main())
