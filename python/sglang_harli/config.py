"""Every ``--harli-*`` flag, parsed once into one dataclass.

SGLang's ``ServerArgs`` is a sealed msgspec struct built from its own field list, so our flags
cannot live there. The launcher splits them off argv with the parser below and carries the
resulting :class:`HarliConfig` into each scheduler process (it pickles with the spawn target).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

# Co-run modes (docs/architecture.md). "auto" resolves at start-up: "harli" with a GPU,
# "time-sliced" on a CPU-only machine.
MODES = ("harli", "time-sliced", "idle-only", "naive", "static", "off")
AUTO = "auto"


class HarliConfigError(ValueError):
    """A --harli-* flag has a value we cannot run with."""


@dataclasses.dataclass(frozen=True)
class HarliConfig:
    mode: str = AUTO

    @property
    def enabled(self) -> bool:
        """False only for ``--harli-mode off``: plain SGLang, no Harli scheduler injected."""
        return self.mode != "off"

    def resolved(self, has_cuda: bool) -> HarliConfig:
        """The config with ``auto`` replaced by the mode this machine runs by default."""
        if self.mode != AUTO:
            return self
        return dataclasses.replace(self, mode="harli" if has_cuda else "time-sliced")


def add_harli_args(parser: argparse.ArgumentParser) -> None:
    """Declare the --harli-* flags on ``parser`` (used for parsing and for --help)."""
    group = parser.add_argument_group("sglang-harli")
    group.add_argument(
        "--harli-mode",
        default=AUTO,
        choices=(AUTO, *MODES),
        help="co-run mode: how finetune work shares the device with decode. 'off' runs plain "
        "SGLang (no Harli scheduler). 'auto' (default) is 'harli' with a GPU and "
        "'time-sliced' on a CPU-only machine.",
    )


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
