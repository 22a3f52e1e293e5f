"""A trainer's checkpoint: its format, and how a trainer's state gets in and out of it.

A checkpoint directory is a PEFT adapter directory (``peft_io.py``) plus the trainer state that
resuming needs: :data:`STATE_FILE` (structure and counters) and :data:`STATE_TENSORS` (the fp32
adapter masters and AdamW's tensors), written a tensor at a time (``tensor_io.py``). The format
is the one every earlier version wrote: a checkpoint written before this module existed resumes.

Writing one comes in two halves, so that a server's scheduler thread does only the cheap one:

1. :func:`take_snapshot` copies the adapters, the AdamW state and the counters into host
   buffers (asynchronously on a GPU, into pinned buffers reserved ahead in a
   :class:`SnapshotBuffers`): a :class:`TrainerSnapshot`, the in-memory copy;
2. :func:`write_checkpoint` encodes such a snapshot and writes it durably (temporary directory,
   fsync, rename), from any thread.

At tensor parallel size > 1 a snapshot is gathered whole (:func:`take_snapshot`) and a restore
takes this rank's shards of it (:func:`shards_of`): a checkpoint is the same at any TP size.

Names, since "checkpoint" means several things in this project: a *checkpoint* is the
directory on disk; a :class:`TrainerSnapshot` is a trainer's state copied to host memory (what
becomes a checkpoint); the job store's row for a written checkpoint is a ``CheckpointRecord``
(``jobs/records.py``); the runner's checkpoint under way (validation, snapshot, encoding,
hand-over) is a ``PendingCheckpoint`` (``jobs/checkpointing.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import torch

from sglang_harli import durable

from . import parallel
from .lora import LoraAdapters, LoraConfig
from .parallel import TensorParallel
from .peft_io import encoding_adapter, write_adapter
from .tensor_io import Encoded, EncodedTree, drain, encoding_tree, load_tree

STATE_FILE = "trainer_state.pt"  # the structure and counters (torch.save)
STATE_TENSORS = "trainer_state.safetensors"  # fp32 masters and AdamW tensors
STATE_FILES = (STATE_FILE, STATE_TENSORS)  # what only resuming reads: the rest is an adapter


class NonFiniteError(ValueError):
    """Training diverged: a loss, a gradient or a weight is NaN or infinite."""

    code = "training_diverged"


@dataclasses.dataclass(eq=False)
class TrainerSnapshot:
    """A trainer's state at one step, in host memory: what :func:`write_checkpoint` writes.

    On a GPU the copies are enqueued asynchronously; :meth:`wait` blocks until they landed (the
    writer calls it, not the scheduler). :meth:`release` hands the host buffers back to the
    trainer for its next snapshot."""

    step: int
    lora: LoraConfig
    adapters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    copied: Any = None  # a torch.cuda.Event recorded after the copies, or None (synchronous)
    _release: Callable[[], None] | None = dataclasses.field(default=None, repr=False)
    # the files' bytes, once encoded (encode()): writing them is then I/O alone
    encoded: tuple[Encoded, EncodedTree] | None = dataclasses.field(default=None, repr=False)

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "optimizer": self.optimizer, "state": self.state}

    def encode(self, dtype: torch.dtype) -> None:
        """Check and encode the files (adapter in ``dtype``, trainer state): the torch and
        Python work of a checkpoint, done where the caller chooses (a server does it in work
        units, :meth:`encoding`, so the writer thread holds the GIL only briefly)."""
        drain(self.encoding(dtype))

    def encoding(self, dtype: torch.dtype) -> Generator[None, None, None]:
        """:meth:`encode`, a tensor per step; raises :class:`NonFiniteError` first if a weight
        is not finite."""
        self.wait()
        for name, t in self.adapters.items():
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"adapter weight {name} is not finite at step {self.step}")
            yield
        adapter = yield from encoding_adapter(self.adapters.items(), dtype)
        state = yield from encoding_tree(self.to_dict())
        self.encoded = (adapter, state)


def write_checkpoint(
    path: str | Path,
    snapshot: TrainerSnapshot,
    *,
    dtype: torch.dtype,
    base_model_name_or_path: str = "",
    adapter_only: bool = False,
) -> None:
    """Write ``snapshot`` as a PEFT adapter directory plus ``trainer_state.pt`` (fp32 masters,
    AdamW state, counters), or the adapter alone; durably: a crash leaves the old directory or
    the whole new one. Raises :class:`NonFiniteError` (writing nothing) on non-finite weights."""
    if snapshot.encoded is None:
        snapshot.encode(dtype)
    adapter, state = snapshot.encoded
    with durable.new_directory(path) as tmp:
        write_adapter(tmp, snapshot.lora, adapter, base_model_name_or_path)
        if not adapter_only:
            state.save(tmp / STATE_FILE, tmp / STATE_TENSORS)


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What :func:`write_checkpoint` wrote, for ``Trainer.restore``; raises if the files are
    missing, truncated or not a trainer state."""
    saved = load_tree(Path(path) / STATE_FILE, Path(path) / STATE_TENSORS, device)
    if not isinstance(saved, dict) or not {"adapters", "optimizer", "state"} <= set(saved):
        raise ValueError(f"{path}: not a trainer checkpoint")
    return saved


# --- a trainer's state in and out ------------------------------------------------------------


class SnapshotBuffers:
    """The host buffers a trainer's snapshots copy into: reserved ahead (pinned on a GPU, which
    is slow to allocate), lent to one snapshot at a time and handed back by its release."""

    def __init__(self) -> None:
        self._host: dict[str, torch.Tensor] | None = {}  # None while lent out

    @property
    def available(self) -> bool:
        """False while the previous snapshot's buffers are still being written."""
        return self._host is not None

    def reserve(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        """A buffer for every ``(key, tensor)`` that has none yet."""
        host = self._host if self._host is not None else {}
        for key, t in tensors:
            if key not in host:
                host[key] = _host_like(t)
        self._host = host

    def lend(self) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """The buffers and the function that gives them back; while they are lent out, fresh
        ones (that are not kept)."""
        lent = self._host is not None
        host = self._host if lent else {}
        self._host = None

        def release() -> None:
            if lent:
                self._host = host

        return host, release


def snapshot_tensors(
    adapters: LoraAdapters, optimizer: torch.optim.Optimizer, with_optimizer_guess: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of everything a snapshot copies: the fp32 masters and AdamW's
    per-parameter tensors (before the first step AdamW has none: with
    ``with_optimizer_guess``, its moments are assumed shaped like the parameters)."""
    params = adapters.parameters()
    for name, p in adapters.named_parameters():
        yield f"adapters.{name}", p
    state = optimizer.state
    for index, p in enumerate(params):
        if p in state:
            for name, value in state[p].items():
                if _copied(value):
                    yield f"optimizer.{index}.{name}", value
        elif with_optimizer_guess:
            yield f"optimizer.{index}.exp_avg", p
            yield f"optimizer.{index}.exp_avg_sq", p


def take_snapshot(
    adapters: LoraAdapters,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
    buffers: SnapshotBuffers,
    tp: TensorParallel | None,
) -> TrainerSnapshot:
    """Copy the adapters, AdamW's state and ``counters`` (the trainer's state, with ``step``)
    into ``buffers``: cheap, asynchronous on a GPU. At TP > 1 a collective: every tensor is
    gathered whole, so a checkpoint is the whole model's."""
    names = [name for name, _ in adapters.named_parameters()]  # the optimizer's index order
    host, release = buffers.lend()
    copies: dict[str, torch.Tensor] = {}
    device = None
    for key, t in snapshot_tensors(adapters, optimizer):
        device = t.device
        if tp is not None:  # AdamW's moments are sharded as their parameter
            t = parallel.gather_tensor(_param_name(key, names), t, tp)
        buffer = host.get(key)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = host[key] = _host_like(t)
        buffer.copy_(t.detach(), non_blocking=t.device.type == "cuda")
        copies[key] = buffer
    copied = None
    if device is not None and device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record()
    saved = optimizer.state_dict()  # references: replaced by the copies below
    state = {
        index: {
            name: copies[f"optimizer.{index}.{name}"] if _copied(value) else _detach(value)
            for name, value in entry.items()
        }
        for index, entry in saved["state"].items()
    }
    return TrainerSnapshot(
        step=counters["step"],
        lora=adapters.config,
        adapters={name: copies[f"adapters.{name}"] for name in names},
        optimizer={"state": state, "param_groups": copy.deepcopy(saved["param_groups"])},
        state=counters,
        copied=copied,
        _release=release,
    )


def shards_of(
    saved: dict[str, Any], adapters: LoraAdapters, tp: TensorParallel | None
) -> dict[str, Any]:
    """This rank's part of a whole checkpoint (whatever TP size wrote it), in new tensors:
    AdamW's ``load_state_dict`` keeps the very tensors it is given and updates them in place,
    which would change ``saved``."""
    names = [name for name, _ in adapters.named_parameters()]

    def part(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.clone() if tp is None else parallel.shard_tensor(name, t, tp)

    whole = {k: part(k, t) for k, t in saved["adapters"].items()}
    state = {
        index: {
            k: part(names[int(index)], v)
            if isinstance(v, torch.Tensor) and v.dim() > 0
            else _detach(v)
            for k, v in entry.items()
        }
        for index, entry in saved["optimizer"]["state"].items()
    }
    return {**saved, "adapters": whole, "optimizer": {**saved["optimizer"], "state": state}}


def _param_name(key: str, names: list[str]) -> str:
    """``adapters.{name}`` or ``optimizer.{index}.{moment}`` -> the parameter's name."""
    if key.startswith("adapters."):
        return key.removeprefix("adapters.")
    return names[int(key.split(".")[1])]


def _copied(value: Any) -> bool:
    """Optimizer state a snapshot copies into a buffer (not AdamW's scalar CPU step count)."""
    return isinstance(value, torch.Tensor) and (value.dim() > 0 or value.device.type != "cpu")


def _detach(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _host_like(t: torch.Tensor) -> torch.Tensor:
    """A host tensor shaped like ``t``; pinned when ``t`` is on a GPU (asynchronous copies)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
