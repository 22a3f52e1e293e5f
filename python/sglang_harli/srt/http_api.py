"""Harli's HTTP routes, mounted on SGLang's own FastAPI app in the main process.

- ``GET /harli/status``: mode, decode iterations, hook overhead, the job being trained;
- OpenAI's fine-tuning API, in its shapes so the official ``openai`` client works unchanged:
  ``/v1/files`` (upload, list, get, content, delete) and ``/v1/fine_tuning/jobs`` (create,
  list, get, events, checkpoints, cancel). Errors use OpenAI's ``{"error": {...}}`` body.

A job is validated completely before it is written (its files, model, hyperparameters, and every
line of its dataset against the served tokenizer), so a bad request changes nothing. The
schedulers run queued jobs from the shared job store.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from sglang_harli.config import HarliConfig
from sglang_harli.finetune.data import DatasetError, parse_jsonl_lines
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.lifecycle import (
    FINAL_STATES,
    JobStatus,
    checkpoint_model_name,
)
from sglang_harli.jobs.store import Checkpoint, Event, FileRecord, Job, JobStore

FILE_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "vision", "evals")
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PAGE = 100


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": body}, status_code=self.status)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the main process knows of the model it serves, for validating jobs."""

    name: str
    tokenizer: Any
    limits: hp.ServingLimits


def mount_routes(app: FastAPI, harli_config: HarliConfig, limits: hp.ServingLimits | None) -> None:
    """Add our routes to SGLang's app (before the server starts)."""

    @app.get("/harli/status")
    async def harli_status() -> dict:
        """Mode, decode iterations seen and hook overhead, per scheduler (DP rank)."""
        if not harli_config.enabled:
            return {"mode": harli_config.mode, "schedulers": []}
        from sglang.srt.entrypoints.http_server import get_global_state

        internal_states = await get_global_state().tokenizer_manager.get_internal_state()
        schedulers = [state["harli"] for state in internal_states if "harli" in state]
        return {
            "mode": harli_config.mode,
            "decode_iterations": sum(s["decode_iterations"] for s in schedulers),
            "schedulers": schedulers,
        }

    if harli_config.enabled and limits is not None:
        FineTuningApi(JobStore(harli_config.state_dir), limits).mount(app)


class FineTuningApi:
    def __init__(self, store: JobStore, limits: hp.ServingLimits):
        self.store, self.limits = store, limits

    def served_model(self) -> ServedModel:
        from sglang.srt.entrypoints.http_server import get_global_state

        manager = get_global_state().tokenizer_manager
        limits = dataclasses.replace(self.limits, max_seq_length=manager.context_len)
        return ServedModel(manager.served_model_name, manager.tokenizer, limits)

    def mount(self, app: FastAPI) -> None:
        app.add_exception_handler(ApiError, lambda request, exc: exc.response())
        route = {"GET": app.get, "POST": app.post, "DELETE": app.delete}

        def register(method: str, path: str):
            return route[method](path)

        @register("POST", "/v1/files")
        async def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
            return self.upload_file(file.filename or "upload.jsonl", purpose, await file.read())

        @register("GET", "/v1/files")
        async def list_files(purpose: str | None = None):
            return _list([file_json(f) for f in self.store.list_files(purpose)], False)

        @register("GET", "/v1/files/{file_id}")
        async def get_file(file_id: str):
            return file_json(self.file(file_id))

        @register("GET", "/v1/files/{file_id}/content")
        async def file_content(file_id: str):
            with open(self.file(file_id).path, encoding="utf-8") as f:
                return PlainTextResponse(f.read())

        @register("DELETE", "/v1/files/{file_id}")
        async def delete_file(file_id: str):
            self.file(file_id)
            self.store.delete_file(file_id)
            return {"id": file_id, "object": "file", "deleted": True}

        @register("POST", "/v1/fine_tuning/jobs")
        async def create_job(request: Request):
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the request body is not JSON") from None
            return job_json(self.create_job(body, self.served_model()))

        @register("GET", "/v1/fine_tuning/jobs")
        async def list_jobs(after: str | None = None, limit: int = 20):
            jobs, has_more = self.store.list_jobs(after, _limit(limit))
            return _list([job_json(j) for j in jobs], has_more)

        @register("GET", "/v1/fine_tuning/jobs/{job_id}")
        async def get_job(job_id: str):
            return job_json(self.job(job_id))

        @register("GET", "/v1/fine_tuning/jobs/{job_id}/events")
        async def list_events(job_id: str, after: str | None = None, limit: int = 20):
            self.job(job_id)
            events, has_more = self.store.list_events(job_id, after, _limit(limit))
            return _list([event_json(e) for e in events], has_more)

        @register("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints")
        async def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
            job = self.job(job_id)
            checkpoints, has_more = self.store.list_checkpoints(job_id, after, _limit(limit))
            return _list([checkpoint_json(c, job) for c in checkpoints], has_more)

        @register("POST", "/v1/fine_tuning/jobs/{job_id}/cancel")
        async def cancel_job(job_id: str):
            job = self.job(job_id)
            if job.status in FINAL_STATES:
                raise ApiError(400, f"job {job_id} has already {job.status}", code="job_finished")
            return job_json(self.store.request_cancel(job_id))

    # --- the logic behind the routes ---------------------------------------------------------

    def file(self, file_id: str) -> FileRecord:
        record = self.store.get_file(file_id)
        if record is None:
            raise ApiError(404, f"no file with id {file_id!r}", param="file_id", code="not_found")
        return record

    def job(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise ApiError(404, f"no fine-tuning job with id {job_id!r}", code="not_found")
        return job

    def upload_file(self, filename: str, purpose: str, content: bytes) -> dict:
        if purpose not in FILE_PURPOSES:
            raise ApiError(400, f"purpose must be one of {list(FILE_PURPOSES)}", param="purpose")
        if purpose == "fine-tune":
            model = self.served_model()
            self.examples(content, model.limits.max_seq_length, "file", model)
        return file_json(self.store.add_file(filename, purpose, content))

    def examples(self, content: bytes, max_length: int, param: str, model: ServedModel) -> list:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the file is not UTF-8 text", param=param) from None
        try:
            return parse_jsonl_lines(text.splitlines(), model.tokenizer, max_length, "the file")
        except DatasetError as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_file") from None

    def training_data(self, file_id: Any, param: str, max_length: int, model: ServedModel):
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
        with open(record.path, "rb") as f:
            return self.examples(f.read(), max_length, param, model)

    def create_job(self, body: Any, model: ServedModel) -> Job:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") != model.name:
            raise ApiError(
                400,
                f"model {body.get('model')!r} is not served here; fine-tune {model.name!r}",
                param="model",
                code="model_not_found",
            )
        raw = body.get("hyperparameters")
        method = body.get("method") or {}
        if raw is None and isinstance(method, dict):
            raw = (method.get("supervised") or {}).get("hyperparameters")
        if raw is not None and not isinstance(raw, dict):
            raise ApiError(400, "hyperparameters must be an object", param="hyperparameters")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
            raise ApiError(400, "suffix: 1-64 letters, digits, '-' or '_'", param="suffix")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ApiError(400, "seed must be a non-negative integer", param="seed")

        # Resolve against the dataset's size, then check every line at that max length.
        limit = model.limits.max_seq_length
        examples = self.training_data(body.get("training_file"), "training_file", limit, model)
        try:
            resolved = hp.resolve(raw, len(examples), model.limits)
        except hp.InvalidParameter as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        if resolved.max_seq_length < limit:
            self.training_data(
                body["training_file"], "training_file", resolved.max_seq_length, model
            )
        validation_file = body.get("validation_file")
        if validation_file is not None:
            self.training_data(validation_file, "validation_file", resolved.max_seq_length, model)

        if suffix and self.store.adapter_name_taken(suffix):
            raise ApiError(400, f"suffix {suffix!r} is already used by another job", "suffix")
        return self.store.create_job(
            model=model.name,
            training_file=body["training_file"],
            validation_file=validation_file,
            suffix=suffix,
            hyperparameters=resolved.to_dict(),
            seed=seed,
            status=JobStatus.QUEUED,
        )


# --- OpenAI's JSON shapes ----------------------------------------------------------------------


def file_json(f: FileRecord) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def job_json(job: Job) -> dict:
    h = dict(job.hyperparameters)
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": "org-local",
        "result_files": [],
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": h,
        "method": {"type": "supervised", "supervised": {"hyperparameters": h}},
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "seed": job.seed,
        "estimated_finish": job.estimated_finish if job.status == "running" else None,
        "integrations": [],
        "user_provided_suffix": job.suffix,
        "step": job.step,
        "total_steps": job.total_steps,
    }


def event_json(e: Event) -> dict:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


def checkpoint_json(c: Checkpoint, job: Job) -> dict:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": checkpoint_model_name(job.model, job.adapter_name, c.step),
        "fine_tuning_job_id": c.job_id,
        "step_number": c.step,
        "metrics": c.metrics,
    }


def _list(data: list, has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE}", param="limit")
    return limit
