"""The trainer: optimizer steps cut into work units that a scheduler runs when it can.

A step takes the next ``global_batch_size`` sequences, packs them into micro-batches, and
becomes this list of units (L layers)::

    for each micro-batch: forward 0 .. forward L-1, head (loss and its gradient),
                          [recompute L-1,] backward L-1 .. [recompute 0,] backward 0
    optimizer (clip, AdamW, learning-rate schedule)

Between units only what the next units need is kept: with activation checkpointing, each
layer's input (and, between a recompute unit and its backward, that one layer's graph);
without, each layer's autograd graph. The loss is summed over micro-batches
and divided by the number of target tokens of the whole global batch, so the maths of a
step does not depend on how it is sliced into micro-batches (only on float summation order).
Until the optimizer unit runs, a step can be abandoned and is then redone from scratch, on
the same sequences with the same dropout masks.

The ops run on the backend ``TrainConfig.kernels`` names (``ops.py``): torch_ops.py's
functions, or the ``harli_kernels`` Triton kernels on at most ``num_sms`` SMs, which
:meth:`Trainer.set_num_sms` changes for the units that run next.

With an :class:`~sglang_harli.memory.arena.Arena` (``memory``), the checkpointed layer inputs,
the bulk of a step's activations (layers x tokens x hidden), live in arena blocks: memory another
owner lends (a server's free KV slots) and may take back between any two units. A unit whose
saved input was taken back recomputes it from the nearest earlier input still held (or from the
embeddings): the same ops on the same values, so the step's result is bit-identical; only that
unit does extra work, never the whole step. A forward unit that finds no room in the arena raises
:class:`MemoryWait` before changing anything: the caller runs it again once memory is lent. The
micro-batches of a step are sized to what the arena can hold when the step is planned. The
activations inside one unit, the gradient flowing back between units, the adapters and AdamW's
state stay in ordinary memory: small (one layer, one activation, rank-r matrices), and the last
two must never be lost.

Checkpoints (``checkpoint.py``, the format) come in two halves so that a server's scheduler
thread does only the cheap one: :meth:`Trainer.snapshot` copies the adapters, the AdamW state and
the counters into host memory (asynchronously on a GPU, into pinned buffers reserved ahead), and
:func:`~.checkpoint.write_checkpoint` writes such a snapshot durably, from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_harli.config import Kernels
from sglang_harli.memory.arena import Arena, Block

from . import checkpoint, graph, parallel
from . import ops as ops_mod
from .base_model import BaseModelView
from .checkpoint import TrainerSnapshot
from .data import Example, PackedBatch, pack
from .lora import LoraAdapters, sequence_seed

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # one of SCHEDULES, after warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio at total_steps
    total_steps: int | None = None  # None: `epochs` passes over the dataset
    epochs: float = 1.0
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # at most this many sequences packed per micro-batch...
    micro_batch_tokens: int | None = None  # ...and at most this many tokens (if set)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    checkpointing: bool = True
    compute_dtype: torch.dtype | None = None  # None: the base model's dtype
    vocab_chunk: int = graph.DEFAULT_VOCAB_CHUNK
    token_chunk: int = graph.DEFAULT_TOKEN_CHUNK
    shuffle: bool = True
    seed: int = 0  # data order and dropout masks
    # the ops backend: TORCH (torch_ops.py) or TRITON (harli_kernels, CUDA); a string is taken
    kernels: Kernels = Kernels.TORCH
    num_sms: int | None = None  # "triton": SMs per launch at first (None: all of the device's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", ops_mod.check_kernels(self.kernels))
        ops_mod.check_num_sms(self.num_sms)
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: one of {SCHEDULES}")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warm-up rises linearly to ``lr`` and reaches it at step ``warmup_steps - 1`` (the first
    step already trains); then the schedule goes from ``lr`` to ``lr * min_lr_ratio`` at
    ``total_steps``.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay)


@dataclasses.dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # sequences consumed: the data cursor
    tokens: int = 0  # target tokens trained on
    last_loss: float | None = None
    last_grad_norm: float | None = None
    last_lr: float | None = None
    units_run: int = 0
    abandoned_steps: int = 0
    skipped_steps: int = 0  # non-finite gradients: no update


@dataclasses.dataclass(frozen=True)
class StepResult:
    step: int  # the step just taken (0-based)
    loss: float  # mean over the global batch's target tokens
    lr: float
    grad_norm: float  # before clipping
    num_sequences: int
    num_targets: int
    skipped: bool = False  # non-finite gradient norm: the update was not applied
    # the largest |adapter weight| this step's loss was computed with (before its update)
    weight_max: float = 0.0


class MemoryWait(RuntimeError):
    """The arena has no room for the next unit's checkpoint: nothing ran; try again later."""


@dataclasses.dataclass
class MemoryUse:
    """How training used the arena (``Trainer.memory``), for status and tests."""

    waits: int = 0  # forward units that found no room and did not run
    blocks_lost: int = 0  # checkpointed inputs taken back by a revoke before their backward
    recomputed_layers: int = 0  # layer forwards rerun to rebuild lost inputs
    micro_batch_tokens: int | None = None  # the token cap memory set at the last step's plan


@dataclasses.dataclass(eq=False)
class WorkUnit:
    """One schedulable slice of a step. ``cost`` estimates FLOPs; ``run`` must go in order."""

    kind: str  # "forward", "head", "backward" or "optimizer"
    step: int
    micro_batch: int | None
    layer: int | None
    tokens: int
    cost: float
    _fn: Callable[[], StepResult | None] = dataclasses.field(repr=False)
    _trainer: Trainer = dataclasses.field(repr=False)

    def run(self) -> StepResult | None:
        """Run this unit; the optimizer unit returns the finished step's result.

        A unit that raises (out of memory, say) leaves its step half done: abandon it.
        """
        return self._trainer._run(self)


@dataclasses.dataclass
class _MicroBatch:
    batch: PackedBatch
    ctx: graph.GraphContext
    # per layer, checkpointing: its input (a tensor, or an arena Block), then between its
    # recompute and backward units (input leaf, output, Block or None); without checkpointing:
    # (input leaf, output)
    saved: list
    carry: torch.Tensor | None = None  # the next layer's input, or the gradient going back


@dataclasses.dataclass
class _Step:
    index: int
    examples: list[Example]
    micro: list[_MicroBatch]
    num_targets: int
    units: list[WorkUnit] = dataclasses.field(default_factory=list)
    next: int = 0
    loss_sum: torch.Tensor | None = None


class Trainer:
    """Trains ``adapters`` on ``dataset`` over the frozen ``view``, one work unit at a time."""

    def __init__(
        self,
        view: BaseModelView,
        adapters: LoraAdapters,
        dataset: Sequence[Example],
        config: TrainConfig = TrainConfig(),
        memory: Arena | None = None,
    ):
        if not dataset:
            raise ValueError("empty dataset")
        self.view, self.adapters, self.dataset, self.config = view, adapters, dataset, config
        # checkpointed layer inputs live here when set (only with checkpointing: without it a
        # step keeps autograd graphs, which torch allocates)
        self.memory = memory if config.checkpointing else None
        self.memory_use = MemoryUse()
        self.dtype = config.compute_dtype or view.dtype
        self.total_steps = config.total_steps or math.ceil(
            config.epochs * len(dataset) / config.global_batch_size
        )
        self.optimizer = adapters.make_optimizer(
            config.lr, config.betas, config.eps, config.weight_decay
        )
        self.ops = ops_mod.make_ops(config.kernels, config.num_sms, view.device)
        self.state = TrainerState()
        self._step: _Step | None = None
        self._orders: dict[int, list[int]] = {}
        self._buffers = checkpoint.SnapshotBuffers()  # what snapshots copy into

    # --- scheduler-facing API ----------------------------------------------------------------

    def set_num_sms(self, num_sms: int | None) -> None:
        """SM budget of every kernel the next units launch (``None``: the whole device).

        Takes effect at once, also inside an open step: a backward unit replays the graph of its
        recompute unit (checkpointing) or of its forward unit with the budget updated
        (``Ops.prepare_backward``). The torch backend accepts and ignores it.
        """
        self.ops.num_sms = ops_mod.check_num_sms(num_sms)

    @property
    def num_sms(self) -> int | None:
        return self.ops.num_sms

    def weight_max(self) -> float:
        """The largest magnitude of any adapter weight (every rank's shards at TP > 1: a
        collective): what tells a blown-up adapter whose weights are still finite."""
        norms = torch._foreach_norm(self.adapters.parameters(), math.inf)
        largest = torch.stack(norms).max()
        if self.view.tp is not None:
            largest = self.view.tp.all_reduce(largest, op="max")
        return largest.item()

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    @property
    def step_planned(self) -> bool:
        """Whether the next step's micro-batches are packed (``pending_work`` packs them)."""
        return self._step is not None or self.done

    def pending_work(self) -> list[WorkUnit]:
        """The units left in the current step (planning the next step if none is open)."""
        if self._step is None:
            if self.done:
                return []
            with torch.inference_mode(False):  # its tensors take part in autograd later
                self._step = self._plan_step()
        return self._step.units[self._step.next :]

    def next_unit(self) -> WorkUnit | None:
        pending = self.pending_work()
        return pending[0] if pending else None

    def unit_after(self, unit: WorkUnit) -> WorkUnit | None:
        """The unit that runs after ``unit`` in its step, if that step is still open (what an
        executor may queue behind it before it has run); None after the step's last."""
        step = self._step
        if step is None or step.index != unit.step:
            return None
        units = step.units
        for i in range(step.next, len(units)):
            if units[i] is unit:
                return units[i + 1] if i + 1 < len(units) else None
        return None

    def run_step(self) -> StepResult | None:
        """Run every remaining unit of the current (or next) step."""
        result = None
        while (unit := self.next_unit()) is not None:
            result = unit.run()
            if result is not None:
                return result
        return result

    def train(self) -> list[StepResult]:
        results = []
        while not self.done:
            results.append(self.run_step())
        return results

    def abandon_step(self) -> None:
        """Drop the open step: activations and gradients go; the next step redoes it."""
        if self._step is None:
            return
        for mb in self._step.micro:
            for saved in mb.saved:
                self._free(saved)
        self._step = None
        self.optimizer.zero_grad(set_to_none=True)
        self.state.abandoned_steps += 1

    def shrink_waiting_step(self) -> bool:
        """The next unit is a forward waiting for memory: if its micro-batch packs more than
        one example, drop the open step so that it is planned again now, in micro-batches
        sized to the memory there is (at least one example each). A step is planned for the
        memory lent at the time; when a burst takes that back, the job goes on in what is left
        (a per-job reserve holds the smallest micro-batch) instead of waiting for it to return.
        The same maths, another summation order. False when that would not help."""
        step = self._step
        if step is None or self.memory is None or step.next >= len(step.units):
            return False
        unit = step.units[step.next]
        if unit.kind != "forward" or len(step.micro[unit.micro_batch].batch.cu_seqlens) <= 2:
            return False
        self.abandon_step()
        return True

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, base_model_name_or_path: str = "") -> None:
        """A PEFT adapter directory plus ``trainer_state.pt`` (fp32 masters, AdamW, counters),
        written durably; :meth:`snapshot` and :func:`~.checkpoint.write_checkpoint` in one
        call."""
        snapshot = self.snapshot()
        try:
            checkpoint.write_checkpoint(
                path,
                snapshot,
                dtype=self.view.dtype,
                base_model_name_or_path=base_model_name_or_path,
            )
        finally:
            snapshot.release()

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from :meth:`save_checkpoint` output (same dataset and config)."""
        self.restore(checkpoint.read_checkpoint(path, self.view.device))

    def restore(self, saved: dict[str, Any]) -> None:
        """Resume from :func:`~.checkpoint.read_checkpoint` output; raises (changing nothing
        the next restore would not replace) if it does not fit these adapters."""
        self.abandon_step()
        saved = checkpoint.shards_of(saved, self.adapters, self.view.tp)
        self.adapters.load_state_dict(saved["adapters"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = TrainerState(**saved["state"])

    def reserve_snapshot_memory(self) -> None:
        """Allocate the host buffers snapshots copy into (pinned on a GPU, which is slow to
        allocate: call this off the serving thread, before the first snapshot)."""
        tensors = checkpoint.snapshot_tensors(self.adapters, self.optimizer, True)
        self._buffers.reserve(tensors)

    @property
    def can_snapshot(self) -> bool:
        """False while the previous snapshot's buffers are still being written."""
        return self._buffers.available

    def snapshot(self) -> TrainerSnapshot:
        """Copy the trainer's state to host memory (cheap: copies into reserved buffers,
        asynchronous on a GPU); the returned snapshot is what
        :func:`~.checkpoint.write_checkpoint` writes. Its buffers are this trainer's until
        :meth:`~.checkpoint.TrainerSnapshot.release`."""
        if self._step is not None:
            raise RuntimeError("a step is open: finish or abandon it before saving")
        return checkpoint.take_snapshot(
            self.adapters,
            self.optimizer,
            dataclasses.asdict(self.state),
            self._buffers,
            self.view.tp,
        )

    # --- planning ----------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            n = len(self.dataset)
            if self.config.shuffle:
                gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._orders = {epoch: torch.randperm(n, generator=gen).tolist()}
            else:
                self._orders = {epoch: list(range(n))}
        return self._orders[epoch]

    def _plan_step(self) -> _Step:
        cfg, n = self.config, len(self.dataset)
        start, index = self.state.samples, self.state.step
        positions = range(start, start + cfg.global_batch_size)
        examples = [self.dataset[self._order(p // n)[p % n]] for p in positions]
        seeds = [sequence_seed(cfg.seed, index, j) for j in range(len(examples))]
        step = _Step(index, examples, [], sum(e.num_targets for e in examples))
        for group in self._micro_groups(examples):
            batch = pack([examples[j] for j in group], [seeds[j] for j in group], self.view.device)
            ctx = graph.make_context(
                self.view, self.adapters, batch, self.dtype, training=True, ops=self.ops
            )
            step.micro.append(_MicroBatch(batch, ctx, [None] * self.view.config.num_layers))
        step.units = self._units(step)
        return step

    def _micro_groups(self, examples: list[Example]) -> list[list[int]]:
        """Greedy, order-preserving packing under the sequence and token caps."""
        cap_seqs, cap_tokens = self.config.micro_batch_size, self.config.micro_batch_tokens
        if self.memory is not None:
            fits = self._memory_tokens(max(len(ex.input_ids) for ex in examples) * cap_seqs)
            self.memory_use.micro_batch_tokens = fits
            cap_tokens = fits if cap_tokens is None else min(cap_tokens, fits)
        groups: list[list[int]] = [[]]
        tokens = 0
        for j, ex in enumerate(examples):
            n = len(ex.input_ids)
            full = len(groups[-1]) >= cap_seqs or (
                cap_tokens is not None and tokens + n > cap_tokens
            )
            if groups[-1] and full:
                groups.append([])
                tokens = 0
            groups[-1].append(j)
            tokens += n
        return groups

    def smallest_memory_need(self) -> tuple[int, int] | None:
        """What the smallest micro-batch keeps in the arena, as (blocks, bytes each): one layer
        input per layer for the longest single example (a micro-batch packs at least one).
        None when nothing is kept there (no arena, or no checkpointing)."""
        if self.memory is None or not self.config.checkpointing:
            return None
        longest = max(len(ex.input_ids) for ex in self.dataset)
        return self.view.config.num_layers, longest * self._token_bytes()

    def _token_bytes(self) -> int:
        """Bytes of one token's checkpointed layer input."""
        return self.view.config.hidden_size * torch.empty((), dtype=self.dtype).element_size()

    def _memory_tokens(self, most: int) -> int:
        """The most tokens (up to ``most``) whose checkpointed inputs, one per layer, fit in
        the arena's free space now: the micro-batch size follows the memory lent (at least one
        sequence is packed anyway; its forward waits until the memory is there)."""
        layers = self.view.config.num_layers
        per_token = self._token_bytes()
        lo, hi = 0, most
        while lo < hi:  # the largest t with `layers` blocks of t tokens fitting
            mid = (lo + hi + 1) // 2
            if self.memory.count_fitting(mid * per_token) >= layers:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _units(self, step: _Step) -> list[WorkUnit]:
        c, lora = self.view.local, self.adapters.config  # this rank's share of the work
        # Backward is about twice a forward. With checkpointing the layer's forward is first
        # recomputed, in a unit of its own: smaller units pack into a decode iteration's slack
        # more tightly than one unit three forwards long.
        units = []

        def unit(kind, m, layer, tokens, cost, fn):
            units.append(WorkUnit(kind, step.index, m, layer, tokens, cost, fn, self))

        for m, mb in enumerate(step.micro):
            t = mb.batch.num_tokens
            fwd = graph.layer_forward_flops(c, lora, mb.batch.lengths)
            for i in range(c.num_layers):
                unit("forward", m, i, t, fwd, lambda mb=mb, i=i: self._forward(mb, i))
            # the lm_head GEMM twice: logits, then their gradient (formed in the forward)
            head = graph.head_forward_flops(c, mb.batch.num_targets) * 2.0
            unit("head", m, None, t, head, lambda mb=mb: self._head(mb, step))
            for i in reversed(range(c.num_layers)):
                if self.config.checkpointing:
                    unit("recompute", m, i, t, fwd, lambda mb=mb, i=i: self._recompute(mb, i))
                unit("backward", m, i, t, fwd * 2.0, lambda mb=mb, i=i: self._backward(mb, i))
        params = sum(p.numel() for p in self.adapters.parameters())
        tokens = sum(mb.batch.num_tokens for mb in step.micro)
        unit("optimizer", None, None, tokens, 12.0 * params, lambda: self._optimizer(step))
        return units

    # --- the units ---------------------------------------------------------------------------

    def _run(self, unit: WorkUnit) -> StepResult | None:
        step = self._step
        if step is None or step.next >= len(step.units) or step.units[step.next] is not unit:
            raise RuntimeError(f"{unit.kind} unit is stale or out of order (abandoned step?)")
        # Servers run under torch.inference_mode(); training needs autograd whatever the caller.
        with torch.inference_mode(False):
            result = unit._fn()
        step.next += 1
        self.state.units_run += 1
        if unit.kind == "optimizer":
            self._step = None
        return result

    def _forward(self, mb: _MicroBatch, i: int) -> None:
        h = graph.embed(self.view, mb.ctx) if i == 0 else mb.carry
        if self.config.checkpointing:
            # the layer input: all that stays until the backward
            mb.saved[i] = h if self.memory is None else self._keep(h)
            if mb.saved[i] is None:
                self.memory_use.waits += 1
                raise MemoryWait(f"no room in the arena for {h.numel() * h.element_size()} bytes")
            with torch.no_grad():
                mb.carry = graph.layer_forward(self.view, self.adapters, i, h, mb.ctx)
        else:
            x = h.detach().requires_grad_(i > 0)
            with torch.enable_grad():
                out = graph.layer_forward(self.view, self.adapters, i, x, mb.ctx)
            mb.saved[i] = (x, out)
            mb.carry = out.detach()

    def _head(self, mb: _MicroBatch, step: _Step) -> None:
        h = mb.carry.detach().requires_grad_()
        with torch.enable_grad():
            loss = graph.head_loss_sum(
                self.view, h, mb.ctx, self.config.vocab_chunk, self.config.token_chunk
            )
            (loss / step.num_targets).backward()
        step.loss_sum = loss.detach() if step.loss_sum is None else step.loss_sum + loss.detach()
        mb.carry = h.grad

    def _recompute(self, mb: _MicroBatch, i: int) -> None:
        """Checkpointing: the layer's forward again, from its saved input, keeping its graph
        for the backward unit that follows."""
        saved = mb.saved[i]
        block = saved if isinstance(saved, Block) and saved.valid else None
        x = self._input(mb, i).detach().requires_grad_(i > 0)
        with torch.enable_grad():
            out = graph.layer_forward(self.view, self.adapters, i, x, mb.ctx)
        mb.saved[i] = (x, out, block)  # the graph reads x: the block must outlive it

    def _backward(self, mb: _MicroBatch, i: int) -> None:
        if self.config.checkpointing:
            x, out, block = mb.saved[i]
            if block is not None and not block.valid:  # taken back since the recompute:
                mb.saved[i] = block  # the graph read memory that is not ours any more
                self._recompute(mb, i)  # redo that unit (its input rebuilt), then go on
                x, out, block = mb.saved[i]
        else:
            (x, out), block = mb.saved[i], None
        self.ops.prepare_backward(out)  # an earlier unit's graph: the current num_sms
        mb.saved[i] = None
        out.backward(mb.carry)
        mb.carry = x.grad if i > 0 else None
        self._free(block)

    # --- checkpointed inputs in the arena ------------------------------------------------------

    def _keep(self, h: torch.Tensor) -> Block | None:
        """A copy of ``h`` in an arena block, or None if the arena has no room."""
        block = self.memory.alloc(h.shape, h.dtype, owner=self._lost)
        if block is not None:
            block.tensor.copy_(h)
        return block

    def _lost(self, block: Block) -> None:
        self.memory_use.blocks_lost += 1

    def _input(self, mb: _MicroBatch, i: int) -> torch.Tensor:
        """Layer ``i``'s saved input; if the arena took it back, recomputed from the nearest
        earlier input still held (or the embeddings), re-kept where the arena has room."""
        saved = mb.saved[i]
        if not isinstance(saved, Block):
            return saved
        if saved.valid:
            return saved.tensor
        j = i  # the nearest earlier input still held, else the embeddings (layer 0's input)
        while j > 0 and not (isinstance(mb.saved[j - 1], Block) and mb.saved[j - 1].valid):
            j -= 1
        if j > 0:
            start, h = j - 1, mb.saved[j - 1].tensor
        else:
            start, h = 0, graph.embed(self.view, mb.ctx)
        with torch.no_grad():
            for k in range(start, i):  # h is layer k's input; its output is layer k+1's
                h = graph.layer_forward(self.view, self.adapters, k, h, mb.ctx)
                self.memory_use.recomputed_layers += 1
                if k + 1 < i:  # a lower layer's input, lost too: kept again if there is room
                    mb.saved[k + 1] = self._keep(h) or mb.saved[k + 1]
        return h

    def _free(self, saved: Any) -> None:
        if isinstance(saved, tuple):
            saved = saved[-1] if len(saved) == 3 else None
        if isinstance(saved, Block) and self.memory is not None:
            self.memory.free(saved)

    def _optimizer(self, step: _Step) -> StepResult:
        params = self.adapters.parameters()
        max_norm = self.config.max_grad_norm
        tp = self.view.tp
        if tp is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
        else:  # the whole adapters' gradient: replicated halves summed, one global norm
            named = list(self.adapters.named_parameters())
            parallel.reduce_replicated_grads(named, tp)
            norm = parallel.global_grad_norm(named, tp)
            if max_norm and math.isfinite(norm.item()):  # as clip_grad_norm_ scales
                coef = min(1.0, max_norm / (norm.item() + 1e-6))
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        lr = lr_at(self.config, step.index, self.total_steps)
        loss = (step.loss_sum / step.num_targets).item()
        weight_max = self.weight_max()  # the weights this step's loss came from
        if math.isfinite(norm.item()):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        else:
            logger.warning("step %d: non-finite gradient norm, update skipped", step.index)
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        s = self.state
        s.step += 1
        s.samples += len(step.examples)
        s.tokens += step.num_targets
        s.last_loss, s.last_grad_norm, s.last_lr = loss, norm.item(), lr
        logger.debug("step %d: loss %.4f lr %.3g grad norm %.3g", step.index, loss, lr, norm)
        skipped = not math.isfinite(norm.item())
        return StepResult(
            step.index,
            loss,
            lr,
            norm.item(),
            len(step.examples),
            step.num_targets,
            skipped,
            weight_max,
        )
