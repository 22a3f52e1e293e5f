"""Helpers shared by the kernel tests (imported by name; pytest puts this dir on sys.path)."""

from __future__ import annotations

import torch

from harli_kernels.launch import interpreting

# max |actual - expected| / max |expected| allowed, per dtype of the kernel inputs.  fp32 is
# exact-ish under the interpreter but uses TF32 tensor cores in tl.dot on a GPU.
_REL_TOL = {
    torch.float32: 1e-5,
    torch.float16: 6e-3,
    torch.bfloat16: 3e-2,
}


def rel_tol(dtype: torch.dtype, factor: float = 1.0) -> float:
    tol = _REL_TOL[dtype]
    if dtype == torch.float32 and not interpreting():
        tol = 5e-3
    return tol * factor


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-6)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual, expected, dtype, what="", factor=1.0):
    assert actual is not None, f"{what}: missing"
    assert torch.isfinite(actual.detach().float()).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    tol = rel_tol(dtype, factor)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def fwd_bwd(fn, args, grad_out=None):
    """Run ``fn(*args)``, backprop ``grad_out`` (random if None), return (out, grads, grad_out).
    ``args`` are leaves; grads are collected for those with requires_grad."""
    out = fn(*args)
    if grad_out is None:
        grad_out = torch.randn_like(out.float()).to(out.dtype) if out.dim() else torch.tensor(1.3)
    out.backward(grad_out.to(out.device))
    grads = [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]
    return out, grads, grad_out


class LaunchSpy:
    """Wraps a Triton kernel object in a module and records the grid of every launch."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name
        self.kernel = getattr(module, name)
        self.grids: list[tuple] = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]

    def __enter__(self):
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.kernel)
