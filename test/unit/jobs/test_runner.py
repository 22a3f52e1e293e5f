"""A job's runner and the agent thread that links it to the store, on the tiny model.

What a user of a serving system observes: the scheduler's slices stay short whatever the store
does (locked by another process, unwritable for long); a job trains from its tokenized dataset
to an adapter with a bounded number of durable checkpoints; a diverged job fails with a reason
and publishes nothing; a resumed job falls back past an unreadable checkpoint and lists each
step once; two owners never train one job.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time

import pytest
import torch
from starlette.responses import JSONResponse

from sglang_harli.corun.controller import CoRun
from sglang_harli.corun.executor import ThreadExecutor
from sglang_harli.corun.policy import IdleOnlyPolicy, NaivePolicy
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.stats import DecodeStats
from sglang_harli.finetune.base_model import BaseModelView
from sglang_harli.finetune.data import Example, save_examples
from sglang_harli.finetune.peft_io import load_adapter
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.agent import AgentConfig, FollowerAgent, FollowerLink, JobAgent
from sglang_harli.jobs.runner import JobRunner, RunnerConfig
from sglang_harli.jobs.store import JobStore, Owner
from sglang_harli.tiny_model import TinyModelSpec, ensure_tiny_model

SPEC = TinyModelSpec(
    arch="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2
)
MODEL = "tiny"
LIMITS = hp.ServingLimits(max_lora_rank=8, max_seq_length=64)


@pytest.fixture(scope="module")
def view():
    import transformers

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ensure_tiny_model(SPEC), dtype=torch.float32
    )
    yield BaseModelView.from_hf(model)
    torch.set_num_threads(before)


def examples(n: int, vocab: int, length: int = 12, seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(6, vocab, (length,), generator=gen).tolist()
        out.append(Example(tuple(ids), (False,) * 4 + (True,) * (length - 4)))
    return out


def queue_job(store: JobStore, data: list[Example], validation=None, **hyper):
    """A queued job whose tokenized datasets are on disk, as the API leaves it; a
    ``learning_rate_multiplier`` goes in as given, past the API's bound (the engine's own
    checks are what these tests exercise)."""
    upload = store.add_file("train.jsonl", "fine-tune", b"{}\n")
    multiplier = hyper.pop("learning_rate_multiplier", None)
    resolved = hp.resolve({"batch_size": len(data), **hyper}, len(data), LIMITS).to_dict()
    if multiplier is not None:
        resolved["learning_rate_multiplier"] = float(multiplier)
    job = store.create_job(
        MODEL,
        upload.id,
        resolved,
        seed=0,
        validation_file=upload.id if validation else None,
        status="queued",
    )
    store.job_dir(job.id).mkdir(parents=True, exist_ok=True)
    save_examples(store.dataset_path(job.id, "train"), data)
    if validation:
        save_examples(store.dataset_path(job.id, "validation"), validation)
    return job


def make_agent(state_dir, view, owner=None, checkpoint_every=2, keep=2, **config) -> JobAgent:
    build = functools.partial(
        JobRunner.build,
        view=view,
        config=RunnerConfig(checkpoint_every=checkpoint_every, keep_checkpoints=keep),
    )
    config = {"model": MODEL, "poll_s": 0.0, "tick_s": 0.0, **config}
    return JobAgent(state_dir, build, AgentConfig(**config), owner=owner)


def slicer(budget_s: float) -> CoRun:
    """The co-run loop giving a runner idle quanta of ``budget_s`` (at least one unit each)."""
    return CoRun(IdleOnlyPolicy(1.0, budget_s, Predictor()))


class MiniScheduler:
    """The scheduler's side in miniature: takes the agent's runner, gives it slices through
    the co-run loop, and times each (what decode would wait for)."""

    def __init__(self, agent: JobAgent, budget_s: float = 0.01):
        self.agent, self.corun = agent, slicer(budget_s)
        self.runner: JobRunner | None = None
        self.slices: list[float] = []

    def slice(self) -> None:
        started = time.perf_counter()
        if self.runner is None:
            self.runner = self.agent.take_runner()
        if self.runner is not None and not self.corun.idle(self.runner):
            self.runner = None
        self.slices.append(time.perf_counter() - started)


def run_until(store, job_id, done, *pairs, timeout_s=120.0, pump=True):
    """Pump agents and give slices until ``done(job)``; returns the job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for agent, scheduler in pairs:
            if pump:
                agent.pump()
            scheduler.slice()
        job = store.get_job(job_id)
        if done(job):
            for agent, _ in pairs:
                if pump:
                    agent.pump()
            return store.get_job(job_id)
    raise TimeoutError(f"job {job_id}: {store.get_job(job_id)}")


def finished(job) -> bool:
    return job.adapter_path is not None or job.status in ("failed", "cancelled")


def metric_steps(store, job_id) -> list[int]:
    events, _ = store.list_events(job_id, limit=1000)
    return sorted(e.data["step"] for e in events if e.type == "metrics")


def test_a_job_trains_from_its_tokenized_dataset_to_an_adapter_with_bounded_checkpoints(
    tmp_path, view
):
    store = JobStore(tmp_path)
    vocab = view.config.vocab_size
    job = queue_job(store, examples(8, vocab), examples(3, vocab, seed=1), n_epochs=7)
    agent = make_agent(tmp_path, view, checkpoint_every=2, keep=2)
    done = run_until(store, job.id, finished, (agent, MiniScheduler(agent)))

    assert done.status == "running" and done.error is None  # the publisher takes it from here
    adapter = store.job_dir(job.id) / "adapter"
    assert done.adapter_path == str(adapter)
    assert load_adapter(adapter, view.config).config.r == 8
    checkpoints, _ = store.list_checkpoints(job.id)
    assert [c.step for c in checkpoints] == [7, 6]  # keep 2 (of 2, 4, 6 and the final 7)
    assert all(0 < c.metrics["valid_loss"] < 20 for c in checkpoints)
    on_disk = sorted(p.name for p in (store.job_dir(job.id) / "checkpoints").iterdir())
    assert on_disk == ["step-6", "step-7"]  # pruned directories are gone, no temporary left
    assert not list(store.job_dir(job.id).rglob("trainer_state.*"))  # no resume ahead
    assert metric_steps(store, job.id) == list(range(1, 8))  # one event per step
    with sqlite3.connect(store.db_path) as db:
        stored = [r[0] for r in db.execute("SELECT path FROM checkpoints")]
        stored += [
            r[0] for r in db.execute("SELECT adapter_path FROM jobs WHERE id = ?", (job.id,))
        ]
    assert all(not p.startswith("/") and p.startswith(f"jobs/{job.id}/") for p in stored)


def test_a_locked_store_pauses_the_job_never_the_scheduler(tmp_path, view, write_lock):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=40)
    agent = make_agent(tmp_path, view, checkpoint_every=5, tick_s=0.01).start()
    scheduler = MiniScheduler(agent)
    try:
        run_until(store, job.id, lambda j: j.step >= 3, (agent, scheduler), pump=False)
        lock = write_lock(store, seconds=3.0)
        scheduler.slices.clear()
        paused = False
        while lock.poll() is None:
            scheduler.slice()
            paused |= scheduler.runner is not None and scheduler.runner.paused
            time.sleep(0.002)
        assert paused  # the runner noticed and stopped training...
        assert max(scheduler.slices) < 0.25  # ...and no slice waited for the lock (3 s)
        done = run_until(store, job.id, finished, (agent, scheduler), pump=False)
    finally:
        agent.stop()
    assert done.status == "running" and done.adapter_path, done.error
    assert metric_steps(store, job.id) == list(range(1, 41))  # kept, written later, once each


def test_a_store_unwritable_for_long_fails_the_job_once_it_can_be_written(
    tmp_path, view, write_lock
):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=500)
    agent = make_agent(tmp_path, view, give_up_s=1.0, busy_timeout_ms=20, retry_max_s=0.2)
    scheduler = MiniScheduler(agent)
    run_until(store, job.id, lambda j: j.step >= 2, (agent, scheduler))
    lock = write_lock(store, seconds=2.0)
    while lock.poll() is None:
        agent.pump()
        scheduler.slice()
    assert scheduler.runner is None  # the runner let the job go: no training while it fails
    done = run_until(store, job.id, finished, (agent, scheduler))
    assert done.status == "failed" and done.error["code"] == "store_unavailable"
    assert "could not be written" in done.error["message"] and "locked" in done.error["message"]
    assert max(scheduler.slices) < 0.25


def test_a_diverged_job_fails_with_a_reason_and_publishes_nothing(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(
        store, examples(8, view.config.vocab_size), n_epochs=20, learning_rate_multiplier=1e30
    )
    agent = make_agent(tmp_path, view, checkpoint_every=1)
    done = run_until(store, job.id, finished, (agent, MiniScheduler(agent)))
    assert done.status == "failed" and done.adapter_path is None
    assert done.error["code"] == "training_diverged"
    assert (
        "at step 2" in done.error["message"] and "learning_rate_multiplier" in done.error["message"]
    )
    assert not (store.job_dir(job.id) / "adapter").exists()
    events, _ = store.list_events(job.id, limit=100)
    [nan_step] = [e for e in events if e.type == "metrics" and e.data["step"] == 2]
    assert nan_step.data["train_loss"] is None  # NaN is stored as null
    from sglang_harli.srt.openai_shapes import event_json

    body = JSONResponse({"data": [event_json(e) for e in events]}).body  # the API's encoder
    assert json.loads(body)["data"][0]["level"] == "error"


def test_a_blown_up_but_finite_adapter_fails_the_job_and_is_not_published(tmp_path, view):
    """A learning rate of 2e8 (multiplier 1e12, past the API's bound): every loss and weight
    stays finite (the loss sits at ln(vocab), the weights near 1e9), so only a bound on the
    weights tells; the job fails at the first step that ran with them, publishing nothing."""
    store = JobStore(tmp_path)
    job = queue_job(
        store, examples(8, view.config.vocab_size), n_epochs=20, learning_rate_multiplier=1e12
    )
    agent = make_agent(tmp_path, view, checkpoint_every=5)
    done = run_until(store, job.id, finished, (agent, MiniScheduler(agent)))
    assert done.status == "failed" and done.adapter_path is None
    assert done.error["code"] == "training_blew_up"
    message = done.error["message"]
    assert "at step 2" in message and "learning_rate_multiplier" in message
    assert not (store.job_dir(job.id) / "adapter").exists()
    events, _ = store.list_events(job.id, limit=100)
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_resume_skips_an_unreadable_checkpoint_and_lists_each_step_once(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=9)
    first = make_agent(tmp_path, view, checkpoint_every=2, keep=3)
    one_unit_a_slice = MiniScheduler(first, budget_s=0.0)
    run_until(store, job.id, lambda j: j.step >= 5, (first, one_unit_a_slice))
    # the server dies here (after step 5, checkpoints at 2 and 4); the newest one is torn
    checkpoints_dir = store.job_dir(job.id) / "checkpoints"
    (checkpoints_dir / "step-4" / "trainer_state.pt").write_bytes(b"torn")
    (checkpoints_dir / "step-6.tmp-1234abcd").mkdir()  # a write the crash cut short
    (checkpoints_dir / "step-8").mkdir()  # written, never recorded
    assert store.requeue_expired(now=time.time() + 3600) == [job.id]

    second = make_agent(tmp_path, view, checkpoint_every=2, keep=3)
    done = run_until(store, job.id, finished, (second, MiniScheduler(second)))
    assert done.adapter_path and done.error is None
    messages = [e.message for e in store.list_events(job.id, limit=100)[0]]
    assert any("checkpoint at step 4 could not be read" in m for m in messages)
    assert any(m.startswith("Resumed from the checkpoint at step 2") for m in messages)
    assert metric_steps(store, job.id) == list(range(1, 10))  # steps 3-5 once, not twice
    assert [c.step for c in store.list_checkpoints(job.id)[0]] == [9, 8, 6]
    assert not list(checkpoints_dir.glob("*.tmp-*"))


def test_two_owners_never_train_one_job(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=30)
    a = make_agent(tmp_path, view, owner=Owner("owner-a", "host-a pid 1"), lease_s=0.5, renew_s=0.1)
    b = make_agent(tmp_path, view, owner=Owner("owner-b", "host-b pid 2"), lease_s=30)
    sched_a, sched_b = MiniScheduler(a), MiniScheduler(b)
    run_until(store, job.id, lambda j: j.step >= 3, (a, sched_a), (b, sched_b))
    assert store.get_job(job.id).owner == "owner-a" and sched_b.runner is None

    time.sleep(0.6)  # a stalls past its lease; b, looking for work, takes the job over
    run_until(store, job.id, lambda j: j.owner == "owner-b", (b, sched_b))
    for _ in range(5):  # a wakes up: its next writes fail the owner check and it stops
        sched_a.slice()
        a.pump()
    assert sched_a.runner is None
    done = run_until(store, job.id, finished, (a, sched_a), (b, sched_b))
    assert done.adapter_path and done.owner == "owner-b"
    assert metric_steps(store, job.id) == list(range(1, 31))
    messages = [e.message for e in store.list_events(job.id, limit=100)[0]]
    assert any(m.startswith("Fine-tuning started") and "host-a" in m for m in messages)
    assert any(m.startswith("Resumed from the checkpoint") and "host-b" in m for m in messages)


def test_starting_a_job_and_checkpointing_cost_the_scheduler_little(tmp_path, view):
    """10,000 short examples: the agent reads them; the scheduler takes a built runner. Then a
    checkpoint: the scheduler's slice copies the state; the agent writes it."""
    store = JobStore(tmp_path)
    job = queue_job(store, examples(10_000, view.config.vocab_size), n_epochs=1, batch_size=8)
    agent = make_agent(tmp_path, view, checkpoint_every=1)
    started = time.perf_counter()
    agent.take_runner()  # the scheduler asks for work
    agent.pump()  # claim and build, on the agent's thread
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    runner = agent.take_runner()
    take_s = time.perf_counter() - started
    assert runner is not None and runner.trainer.total_steps == 1250

    slices = []
    while store.get_job(job.id).step < 2 or not store.list_checkpoints(job.id)[0]:
        started = time.perf_counter()
        slicer(0.0).idle(runner)  # one unit per slice: a checkpoint's snapshot is one of them
        slices.append(time.perf_counter() - started)
        agent.pump()
    print(f"build {build_s * 1e3:.0f} ms (agent thread), take {take_s * 1e6:.0f} us, "
          f"longest slice {max(slices) * 1e3:.1f} ms")  # fmt: skip
    assert take_s < 0.005
    assert max(slices) < 0.1


def test_a_starting_server_cleans_what_crashes_left_in_finished_jobs(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=1)
    kept = store.job_dir(job.id) / "checkpoints" / "step-1"
    kept.mkdir(parents=True)
    store.add_checkpoint(job.id, 1, str(kept), {"step": 1})
    leftovers = [
        store.job_dir(job.id) / "adapter.tmp-0badc0de",  # a write a crash cut short
        store.job_dir(job.id) / "checkpoints" / "step-2.tmp-0badc0de",
        store.job_dir(job.id) / "checkpoints" / "step-3",  # written, never recorded
    ]
    for path in leftovers:
        path.mkdir()
    store.request_cancel(job.id)
    make_agent(tmp_path, view).pump()  # a server starts over this state dir
    assert kept.is_dir() and not any(path.exists() for path in leftovers)


def test_a_job_without_its_tokenized_dataset_fails_with_the_reason(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=1)
    store.dataset_path(job.id, "train").unlink()
    agent = make_agent(tmp_path, view)
    done = run_until(store, job.id, finished, (agent, MiniScheduler(agent)))
    assert done.status == "failed" and done.error["code"] == "training_failed"
    assert "tokenized train set of this job is missing" in done.error["message"]


def test_a_checkpoint_the_disk_refuses_pauses_the_job_until_it_can_be_written(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=6)
    blocker = store.job_dir(job.id) / "checkpoints"
    blocker.write_bytes(b"")  # a file where the checkpoints go: every write there fails (OSError)
    agent = make_agent(tmp_path, view, checkpoint_every=2, retry_max_s=0.05)
    scheduler = MiniScheduler(agent)
    run_until(store, job.id, lambda j: agent.failing_since is not None, (agent, scheduler))
    for _ in range(20):  # the job waits; the scheduler's slices return at once
        agent.pump()
        scheduler.slice()
    assert scheduler.runner.paused and store.get_job(job.id).step == 2
    assert "checkpoints" in agent.last_error
    blocker.unlink()  # space again
    done = run_until(store, job.id, finished, (agent, scheduler))
    assert done.adapter_path and done.error is None
    assert metric_steps(store, job.id) == list(range(1, 7))
    assert max(scheduler.slices) < 0.25


def test_a_tp_followers_runner_starts_where_rank_0s_did_and_writes_nothing(tmp_path, view):
    """At TP > 1 a follower builds the job's runner from the checkpoint rank 0's runner started
    from (not the newest), and its link drops what it submits (``corun/ranks.py``)."""
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=9)
    agent = make_agent(tmp_path, view, checkpoint_every=2, keep=3)
    run_until(store, job.id, lambda j: j.step >= 5, (agent, MiniScheduler(agent, budget_s=0.0)))
    assert [c.step for c in store.list_checkpoints(job.id)[0]] == [4, 2]
    events = len(store.list_events(job.id, limit=1000)[0])
    follower = FollowerAgent(tmp_path, agent.build)
    job = store.get_job(job.id)
    build = functools.partial(agent.build, store, job, FollowerLink(follower, job))
    at_2 = build(resume_step=2)
    assert at_2.started_at_step == at_2.trainer.state.step == 2
    assert build(resume_step=0).started_at_step == 0  # rank 0 started it afresh
    with pytest.raises(ValueError, match="rank 0 resumed from step 3"):
        build(resume_step=3)
    assert slicer(0.05).idle(at_2)  # trains; its progress and events go nowhere
    assert len(store.list_events(job.id, limit=1000)[0]) == events
    assert store.get_job(job.id).step == 5


# --- memory: a job that waits says so; one that can never fit fails ---------------------------


def memory_agent(state_dir, view, arena, job_reserve=False) -> JobAgent:
    build = functools.partial(
        JobRunner.build,
        view=view,
        config=RunnerConfig(checkpoint_every=100, job_reserve=job_reserve),
        memory=arena,
    )
    return JobAgent(state_dir, build, AgentConfig(model=MODEL, poll_s=0.0, tick_s=0.0))


class MemoryScheduler(MiniScheduler):
    """The scheduler's memory duties (``srt/scheduler.py``): a job's own reserve into the arena
    while it runs, and the ceiling of what it may ever get (``lendable`` blocks, whatever size)."""

    def __init__(self, agent, arena, lendable: int):
        super().__init__(agent)
        self.arena, self.lendable = arena, lendable

    def slice(self) -> None:
        if self.runner is None and (runner := self.agent.take_runner()) is not None:
            if runner.reserve is not None:
                runner.reserve_lease = self.arena.add_lease([runner.reserve], revocable=False)
            runner.memory_ceiling = lambda nbytes: self.arena.fixed_fitting(nbytes) + self.lendable
            self.runner = runner
        super().slice()


def test_a_job_that_can_never_fit_fails_with_the_reason(tmp_path, view):
    from sglang_harli.memory.arena import Arena

    store = JobStore(tmp_path)
    job = queue_job(store, examples(4, view.config.vocab_size), n_epochs=1)
    arena = Arena()  # nothing lent, no reserve, and the ceiling holds one block: 2 layers need 2
    agent = memory_agent(tmp_path, view, arena)
    done = run_until(store, job.id, finished, (agent, MemoryScheduler(agent, arena, lendable=1)))
    assert done.status == "failed" and done.error["code"] == "insufficient_memory"
    assert "2 checkpointed layer inputs" in done.error["message"]
    assert "--harli-reserve-mb" in done.error["message"]


def test_a_job_that_waits_for_memory_says_so_and_resumes(tmp_path, view, monkeypatch):
    from sglang_harli.jobs import memory_waits
    from sglang_harli.memory.arena import Arena

    monkeypatch.setattr(memory_waits, "REPORT_AFTER_S", 0.2)
    store = JobStore(tmp_path)
    job = queue_job(store, examples(4, view.config.vocab_size), n_epochs=2)
    arena = Arena()
    agent = memory_agent(tmp_path, view, arena)
    scheduler = MemoryScheduler(agent, arena, lendable=100)  # it could fit: it waits
    run_until(store, job.id, lambda j: scheduler.runner is not None, (agent, scheduler))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        scheduler.slice()
        agent.pump()
    status = scheduler.runner.memory_status()
    assert status["waiting_for_memory"] and status["memory_wait"]["waiting_s"] >= 0.2
    assert "no room in the arena" in status["memory_wait"]["reason"]
    events, _ = store.list_events(job.id, limit=100)
    waiting = [e for e in events if e.message.startswith("Waiting for memory")]
    assert len(waiting) == 1 and waiting[0].level == "warning"  # once, not per slice
    assert store.get_job(job.id).trained_tokens == 0

    arena.add_lease([torch.empty(1 << 20, dtype=torch.uint8)])  # memory lent: it goes on
    done = run_until(store, job.id, finished, (agent, scheduler))
    assert done.status == "running" and done.adapter_path is not None
    events, _ = store.list_events(job.id, limit=100)
    again = [e for e in events if e.message.startswith("Memory available again")]
    assert len(again) == 1 and again[0].data["waited_s"] >= 0.2


def test_a_job_reserve_holds_the_smallest_micro_batch(tmp_path, view):
    """``--harli-reserve-mb auto`` on a CPU: with nothing lent, the job trains anyway, one
    example per micro-batch, in a reserve sized to its longest example."""
    from sglang_harli.memory.arena import Arena

    store = JobStore(tmp_path)
    data = examples(3, view.config.vocab_size, length=12) + examples(
        1, view.config.vocab_size, length=20, seed=2
    )
    job = queue_job(store, data, n_epochs=2)
    arena = Arena()
    agent = memory_agent(tmp_path, view, arena, job_reserve=True)
    scheduler = MemoryScheduler(agent, arena, lendable=0)
    run_until(store, job.id, lambda j: scheduler.runner is not None, (agent, scheduler))
    runner = scheduler.runner
    need = (view.config.num_layers, 20 * view.config.hidden_size * 4)  # fp32 layer inputs
    assert runner.trainer.smallest_memory_need() == need
    assert runner.reserve.numel() == arena.region_for(*need)
    done = run_until(store, job.id, finished, (agent, scheduler))
    assert done.status == "running" and done.adapter_path is not None
    # the reserve holds the 20-token example's two layer inputs and no more
    assert runner.trainer.memory_use.micro_batch_tokens == 20
    assert not runner.memory_waits.count


def test_a_step_planned_for_memory_a_burst_took_back_is_planned_again_smaller(
    tmp_path, view, monkeypatch
):
    """Memory lent when the step was planned (four examples a micro-batch), then taken back:
    the job does not wait for it to return; the step is planned again, one example per
    micro-batch, in its reserve, and the job finishes."""
    from sglang_harli.jobs import runner as runner_module
    from sglang_harli.memory.arena import Arena

    monkeypatch.setattr(runner_module, "REPLAN_AFTER_S", 0.05)
    store = JobStore(tmp_path)
    data = examples(4, view.config.vocab_size, length=16)
    job = queue_job(store, data, n_epochs=3)
    arena = Arena()
    lease = arena.add_lease([torch.empty(1 << 20, dtype=torch.uint8)])  # lent: room for all
    agent = memory_agent(tmp_path, view, arena, job_reserve=True)
    scheduler = MemoryScheduler(agent, arena, lendable=100)
    deadline = time.monotonic() + 60
    while (runner := agent.take_runner()) is None and time.monotonic() < deadline:
        agent.pump()
    runner.reserve_lease = arena.add_lease([runner.reserve], revocable=False)
    runner.memory_ceiling = lambda nbytes: arena.fixed_fitting(nbytes) + 100
    scheduler.runner, trainer = runner, runner.trainer
    trainer.pending_work()  # the first step, planned while the lease is there
    assert len(trainer._step.micro) == 1 and trainer.memory_use.micro_batch_tokens >= 4 * 16
    arena.revoke(lease)  # a burst takes it back

    done = run_until(store, job.id, finished, (agent, scheduler))
    assert done.status == "running" and done.adapter_path is not None  # trained to the end
    assert trainer.state.abandoned_steps >= 1
    assert trainer.memory_use.micro_batch_tokens == 16  # one example: what the reserve holds


# --- the runner as a source of units, driven by the co-run loop through a concurrent executor


class ConcurrentScheduler(MiniScheduler):
    """The scheduler's side with a worker thread (``cpu-concurrent``): units are submitted
    before each (fake) decode and taken back after it, as ``srt/scheduler.py`` does."""

    def __init__(self, agent: JobAgent, executor):
        super().__init__(agent)
        self.corun = CoRun(NaivePolicy(1.0, 0.01, Predictor()), worker=executor)

    def slice(self) -> None:
        started = time.perf_counter()
        if self.runner is None:
            self.runner = self.agent.take_runner()
        self.corun.before_decode(DecodeStats(1, 16, 16))
        if self.runner is not None and not self.corun.beside_decode(self.runner):
            self.runner = None
        time.sleep(0.002)  # the decode, while the worker runs units
        if self.runner is not None and not self.corun.after_decode(self.runner):
            self.runner = None
        self.slices.append(time.perf_counter() - started)


def one_thread():
    torch.set_num_threads(1)  # as the view's fixture: the same sums as the inline run


def test_a_job_trained_beside_decode_on_a_worker_matches_the_inline_run(tmp_path, view):
    """The same job through the worker thread ends with the adapter the inline run writes: the
    units ran in the trainer's order, each once, their results handed back on this thread."""
    adapters = {}
    for name in ("inline", "worker"):
        store = JobStore(tmp_path / name)
        job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=3)
        agent = make_agent(tmp_path / name, view, checkpoint_every=2, keep=2)
        if name == "inline":
            scheduler = MiniScheduler(agent)
        else:
            executor = ThreadExecutor(max_inflight=3, setup=one_thread)
            scheduler = ConcurrentScheduler(agent, executor)
        done = run_until(store, job.id, finished, (agent, scheduler))
        assert done.status == "running" and done.adapter_path, done.error
        adapters[name] = load_adapter(done.adapter_path, view.config)
        assert metric_steps(store, job.id) == [1, 2, 3]
    executor.close()
    assert executor.submitted > 0 and scheduler.corun.stats.corun_units == executor.submitted
    inline, worker = (a.state_dict() for a in (adapters["inline"], adapters["worker"]))
    assert inline.keys() == worker.keys()
    for key in inline:
        torch.testing.assert_close(worker[key], inline[key], rtol=0, atol=0)


def test_a_job_cancelled_with_units_in_flight_ends_once_they_are_back(tmp_path, view):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(8, view.config.vocab_size), n_epochs=1000)
    agent = make_agent(tmp_path, view)
    executor = ThreadExecutor(max_inflight=3, setup=one_thread)
    scheduler = ConcurrentScheduler(agent, executor)
    run_until(store, job.id, lambda j: j.trained_tokens, (agent, scheduler))
    store.request_cancel(job.id)
    done = run_until(store, job.id, lambda j: j.status == "cancelled", (agent, scheduler))
    assert done.status == "cancelled" and scheduler.runner is None
    assert executor.inflight == 0 and executor.last_fence().done()
    executor.close()
