"""Runtime control: the co-run settings a running server may change (``POST /harli/mode``).

What may change, and its rules, are decided once, here: the mode (one the server could have
been started with, but not ``off``, which is plain SGLang and has no scheduler of ours, nor
``auto``, which is resolved at start-up), ``tpot_slo_ms`` (a number or ``auto``),
``slo_margin``, ``static_share`` and ``finetune_budget_ms``, each within the range of its
``--harli-*`` flag (the flag's own parser checks it, so the two cannot drift apart).

The HTTP process validates a body with :func:`parse_change` before it sends anything, so a bad
body is refused and changes nothing; the change then rides on SGLang's own scheduler RPC
(``/set_internal_state``'s ``SetInternalStateReq``), whose ``server_args`` carry only numbers:
:func:`to_wire` spells each setting as a ``harli.``-prefixed key (a string value goes into the
key: ``harli.mode=idle-only: 1``), and the scheduler reads and validates it again with
:func:`from_wire` (the same route SGLang's own ``/set_internal_state`` reaches).

The scheduler keeps the settings in force in a :class:`Control`, which counts the switches and
measures the SLO counters since the last one (``since_switch``): the cumulative counters go on
counting across a switch (each iteration judged against the objective in force when it ran), so
a client that differences two reads keeps working, and the settings a figure was measured under
are the ones of ``since_switch``. Nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sglang_harli.config import AUTO, HarliConfig, HarliConfigError, Mode

from .policy import CoRunPolicy, make_policy
from .predictor import Predictor
from .stats import CoRunStats

# what a body may set, in the order they are shown
FIELDS = ("mode", "tpot_slo_ms", "slo_margin", "static_share", "finetune_budget_ms")
WIRE_PREFIX = "harli."  # the reserved key prefix in SetInternalStateReq.server_args
# the counters ``since_switch`` differences (CoRunStats attributes)
SWITCH_COUNTERS = ("iterations", "within_slo", "misses_with_finetune", "finetune_s", "slack_s")
# modes no request may switch to, and why
NOT_AT_RUNTIME = {
    Mode.OFF: "off is plain SGLang, without Harli's scheduler: it takes a restart with "
    "--harli-mode off",
    Mode.AUTO: "auto is resolved when the server starts; name the mode",
}


class ControlError(ValueError):
    """A change that cannot be made, with the field it is about (None: the body as a whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Settings:
    """The co-run settings in force."""

    mode: Mode
    tpot_slo_ms: float | str  # a number, or "auto"
    slo_margin: float
    static_share: float
    finetune_budget_ms: float

    @classmethod
    def from_config(cls, config: HarliConfig) -> Settings:
        return cls(**{name: getattr(config, name) for name in FIELDS})

    def with_change(self, change: Mapping[str, Any]) -> Settings:
        return dataclasses.replace(self, **change)

    @property
    def objective_s(self) -> float | None:
        """The objective in seconds; None: auto."""
        return None if self.tpot_slo_ms == AUTO else float(self.tpot_slo_ms) / 1e3

    def policy(
        self,
        predictor: Predictor,
        idle_quantum_s: float,
        shares: Sequence[float] = (),
        spatial: bool = False,
    ) -> CoRunPolicy:
        """The mode's policy over ``predictor`` (an auto objective is the controller's to set:
        ``inf`` until it has a measurement, ``corun/objective.py``); ``shares``: what the
        server's concurrent worker offers, ``spatial``: whether harli plans on it."""
        objective_s = self.objective_s
        return make_policy(
            self.mode,
            objective_s=math.inf if objective_s is None else objective_s,
            margin=self.slo_margin,
            budget_s=self.finetune_budget_ms / 1e3,
            idle_quantum_s=idle_quantum_s,
            predictor=predictor,
            shares=shares,
            static_share=self.static_share,
            spatial=spatial,
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: _shown(getattr(self, name)) for name in FIELDS}


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, str) else value  # a Mode prints as its flag value


def runtime_modes(config: HarliConfig, has_cuda: bool) -> list[Mode]:
    """The modes this server may switch to: those it could have been started with here (the
    start-up refusals decide, ``HarliConfig.resolved``), but never ``off`` or ``auto``."""
    modes = []
    for mode in Mode:
        if mode in NOT_AT_RUNTIME:
            continue
        try:  # the executor harli was started with binds harli only: the others take their own
            dataclasses.replace(config, mode=mode, executor=AUTO).resolved(has_cuda)
        except HarliConfigError:
            continue
        modes.append(mode)
    return modes


def _refusal(mode: Mode, config: HarliConfig, has_cuda: bool) -> str | None:
    if mode in NOT_AT_RUNTIME:
        return NOT_AT_RUNTIME[mode]
    try:
        dataclasses.replace(config, mode=mode, executor=AUTO).resolved(has_cuda)
    except HarliConfigError as exc:
        return str(exc)
    return None


def parse_change(body: Any, config: HarliConfig, has_cuda: bool) -> dict[str, Any]:
    """The settings a ``POST /harli/mode`` body asks for, each validated; raises
    :class:`ControlError` for anything else (nothing is partly applied)."""
    if not isinstance(body, dict):
        raise ControlError("the body must be a JSON object of settings: " + ", ".join(FIELDS))
    if not body:
        raise ControlError("the body names no setting to change; settings: " + ", ".join(FIELDS))
    change: dict[str, Any] = {}
    for name, value in body.items():
        if name not in FIELDS:
            raise ControlError(
                f"unknown setting {_cut(name)}; settings: {', '.join(FIELDS)}", param=str(name)
            )
        if name == "mode":
            change[name] = _mode(value, config, has_cuda)
        elif name == "tpot_slo_ms" and value == AUTO:
            change[name] = AUTO
        else:
            change[name] = _number(name, value)
    return change


def _mode(value: Any, config: HarliConfig, has_cuda: bool) -> Mode:
    modes = ", ".join(runtime_modes(config, has_cuda))
    if not isinstance(value, str):
        raise ControlError(f"mode must be a string, one of: {modes}", param="mode")
    try:
        mode = Mode(value)
    except ValueError:
        message = f"unknown mode {_cut(value)}; this server runs: {modes}"
        raise ControlError(message, param="mode") from None
    refusal = _refusal(mode, config, has_cuda)
    if refusal is not None:
        raise ControlError(f"mode {mode} cannot be switched to: {refusal}", param="mode")
    return mode


def _number(name: str, value: Any) -> float:
    """``value`` within the range of the flag ``--harli-<name>`` (its own parser decides)."""
    flag = next(f for f in dataclasses.fields(HarliConfig) if f.name == name)
    auto = ' or "auto"' if name == "tpot_slo_ms" else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"{name} must be a number{auto}, got {_cut(value)}", param=name)
    if not math.isfinite(value):
        raise ControlError(f"{name} must be a finite number, got {value}", param=name)
    try:
        return float(flag.metadata["parse"](repr(float(value))))
    except Exception as exc:  # argparse.ArgumentTypeError: "must be in [0, 1), got 1.5"
        raise ControlError(f"{name} {exc}", param=name) from None


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


# --- the scheduler RPC's form ---------------------------------------------------------------


def to_wire(change: Mapping[str, Any]) -> dict[str, float]:
    """``change`` as SetInternalStateReq's ``server_args`` (numbers only): a number under
    ``harli.<name>``, a string as ``harli.<name>=<value>: 1``."""
    wire: dict[str, float] = {}
    for name, value in change.items():
        if isinstance(value, str):
            wire[f"{WIRE_PREFIX}{name}={value}"] = 1
        else:
            wire[f"{WIRE_PREFIX}{name}"] = float(value)
    return wire


def split_wire(server_args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """SetInternalStateReq's ``server_args``: (ours, SGLang's)."""
    ours = {k: v for k, v in server_args.items() if k.startswith(WIRE_PREFIX)}
    return ours, {k: v for k, v in server_args.items() if k not in ours}


def from_wire(wire: Mapping[str, Any], config: HarliConfig, has_cuda: bool) -> dict[str, Any]:
    """The change :func:`to_wire` spelled, validated again (SGLang's own ``/set_internal_state``
    reaches the scheduler too)."""
    body: dict[str, Any] = {}
    for key, value in wire.items():
        name, sep, text = key.removeprefix(WIRE_PREFIX).partition("=")
        if name in body:
            raise ControlError(f"{name} given twice", param=name)
        body[name] = text if sep else value
    return parse_change(body, config, has_cuda)


# --- the settings in force, and their switches -----------------------------------------------


class Control:
    """The settings in force, how many switches changed them, and the SLO counters measured
    under them (since the last switch)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings, self.clock = settings, clock
        self.switches = 0
        self.last_switch: dict[str, Any] | None = None
        self._counted: dict[str, float] = dict.fromkeys(SWITCH_COUNTERS, 0)

    def apply(self, change: Mapping[str, Any], stats: CoRunStats) -> Settings | None:
        """The settings with ``change``, now in force; None when it changes nothing."""
        new = self.settings.with_change(change)
        changed = {
            name: [_shown(getattr(self.settings, name)), _shown(getattr(new, name))]
            for name in FIELDS
            if getattr(new, name) != getattr(self.settings, name)
        }
        if not changed:
            return None
        self.settings = new
        self.switches += 1
        self.last_switch = {"at": self.clock(), "changed": changed}
        self._counted = {name: getattr(stats, name) for name in SWITCH_COUNTERS}
        return new

    def to_dict(self, stats: CoRunStats) -> dict[str, Any]:
        """``control`` in ``/harli/status``."""
        since = {name: getattr(stats, name) - self._counted[name] for name in SWITCH_COUNTERS}
        since["slo_attainment"] = (
            since["within_slo"] / since["iterations"] if since["iterations"] else None
        )
        return {
            **self.settings.to_dict(),
            "switches": self.switches,
            "last_switch": self.last_switch,
            "since_switch": since,
        }
