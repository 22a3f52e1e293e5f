"""The persistent GEMM against torch's own matmul (``F.linear``/``torch.matmul``: what the
engine's torch path runs for a projection)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testutil import LaunchSpy, assert_close, fwd_bwd, leaf

import harli_kernels.matmul as mm
from harli_kernels import (
    linear,
    linear_forward,
    linear_input_grad,
    linear_weight_grad,
    persistent_matmul,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_forward_shape_x_wt(dtype, num_sms, device):
    # odd sizes: 37 x 45 output = 3 x 3 tiles of 16 under the interpreter
    x = torch.randn(37, 50, dtype=dtype, device=device)
    w = torch.randn(45, 50, dtype=dtype, device=device)
    with LaunchSpy(mm, "_persistent_mm_kernel") as spy:
        y = linear_forward(x, w, num_sms)
    assert y.shape == (37, 45) and y.dtype == dtype
    assert_close(y, F.linear(x, w), dtype, "x @ w^T")
    (grid,) = spy.grids
    tiles = mm.triton.cdiv(37, mm.mm_config(37, 45, 50, dtype)["BLOCK_M"]) * mm.triton.cdiv(
        45, mm.mm_config(37, 45, 50, dtype)["BLOCK_N"]
    )
    assert grid[0] == min(num_sms, tiles) and grid[0] <= num_sms


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_grad_shape(dtype, device):
    dy = torch.randn(29, 33, dtype=dtype, device=device)
    w = torch.randn(33, 21, dtype=dtype, device=device)
    dx = linear_input_grad(dy, w, 3)
    assert dx.shape == (29, 21)
    assert_close(dx, torch.matmul(dy, w), dtype, "dy @ w")


@pytest.mark.parametrize("split_k", [None, 1, 4])
@pytest.mark.parametrize("num_sms", [1, 3, 1000])
def test_weight_grad_shape_split_k(split_k, num_sms, device):
    # adapter weight-gradient shape: tiny output (one tile), long reduction over tokens
    dy = torch.randn(150, 5, dtype=torch.bfloat16, device=device)
    x = torch.randn(150, 7, dtype=torch.bfloat16, device=device)
    with LaunchSpy(mm, "_persistent_mm_kernel") as spy:
        dw = persistent_matmul(dy.t(), x, num_sms, out_dtype=torch.float32, split_k=split_k)
    assert dw.shape == (5, 7) and dw.dtype == torch.float32
    assert_close(dw, torch.matmul(dy.t().float(), x.float()), torch.bfloat16, "dW")
    (grid,) = spy.grids
    assert 1 <= grid[0] <= num_sms
    if split_k == 4:
        assert grid[0] == min(num_sms, 4)
    if split_k is None and num_sms >= 3:
        assert grid[0] > 1, "auto split-K should use more than one program for a 1-tile output"


def test_weight_grad_helper_bf16_out(device):
    dy = torch.randn(70, 9, dtype=torch.bfloat16, device=device)
    x = torch.randn(70, 6, dtype=torch.bfloat16, device=device)
    dw = linear_weight_grad(dy, x, 3)
    assert dw.dtype == torch.bfloat16 and dw.shape == (9, 6)
    assert_close(dw, torch.matmul(dy.t(), x), torch.bfloat16, "dW bf16")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_accumulate_and_alpha(out_dtype, split_k, device):
    a = torch.randn(20, 64, dtype=torch.bfloat16, device=device)
    b = torch.randn(64, 18, dtype=torch.bfloat16, device=device)
    base = torch.randn(20, 18, device=device).to(out_dtype)
    out = base.clone()
    persistent_matmul(a, b, 3, alpha=0.5, out=out, accumulate=True, split_k=split_k)
    expected = base.float() + 0.5 * (a.float() @ b.float())
    assert_close(out, expected, torch.bfloat16, "out += 0.5 a@b")


def test_linear_autograd(device):
    for dtype in (torch.float32, torch.bfloat16):
        x = leaf(torch.randn(2, 19, 40, dtype=dtype, device=device))
        w = leaf(torch.randn(33, 40, dtype=dtype, device=device) / 6)
        y, (gx, gw), gy = fwd_bwd(lambda x, w: linear(x, w, 3), [x, w])
        xr, wr = leaf(x), leaf(w)
        yr, (gxr, gwr), _ = fwd_bwd(F.linear, [xr, wr], gy)
        assert y.shape == (2, 19, 33)
        assert_close(y, yr, dtype, "linear fwd")
        assert_close(gx, gxr, dtype, "linear dX")
        assert_close(gw, gwr, dtype, "linear dW")


def test_empty_and_zero_k(device):
    a = torch.randn(0, 8, dtype=torch.bfloat16, device=device)
    b = torch.randn(8, 5, dtype=torch.bfloat16, device=device)
    assert persistent_matmul(a, b, 2).shape == (0, 5)
    a = torch.randn(4, 0, dtype=torch.bfloat16, device=device)
    b = torch.randn(0, 5, dtype=torch.bfloat16, device=device)
    assert torch.equal(persistent_matmul(a, b, 2).float(), torch.zeros(4, 5, device=device))


def test_bad_arguments(device):
    a = torch.randn(4, 8, dtype=torch.bfloat16, device=device)
    b = torch.randn(8, 5, dtype=torch.bfloat16, device=device)
    for bad in (0, -2, 1.5, True, "4", None):
        with pytest.raises(ValueError, match="num_sms"):
            persistent_matmul(a, b, bad)
    with pytest.raises(ValueError, match="inner dimensions"):
        persistent_matmul(a, b.t(), 2)
    with pytest.raises(ValueError, match="dtype"):
        persistent_matmul(a.int(), b, 2)
    with pytest.raises(ValueError, match="2-D"):
        persistent_matmul(a[0], b, 2)
    with pytest.raises(ValueError, match="out has shape"):
        persistent_matmul(a, b, 2, out=torch.empty(5, 4, device=device))
    with pytest.raises(ValueError, match="split_k"):
        persistent_matmul(a, b, 2, split_k=0)
    with pytest.raises(ValueError, match="last dim"):
        linear(a, torch.randn(5, 7, dtype=torch.bfloat16, device=device), 2)


def test_operand_multipliers(device):
    a = torch.randn(19, 40, dtype=torch.bfloat16, device=device)
    b = torch.randn(40, 17, dtype=torch.bfloat16, device=device)
    am = torch.rand(19, 40, device=device)
    bm = torch.rand(40, 17, device=device).to(torch.bfloat16)
    c = persistent_matmul(a, b, 3, a_mul=am, b_mul=bm, out_dtype=torch.float32)
    expected = (a.float() * am).to(torch.bfloat16).float() @ (b.float() * bm.float())
    assert_close(c, expected, torch.bfloat16, "(a*am) @ (b*bm)")
    with pytest.raises(ValueError, match="a_mul"):
        persistent_matmul(a, b, 3, a_mul=am[:, :-1])
