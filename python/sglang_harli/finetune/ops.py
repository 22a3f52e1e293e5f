"""The one place that decides which implementation of the graph's ops runs.

``graph.py`` writes the model once, calling its ops through the :class:`Ops` object carried in
its ``GraphContext``. Two backends:

* ``"torch"`` (:class:`TorchOps`): the reference torch functions of ``torch_ops.py``, exact
  against PEFT. The default, and the only choice on CPU (outside tests).
* ``"triton"`` (:class:`TritonOps`): the ``harli_kernels`` Triton kernels on persistent grids of
  at most ``num_sms`` programs. For CUDA; on CPU only under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before ``harli_kernels`` is imported), which is how it is tested.

The kernels (and Triton) are imported only when ``"triton"`` is chosen; the torch path uses
only ``harli_kernels.launch``, which imports neither (the ``num_sms`` validation and the
interpreter switch live there once, for the kernels and for this module). ``num_sms`` is a
plain mutable attribute of the ops object: the scheduler's plan changes it between work units,
and every kernel launched afterwards uses the new value.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

from harli_kernels import launch
from sglang_harli.config import Kernels

from . import torch_ops
from .data import PackedBatch
from .lora import LoraPair

# The backends a trainer can run: the enum of --harli-kernels, less "auto" (resolved at start-up)
KERNELS = tuple(k.value for k in Kernels if k != Kernels.AUTO)


def check_kernels(kernels: object) -> Kernels:
    if kernels not in KERNELS:
        shown = kernels.value if isinstance(kernels, Kernels) else kernels
        raise ValueError(f"kernels {shown!r}: choose one of {KERNELS}")
    return Kernels(kernels)


def check_num_sms(num_sms: object) -> int | None:
    """``None`` (all SMs of the device) or an int >= 1 (the kernels' own check)."""
    return launch.check_num_sms(num_sms, allow_none=True)


def rope_position_tables(
    num_positions: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE kernel's fp32 tables ``[num_positions, D/2]`` (row p: position p), from
    ``torch_ops.rope_cos_sin``: the first half of its rotate-half layout, where both halves are
    equal."""
    positions = torch.arange(num_positions, device=inv_freq.device)
    cos, sin = torch_ops.rope_cos_sin(positions, inv_freq, torch.float32)
    half = inv_freq.shape[0]
    return cos[:, :half], sin[:, :half]


class Ops(Protocol):
    """The ops of the decoder and the loss head, as ``graph.py`` calls them.

    ``rope_tables`` and ``sequences`` are computed once per micro-batch (``make_context``);
    what they return is opaque to the graph and handed back to ``apply_rope``/``attention``.
    """

    name: str
    num_sms: int | None  # SM budget of the next kernel launches (None: the whole device)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def rope_tables(
        self, batch: PackedBatch, inv_freq: torch.Tensor, dtype: torch.dtype
    ) -> Any: ...

    def apply_rope(self, x: torch.Tensor, tables: Any) -> torch.Tensor: ...

    def sequences(self, batch: PackedBatch) -> Any: ...

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Any
    ) -> torch.Tensor: ...

    def lora_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora: LoraPair | None,
        scaling: float,
        dropout_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def cross_entropy_sum(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        vocab_chunk: int,
        token_chunk: int,
    ) -> torch.Tensor: ...

    def prepare_backward(self, out: torch.Tensor) -> None:
        """Called before ``out.backward`` replays a graph recorded in an earlier work unit."""


class TorchOps:
    """``torch_ops.py``'s functions (the reference, exact against PEFT). Ignores ``num_sms``."""

    name = "torch"

    def __init__(self, num_sms: int | None = None):
        self.num_sms = check_num_sms(num_sms)

    def rms_norm(self, x, weight, eps):
        return torch_ops.rms_norm(x, weight, eps)

    def rope_tables(self, batch, inv_freq, dtype):
        return torch_ops.rope_cos_sin(batch.positions, inv_freq, dtype)  # per-token (cos, sin)

    def apply_rope(self, x, tables):
        return torch_ops.apply_rope(x, *tables)

    def sequences(self, batch):
        return batch.cu_seqlens

    def attention(self, q, k, v, seqs):
        return torch_ops.attention(q, k, v, seqs)

    def lora_linear(self, x, weight, bias, lora, scaling, dropout_mask=None):
        return torch_ops.lora_linear(x, weight, bias, lora, scaling, dropout_mask)

    def swiglu(self, gate, up):
        return torch_ops.swiglu(gate, up)

    def cross_entropy_sum(self, x, weight, targets, vocab_chunk, token_chunk):
        return torch_ops.chunked_cross_entropy(x, weight, targets, vocab_chunk, token_chunk)

    def prepare_backward(self, out):
        pass


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class TritonOps:
    """The ``harli_kernels`` kernels, each launched on at most ``num_sms`` programs.

    Same maths as :class:`TorchOps` (the differences are float rounding: RoPE rotates in fp32
    with fp32 tables and rounds once; the LoRA expand is accumulated with the base GEMM in fp32).
    Base weights are cast to the compute dtype transiently, as the torch path does.
    """

    name = "triton"

    def __init__(self, num_sms: int | None = None):
        import harli_kernels  # lazily: Triton is needed only here

        self._k = harli_kernels
        self.num_sms = check_num_sms(num_sms)

    def sms(self, device: torch.device) -> int:
        """The grid cap of a launch on ``device``: ``num_sms``, or all of the device's SMs."""
        if self.num_sms is not None:
            return self.num_sms
        if device.type == "cuda":
            return _device_sms(device.index if device.index is not None else 0)
        return 1  # Triton's interpreter on the CPU: no SMs to share

    def rms_norm(self, x, weight, eps):
        # The weight in x's dtype, as the torch path multiplies it (frozen: no dW is computed).
        return self._k.rms_norm(x, _as(weight, x.dtype), eps, self.sms(x.device))

    def rope_tables(self, batch, inv_freq, dtype):
        # Per-position fp32 tables [max position + 1, D/2]; the kernel indexes them by each
        # token's position (positions restart at 0 in every packed sequence) and rounds once
        # to x's dtype, so ``dtype`` is not needed.
        cos, sin = rope_position_tables(max(batch.lengths), inv_freq)
        return batch.positions, cos, sin

    def apply_rope(self, x, tables):
        positions, cos, sin = tables
        return self._k.apply_rope(x, positions, cos, sin, self.sms(x.device))

    def sequences(self, batch):
        # int32 boundaries on the device, and the longest sequence (known on the host: no sync).
        cu = torch.tensor(batch.cu_seqlens, dtype=torch.int32, device=batch.positions.device)
        return cu, max(batch.lengths)

    def attention(self, q, k, v, seqs):
        cu, max_seqlen = seqs
        out = self._k.causal_attention_varlen(
            q, k, v, cu, self.sms(q.device), max_seqlen=max_seqlen
        )
        return out.reshape(q.shape[0], -1)

    def lora_linear(self, x, weight, bias, lora, scaling, dropout_mask=None):
        n = self.sms(x.device)
        w = _as(weight, x.dtype)
        b = None if bias is None else _as(bias, x.dtype)
        if lora is None:  # a projection without adapter: the persistent GEMM, then the bias
            y = self._k.linear(x, w, n)
            return y if b is None else y + b
        # fp32 adapter masters go in as they are: the kernel runs its dots in x's dtype and
        # returns dA/dB in fp32.
        return self._k.lora_linear(
            x, w, lora.A, lora.B, scaling, n, bias=b, dropout_mask=dropout_mask
        )

    def swiglu(self, gate, up):
        return self._k.swiglu(gate, up, self.sms(gate.device))

    def cross_entropy_sum(self, x, weight, targets, vocab_chunk, token_chunk):
        # The one fallback to torch. The fused kernel computes in the narrower dtype of its
        # operands, so fp32 hidden states over a 16-bit lm_head (TrainConfig.compute_dtype wider
        # than the model's) would be rounded to 16 bits, and casting the whole lm_head instead
        # would copy [vocab x hidden]; the torch path casts one vocabulary chunk at a time.
        # No targets (not reachable from validated datasets) also goes to torch, which returns
        # a zero gradient where the kernel returns none.
        if (x.dtype == torch.float32 and weight.dtype != torch.float32) or x.shape[0] == 0:
            return torch_ops.chunked_cross_entropy(x, weight, targets, vocab_chunk, token_chunk)
        # Tiles are [64 tokens x vocab_chunk] (token_chunk does not apply); every target given
        # is valid, so the sum over tokens is graph.head_loss_sum's summed loss.
        return self._k.fused_linear_cross_entropy(
            x, weight, targets, self.sms(x.device), chunk_size=vocab_chunk, reduction="sum"
        )

    def prepare_backward(self, out):
        """Give the kernels of ``out``'s recorded graph the current budget for their backward.

        Without checkpointing, a backward unit replays the graph its forward unit recorded, and
        each ``harli_kernels`` autograd Function launches its backward with the ``num_sms`` kept
        on its ctx (``ctx.num_sms``; the ctx is the graph node) at forward time. The walk stops
        at leaves (the layer input and the adapters), so it covers one layer's graph.
        """
        n = self.sms(out.device)
        seen, stack = set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if hasattr(node, "num_sms"):
                node.num_sms = n
            stack.extend(fn for fn, _ in node.next_functions)


def make_ops(
    kernels: Kernels | str = Kernels.TORCH,
    num_sms: int | None = None,
    device: torch.device | str | None = None,
) -> TorchOps | TritonOps:
    """The ops backend: ``"torch"`` or ``"triton"`` (``harli_kernels``, imported only here).

    ``num_sms``: the SM budget of every launch (``None``: all SMs of the device); change it
    later with ``ops.num_sms = n``. With ``device``, ``"triton"`` on a non-CUDA device is
    refused unless Triton's interpreter is on.
    """
    kernels = check_kernels(kernels)
    num_sms = check_num_sms(num_sms)
    if kernels == Kernels.TORCH:
        return TorchOps(num_sms)
    if device is not None and torch.device(device).type != "cuda" and not launch.interpreting():
        raise ValueError(
            f"kernels='triton' runs on CUDA, not on {torch.device(device).type} (on CPU only "
            "under Triton's interpreter: TRITON_INTERPRET=1 before harli_kernels is imported); "
            "use kernels='torch'"
        )
    try:
        return TritonOps(num_sms)
    except ImportError as e:
        raise ImportError(f"kernels='triton' needs triton and harli_kernels: {e}") from e
