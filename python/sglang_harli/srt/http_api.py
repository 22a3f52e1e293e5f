"""Harli's HTTP routes, mounted on SGLang's own FastAPI app in the main process.

- ``GET /harli/status``: mode, decode iterations, hook overhead, the job being trained;
- OpenAI's fine-tuning API, in its shapes so the official ``openai`` client works unchanged:
  ``/v1/files`` (upload, list, get, content, delete) and ``/v1/fine_tuning/jobs`` (create,
  list, get, events, checkpoints, cancel). Errors use OpenAI's ``{"error": {...}}`` body.

Authentication is SGLang's own: its API-key middleware reads each route's ``auth_level``. The
routes that write or reveal data (upload, file content, delete, create, cancel) are
``ADMIN_OPTIONAL``, like SGLang's ``/load_lora_adapter``: with ``--admin-api-key`` they need that
key, else with ``--api-key`` that one. The others are ordinary routes: with ``--api-key`` they
need it (the admin key is not accepted there, as on SGLang's own ordinary routes).

SGLang's HTTP event loop only parses requests: every job-store call, file read and dataset
tokenization runs in a worker thread (``run_in_threadpool``), and uploads stream to disk with a
size cap (``uploads.py``). A job is validated completely before it is written (its files,
model, hyperparameters, and every line of its dataset against the served tokenizer), so a bad
request changes nothing; it is then stored as ``validating_files``, its tokenized dataset is
written, and only then is it ``queued`` for the schedulers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from sglang_harli import durable
from sglang_harli.config import HarliConfig
from sglang_harli.finetune.data import (
    DatasetError,
    Example,
    check_lengths,
    decode_lines,
    parse_jsonl_lines,
    save_examples,
)
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.lifecycle import FINAL_STATES, JobStatus
from sglang_harli.jobs.store import (
    STORE_ERRORS,
    AdapterNameTaken,
    Event,
    FileInUseError,
    FileRecord,
    Job,
    JobStore,
    StoreUnavailable,
    open_store,
    store_status,
)
from sglang_harli.jobs.store_errors import classify
from sglang_harli.srt import model_ids, uploads
from sglang_harli.srt.openai_shapes import (
    checkpoint_json,
    event_json,
    file_json,
    job_json,
    list_json,
)
from sglang_harli.srt.status import may_write, status_view

logger = logging.getLogger(__name__)

FILE_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "vision", "evals")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PAGE = 100
MAX_JSON_BODY = 1 << 20  # a job's JSON body is small; anything larger is refused unread
# multipart framing around the file (boundaries, part headers, the purpose field): a declared
# Content-Length beyond the cap by more than this cannot hold an acceptable file
MULTIPART_SLACK = 64 * 1024
READ_BYTES = 1 << 20


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the main process knows of the model it serves, for validating jobs."""

    name: str
    limits: hp.ServingLimits


def mount_routes(app: FastAPI, harli_config: HarliConfig, limits: hp.ServingLimits | None) -> None:
    """Add our routes to SGLang's app (before the server starts)."""

    store = None
    if harli_config.enabled and limits is not None:
        store = open_store(harli_config.state_dir)  # serving starts even if it cannot open
        max_upload_bytes = int(harli_config.max_upload_mb * 2**20)
        FineTuningApi(store, limits, max_upload_bytes).mount(app)

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
            "mode": harli_config.mode,
            "decode_iterations": sum(s["decode_iterations"] for s in schedulers),
            "job_store": None if store is None else await run_in_threadpool(store_status, store),
            "schedulers": schedulers,
        }
        return status_view(status, may_write(request, manager.server_args))


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
            raise ApiError(
                failure.status, failure.message, code=failure.kind, type="server_error"
            ) from None
        except Exception:
            logger.exception("fine-tuning API: %s failed", handler.__name__)
            raise ApiError(500, "internal error; see the server log", type="server_error") from None

    return wrapper


class FineTuningApi:
    def __init__(self, store: JobStore, limits: hp.ServingLimits, max_upload_bytes: int):
        self.store, self.limits, self.max_upload_bytes = store, limits, max_upload_bytes
        # One dataset is tokenized at a time, with a tokenizer of our own: the HTTP loop keeps
        # SGLang's (a fast tokenizer used from two threads at once can raise "Already borrowed")
        self._tokenize_lock = threading.Lock()
        self._tokenizer: Any = None
        roots = {str(store.state_dir), str(store.state_dir.resolve())}
        self._roots = sorted((r.rstrip("/") + "/" for r in roots), key=len, reverse=True)
        durable.remove_leftovers(store.files_dir)  # uploads cut short by a stop

    # --- routes ------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        from sglang.srt.utils.auth import AuthLevel, auth_level

        app.add_exception_handler(ApiError, lambda request, exc: exc.response())
        writes = auth_level(AuthLevel.ADMIN_OPTIONAL)  # SGLang's middleware reads this mark

        @app.post("/v1/files")
        @writes
        @_route
        async def upload_file(request: Request):
            return file_json(await self.upload(request))

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
            return file_json(await run_in_threadpool(self.file, file_id))

        @app.get("/v1/files/{file_id}/content")
        @writes
        @_route
        async def file_content(file_id: str):
            return await self.file_content(file_id)

        @app.delete("/v1/files/{file_id}")
        @writes
        @_route
        async def delete_file(file_id: str):
            await run_in_threadpool(self.delete_file, file_id)
            return {"id": file_id, "object": "file", "deleted": True}

        @app.post("/v1/fine_tuning/jobs")
        @writes
        @_route
        async def create_job(request: Request):
            body = await _json_body(request)
            return self.job_json(await run_in_threadpool(self.create_job, body))

        @app.get("/v1/fine_tuning/jobs")
        @_route
        async def list_jobs(request: Request):
            after, limit = _after(request), _limit(request, 20)
            jobs, has_more = await run_in_threadpool(self.store.list_jobs, after, limit)
            return list_json([self.job_json(j) for j in jobs], has_more)

        @app.get("/v1/fine_tuning/jobs/{job_id}")
        @_route
        async def get_job(job_id: str):
            return self.job_json(await run_in_threadpool(self.job, job_id))

        @app.get("/v1/fine_tuning/jobs/{job_id}/events")
        @_route
        async def list_events(job_id: str, request: Request):
            after, limit = _after(request, EVENT_CURSOR), _limit(request, 20)

            def page():
                self.job(job_id)
                return self.store.list_events(job_id, after, limit)

            events, has_more = await run_in_threadpool(page)
            return list_json([self.event_json(e) for e in events], has_more)

        @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
        @_route
        async def list_checkpoints(job_id: str, request: Request):
            after, limit = _after(request), _limit(request, 10)

            def page():
                return self.job(job_id), *self.store.list_checkpoints(job_id, after, limit)

            job, checkpoints, has_more = await run_in_threadpool(page)
            return list_json([checkpoint_json(c, job) for c in checkpoints], has_more)

        @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
        @writes
        @_route
        async def cancel_job(job_id: str):
            return self.job_json(await run_in_threadpool(self.cancel_job, job_id))

    # --- files -------------------------------------------------------------------------------

    def file(self, file_id: str) -> FileRecord:
        record = self.store.get_file(file_id)
        if record is None:
            raise self.no_file(file_id)
        return record

    @staticmethod
    def no_file(file_id: str) -> ApiError:
        return ApiError(404, f"no file with id {file_id!r}", param="file_id", code="not_found")

    async def upload(self, request: Request) -> FileRecord:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_upload_bytes + MULTIPART_SLACK:
                raise self._too_large()  # refused before reading a byte of the body
        tmp = self.store.upload_path()
        try:
            try:
                received = await uploads.receive(
                    request.stream(),
                    request.headers.get("content-type", ""),
                    tmp,
                    self.max_upload_bytes,
                )
            except uploads.UploadRefused as exc:
                raise ApiError(exc.status, exc.message, exc.param, exc.code) from None
            purpose = received.fields.get("purpose")
            if purpose not in FILE_PURPOSES:
                raise ApiError(400, f"purpose must be one of {list(FILE_PURPOSES)}", "purpose")
            if received.filename is None:
                raise ApiError(400, "the upload has no 'file' part", param="file")
            if purpose == "fine-tune":
                await run_in_threadpool(self.check_dataset_file, tmp)
            return await run_in_threadpool(self.store.add_file, received.filename, purpose, tmp)
        finally:  # moved into place on success; nothing is left of a refused upload
            await run_in_threadpool(tmp.unlink, True)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the file is larger than this server accepts ({self.max_upload_bytes / 2**20:g} "
            "MB, --harli-max-upload-mb)",
            param="file",
            code="file_too_large",
        )

    def check_dataset_file(self, path: Path) -> None:
        model = self.served_model()
        self.examples(path.read_bytes(), model.limits.max_example_tokens, "the file", "file")

    async def file_content(self, file_id: str) -> StreamingResponse:
        """The stored bytes as they were uploaded, whatever they are (not only UTF-8)."""

        def open_file():
            record = self.file(file_id)
            try:  # once open, a concurrent delete cannot cut the response short
                return open(record.path, "rb"), record
            except FileNotFoundError:
                raise ApiError(
                    404, f"no file with id {file_id!r}", "file_id", "not_found"
                ) from None

        f, record = await run_in_threadpool(open_file)

        async def chunks():
            try:
                while chunk := await run_in_threadpool(f.read, READ_BYTES):
                    yield chunk
            finally:
                f.close()

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={"content-length": str(record.bytes)},
        )

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        try:
            deleted = self.store.delete_file(file_id)
        except FileInUseError as exc:
            raise ApiError(
                409,
                f"file {file_id} is used by fine-tuning job(s) {', '.join(exc.job_ids)} that "
                "have not finished; cancel them or wait until they end",
                param="file_id",
                code="file_in_use",
            ) from None
        if not deleted:
            raise self.no_file(file_id)

    # --- datasets ----------------------------------------------------------------------------

    def served_model(self) -> ServedModel:
        from sglang.srt.entrypoints.http_server import get_global_state

        manager = get_global_state().tokenizer_manager
        limits = dataclasses.replace(self.limits, max_seq_length=manager.context_len)
        return ServedModel(manager.served_model_name, limits)

    def tokenizer(self) -> Any:
        """Our copy of the served tokenizer (call with ``_tokenize_lock`` held)."""
        if self._tokenizer is None:
            from sglang.srt.entrypoints.http_server import get_global_state

            served = get_global_state().tokenizer_manager.tokenizer
            if served is None:
                raise ApiError(
                    400,
                    "fine-tuning needs the served tokenizer; this server runs with "
                    "--skip-tokenizer-init",
                    code="unsupported",
                )
            self._tokenizer = copy.deepcopy(served)
        return self._tokenizer

    def examples(self, content: bytes, max_length: int, source: str, param: str) -> list[Example]:
        """Every line of a JSONL dataset, tokenized; any bad line is a 400 naming it."""
        try:
            lines = decode_lines(content, source)
            with self._tokenize_lock:
                return parse_jsonl_lines(lines, self.tokenizer(), max_length, source)
        except DatasetError as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_file") from None

    def dataset(self, file_id: Any, param: str, max_length: int) -> list[Example]:
        if not isinstance(file_id, str) or not file_id:
            raise ApiError(400, f"{param} must be a file id", param=param)
        record = self.store.get_file(file_id)
        if record is None:
            raise ApiError(400, f"no file with id {file_id!r}", param=param, code="invalid_file")
        if record.purpose != "fine-tune":
            raise ApiError(
                400,
                f"file {file_id} has purpose {record.purpose!r}, not 'fine-tune'",
                param=param,
                code="invalid_file",
            )
        try:
            content = Path(record.path).read_bytes()
        except FileNotFoundError:  # deleted since the lookup
            raise ApiError(400, f"no file with id {file_id!r}", param, "invalid_file") from None
        source = f"the {param.replace('_', ' ')} {file_id}"
        return self.examples(content, max_length, source, param)

    # --- jobs --------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise ApiError(404, f"no fine-tuning job with id {job_id!r}", code="not_found")
        return job

    def cancel_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.status in FINAL_STATES:
            raise ApiError(400, f"job {job_id} has already {job.status}", code="job_finished")
        return self.store.request_cancel(job_id) or job

    def create_job(self, body: Any) -> Job:
        """Validate everything, then store the job with its tokenized dataset, then queue it.
        Runs in a worker thread: it tokenizes whole files and waits on SQLite."""
        model = self.served_model()
        request = _check_job_request(body, model)
        ceiling = model.limits.max_example_tokens
        hp_param = request.hyperparameters_param
        try:  # types and ranges first: a bad value is refused before any file is read
            hp.resolve(request.hyperparameters, 1, model.limits, longest=1)
        except hp.InvalidParameter as exc:
            raise ApiError(400, str(exc), param=_param(exc.param, hp_param)) from None

        train = self.dataset(request.training_file, "training_file", ceiling)
        validation = []
        if request.validation_file is not None:
            validation = self.dataset(request.validation_file, "validation_file", ceiling)
        longest = max(len(e.input_ids) for e in train + validation)
        try:
            resolved = hp.resolve(request.hyperparameters, len(train), model.limits, longest)
        except hp.InvalidParameter as exc:
            raise ApiError(400, str(exc), param=_param(exc.param, hp_param)) from None
        for examples, param in ((train, "training_file"), (validation, "validation_file")):
            try:  # an explicit max_seq_length below the longest example
                check_lengths(examples, resolved.max_seq_length, f"the {param.replace('_', ' ')}")
            except DatasetError as exc:
                raise ApiError(400, str(exc), param=param, code="invalid_file") from None
        if request.suffix and self.store.adapter_name_taken(request.suffix):
            raise AdapterNameTaken(request.suffix)  # a 409; the store checks again as it writes

        job = self.store.create_job(
            model=model.name,
            training_file=request.training_file,
            validation_file=request.validation_file,
            suffix=request.suffix,
            hyperparameters=resolved.to_dict(),
            seed=request.seed,
            status=JobStatus.VALIDATING_FILES,
        )
        try:
            self.store.job_dir(job.id).mkdir(parents=True, exist_ok=True)
            save_examples(self.store.dataset_path(job.id, "train"), train)
            if validation:
                save_examples(self.store.dataset_path(job.id, "validation"), validation)
        except Exception as exc:  # noqa: BLE001 - the disk; the job says why it cannot run
            logger.exception("cannot store the dataset of job %s", job.id)
            error = {"code": "internal_error", "message": f"cannot store the dataset: {exc}"}
            self.store.set_status(job.id, JobStatus.FAILED, error=error)
            return self.job(job.id)
        deleted = [
            f
            for f in (request.training_file, request.validation_file)
            if f is not None and self.store.get_file(f) is None
        ]
        if deleted:  # deleted between validation and the job's creation
            message = f"file {deleted[0]} was deleted while the job was created"
            self.store.set_status(
                job.id, JobStatus.FAILED, error={"code": "invalid_file", "message": message}
            )
            return self.job(job.id)
        self.store.add_event(
            job.id, f"Files validated: {len(train)} training examples; the job is queued"
        )
        self.store.set_status(job.id, JobStatus.QUEUED)  # False if cancelled meanwhile
        return self.job(job.id)

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


# --- the request ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobRequest:
    training_file: Any
    validation_file: Any
    hyperparameters: dict[str, Any] | None
    hyperparameters_param: str  # where they came from, for error params
    suffix: str | None
    seed: int


def _check_job_request(body: Any, model: ServedModel) -> JobRequest:
    """Everything in a create-job body that needs no file: a 400 for the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != model.name:
        raise ApiError(
            400,
            f"model {_shown(body.get('model'))} is not served here; fine-tune {model.name!r}",
            param="model",
            code="model_not_found",
        )
    raw, where = body.get("hyperparameters"), "hyperparameters"
    if raw is not None and not isinstance(raw, dict):
        raise ApiError(400, "hyperparameters must be an object", param="hyperparameters")
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict):
            raise ApiError(400, "method must be an object", param="method")
        if method.get("type") != "supervised":
            raise ApiError(
                400,
                f"method.type must be 'supervised' (the only method this server trains), "
                f"got {_shown(method.get('type'))}",
                param="method.type",
            )
        supervised = method.get("supervised")
        if supervised is not None and not isinstance(supervised, dict):
            raise ApiError(400, "method.supervised must be an object", param="method.supervised")
        nested = (supervised or {}).get("hyperparameters")
        if nested is not None:
            where = "method.supervised.hyperparameters"
            if not isinstance(nested, dict):
                raise ApiError(400, f"{where} must be an object", param=where)
            if raw is not None and raw != nested:
                raise ApiError(
                    400,
                    "hyperparameters are given twice, differently: give them in "
                    "method.supervised.hyperparameters only",
                    param="hyperparameters",
                )
            raw = nested
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise ApiError(400, "suffix: 1-64 letters, digits, '-' or '_'", param="suffix")
    if suffix is not None and (reserved := model_ids.suffix_refusal(suffix)):
        raise ApiError(400, reserved, param="suffix", code="suffix_reserved")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(hp.MAX_SEED + 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= hp.MAX_SEED:
        raise ApiError(
            400, f"seed must be an integer from 0 to {hp.MAX_SEED}, got {_shown(seed)}", "seed"
        )
    validation_file = body.get("validation_file")
    return JobRequest(body.get("training_file"), validation_file, raw, where, suffix, seed)


def _param(param: str, prefix: str) -> str:
    """``hyperparameters.x`` as the client named its hyperparameters object."""
    return prefix + param.removeprefix("hyperparameters")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


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
            400, f"limit must be an integer from 1 to {MAX_PAGE}, got {_shown(raw)}", "limit"
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
        raise ApiError(400, f"after must be an id from a previous page, got {_shown(raw)}", "after")
    return raw
