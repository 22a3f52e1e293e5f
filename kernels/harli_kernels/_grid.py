"""Shared helpers for the persistent-grid kernels.

Every heavy kernel in this package is launched with ``min(num_sms, num_tiles)`` programs and each
program walks the tile space with a stride of ``tl.num_programs(0)``.  A launch therefore never
has more than ``num_sms`` CTAs resident, so it can never occupy more than ``num_sms`` SMs, which is
what makes an SM share handed out by the co-location policy real even without green contexts.

This module also holds the tensor argument validation shared by all ops and the small Triton
helpers (:func:`mma`, :func:`grouped_tile`) used inside the kernels; the ``num_sms`` validation
and the interpreter switch, which the engine shares, are in the Triton-free :mod:`.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting

SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}


def num_programs(num_tiles: int, num_sms: int) -> int:
    """Programs of a persistent launch: never more than ``num_sms``, never more than the tiles."""
    return max(1, min(int(num_sms), int(num_tiles)))


def persistent_grid(num_tiles: int, num_sms: int) -> tuple[int]:
    return (num_programs(num_tiles, num_sms),)


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def check_float(name: str, t: torch.Tensor, dtypes=SUPPORTED_FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_device(*named: tuple[str, torch.Tensor | None]) -> torch.device:
    """All tensors on one device; CUDA normally, CPU allowed under the Triton interpreter."""
    device = None
    first = None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    if device is None:
        raise ValueError("no tensor given")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"tensors are on {device}; harli_kernels needs CUDA tensors "
            "(CPU tensors only run under Triton's interpreter, TRITON_INTERPRET=1)"
        )
    return device


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Operand dtype of the tensor-core dots: the narrowest 16-bit dtype present, else fp32."""
    for d in dtypes:
        if d in (torch.bfloat16, torch.float16):
            return d
    return torch.float32


def upcast_dots() -> bool:
    """The interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton issue #11584), so under
    the interpreter every dot operand is upcast to fp32 first; on a GPU the dots stay 16-bit."""
    return interpreting()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (operands upcast to fp32 under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear tile id to (row block, column block), walking GROUP_M row blocks together so
    that programs running at the same time share column panels of B in L2."""
    tiles_per_band = GROUP_M * num_n
    band = tile // tiles_per_band
    band_start = band * GROUP_M
    band_rows = tl.minimum(num_m - band_start, GROUP_M)
    in_band = tile - band * tiles_per_band
    pid_m = band_start + in_band % band_rows
    pid_n = in_band // band_rows
    return pid_m, pid_n
