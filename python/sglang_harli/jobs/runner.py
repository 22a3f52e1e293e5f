"""Runs one stored fine-tuning job, a time budget at a time.

The scheduler gives the runner slices of time (between decode iterations, or longer quanta
when idle); the runner spends each on the trainer's work units, writes progress, events and
checkpoints to the job store, and stops a cancelled job at its next slice. Any exception ends
the job as failed with its reason; it never escapes to the caller, which is serving requests.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sglang_harli.finetune import graph
from sglang_harli.finetune.base_model import BaseModelView
from sglang_harli.finetune.data import Example, load_jsonl, pack
from sglang_harli.finetune.lora import LoraAdapters, LoraConfig
from sglang_harli.finetune.peft_io import save_adapter
from sglang_harli.finetune.trainer import StepResult, TrainConfig, Trainer

from .hyperparameters import Hyperparameters
from .lifecycle import JobStatus
from .store import Job, JobStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    checkpoint_every: int = 10  # optimizer steps between checkpoints (and at the end)
    kernels: str = "torch"  # the ops backend (see ops.py): "torch", or "triton" on a GPU


class JobRunner:
    """Owns the trainer of one job; ``run_for`` returns False once the job is over."""

    def __init__(
        self,
        store: JobStore,
        job: Job,
        view: BaseModelView,
        tokenizer: Any,
        base_model_name: str,
        config: RunnerConfig = RunnerConfig(),
    ):
        self.store, self.job, self.view = store, job, view
        self.base_model_name, self.config = base_model_name, config
        self.dir = store.job_dir(job.id)
        hp = Hyperparameters.from_dict(job.hyperparameters)
        training_file = store.get_file(job.training_file)
        if training_file is None:
            raise FileNotFoundError(f"training file {job.training_file} was deleted")
        dataset = load_jsonl(training_file.path, tokenizer, hp.max_seq_length)
        self.validation: list[Example] = []
        if job.validation_file:
            validation_file = store.get_file(job.validation_file)
            if validation_file is None:
                raise FileNotFoundError(f"validation file {job.validation_file} was deleted")
            self.validation = load_jsonl(validation_file.path, tokenizer, hp.max_seq_length)
        lora = LoraConfig(
            r=hp.lora_rank,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
            seed=job.seed,
        )
        adapters = LoraAdapters.create(view.config, lora, device=view.device)
        train = TrainConfig(
            lr=hp.learning_rate,
            epochs=hp.n_epochs,
            global_batch_size=min(hp.batch_size, len(dataset)),
            micro_batch_size=min(hp.batch_size, len(dataset)),
            seed=job.seed,
            lr_schedule="linear",
            kernels=config.kernels,  # num_sms None: the whole device until a policy shares it
        )
        self.trainer = Trainer(view, adapters, dataset, train)
        self.trainer_resumed_from: int | None = None
        checkpoints, _ = store.list_checkpoints(job.id, limit=1)
        if checkpoints:
            self.trainer.load_checkpoint(checkpoints[0].path)
            self.trainer_resumed_from = checkpoints[0].step
            store.add_event(job.id, f"Resumed from the checkpoint at step {checkpoints[0].step}")
        store.update_progress(job.id, total_steps=self.trainer.total_steps)
        self._started = time.monotonic()
        self._step_times: list[float] = []
        self._last_step_end = time.monotonic()
        if self.trainer_resumed_from is None:
            store.add_event(
                job.id,
                f"Fine-tuning started: {len(dataset)} examples, {self.trainer.total_steps} steps",
            )

    def run_for(self, budget_s: float) -> bool:
        """Run work units for about ``budget_s`` seconds (at least one); False when over."""
        try:
            if self.store.cancel_requested(self.job.id):
                self.trainer.abandon_step()
                self.store.set_status(self.job.id, JobStatus.CANCELLED)
                self.store.add_event(self.job.id, "Job cancelled")
                return False
            deadline = time.monotonic() + budget_s
            while True:
                unit = self.trainer.next_unit()
                if unit is None:
                    self._finish()
                    return False
                result = unit.run()
                if result is not None:
                    self._on_step(result)
                if time.monotonic() >= deadline:
                    return True
        except Exception as exc:  # noqa: BLE001 - a job's failure must not stop serving
            logger.exception("fine-tuning job %s failed", self.job.id)
            fail(self.store, self.job.id, exc)
            return False

    def _on_step(self, result: StepResult) -> None:
        now = time.monotonic()
        self._step_times.append(now - self._last_step_end)
        self._last_step_end = now
        state, total = self.trainer.state, self.trainer.total_steps
        step = result.step + 1
        recent = self._step_times[-10:]
        eta_s = (total - step) * sum(recent) / len(recent)
        tokens_per_s = result.num_targets / max(self._step_times[-1], 1e-9)
        self.store.update_progress(
            self.job.id,
            step=step,
            trained_tokens=state.tokens,
            estimated_finish=int(time.time() + eta_s),
        )
        self.store.add_event(
            self.job.id,
            f"Step {step}/{total}: training loss={result.loss:.4f}",
            type="metrics",
            data={
                "step": step,
                "total_steps": total,
                "train_loss": result.loss,
                "learning_rate": result.lr,
                "grad_norm": result.grad_norm,
                "tokens_per_second": tokens_per_s,
                "eta_seconds": eta_s,
            },
        )
        if step % self.config.checkpoint_every == 0 and step < total:
            self._checkpoint(step, result.loss)

    def _checkpoint(self, step: int, loss: float) -> Path:
        path = self.dir / "checkpoints" / f"step-{step}"
        self.trainer.save_checkpoint(path, base_model_name_or_path=self.base_model_name)
        metrics = {"step": step, "train_loss": loss}
        if self.validation:
            metrics["valid_loss"] = self.validation_loss()
            self.store.add_event(
                self.job.id,
                f"Step {step}: validation loss={metrics['valid_loss']:.4f}",
                type="metrics",
                data=metrics,
            )
        self.store.add_checkpoint(self.job.id, step, str(path), metrics)
        return path

    def validation_loss(self) -> float:
        """Mean loss per target token over the validation file, one sequence at a time."""
        total, targets = 0.0, 0
        with torch.no_grad():
            for example in self.validation:
                batch = pack([example], device=self.view.device)
                loss = graph.loss_sum(
                    self.view, self.trainer.adapters, batch, self.trainer.dtype, training=False
                )
                total += float(loss)
                targets += batch.num_targets
        return total / max(targets, 1)

    def _finish(self) -> None:
        """Training is done: write the adapter; the publisher loads it, then marks success."""
        adapter = self.dir / "adapter"
        save_adapter(
            adapter,
            self.trainer.adapters,
            dtype=self.view.dtype,
            base_model_name_or_path=self.base_model_name,
        )
        state = self.trainer.state
        self._checkpoint(state.step, state.last_loss if state.last_loss is not None else 0.0)
        self.store.update_progress(self.job.id, adapter_path=str(adapter))
        self.store.add_event(self.job.id, "Training finished; loading the adapter for serving")


def fail(store: JobStore, job_id: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"
    store.set_status(
        job_id, JobStatus.FAILED, error={"code": "training_failed", "message": message}
    )
    store.add_event(job_id, f"Job failed: {message}", level="error")
