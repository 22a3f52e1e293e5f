"""``HarliScheduler``: SGLang's Scheduler with the co-run hooks.

It runs SGLang's own event loops unchanged; the hooks wrap three of the methods those loops call:

- ``get_next_batch_to_run`` (and its PD-decode twin): KV slots lent to finetuning must be back
  before SGLang decides whether it has room, or it would retract requests instead;
- ``run_batch`` on decode batches: the moment to decide how much finetune work runs beside
  this decode iteration;
- ``on_idle``: no batch runs, so finetune work may use the whole device in bounded quanta.

Every hook counts its calls and the time spent in our code, so the overhead Harli adds to
SGLang's loop is measured, not assumed (``GET /harli/status``); the finetune time it hands out
is reported apart from that overhead.

Fine-tuning jobs come from the job store shared with the HTTP API; one trains at a time, first
come first served, through a :class:`JobRunner` that gets a time slice after each decode
iteration (``time-sliced``) and a quantum on each idle pass (``time-sliced`` and ``idle-only``).
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_harli.config import HarliConfig, Mode
from sglang_harli.corun.stats import DecodeStats, HookStats
from sglang_harli.jobs.runner import JobRunner, RunnerConfig, fail
from sglang_harli.jobs.store import JobStore
from sglang_harli.srt.support import UnsupportedConfigError
from sglang_harli.srt.weights import base_model_view

logger = logging.getLogger(__name__)

SUPPORTED_ALLOCATORS = (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator)
JOB_POLL_S = 0.5  # how often an idle trainer looks for a queued job


class HarliScheduler(Scheduler):
    def __init__(self, server_args, port_args, *, harli_config: HarliConfig):
        super().__init__(server_args, port_args)
        self.harli_config = harli_config
        self.harli_stats = HookStats()
        self._check_kv_pools()
        self.harli_jobs = JobStore(harli_config.state_dir)
        requeued = self.harli_jobs.requeue_running()
        self._harli_runner: JobRunner | None = None
        self._harli_next_poll = 0.0
        logger.info(
            "Harli scheduler active (mode %s, job store %s%s)",
            harli_config.mode,
            harli_config.state_dir,
            f", resuming {len(requeued)} job(s)" if requeued else "",
        )

    def _check_kv_pools(self) -> None:
        """Lending KV slots needs a plain MHA token pool; refuse any other kind clearly."""
        allocator = self.token_to_kv_pool_allocator
        kvcache = allocator.get_kvcache()
        if type(allocator) not in SUPPORTED_ALLOCATORS or type(kvcache) is not MHATokenToKVPool:
            raise UnsupportedConfigError(
                f"sglang-harli needs a plain MHA KV pool, but this server built "
                f"{type(allocator).__name__} over {type(kvcache).__name__} (hybrid, mamba, MLA "
                "and quantized KV pools are not supported); run with --harli-mode off"
            )

    # --- hooks -------------------------------------------------------------------------------

    def get_next_batch_to_run(self, running_batch, last_batch):
        with self.harli_stats.timed("reclaim_kv"):
            self._harli_reclaim_kv()
        return super().get_next_batch_to_run(running_batch, last_batch)

    def get_next_disagg_decode_batch_to_run(self, running_batch):
        with self.harli_stats.timed("reclaim_kv"):
            self._harli_reclaim_kv()
        return super().get_next_disagg_decode_batch_to_run(running_batch)

    def run_batch(self, batch, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            return super().run_batch(batch, pp_proxy_tensors)
        with self.harli_stats.timed("before_decode"):
            self.harli_stats.record_decode(decode_stats(batch))
        result = super().run_batch(batch, pp_proxy_tensors)
        if self.harli_config.mode == Mode.TIME_SLICED:
            with self.harli_stats.timed("finetune_slice", overhead=False):
                self._harli_finetune(self.harli_config.finetune_budget_ms / 1e3)
        return result

    def on_idle(self):
        with self.harli_stats.timed("idle"):
            pass
        if self.is_fully_idle():
            with self.harli_stats.timed("finetune_quantum", overhead=False):
                self._harli_finetune(self.harli_config.idle_quantum_ms / 1e3)
        return super().on_idle()

    def maybe_sleep_on_idle(self):
        if self._harli_runner is None:  # while a job trains, idle passes are its quanta
            super().maybe_sleep_on_idle()

    def _harli_finetune(self, budget_s: float) -> None:
        runner = self._harli_runner or self._harli_start_next_job()
        if runner is None:
            return
        # SGLang's loops run under no_grad (or inference mode); training needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            still_running = runner.run_for(budget_s)
        if not still_running:
            self._harli_runner = None

    def _harli_start_next_job(self) -> JobRunner | None:
        now = time.monotonic()
        if now < self._harli_next_poll:
            return None
        self._harli_next_poll = now + JOB_POLL_S
        job = self.harli_jobs.claim_next()
        if job is None:
            return None
        logger.info("fine-tuning job %s starts", job.id)
        try:
            self._harli_runner = JobRunner(
                self.harli_jobs,
                job,
                base_model_view(self.tp_worker.model_runner.model),
                self.tokenizer,
                base_model_name=self.server_args.model_path,
                config=RunnerConfig(
                    checkpoint_every=self.harli_config.checkpoint_every,
                    kernels=self.harli_config.kernels,
                ),
            )
        except Exception as exc:  # noqa: BLE001 - a bad job fails; serving goes on
            logger.exception("fine-tuning job %s could not start", job.id)
            fail(self.harli_jobs, job.id, exc)
        return self._harli_runner

    def _harli_reclaim_kv(self) -> None:
        """Give lent KV slots back before SGLang sizes its next batch (today no slot is lent)."""

    # --- reporting ---------------------------------------------------------------------------

    def get_internal_state(self, recv_req):
        # Rides on SGLang's own scheduler RPC, so /harli/status needs no channel of its own.
        output = super().get_internal_state(recv_req)
        runner = self._harli_runner
        output.internal_state["harli"] = {
            "mode": str(self.harli_config.mode),
            "running_job": runner.job.id if runner is not None else None,
            **self.harli_stats.to_dict(),
        }
        return output


def decode_stats(batch) -> DecodeStats:
    if batch.seq_lens_cpu is not None and len(batch.seq_lens_cpu) == batch.batch_size():
        seq_lens = batch.seq_lens_cpu.tolist()
    else:
        seq_lens = [req.seqlen for req in batch.reqs]
    return DecodeStats(
        batch_size=len(seq_lens),
        seq_lens_sum=int(sum(seq_lens)),
        seq_len_max=int(max(seq_lens, default=0)),
    )
