"""What a kernel launch and its caller agree on, without Triton or torch.

The finetune engine (``sglang_harli.finetune.ops``) validates its SM budget and asks whether
Triton's interpreter is on with these functions too, so they exist once; importing this module
imports neither Triton nor torch (``harli_kernels/__init__`` is lazy), which keeps the engine's
torch path free of Triton.
"""

from __future__ import annotations

import operator
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_num_sms(num_sms: object, *, allow_none: bool = False) -> int | None:
    """Validate an SM budget and return it as an ``int``: an int >= 1 (bools and floats are
    refused), or ``None`` (all SMs of the device) when ``allow_none``."""
    if num_sms is None and allow_none:
        return None
    expected = "None or an int >= 1" if allow_none else "an int >= 1"
    if isinstance(num_sms, bool):
        raise ValueError(f"num_sms must be {expected}, got {num_sms!r}")
    try:
        value = operator.index(num_sms)
    except TypeError:
        raise ValueError(f"num_sms must be {expected}, got {num_sms!r}") from None
    if value < 1:
        raise ValueError(f"num_sms must be {expected}, got {value}")
    return value
