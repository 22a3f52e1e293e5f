"""Kernel checks that need a CUDA GPU (realistic shapes, green contexts, SM-id probes).

Not run in CPU CI: every test is skipped with a reason when CUDA is absent.  Written without
access to a GPU; see docs/kernels.md for what has and has not been verified.  The numerics are
checked against the engine's own torch ops (``sglang_harli.finetune.torch_ops``, what
``kernels="torch"`` runs), on the same bf16 inputs.
"""

import pytest
import torch

from sglang_harli.finetune import graph, torch_ops
from sglang_harli.finetune.base_model import RopeConfig
from sglang_harli.finetune.lora import LoraPair
from sglang_harli.finetune.ops import rope_position_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REL = {torch.bfloat16: 3e-2, torch.float16: 6e-3}


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _all_sms():
    return torch.cuda.get_device_properties(0).multi_processor_count


@pytest.fixture(autouse=True)
def _not_interpreting():
    from harli_kernels.launch import interpreting

    assert not interpreting(), "TRITON_INTERPRET must be unset on a GPU run"
    torch.manual_seed(0)


@pytest.mark.parametrize("num_sms", [8, "all"])
def test_lora_linear_gpu(num_sms):
    from harli_kernels import lora_linear

    ns = _all_sms() if num_sms == "all" else num_sms
    dt = torch.bfloat16
    x = _leaf(torch.randn(1000, 1024, device="cuda", dtype=dt))
    w = torch.randn(1536, 1024, device="cuda", dtype=dt) / 32
    a = _leaf(torch.randn(16, 1024, device="cuda", dtype=torch.float32) / 32)
    b = _leaf(torch.randn(1536, 16, device="cuda", dtype=torch.float32) / 4)
    y = lora_linear(x, w, a, b, 2.0, ns)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr, ar, br = _leaf(x), _leaf(a), _leaf(b)
    yr = torch_ops.lora_linear(xr, w, None, LoraPair(ar, br), 2.0)
    yr.backward(gy)
    assert _rel(y, yr) < REL[dt]
    for g, gr in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert _rel(g, gr) < REL[dt]


def test_pointwise_and_norm_gpu():
    from harli_kernels import apply_rope, rms_norm, swiglu

    dt = torch.bfloat16
    x = torch.randn(777, 4096, device="cuda", dtype=dt)
    w = torch.randn(4096, device="cuda", dtype=dt)
    assert _rel(rms_norm(x, w, 1e-5, 16), torch_ops.rms_norm(x, w, 1e-5)) < REL[dt]
    g, u = torch.randn(2, 777, 11008, device="cuda", dtype=dt)
    assert _rel(swiglu(g, u, 16), torch_ops.swiglu(g, u)) < REL[dt]
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)
    inv_freq = graph.rope_inv_freq(rope, 128, torch.device("cuda"))
    q = torch.randn(777, 32, 128, device="cuda", dtype=dt)
    pos = torch.randint(0, 4096, (777,), device="cuda")
    ours = apply_rope(q, pos, *rope_position_tables(4096, inv_freq), 16)
    # the engine rotates in bf16 with bf16 tables, the kernel in fp32 with one rounding: about
    # 6e-3 apart at this shape (the kernel's maths in fp32 torch on a CPU, three seeds)
    assert _rel(ours, torch_ops.apply_rope(q, *torch_ops.rope_cos_sin(pos, inv_freq, dt))) < 1e-2


def test_fused_linear_cross_entropy_gpu():
    from harli_kernels import fused_linear_cross_entropy

    dt = torch.bfloat16
    h = _leaf(torch.randn(600, 512, device="cuda", dtype=dt))
    w = torch.randn(32003, 512, device="cuda", dtype=dt) / 16
    labels = torch.randint(0, 32003, (600,), device="cuda")
    labels[::7] = -100
    loss = fused_linear_cross_entropy(h, w, labels, 33, chunk_size=4096)
    loss.backward()
    hr = _leaf(h)
    valid = labels != -100  # the engine's loss head takes the valid targets only, and sums
    ref = torch_ops.chunked_cross_entropy(hr[valid], w, labels[valid], 4096) / valid.sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-2
    assert _rel(h.grad, hr.grad) < REL[dt]


@pytest.mark.parametrize("d", [64, 128])
def test_attention_varlen_gqa_gpu(d):
    from harli_kernels import causal_attention_varlen

    dt = torch.bfloat16
    lens = [100, 900, 1, 333]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    t = sum(lens)
    q = _leaf(torch.randn(t, 8, d, device="cuda", dtype=dt))
    k = _leaf(torch.randn(t, 2, d, device="cuda", dtype=dt))
    v = _leaf(torch.randn(t, 2, d, device="cuda", dtype=dt))
    o = causal_attention_varlen(q, k, v, cu, 66)
    go = torch.randn_like(o)
    o.backward(go)
    qr, kr, vr = _leaf(q), _leaf(k), _leaf(v)
    orf = torch_ops.attention(qr, kr, vr, tuple(cu.tolist())).view(o.shape)
    orf.backward(go)
    assert _rel(o, orf) < REL[dt]
    for g, gr in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert _rel(g, gr) < 5e-2


# ---------------------------------------------------------------- SM footprint probes
def _smid_probe():
    import triton
    import triton.language as tl

    @triton.jit
    def smid_kernel(out_ptr, spin):
        pid = tl.program_id(0)
        dummy = tl.zeros([1], dtype=tl.int32)
        sm = tl.inline_asm_elementwise(
            "mov.u32 $0, %smid;", "=r,r", [dummy], dtype=tl.int32, is_pure=False, pack=1
        )
        acc = tl.zeros([1], dtype=tl.float32)
        for i in range(spin):  # keep programs resident for a while so they overlap
            acc = acc * 0.5 + i
        tl.store(out_ptr + pid + tl.arange(0, 1), sm + (acc * 0).to(tl.int32))

    return smid_kernel


def _distinct_sms(n_programs, stream=None):
    kernel = _smid_probe()
    out = torch.full((n_programs,), -1, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        kernel[(n_programs,)](out, 20000)
    torch.cuda.synchronize()
    assert (out >= 0).all()
    return out.unique().numel()


@pytest.mark.parametrize("num_sms", [1, 8, 33])
def test_persistent_grid_occupies_at_most_num_sms(num_sms):
    # a persistent launch is num_sms programs: it can never touch more than num_sms SMs
    assert _distinct_sms(num_sms) <= num_sms


def test_green_context_ladder_confines_triton_launches():
    from harli_kernels import SMPartitionLadder, green_contexts_available, lora_linear

    ok, reason = green_contexts_available()
    if not ok:
        pytest.skip(f"green contexts unavailable: {reason}")
    total = _all_sms()
    with SMPartitionLadder([8, 16, 33, total // 2, total]) as ladder:
        assert ladder.mode == "green-contexts", ladder.reason
        min_size, align = ladder.granularity
        for share in ladder.shares:
            assert share.green and share.stream is not None
            assert share.num_sms <= max(share.requested, min_size)
            assert share.num_sms % align == 0 or share.num_sms == total
            # many more programs than SMs: the partition must hold them all
            assert _distinct_sms(4 * total, share.stream) <= share.num_sms
        # a real kernel on a green stream gives the same result as on the default stream
        share = ladder.select(16)
        dt = torch.bfloat16
        x = torch.randn(256, 512, device="cuda", dtype=dt)
        w = torch.randn(384, 512, device="cuda", dtype=dt) / 16
        a = torch.randn(8, 512, device="cuda", dtype=dt) / 16
        b = torch.randn(384, 8, device="cuda", dtype=dt)
        ref = lora_linear(x, w, a, b, 1.0, share.num_sms)
        share.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(share.stream):
            y = lora_linear(x, w, a, b, 1.0, share.num_sms)
        torch.cuda.current_stream().wait_stream(share.stream)
        torch.cuda.synchronize()
        assert _rel(y, ref) < 1e-2
