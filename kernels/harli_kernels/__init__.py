"""Triton finetune kernels on SM-limited persistent grids.

Every heavy kernel takes ``num_sms`` explicitly and launches ``min(num_sms, tiles)`` programs
that loop over their tiles, so a finetune step never occupies more SMs than the co-location
policy granted.  :mod:`harli_kernels.sm_partition` adds CUDA green contexts on top where the
driver supports them.  This package imports nothing from SGLang or ``sglang_harli``.

The ops are imported lazily (on first access of ``harli_kernels.<name>``): importing the package,
or its Triton-free :mod:`harli_kernels.launch` (``num_sms`` validation, the interpreter switch,
shared with the finetune engine), does not import Triton.

Run on CPU with ``TRITON_INTERPRET=1`` (set before Triton is imported) for testing.
"""

from __future__ import annotations

import importlib

# public name -> submodule defining it. No submodule is named like one of its functions: the
# import system binds a package attribute to a submodule when that submodule is first imported,
# which would shadow a lazily exported function of the same name.
_EXPORTS = {
    "causal_attention_varlen": "attention",
    "fused_linear_cross_entropy": "cross_entropy",
    "fused_base_lowrank_matmul": "lora",
    "lora_linear": "lora",
    "linear": "matmul",
    "linear_forward": "matmul",
    "linear_input_grad": "matmul",
    "linear_weight_grad": "matmul",
    "persistent_matmul": "matmul",
    "rms_norm": "norm",
    "apply_rope": "rope",
    "swiglu": "activation",
    "SMPartitionLadder": "sm_partition",
    "SMShare": "sm_partition",
    "green_contexts_available": "sm_partition",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
