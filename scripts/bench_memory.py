"""Unified memory, measured: what a training job borrows from the KV pool under decode load,
what taking it back costs, and whether lending changes the two numbers that judge a co-run
feature (SLO attainment and fine-tuning throughput), side by side.

Two servers, one after the other (a 2-core machine cannot host both fairly), identical but for
``--harli-max-lend-fraction`` (the given fraction, then 0: no arena, the job allocates as it
pleases), ``--rounds`` times in turn, so that drift in the machine's load shows as the spread
between rounds. On each, a job trains until cancelled while, for each decode load (concurrent
greedy streams), requests run for ``--seconds``:

- the KV slots lent (mean and minimum over the phase, from ``GET /harli/status``) and what they
  hold in training tokens: a token's checkpointed inputs are ``layers x hidden`` values, a
  slot's KV ``2 x layers x kv_heads x head_dim`` (for the tiny model one slot per token, for a
  Llama-3-8B shape two slots per token);
- reclaims and their latency, and SGLang's retractions (summed over the requests);
- SLO attainment (``corun.within_slo / corun.iterations`` over the phase) and the job's
  finetune tokens/s (``trained_tokens`` over the phase).

Then a burst: requests needing about 90% of the pool at once, while the job holds most of it.

    .venv/bin/python scripts/bench_memory.py [--pool 8192] [--lend 0.9] [--seconds 15]
        [--loads 0 4 16] [--tokens 64] [--bursts 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from sglang_harli.bench.server import harli_server
from sglang_harli.bench.workload import SHORT_CHATS
from sglang_harli.client import HarliClient
from sglang_harli.tiny_model import ensure_tiny_model


def generate(server, prompt: str, tokens: int) -> int:
    """One greedy request; returns its retractions (SGLang's counter)."""
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    return server.post("/generate", body, timeout=600)["meta_info"]["num_retractions"]


def harli(server) -> dict:
    return HarliClient(server.url).scheduler()


def phase(server, job: str, streams: int, tokens: int, seconds: float) -> dict:
    """``streams`` concurrent request loops for ``seconds``, sampled every 0.2 s."""
    retractions, requests, stop = [0], [0], threading.Event()
    lock = threading.Lock()

    def loop(i: int) -> None:
        n = 0
        while not stop.is_set():
            got = generate(server, f"Stream {i} request {n}: tell me a story.", tokens)
            n += 1
            with lock:
                retractions[0] += got
                requests[0] += 1

    start_status = harli(server)
    client = HarliClient(server.url)
    start_job = client.job(job)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    lent = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        memory = harli(server)["memory"]
        lent.append(memory["kv_lent_slots"] if memory else 0)
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    end_status = harli(server)
    end_job = client.job(job)
    c0, c1 = start_status["corun"], end_status["corun"]
    iterations = c1["iterations"] - c0["iterations"]
    memory = end_status["memory"] or {}
    m0 = (start_status["memory"] or {}).get("kv_lend_stats", {})
    m1 = memory.get("kv_lend_stats", {})
    return {
        "streams": streams,
        "requests": requests[0],
        "retractions": retractions[0],
        "lent_mean": statistics.fmean(lent) if lent else 0,
        "lent_min": min(lent, default=0),
        "reclaims": m1.get("reclaims", 0) - m0.get("reclaims", 0),
        "reclaim_ms": memory.get("kv_reclaim_ms"),
        "attainment": (c1["within_slo"] - c0["within_slo"]) / iterations if iterations else None,
        "iterations": iterations,
        "finetune_tokens_per_s": (end_job["trained_tokens"] - start_job["trained_tokens"])
        / seconds,
    }


def burst(server, pool: int, tokens: int = 210) -> dict:
    """Requests needing about 90% of the pool, all at once."""
    n = int(0.9 * pool) // (tokens + 16)
    before = harli(server)["memory"]
    results = [0] * n

    def one(i):
        results[i] = generate(server, f"Burst {i}: count with me slowly.", tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = harli(server)["memory"]
    return {
        "requests": n,
        "seconds": time.perf_counter() - start,
        "retractions": sum(results),
        "lent_before": before["kv_lent_slots"] if before else 0,
        "reclaimed": (after["kv_lend_stats"]["reclaimed_slots"] if after else 0)
        - (before["kv_lend_stats"]["reclaimed_slots"] if before else 0),
        "reclaim_ms": after["kv_reclaim_ms"] if after else None,
    }


def run(model: Path, lend: float, args, workdir: Path) -> dict:
    server = harli_server(
        workdir / f"server-{lend}.log",
        "--model-path",
        str(model),
        "--harli-state-dir",
        str(workdir / f"state-{lend}"),
        "--max-total-tokens",
        str(args.pool),
        "--harli-max-lend-fraction",
        str(lend),
    ).wait_ready()
    try:
        client = HarliClient(server.url)
        job = client.start_training(str(model), SHORT_CHATS, first_step_timeout_s=120)["id"]
        phases = [phase(server, job, s, args.tokens, args.seconds) for s in args.loads]
        bursts = [burst(server, args.pool) for _ in range(args.bursts if lend else 0)]
        return {"lend": lend, "phases": phases, "bursts": bursts}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--lend", type=float, default=0.9)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    model = ensure_tiny_model()
    config = json.loads((model / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    slot = 2 * layers * config["num_key_value_heads"] * head_dim  # values per KV slot
    per_token = layers * hidden  # checkpointed values per training token
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            workdir = Path(tmp) / f"round-{r}"
            workdir.mkdir()
            rounds.append([run(model, lend, args, workdir) for lend in (args.lend, 0.0)])
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))
    print(f"pool {args.pool} slots; a training token needs {per_token / slot:g} slots")
    for r, (lent, plain) in enumerate(rounds):
        print(f"\nround {r}")
        report(lent, plain, slot, per_token)


def report(lent: dict, plain: dict, slot: int, per_token: int) -> None:
    print(
        "| streams | lent slots (mean / min) | training tokens they hold | reclaims | "
        "retractions | SLO attainment: lend / none | finetune tok/s: lend / none (ratio) |"
    )
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(lent["phases"], plain["phases"], strict=True):
        ratio = (
            a["finetune_tokens_per_s"] / b["finetune_tokens_per_s"]
            if b["finetune_tokens_per_s"]
            else float("nan")
        )
        print(
            f"| {a['streams']} | {a['lent_mean']:.0f} / {a['lent_min']} | "
            f"{a['lent_mean'] * slot / per_token:.0f} | {a['reclaims']} | "
            f"{a['retractions']} + {b['retractions']} | {_pct(a['attainment'])} / "
            f"{_pct(b['attainment'])} | {a['finetune_tokens_per_s']:.0f} / "
            f"{b['finetune_tokens_per_s']:.0f} ({ratio:.2f}) |"
        )
    for i, b in enumerate(lent["bursts"]):
        ms = b["reclaim_ms"] or {}
        print(
            f"burst {i}: {b['requests']} requests in {b['seconds']:.1f} s, {b['retractions']} "
            f"retractions, {b['lent_before']} slots lent before, {b['reclaimed']} reclaimed; "
            f"reclaim ms p50 {_ms(ms.get('p50'))} p99 {_ms(ms.get('p99'))} max {_ms(ms.get('max'))}"
        )


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
