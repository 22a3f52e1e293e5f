"""The job agent: a scheduler process's one link to the job store, on a thread of its own.

The scheduler thread serves requests, so nothing on it may wait for SQLite or a disk: another
process holding the database's write lock, a full disk or a read-only file system must not
pause decode. The scheduler thread therefore never touches the store. It trains a job through a
:class:`JobLink`, whose signals it reads (plain attributes) and to which it hands what must be
written (a list append). This thread does the rest:

- **writes**, in order, per job: files first (checkpoints, the adapter: durable directories),
  then their rows, in one transaction that applies only while this process still owns the job
  (``JobStore.apply``). A write that fails on the store (:data:`STORE_ERRORS`) stays queued and
  is tried again with a growing delay; meanwhile the runner pauses (decode goes on). If the store
  stays unwritable for ``give_up_s``, the job fails, with that reason, once it can be written;
- **ownership**: it renews the lease of every job it owns every ``renew_s`` and reads each
  running job's cancel flag and owner every ``tick_s``; a job another server took over (our
  lease expired) is flagged ``lost`` and the runner drops it without writing anything;
- **work**: when the scheduler has no job, it re-queues jobs whose owners stopped renewing their
  leases, claims the oldest queued job for this server's model, and builds its runner (reading
  the tokenized dataset and the newest readable checkpoint: the heavy part of a job's start)
  before handing it to the scheduler.

Nothing here imports SGLang; ``srt/scheduler.py`` wires it to the scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .lifecycle import FINAL_STATES, JobStatus
from .store import (
    LEASE_S,
    STORE_ERRORS,
    Job,
    JobStore,
    JobWrite,
    NewEvent,
    Outcome,
    Owner,
)

logger = logging.getLogger(__name__)

STORE_UNAVAILABLE = "store_unavailable"


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    model: str | None = None  # claim only jobs for this model (the served model's name)
    poll_s: float = 0.5  # how often an idle scheduler looks for a queued job
    tick_s: float = 0.05  # how often a running job's cancel flag and owner are read
    lease_s: float = LEASE_S
    renew_s: float = 5.0  # lease renewals: several within one lease
    busy_timeout_ms: int = 1000  # this thread's waits for a lock (never the scheduler's)
    retry_first_s: float = 0.1  # after a store error: first retry, doubling up to retry_max_s
    retry_max_s: float = 2.0
    give_up_s: float = 300.0  # a job whose writes keep failing this long fails


@dataclasses.dataclass(eq=False)
class Outgoing:
    """What a runner hands over to be written for its job: ``files`` (a durable write, tried
    again until it succeeds) and then ``rows``; ``after`` runs once the rows are committed,
    ``release`` once the item is written or dropped (it frees the snapshot buffers)."""

    rows: list[JobWrite]
    files: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    files_done: bool = False

    def drop(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None


class JobLink:
    """A job as its runner sees the agent: signals to read, writes to hand over. Neither reading
    nor submitting waits for anything, so both are safe on the scheduler thread."""

    writes = True  # what is submitted is written (a follower's link drops it)

    def __init__(self, agent: JobAgent, job: Job):
        self.job_id = job.id
        self.owner = agent.owner
        self.cancel_requested = job.cancel_requested
        self.lost = False  # another server owns the job now: stop, write nothing
        self.failed: str | None = None  # the agent failed the job (why): stop
        self.closed = False  # the runner is done; the link goes once its writes are through
        self._agent = agent
        self._queue: list[Outgoing] = []
        self._lock = threading.Lock()

    @property
    def store_failing(self) -> bool:
        """The store does not answer now: the runner pauses (its writes wait in the queue)."""
        return self._agent.failing_since is not None

    @property
    def stopped(self) -> bool:
        return self.lost or self.failed is not None

    def submit(
        self,
        *rows: JobWrite,
        files: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        item = Outgoing(list(rows), files, after, release)
        with self._lock:
            if self.stopped:
                item.drop()
                return
            self._queue.append(item)
        self._agent.wake()

    def close(self) -> None:
        """The runner is done with the job (its last writes may still be queued)."""
        self.closed = True
        self._agent.wake()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # --- the agent's side --------------------------------------------------------------------

    def _peek(self) -> list[Outgoing]:
        with self._lock:
            return list(self._queue)

    def _done(self, count: int) -> None:
        with self._lock:
            del self._queue[:count]

    def _replace(self, items: list[Outgoing]) -> None:
        with self._lock:
            dropped, self._queue = self._queue, items
        for item in dropped:
            item.drop()

    def _lose(self) -> None:
        self.lost = True
        self._replace([])


class FollowerLink:
    """The link of a tensor-parallel follower's runner (ranks > 0): rank 0 decides and writes
    for the job (``corun/ranks.py``), so there are no signals to read and what the runner
    submits is dropped (its snapshot buffers released at once)."""

    writes = False
    cancel_requested = False
    lost = False
    failed: str | None = None
    store_failing = False
    stopped = False

    def __init__(self, agent: JobAgent, job: Job):
        self.job_id, self.owner = job.id, agent.owner
        self.closed = False

    def submit(self, *rows: JobWrite, files=None, after=None, release=None) -> None:
        if release is not None:
            release()

    def close(self) -> None:
        self.closed = True

    def pending(self) -> int:
        return 0


Builder = Callable[..., Any]


class JobAgent:
    """See the module docstring. ``build(store, job, link)`` makes a job's runner (on this
    thread); the scheduler takes it with :meth:`take_runner`."""

    def __init__(
        self,
        state_dir: str | Path,
        build: Builder,
        config: AgentConfig = AgentConfig(),
        owner: Owner | None = None,
    ):
        self.state_dir, self.build, self.config = Path(state_dir), build, config
        self.owner = owner or Owner.this_process()
        self.failing_since: float | None = None  # time.monotonic() of the first failure
        self.last_error: str | None = None
        self._store: JobStore | None = None
        self._links: dict[str, JobLink] = {}  # jobs this process owns and has not let go of
        self._building: tuple[Job, JobLink] | None = None  # claimed, its runner not built yet
        self._ready: Any = None  # a built runner the scheduler has not taken yet
        self._wanted = False  # the scheduler has no runner
        self._handoff = threading.Lock()
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._next_poll = 0.0
        self._next_renew = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the scheduler thread's side (never waits) -------------------------------------------

    def start(self) -> JobAgent:
        self._thread = threading.Thread(target=self._run, name="harli-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        self._wake.set()

    def take_runner(self) -> Any:
        """A runner ready to train, or None; calling it also says this scheduler has no job."""
        with self._handoff:
            runner, self._ready = self._ready, None
            self._wanted = runner is None
        if runner is None:
            self._wake.set()
        return runner

    def status(self) -> dict[str, Any]:
        failing = self.failing_since
        return {
            "owner": self.owner.info,
            "store_ok": failing is None,
            "store_failing_s": None if failing is None else round(time.monotonic() - failing, 1),
            "store_error": self.last_error if failing is not None else None,
        }

    # --- this thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before the pass: a submit during it wakes the next one at once
            try:
                self.pump()
            except Exception:  # noqa: BLE001 - the agent must outlive any one bad pass
                logger.exception("job agent pass failed")
            active = self._links or self._building is not None
            self._wake.wait(self.config.tick_s if active else self.config.poll_s)

    def pump(self) -> None:
        """One pass: writes, ownership, then new work. Tests call it directly."""
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            store = self._open()
            for link in list(self._links.values()):
                self._flush(store, link)
            self._watch(store, now)
            self._find_work(store, now)
        except STORE_ERRORS as exc:
            self._store_failed(exc)
            return
        if self.failing_since is not None:
            logger.warning(
                "job store answers again after %.1fs", time.monotonic() - self.failing_since
            )
        self.failing_since, self._retry_delay = None, 0.0

    def _open(self) -> JobStore:
        if self._store is None:
            store = JobStore(self.state_dir, busy_timeout_ms=self.config.busy_timeout_ms)
            for status in FINAL_STATES:  # what crashes left behind; active jobs: their owners
                for job in store.jobs_with_status(status):
                    store.clean_job_dir(job.id)
            self._store = store
        return self._store

    def _flush(self, store: JobStore, link: JobLink) -> None:
        """Write the link's queue in order: each item's files, then the rows of every item
        whose files are written, in one owner-checked transaction."""
        while items := link._peek():
            batch: list[Outgoing] | None = []
            for item in items:
                if item.files is not None and not item.files_done:
                    if batch:
                        break  # commit what precedes these files first
                    if not store.owns(link.job_id, self.owner):
                        self._lost(link)  # another server's directory now: write nothing there
                        return
                    try:
                        item.files()
                    except STORE_ERRORS:
                        raise
                    except Exception as exc:  # noqa: BLE001 - e.g. a non-finite checkpoint
                        self._fail_job(link, exc)  # the queue is now the failure (or empty)
                        batch = None
                        break
                    item.files_done = True
                batch.append(item)
            if batch is None:
                continue
            rows = [row for item in batch for row in item.rows]
            try:
                owned = store.apply(link.job_id, rows, owner=self.owner)
            except STORE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad row must not block the queue
                self._fail_job(link, exc)
                continue
            if not owned:
                self._lost(link)
                return
            link._done(len(batch))
            for item in batch:
                item.drop()
                if item.after is not None:
                    _quietly(item.after)
        if link.closed and link.job_id in self._links and not link._peek():
            del self._links[link.job_id]

    def _watch(self, store: JobStore, now: float) -> None:
        """Cancel flags and owners of the jobs being trained; lease renewals."""
        open_links = [link for link in self._links.values() if not link.closed]
        if open_links:
            for job in store.jobs_by_id([link.job_id for link in open_links]):
                link = self._links[job.id]
                if job.owner != self.owner.id or job.status != JobStatus.RUNNING:
                    self._lost(link)
                else:
                    link.cancel_requested = job.cancel_requested
        if now >= self._next_renew:
            for link in list(self._links.values()):
                if not store.renew_lease(link.job_id, self.owner, self.config.lease_s):
                    self._lost(link)
            self._next_renew = now + self.config.renew_s

    def _find_work(self, store: JobStore, now: float) -> None:
        if self._building is None:
            with self._handoff:
                wanted = self._wanted and self._ready is None
            if not wanted or now < self._next_poll:
                return
            self._next_poll = now + self.config.poll_s
            store.requeue_expired()
            store.fail_abandoned_validations()
            job = store.claim_next(self.config.model, self.owner, self.config.lease_s)
            if job is None:
                return
            logger.info("fine-tuning job %s claimed (%s)", job.id, self.owner.info)
            link = JobLink(self, job)
            self._links[job.id] = link
            self._building = (job, link)
        job, link = self._building
        try:
            runner = self.build(store, job, link)
        except STORE_ERRORS:
            raise  # the store failed under the build: build again once it answers
        except Exception as exc:  # noqa: BLE001 - a job that cannot start fails; serving goes on
            logger.exception("fine-tuning job %s could not start", job.id)
            self._building = None
            self._fail_job(link, exc)
            link.close()
            self._flush(store, link)
            return
        self._building = None
        if not store.renew_lease(job.id, self.owner, self.config.lease_s):
            self._lost(link)  # the build outlived the lease and another server took the job
            return
        with self._handoff:
            self._ready, self._wanted = runner, False

    def _lost(self, link: JobLink) -> None:
        if not link.lost:
            logger.warning("fine-tuning job %s is no longer ours: training stops", link.job_id)
        link._lose()
        link.closed = True
        self._links.pop(link.job_id, None)
        if self._building is not None and self._building[1] is link:
            self._building = None

    def _fail_job(self, link: JobLink, exc: BaseException) -> None:
        """The job fails with ``exc`` as its reason: its queue becomes that failure."""
        message = f"{type(exc).__name__}: {exc}"
        if link.failed is not None:  # not even the failure can be written: let the job go
            logger.error("fine-tuning job %s: cannot record its end (%s)", link.job_id, message)
            link._replace([])
            link.closed = True
            self._links.pop(link.job_id, None)
            return
        logger.error("fine-tuning job %s failed: %s", link.job_id, message)
        link.failed = message
        link._replace([Outgoing(failure_rows(getattr(exc, "code", "training_failed"), message))])

    def _store_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.failing_since is None:
            self.failing_since = now
            logger.warning("job store unavailable (%s); fine-tuning pauses", self.last_error)
        self._retry_delay = min(
            self.config.retry_max_s, max(self.config.retry_first_s, 2 * self._retry_delay)
        )
        self._retry_at = now + self._retry_delay
        failing_s = now - self.failing_since
        if failing_s < self.config.give_up_s:
            return
        for link in self._links.values():
            if link.failed is None and not link.lost:
                message = (
                    f"the job store could not be written for {failing_s:.0f}s "
                    f"({self.last_error}); the job stopped"
                )
                logger.error("fine-tuning job %s fails: %s", link.job_id, message)
                link.failed = message
                link._replace([Outgoing(failure_rows(STORE_UNAVAILABLE, message))])


def failure_rows(code: str, message: str) -> list[JobWrite]:
    return [
        Outcome(JobStatus.FAILED, {"code": code, "message": message, "param": None}),
        NewEvent(f"Job failed: {message}", level="error"),
    ]


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - clean-ups after a commit are best effort
        logger.exception("clean-up after a job write failed")


class FollowerAgent(JobAgent):
    """The agent of a tensor-parallel rank > 0: it claims nothing and writes nothing; on the
    scheduler's word it builds a runner of the job rank 0 trains, from the checkpoint rank 0's
    runner started from (``corun/ranks.py``), on this thread as the leader's agent does."""

    def __init__(self, state_dir: str | Path, build: Builder, config: AgentConfig = AgentConfig()):
        super().__init__(state_dir, build, config)
        self._target: tuple[str, int] | None = None  # (job id, step) wanted

    def runner_for(self, job_id: str, step: int) -> Any:
        """The built runner of ``job_id`` starting at ``step``, or None (then it is built)."""
        with self._handoff:
            ready = self._ready
            if ready is not None and (ready.job.id, ready.started_at_step) == (job_id, step):
                self._ready = None
                return ready
            if self._target != (job_id, step):
                self._target, self._ready = (job_id, step), None
        self._wake.set()
        return None

    def forget(self) -> None:
        """Rank 0 trains nothing: a runner built meanwhile is not wanted."""
        with self._handoff:
            self._target = self._ready = None

    def pump(self) -> None:
        with self._handoff:
            target, ready = self._target, self._ready
        if target is None or ready is not None:
            return
        job_id, step = target
        try:
            store = self._open()
            jobs = store.jobs_by_id([job_id])
            if not jobs:
                raise LookupError(f"job {job_id} is not in the store")
            runner = self.build(store, jobs[0], FollowerLink(self, jobs[0]), resume_step=step)
        except Exception:  # noqa: BLE001 - tried again at the next pass; rank 0's job waits
            logger.exception("tensor-parallel follower: cannot build job %s's runner", job_id)
            self._wake.wait(self.config.retry_max_s)
            return
        with self._handoff:
            if self._target == target:
                self._ready = runner

    def _open(self) -> JobStore:
        if self._store is None:  # rank 0's agent cleans up; a follower only reads
            self._store = JobStore(self.state_dir, busy_timeout_ms=self.config.busy_timeout_ms)
        return self._store
