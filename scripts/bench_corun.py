"""What Harli costs decode, measured side by side on one machine.

Three servers run at once and get the same sequential greedy requests (one at a time, so every
decode iteration has batch size 1), in turn, so that drift in the machine's load hits all alike:
``--harli-mode off`` (SGLang's own scheduler), ``--harli-mode off`` with the LoRA serving flags
Harli mode adds (to tell SGLang's LoRA-serving cost from ours), and the default mode.

1. all idle: the time per output token (TPOT) of each, and the hooks' own time per decode
   iteration from ``GET /harli/status``;
2. then a fine-tuning job trains on the Harli server: its TPOT again, and the job's progress.

TPOT comes from two request lengths: (t(long) - t(short)) / (long - short) tokens, so prefill
and HTTP cost cancel out. Ratios are what to compare; absolute times say only what this machine
does (a CPU one here).

    .venv/bin/python scripts/bench_corun.py [--requests 8] [--long 64] [--short 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sglang_harli.bench.server import harli_server
from sglang_harli.bench.workload import SHORT_CHATS
from sglang_harli.client import HarliClient
from sglang_harli.lora_serving import lora_serving_flags
from sglang_harli.tiny_model import ensure_tiny_model

PROMPTS = ["def hello(world):", "import os, sys", "class Foo:", "x = [i for i in"]


def timed_generate(server, prompt: str, tokens: int) -> float:
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    start = time.perf_counter()
    server.post("/generate", body)
    return time.perf_counter() - start


def tpot_ms(server, prompt: str, long: int, short: int) -> float:
    """One sample of the time per output token, in ms."""
    t_long = timed_generate(server, prompt, long)
    t_short = timed_generate(server, prompt, short)
    return (t_long - t_short) / (long - short) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--long", type=int, default=64)
    parser.add_argument("--short", type=int, default=4)
    args = parser.parse_args()
    model = str(ensure_tiny_model())
    workdir = Path(tempfile.mkdtemp(prefix="bench-corun-"))
    samples: dict[str, list[float]] = {"off": [], "off_lora": [], "harli": [], "training": []}
    off = harli_server(workdir / "off.log", "--harli-mode", "off", "--model-path", model)
    lora_flags = lora_serving_flags(lambda flag: False)
    off_lora = harli_server(
        workdir / "off-lora.log", "--harli-mode", "off", "--model-path", model, *lora_flags
    )
    state = str(workdir / "state")
    harli = harli_server(workdir / "harli.log", "--model-path", model, "--harli-state-dir", state)
    try:
        for server in (off, off_lora, harli):
            server.wait_ready()
        client = HarliClient(harli.url)
        before = client.scheduler()
        for i in range(args.requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            samples["off"].append(tpot_ms(off, prompt, args.long, args.short))
            samples["off_lora"].append(tpot_ms(off_lora, prompt, args.long, args.short))
            samples["harli"].append(tpot_ms(harli, prompt, args.long, args.short))
        after = client.scheduler()
        job_id = client.start_training(model, SHORT_CHATS, first_step_timeout_s=120)["id"]
        step0 = client.job(job_id)["step"]
        t0 = time.perf_counter()
        for i in range(args.requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            samples["training"].append(tpot_ms(harli, prompt, args.long, args.short))
        steps = client.job(job_id)["step"] - step0
        train_s = time.perf_counter() - t0
        client.cancel(job_id)
        mode = after["mode"]
    finally:
        for server in (off, off_lora, harli):
            server.stop()
    results = {name: statistics.median(values) for name, values in samples.items()}

    # all hook time spent while phase 2 ran (idle passes included), per decode iteration
    iterations = after["decode_iterations"] - before["decode_iterations"]
    hook_us = {
        name: (timer["total_us"] - before["hooks"].get(name, {"total_us": 0.0})["total_us"])
        / iterations
        for name, timer in after["hooks"].items()
    }
    per_iteration_us = sum(hook_us.values())
    # with no job, the finetune slots only look for one (a store query every 0.5 s at most)
    polling_us = (
        sum(
            timer["total_us"] - before["finetune"].get(name, {"total_us": 0.0})["total_us"]
            for name, timer in after["finetune"].items()
        )
        / iterations
    )
    print(f"decode TPOT, median of {args.requests} samples ({args.long} vs {args.short} tokens):")
    labels = {
        "off": "--harli-mode off",
        "off_lora": "off + LoRA serving",
        "harli": f"{mode}, no job",
        "training": f"{mode}, job training",
    }
    for key, label in labels.items():
        ratio = results[key] / results["off"]
        print(f"  {label:<26} {results[key]:8.2f} ms   x{ratio:.3f}")
    print(
        f"hooks per decode iteration: {per_iteration_us:.1f} us "
        f"({', '.join(f'{k} {v:.1f} us' for k, v in hook_us.items())}) = "
        f"{per_iteration_us / 1e3 / results['off'] * 100:.2f}% of the baseline TPOT"
    )
    print(
        f"looking for jobs, per decode iteration: {polling_us:.1f} us; Harli over off + LoRA "
        f"serving: x{results['harli'] / results['off_lora']:.3f}"
    )
    print(f"fine-tuning while measured: {steps} optimizer steps in {train_s:.1f} s")


if __name__ == "__main__":
    main()
