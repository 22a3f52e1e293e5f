"""The finetune engine alone against Hugging Face transformers + PEFT: trained tokens/s and peak
memory, side by side, as ratios (engine / HF + PEFT).

Both sides train the same model (``--model-path``, loaded in ``--dtype``: float32 on CPU,
bfloat16 on a GPU by default) on the same data (``--batch-size`` random sequences of
``--seq-len`` tokens, seeded; every token after the first is a target), with a rank ``--rank``
LoRA (alpha = 2 x rank, no dropout) on all seven projections of every layer, activation
checkpointing, and one AdamW step (clipped at norm 1) per batch:

- engine: ``BaseModelView.from_hf`` over the loaded model, :class:`Trainer` running its work
  units (checkpointing on, one micro-batch of the whole batch);
- HF + PEFT: ``peft.get_peft_model``, ``gradient_checkpointing_enable`` (non-reentrant), the
  textbook ``model(input_ids, labels=input_ids).loss.backward()``, clip, AdamW.

Each side lives in a fresh subprocess of its own, so its memory is its own. The parent drives
them step by step, alternating (engine, HF, engine, HF, ...) so that drift in the machine's load
hits both: ``--warmup`` steps each, then ``--steps`` timed steps each. Tokens/s is the batch's
tokens (batch x seq-len) per wall-clock second over the timed steps (a step ends with the loss
on the host); ``tokens_per_s_best`` is the same over the fastest step alone, the figure that
other load on a shared machine disturbs least.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the steps minus what was
allocated before the first (model, data, adapters); on CPU, the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` before the first step) minus its resident
set before the first step: the memory the training steps themselves added at their peak
(activations, gradients, AdamW state, allocator slack), not the weights both sides share.

``--profile`` runs one more step per side under ``torch.profiler`` and prints each side's top
ops and its number of ``aten::mm``/``aten::addmm`` calls per step.

    .venv/bin/python scripts/bench_finetune.py --model-path DIR [--steps 6] [--warmup 2]
        [--batch-size 8] [--seq-len 128] [--rank 16] [--device cpu] [--json]
    .venv/bin/python scripts/bench_finetune.py --shape llama3-8b --layers 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIDES = ("engine", "hf_peft")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Llama-3-8B's shape (random weights; --layers of its 32 decoder layers).
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    tie_word_embeddings=False,
)


# --- the worker: one side, in a process of its own ---------------------------------------------


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


class Memory:
    """The memory the steps add at their peak, over what was there before the first one."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def start(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _rss_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base

    @property
    def what(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated over the steps, minus allocated before them"
        return "peak RSS (VmHWM) over the steps, minus RSS before them"


def load_model(args, device, dtype):
    import torch
    import transformers

    if args.shape == "llama3-8b":
        config = transformers.LlamaConfig(**LLAMA3_8B, num_hidden_layers=args.layers or 32)
        torch.manual_seed(0)  # the same random weights on both sides
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of 8B weights
        try:
            with torch.device(device):
                return transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    config = transformers.AutoConfig.from_pretrained(args.model_path)
    if args.layers:
        config.num_hidden_layers = args.layers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_path, config=config, dtype=dtype
    )
    return model.to(device)


def make_data(args, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
    return ids.tolist()


class EngineSide:
    def __init__(self, model, data, args, device):
        from sglang_harli.finetune import (
            BaseModelView,
            Example,
            LoraAdapters,
            LoraConfig,
            TrainConfig,
            Trainer,
        )

        view = BaseModelView.from_hf(model)
        lora = LoraConfig(r=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS)
        adapters = LoraAdapters.create(view.config, lora, device)
        examples = [Example(tuple(ids), (True,) * len(ids)) for ids in data]
        config = TrainConfig(
            lr=1e-4,
            lr_schedule="constant",
            total_steps=10**9,
            global_batch_size=len(examples),
            micro_batch_size=len(examples),
            checkpointing=True,
            shuffle=False,
        )
        self.trainer = Trainer(view, adapters, examples, config)

    def step(self) -> float:
        return self.trainer.run_step().loss


class HfPeftSide:
    def __init__(self, model, data, args, device):
        import peft
        import torch

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS
            ),
        )
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)  # as TrainConfig
        self.ids = torch.tensor(data, device=device)

    def step(self) -> float:
        import torch

        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def profile_step(side, device) -> dict[str, Any]:
    """One step under torch.profiler: the top ops by self time and the matmul call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        side.step()
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    gemms = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
    counts = {e.key: e.count for e in events if e.key in gemms}
    return {"counts": counts, "table": events.table(sort_by=key, row_limit=15)}


def worker(args) -> None:
    """Serve one side: build it, then answer ``step``/``memory``/``profile`` lines on stdin."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = load_model(args, device, dtype)
    data = make_data(args, model.config.vocab_size)
    side = (EngineSide if args.worker == "engine" else HfPeftSide)(model, data, args, device)
    memory = Memory(device)
    memory.start()
    reply = print  # one JSON object per line on stdout, nothing else goes there
    reply(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            start = time.perf_counter()
            loss = side.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            reply(json.dumps({"seconds": time.perf_counter() - start, "loss": loss}), flush=True)
        elif cmd == "memory":
            reply(json.dumps({"peak_bytes": memory.peak(), "what": memory.what}), flush=True)
        elif cmd == "profile":
            reply(json.dumps(profile_step(side, device)), flush=True)
        else:
            return


# --- the parent: both sides, interleaved ---------------------------------------------------


class Worker:
    def __init__(self, side: str, argv: list[str]):
        self.side = side
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (rc {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run(args, argv: list[str]) -> dict[str, Any]:
    workers = {}
    try:
        for side in SIDES:  # built one after the other: loading is not timed
            workers[side] = Worker(side, argv)
        times: dict[str, list[float]] = {s: [] for s in SIDES}
        losses: dict[str, list[float]] = {s: [] for s in SIDES}
        for i in range(args.warmup + args.steps):
            for side in SIDES:  # engine, HF, engine, HF, ...
                out = workers[side].ask("step")
                losses[side].append(out["loss"])
                if i >= args.warmup:
                    times[side].append(out["seconds"])
        memory = {s: workers[s].ask("memory") for s in SIDES}
        profiles = {s: workers[s].ask("profile") for s in SIDES} if args.profile else None
    finally:
        for w in workers.values():
            w.close()
    tokens = args.batch_size * args.seq_len
    result: dict[str, Any] = {
        "model": args.shape or args.model_path,
        "layers": args.layers,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": workers["engine"].hello["threads"],
        "memory_measure": memory["engine"]["what"],
    }
    for side in SIDES:
        t = times[side]
        result[side] = {
            "tokens_per_s": tokens * len(t) / sum(t),
            "tokens_per_s_best": tokens / min(t),
            "step_s_median": statistics.median(t),
            "step_s_min": min(t),
            "step_s_max": max(t),
            "step_s": t,
            "peak_memory_bytes": memory[side]["peak_bytes"],
            "first_loss": losses[side][0],
            "last_loss": losses[side][-1],
        }
    e, h = result["engine"], result["hf_peft"]
    result["ratio"] = {
        "tokens_per_s": e["tokens_per_s"] / h["tokens_per_s"],
        "tokens_per_s_best": e["tokens_per_s_best"] / h["tokens_per_s_best"],
        "peak_memory": e["peak_memory_bytes"] / max(h["peak_memory_bytes"], 1),
    }
    if profiles:
        result["profile"] = profiles
    return result


def table(result: dict[str, Any]) -> str:
    mib = 1024 * 1024
    rows = [
        f"{result['model']} on {result['device']} ({result['dtype']}, {result['threads']} "
        f"threads): batch {result['batch_size']} x {result['seq_len']} tokens, LoRA rank "
        f"{result['rank']} on 7 targets, checkpointing; {result['steps']} timed steps after "
        f"{result['warmup']} warm-up, interleaved",
        f"{'':10} {'tokens/s':>10} {'step s (min-max)':>18} {'peak mem MiB':>13} {'loss':>14}",
    ]
    for side in SIDES:
        s = result[side]
        rows.append(
            f"{side:10} {s['tokens_per_s']:10.1f} "
            f"{s['step_s_min']:8.3f}-{s['step_s_max']:<9.3f} "
            f"{s['peak_memory_bytes'] / mib:13.1f} "
            f"{s['first_loss']:6.3f}->{s['last_loss']:6.3f}"
        )
    r = result["ratio"]
    rows.append(
        f"engine / HF+PEFT: tokens/s x{r['tokens_per_s']:.2f} (best step x"
        f"{r['tokens_per_s_best']:.2f}), peak memory x{r['peak_memory']:.2f}"
    )
    rows.append(f"peak memory: {result['memory_measure']}")
    for side, prof in (result.get("profile") or {}).items():
        rows += [f"--- {side}: one step, matmul calls {prof['counts']}", prof["table"]]
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="a HF Llama/Qwen2 checkpoint (default: SmolLM2-135M)")
    p.add_argument("--shape", choices=["llama3-8b"], help="random weights of this shape instead")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile one more step per side")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.shape and args.model_path:
        p.error("--shape and --model-path exclude each other")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not args.shape and not args.model_path:
        from sglang_harli.default_model import ensure_default_model

        args.model_path = str(ensure_default_model())
        argv = [*argv, "--model-path", args.model_path]
    result = run(args, argv)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
