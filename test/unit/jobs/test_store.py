"""The job store on its own: states, FCFS claiming, cancellation, restart, pagination."""

from __future__ import annotations

import multiprocessing

import pytest

from sglang_harli.jobs.store import JobStore

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
    assert JobStore(tmp_path).requeue_running() == [training.id]
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
    assert store.delete_file(upload.id) and store.get_file(upload.id) is None
    assert not store.delete_file(upload.id)


@pytest.mark.parametrize("purpose", [None, "fine-tune", "batch"])
def test_list_files_by_purpose(tmp_path, purpose):
    store = JobStore(tmp_path)
    store.add_file("a", "fine-tune", b"x")
    store.add_file("b", "batch", b"y")
    files = store.list_files(purpose)
    assert len(files) == (2 if purpose is None else 1)
