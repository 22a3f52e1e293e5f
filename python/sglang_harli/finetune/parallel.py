"""Tensor parallelism: each rank trains on its own shard of the served weights.

The shards are SGLang's (and Megatron's): a decoder layer's ``q/k/v_proj`` and ``gate/up_proj``
are *column parallel* (each rank holds a slice of the output rows: its attention heads, its
share of the intermediate features), ``o_proj`` and ``down_proj`` *row parallel* (a slice of the
input columns), and the embedding and the lm_head *vocabulary parallel* (a slice of the
vocabulary rows). Adapters are sharded as SGLang's LoRA serving shards them: on a column
parallel layer A whole and B split on outputs, on a row parallel one A split on inputs and B
whole; so ``B (A x)`` is exact on every rank without another collective.

What crosses ranks (all over the group SGLang's tensor-parallel ranks share), per layer:

- forward: the row parallel outputs are summed (:func:`reduce_from`), as in SGLang's forward;
- backward: the gradient reaching a column parallel layer's (replicated) input is summed
  (:func:`copy_to`), since each rank's slice of outputs contributes part of it;
- per optimizer step: gradients of the replicated adapter halves (A of a column parallel layer,
  B of a row parallel one) are summed, and the gradient norm is one global norm;
- the loss head: a vocabulary-parallel cross-entropy (``graph.py``) reduces the softmax's max
  and sum and the gradient of its input.

No SGLang here: a :class:`TensorParallel` holds any ``torch.distributed`` group (SGLang's TP
group in a server; a gloo group in the tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .lora import LoraAdapters, LoraPair

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group; ``group`` is a ``torch.distributed``
    process group (None: the default group)."""

    rank: int
    size: int
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of {self.size}")

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` (divisible by the group's size)."""
        if n % self.size:
            raise ValueError(f"{n} does not split evenly over {self.size} ranks")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``op="max"``) ``t`` over the ranks, in place."""
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(t, op=reduce_op, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' ``t`` (equal shapes) concatenated along ``dim``, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


# --- the two conjugate operators (Megatron's f and g) ----------------------------------------


class _CopyTo(torch.autograd.Function):
    """Forward: the replicated input as it is. Backward: its gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce(grad.contiguous().clone()), None


class _ReduceFrom(torch.autograd.Function):
    """Forward: partial outputs summed over ranks. Backward: the (replicated) gradient as is."""

    @staticmethod
    def forward(ctx, x, tp):
        return tp.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _CopyTo.apply(x, tp)


def reduce_from(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _ReduceFrom.apply(x, tp)


# --- adapters --------------------------------------------------------------------------------


def shard_dim(name: str) -> int | None:
    """The dimension along which the adapter tensor ``layers.{i}.{module}.lora_{A,B}`` is split
    over the ranks, or None if every rank holds all of it."""
    *_, module, part = name.split(".")
    if part == "lora_A" and module in ROW_PARALLEL:
        return 1  # A [r, in]: the rank's input columns
    if part == "lora_B" and module in COLUMN_PARALLEL:
        return 0  # B [out, r]: the rank's output rows
    return None


def shard_tensor(name: str, t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of the whole adapter tensor ``name`` (a copy)."""
    dim = shard_dim(name)
    if dim is None:
        return t.clone()
    return t[(slice(None),) * dim + (tp.slice(t.shape[dim]),)].clone()


def shard_adapters(adapters: LoraAdapters, tp: TensorParallel | None) -> LoraAdapters:
    """This rank's shards of whole adapters (fresh leaves); the same adapters without ``tp``.
    Created whole first, the shards of every rank together are exactly the TP 1 adapters."""
    if tp is None:
        return adapters
    layers = []
    for i, pairs in enumerate(adapters.layers):
        layers.append(
            {
                module: LoraPair(
                    A=shard_tensor(
                        f"layers.{i}.{module}.lora_A", p.A.detach(), tp
                    ).requires_grad_(),
                    B=shard_tensor(
                        f"layers.{i}.{module}.lora_B", p.B.detach(), tp
                    ).requires_grad_(),
                )
                for module, p in pairs.items()
            }
        )
    return LoraAdapters(adapters.config, layers)


def gather_tensor(name: str, t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The whole adapter tensor ``name`` from every rank's shard (a collective); a replicated
    tensor is this rank's, which every rank holds alike."""
    dim = shard_dim(name)
    return t if dim is None else tp.all_gather(t, dim)


def reduce_replicated_grads(named: Iterable[tuple[str, torch.Tensor]], tp: TensorParallel) -> None:
    """Sum the gradients of the replicated adapter halves over the ranks: each rank's holds only
    the part its shard of the activations contributed. One collective for all of them."""
    grads = [p.grad for name, p in named if shard_dim(name) is None and p.grad is not None]
    if not grads:
        return
    flat = tp.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(named: Iterable[tuple[str, torch.Tensor]], tp: TensorParallel) -> torch.Tensor:
    """The 2-norm of the whole adapters' gradient: sharded tensors' squares summed over the
    ranks, replicated ones (already reduced) counted once."""
    named = list(named)
    sharded = torch.zeros((), dtype=torch.float32)
    replicated = torch.zeros((), dtype=torch.float32)
    for name, p in named:
        if p.grad is None:
            continue
        square = p.grad.detach().float().pow(2).sum().cpu()
        if shard_dim(name) is None:
            replicated += square
        else:
            sharded += square
    device = next((p.device for _, p in named), torch.device("cpu"))
    total = tp.all_reduce(sharded.to(device)).cpu() + replicated
    return total.sqrt()
