"""The co-run figures as Prometheus metrics, on SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set before
the scheduler processes are spawned, and the HTTP server's ``/metrics`` aggregates every
process's files. So metrics created here, in the scheduler process, appear there with no wiring
of our own. They carry SGLang's scheduler labels (model name, ranks), and only the ranks SGLang
reports from do report (its ``current_scheduler_metrics_enabled``), so TP ranks do not repeat
each other. prometheus_client is imported here, lazily: the launcher must not import it before
SGLang sets the multiprocess directory.
"""

from __future__ import annotations

import math
from typing import Any

from sglang_harli.config import Mode
from sglang_harli.corun.controller import CoRun

_METRICS: HarliMetrics | None = None  # one set per process: prometheus refuses duplicates

ITERATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
POLICY_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)
RECLAIM_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2)


class HarliMetrics:
    def __init__(self, labels: dict[str, Any]):
        from prometheus_client import Counter, Gauge, Histogram

        names = list(labels)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, names, multiprocess_mode="mostrecent").labels(**labels)

        def counter(name: str, doc: str):
            return Counter(name, doc, names).labels(**labels)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, names, buckets=buckets).labels(**labels)

        self.objective = gauge("sglang:harli_tpot_slo_seconds", "The TPOT objective.")
        self.budget = gauge(
            "sglang:harli_finetune_budget_seconds",
            "Finetune time the last plan gave a decode iteration.",
        )
        self.predicted = gauge(
            "sglang:harli_predicted_decode_seconds", "Stage 1's prediction for the last plan."
        )
        self.iteration = histogram(
            "sglang:harli_decode_iteration_seconds",
            "Measured decode iterations (run_batch to the next decode run_batch).",
            ITERATION_BUCKETS,
        )
        self.iterations = counter("sglang:harli_decode_iterations", "Measured decode iterations.")
        self.within = counter(
            "sglang:harli_slo_attained", "Measured decode iterations within the objective."
        )
        self.finetune = counter(
            "sglang:harli_finetune_seconds", "Finetune time inside measured decode iterations."
        )
        self.slack = counter(
            "sglang:harli_slack_seconds", "Objective minus decode time, over measured iterations."
        )
        self.tokens = counter("sglang:harli_finetune_tokens", "Target tokens of finished steps.")
        self.policy = histogram(
            "sglang:harli_policy_seconds",
            "The policy's own time per decode iteration.",
            POLICY_BUCKETS,
        )
        self.lent_slots = gauge(
            "sglang:harli_kv_lent_slots", "KV slots lent to the fine-tuning job now."
        )
        self.lent_bytes = gauge("sglang:harli_kv_lent_bytes", "Bytes of the KV slots lent now.")
        self.arena_in_use = gauge(
            "sglang:harli_arena_in_use_bytes", "Lent (and reserve) bytes holding job tensors now."
        )
        self.reclaims = counter(
            "sglang:harli_kv_reclaims", "Times lent KV slots were taken back for decode."
        )
        self.reclaimed = counter("sglang:harli_kv_reclaimed_slots", "KV slots taken back.")
        self.reclaim_time = histogram(
            "sglang:harli_kv_reclaim_seconds", "Time to take lent slots back.", RECLAIM_BUCKETS
        )
        self.cache_evicted = counter(
            "sglang:harli_kv_cache_evicted_slots",
            "Radix-cache tokens evicted to lend their slots to the job.",
        )
        self.waiting_for_memory = gauge(
            "sglang:harli_job_waiting_for_memory",
            "1 while the running job has waited for memory longer than a routine moment.",
        )
        self.memory_wait = counter(
            "sglang:harli_job_memory_wait_seconds", "Time jobs spent in reported memory waits."
        )
        # runtime control (POST /harli/mode): the settings in force and the switches
        self.mode = Gauge(
            "sglang:harli_mode",
            "1 for the co-run mode in force, 0 for the others.",
            [*names, "harli_mode"],
            multiprocess_mode="mostrecent",
        )
        self._labels = labels
        self.margin = gauge("sglang:harli_slo_margin", "The fraction of the objective kept free.")
        self.budget_setting = gauge(
            "sglang:harli_finetune_budget_setting_seconds",
            "time-sliced mode: the finetune time after each decode iteration.",
        )
        self.fits = gauge(
            "sglang:harli_objective_fits",
            "1 while the solo decode fits under the objective, 0 when it does not (the reason "
            "is in /harli/status), -1 before it is measured.",
        )
        self.switches = counter("sglang:harli_control_switches", "Runtime switches of settings.")
        self._seen = {"iterations": 0, "within": 0, "finetune": 0.0, "slack": 0.0, "tokens": 0}
        self._seen_reclaims = 0

    def update(self, corun: CoRun, after_plan: bool = True) -> None:
        """What changed since the last update (a few attribute reads): after a plan, or after
        an idle quantum (``after_plan=False``: no new plan to report)."""
        stats = corun.stats
        if after_plan:
            if math.isfinite(stats.objective_s):  # inf: auto, nothing measured yet
                self.objective.set(stats.objective_s)
            fits = corun.objective.fits
            self.fits.set(-1 if fits is None else int(fits))
            plan = stats.last_plan or {}
            self.budget.set(plan.get("budget_ms", 0.0) / 1e3)
            if plan.get("predicted_decode_ms") is not None:
                self.predicted.set(plan["predicted_decode_ms"] / 1e3)
            if stats.policy_us.values:
                self.policy.observe(stats.policy_us.values[-1] / 1e6)
        if stats.iterations > self._seen["iterations"] and stats.last_iteration_ms is not None:
            self.iteration.observe(stats.last_iteration_ms / 1e3)
        for name, now, metric in (
            ("iterations", stats.iterations, self.iterations),
            ("within", stats.within_slo, self.within),
            ("finetune", stats.finetune_s, self.finetune),
            ("slack", stats.slack_s, self.slack),
            ("tokens", stats.finetune_tokens, self.tokens),
        ):
            if now > self._seen[name]:
                metric.inc(now - self._seen[name])
                self._seen[name] = now

    def update_control(self, control, corun: CoRun) -> None:
        """The settings in force (``corun/control.py``), after start-up or a switch."""
        settings = control.settings
        for mode in Mode:
            self.mode.labels(**self._labels, harli_mode=str(mode)).set(int(mode == settings.mode))
        self.margin.set(settings.slo_margin)
        self.budget_setting.set(settings.finetune_budget_ms / 1e3)
        if control.switches > self._seen.get("switches", 0):
            self.switches.inc(control.switches - self._seen.get("switches", 0))
            self._seen["switches"] = control.switches
        if math.isfinite(corun.stats.objective_s):
            self.objective.set(corun.stats.objective_s)
        fits = corun.objective.fits
        self.fits.set(-1 if fits is None else int(fits))

    def update_memory(self, lender) -> None:
        """The KV lender's figures (``srt/kv_lender.py``), after it lent or took back."""
        self.lent_slots.set(lender.lent_slots)
        self.lent_bytes.set(lender.lent_slots * lender.slot_bytes)
        self.arena_in_use.set(lender.arena.in_use_bytes)
        stats = lender.stats
        new = stats.reclaims - self._seen_reclaims
        if new > 0:
            self.reclaims.inc(new)
            for ms in lender.recent_reclaim_ms(new):
                self.reclaim_time.observe(ms / 1e3)
            self._seen_reclaims = stats.reclaims
        for name, now, metric in (
            ("reclaimed", stats.reclaimed_slots, self.reclaimed),
            ("cache_evicted", stats.cache_evicted_slots, self.cache_evicted),
        ):
            if now > self._seen.get(name, 0):
                metric.inc(now - self._seen.get(name, 0))
                self._seen[name] = now

    def update_job_memory(self, runner) -> None:
        """The running job's memory waits (``jobs/memory_waits.py``); None: no job runs."""
        waits = runner.memory_waits if runner is not None else None
        self.waiting_for_memory.set(1 if waits is not None and waits.reported else 0)
        key = f"wait:{waits.job_id}" if waits is not None else ""
        if waits is not None and waits.total_s > self._seen.get(key, 0.0):
            self.memory_wait.inc(waits.total_s - self._seen.get(key, 0.0))
            self._seen[key] = waits.total_s


def harli_metrics(scheduler) -> HarliMetrics | None:
    """None unless ``--enable-metrics`` is on and this rank reports (SGLang's own rule)."""
    global _METRICS
    collector = getattr(scheduler, "metrics_collector", None)
    reporter = getattr(scheduler, "metrics_reporter", None)
    if collector is None or not getattr(reporter, "current_scheduler_metrics_enabled", False):
        return None
    if _METRICS is None:
        _METRICS = HarliMetrics(dict(collector.labels))
    return _METRICS
