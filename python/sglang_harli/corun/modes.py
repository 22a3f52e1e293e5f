"""Every ``--harli-mode`` and its facts, in one table.

Which devices a mode runs on today, where its units run (``corun/executor.py``), whether it
plans from the predictor, and what ``auto`` means on each device: the launcher's refusals
(``config.py``), the policy registry (``corun/policy.py``), the scheduler's executor and the
benchmarks' mode lists (``bench/modes.py``) all read it here. Imports neither torch nor SGLang
(the launcher reads it before the CPU guards).
"""

from __future__ import annotations

import dataclasses
import enum

AUTO = "auto"


class Mode(enum.StrEnum):
    """How finetune work shares the device with decode (``--harli-mode``).

    Every mode but ``off`` is one :class:`~sglang_harli.corun.policy.CoRunPolicy`, so the
    benchmarks compare like with like (``corun/policy.py``).
    """

    AUTO = AUTO  # resolved at start-up (AUTO_MODE below)
    HARLI = "harli"  # the QoS policy: the most finetune the TPOT objective allows, per iteration
    TIME_SLICED = "time-sliced"  # a fixed finetune slice after each decode iteration (baseline)
    IDLE_ONLY = "idle-only"  # finetune only when no decode runs (baseline)
    NAIVE = "naive"  # finetune beside decode with every resource it may have, no prediction
    STATIC = "static"  # finetune beside decode on a fixed share (--harli-static-share)
    OFF = "off"  # plain SGLang: no Harli scheduler, no fine-tuning


class ExecutorKind(enum.StrEnum):
    """``--harli-executor``: where a mode's finetune units run (``corun/executor.py``)."""

    AUTO = AUTO  # the mode's own default (corun/modes.py)
    INLINE = "inline"  # on the scheduler thread, after the decode (temporal)
    CPU_CONCURRENT = "cpu-concurrent"  # a worker thread beside decode, on its own cores
    CUDA = "cuda"  # a finetune stream on an SM partition (the GPU issue; not built yet)


@dataclasses.dataclass(frozen=True)
class ModeFacts:
    mode: Mode
    summary: str
    # where it runs today, and the reason it does not run elsewhere
    devices: frozenset[str]
    # the executors it may run with on a CPU (the first is its default, ``--harli-executor auto``)
    cpu_executors: tuple[ExecutorKind, ...]
    predicts: bool  # plans from the predictor (else a fixed rule)
    baseline: bool  # a comparison for the benchmarks, not the product
    not_on_gpu: str = ""  # why it is refused on a GPU, while it is


_NOT_ON_GPU_YET = (
    "a finetune CUDA stream on an SM share (the CUDA executor) is not built yet; on a GPU use "
    "time-sliced or idle-only"
)

MODES: dict[Mode, ModeFacts] = {
    facts.mode: facts
    for facts in (
        ModeFacts(
            Mode.HARLI,
            "the most finetune the TPOT objective allows, planned before every decode "
            "iteration: a share beside decode (cpu-concurrent) or a time slice after it (inline)",
            frozenset({"cpu"}),
            # inline first: the SLO test's bounds hold for it, not yet for the worker (which
            # wins on the replay's SmolLM2 load; docs/corun.md, "Where units run")
            (ExecutorKind.INLINE, ExecutorKind.CPU_CONCURRENT),
            predicts=True,
            baseline=False,
            not_on_gpu=_NOT_ON_GPU_YET,
        ),
        ModeFacts(
            Mode.TIME_SLICED,
            "a fixed --harli-finetune-budget-ms after each decode iteration (FlexLLM-like)",
            frozenset({"cpu", "cuda"}),
            (ExecutorKind.INLINE,),
            predicts=False,
            baseline=True,
        ),
        ModeFacts(
            Mode.IDLE_ONLY,
            "finetune only when no decode batch runs",
            frozenset({"cpu", "cuda"}),
            (ExecutorKind.INLINE,),
            predicts=False,
            baseline=True,
        ),
        ModeFacts(
            Mode.NAIVE,
            "every resource finetune may have, beside every decode iteration, no prediction",
            frozenset({"cpu"}),
            (ExecutorKind.CPU_CONCURRENT,),
            predicts=False,
            baseline=True,
            not_on_gpu=_NOT_ON_GPU_YET,
        ),
        ModeFacts(
            Mode.STATIC,
            "a fixed --harli-static-share beside every decode iteration, no prediction",
            frozenset({"cpu"}),
            (ExecutorKind.CPU_CONCURRENT,),
            predicts=False,
            baseline=True,
            not_on_gpu=_NOT_ON_GPU_YET,
        ),
    )
}

# what ``--harli-mode auto`` is on each device
AUTO_MODE = {"cpu": Mode.HARLI, "cuda": Mode.TIME_SLICED}


def device_of(has_cuda: bool) -> str:
    return "cuda" if has_cuda else "cpu"


def runnable(device: str) -> list[Mode]:
    """The modes that train on ``device`` today, the table's order (what a replay runs)."""
    return [mode for mode, facts in MODES.items() if device in facts.devices]


def refusal(mode: Mode, device: str, executor: ExecutorKind) -> str | None:
    """Why ``mode`` with ``executor`` cannot run on ``device``, or None if it can."""
    facts = MODES.get(mode)
    if facts is None:
        return None  # off: plain SGLang
    if device not in facts.devices:
        if device == "cuda":
            return f"--harli-mode {mode} on a GPU: {facts.not_on_gpu}"
        return f"--harli-mode {mode} does not run on a {device}"
    if device == "cpu" and executor != ExecutorKind.AUTO and executor not in facts.cpu_executors:
        allowed = ", ".join(str(e) for e in facts.cpu_executors)
        return f"--harli-mode {mode} runs with --harli-executor {allowed}, not {executor}"
    return None


def executor_for(mode: Mode, device: str, executor: ExecutorKind) -> ExecutorKind:
    """The executor a (resolved, runnable) mode uses: the one asked for, else its default."""
    if device != "cpu":
        return ExecutorKind.INLINE
    if executor != ExecutorKind.AUTO:
        return executor
    return MODES[mode].cpu_executors[0]
