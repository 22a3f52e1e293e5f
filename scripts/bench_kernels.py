#!/usr/bin/env python
"""GPU benchmark for harli_kernels (UNTESTED: written on a machine without a GPU).

1. Throughput of each finetune kernel at several SM budgets (``--num-sms 8,16,33,66,all``)
   against the engine's own torch op (``sglang_harli.finetune.torch_ops``, what ``kernels="torch"``
   runs: cuBLAS, SDPA, ...) on the whole GPU.
2. Interference curve: latency of a decode-like batched GEMV kernel alone, and while finetune
   kernels (LoRA linear forward+backward) run concurrently on another stream limited to
   ``num_sms`` SMs (persistent grid only, and inside a green context when available).

Usage::

    python scripts/bench_kernels.py                       # everything, bf16, Llama-8B-like dims
    python scripts/bench_kernels.py --only throughput --num-sms 16,66,all
    python scripts/bench_kernels.py --only interference --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-sms", default="8,16,33,66,all")
    p.add_argument("--tokens", type=int, default=4096, help="finetune tokens per step")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--only", choices=["throughput", "interference"], default=None)
    p.add_argument("--json", default=None, help="write results to this file")
    return p.parse_args()


def _time_ms(torch, fn, iters, stream=None):
    stream = stream or torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / iters


def throughput(torch, hk, args, budgets, total_sms):
    from sglang_harli.finetune import torch_ops
    from sglang_harli.finetune.lora import LoraPair

    dt = torch.bfloat16
    dev = "cuda"
    T, H, inter, V = args.tokens, args.hidden, args.intermediate, args.vocab
    hd = H // args.heads
    x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(inter, H, device=dev, dtype=dt) / math.sqrt(H)
    a = (torch.randn(args.rank, H, device=dev, dtype=dt) / math.sqrt(H)).requires_grad_()
    b = torch.zeros(inter, args.rank, device=dev, dtype=dt, requires_grad=True)
    lm = torch.randn(V, H, device=dev, dtype=dt) / math.sqrt(H)
    labels = torch.randint(0, V, (T,), device=dev)
    seqlens = [T // 4] * 4
    cu_seqlens = tuple(sum(seqlens[:i]) for i in range(5))
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=dev)
    q = torch.randn(T, args.heads, hd, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(T, args.kv_heads, hd, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(T, args.kv_heads, hd, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(T, inter, device=dev, dtype=dt, requires_grad=True)
    u = torch.randn(T, inter, device=dev, dtype=dt, requires_grad=True)
    nw = torch.ones(H, device=dev, dtype=dt)

    def fb(fn):
        def run():
            out = fn()
            out.float().sum().backward() if out.dim() else out.backward()

        return run

    gemm_flops = 2 * T * H * inter
    attn_flops = 4 * sum(s * s / 2 for s in seqlens) * args.heads * hd
    cases = {
        "gemm_fwd (x W^T)": (
            lambda n: lambda: hk.linear_forward(x.detach(), w, n),
            lambda: x.detach() @ w.t(),
            gemm_flops,
        ),
        "lora_linear fwd+bwd": (
            lambda n: fb(lambda: hk.lora_linear(x, w, a, b, 2.0, n)),
            fb(lambda: torch_ops.lora_linear(x, w, None, LoraPair(a, b), 2.0)),
            3 * gemm_flops,
        ),
        "fused_linear_ce fwd+bwd": (
            lambda n: fb(lambda: hk.fused_linear_cross_entropy(x, lm, labels, n, reduction="sum")),
            fb(lambda: torch_ops.chunked_cross_entropy(x, lm, labels)),
            3 * 2 * T * H * V,
        ),
        "attention fwd+bwd": (
            lambda n: fb(lambda: hk.causal_attention_varlen(q, k, v, cu, n, max_seqlen=T // 4)),
            fb(lambda: torch_ops.attention(q, k, v, cu_seqlens)),
            3.5 * attn_flops,
        ),
        "swiglu fwd+bwd": (
            lambda n: fb(lambda: hk.swiglu(g, u, n)),
            fb(lambda: torch_ops.swiglu(g, u)),
            None,
        ),
        "rms_norm fwd+bwd": (
            lambda n: fb(lambda: hk.rms_norm(x, nw, 1e-5, n)),
            fb(lambda: torch_ops.rms_norm(x, nw, 1e-5)),
            None,
        ),
    }
    results = []
    for name, (ours, theirs, flops) in cases.items():
        base_ms = _time_ms(torch, theirs, args.iters)
        row = {"kernel": name, "torch_all_sms_ms": base_ms, "ours": {}}
        for n in budgets:
            ms = _time_ms(torch, ours(n), args.iters)
            row["ours"][n] = ms
            tflops = f"{flops / ms / 1e9:8.1f} TF/s" if flops else ""
            print(
                f"{name:26s} num_sms={n:4d} ({n / total_sms:5.0%}) {ms:9.3f} ms {tflops}"
                f"  torch(all SMs) {base_ms:9.3f} ms  ratio {ms / base_ms:6.2f}"
            )
        results.append(row)
        x.grad = a.grad = b.grad = q.grad = k.grad = v.grad = g.grad = u.grad = None
    return results


def interference(torch, hk, args, budgets):
    """Decode-like GEMV latency alone vs. beside a finetune loop limited to num_sms SMs."""
    dt = torch.bfloat16
    dev = "cuda"
    H = args.hidden
    dec_x = torch.randn(args.decode_batch, H, device=dev, dtype=dt)
    dec_w = torch.randn(4 * H, H, device=dev, dtype=dt)

    def decode():
        return dec_x @ dec_w.t()

    x = torch.randn(args.tokens, H, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(args.intermediate, H, device=dev, dtype=dt) / math.sqrt(H)
    a = torch.randn(args.rank, H, device=dev, dtype=dt, requires_grad=True)
    b = torch.randn(args.intermediate, args.rank, device=dev, dtype=dt, requires_grad=True)
    decode_stream = torch.cuda.Stream(priority=-1)
    alone = _time_ms(torch, decode, 200, decode_stream)
    print(f"decode GEMV alone: {alone * 1000:.1f} us")
    ladder = hk.SMPartitionLadder(budgets)
    print(f"SM partitions: {ladder}")
    results = {"decode_alone_us": alone * 1000, "curve": []}
    for n in budgets:
        for use_green in (False, True):
            share = ladder.select(n) if use_green else None
            if use_green and (share is None or share.stream is None):
                continue
            ft_stream = share.stream if use_green else torch.cuda.Stream()
            grid = share.num_sms if use_green else n
            stop = threading.Event()

            def finetune_loop(stream=ft_stream, grid=grid, stop=stop):
                with torch.cuda.stream(stream):
                    while not stop.is_set():
                        hk.lora_linear(x, w, a, b, 2.0, grid).float().sum().backward()
                        stream.synchronize()

            worker = threading.Thread(target=finetune_loop, daemon=True)
            worker.start()
            beside = _time_ms(torch, decode, 200, decode_stream)
            stop.set()
            worker.join()
            mode = "green-ctx" if use_green else "grid-only"
            print(
                f"num_sms={n:4d} {mode:9s}: decode {beside * 1000:8.1f} us "
                f"(x{beside / alone:5.2f} vs alone)"
            )
            results["curve"].append(
                {"num_sms": n, "mode": mode, "decode_us": beside * 1000, "slowdown": beside / alone}
            )
    ladder.close()
    return results


def main() -> int:
    args = _parse_args()
    try:
        import torch
    except ImportError:
        print("bench_kernels.py needs torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none found); nothing to do.", file=sys.stderr)
        return 2
    import harli_kernels as hk

    total = torch.cuda.get_device_properties(0).multi_processor_count
    budgets = sorted(
        {total if s.strip() == "all" else min(int(s), total) for s in args.num_sms.split(",")}
    )
    print(f"device {torch.cuda.get_device_name(0)} with {total} SMs; budgets {budgets}")
    out = {"device": torch.cuda.get_device_name(0), "total_sms": total}
    if args.only in (None, "throughput"):
        out["throughput"] = throughput(torch, hk, args, budgets, total)
    if args.only in (None, "interference"):
        out["interference"] = interference(torch, hk, args, budgets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
