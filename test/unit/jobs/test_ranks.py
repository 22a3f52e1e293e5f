"""One decision for all tensor-parallel ranks (issue 12, part 3), with the real agents, runners
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

from sglang_harli.corun.ranks import RankSync
from sglang_harli.finetune.base_model import BaseModelView
from sglang_harli.finetune.parallel import TensorParallel
from sglang_harli.jobs.agent import AgentConfig, FollowerAgent, JobAgent
from sglang_harli.jobs.runner import JobRunner, RunnerConfig
from sglang_harli.jobs.store import JobStore
from sglang_harli.tiny_model import ensure_tiny_model

from .test_runner import MODEL, SPEC, examples, finished, queue_job

TP = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _rank(rank: int, state_dir: str, out: str, follower_checkpoint_every: int) -> None:
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
        agent = (JobAgent if rank == 0 else FollowerAgent)(state_dir, build, config).start()
        ranks = RankSync(rank, TP)
        rng = random.Random(rank)
        runner, units, hooks, ended = None, [], 0, None
        deadline = time.monotonic() + 120
        while ended is None and time.monotonic() < deadline:
            hooks += 1
            if rank == 0 and runner is None:
                runner = agent.take_runner()
                if runner is not None:
                    runner.ranks = ranks
            runner, go = ranks.agree_runner(runner, agent)
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

            if not runner.run_planned(admit, observe):
                ended = runner.trainer.state.step
        if rank == 0:  # its agent's thread writes the job's end: let it
            job_id = runner.job.id if runner is not None else None
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
