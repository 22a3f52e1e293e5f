"""SM partitions: CUDA green contexts exposed as torch streams, with a persistent-grid fallback.

A :class:`SMPartitionLadder` is created once at start-up with the SM shares the co-location
policy may hand to the finetune job (e.g. ``[8, 16, 32, 66]``).  For each share it creates a
green context restricted to that many SMs (through ``cuda.bindings.driver``: no build step) and
one non-blocking stream inside it, wrapped as ``torch.cuda.ExternalStream``.  Requests are
rounded *down* to the device's partition granularity (never more SMs than the policy gave), and
the SM count the driver actually granted is read back from the green context and checked.

Work launched on ``share.stream`` can only use that share's SMs; the finetune kernels are then
launched with ``num_sms=share.num_sms`` so their persistent grids match the partition.  Where
green contexts are unavailable (no GPU, no ``cuda-bindings``, driver older than 12.4, ...) the
module logs that once and the ladder runs in ``"persistent-grids-only"`` mode: every share has
``stream=None`` (use the current stream) and the SM limit rests on the persistent grids alone
(a launch of ``num_sms`` programs can occupy at most ``num_sms`` SMs).

Importing this module never touches CUDA; everything CUDA-related is imported lazily.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GREEN_CONTEXTS",
    "PERSISTENT_GRIDS_ONLY",
    "SMShare",
    "SMPartitionLadder",
    "green_contexts_available",
    "sm_granularity",
]

logger = logging.getLogger(__name__)

GREEN_CONTEXTS = "green-contexts"
PERSISTENT_GRIDS_ONLY = "persistent-grids-only"

_MIN_DRIVER_VERSION = 12040  # green contexts appeared in CUDA 12.4
_lock = threading.Lock()
_unavailable_logged = False
_availability: dict[int, tuple[bool, str]] = {}


def _log_unavailable_once(reason: str) -> None:
    global _unavailable_logged
    with _lock:
        if _unavailable_logged:
            return
        _unavailable_logged = True
    logger.warning(
        "CUDA green contexts unavailable (%s); SM shares rely on persistent grids only", reason
    )


def _driver():
    from cuda.bindings import driver  # noqa: PLC0415  (lazy: CPU-only installs must import us)

    return driver


def _check(result: Any, what: str):
    """Unpack a cuda-bindings return tuple, raising on a CUresult error."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    drv = _driver()
    if err != drv.CUresult.CUDA_SUCCESS:
        try:
            _, name = drv.cuGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # pragma: no cover
            name = str(err)
        raise RuntimeError(f"{what} failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _device_index(device: int | str | torch.device | None) -> int:
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"SM partitions need a CUDA device, got {dev}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def green_contexts_available(device: int | str | torch.device | None = None) -> tuple[bool, str]:
    """``(available, reason)``; cached per device.  Never raises."""
    try:
        idx = _device_index(device)
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    if idx in _availability:
        return _availability[idx]
    ok, reason = _probe(idx)
    _availability[idx] = (ok, reason)
    return ok, reason


def _probe(idx: int) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if torch.version.hip is not None:
        return False, "ROCm build (green contexts are CUDA-only)"
    try:
        drv = _driver()
    except Exception as exc:  # noqa: BLE001
        return False, f"cuda-bindings not importable ({exc})"
    for name in (
        "cuDevSmResourceSplitByCount",
        "cuDevResourceGenerateDesc",
        "cuGreenCtxCreate",
        "cuGreenCtxStreamCreate",
        "cuGreenCtxGetDevResource",
    ):
        if not hasattr(drv, name):
            return False, f"cuda-bindings lacks {name}"
    try:
        _check(drv.cuInit(0), "cuInit")
        version = _check(drv.cuDriverGetVersion(), "cuDriverGetVersion")
        if version < _MIN_DRIVER_VERSION:
            return False, f"driver supports CUDA {version // 1000}.{version % 1000 // 10} < 12.4"
        dev = _check(drv.cuDeviceGet(idx), "cuDeviceGet")
        res = _check(
            drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )
        if res.sm.smCount < 1:
            return False, "device reports no SM resource"
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    return True, "ok"


def sm_granularity(compute_capability: tuple[int, int], sm_resource: Any = None) -> tuple[int, int]:
    """``(minimum SMs, alignment)`` of a green-context SM partition.

    Taken from the SM resource's ``minSmPartitionSize``/``smCoscheduledAlignment`` when the
    driver reports them (CUDA 13), else from the documented defaults: compute capability 9.0+
    partitions are multiples of 8 SMs, 8.x of 2 with at least 4, 7.x of 2, older of 1.
    """
    if sm_resource is not None:
        sm = getattr(sm_resource, "sm", sm_resource)
        min_size = int(getattr(sm, "minSmPartitionSize", 0) or 0)
        align = int(getattr(sm, "smCoscheduledAlignment", 0) or 0)
        if min_size > 0 and align > 0:
            return max(min_size, align), align
    major = compute_capability[0]
    if major >= 9:
        return 8, 8
    if major == 8:
        return 4, 2
    if major == 7:
        return 2, 2
    return 1, 1


@dataclass(frozen=True)
class SMShare:
    """One rung of the ladder.

    ``requested``: SMs asked for; ``num_sms``: SMs granted, i.e. the persistent-grid size to pass
    to the kernels; ``stream``: a torch stream confined to the partition, or None in
    persistent-grids-only mode (launch on the current stream).
    """

    requested: int
    num_sms: int
    stream: torch.cuda.Stream | None = None
    green: bool = False
    _handles: tuple = field(default=(), repr=False, compare=False)


class SMPartitionLadder:
    """SM shares created once at start; pick one per finetune step with :meth:`select`."""

    def __init__(
        self,
        shares: Iterable[int],
        device: int | str | torch.device | None = None,
        *,
        priority: int = 0,
        use_green_contexts: bool = True,
    ) -> None:
        requested = sorted({int(s) for s in shares})
        if not requested or requested[0] < 1:
            raise ValueError(f"shares must be a non-empty list of ints >= 1, got {shares!r}")
        self.requested = requested
        self.priority = int(priority)
        self.total_sms: int | None = None
        self.granularity: tuple[int, int] = (1, 1)
        self.shares: list[SMShare] = []
        self._closed = False
        self._device_index = 0
        self.available = False
        if not use_green_contexts:
            self.reason = "green contexts disabled by the caller"
        else:
            self.available, self.reason = green_contexts_available(device)
        if torch.cuda.is_available():
            try:
                self._device_index = _device_index(device)
                props = torch.cuda.get_device_properties(self._device_index)
                self.total_sms = int(props.multi_processor_count)
            except Exception:  # noqa: BLE001
                self.total_sms = None
        if self.available:
            try:
                self._build_green()
            except Exception as exc:  # noqa: BLE001
                self.close()
                self.available = False
                self.reason = f"green context creation failed ({exc})"
        if not self.available:
            if use_green_contexts:
                _log_unavailable_once(self.reason)
            cap = self.total_sms
            self.shares = [
                SMShare(requested=n, num_sms=min(n, cap) if cap else n, stream=None, green=False)
                for n in requested
            ]

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        return GREEN_CONTEXTS if self.available else PERSISTENT_GRIDS_ONLY

    def __repr__(self) -> str:
        rungs = ", ".join(f"{s.requested}->{s.num_sms}" for s in self.shares)
        return f"SMPartitionLadder(mode={self.mode!r}, total_sms={self.total_sms}, [{rungs}])"

    # ------------------------------------------------------------------ green contexts
    def _round(self, n: int) -> int:
        min_size, align = self.granularity
        total = self.total_sms or n
        n = min(n, total)
        rounded = (n // align) * align
        return max(rounded, min(min_size, total))

    def _build_green(self) -> None:
        drv = _driver()
        # the primary context must be current before green contexts are created
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{self._device_index}")
        dev = _check(drv.cuDeviceGet(self._device_index), "cuDeviceGet")
        sm_res = _check(
            drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )
        self.total_sms = int(sm_res.sm.smCount)
        cc = torch.cuda.get_device_capability(self._device_index)
        self.granularity = sm_granularity(cc, sm_res)
        built: dict[int, SMShare] = {}
        for n in self.requested:
            target = self._round(n)
            if target in built:
                prev = built[target]
                self.shares.append(SMShare(n, prev.num_sms, prev.stream, True, prev._handles))
                continue
            share = self._make_share(drv, dev, sm_res, n, target)
            built[target] = share
            self.shares.append(share)

    def _make_share(self, drv, dev, sm_res, requested: int, target: int) -> SMShare:
        if target >= self.total_sms:
            resource = sm_res  # the whole device: no split needed
        else:
            groups, n_groups, _remaining = _check(
                drv.cuDevSmResourceSplitByCount(1, sm_res, 0, target),
                f"cuDevSmResourceSplitByCount({target})",
            )
            if n_groups < 1:
                raise RuntimeError(f"could not split a {target}-SM partition")
            resource = groups[0]
        desc = _check(drv.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
        gctx = _check(
            drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
            "cuGreenCtxCreate",
        )
        try:
            granted_res = _check(
                drv.cuGreenCtxGetDevResource(gctx, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                "cuGreenCtxGetDevResource",
            )
            granted = int(granted_res.sm.smCount)
            if granted < 1 or granted > target:
                raise RuntimeError(
                    f"green context for {requested} SMs (rounded to {target}) was granted "
                    f"{granted} SMs"
                )
            if granted < target:
                logger.warning(
                    "green context for %d SMs (rounded to %d) got %d SMs",
                    requested,
                    target,
                    granted,
                )
            stream = _check(
                drv.cuGreenCtxStreamCreate(
                    gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, self.priority
                ),
                "cuGreenCtxStreamCreate",
            )
        except Exception:
            drv.cuGreenCtxDestroy(gctx)
            raise
        torch_stream = torch.cuda.ExternalStream(int(stream), device=self._device_index)
        return SMShare(requested, granted, torch_stream, True, (gctx, stream))

    # ------------------------------------------------------------------ selection
    def select(self, num_sms: int) -> SMShare:
        """The share to use for a budget of ``num_sms`` SMs: the largest rung granting at most
        ``num_sms`` SMs.  A budget below the smallest rung gets the smallest rung's stream with a
        persistent grid of ``num_sms`` programs.  In persistent-grids-only mode any budget is
        honoured exactly (capped at the device's SM count when known), with ``stream=None``."""
        if isinstance(num_sms, bool) or int(num_sms) < 1:
            raise ValueError(f"num_sms must be >= 1, got {num_sms!r}")
        num_sms = int(num_sms)
        if not self.available:
            cap = self.total_sms
            return SMShare(num_sms, min(num_sms, cap) if cap else num_sms, None, False)
        fitting = [s for s in self.shares if s.num_sms <= num_sms]
        if fitting:
            return max(fitting, key=lambda s: s.num_sms)
        smallest = min(self.shares, key=lambda s: s.num_sms)
        return SMShare(num_sms, num_sms, smallest.stream, True)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Destroy the streams and green contexts (synchronising them first)."""
        if self._closed:
            return
        self._closed = True
        seen = set()
        try:
            drv = _driver() if any(s._handles for s in self.shares) else None
        except Exception:  # noqa: BLE001
            drv = None
        for share in self.shares:
            if not share._handles or id(share._handles) in seen or drv is None:
                continue
            seen.add(id(share._handles))
            gctx, stream = share._handles
            try:
                drv.cuStreamSynchronize(stream)
                drv.cuStreamDestroy(stream)
                drv.cuGreenCtxDestroy(gctx)
            except Exception as exc:  # noqa: BLE001  (best effort at teardown)
                logger.debug("green context teardown failed: %s", exc)

    def __enter__(self) -> SMPartitionLadder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
