"""``HarliScheduler``: SGLang's Scheduler with the co-run hooks.

It runs SGLang's own event loops unchanged; the hooks wrap three of the methods those loops call:

- ``get_next_batch_to_run`` (and its PD-decode twin, and the PD pre-allocation): KV slots lent
  to finetuning must be back before SGLang decides whether it has room, or it would retract
  requests instead (``srt/kv_lender.py``: the job's checkpointed activations live in free KV
  slots, ``memory/arena.py``);
- ``run_batch`` on decode batches: the moment to decide how much finetune work runs beside
  this decode iteration;
- ``on_idle``: no batch runs, so finetune work may use the whole device in bounded quanta.

Every hook counts its calls and the time spent in our code, so the overhead Harli adds to
SGLang's loop is measured, not assumed (``GET /harli/status``); the finetune time it hands out
is reported apart from that overhead.

Fine-tuning jobs come from the job store shared with the HTTP API; one trains at a time, first
come first served, through a :class:`JobRunner`. Before each decode iteration the mode's policy
plans what may run beside it (``corun/``: ``harli`` sizes it from the TPOT objective and the
predictor, ``time-sliced`` gives a fixed slice, ``idle-only`` nothing); the runner's units run
after the decode while the policy admits them, and in quanta on idle passes in every mode.

This thread never touches the job store or writes a file: a :class:`JobAgent` thread claims
jobs for the served model, builds their runners (datasets, checkpoints), writes what they record
and keeps their leases (``jobs/agent.py``). A store that is locked, full or read-only pauses the
job, never decode; the scheduler only takes a built runner and gives it its slices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys

import torch
from sglang.srt.managers.io_struct import SetInternalStateReq, SetInternalStateReqOutput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.runtime_context import get_serving

from sglang_harli.config import ExecutorKind, HarliConfig
from sglang_harli.corun.control import Control, ControlError, Settings, from_wire, split_wire
from sglang_harli.corun.controller import CoRun
from sglang_harli.corun.executor import Executor, Share, ThreadExecutor
from sglang_harli.corun.modes import MODES
from sglang_harli.corun.predictor import MIN_SAMPLES, Predictor, ProfileKey, load_profile
from sglang_harli.corun.ranks import RankSync
from sglang_harli.corun.stats import DecodeStats, HookStats
from sglang_harli.finetune.parallel import TensorParallel
from sglang_harli.jobs.agent import AgentConfig, FollowerAgent, JobAgent
from sglang_harli.jobs.runner import JobRunner, RunnerConfig
from sglang_harli.memory.arena import Arena
from sglang_harli.srt.kv_lender import KVLender, LendConfig, account_lent_slots
from sglang_harli.srt.metrics import harli_metrics
from sglang_harli.srt.support import UnsupportedConfigError
from sglang_harli.srt.weights import base_model_view

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0001
SUPPORTED_ALLOCATORS = (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator)
# the worker's hard cap on units in flight; what it holds is bounded by their measured time
# (about one iteration, corun/controller.py), this only stops a runaway queue of tiny units
WORKER_MAX_INFLIGHT = 64


class HarliScheduler(Scheduler):
    def __init__(self, server_args, port_args, *, harli_config: HarliConfig):
        super().__init__(server_args, port_args)
        self.harli_config = harli_config
        self.harli_stats = HookStats()
        # The job agent's thread shares this process's GIL: when it runs Python while a decode
        # waits to re-take the GIL between torch ops, the decode waits up to the switch
        # interval (5 ms by default, a whole decode iteration of a small model).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._check_kv_pools()
        self._harli_runner: JobRunner | None = None
        self.harli_arena, self.harli_lender = self._harli_memory(harli_config)
        # TP > 1: each rank trains its shard; rank 0 decides for all (corun/ranks.py)
        group = self.tp_group
        tp = None
        self.harli_ranks: RankSync | None = None
        if group.world_size > 1:
            tp = TensorParallel(group.rank_in_group, group.world_size, group.device_group)
            self.harli_ranks = RankSync(group.rank_in_group, group.world_size, group.cpu_group)
        worker = self._harli_worker(harli_config, group.world_size)
        policy = self._harli_policy(harli_config, worker)
        self.harli_corun = CoRun(policy, worker=worker, ranks=self.harli_ranks)
        if self.harli_lender is not None:
            self.harli_lender.fence = self.harli_corun.last_fence
        self.harli_metrics = harli_metrics(self)  # None without --enable-metrics
        self._harli_init_control(harli_config)
        build = functools.partial(
            JobRunner.build,
            view=base_model_view(self.tp_worker.model_runner.model, tp),
            config=RunnerConfig(
                checkpoint_every=harli_config.checkpoint_every,
                keep_checkpoints=harli_config.keep_checkpoints,
                job_reserve=harli_config.job_reserve and self.harli_arena is not None,
                kernels=harli_config.kernels,
                base_model_name=self.server_args.model_path,
            ),
            memory=self.harli_arena,
        )
        # Jobs are claimed only by a server of the model they were created for.
        agent_config = AgentConfig(model=served_model_name(self.server_args))
        agent = JobAgent if group.rank_in_group == 0 else FollowerAgent
        self.harli_agent = agent(harli_config.state_dir, build, agent_config).start()
        logger.info(
            "Harli scheduler active (mode %s, job store %s, owner %s)",
            harli_config.mode,
            harli_config.state_dir,
            self.harli_agent.owner.info,
        )

    def _harli_memory(self, config: HarliConfig) -> tuple[Arena | None, KVLender | None]:
        """The arena the job's activations live in: lent KV slots and a fixed reserve (or, with
        lending on a CPU, each job's own reserve). With neither lending nor a fixed reserve, no
        arena: the job allocates ordinary memory as it needs."""
        if config.max_lend_fraction == 0 and config.fixed_reserve_mb == 0:
            return None, None
        if self.tp_group.world_size > 1:
            # every rank would lend its own pool's slots; until the ranks agree on leases and
            # reclaims (as they do on units), their memory waits could differ: no arena
            logger.warning(
                "Harli: KV lending and --harli-reserve-mb are off at --tp-size > 1; the job's "
                "activations use ordinary memory"
            )
            return None, None
        arena = Arena(poison=config.arena_poison)
        if config.fixed_reserve_mb > 0:
            device = self.tp_worker.model_runner.device
            size = int(config.fixed_reserve_mb * 2**20)
            reserve = torch.empty(size, dtype=torch.uint8, device=device)
            arena.add_lease([reserve], revocable=False)
        lender = None
        if config.max_lend_fraction > 0:
            lend = LendConfig(
                max_fraction=config.max_lend_fraction,
                headroom_tokens=config.lend_headroom_tokens,
                relend_delay_s=config.relend_delay_ms / 1e3,
                cache_floor=config.lend_cache_floor,
            )
            lender = KVLender(self, lend, arena)
            account_lent_slots(self, lender)  # SGLang's leak check stays on, and exact
            logger.info(
                "Harli KV lending: up to %d of %d slots (%d bytes each), %d per lease",
                lender.limit_slots,
                lender.total_slots,
                lender.slot_bytes,
                lender.lease_pages * lender.page_size,
            )
        return arena, lender

    def _harli_worker(self, config: HarliConfig, tp_size: int) -> Executor | None:
        """The concurrent executor the share-planning modes run on (``corun/executor.py``,
        ``corun/modes.py``), on a CPU at TP 1, whatever the mode at start-up (a mode switch may
        need it); an idle thread costs nothing. It gets the cores decode leaves (SGLang's
        intra-op threads take all but one, ``srt/cpu.py``): at least one, shared with the HTTP
        and tokenizer processes."""
        if self.tp_worker.model_runner.device != "cpu":
            return None  # the CUDA executor is the GPU issue's
        if tp_size > 1:
            # every rank's units hold collectives: they must start on the same hook on every
            # rank, which the inline loop's per-unit agreement guarantees (corun/ranks.py)
            if config.executor == ExecutorKind.CPU_CONCURRENT:
                logger.warning("Harli: at --tp-size > 1 finetune units run inline")
            return None
        cores = sorted(os.sched_getaffinity(0))
        decode_threads = torch.get_num_threads()
        spare = cores[decode_threads:] or cores[-1:]  # the cores decode's threads leave
        self._harli_spare_cores = spare

        def pin(allowed: list[int]) -> None:
            # this thread only (Linux: an affinity of pid 0 is the calling thread's)
            try:
                os.sched_setaffinity(0, allowed)
            except OSError as exc:
                logger.info("Harli finetune worker: cores not pinned (%s)", exc)

        def setup() -> None:
            pin(spare)
            torch.set_num_threads(len(spare))

        def apply_share(share: Share) -> None:
            # an idle quantum's units take every core (nothing decodes); beside decode, the
            # share of the spare ones
            allowed = cores if share.idle else spare
            pin(allowed)
            torch.set_num_threads(len(allowed) if share.idle else share.workers(len(spare)))

        logger.info(
            "Harli finetune worker: beside decode's %d intra-op threads, on cores %s",
            decode_threads,
            spare,
        )
        return ThreadExecutor(
            max_inflight=WORKER_MAX_INFLIGHT, setup=setup, apply_share=apply_share
        )

    def _harli_shares(self, worker: Executor | None) -> tuple[float, ...]:
        """The shares the concurrent worker offers: each count of the spare cores."""
        if worker is None:
            return ()
        n = len(self._harli_spare_cores)
        return tuple(k / n for k in range(1, n + 1))

    def _harli_policy(self, config: HarliConfig, worker: Executor | None):
        """The mode's policy, over a predictor from a matching profile or learning online."""
        predictor = Predictor()
        if config.profile is not None:
            profile, message = load_profile(config.profile, self.harli_profile_key())
            if profile is not None:
                predictor = Predictor.from_profile(profile)
                logger.info("Harli predictor: %s", message)
            else:
                logger.warning("Harli predictor: %s", message)
                predictor.source = message
        if not predictor.stage1.ready:
            logger.info(
                "Harli predictor: no profile; no finetune beside decode until it has measured "
                "%d decode iterations, then learning from every iteration",
                MIN_SAMPLES,
            )
        return Settings.from_config(config).policy(
            predictor,
            config.idle_quantum_ms / 1e3,
            shares=self._harli_shares(worker),
            spatial=config.executor == ExecutorKind.CPU_CONCURRENT,
        )

    def _harli_init_control(self, config: HarliConfig) -> None:
        """The settings in force (``POST /harli/mode`` changes them) and the objective's."""
        self.harli_control = Control(Settings.from_config(config))
        source = "auto" if config.objective_auto else "flag"
        self.harli_corun.set_objective(self.harli_control.settings.objective_s, source)
        if self.harli_metrics is not None:
            self.harli_metrics.update_control(self.harli_control, self.harli_corun)

    def harli_profile_key(self) -> ProfileKey:
        """What this server's latency depends on: a profile of another kind is not used."""
        model_config = self.tp_worker.model_runner.model_config
        return ProfileKey(
            # the model's own name, not where this machine keeps it
            model=served_model_name(self.server_args).rstrip("/").rsplit("/", 1)[-1],
            device=profile_device(self.server_args.device),
            dtype=str(model_config.dtype).removeprefix("torch."),
            tp_size=self.server_args.tp_size,
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
        layout = getattr(kvcache, "kv_cache_layout", "nhd")
        if layout != "nhd":
            # lent slots are rows of every K/V buffer; in other layouts a row is not a slot
            raise UnsupportedConfigError(
                f"sglang-harli lends KV slots of the token-major (nhd) layout, but this pool's "
                f"layout is {layout} (SGLANG_USE_HND_KVCACHE or a platform default); unset it "
                "or run with --harli-mode off"
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

    def process_decode_queue(self):
        # PD decode pre-allocates KV for incoming transfers here, before the batch is planned
        with self.harli_stats.timed("reclaim_kv"):
            self._harli_reclaim_kv()
        return super().process_decode_queue()

    def run_batch(self, batch, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            self.harli_corun.interrupt()
            return super().run_batch(batch, pp_proxy_tensors)
        with self.harli_stats.timed("before_decode"):
            stats = decode_stats(batch)
            self.harli_stats.record_decode(stats)
            # a share is planned for the job's units that would run beside this decode
            runner = self._harli_runner if self.harli_corun.spatial else None
            plan = self.harli_corun.before_decode(stats, runner)
            if self.harli_metrics is not None:
                self.harli_metrics.update(self.harli_corun)
        if self.harli_corun.spatial or self.harli_corun.worker_busy:
            return self._harli_run_beside(batch, pp_proxy_tensors, plan)
        result = super().run_batch(batch, pp_proxy_tensors)
        runs = plan.runs_finetune
        if self.harli_ranks is not None:
            # every rank enters the agreed job's slice, whatever its own plan: rank 0's plan
            # decides its units there (its verdict stops the slice when its plan runs none)
            runner = self._harli_agreed_runner()
            runs = runner is not None
        elif runs:
            runner = self._harli_take_runner()
        if not runs:
            self.harli_corun.after_decode(None)  # the decode's end, measured
            return result
        self._harli_lend(runner)
        with self.harli_stats.timed("finetune_slice", overhead=False):
            with torch.inference_mode(False), torch.enable_grad():
                still_running = self.harli_corun.after_decode(runner, runs=True)
            self._harli_keep(runner, still_running)
        return result

    def _harli_run_beside(self, batch, pp_proxy_tensors, plan):
        """A decode with a concurrent executor: the planned share's units are submitted before
        the decode runs, so they run beside it; what finished is taken after it."""
        runner = self._harli_runner
        if runner is None and plan.share > 0:
            runner = self._harli_take_runner()
        if runner is not None:
            self._harli_lend(runner)
            with self.harli_stats.timed("submit"):
                still_running = self.harli_corun.beside_decode(runner)
            if not still_running:
                self._harli_keep(runner, False)
                runner = None
        result = super().run_batch(batch, pp_proxy_tensors)
        with self.harli_stats.timed("collect"):
            still_running = self.harli_corun.after_decode(runner)
        if runner is not None:
            self._harli_keep(runner, still_running)
        return result

    def on_idle(self):
        with self.harli_stats.timed("idle"):
            self.harli_corun.interrupt()
        if self.is_fully_idle():
            if self.harli_ranks is not None:
                runner = self._harli_agreed_runner()
            else:
                runner = self._harli_take_runner()
            self._harli_lend(runner)
            with self.harli_stats.timed("finetune_quantum", overhead=False):
                if runner is not None:
                    with torch.inference_mode(False), torch.enable_grad():
                        still_running = self.harli_corun.idle(runner)
                    self._harli_keep(runner, still_running)
                    if self.harli_metrics is not None:
                        self.harli_metrics.update(self.harli_corun, after_plan=False)
        return super().on_idle()

    def maybe_sleep_on_idle(self):
        # While a job trains, idle passes are its quanta; a paused job (the store does not
        # answer) lets SGLang sleep until a request comes, rather than spin.
        runner = self._harli_runner
        ranks = self.harli_ranks
        if ranks is not None and not ranks.leader:
            if ranks.agreed is None and not ranks.lead_holds:  # else keep pace with rank 0
                super().maybe_sleep_on_idle()
        elif runner is None or runner.paused:
            super().maybe_sleep_on_idle()

    def _harli_take_runner(self) -> JobRunner | None:
        """The job being trained, or one the agent built (a list swap: the job store is the
        agent's business)."""
        if self._harli_runner is None:
            runner = self._harli_runner = self.harli_agent.take_runner()
            if runner is not None:
                self._harli_give_memory(runner)
                logger.info("fine-tuning job %s starts", runner.job.id)
        return self._harli_runner

    def _harli_give_memory(self, runner: JobRunner) -> None:
        """The job's own reserve into the arena while it runs (allocated by its build, off
        this thread), and what it may ever get, for its check that it can fit at all."""
        arena = self.harli_arena
        if arena is None:
            return
        if runner.reserve is not None:
            runner.reserve_lease = arena.add_lease([runner.reserve], revocable=False)
        lender = self.harli_lender

        def ceiling(nbytes: int) -> int:
            lent = lender.most_fitting(nbytes) if lender is not None else 0
            return arena.fixed_fitting(nbytes) + lent

        runner.memory_ceiling = ceiling

    def _harli_take_memory(self, runner: JobRunner) -> None:
        """The job ended: its reserve leaves the arena (and its memory goes with the runner)."""
        if runner.reserve_lease is not None and self.harli_arena is not None:
            self.harli_arena.revoke(runner.reserve_lease)
            runner.reserve_lease = None

    def _harli_agreed_runner(self) -> JobRunner | None:
        """TP > 1, at a hook that may train, on every rank: this rank's runner if every rank
        holds one of rank 0's job; then each unit is rank 0's verdict (``corun/ranks.py``). A
        follower without one has its agent build it meanwhile."""
        ranks = self.harli_ranks
        runner = self._harli_take_runner() if ranks.leader else self._harli_runner
        with self.harli_stats.timed("tp_sync"):
            held, agreed = self.harli_corun.agree(runner, self.harli_agent)
        if held is not runner:
            if runner is not None and not ranks.leader:
                logger.info("fine-tuning job %s: rank 0 trains another job", runner.job.id)
            if held is not None:
                logger.info("fine-tuning job %s: rank %d's shard ready", held.job.id, ranks.rank)
            self._harli_runner = held
        return held if agreed else None

    def _harli_keep(self, runner: JobRunner | None, still_running: bool) -> None:
        if self.harli_lender is not None:
            self.harli_lender.mark_finetune_work()
        if runner is None:
            return
        if not still_running:
            self._harli_take_memory(runner)
            self._harli_runner = None
        if self.harli_metrics is not None:
            self.harli_metrics.update_job_memory(runner if still_running else None)

    def _harli_lend(self, runner: JobRunner | None) -> None:
        """A job trains: lend it one more run of free KV slots if the limits allow."""
        lender = self.harli_lender
        if lender is None or runner is None:
            return
        with self.harli_stats.timed("lend_kv"):
            if lender.lend() and self.harli_metrics is not None:
                self.harli_metrics.update_memory(lender)

    def flush_cache(self, empty_cache: bool = True):
        # SGLang's flush (POST /flush_cache, weight updates) clears the allocator: lent slots
        # would go back on its free list while the arena still holds them, and decode would
        # write KV into the job's activations. Every lease comes back first (the job recomputes).
        lender = self.harli_lender
        if lender is not None and self.is_fully_idle(
            ignore_waiting=getattr(self, "_engine_paused", False)
        ):
            runner = self._harli_runner
            if not self.harli_corun.drain(runner) and runner is not None:
                self._harli_keep(runner, False)
            lender.release_all()
        return super().flush_cache(empty_cache)

    def _harli_reclaim_kv(self) -> None:
        """Lent KV slots back before SGLang sizes its next batch: what its requests may need,
        or all of them once no job trains."""
        lender = self.harli_lender
        if lender is None:
            return
        freed = lender.reclaim() if self._harli_runner is not None else lender.release_all()
        if freed:
            logger.debug("Harli: %d lent KV slots taken back", freed)
            if self.harli_metrics is not None:
                self.harli_metrics.update_memory(lender)

    # --- runtime control -------------------------------------------------------------------

    def set_internal_state(self, recv_req):
        # POST /harli/mode rides on SGLang's own scheduler RPC, as /harli/status does: our
        # settings are the harli.-prefixed keys (corun/control.py), SGLang's are the rest. It
        # runs on this thread between iterations, so the next decode iteration plans with it.
        ours, theirs = split_wire(recv_req.server_args)
        if not ours:
            return super().set_internal_state(recv_req)
        try:
            change = from_wire(ours, self.harli_config, torch.cuda.is_available())
            mode = change.get("mode", self.harli_control.settings.mode)
            if self.harli_corun.worker is None and MODES[mode].cpu_executors == (
                ExecutorKind.CPU_CONCURRENT,
            ):
                raise ControlError(f"--harli-mode {mode} runs beside decode: not at TP > 1")
        except ControlError as exc:
            logger.warning("Harli control: refused %s: %s", ours, exc)
            return SetInternalStateReqOutput(updated=False)
        if theirs:
            output = super().set_internal_state(SetInternalStateReq(server_args=theirs))
            if not output.updated:
                return output
        self.harli_switch(change)
        return SetInternalStateReqOutput(updated=True)

    def harli_switch(self, change: dict) -> None:
        """Validated settings in force from the next decode iteration: the mode's policy
        rebuilt over the same predictor (what it learned is kept), the objective set."""
        control, corun = self.harli_control, self.harli_corun
        settings = control.apply(change, corun.stats)
        if settings is None:
            return  # nothing changed
        self.harli_config = dataclasses.replace(self.harli_config, **change)
        corun.set_policy(
            settings.policy(
                corun.policy.predictor,
                self.harli_config.idle_quantum_ms / 1e3,
                shares=self._harli_shares(corun.worker),
                spatial=self.harli_config.executor == ExecutorKind.CPU_CONCURRENT,
            )
        )
        source = corun.objective.source
        if "tpot_slo_ms" in control.last_switch["changed"]:
            source = "auto" if settings.objective_s is None else "request"
        corun.set_objective(settings.objective_s, source)
        logger.info(
            "Harli control: switch %d: %s", control.switches, control.last_switch["changed"]
        )
        if self.harli_metrics is not None:
            self.harli_metrics.update_control(control, corun)

    # --- reporting ---------------------------------------------------------------------------

    def get_internal_state(self, recv_req):
        # Rides on SGLang's own scheduler RPC, so /harli/status needs no channel of its own.
        output = super().get_internal_state(recv_req)
        runner = self._harli_runner
        output.internal_state["harli"] = {
            "mode": str(self.harli_control.settings.mode),
            "control": self.harli_control.to_dict(self.harli_corun.stats),
            "running_job": runner.job.id if runner is not None else None,
            "job_paused": runner.paused if runner is not None else None,
            "jobs": self.harli_agent.status(),
            "profile_key": dataclasses.asdict(self.harli_profile_key()),
            "corun": self.harli_corun.to_dict(),
            "samples": self.harli_corun.samples(),
            "memory": self._harli_memory_status(runner),
            "tensor_parallel": None
            if self.harli_ranks is None
            else {
                "rank": self.harli_ranks.rank,
                "size": self.harli_ranks.size,
                "exchanges": self.harli_ranks.exchanges,
            },
            **self.harli_stats.to_dict(),
        }
        return output

    def _harli_memory_status(self, runner: JobRunner | None) -> dict | None:
        if self.harli_arena is None:
            return None
        status = self.harli_lender.to_dict() if self.harli_lender is not None else {}
        status.setdefault("arena", self.harli_arena.to_dict())
        status["job"] = runner.memory_status() if runner is not None else None
        return status


def served_model_name(server_args) -> str:
    """The name the API creates jobs for (SGLang's ``--served-model-name``, default the path,
    resolved in SGLang's serving config, which its own scheduler reads the same way)."""
    return get_serving().served_model_name or server_args.model_path


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


def profile_device(device: str) -> str:
    """The device a profile is keyed by: the GPU's name (an H100's latencies are not an
    H200's), or ``cpu``."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return device
