"""Finished adapters -> SGLang's LoRA serving, from a thread of the main process.

A scheduler that finishes training writes the adapter's PEFT directory and records its path;
the job stays ``running`` until this publisher has loaded it through SGLang's own
``POST /load_lora_adapter`` (registered in the TokenizerManager, so requests can name it), and
only then marks it ``succeeded``: a client that sees ``succeeded`` can use the adapter at once.
The load goes over HTTP from a thread of its own because SGLang executes it on the scheduler's
loop: a scheduler-thread call would deadlock. After a restart it loads every earlier adapter.
"""

from __future__ import annotations

import logging
import threading
import time

import requests

from sglang_harli.jobs.lifecycle import JobStatus, fine_tuned_model_name
from sglang_harli.jobs.store import JobStore

logger = logging.getLogger(__name__)

POLL_S = 0.5


class AdapterPublisher:
    def __init__(self, store: JobStore, base_url: str, api_key: str | None = None):
        self.store, self.base_url = store, base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.loaded: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harli-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_pending()
            except Exception:  # noqa: BLE001 - keep publishing later adapters
                logger.exception("adapter publisher pass failed")
            self._stop.wait(POLL_S)

    def publish_pending(self) -> None:
        """Load adapters of succeeded jobs not yet loaded, then of jobs that just finished."""
        for job in self.store.jobs_with_status(JobStatus.SUCCEEDED):
            if job.adapter_name not in self.loaded and self._load(job.adapter_name, job):
                logger.info("serving adapter %s again", job.fine_tuned_model)
        for job in self.store.jobs_with_status(JobStatus.RUNNING):
            if job.adapter_path is None:
                continue
            if job.cancel_requested:  # cancelled between the end of training and now
                self.store.set_status(job.id, JobStatus.CANCELLED)
                self.store.add_event(job.id, "Job cancelled")
                continue
            if self._load(job.adapter_name, job):
                model = fine_tuned_model_name(job.model, job.adapter_name)
                self.store.set_status(job.id, JobStatus.SUCCEEDED, fine_tuned_model=model)
                self.store.add_event(job.id, f"The job has successfully completed: {model}")
                logger.info("fine-tuning job %s succeeded: %s", job.id, model)

    def _load(self, name: str, job) -> bool:
        started = time.monotonic()
        response = requests.post(
            f"{self.base_url}/load_lora_adapter",
            json={"lora_name": name, "lora_path": job.adapter_path, "pinned": False},
            headers=self.headers,
            timeout=600,
        )
        body = response.json() if response.content else {}
        if response.status_code == 200 and body.get("success", True):
            self.loaded.add(name)
            logger.info("loaded adapter %s in %.2fs", name, time.monotonic() - started)
            return True
        message = body.get("message") or response.text
        if job.status == JobStatus.RUNNING:
            self.store.set_status(
                job.id, JobStatus.FAILED, error={"code": "adapter_load_failed", "message": message}
            )
            self.store.add_event(job.id, f"The adapter could not be served: {message}", "error")
        else:
            self.loaded.add(name)  # do not retry an earlier job's adapter on every pass
            logger.error("could not load adapter %s again: %s", name, message)
        return False
