"""What ``GET /harli/status`` shows to whom (main process).

The status is for operators and for the tools that read it (the profile tool, the benchmarks,
the tests). Two parts of it say more about the machine than a client needs: each scheduler
process's host and pid, and the raw memory addresses of SGLang's K/V buffers and of the job's
blocks inside them (a check reads them to see that the job's tensors lie inside the lent
slots). Those are shown only to a request that carries the key SGLang asks of the write routes
(``ADMIN_OPTIONAL``: the admin key if set, else the api key if set, else no key): the one who
could act on them. With no key configured the server is open anyway, and everything is shown.
No object's repr (which carries its memory address) is ever shown.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

# What only a client that may write sees of each scheduler in /harli/status: its host and pid,
# and the raw memory addresses of SGLang's K/V buffers and of the job's blocks in them (a check
# that the job's tensors lie inside the lent slots reads them).
PRIVILEGED_STATUS = {"jobs": ("owner",), "memory": ("kv_buffers", "arena_blocks")}


def status_view(status: dict, privileged: bool) -> dict:
    """``/harli/status`` as a client sees it: no object reprs (they carry memory addresses),
    and :data:`PRIVILEGED_STATUS` only to a client that may write, who could act on them (with
    no key configured, everyone; with ``--admin-api-key``, its holders)."""
    status = _plain(status)
    if not privileged:
        for scheduler in status.get("schedulers") or []:
            for section, keys in PRIVILEGED_STATUS.items():
                if isinstance(scheduler.get(section), dict):
                    for key in keys:
                        scheduler[section].pop(key, None)
    return status


def _plain(value: Any) -> Any:
    """JSON values as they are; anything else (an object FastAPI would show as its repr, with
    its memory address) as its type's name."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return _without_address(value) if isinstance(value, str) else value
    return type(value).__name__


_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def _without_address(text: str) -> str:
    return _ADDRESS.sub("", text)


def may_write(request: Request, server_args: Any) -> bool:
    """Whether ``request`` carries the key SGLang asks of the write routes (ADMIN_OPTIONAL:
    the admin key if set, else the api key if set, else none)."""
    from sglang.srt.utils.auth import AuthLevel, decide_request_auth

    decision = decide_request_auth(
        method=request.method,
        path=request.url.path,
        authorization_header=request.headers.get("authorization"),
        api_key=getattr(server_args, "api_key", None),
        admin_api_key=getattr(server_args, "admin_api_key", None),
        auth_level=AuthLevel.ADMIN_OPTIONAL,
    )
    return decision.allowed
