"""Triton finetune kernels on SM-limited persistent grids (issue 5).

Every heavy kernel takes ``num_sms`` explicitly and launches ``min(num_sms, tiles)`` programs
that loop over their tiles, so a finetune step never occupies more SMs than the co-location
policy granted.  :mod:`harli_kernels.sm_partition` adds CUDA green contexts on top where the
driver supports them.  This package imports nothing from SGLang or ``sglang_harli``.

Run on CPU with ``TRITON_INTERPRET=1`` (set before Triton is imported) for testing.
"""

from .attention import causal_attention_varlen, causal_attention_varlen_reference
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .lora import fused_base_lowrank_matmul, lora_linear, lora_linear_reference
from .matmul import (
    linear,
    linear_forward,
    linear_input_grad,
    linear_reference,
    linear_weight_grad,
    matmul_reference,
    persistent_matmul,
)
from .norm import rms_norm, rms_norm_reference
from .rope import (
    apply_rope,
    apply_rope_reference,
    rope_cos_sin,
    rope_cos_sin_cache,
    rope_inv_freq,
)
from .sm_partition import SMPartitionLadder, SMShare, green_contexts_available
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "SMPartitionLadder",
    "SMShare",
    "apply_rope",
    "apply_rope_reference",
    "causal_attention_varlen",
    "causal_attention_varlen_reference",
    "fused_base_lowrank_matmul",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "green_contexts_available",
    "linear",
    "linear_forward",
    "linear_input_grad",
    "linear_reference",
    "linear_weight_grad",
    "lora_linear",
    "lora_linear_reference",
    "matmul_reference",
    "persistent_matmul",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_cos_sin_cache",
    "rope_inv_freq",
    "swiglu",
    "swiglu_reference",
]
