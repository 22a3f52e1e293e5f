"""The job store on its own: states, FCFS claiming, cancellation, restart, pagination; its
connections (busy timeout, opening under a lock, old databases), leases and owner-checked writes,
non-finite numbers, relative paths, pruning and rewinding."""

from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_harli.jobs import store as store_module
from sglang_harli.jobs.lifecycle import reserved_name_reason
from sglang_harli.jobs.store import (
    AdapterNameTaken,
    AddCheckpointRecord,
    JobStore,
    NewEvent,
    Owner,
    Progress,
    Prune,
    Rewind,
    StoreUnavailable,
    open_store,
    store_status,
)
from sglang_harli.jobs.store_errors import classify

HP = {"n_epochs": 1}


def make_job(store: JobStore, suffix: str | None = None, status: str = "queued"):
    upload = store.add_file("train.jsonl", "fine-tune", b'{"prompt": "a", "completion": "b"}\n')
    return store.create_job("m", upload.id, HP, seed=0, suffix=suffix, status=status)


def test_jobs_train_first_come_first_served(tmp_path):
    store = JobStore(tmp_path)
    first, second = make_job(store), make_job(store)
    claimed = store.claim_next()
    assert claimed.id == first.id and claimed.status == "running" and claimed.started_at
    assert store.claim_next().id == second.id
    assert store.claim_next() is None


def _claim(state_dir, out):
    job = JobStore(state_dir).claim_next()
    out.put(job.id if job else None)


def test_a_job_is_claimed_by_one_process_only(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    out = multiprocessing.get_context("spawn").Queue()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_claim, args=(tmp_path, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = sorted([out.get(timeout=60) for _ in procs], key=str)
    for p in procs:
        p.join()
    assert results.count(job.id) == 1 and results.count(None) == 2


def test_cancel_queued_at_once_running_when_the_runner_checks(tmp_path):
    store = JobStore(tmp_path)
    queued, running = make_job(store), make_job(store)
    store.set_status(running.id, "running")
    assert store.request_cancel(queued.id).status == "cancelled"
    after = store.request_cancel(running.id)
    assert after.status == "running" and after.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.request_cancel("ftjob-missing") is None


def test_restart_requeues_unfinished_running_jobs_only(tmp_path):
    store = JobStore(tmp_path)
    training, publishing = make_job(store), make_job(store)
    store.set_status(training.id, "running")
    store.set_status(publishing.id, "running")
    store.update_progress(publishing.id, adapter_path="/adapter")
    assert JobStore(tmp_path).requeue_expired() == [training.id]
    assert store.get_job(training.id).status == "queued"
    assert store.get_job(publishing.id).status == "running"


def test_adapter_names_and_final_states(tmp_path):
    store = JobStore(tmp_path)
    named, unnamed = make_job(store, suffix="bot"), make_job(store)
    assert named.adapter_name == "bot" and unnamed.adapter_name == unnamed.id
    assert store.adapter_name_taken("bot")
    store.set_status(named.id, "failed", error={"code": "x", "message": "boom"})
    failed = store.get_job(named.id)
    assert failed.finished_at and failed.error == {"code": "x", "message": "boom"}
    assert not store.adapter_name_taken("bot")  # a failed job frees its name


def test_pages_are_newest_first(tmp_path):
    store = JobStore(tmp_path)
    jobs = [make_job(store) for _ in range(5)]
    page, more = store.list_jobs(limit=2)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and more
    page, more = store.list_jobs(after=page[-1].id, limit=10)
    assert [j.id for j in page] == [j.id for j in reversed(jobs[:3])] and not more

    for i in range(4):
        store.add_event(jobs[0].id, f"event {i}")
    events, more = store.list_events(jobs[0].id, limit=2)
    assert [e.message for e in events] == ["event 3", "event 2"] and more
    events, more = store.list_events(jobs[0].id, after=events[-1].id, limit=10)
    assert [e.message for e in events] == [
        "event 1",
        "event 0",
        f"Created fine-tuning job: {jobs[0].id}",
    ]
    assert not more


def test_checkpoints_and_files(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    for step in (3, 6):
        store.add_checkpoint(job.id, step, f"/ckpt/{step}", {"step": step, "train_loss": 1.0})
    checkpoints, _ = store.list_checkpoints(job.id)
    assert [c.step for c in checkpoints] == [6, 3]
    upload = store.get_file(job.training_file)
    assert upload.bytes == len(open(upload.path, "rb").read())
    store.set_status(job.id, "cancelled")  # a file an unfinished job needs cannot be deleted
    assert store.delete_file(upload.id) and store.get_file(upload.id) is None
    assert not store.delete_file(upload.id)


@pytest.mark.parametrize("purpose", [None, "fine-tune", "batch"])
def test_list_files_by_purpose(tmp_path, purpose):
    store = JobStore(tmp_path)
    store.add_file("a", "fine-tune", b"x")
    store.add_file("b", "batch", b"y")
    files = store.list_files(purpose)
    assert len(files) == (2 if purpose is None else 1)


# --- connections ---------------------------------------------------------------------------------


def test_a_short_busy_timeout_gives_up_quickly_and_reads_go_on(tmp_path, write_lock):
    store = JobStore(tmp_path)
    job = make_job(store)
    write_lock(store)
    quick = JobStore(tmp_path, busy_timeout_ms=5)  # opening a current database takes no lock
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        quick.add_event(job.id, "blocked")
    assert time.monotonic() - started < 1.0
    assert quick.get_job(job.id).status == "queued"  # WAL: reads do not wait for the writer
    assert quick.claim_next(model="other") is None  # nothing to claim: no write attempted


OLD_SCHEMA = """
CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, created_at INTEGER NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT,
    adapter_name TEXT NOT NULL, seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL,
    status TEXT NOT NULL, started_at INTEGER, finished_at INTEGER, estimated_finish INTEGER,
    fine_tuned_model TEXT, adapter_path TEXT, error TEXT, trained_tokens INTEGER,
    step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT);
CREATE TABLE checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL,
    metrics TEXT NOT NULL);
INSERT INTO jobs VALUES ('ftjob-old', 1, 0, 'm', 'file-x', NULL, NULL, 'ftjob-old', 0, '{}',
    'running', 0, NULL, NULL, NULL, NULL, NULL, NULL, 3, 9, 0);
INSERT INTO jobs VALUES ('ftjob-done', 2, 0, 'm', 'file-x', NULL, NULL, 'done', 0, '{}',
    'succeeded', 0, 1, NULL, 'm:done', '/elsewhere/adapter', NULL, NULL, 9, 9, 0);
INSERT INTO events (job_id, created_at, level, message, type, data)
    VALUES ('ftjob-old', 0, 'info', 'Step 3', 'metrics', '{"step": 3, "train_loss": NaN}');
INSERT INTO checkpoints (id, job_id, created_at, step, path, metrics)
    VALUES ('ftckpt-old', 'ftjob-old', 0, 3, '/abs/step-3', '{"train_loss": Infinity}');
"""


def test_an_older_database_opens_and_gains_the_new_columns(tmp_path):
    with sqlite3.connect(tmp_path / "harli.db") as db:
        db.executescript(OLD_SCHEMA)
    store = JobStore(tmp_path)
    job = store.get_job("ftjob-old")
    assert job.owner is None and job.lease_expires is None and job.step == 3
    # old absolute rows are read as they are
    assert store.get_job("ftjob-done").adapter_path == "/elsewhere/adapter"
    [event], _ = store.list_events(job.id)
    assert event.data == {"step": 3, "train_loss": None}  # NaN written by the old store
    [checkpoint], _ = store.list_checkpoints(job.id)
    assert checkpoint.path == "/abs/step-3" and checkpoint.metrics == {"train_loss": None}
    owner = Owner.this_process()
    store.requeue_expired()  # running without a lease: an old server's job, re-queued
    assert store.claim_next(owner=owner).owner == owner.id


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    data = {"step": 1, "train_loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4}
    store.add_event(job.id, "Step 1", data=data, type="metrics")
    store.add_checkpoint(job.id, 1, str(tmp_path / "c"), {"train_loss": float("-inf")})
    store.update_progress(job.id, estimated_finish=float("nan"))
    event = store.list_events(job.id, limit=1)[0][0]
    assert event.data == {"step": 1, "train_loss": None, "grad_norm": None, "lr": 1e-4}
    assert store.list_checkpoints(job.id)[0][0].metrics == {"train_loss": None}
    with sqlite3.connect(store.db_path) as db:
        stored = [row[0] for row in db.execute("SELECT data FROM events WHERE data IS NOT NULL")]
    for text in stored:
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} stored"))


# --- ownership ----------------------------------------------------------------------------------


def test_claims_are_for_the_served_model_and_carry_a_lease(tmp_path):
    store = JobStore(tmp_path)
    upload = store.add_file("t.jsonl", "fine-tune", b"x")
    other = store.create_job("other-model", upload.id, HP, seed=0, status="queued")
    mine = store.create_job("m", upload.id, HP, seed=0, status="queued")
    owner = Owner.this_process()
    claimed = store.claim_next(model="m", owner=owner, lease_s=30)
    assert claimed.id == mine.id and claimed.owner == owner.id
    assert "pid" in claimed.owner_info and claimed.lease_expires > time.time() + 20
    assert store.claim_next(model="m", owner=owner) is None
    assert store.get_job(other.id).status == "queued"


def test_only_expired_leases_are_requeued_and_an_owner_that_lost_one_writes_nothing(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    first, second = Owner.this_process(), Owner("owner-second", "elsewhere pid 2")
    store.claim_next(owner=first, lease_s=30)
    assert store.requeue_expired() == []  # a restarted server leaves a live lease alone
    assert store.get_job(job.id).owner == first.id
    assert store.renew_lease(job.id, first, lease_s=30)
    assert store.apply(job.id, [NewEvent("step 1", type="metrics", data={"step": 1})], first)

    assert store.requeue_expired(now=time.time() + 60) == [job.id]  # the lease ran out
    assert store.claim_next(owner=second).owner == second.id
    assert not store.renew_lease(job.id, first)
    assert not store.apply(job.id, [NewEvent("late", data={"step": 2})], first)
    assert store.apply(job.id, [Progress({"step": 1})], second)
    messages = [e.message for e in store.list_events(job.id, limit=10)[0]]
    assert "late" not in messages and any("stopped renewing its lease" in m for m in messages)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_paths_are_stored_relative_and_pruned_with_their_directories(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    for step in (2, 4, 6, 8):
        path = store.job_dir(job.id) / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        store.add_checkpoint(job.id, step, str(path), {"step": step})
    store.update_progress(job.id, adapter_path=str(store.job_dir(job.id) / "adapter"))
    with sqlite3.connect(store.db_path) as db:
        paths = [row[0] for row in db.execute("SELECT path FROM checkpoints")]
        (adapter,) = db.execute("SELECT adapter_path FROM jobs").fetchone()
    assert paths[0] == f"jobs/{job.id}/checkpoints/step-2" and adapter == f"jobs/{job.id}/adapter"
    assert store.get_job(job.id).adapter_path == str(store.job_dir(job.id) / "adapter")

    store.apply(job.id, [Prune(keep=2)])  # what a runner writes after each checkpoint
    assert [c.step for c in store.list_checkpoints(job.id)[0]] == [8, 6]
    left = sorted(p.name for p in (store.job_dir(job.id) / "checkpoints").iterdir())
    assert left == ["step-6", "step-8"]


def test_rewind_forgets_what_a_lost_run_recorded_after_its_checkpoint(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    writes = [NewEvent(f"Step {s}", type="metrics", data={"step": s}) for s in range(1, 6)]
    writes += [AddCheckpointRecord(s, str(tmp_path / f"c{s}"), {"step": s}) for s in (2, 4)]
    store.apply(job.id, [*writes, NewEvent("a message")])
    store.apply(job.id, [Rewind(2)])
    events = store.list_events(job.id, limit=20)[0]
    assert sorted(e.data["step"] for e in events if e.type == "metrics") == [1, 2]
    assert "a message" in [e.message for e in events]
    assert [c.step for c in store.list_checkpoints(job.id)[0]] == [2]
    assert store.get_job(job.id).step == 2


def test_a_job_a_stopped_server_left_validating_fails_and_frees_its_file(tmp_path):
    from sglang_harli.jobs.store import ABANDONED_VALIDATION_S, FileInUseError

    store = JobStore(tmp_path)
    stuck = make_job(store, status="validating_files")
    with pytest.raises(FileInUseError):
        store.delete_file(stuck.training_file)
    later = stuck.created_at + ABANDONED_VALIDATION_S + 1
    assert store.fail_abandoned_validations(now=later) == [stuck.id]
    failed = store.get_job(stuck.id)
    assert failed.status == "failed" and failed.error["code"] == "validation_interrupted"
    assert store.delete_file(stuck.training_file)  # its file is no longer held
    # a job whose create request may still be running is left alone
    young = make_job(store, status="validating_files")
    assert store.fail_abandoned_validations(now=young.created_at + 5) == []
    assert store.get_job(young.id).status == "validating_files"


def test_an_event_cursor_with_a_non_ascii_digit_pages_from_the_newest(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    store.add_event(job.id, "newest")
    for cursor in ("ftevent-\u00b2", "ftevent-\u0661", "ftevent-", "ftevent-x"):
        events, _ = store.list_events(job.id, after=cursor)  # "²".isdigit(), int("²") fails
        assert events[0].message == "newest"


@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("default", True),
        ("DEFAULT", True),
        ("gpt-4", True),
        ("gpt-4o-mini", True),
        ("gpt-3.5-turbo", True),
        ("chatgpt-4o-latest", True),
        ("o1", True),
        ("o3-mini", True),
        ("text-davinci-003", True),
        ("davinci-002", True),
        ("tiny-llama-abc", True),  # the served model's directory name
        ("Tiny-Llama-ABC", True),
        ("support-bot", False),
        ("o1x", False),
        ("gpt4all-tuned", False),
        ("defaults", False),
        ("my-default", False),
    ],
)
def test_names_that_mean_the_base_model_cannot_name_an_adapter(name, reserved):
    reason = reserved_name_reason(name, frozenset({"/models/tiny-llama-abc", "tiny-llama-abc"}))
    assert (reason is not None) == reserved
    if reserved:
        assert name in reason and "base model" in reason


# --- adapter names are unique, under concurrency too -----------------------------------------


def test_concurrent_creates_with_one_suffix_accept_exactly_one(tmp_path):
    """Eight requests at once, each with its own connection as the API's worker threads have:
    the name check and the insert are one transaction, so one job is created, seven refused."""
    store = JobStore(tmp_path)
    upload = store.add_file("train.jsonl", "fine-tune", b'{"prompt": "a", "completion": "b"}\n')
    start = threading.Barrier(8)

    def create(_: int) -> str:
        start.wait()
        try:
            return JobStore(tmp_path).create_job("m", upload.id, HP, seed=0, suffix="twin").id
        except AdapterNameTaken as exc:
            assert exc.adapter_name == "twin"
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert results.count("refused") == 7
    jobs, _ = store.list_jobs(limit=100)
    assert [j.adapter_name for j in jobs] == ["twin"]
    store.set_status(jobs[0].id, "cancelled")  # a cancelled job frees its name
    assert make_job(store, suffix="twin").adapter_name == "twin"


def test_duplicate_names_left_by_an_older_store_open_and_get_the_index_once_they_end(tmp_path):
    with sqlite3.connect(tmp_path / "harli.db") as db:
        db.executescript(OLD_SCHEMA)
        db.execute(  # a second running job named 'done'... and a second one named 'ftjob-old'
            "INSERT INTO jobs SELECT 'ftjob-twin', 3, created_at, model, training_file,"
            " validation_file, suffix, adapter_name, seed, hyperparameters, status,"
            " started_at, finished_at, estimated_finish, fine_tuned_model, adapter_path, error,"
            " trained_tokens, step, total_steps, cancel_requested FROM jobs WHERE id = 'ftjob-old'"
        )
    store = JobStore(tmp_path)  # opens: the index waits
    assert store.get_job("ftjob-twin").adapter_name == "ftjob-old"
    with pytest.raises(AdapterNameTaken):  # the transaction keeps new names unique meanwhile
        make_job(store, suffix="done")
    store.set_status("ftjob-twin", "failed", error={"code": "x", "message": "duplicate"})
    JobStore(tmp_path)  # the next open creates it
    with sqlite3.connect(tmp_path / "harli.db") as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "jobs_adapter_name_held" in names
        with pytest.raises(sqlite3.IntegrityError):  # even a writer that skips the check
            db.execute("UPDATE jobs SET adapter_name = 'done' WHERE id = 'ftjob-old'")


# --- a store that cannot be opened, a full disk ------------------------------------------------


def test_a_corrupt_database_gives_a_stand_in_that_says_why_and_reopens(tmp_path, monkeypatch):
    (tmp_path / "harli.db").write_bytes(b"this is not a database" * 100)
    store = open_store(tmp_path)
    assert store_status(store) == {"available": False, "error": store.reason}
    assert "not a database" in store.reason and str(tmp_path) not in store.reason
    with pytest.raises(StoreUnavailable, match="not a database"):
        store.list_jobs()
    failure = classify(StoreUnavailable(store.reason))
    assert failure.status == 503 and "not a database" in failure.message
    (tmp_path / "harli.db").unlink()  # the operator moves it away
    monkeypatch.setattr(store_module, "REOPEN_S", 0.0)
    store._next_try = 0.0
    assert store.list_jobs() == ([], False)
    assert store_status(store) == {"available": True, "error": None}


FULL_DISK_READS = """
import json, resource, signal, sys
from sglang_harli.jobs.store import JobStore
from sglang_harli.jobs.store_errors import classify

store = JobStore(sys.argv[1])
job = store.create_job("m", "file-x", {}, seed=0, suffix="kept")
# From here on no file may grow: what a full disk does to SQLite (a reader that must create or
# size the WAL's shared-memory index gets "disk I/O error").
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
out = {"jobs": [j.adapter_name for j in store.list_jobs()[0]]}
out["events"] = len(store.list_events(job.id)[0])
out["get"] = store.get_job(job.id).status
try:
    store.create_job("m", "file-x", {"big": "x" * 100_000}, seed=0)
    out["write"] = "ok"
except Exception as exc:
    out["write"] = classify(exc).status
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
print(json.dumps(out))
"""


def test_reads_keep_working_when_the_disk_fills(tmp_path):
    """A full disk, simulated with a file-size limit of 0 bytes in a process of its own: the
    store's jobs and events still read; a write fails with a store error the API maps."""
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_READS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["jobs"] == ["kept"] and out["events"] == 1 and out["get"] == "validating_files"
    assert out["write"] == 503  # an I/O error on a disk that is not really full: 503


def test_a_full_database_or_disk_is_a_507_naming_the_disk(tmp_path):
    store = JobStore(tmp_path)
    job = make_job(store)
    with sqlite3.connect(store.db_path) as db:  # SQLite's own "database or disk is full"
        db.execute("PRAGMA max_page_count = 1")  # below the current size: no page may be added
        with pytest.raises(sqlite3.OperationalError) as full:
            db.execute(
                "INSERT INTO events (job_id, created_at, level, message, type)"
                " VALUES (?, 0, 'info', ?, 'message')",
                (job.id, "x" * 100_000),
            )
    failure = classify(full.value)
    assert failure.status == 507 and "disk" in failure.message and "full" in failure.message
    nospace = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "files" / "x"))
    failure = classify(nospace)
    assert failure.status == 507 and str(tmp_path) not in failure.message


def test_the_api_maps_store_failures_in_one_place(tmp_path, write_lock):
    """The wrapper around every fine-tuning route: a full disk on a write is a 507, a lock held
    past the busy timeout a 503 to retry, a name another job holds a 409; never a 500."""
    from sglang_harli.srt.http_api import ApiError, _route

    store = JobStore(tmp_path)
    job = make_job(store, suffix="held")

    async def fill_the_database():
        with sqlite3.connect(store.db_path) as db:
            db.execute("PRAGMA max_page_count = 1")
            db.execute(
                "INSERT INTO events (job_id, created_at, level, message, type)"
                " VALUES (?, 0, 'info', ?, 'message')",
                (job.id, "x" * 100_000),
            )

    async def write_while_locked():
        JobStore(tmp_path, busy_timeout_ms=5).add_event(job.id, "blocked")

    async def take_a_held_name():
        make_job(store, suffix="held")

    def answer(route) -> tuple[int, str | None]:
        with pytest.raises(ApiError) as refused:
            asyncio.run(_route(route)())
        return refused.value.status, refused.value.code

    answers = {"full": answer(fill_the_database), "held": answer(take_a_held_name)}
    write_lock(store, seconds=5)
    answers["busy"] = answer(write_while_locked)
    assert answers == {
        "full": (507, "disk_full"),
        "busy": (503, "store_busy"),
        "held": (409, "suffix_in_use"),
    }
