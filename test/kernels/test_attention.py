"""The varlen attention kernel against the engine's torch attention (``torch_ops.attention``: one
SDPA call per packed sequence)."""

import math

import pytest
import torch
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.attention as attn_mod
from harli_kernels import causal_attention_varlen
from sglang_harli.finetune import torch_ops

# packed lengths: 1 token, 7, an empty sequence, 19 (two 16-row blocks under the interpreter), 3
SEQLENS = [1, 7, 0, 19, 3]


def _cu(seqlens, device):
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return cu.to(device)


def _engine_attention(q, k, v, cu, softmax_scale=None):
    """``torch_ops.attention`` on the kernel's arguments: ``cu_seqlens`` as a tuple, the output back
    to [T, Hq, D]; a custom scale is folded into q (SDPA's own scale is 1/sqrt(D))."""
    if softmax_scale is not None:
        q = q * (softmax_scale * math.sqrt(q.shape[-1]))
    return torch_ops.attention(q, k, v, tuple(cu.tolist())).view(q.shape)


def _check(dtype, hq, hkv, d, num_sms, device, seqlens=SEQLENS, **kw):
    cu = _cu(seqlens, device)
    t = sum(seqlens)
    q = leaf(torch.randn(t, hq, d, dtype=dtype, device=device))
    k = leaf(torch.randn(t, hkv, d, dtype=dtype, device=device))
    v = leaf(torch.randn(t, hkv, d, dtype=dtype, device=device))
    scale = kw.pop("softmax_scale", None)
    o, grads, go = fwd_bwd(
        lambda q, k, v: causal_attention_varlen(q, k, v, cu, num_sms, softmax_scale=scale, **kw),
        [q, k, v],
    )
    qr, kr, vr = leaf(q), leaf(k), leaf(v)
    o_ref, grads_ref, _ = fwd_bwd(
        lambda q, k, v: _engine_attention(q, k, v, cu, softmax_scale=scale),
        [qr, kr, vr],
        go,
    )
    assert o.shape == (t, hq, d) and o.dtype == dtype
    assert_close(o, o_ref, dtype, "o")
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == gr.shape
        assert_close(g, gr, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_gqa_dtypes(dtype, device):
    _check(dtype, hq=4, hkv=2, d=16, num_sms=3, device=device)


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_attention_num_sms_and_grid(num_sms, device):
    with (
        LaunchSpy(attn_mod, "_attn_fwd_kernel") as fwd,
        LaunchSpy(attn_mod, "_attn_bwd_dq_kernel") as dq,
        LaunchSpy(attn_mod, "_attn_bwd_dkdv_kernel") as dkdv,
    ):
        _check(torch.bfloat16, hq=4, hkv=2, d=16, num_sms=num_sms, device=device)
    cfg = attn_mod._config(16)
    blocks = -(-max(SEQLENS) // cfg["BLOCK_M"])
    n = len(SEQLENS)
    assert fwd.grids == [(min(num_sms, blocks * n * 4),)]
    assert dq.grids == [(min(num_sms, blocks * n * 4),)]
    assert dkdv.grids == [(min(num_sms, blocks * n * 2),)]


def test_attention_mqa_odd_head_dim_scale(device):
    # one kv head for 3 query heads, head_dim 24 (padded to a 32 block), custom scale
    _check(torch.float32, hq=3, hkv=1, d=24, num_sms=3, device=device, softmax_scale=0.3)


def test_attention_mha_long_sequence_max_seqlen_given(device):
    # 33 tokens -> three query/key blocks with causal skipping; max_seqlen passed (no host sync)
    _check(
        torch.bfloat16, hq=2, hkv=2, d=16, num_sms=3, device=device, seqlens=[33, 2], max_seqlen=33
    )


def test_attention_strided_qkv_views(device):
    t, hq, hkv, d = 12, 2, 1, 16
    cu = _cu([5, 7], device)
    qkv = leaf(torch.randn(t, hq + 2 * hkv, d, dtype=torch.bfloat16, device=device))

    def split(fn):
        return lambda x: fn(x[:, :hq], x[:, hq : hq + hkv], x[:, hq + hkv :])

    o, (g,), go = fwd_bwd(split(lambda q, k, v: causal_attention_varlen(q, k, v, cu, 2)), [qkv])
    qkv_r = leaf(qkv)
    o_r, (g_r,), _ = fwd_bwd(split(lambda q, k, v: _engine_attention(q, k, v, cu)), [qkv_r], go)
    assert_close(o, o_r, torch.bfloat16, "o")
    assert_close(g, g_r, torch.bfloat16, "d qkv")


def test_attention_is_causal_within_sequences(device):
    # changing a later token (or another sequence) must not change earlier outputs
    cu = _cu([6, 5], device)
    q, k, v = (torch.randn(11, 2, 16, device=device) for _ in range(3))
    o = causal_attention_varlen(q, k, v, cu, 2)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 5.0
    v2[4:] -= 3.0
    o2 = causal_attention_varlen(q, k2, v2, cu, 2)
    torch.testing.assert_close(o[:4], o2[:4])
    assert not torch.allclose(o[4:6], o2[4:6])


def test_attention_bad_arguments(device):
    cu = _cu([3, 2], device)
    q = torch.randn(5, 4, 16, device=device)
    kv = torch.randn(5, 2, 16, device=device)
    with pytest.raises(ValueError, match="num_sms"):
        causal_attention_varlen(q, kv, kv, cu, 0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        causal_attention_varlen(
            q, torch.randn(5, 3, 16, device=device), torch.randn(5, 3, 16, device=device), cu, 2
        )
    with pytest.raises(ValueError, match="int32"):
        causal_attention_varlen(q, kv, kv, cu.long(), 2)
    with pytest.raises(ValueError, match="end at T"):
        causal_attention_varlen(q, kv, kv, _cu([3, 3], device), 2)
    with pytest.raises(ValueError, match="must both be"):
        causal_attention_varlen(q, kv[:, :, :8], kv, cu, 2)
    with pytest.raises(ValueError, match="dtypes differ"):
        causal_attention_varlen(q, kv.half(), kv.half(), cu, 2)
    with pytest.raises(ValueError, match="tokens, heads"):
        causal_attention_varlen(q[0], kv, kv, cu, 2)
