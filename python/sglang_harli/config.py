"""Every ``--harli-*`` flag, parsed once into one dataclass.

SGLang's ``ServerArgs`` is a sealed msgspec struct built from its own field list, so our flags
cannot live there. The launcher splits them off argv with the parser below and carries the
resulting :class:`HarliConfig` into each scheduler process (it pickles with the spawn target).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence

# Co-run modes built so far (docs/architecture.md lists the rest: harli, naive, static, which
# need the latency predictor and SM partitions). "auto" resolves at start-up.
MODES = ("time-sliced", "idle-only", "off")
AUTO = "auto"


class HarliConfigError(ValueError):
    """A --harli-* flag has a value we cannot run with."""


@dataclasses.dataclass(frozen=True)
class HarliConfig:
    mode: str = AUTO
    state_dir: str | None = None  # None: user_cache_dir()/state
    finetune_budget_ms: float = 20.0
    idle_quantum_ms: float = 100.0
    checkpoint_every: int = 10
    kernels: str = AUTO  # "torch" or "triton"; auto: triton with a GPU, torch without

    @property
    def enabled(self) -> bool:
        """False only for ``--harli-mode off``: plain SGLang, no Harli scheduler injected."""
        return self.mode != "off"

    def resolved(self, has_cuda: bool) -> HarliConfig:
        """``auto`` replaced by what this machine runs by default (the mode is time-sliced until
        the GPU-only "harli" mode exists), and the state directory made absolute."""
        from sglang_harli.tiny_model import user_cache_dir

        mode = "time-sliced" if self.mode == AUTO else self.mode
        state_dir = os.path.abspath(
            os.path.expanduser(self.state_dir or user_cache_dir() / "state")
        )
        kernels = self.kernels
        if kernels == AUTO:
            kernels = "triton" if has_cuda else "torch"
        elif kernels == "triton" and not has_cuda:
            raise HarliConfigError(
                "--harli-kernels triton needs a CUDA GPU (on a CPU the kernels run only in "
                "Triton's interpreter, for tests); use --harli-kernels torch"
            )
        return dataclasses.replace(self, mode=mode, state_dir=state_dir, kernels=kernels)


def add_harli_args(parser: argparse.ArgumentParser) -> None:
    """Declare the --harli-* flags on ``parser`` (used for parsing and for --help)."""
    group = parser.add_argument_group("sglang-harli")
    group.add_argument(
        "--harli-mode",
        default=AUTO,
        choices=(AUTO, *MODES),
        help="co-run mode: how finetune work shares the device with decode. 'time-sliced': "
        "finetune units between decode iterations, within --harli-finetune-budget-ms each, and "
        "in quanta when idle; 'idle-only': only when no decode runs; 'off': plain SGLang (no "
        "Harli scheduler, no fine-tuning). 'auto' (default): time-sliced.",
    )
    group.add_argument(
        "--harli-kernels",
        default=AUTO,
        choices=(AUTO, "torch", "triton"),
        help="finetune kernels: 'triton' (persistent grids sized to the SM share), or 'torch' "
        "(the reference ops). 'auto' (default): triton with a GPU, torch without.",
    )
    group.add_argument(
        "--harli-state-dir",
        default=None,
        help="where fine-tuning files, jobs, checkpoints and adapters live (SQLite job store); "
        "default: ~/.cache/sglang_harli/state",
    )
    group.add_argument(
        "--harli-finetune-budget-ms",
        type=_positive(float),
        default=HarliConfig.finetune_budget_ms,
        help="time-sliced mode: finetune time after each decode iteration (ms)",
    )
    group.add_argument(
        "--harli-idle-quantum-ms",
        type=_positive(float),
        default=HarliConfig.idle_quantum_ms,
        help="finetune time per idle pass of the scheduler (ms): a new request waits at most "
        "about this long",
    )
    group.add_argument(
        "--harli-checkpoint-every",
        type=_positive(int),
        default=HarliConfig.checkpoint_every,
        help="optimizer steps between checkpoints of a running job",
    )


def _positive(kind: type) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


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
    fields = {f.name for f in dataclasses.fields(HarliConfig)}
    values = {k.removeprefix("harli_"): v for k, v in vars(ns).items()}
    return HarliConfig(**{k: v for k, v in values.items() if k in fields}), rest


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit(2) itself
        raise HarliConfigError(message)
