"""Runs one stored fine-tuning job, a time budget at a time, on the scheduler thread.

The scheduler gives the runner slices of time (between decode iterations, or longer quanta
when idle); the runner spends each on work units: the trainer's (layer forward/backward, an
optimizer step) and, at a checkpoint with a validation file, one validation example each. It
never touches the job store or the disk itself: everything it records goes to its
:class:`~.agent.JobLink`, which the agent's thread writes (``jobs/agent.py``). So a slice costs
only its work units, whatever the store or the disk are doing:

- starting a job: :meth:`JobRunner.build` reads the tokenized dataset and the newest readable
  checkpoint on the agent's thread; the scheduler only takes the finished runner;
- a checkpoint (``checkpointing.py``): the slice copies the adapters and the AdamW state into
  host buffers reserved ahead (:meth:`Trainer.snapshot`); the agent writes them (durably, through
  the format module ``finetune/checkpoint.py``) while training goes on;
- a store that does not answer: the runner pauses (no work units) until the agent's writes go
  through again, or the agent fails the job after ``AgentConfig.give_up_s``.

A job ends here as cancelled, failed (``training_failed``; ``training_diverged`` for a
non-finite loss or mostly skipped steps; ``training_blew_up`` for adapter weights beyond
:data:`MAX_ADAPTER_WEIGHT`, finite but useless), or with its adapter written for the publisher;
a job another server took over is dropped without a write. No exception reaches the caller, which is
serving requests.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sglang_harli.config import Kernels
from sglang_harli.finetune.base_model import BaseModelView
from sglang_harli.finetune.checkpoint import read_checkpoint
from sglang_harli.finetune.data import Example, load_examples
from sglang_harli.finetune.lora import LoraAdapters, LoraConfig
from sglang_harli.finetune.parallel import shard_adapters
from sglang_harli.finetune.trainer import (
    MemoryWait,
    StepResult,
    TrainConfig,
    Trainer,
    WorkUnit,
)
from sglang_harli.memory.arena import Arena

from .agent import JobLink
from .checkpointing import (
    ENCODE_TENSORS,  # noqa: F401 - bench/job_shape.py reads the encode unit's size here
    Checkpointing,
    drop_trainer_states,
    metrics_event,
)
from .hyperparameters import Hyperparameters
from .lifecycle import JobStatus
from .memory_waits import MemoryWaits
from .store import (
    STORE_ERRORS,
    CheckpointRecord,
    Job,
    JobStore,
    NewEvent,
    Outcome,
    Progress,
    Rewind,
)

logger = logging.getLogger(__name__)

DIVERGED = "training_diverged"
BLEW_UP = "training_blew_up"
# LoRA's weights start below 1 (A uniform within +-1/sqrt(in_features), B zero), and AdamW moves a
# weight by about the learning rate per step at most, so a weight of 1e4 takes some 10^5 steps
# at the largest learning rate the API accepts (0.02, hyperparameters.py): no real run gets
# there. A run that does has destroyed its adapter while every number stays finite (with a
# learning rate of 2e8 the weights reached 1e9 and the served adapter answered only <unk>).
MAX_ADAPTER_WEIGHT = 1e4
SKIP_WINDOW = 10  # divergence: more than half of the last SKIP_WINDOW steps skipped...
MIN_SKIPPED = 3  # ...and at least this many


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    checkpoint_every: int = 10  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the newest checkpoints kept per job, besides the adapter
    kernels: Kernels = Kernels.TORCH  # the ops backend (finetune/ops.py): TRITON on a GPU
    base_model_name: str = ""  # written into the adapters' PEFT config
    # a reserve of ordinary memory sized to the job's smallest micro-batch (--harli-reserve-mb
    # auto on a CPU): the job always progresses, whatever is lent
    job_reserve: bool = False


# a checkpoint directory or file that is not there: an older checkpoint is the answer
_GONE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


# a step planned for memory a burst took back is planned again, smaller, after this long
REPLAN_AFTER_S = 1.0


class JobSignal(enum.StrEnum):
    """What the job itself says before more of its units run (:meth:`JobRunner.signal`)."""

    RUN = "run"
    PAUSE = "pause"  # the job store does not answer: no units until it does
    CANCEL = "cancel"
    DROP = "drop"  # no longer this server's job (or the agent failed it): end, write nothing


@dataclasses.dataclass(eq=False)
class RunnerUnit:
    """A unit of this job's work as an executor runs it (``corun/executor.py``): ``run`` on
    any thread, the outcome handed back to :meth:`JobRunner.complete` on the scheduler's."""

    kind: str
    cost: float
    run: Callable[[], Any]
    work: Any  # the trainer's WorkUnit, or a checkpoint's or planning's callable


class DatasetUnavailable(ValueError):
    """The job's training or validation data cannot be read: the job fails (no retry)."""


class JobRunner:
    """Trains one job: a source of work units (:meth:`next_unit`, :meth:`issue`,
    :meth:`complete`) that the co-run loop drives (``corun/controller.py``)."""

    def __init__(
        self,
        job: Job,
        trainer: Trainer,
        link: JobLink,
        job_dir: Path,
        validation: list[Example],
        config: RunnerConfig = RunnerConfig(),
    ):
        self.job, self.trainer, self.link, self.dir = job, trainer, link, job_dir
        self.validation, self.config = validation, config
        self.view = trainer.view
        self.checkpoints = Checkpointing(
            trainer,
            link,
            job_dir,
            validation,
            keep=config.keep_checkpoints,
            base_model_name=config.base_model_name,
        )
        self._ended = False  # the job ended here, or its adapter is handed over
        self._skips: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)
        self._step_times: list[float] = []
        self._last_step_end = time.monotonic()
        self.tokens_trained = 0  # target tokens of the optimizer steps this runner finished
        self.memory_waits = MemoryWaits(job.id)
        # set by the scheduler: how many blocks of N bytes the arena could ever hold (all it
        # may be lent and its reserves); a job whose smallest micro-batch exceeds it fails
        self.memory_ceiling: Callable[[int], int] | None = None
        # ordinary memory for the smallest micro-batch (RunnerConfig.job_reserve), allocated
        # here off the scheduler thread; the scheduler adds it to the arena while the job runs
        self.reserve: torch.Tensor | None = None
        self.reserve_lease: int | None = None
        self.started_at_step = trainer.state.step  # its ranks' runners all start here
        self._issued: collections.deque[RunnerUnit] = collections.deque()  # in flight, in order
        self._failed: BaseException | None = None  # a unit's failure, handled once none in flight

    # --- start: on the agent's thread --------------------------------------------------------

    @classmethod
    def build(
        cls,
        store: JobStore,
        job: Job,
        link: JobLink,
        *,
        view: BaseModelView,
        config: RunnerConfig = RunnerConfig(),
        memory: Arena | None = None,
        resume_step: int | None = None,
    ) -> JobRunner:
        """Everything heavy about starting a job, off the scheduler thread: stale temporary
        files, the tokenized dataset, the adapters, the newest readable checkpoint. ``memory``:
        the arena its checkpointed activations live in (the scheduler's, used on its thread).

        ``resume_step``: a tensor-parallel follower's runner starts where rank 0's did (the
        checkpoint of that step, or the start at 0); it writes nothing (its link drops it)."""
        job_dir = store.job_dir(job.id)
        if link.writes:
            store.clean_job_dir(job.id)  # what a crash of its last owner left
        hp = Hyperparameters.from_dict(job.hyperparameters)
        dataset = _examples(store, job, "train")
        validation = _examples(store, job, "validation") if job.validation_file else []
        lora = LoraConfig(
            r=hp.lora_rank,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
            seed=job.seed,
        )
        train = TrainConfig(
            lr=hp.learning_rate,
            epochs=hp.n_epochs,
            global_batch_size=min(hp.batch_size, len(dataset)),
            micro_batch_size=min(hp.batch_size, len(dataset)),
            seed=job.seed,
            lr_schedule="linear",
            kernels=config.kernels,  # num_sms None: the whole device until a policy shares it
        )

        def new_trainer() -> Trainer:
            # whole first, then this rank's shards: the same adapters at any TP size
            adapters = shard_adapters(LoraAdapters.create(view.config, lora, view.device), view.tp)
            return Trainer(view, adapters, dataset, train, memory=memory)

        trainer = new_trainer()
        resumed, events = None, []
        checkpoints, _ = store.list_checkpoints(job.id, limit=100)
        if resume_step is not None:
            checkpoints = [c for c in checkpoints if c.step == resume_step]
            if resume_step > 0 and not checkpoints:
                raise DatasetUnavailable(f"rank 0 resumed from step {resume_step}: not found")
        for checkpoint in checkpoints:  # newest first
            try:
                trainer.restore(read_checkpoint(checkpoint.path, view.device))
            except Exception as exc:  # noqa: BLE001 - a torn or corrupt checkpoint: an older one
                if isinstance(exc, OSError) and not isinstance(exc, _GONE):
                    raise  # the disk failed to read it (EIO...): build again later, delete nothing
                logger.warning("job %s: checkpoint %s unreadable: %s", job.id, checkpoint.path, exc)
                events.append(_unreadable(checkpoint, exc))
                trainer = new_trainer()  # a restore that failed half way leaves nothing behind
                continue
            resumed = checkpoint.step
            break
        trainer.reserve_snapshot_memory()
        reserve = None
        need = trainer.smallest_memory_need()
        if config.job_reserve and need is not None:
            size = memory.region_for(*need)
            reserve = torch.empty(size, dtype=torch.uint8, device=view.device)
        if view.device.type == "cuda":
            # copies from pageable memory may still be in flight on this thread's stream: the
            # scheduler's stream must see finished adapters
            torch.cuda.current_stream(view.device).synchronize()
        where = f"on {link.owner.info}"
        if resumed is not None:
            events.append(NewEvent(f"Resumed from the checkpoint at step {resumed} ({where})"))
        else:
            if checkpoints:
                events.append(NewEvent("No checkpoint could be read: the job starts over"))
            events.append(
                NewEvent(
                    f"Fine-tuning started: {len(dataset)} examples, {trainer.total_steps} steps"
                    f" ({where})",
                    data={"owner": link.owner.info},
                )
            )
        link.submit(
            Rewind(resumed or 0),  # what a lost run recorded after the checkpoint goes
            *events,
            Progress({"total_steps": trainer.total_steps, "trained_tokens": trainer.state.tokens}),
        )
        runner = cls(job, trainer, link, job_dir, validation, config)
        runner.reserve = reserve
        return runner

    # --- the scheduler thread ----------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Waiting for the store, or for the previous checkpoint's write: no work to do."""
        return self.link.store_failing or self.checkpoints.waiting

    @property
    def _done(self) -> bool:
        """The job ended here, or its adapter is handed over (units may still be in flight)."""
        return self._ended or self.checkpoints.finished

    # --- a source of units (corun/controller.py drives it through an executor) ---------------

    @property
    def done(self) -> bool:
        """Nothing more to run: the job ended here, or its adapter is handed over."""
        return self._done and not self._issued

    @property
    def in_flight(self) -> int:
        """Units issued and not yet completed."""
        return len(self._issued)

    def signal(self) -> JobSignal:
        """The job's own say before more units (what rank 0 reads for every rank at TP > 1):
        DROP (another server's now, or the agent failed it), CANCEL, PAUSE (the store does not
        answer: decode goes on, the writes wait), else RUN."""
        if self.link.stopped:
            return JobSignal.DROP
        if self.link.cancel_requested:
            return JobSignal.CANCEL
        if self.link.store_failing:
            return JobSignal.PAUSE
        return JobSignal.RUN

    def next_unit(self) -> RunnerUnit | None:
        """The unit to issue next, without issuing it (:meth:`issue`); None when none can be
        now: done, waiting for the previous checkpoint's write, or one in flight that the next
        depends on. Trainer units of one step may be issued ahead of the previous ones'
        completion (they run in order); anything else waits for what is in flight."""
        if self._done or self._failed is not None:
            return None
        if self._issued:
            last = self._issued[-1].work
            if not isinstance(last, WorkUnit) or last.kind == "optimizer":
                return None  # what follows it depends on its outcome
            following = self.trainer.unit_after(last)
            if following is None:
                return None
            return self._unit(following.kind, following.cost, following)
        try:
            work = self._work_now()
        except Exception as exc:  # noqa: BLE001 - a job's failure must not stop serving
            self._fail(exc)
            return None
        if work is None:
            return None
        kind, cost, run = work
        return self._unit(kind, cost, run)

    def issue(self, unit: RunnerUnit) -> None:
        """``unit`` (from :meth:`next_unit`) is submitted: it runs before anything issued later."""
        self._issued.append(unit)

    def complete(
        self, unit: RunnerUnit, result: Any, error: BaseException | None, dropped: bool = False
    ) -> None:
        """An issued unit ran (or was ``dropped`` unrun by its executor: the job ends), in
        issue order, on the scheduler thread: its step's end, a memory wait, a failure. Units
        issued after a failed one fail as out of order; their errors say nothing new."""
        if not self._issued or self._issued[0] is not unit:
            raise RuntimeError(f"{unit.kind} unit completed out of order")
        self._issued.popleft()
        if dropped:
            pass
        elif self._failed is None and error is not None:
            self._failed = error  # the first failure; handled once nothing is in flight
        elif self._failed is None and error is None:
            try:
                if isinstance(unit.work, WorkUnit) and result is not None:
                    self.tokens_trained += result.num_targets
                    self._on_step(result)
                if ended := self.memory_waits.resume():
                    self.link.submit(*ended)
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop serving
                self._failed = exc
        if self._issued or self._failed is None:
            return
        failed, self._failed = self._failed, None
        if isinstance(failed, MemoryWait):
            self._wait_for_memory(str(failed))  # decode goes on, the job waits
        elif not self._done:
            self._fail(failed)

    def stop(self, signal: JobSignal | str) -> None:
        """Cancelled or dropped (:meth:`signal`): the job ends here; nothing may be in flight."""
        if self._issued:
            raise RuntimeError(f"{len(self._issued)} units in flight: drain them first")
        self._stop(JobSignal(signal))

    def _unit(self, kind: str, cost: float, work: Any) -> RunnerUnit:
        run = functools.partial(work.run) if isinstance(work, WorkUnit) else work
        return RunnerUnit(kind, cost, run, work)

    def fail(self, exc: BaseException) -> None:
        """The loop that drives this runner met ``exc`` (ranks that diverged, say): the job
        fails with it, whatever is in flight (the loop drops it)."""
        self._issued.clear()
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        logger.error(
            "fine-tuning job %s failed", self.job.id, exc_info=(type(exc), exc, exc.__traceback__)
        )
        self._end(
            JobStatus.FAILED,
            f"Job failed: {type(exc).__name__}: {exc}",
            {"code": "training_failed", "message": f"{type(exc).__name__}: {exc}"},
        )

    def _stop(self, signal: JobSignal) -> None:
        if signal == JobSignal.CANCEL:
            self._end(JobStatus.CANCELLED, "Job cancelled")
            return
        # lost to another server, or failed by the agent: drop it, writing nothing
        self.trainer.abandon_step()
        self.checkpoints.drop()
        self._ended = True
        self.link.close()

    def _wait_for_memory(self, reason: str) -> bool:
        """No room for the next unit's activations: the job waits, and says so once the wait
        is long (``memory_waits.py``); if even all the memory it may ever get cannot hold its
        smallest micro-batch, it fails now rather than wait forever. False once it ended."""
        if not self.memory_waits.waiting:
            need = self.trainer.smallest_memory_need()
            if need is not None and self.memory_ceiling is not None:
                blocks, nbytes = need
                most = self.memory_ceiling(nbytes)
                if most < blocks:
                    message = (
                        f"the smallest micro-batch (its longest example) keeps {blocks} "
                        f"checkpointed layer inputs of {nbytes} bytes, and all the memory this "
                        f"server may ever lend the job holds {most}: raise --harli-reserve-mb "
                        "or --harli-max-lend-fraction, or shorten the examples"
                    )
                    self._end(
                        JobStatus.FAILED,
                        f"Job failed: not enough memory: {message}",
                        {"code": "insufficient_memory", "message": message},
                    )
                    return False
        if reported := self.memory_waits.wait(reason):
            self.link.submit(*reported)
        waits = self.memory_waits
        if not waits.replanned and waits.waited_s() >= REPLAN_AFTER_S:
            waits.replanned = True  # once a wait: a replan throws the step's work away
            if self.trainer.shrink_waiting_step():
                logger.info("fine-tuning job %s: step re-planned for the memory left", self.job.id)
        return True

    def memory_status(self) -> dict[str, Any]:
        """How this job uses the arena (``Trainer.memory``), and whether it waits for it."""
        return {
            **self.memory_waits.to_dict(),
            **dataclasses.asdict(self.trainer.memory_use),
            "reserve_bytes": None if self.reserve is None else self.reserve.numel(),
        }

    def _work_now(self) -> tuple[str, float, Any] | None:
        """The next unit of work as (kind, cost, run), or None if there is none now (done, or
        waiting for the previous checkpoint's write). Kinds: the trainer's units, ``plan``
        (packing a step's micro-batches), and a checkpoint's (``checkpointing.py``):
        ``validation`` (one example), ``checkpoint`` (the host copy of a snapshot) and
        ``encode`` (its files, on a CPU)."""
        if self.checkpoints.busy:
            return self.checkpoints.next_unit()
        if not self.trainer.step_planned:  # packing a step's micro-batches is work too
            return "plan", float(self.trainer.config.global_batch_size), self.trainer.pending_work
        unit = self.trainer.next_unit()
        if unit is None:  # trained: the final checkpoint (and validation) are what is left
            state = self.trainer.state
            self.checkpoints.start(state.step, state.last_loss, final=True)
            return self._work_now()
        return unit.kind, unit.cost, unit

    def _on_step(self, result: StepResult) -> None:
        now = time.monotonic()
        self._step_times.append(now - self._last_step_end)
        self._last_step_end = now
        state, total = self.trainer.state, self.trainer.total_steps
        step = result.step + 1
        recent = self._step_times[-10:]
        eta_s = (total - step) * sum(recent) / len(recent)
        tokens_per_s = result.num_targets / max(self._step_times[-1], 1e-9)
        self.link.submit(
            Progress(
                {
                    "step": step,
                    "trained_tokens": state.tokens,
                    "estimated_finish": int(time.time() + eta_s),
                }
            )
        )
        metrics = {
            "step": step,
            "total_steps": total,
            "train_loss": result.loss,
            "learning_rate": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_second": tokens_per_s,
            "eta_seconds": eta_s,
        }
        self._skips.append(result.skipped)
        failure = self._diverged(step, result) or self._blew_up(step, result, final=step >= total)
        if failure is not None:
            code, message = failure
            self.link.submit(metrics_event(metrics))
            error = {"code": code, "message": message}
            self._end(JobStatus.FAILED, f"Job failed: {message}", error)
            return
        if step % self.config.checkpoint_every == 0 or step >= total:
            self.checkpoints.start(step, result.loss, final=step >= total, metrics=metrics)
        else:
            self.link.submit(metrics_event(metrics))

    def _hint(self) -> str:
        return (
            f"Try a lower learning_rate_multiplier (this job used "
            f"{self.job.hyperparameters.get('learning_rate_multiplier')}) or a smaller batch, "
            "and check the training data"
        )

    def _diverged(self, step: int, result: StepResult) -> tuple[str, str] | None:
        """(code, message) if the step's numbers are not finite: NaN first, it says more."""
        if not math.isfinite(result.loss):
            message = f"the training loss is {result.loss}"
            return DIVERGED, f"Training diverged at step {step}: {message}. {self._hint()}"
        skipped = sum(self._skips)
        if skipped >= MIN_SKIPPED and 2 * skipped > len(self._skips):
            return DIVERGED, (
                f"Training diverged at step {step}: {skipped} of the last {len(self._skips)} "
                f"steps had non-finite gradients and were skipped. {self._hint()}"
            )
        return None

    def _blew_up(self, step: int, result: StepResult, final: bool) -> tuple[str, str] | None:
        """(code, message) if the adapter's weights grew beyond :data:`MAX_ADAPTER_WEIGHT`: the
        ones this step's loss came from, and at the end the ones that would be published."""
        largest = result.weight_max
        if final and largest <= MAX_ADAPTER_WEIGHT:
            largest = self.trainer.weight_max()  # a collective at TP > 1: every rank is here
        # not finite: the checkpoint's own check fails the job as diverged, as it always did
        if not MAX_ADAPTER_WEIGHT < largest < math.inf:
            return None
        return BLEW_UP, (
            f"Training blew up at step {step}: an adapter weight reached {largest:.3g} (a "
            f"trained LoRA adapter stays far below {MAX_ADAPTER_WEIGHT:g}); the adapter would "
            f"answer nothing useful. {self._hint()}"
        )

    def _end(self, status: JobStatus, message: str, error: dict | None = None) -> None:
        """The job ends here (cancelled, failed): nothing is published."""
        self.trainer.abandon_step()
        self.checkpoints.drop()
        self._ended = True
        level = "error" if status == JobStatus.FAILED else "info"
        if error is not None:
            error = {"param": None, **error}
        self.link.submit(
            Outcome(status, error),
            NewEvent(message, level=level),
            after=functools.partial(drop_trainer_states, self.dir),
        )
        self.link.close()


def _examples(store: JobStore, job: Job, split: str) -> list[Example]:
    """The job's tokenized ``split``, written by the API before the job was queued (nothing is
    tokenized here: the API validated and tokenized every line already)."""
    path = store.dataset_path(job.id, split)
    try:
        return load_examples(path)
    except FileNotFoundError as exc:
        raise DatasetUnavailable(
            f"the tokenized {split} set of this job is missing ({store.relative(path)}); a job "
            "queued by an older version has none: create it again"
        ) from exc
    except (PermissionError, IsADirectoryError) as exc:
        raise DatasetUnavailable(f"the {split} set cannot be read: {exc}") from exc
    except STORE_ERRORS:
        raise  # the store or the disk may answer later: the agent builds again then
    except Exception as exc:  # noqa: BLE001 - a corrupt file will not get better
        raise DatasetUnavailable(f"the {split} set cannot be read: {exc}") from exc


def _unreadable(checkpoint: CheckpointRecord, exc: BaseException) -> NewEvent:
    return NewEvent(
        f"The checkpoint at step {checkpoint.step} could not be read ({type(exc).__name__}:"
        f" {exc}); resuming from an older one",
        level="warning",
    )
