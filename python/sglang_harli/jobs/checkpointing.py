"""A running job's checkpoints: validation, then snapshot, then encoding, then hand-over.

The runner (``runner.py``) decides when a checkpoint is due (every ``checkpoint_every`` steps
and at the end); from there a :class:`Checkpointing` takes it through its work units on the
scheduler thread, each small enough for a slice beside decode:

1. ``validation``: one validation example's loss each (if the job has a validation file);
2. ``checkpoint``: the trainer's state copied into host buffers reserved ahead
   (``Trainer.snapshot``): a :class:`~sglang_harli.finetune.checkpoint.TrainerSnapshot`;
3. ``encode`` (on a CPU): the snapshot's files encoded, :data:`ENCODE_TENSORS` tensors a unit
   (on the agent's thread that torch and Python work would contend with decode for the GIL; on
   a GPU the copy is still landing and the agent's thread encodes it);
4. hand-over: the files' write (``finetune/checkpoint.write_checkpoint``: the format module,
   not the trainer) and the rows that record them go to the job's link, which the agent's
   thread writes, durably, while training goes on. The final checkpoint also writes the adapter
   the publisher loads, and ends the runner's part of the job.

Names, since "checkpoint" means several things: a *checkpoint* is the directory on disk
(``jobs/<id>/checkpoints/step-<n>``, :data:`~.store.CHECKPOINTS_DIR`); a
:class:`PendingCheckpoint` is one on its way through the steps above; the trainer's state in
host memory is a ``TrainerSnapshot`` (``finetune/checkpoint.py``, the format); the store's row
for a written checkpoint is a :class:`~.records.CheckpointRecord`, inserted by the
:class:`~.writes.AddCheckpointRecord` write.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sglang_harli.finetune import graph
from sglang_harli.finetune.checkpoint import (
    STATE_FILES,
    NonFiniteError,
    TrainerSnapshot,
    write_checkpoint,
)
from sglang_harli.finetune.data import Example, pack
from sglang_harli.finetune.trainer import Trainer

from .agent import JobLink
from .store import CHECKPOINTS_DIR
from .writes import AddCheckpointRecord, NewEvent, Progress, Prune

ADAPTER = "adapter"  # the final adapter's directory in the job's directory
ENCODE_TENSORS = 16  # tensors of a checkpoint encoded per work unit

# a unit of work: (kind, cost, run)
Unit = tuple[str, float, Callable[[], None]]


@dataclasses.dataclass
class PendingCheckpoint:
    """A checkpoint on its way: its validation pass runs as work units first. The metrics event
    of its step waits for it, so that one event per step carries both losses."""

    step: int
    train_loss: float | None
    final: bool
    validation_left: list[Example]
    metrics: dict[str, Any] | None = None  # the step's metrics event data, if a step ran
    valid_sum: float = 0.0
    valid_targets: int = 0


class Checkpointing:
    """Takes one job's checkpoints through validation, snapshot, encoding and hand-over (see
    the module docstring), one :meth:`next_unit` at a time."""

    def __init__(
        self,
        trainer: Trainer,
        link: JobLink,
        job_dir: Path,
        validation: list[Example],
        *,
        keep: int,
        base_model_name: str = "",
    ):
        self.trainer, self.link, self.dir, self.validation = trainer, link, job_dir, validation
        self.keep, self.base_model_name = keep, base_model_name
        self.view = trainer.view
        self.pending: PendingCheckpoint | None = None
        # a checkpoint being encoded: (what it is, its snapshot, the encoding's steps)
        self._encoding: tuple[PendingCheckpoint, TrainerSnapshot, Iterator[None]] | None = None
        self.finished = False  # the final checkpoint and the adapter are handed over
        # a snapshot copies every adapter and optimizer element: its cost, for the predictor
        self._snapshot_elements = float(3 * sum(p.numel() for p in trainer.adapters.parameters()))

    @property
    def busy(self) -> bool:
        """A checkpoint is under way: its units come before the trainer's."""
        return self._encoding is not None or self.pending is not None

    @property
    def waiting(self) -> bool:
        """Validated, but the previous checkpoint's buffers are still being written."""
        pending = self.pending
        waiting = pending is not None and not pending.validation_left
        return waiting and not self.trainer.can_snapshot

    def start(
        self,
        step: int,
        train_loss: float | None,
        final: bool,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """A checkpoint of ``step`` is due (``final``: the last, with the adapter)."""
        self.pending = PendingCheckpoint(step, train_loss, final, list(self.validation), metrics)

    def next_unit(self) -> Unit | None:
        """The next unit of the checkpoint under way, or None while it waits for the previous
        one's write (call only when :attr:`busy`)."""
        if self._encoding is not None:
            return "encode", float(ENCODE_TENSORS), self._encode_some
        pending = self.pending
        if pending.validation_left:
            tokens = len(pending.validation_left[-1].input_ids)
            cost = self._validation_flops(tokens)
            return "validation", cost, functools.partial(self._validate_one, pending)
        if not self.trainer.can_snapshot:
            return None  # the previous checkpoint is still being written: wait for it
        return "checkpoint", self._snapshot_elements, functools.partial(self._snapshot, pending)

    def drop(self) -> None:
        """The job ends here: the checkpoint under way goes, its buffers back to the trainer."""
        self.pending = None
        if self._encoding is not None:
            self._encoding[1].release()
            self._encoding = None

    # --- the units ---------------------------------------------------------------------------

    def _validation_flops(self, tokens: int) -> float:
        c, lora = self.view.config, self.trainer.adapters.config
        layer = graph.layer_forward_flops(c, lora, [tokens])
        return c.num_layers * layer + graph.head_forward_flops(c, tokens)

    def _validate_one(self, pending: PendingCheckpoint) -> None:
        example = pending.validation_left.pop()
        batch = pack([example], device=self.view.device)
        with torch.no_grad():
            loss = graph.loss_sum(
                self.view, self.trainer.adapters, batch, self.trainer.dtype, training=False
            )
        pending.valid_sum += float(loss)
        pending.valid_targets += batch.num_targets

    def _snapshot(self, pending: PendingCheckpoint) -> None:
        """Take the checkpoint's host copy. On a CPU its files are then encoded in ``encode``
        units here, in budgeted slices; on a GPU the copy is still landing, and the agent's
        thread encodes it."""
        self.pending = None
        snapshot = self.trainer.snapshot()
        if self.view.device.type != "cpu":
            self._hand_over(pending, snapshot)
            return
        self._encoding = (pending, snapshot, snapshot.encoding(self.view.dtype))

    def _encode_some(self) -> None:
        pending, snapshot, steps = self._encoding
        try:
            for _ in range(ENCODE_TENSORS):
                next(steps)
            return
        except StopIteration:
            pass
        except NonFiniteError:  # the agent's writer raises it again: the job fails as diverged
            snapshot.encoded = None
        self._encoding = None
        self._hand_over(pending, snapshot)

    def _hand_over(self, pending: PendingCheckpoint, snapshot: TrainerSnapshot) -> None:
        """Hand the checkpoint (and at the end the adapter) to the agent, which writes the
        files on its thread through the format module, then the rows that record them."""
        step = pending.step
        path = self.dir / CHECKPOINTS_DIR / f"step-{step}"
        metrics: dict[str, Any] = {"step": step, "train_loss": pending.train_loss}
        if self.validation:
            metrics["valid_loss"] = pending.valid_sum / max(pending.valid_targets, 1)
        rows: list = []
        if pending.metrics is not None:
            rows.append(metrics_event({**pending.metrics, **metrics}))
        rows += [AddCheckpointRecord(step, str(path), metrics), Prune(self.keep)]
        write = functools.partial(
            write_checkpoint,
            snapshot=snapshot,
            dtype=self.view.dtype,
            base_model_name_or_path=self.base_model_name,
        )
        if not pending.final:
            self.link.submit(*rows, files=lambda: write(path), release=snapshot.release)
            return
        adapter = self.dir / ADAPTER

        def write_both() -> None:
            write(path)
            write(adapter, adapter_only=True)

        rows += [
            Progress({"adapter_path": str(adapter)}),
            NewEvent("Training finished; loading the adapter for serving"),
        ]
        self.link.submit(
            *rows,
            files=write_both,
            after=functools.partial(drop_trainer_states, self.dir),
            release=snapshot.release,
        )
        self.finished = True
        self.link.close()


def drop_trainer_states(job_dir: Path) -> None:
    """A job that will not resume needs no optimizer state: its checkpoints keep their
    adapters (servable) and lose the 2/3 of their bytes that only resuming reads."""
    for name in STATE_FILES:
        for state in (job_dir / CHECKPOINTS_DIR).glob(f"*/{name}"):
            state.unlink(missing_ok=True)


def metrics_event(data: dict[str, Any]) -> NewEvent:
    """One event per step: OpenAI's ``metrics`` event shape."""
    message = f"Step {data['step']}/{data['total_steps']}: training loss={data['train_loss']:.4f}"
    if "valid_loss" in data:
        message += f", validation loss={data['valid_loss']:.4f}"
    return NewEvent(message, type="metrics", data=data)
