"""Harli's HTTP routes, mounted on SGLang's own FastAPI app in the main process.

- ``GET /harli/status``: mode, decode iterations, hook overhead, the job being trained;
- ``POST /harli/mode``: switch the co-run mode, objective, margin, share or budget of the running
  server (``ADMIN_OPTIONAL``, like the other writes; ``corun/control.py`` decides what is valid);
- OpenAI's fine-tuning API, in its shapes so the official ``openai`` client works unchanged:
  ``/v1/files`` (upload, list, get, content, delete) and ``/v1/fine_tuning/jobs`` (create,
  list, get, events, checkpoints, cancel). Errors use OpenAI's ``{"error": {...}}`` body.

Authentication is SGLang's own: its API-key middleware reads each route's ``auth_level``. The
routes that write or reveal data (upload, file content, delete, create, cancel) are
``ADMIN_OPTIONAL``, like SGLang's ``/load_lora_adapter``: with ``--admin-api-key`` they need that
key, else with ``--api-key`` that one. The others are ordinary routes: with ``--api-key`` they
need it (the admin key is not accepted there, as on SGLang's own ordinary routes).

This module holds the routes; what they admit is decided behind them: uploads, file content and
delete in ``serving_files.py``, job creation in ``serving_jobs.py`` (as SGLang's
``entrypoints/openai/serving_*.py`` sit behind its ``http_server.py``). SGLang's HTTP event loop
only parses requests: every job-store call, file read and dataset tokenization runs in a worker
thread (``run_in_threadpool``), and uploads stream to disk with a size cap (``uploads.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from sglang_harli import durable
from sglang_harli.config import HarliConfig
from sglang_harli.corun.control import ControlError, parse_change, to_wire
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.store import (
    STORE_ERRORS,
    AdapterNameTaken,
    Event,
    Job,
    JobStore,
    ReopeningStore,
    StoreUnavailable,
    open_store,
    store_status,
)
from sglang_harli.jobs.store_errors import Kind as StoreFailureKind
from sglang_harli.jobs.store_errors import classify
from sglang_harli.srt.api_errors import ApiError, busy, shown
from sglang_harli.srt.datasets import Tokenizers
from sglang_harli.srt.openai_shapes import (
    checkpoint_json,
    event_json,
    file_json,
    job_json,
    list_json,
)
from sglang_harli.srt.serving_files import FILE_PURPOSES, FileService
from sglang_harli.srt.serving_jobs import JobService
from sglang_harli.srt.status import may_write, status_view

logger = logging.getLogger(__name__)

MAX_PAGE = 100
MAX_JSON_BODY = 1 << 20  # a job's JSON body is small; anything larger is refused unread
_DEFAULTS = HarliConfig()  # the flags' defaults, for an API built without a config (tests)


def mount_routes(app: FastAPI, harli_config: HarliConfig, limits: hp.ServingLimits | None) -> None:
    """Add our routes to SGLang's app (before the server starts)."""

    store = None
    if harli_config.enabled and limits is not None:
        store = open_store(harli_config.state_dir)  # serving starts even if it cannot open
        max_upload_bytes = int(harli_config.max_upload_mb * 2**20)
        FineTuningApi(
            store,
            limits,
            max_upload_bytes,
            max_uploads_in_flight=harli_config.max_uploads_in_flight,
            upload_timeout_s=harli_config.upload_timeout_s,
        ).mount(app)

    @app.get("/harli/status")
    async def harli_status(request: Request) -> dict:
        """Mode, decode iterations seen and hook overhead, per scheduler (DP rank); whether the
        job store is open. The host and pid of each scheduler only to a client that may write
        (see :func:`status_view`)."""
        if not harli_config.enabled:
            return {"mode": harli_config.mode, "schedulers": []}
        from sglang.srt.entrypoints.http_server import get_global_state

        manager = get_global_state().tokenizer_manager
        internal_states = await manager.get_internal_state()
        schedulers = [state["harli"] for state in internal_states if "harli" in state]
        status = {
            # the mode in force (POST /harli/mode changes it), or the one the server started in
            "mode": schedulers[0]["mode"] if schedulers else harli_config.mode,
            "decode_iterations": sum(s["decode_iterations"] for s in schedulers),
            "job_store": None if store is None else await run_in_threadpool(store_status, store),
            "schedulers": schedulers,
        }
        return status_view(status, may_write(request, manager.server_args))

    from sglang.srt.utils.auth import AuthLevel, auth_level

    @app.post("/harli/mode")
    @auth_level(AuthLevel.ADMIN_OPTIONAL)  # a write: the key the fine-tuning writes need
    async def harli_mode(request: Request):
        """Switch the co-run settings of a running server (``corun/control.py``): validated
        here, whole, before anything is sent; then SGLang's own scheduler RPC carries them to
        every scheduler, which applies them before its next decode iteration. Answers the
        settings in force, read back from the first scheduler."""
        try:
            return await _switch_settings(request, harli_config)
        except ApiError as exc:  # in every mode, with or without the fine-tuning API mounted
            return exc.response()


async def _switch_settings(request: Request, harli_config: HarliConfig) -> dict:
    if not harli_config.enabled:
        raise ApiError(
            409,
            "this server runs --harli-mode off (plain SGLang, no Harli scheduler): there are no "
            "co-run settings to switch; restart it in a Harli mode",
            code="mode_off",
        )
    body = await _json_body(request)
    try:
        change = parse_change(body, harli_config, _has_cuda())
    except ControlError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_setting") from None
    from sglang.srt.entrypoints.http_server import get_global_state
    from sglang.srt.managers.io_struct import SetInternalStateReq

    manager = get_global_state().tokenizer_manager
    updated = await manager.set_internal_state(SetInternalStateReq(server_args=to_wire(change)))
    if not updated or not all(updated):
        logger.warning("POST /harli/mode: a scheduler refused %s", change)
        message = "a scheduler refused the change; see the server log"
        raise ApiError(500, message, type="server_error")
    states = await manager.get_internal_state()
    [first, *_] = [state["harli"] for state in states if "harli" in state]
    answer = {"object": "harli.control", "control": first["control"]}
    return status_view({**answer, "objective": first["corun"]["objective"]}, privileged=True)


@functools.cache
def _has_cuda() -> bool:
    from sglang_harli.srt.cpu import cuda_available

    return cuda_available()


def _route(handler: Callable) -> Callable:
    """Any failure of ours becomes OpenAI's error body, never a bare trace: the job store's
    (busy, disk full, unreadable) a 503 or 507 saying which (``jobs/store_errors.py``), a name
    another job holds a 409, anything else a 500, logged."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except (ApiError, ClientDisconnect):
            raise
        except AdapterNameTaken as exc:
            raise ApiError(409, str(exc), param="suffix", code="suffix_in_use") from None
        except (*STORE_ERRORS, StoreUnavailable) as exc:
            failure = classify(exc)
            logger.warning("fine-tuning API: %s: %s", handler.__name__, failure.message)
            if failure.kind == StoreFailureKind.BUSY:  # another writer: retrying soon works
                raise busy(failure.message, code=failure.kind) from None
            raise ApiError(
                failure.status, failure.message, code=failure.kind, type="server_error"
            ) from None
        except Exception:
            logger.exception("fine-tuning API: %s failed", handler.__name__)
            raise ApiError(500, "internal error; see the server log", type="server_error") from None

    return wrapper


class FineTuningApi:
    def __init__(
        self,
        store: JobStore | ReopeningStore,
        limits: hp.ServingLimits,
        max_upload_bytes: int,
        max_uploads_in_flight: int = _DEFAULTS.max_uploads_in_flight,
        upload_timeout_s: float | None = _DEFAULTS.upload_timeout_s,
    ):
        self.store = store
        tokenizers = Tokenizers()
        self.files = FileService(
            store, tokenizers, limits, max_upload_bytes, max_uploads_in_flight, upload_timeout_s
        )
        self.jobs = JobService(store, tokenizers, limits)
        roots = {str(store.state_dir), str(store.state_dir.resolve())}
        self._roots = sorted((r.rstrip("/") + "/" for r in roots), key=len, reverse=True)
        try:
            durable.remove_leftovers(store.files_dir)  # uploads cut short by a stop
        except OSError as exc:  # a read-only or missing state dir: serving starts regardless
            logger.warning("cannot clear unfinished uploads in %s: %s", store.files_dir, exc)

    # --- routes ------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        from sglang.srt.utils.auth import AuthLevel, auth_level

        app.add_exception_handler(ApiError, lambda request, exc: exc.response())
        writes = auth_level(AuthLevel.ADMIN_OPTIONAL)  # SGLang's middleware reads this mark

        @app.post("/v1/files")
        @writes
        @_route
        async def upload_file(request: Request):
            return file_json(await self.files.upload(request))

        @app.get("/v1/files")
        @_route
        async def list_files(request: Request):
            purpose = request.query_params.get("purpose")
            if purpose is not None and purpose not in FILE_PURPOSES:
                raise ApiError(400, f"purpose must be one of {list(FILE_PURPOSES)}", "purpose")
            after, limit = _after(request), _limit(request, 20)
            files = await run_in_threadpool(self.store.list_files, purpose, after, limit + 1)
            return list_json([file_json(f) for f in files[:limit]], len(files) > limit)

        @app.get("/v1/files/{file_id}")
        @_route
        async def get_file(file_id: str):
            return file_json(await run_in_threadpool(self.files.file, file_id))

        @app.get("/v1/files/{file_id}/content")
        @writes
        @_route
        async def file_content(file_id: str):
            return await self.files.file_content(file_id)

        @app.delete("/v1/files/{file_id}")
        @writes
        @_route
        async def delete_file(file_id: str):
            await run_in_threadpool(self.files.delete_file, file_id)
            return {"id": file_id, "object": "file", "deleted": True}

        @app.post("/v1/fine_tuning/jobs")
        @writes
        @_route
        async def create_job(request: Request):
            body = await _json_body(request)
            return self.job_json(await run_in_threadpool(self.jobs.create_job, body))

        @app.get("/v1/fine_tuning/jobs")
        @_route
        async def list_jobs(request: Request):
            after, limit = _after(request), _limit(request, 20)
            jobs, has_more = await run_in_threadpool(self.store.list_jobs, after, limit)
            return list_json([self.job_json(j) for j in jobs], has_more)

        @app.get("/v1/fine_tuning/jobs/{job_id}")
        @_route
        async def get_job(job_id: str):
            return self.job_json(await run_in_threadpool(self.jobs.job, job_id))

        @app.get("/v1/fine_tuning/jobs/{job_id}/events")
        @_route
        async def list_events(job_id: str, request: Request):
            after, limit = _after(request, EVENT_CURSOR), _limit(request, 20)

            def page():
                self.jobs.job(job_id)
                return self.store.list_events(job_id, after, limit)

            events, has_more = await run_in_threadpool(page)
            return list_json([self.event_json(e) for e in events], has_more)

        @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
        @_route
        async def list_checkpoints(job_id: str, request: Request):
            after, limit = _after(request), _limit(request, 10)

            def page():
                return self.jobs.job(job_id), *self.store.list_checkpoints(job_id, after, limit)

            job, checkpoints, has_more = await run_in_threadpool(page)
            return list_json([checkpoint_json(c, job) for c in checkpoints], has_more)

        @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
        @writes
        @_route
        async def cancel_job(job_id: str):
            return self.job_json(await run_in_threadpool(self.jobs.cancel_job, job_id))

    # --- presentation --------------------------------------------------------------------------

    def hide_paths(self, text: str) -> str:
        """Messages (a runner's exception, an adapter load) name files relative to the state
        dir, never by the server's absolute paths."""
        for root in self._roots:
            text = text.replace(root, "")
        return text

    def job_json(self, job: Job) -> dict:
        out = job_json(job)
        if out["error"] and isinstance(out["error"].get("message"), str):
            out["error"] = {**out["error"], "message": self.hide_paths(out["error"]["message"])}
        return out

    def event_json(self, event: Event) -> dict:
        return {**event_json(event), "message": self.hide_paths(event.message)}


async def _json_body(request: Request) -> Any:
    """The request's JSON, read up to :data:`MAX_JSON_BODY` bytes (a 413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_JSON_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_JSON_BODY} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not JSON") from None


def _limit(request: Request, default: int) -> int:
    """``?limit=``, parsed here (FastAPI's own check answers 422 in another body shape)."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PAGE):
        raise ApiError(
            400, f"limit must be an integer from 1 to {MAX_PAGE}, got {shown(raw)}", "limit"
        )
    return int(raw)


# what a page cursor (an id we handed out) can look like; anything else is a 400, not a lookup
CURSOR = re.compile(r"[A-Za-z0-9_-]{1,128}")
EVENT_CURSOR = re.compile(r"ftevent-[0-9]{1,18}")  # events are numbered (store._event_seq)


def _after(request: Request, pattern: re.Pattern = CURSOR) -> str | None:
    """``?after=``: an id of the previous page's last record; a malformed one is a 400 (an
    unknown well-formed id pages from the newest, as before)."""
    raw = request.query_params.get("after") or None
    if raw is not None and not (raw.isascii() and pattern.fullmatch(raw)):
        raise ApiError(400, f"after must be an id from a previous page, got {shown(raw)}", "after")
    return raw
