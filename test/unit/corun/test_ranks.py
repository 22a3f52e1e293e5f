"""One decision for all tensor-parallel ranks, with the real agents, runners
and trainer over two gloo processes: rank 0 claims and writes, rank 1 builds its shard's runner
from the store and follows.

The ranks are made to disagree on everything local: rank 1's plan never wants finetune, its
admission would refuse every unit, and it is slower (it sleeps after each unit); rank 0's slices
have random budgets. The job must still train to its adapter with both ranks running exactly the
same units, and nothing may hang: a collective that waits more than ``COLLECTIVE_TIMEOUT`` raises,
which fails the test instead of blocking it. Ranks whose next units differ (a bug) fail the job on
both, loudly, without a hang.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_harli.corun.controller import CoRun
from sglang_harli.corun.policy import IdleOnlyPolicy
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.ranks import RankSync
from sglang_harli.finetune.base_model import BaseModelView
from sglang_harli.finetune.parallel import TensorParallel
from sglang_harli.jobs.agent import AgentConfig, FollowerAgent, JobAgent
from sglang_harli.jobs.runner import JobRunner, RunnerConfig
from sglang_harli.jobs.store import JobStore
from sglang_harli.tiny_model import ensure_tiny_model
from test.unit.jobs.test_runner import MODEL, SPEC, examples, finished, queue_job

TP = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _unbuildable(*args, **kwargs):
    raise OSError("this rank cannot read the job's files")


def _rank(rank: int, state_dir: str, out: str, follower_checkpoint_every: int | None) -> None:
    """``follower_checkpoint_every`` None: rank 1 cannot build the job's runner at all, and the
    job is cancelled while rank 0 waits for it."""
    import transformers

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{state_dir}/gloo",
        rank=rank,
        world_size=TP,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ensure_tiny_model(SPEC), dtype=torch.float32
        )
        view = BaseModelView.from_hf(model).shard(TensorParallel(rank, TP))
        every = 2 if rank == 0 else follower_checkpoint_every
        build = functools.partial(
            JobRunner.build, view=view, config=RunnerConfig(checkpoint_every=every)
        )
        config = AgentConfig(model=MODEL, poll_s=0.0, tick_s=0.0)
        if rank > 0 and follower_checkpoint_every is None:
            build = _unbuildable
        agent = (JobAgent if rank == 0 else FollowerAgent)(state_dir, build, config).start()
        ranks = RankSync(rank, TP)
        corun = CoRun(IdleOnlyPolicy(1.0, 0.0, Predictor()), ranks=ranks)
        rng = random.Random(rank)
        runner, units, hooks, ended, job_id = None, [], 0, None, None
        deadline = time.monotonic() + 120
        # every rank leaves the loop at the same hook: when the job ends (on the same unit
        # everywhere), or after a fixed count when rank 1 cannot build it
        cannot_build = follower_checkpoint_every is None
        while time.monotonic() < deadline and (hooks < 400 if cannot_build else ended is None):
            hooks += 1
            if rank == 0 and runner is None:
                runner = agent.take_runner()
                if runner is not None:
                    job_id = runner.job.id
            if rank == 0 and runner is not None and cannot_build and hooks >= 200:
                if not runner.link.cancel_requested:
                    JobStore(state_dir).request_cancel(runner.job.id)  # the agent reads it
            held, go = corun.agree(runner, agent)  # as the scheduler does at each hook
            if rank == 0 and runner is not None and held is None:  # ended before an agreement
                ended = runner.trainer.state.step
            runner = held
            if not go:
                time.sleep(0.001)
                continue
            # rank 0's plan wants finetune at two hooks of three, for a random budget; rank 1's
            # would never admit a unit (its admission is not asked: rank 0 decides)
            wants = rank == 0 and hooks % 3 != 0
            budget = rng.uniform(0.0, 0.02)

            def admit(spent_s, kind, cost, budget=budget, wants=wants):
                return wants and (spent_s == 0 or spent_s < budget)

            def observe(kind, cost, seconds):
                units.append(kind)
                time.sleep(rank * rng.uniform(0.0, 0.005))  # rank 1 is slower

            if not corun.train(runner, admit, observe):
                ended = runner.trainer.state.step
        if rank == 0:  # its agent's thread writes the job's end: let it
            store = JobStore(state_dir)
            while job_id and time.monotonic() < deadline and not finished(store.get_job(job_id)):
                time.sleep(0.05)
        agent.stop()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"units": units, "ended_at_step": ended}, f)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, follower_checkpoint_every: int):
    store = JobStore(tmp_path)
    job = queue_job(store, examples(4, SPEC.vocab_size), n_epochs=5, batch_size=2)
    out = str(tmp_path / "ranks")
    mp.spawn(_rank, args=(str(tmp_path), out, follower_checkpoint_every), nprocs=TP, join=True)
    ranks = [json.load(open(f"{out}.{r}")) for r in range(TP)]
    return store.get_job(job.id), ranks


def test_ranks_with_different_timings_run_the_same_units_to_one_adapter(tmp_path):
    job, ranks = run_ranks(tmp_path, follower_checkpoint_every=2)
    assert job.status == "running" and job.error is None  # the publisher serves it next
    assert job.adapter_path is not None
    assert (tmp_path / "jobs" / job.id / "adapter" / "adapter_model.safetensors").is_file()
    lead, follower = ranks
    assert lead["ended_at_step"] == follower["ended_at_step"] == 10
    assert lead["units"] == follower["units"]  # unit for unit, whatever each rank measured
    assert lead["units"].count("optimizer") == 10 and "checkpoint" in lead["units"]


def test_ranks_whose_units_differ_fail_the_job_on_both_without_hanging(tmp_path):
    # a follower that would checkpoint at other steps: its units part from rank 0's at step 2
    job, ranks = run_ranks(tmp_path, follower_checkpoint_every=3)
    assert job.status == "failed"
    assert "ranks diverged" in job.error["message"]
    assert all(r["ended_at_step"] == 2 for r in ranks)


def test_a_job_a_follower_cannot_build_waits_and_is_cancelled_on_rank_0_alone(tmp_path):
    job, ranks = run_ranks(tmp_path, follower_checkpoint_every=None)
    assert job.status == "cancelled"
    assert ranks[0]["ended_at_step"] == 0 and ranks[0]["units"] == ranks[1]["units"] == []
