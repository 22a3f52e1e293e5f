"""The fused LoRA linear kernel against the engine's torch projection (``torch_ops.lora_linear``,
adapters cast to x's dtype)."""

import pytest
import torch
import triton
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.lora as lora_mod
from harli_kernels import fused_base_lowrank_matmul, lora_linear
from harli_kernels.matmul import mm_config
from sglang_harli.finetune import torch_ops
from sglang_harli.finetune.lora import LoraPair


def _engine_lora(x, w, a, b, scaling, bias=None, dropout_mask=None):
    return torch_ops.lora_linear(x, w, bias, LoraPair(a, b), scaling, dropout_mask)


def _make(dtype, adapter_dtype, r, device, n_in=40, n_out=33, lead=(37,), bias=False):
    x = torch.randn(*lead, n_in, dtype=dtype, device=device)
    w = torch.randn(n_out, n_in, dtype=dtype, device=device) / 6
    a = torch.randn(r, n_in, dtype=adapter_dtype, device=device) / 6
    b = torch.randn(n_out, r, dtype=adapter_dtype, device=device) / 2
    bias_t = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    return x, w, a, b, bias_t


def _check(dtype, adapter_dtype, r, num_sms, device, lead=(37,), bias=False, scaling=0.75):
    x, w, a, b, bias_t = _make(dtype, adapter_dtype, r, device, lead=lead, bias=bias)
    x, a, b = leaf(x), leaf(a), leaf(b)
    y, (gx, _, ga, gb), gy = fwd_bwd(
        lambda x, w, a, b: lora_linear(x, w, a, b, scaling, num_sms, bias=bias_t), [x, w, a, b]
    )
    xr, ar, br = leaf(x), leaf(a), leaf(b)
    yr, (gxr, _, gar, gbr), _ = fwd_bwd(
        lambda x, w, a, b: _engine_lora(x, w, a, b, scaling, bias=bias_t),
        [xr, w, ar, br],
        gy,
    )
    assert y.shape == (*lead, 33) and y.dtype == dtype
    assert ga.dtype == adapter_dtype and gb.dtype == adapter_dtype and gx.dtype == dtype
    assert_close(y, yr, dtype, "y")
    assert_close(gx, gxr, dtype, "dX")
    assert_close(ga, gar, dtype, "dA")
    assert_close(gb, gbr, dtype, "dB")


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # peft's fp32 adapters on a bf16 base
        (torch.float16, torch.float16),
    ],
)
def test_lora_dtypes(dtype, adapter_dtype, device):
    _check(dtype, adapter_dtype, r=5, num_sms=3, device=device)


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_lora_num_sms(num_sms, device):
    with LaunchSpy(lora_mod, "_base_plus_lowrank_kernel") as spy:
        _check(torch.bfloat16, torch.bfloat16, r=8, num_sms=num_sms, device=device)
    # forward y [37, 33] and backward dX [37, 40]
    assert len(spy.grids) == 2
    for (g,), (m, n, k) in zip(spy.grids, [(37, 33, 40), (37, 40, 33)], strict=True):
        cfg = mm_config(m, n, k, torch.bfloat16)
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        assert g == min(num_sms, tiles)


def test_lora_rank_above_block_bias_batched(device):
    # r=20 > BLOCK_R (16 under the interpreter): the low-rank loop runs twice; 3-D input; bias
    _check(torch.float32, torch.float32, r=20, num_sms=3, device=device, lead=(2, 9), bias=True)


def test_lora_only_adapter_grads(device):
    x, w, a, b, _ = _make(torch.bfloat16, torch.bfloat16, 4, device)
    a, b = leaf(a), leaf(b)
    y = lora_linear(x, w, a, b, 2.0, 3)
    y.float().sum().backward()
    ar, br = leaf(a), leaf(b)
    _engine_lora(x, w, ar, br, 2.0).float().sum().backward()
    assert x.grad is None
    assert_close(a.grad, ar.grad, torch.bfloat16, "dA")
    assert_close(b.grad, br.grad, torch.bfloat16, "dB")


def test_fused_kernel_zero_scaling_is_base_gemm(device):
    x = torch.randn(17, 24, device=device)
    w = torch.randn(19, 24, device=device)
    lo_l = torch.randn(17, 3, device=device)
    lo_r = torch.randn(3, 19, device=device)
    y = fused_base_lowrank_matmul(x, w.t(), lo_l, lo_r, 0.0, 2)
    assert_close(y, x @ w.t(), torch.float32, "scaling 0")


def test_lora_bad_arguments(device):
    x, w, a, b, _ = _make(torch.bfloat16, torch.bfloat16, 4, device)
    with pytest.raises(ValueError, match="num_sms"):
        lora_linear(x, w, a, b, 1.0, 0)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(x, w, a[:, :-1], b, 1.0, 2)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear(x, w, a, b[:, :-1], 1.0, 2)
    with pytest.raises(ValueError, match="last dim"):
        lora_linear(x[:, :-1], w, a, b, 1.0, 2)
    with pytest.raises(ValueError, match="weight dtype"):
        lora_linear(x, w.float(), a, b, 1.0, 2)
    with pytest.raises(ValueError, match="lora_a dtype"):
        lora_linear(x, w, a.half(), b, 1.0, 2)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, leaf(w), a, b, 1.0, 2)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, a, b, 1.0, 2, bias=torch.zeros(5, dtype=x.dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dropout_mask(dtype, device):
    # peft-style dropout on the adapter input: mask of 0 / (1/(1-p)), base path unaffected
    x, w, a, b, _ = _make(dtype, torch.float32, 6, device, lead=(2, 11))
    p = 0.25
    mask = (torch.rand(x.shape, device=device) > p).to(dtype) / (1 - p)
    x, a, b = leaf(x), leaf(a), leaf(b)
    y, (gx, _, ga, gb), gy = fwd_bwd(
        lambda x, w, a, b: lora_linear(x, w, a, b, 0.5, 3, dropout_mask=mask), [x, w, a, b]
    )
    xr, ar, br = leaf(x), leaf(a), leaf(b)
    yr, (gxr, _, gar, gbr), _ = fwd_bwd(
        lambda x, w, a, b: _engine_lora(x, w, a, b, 0.5, dropout_mask=mask),
        [xr, w, ar, br],
        gy,
    )
    assert_close(y, yr, dtype, "y")
    assert_close(gx, gxr, dtype, "dX")
    assert_close(ga, gar, dtype, "dA")
    assert_close(gb, gbr, dtype, "dB")
    with pytest.raises(ValueError, match="dropout_mask"):
        lora_linear(x, w, a, b, 0.5, 3, dropout_mask=mask[..., :-1])
