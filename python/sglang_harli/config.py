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

AUTO = "auto"


class Mode(enum.StrEnum):
    """How finetune work shares the device with decode (``--harli-mode``)."""

    AUTO = AUTO  # resolved at start-up to what this machine runs by default
    TIME_SLICED = "time-sliced"  # finetune slices between decode iterations, quanta when idle
    IDLE_ONLY = "idle-only"  # finetune only when no decode runs
    OFF = "off"  # plain SGLang: no Harli scheduler, no fine-tuning


class Kernels(enum.StrEnum):
    """The finetune ops backend (``--harli-kernels``; see ``finetune/ops.py``)."""

    AUTO = AUTO  # triton with a GPU, torch without
    TORCH = "torch"  # graph.py's torch functions (exact against PEFT)
    TRITON = "triton"  # harli_kernels on persistent grids sized to the SM share


class HarliConfigError(ValueError):
    """A --harli-* flag has a value we cannot run with."""


def _number(kind: type, minimum: float, inclusive: bool) -> Callable[[str], Any]:
    """An argparse ``type`` that accepts numbers of ``kind`` above (or at) ``minimum``."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum):
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
        "co-run mode: how finetune work shares the device with decode. 'time-sliced': finetune "
        "units between decode iterations, within --harli-finetune-budget-ms each, and in quanta "
        "when idle; 'idle-only': only when no decode runs; 'off': plain SGLang (no Harli "
        "scheduler, no fine-tuning). 'auto' (default): time-sliced.",
        Mode,
    )
    kernels: Kernels = _flag(
        Kernels.AUTO,
        "finetune kernels: 'triton' (persistent grids sized to the SM share), or 'torch' (the "
        "reference ops). 'auto' (default): triton with a GPU, torch without.",
        Kernels,
    )
    state_dir: str | None = _flag(
        None,
        "where fine-tuning files, jobs, checkpoints and adapters live (SQLite job store); "
        "default: ~/.cache/sglang_harli/state",
        metavar="DIR",
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
    max_upload_mb: float = _flag(
        512.0,
        "largest file POST /v1/files accepts (MB; default %(default)s); larger uploads get 413",
        _number(float, 0, inclusive=False),
        metavar="MB",
    )

    @property
    def enabled(self) -> bool:
        """False only for ``--harli-mode off``: plain SGLang, no Harli scheduler injected."""
        return self.mode != Mode.OFF

    def resolved(self, has_cuda: bool) -> HarliConfig:
        """``auto`` replaced by what this machine runs by default (the mode is time-sliced until
        the GPU-only "harli" mode exists), and the state directory made absolute."""
        from sglang_harli.tiny_model import user_cache_dir

        mode = Mode.TIME_SLICED if self.mode == Mode.AUTO else self.mode
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
        return dataclasses.replace(self, mode=mode, state_dir=state_dir, kernels=kernels)


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
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
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
        raise HarliConfigError(f"unknown flag {unknown[0].split('=')[0]}")
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
