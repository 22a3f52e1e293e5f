"""Finished adapters -> SGLang's LoRA serving, from a thread of the main process.

A scheduler that finishes training writes the adapter's PEFT directory and records its path;
the job stays ``running`` until this publisher has loaded it through SGLang's own
``POST /load_lora_adapter`` (registered in the TokenizerManager, so requests can name it), and
only then marks it ``succeeded``: a client that sees ``succeeded`` can use the adapter at once.
The load goes over HTTP from a thread of its own because SGLang executes it on the scheduler's
loop: a scheduler-thread call would deadlock. After a restart it loads every earlier adapter.

The call reaches SGLang at SGLang's own address (``srt/loopback.py``: https under
``--ssl-certfile``, trusting the server's own certificate or ``--ssl-ca-certs``; loopback for a
wildcard bind; the admin key, else the api key). A load that gets no answer, a 5xx or a 429 is
tried again, :attr:`RetryPolicy.attempts` times in all with a doubling delay, and other jobs'
adapters are loaded while one waits for its next try; a refusal (SGLang's 400 with its
``error_message``, a 401/403, an untrusted certificate) is final at once. Then the job fails with
``error.code = "adapter_load_failed"`` and the reason. SGLang's "already loaded" after a try
whose answer was lost (a timeout) counts as loaded. An earlier job's adapter that cannot be
loaded again after a restart keeps its ``succeeded`` state (a finished job does not change) and
gets an error event saying why it is not served. Only jobs for the served model are published:
servers of other base models may share the state directory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from sglang_harli.jobs.lifecycle import JobStatus, fine_tuned_model_name
from sglang_harli.jobs.store import STORE_ERRORS, Job, JobStore, StoreUnavailable
from sglang_harli.srt.loopback import Reply, ServerEndpoint

logger = logging.getLogger(__name__)

POLL_S = 0.5
ERROR_CODE = "adapter_load_failed"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # loads tried per adapter before its job fails
    first_delay_s: float = 1.0  # wait after the first failed try; doubled after each next one
    max_delay_s: float = 30.0
    timeout_s: float = 300.0  # one load (SGLang runs it on the scheduler, between batches)

    def delay_s(self, failures: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failures - 1))


@dataclasses.dataclass
class _Tries:
    """One adapter's loads so far."""

    failures: int = 0
    next_at: float = 0.0  # time.monotonic() before which it is not tried again
    unanswered: bool = False  # an earlier try may have reached SGLang without an answer


class AdapterPublisher:
    def __init__(
        self,
        store: JobStore,
        endpoint: ServerEndpoint,
        model: str | None = None,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        poll_s: float = POLL_S,
    ):
        self.store, self.endpoint, self.policy, self.poll_s = store, endpoint, policy, poll_s
        # the served model: servers of other models may share the state dir, and an adapter
        # only fits its own base model (None: every job's, for tests)
        self.model = model
        self.loaded: set[str] = set()  # adapter names served (or given up on, for old jobs)
        self._tries: dict[str, _Tries] = {}  # job id -> loads so far, while not settled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harli-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        store_down = False
        while not self._stop.is_set():
            try:
                self.publish_pending()
                store_down = False
            except (*STORE_ERRORS, StoreUnavailable) as exc:  # said once, tried every pass
                if not store_down:
                    logger.warning("adapter publisher: the job store cannot answer (%s)", exc)
                store_down = True
            except Exception:  # noqa: BLE001 - the next pass tries again
                logger.exception("adapter publisher pass failed")
            self._stop.wait(self.poll_s)

    def publish_pending(self) -> None:
        """One pass: load adapters of succeeded jobs not yet loaded (after a restart), then of
        jobs that just finished training; each one only when its next try is due."""
        for job in self._ours(JobStatus.SUCCEEDED):
            if job.adapter_name not in self.loaded and job.adapter_path:
                self._publish(job)
        for job in self._ours(JobStatus.RUNNING):
            if job.adapter_path is None:
                continue  # still training
            if job.cancel_requested:  # cancelled between the end of training and now
                self._tries.pop(job.id, None)
                if self.store.set_status(job.id, JobStatus.CANCELLED):
                    self.store.add_event(job.id, "Job cancelled")
                continue
            self._publish(job)

    def _ours(self, status: JobStatus) -> list[Job]:
        jobs = self.store.jobs_with_status(status)
        return [j for j in jobs if self.model is None or j.model == self.model]

    def _publish(self, job: Job) -> None:
        tries = self._tries.setdefault(job.id, _Tries())
        if time.monotonic() < tries.next_at or self._stop.is_set():
            return
        started = time.monotonic()
        path = self.store.resolve(job.adapter_path).resolve()  # absolute: SGLang reads it
        reply = self.endpoint.post_json(
            "/load_lora_adapter",
            {"lora_name": job.adapter_name, "lora_path": str(path), "pinned": False},
            self.policy.timeout_s,
        )
        problem = _load_problem(reply)
        if problem and tries.unanswered and "already loaded" in problem:
            # an earlier try went through but its answer was lost: the adapter is served
            problem = None
        if problem is None:
            self._tries.pop(job.id, None)
            self.loaded.add(job.adapter_name)
            logger.info("loaded adapter %s in %.2fs", job.adapter_name, time.monotonic() - started)
            self._settled(job)
            return
        tries.failures += 1
        tries.unanswered |= reply.status is None
        if reply.transient and tries.failures < self.policy.attempts:
            delay = self.policy.delay_s(tries.failures)
            tries.next_at = time.monotonic() + delay
            logger.warning(
                "loading adapter %s failed (try %d of %d), again in %.1fs: %s",
                job.adapter_name, tries.failures, self.policy.attempts, delay, problem,
            )  # fmt: skip
            return
        self._tries.pop(job.id, None)
        if reply.transient:
            problem = f"{problem} (after {tries.failures} tries)"
        self._failed(job, problem)

    def _settled(self, job: Job) -> None:
        if job.status != JobStatus.RUNNING:
            logger.info("serving adapter %s again", job.fine_tuned_model)
            return
        model = fine_tuned_model_name(job.model, job.adapter_name)
        if self.store.set_status(job.id, JobStatus.SUCCEEDED, fine_tuned_model=model):
            self.store.add_event(job.id, f"The job has successfully completed: {model}")
            logger.info("fine-tuning job %s succeeded: %s", job.id, model)
        else:  # cancelled while its adapter loaded: it stays loaded, unnamed by any job
            logger.info("fine-tuning job %s ended before its adapter was loaded", job.id)

    def _failed(self, job: Job, problem: str) -> None:
        if job.status == JobStatus.RUNNING:
            message = f"The adapter was trained but could not be loaded for serving: {problem}"
            error = {"code": ERROR_CODE, "message": message, "param": None}
            if self.store.set_status(job.id, JobStatus.FAILED, error=error):
                self.store.add_event(job.id, message, "error")
            logger.error("fine-tuning job %s failed: %s", job.id, message)
        else:  # a finished job stays finished; its events say why its model is not served
            self.loaded.add(job.adapter_name)  # do not try again on every pass
            message = f"The adapter could not be loaded for serving after a restart: {problem}"
            self.store.add_event(job.id, message, "error")
            logger.error("could not load adapter %s again: %s", job.adapter_name, problem)


def _load_problem(reply: Reply) -> str | None:
    """Why ``/load_lora_adapter`` did not load the adapter, or None if it did."""
    if not reply.ok:
        return reply.problem
    if isinstance(reply.body, dict) and reply.body.get("success") is False:  # 200, not loaded
        return str(reply.body.get("error_message") or "the server did not load it")
    return None
