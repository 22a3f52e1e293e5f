"""The RoPE kernel against the engine's torch RoPE.

The expected values are ``torch_ops.apply_rope`` over ``torch_ops.rope_cos_sin`` tables in x's
dtype, as ``TorchOps`` runs them; the kernel gets the fp32 position tables ``TritonOps`` gives it
(``ops.rope_position_tables``), from the same ``graph.rope_inv_freq`` (itself checked against
transformers in test/unit/finetune/test_base_model.py).
"""

import pytest
import torch
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.rope as rope_mod
from harli_kernels import apply_rope
from sglang_harli.finetune import graph, torch_ops
from sglang_harli.finetune.base_model import RopeConfig
from sglang_harli.finetune.ops import rope_position_tables

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _tables(num_positions, head_dim, device, **rope):
    inv_freq = graph.rope_inv_freq(RopeConfig(**rope), head_dim, torch.device(device))
    return inv_freq, *rope_position_tables(num_positions, inv_freq)


def _engine_rope(x, positions, inv_freq):
    cos, sin = torch_ops.rope_cos_sin(positions, inv_freq, x.dtype)
    return torch_ops.apply_rope(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_apply_rope_packed(dtype, num_sms, device):
    inv_freq, cos, sin = _tables(64, 16, device, theta=10000.0)
    # three packed sequences of lengths 4, 1, 6 (positions restart at 0), 3 heads
    pos = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 63], device=device)
    x = leaf(torch.randn(11, 3, 16, dtype=dtype, device=device))
    with LaunchSpy(rope_mod, "_rope_kernel") as spy:
        y, (gx,), gy = fwd_bwd(lambda x: apply_rope(x, pos, cos, sin, num_sms), [x])
    xr = leaf(x)
    yr, (gxr,), _ = fwd_bwd(lambda x: _engine_rope(x, pos, inv_freq), [xr], gy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, yr, dtype, "rope")
    assert_close(gx, gxr, dtype, "rope backward")
    for (g,) in spy.grids:  # forward + backward
        assert 1 <= g <= num_sms
    if rope_mod.interpreting():
        assert spy.grids[0] == (min(num_sms, 11 * 2),)  # 11 tokens x 2 head blocks


def test_apply_rope_strided_qkv_view_and_positions_int32(device):
    inv_freq, cos, sin = _tables(32, 8, device, original_max_position_embeddings=16, **LLAMA3)
    qkv = leaf(torch.randn(7, 4 + 2 + 2, 8, dtype=torch.bfloat16, device=device))
    pos = torch.tensor([5, 6, 7, 0, 1, 2, 31], dtype=torch.int32, device=device)
    y, (g,), gy = fwd_bwd(lambda t: apply_rope(t[:, 4:6], pos, cos, sin, 3), [qkv])
    qkv_r = leaf(qkv)
    yr, (gr,), _ = fwd_bwd(lambda t: _engine_rope(t[:, 4:6], pos, inv_freq), [qkv_r], gy)
    assert_close(y, yr, torch.bfloat16, "k rope")
    assert_close(g, gr, torch.bfloat16, "grad into qkv")
    assert torch.count_nonzero(g[:, :4]) == 0 and torch.count_nonzero(g[:, 6:]) == 0


def test_rope_backward_is_inverse_rotation(device):
    _, cos, sin = _tables(16, 8, device)
    pos = torch.arange(5, device=device)
    x = torch.randn(5, 2, 8, device=device)
    y = apply_rope(x, pos, cos, sin, 2)
    back = apply_rope(y, pos, cos, -sin, 2)  # rotating by -theta undoes the rotation
    assert_close(back, x, torch.float32, "inverse", factor=10)


def test_rope_bad_arguments(device):
    _, cos, sin = _tables(8, 8, device)
    x = torch.randn(3, 2, 8, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="num_sms"):
        apply_rope(x, pos, cos, sin, 0)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(3, 2, 7, device=device), pos, cos, sin, 2)
    with pytest.raises(ValueError, match="positions must be int"):
        apply_rope(x, pos.float(), cos, sin, 2)
    with pytest.raises(ValueError, match="positions has shape"):
        apply_rope(x, pos[:2], cos, sin, 2)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(x, pos, cos[:, :3], sin[:, :3], 2)
    with pytest.raises(ValueError, match="tokens, heads"):
        apply_rope(x[0], pos, cos, sin, 2)
