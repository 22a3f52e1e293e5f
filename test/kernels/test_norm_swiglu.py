"""RMSNorm and SwiGLU kernels against the engine's own torch ops (``finetune/torch_ops.py``)."""

import pytest
import torch
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.activation as swiglu_mod
import harli_kernels.norm as norm_mod
from harli_kernels import rms_norm, swiglu
from sglang_harli.finetune import torch_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_rms_norm(dtype, num_sms, device):
    # 15 rows of odd width 37 -> several row tiles
    x = leaf(torch.randn(3, 5, 37, dtype=dtype, device=device))
    w = leaf(torch.randn(37, dtype=dtype, device=device))
    with LaunchSpy(norm_mod, "_rmsnorm_fwd_kernel") as spy:
        y, (gx, gw), gy = fwd_bwd(lambda x, w: rms_norm(x, w, 1e-5, num_sms), [x, w])
    xr, wr = leaf(x), leaf(w)
    yr, (gxr, gwr), _ = fwd_bwd(lambda x, w: torch_ops.rms_norm(x, w, 1e-5), [xr, wr], gy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, yr, dtype, "y")
    assert_close(gx, gxr, dtype, "dx")
    assert_close(gw, gwr, dtype, "dw")
    tiles = -(-15 // norm_mod._config(37)["BLOCK_ROWS"])
    assert spy.grids == [(min(num_sms, tiles),)]


def test_rms_norm_frozen_weight_noncontiguous(device):
    base = leaf(torch.randn(24, 6, dtype=torch.bfloat16, device=device))
    w = torch.randn(24, dtype=torch.bfloat16, device=device)
    # x = base.t() is [6, 24] with a non-unit last-dim stride
    y, (gx, _), gy = fwd_bwd(lambda b, w: rms_norm(b.t(), w, 1e-6, 2), [base, w])
    base_r = leaf(base)
    yr, (gxr, _), _ = fwd_bwd(lambda b, w: torch_ops.rms_norm(b.t(), w, 1e-6), [base_r, w], gy)
    assert_close(y, yr, torch.bfloat16, "y")
    assert_close(gx, gxr, torch.bfloat16, "dx")


def test_rms_norm_bad_arguments(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="num_sms"):
        rms_norm(x, torch.ones(8, device=device), 1e-6, 0)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=device), 1e-6, 2)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.long(), torch.ones(8, device=device), 1e-6, 2)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8, device=device), -1.0, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_swiglu(dtype, num_sms, device):
    g = leaf(torch.randn(13, 37, dtype=dtype, device=device) * 3)
    u = leaf(torch.randn(13, 37, dtype=dtype, device=device))
    with LaunchSpy(swiglu_mod, "_swiglu_fwd_kernel") as spy:
        y, (gg, gu), gy = fwd_bwd(lambda g, u: swiglu(g, u, num_sms), [g, u])
    gr, ur = leaf(g), leaf(u)
    yr, (ggr, gur), _ = fwd_bwd(torch_ops.swiglu, [gr, ur], gy)
    assert y.shape == (13, 37) and y.dtype == dtype
    assert_close(y, yr, dtype, "y")
    assert_close(gg, ggr, dtype, "d_gate")
    assert_close(gu, gur, dtype, "d_up")
    cfg = swiglu_mod._config(37)
    tiles = -(-13 // cfg["BLOCK_ROWS"]) * -(-37 // cfg["BLOCK_COLS"])
    assert spy.grids == [(min(num_sms, tiles),)]


def test_swiglu_views_of_fused_gate_up(device):
    gu = leaf(torch.randn(2, 7, 2 * 21, dtype=torch.bfloat16, device=device))
    y, (g_gu,), gy = fwd_bwd(lambda t: swiglu(t[..., :21], t[..., 21:], 3), [gu])
    gur = leaf(gu)
    yr, (g_gur,), _ = fwd_bwd(lambda t: torch_ops.swiglu(t[..., :21], t[..., 21:]), [gur], gy)
    assert y.shape == (2, 7, 21)
    assert_close(y, yr, torch.bfloat16, "y")
    assert_close(g_gu, g_gur, torch.bfloat16, "d gate_up")


def test_swiglu_bad_arguments(device):
    a = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="num_sms"):
        swiglu(a, a, 0)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(a, a[:, :4], 2)
    with pytest.raises(ValueError, match="dtype"):
        swiglu(a, a.half(), 2)
