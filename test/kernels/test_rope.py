import pytest
import torch
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.rope as rope_mod
from harli_kernels import (
    apply_rope,
    apply_rope_reference,
    rope_cos_sin,
    rope_cos_sin_cache,
    rope_inv_freq,
)

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)

# Golden values, cross-checked against transformers 5.19 ``ROPE_INIT_FUNCTIONS``
# (head_dim 16; llama3 with original_max_position_embeddings=64 hits all three bands).
GOLDEN_DEFAULT = [
    1.0, 0.3162277638912201, 0.10000000149011612, 0.03162277862429619,
    0.009999999776482582, 0.003162277862429619, 0.0010000000474974513, 0.0003162277862429619,
]  # fmt: skip
GOLDEN_LLAMA3 = [
    1.0, 0.07940301299095154, 0.004700753837823868, 0.0009115831344388425,
    0.00017677668074611574, 3.428102354519069e-05, 6.647869668086059e-06, 1.289173155782919e-06,
]  # fmt: skip


def test_inv_freq_golden():
    torch.testing.assert_close(rope_inv_freq(16, 10000.0), torch.tensor(GOLDEN_DEFAULT))
    got = rope_inv_freq(16, 500000.0, "llama3", original_max_position_embeddings=64, **LLAMA3)
    torch.testing.assert_close(got, torch.tensor(GOLDEN_LLAMA3))


def test_inv_freq_llama3_bands():
    base = rope_inv_freq(64, 500000.0)
    scaled = rope_inv_freq(64, 500000.0, "llama3", original_max_position_embeddings=8192, **LLAMA3)
    wavelen = 2 * torch.pi / base
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8.0)
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()


def test_cos_sin_cache_from_hf_dict():
    cfg = {"rope_type": "llama3", "rope_theta": 500000.0, "original_max_position_embeddings": 64}
    cfg.update(LLAMA3)
    cos, sin = rope_cos_sin_cache(40, 16, rope_scaling=cfg)
    inv = torch.tensor(GOLDEN_LLAMA3)
    cos2, sin2 = rope_cos_sin(40, inv)
    assert cos.shape == (40, 8) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, cos2)
    torch.testing.assert_close(sin, sin2)
    # legacy "type" key and no scaling
    c_def, _ = rope_cos_sin_cache(4, 16, 10000.0, {"type": "default"})
    torch.testing.assert_close(c_def, rope_cos_sin(4, torch.tensor(GOLDEN_DEFAULT))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_apply_rope_packed(dtype, num_sms, device):
    cos, sin = rope_cos_sin_cache(64, 16, 10000.0, device=device)
    # three packed sequences of lengths 4, 1, 6 (positions restart at 0), 3 heads
    pos = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 63], device=device)
    x = leaf(torch.randn(11, 3, 16, dtype=dtype, device=device))
    with LaunchSpy(rope_mod, "_rope_kernel") as spy:
        y, (gx,), gy = fwd_bwd(lambda x: apply_rope(x, pos, cos, sin, num_sms), [x])
    xr = leaf(x)
    yr, (gxr,), _ = fwd_bwd(lambda x: apply_rope_reference(x, pos, cos, sin), [xr], gy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, yr, dtype, "rope")
    assert_close(gx, gxr, dtype, "rope backward")
    for (g,) in spy.grids:  # forward + backward
        assert 1 <= g <= num_sms
    if rope_mod.interpreting():
        assert spy.grids[0] == (min(num_sms, 11 * 2),)  # 11 tokens x 2 head blocks


def test_apply_rope_strided_qkv_view_and_positions_int32(device):
    cos, sin = rope_cos_sin_cache(
        32,
        8,
        10000.0,
        {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 16},
        device=device,
    )
    qkv = leaf(torch.randn(7, 4 + 2 + 2, 8, dtype=torch.bfloat16, device=device))
    pos = torch.tensor([5, 6, 7, 0, 1, 2, 31], dtype=torch.int32, device=device)
    y, (g,), gy = fwd_bwd(lambda t: apply_rope(t[:, 4:6], pos, cos, sin, 3), [qkv])
    qkv_r = leaf(qkv)
    yr, (gr,), _ = fwd_bwd(lambda t: apply_rope_reference(t[:, 4:6], pos, cos, sin), [qkv_r], gy)
    assert_close(y, yr, torch.bfloat16, "k rope")
    assert_close(g, gr, torch.bfloat16, "grad into qkv")
    assert torch.count_nonzero(g[:, :4]) == 0 and torch.count_nonzero(g[:, 6:]) == 0


def test_rope_backward_is_inverse_rotation(device):
    cos, sin = rope_cos_sin_cache(16, 8, device=device)
    pos = torch.arange(5, device=device)
    x = torch.randn(5, 2, 8, device=device)
    y = apply_rope(x, pos, cos, sin, 2)
    back = apply_rope(y, pos, cos, -sin, 2)  # rotating by -theta undoes the rotation
    assert_close(back, x, torch.float32, "inverse", factor=10)


def test_rope_bad_arguments(device):
    cos, sin = rope_cos_sin_cache(8, 8, device=device)
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
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(8, rope_type="yarn")
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(7)
    with pytest.raises(ValueError, match="llama3"):
        rope_inv_freq(8, rope_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0)
