"""``/v1/fine_tuning/jobs`` behind its routes: admission of a new job, lookups, cancel.

A job is validated completely before it is written (the request, its files, the served model,
its hyperparameters, and every example's length against its max_seq_length), so a bad request
changes nothing. Its datasets were tokenized at upload (``datasets.py``): creating a job reads
their lengths and copies them, and tokenizes only a file that has no cache. It is then stored
as ``validating_files``, its tokenized datasets are written, and only then is it ``queued`` for
the schedulers. Runs in a worker thread: it waits on SQLite and reads files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from typing import Any

from sglang_harli.finetune.data import DatasetError, check_example_lengths
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.lifecycle import FINAL_STATES, JobStatus
from sglang_harli.jobs.store import Job, JobStore
from sglang_harli.srt import datasets, model_ids
from sglang_harli.srt.api_errors import ApiError, shown

logger = logging.getLogger(__name__)

SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JobService:
    def __init__(self, store: JobStore, tokenizers: datasets.Tokenizers, limits: hp.ServingLimits):
        self.store, self.tokenizers, self.limits = store, tokenizers, limits

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

    def dataset(self, file_id: Any, param: str, max_length: int) -> datasets.JobDataset:
        """A fine-tune file's examples: from its cache, else tokenized now."""
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
        source = f"the {param.replace('_', ' ')} {file_id}"
        cache = datasets.cache_path(self.store.files_dir, file_id)
        cached = datasets.load_cache(cache, self.tokenizers.identity())
        if cached is not None:
            _check_lengths(cached, max_length, source, param)  # a lower limit than at upload
            return cached
        try:  # no cache is written here: a refused job must leave the state dir as it was
            examples = datasets.tokenize_file(
                self.tokenizers, record.path, max_length, source, param
            )
        except FileNotFoundError:  # deleted since the lookup
            raise ApiError(400, f"no file with id {file_id!r}", param, "invalid_file") from None
        return datasets.JobDataset.of(examples)

    def create_job(self, body: Any) -> Job:
        """Validate everything, then store the job with its tokenized dataset, then queue it."""
        model = datasets.served_model(self.limits)
        request = check_job_request(body, model)
        ceiling = model.limits.max_example_tokens
        hp_param = request.hyperparameters_param
        try:  # types and ranges first: a bad value is refused before any file is read
            hp.resolve(request.hyperparameters, 1, model.limits, longest=1)
        except hp.InvalidParameter as exc:
            raise ApiError(400, str(exc), param=_param(exc.param, hp_param)) from None

        train = self.dataset(request.training_file, "training_file", ceiling)
        validation = None
        if request.validation_file is not None:
            validation = self.dataset(request.validation_file, "validation_file", ceiling)
        longest = max(d.longest for d in (train, validation) if d is not None)
        try:
            resolved = hp.resolve(request.hyperparameters, len(train), model.limits, longest)
        except hp.InvalidParameter as exc:
            raise ApiError(400, str(exc), param=_param(exc.param, hp_param)) from None
        for dataset, param in ((train, "training_file"), (validation, "validation_file")):
            if dataset is not None:  # an explicit max_seq_length below the longest example
                source = f"the {param.replace('_', ' ')}"
                _check_lengths(dataset, resolved.max_seq_length, source, param)
        # a suffix another job holds: create_job raises AdapterNameTaken (a 409), writing nothing
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
            train.write(self.store.dataset_path(job.id, "train"))
            if validation is not None:
                validation.write(self.store.dataset_path(job.id, "validation"))
        except FileNotFoundError:  # the file (and its cache) deleted meanwhile: said below
            pass
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


def _check_lengths(dataset: datasets.JobDataset, max_length: int, source: str, param: str) -> None:
    lines = [None if n < 0 else int(n) for n in dataset.lines]
    try:
        check_example_lengths(dataset.lengths.tolist(), lines, max_length, source)
    except DatasetError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_file") from None


# --- the request ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobRequest:
    training_file: Any
    validation_file: Any
    hyperparameters: dict[str, Any] | None
    hyperparameters_param: str  # where they came from, for error params
    suffix: str | None
    seed: int


def check_job_request(body: Any, model: datasets.ServedModel) -> JobRequest:
    """Everything in a create-job body that needs no file: a 400 for the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != model.name:
        raise ApiError(
            400,
            f"model {shown(body.get('model'))} is not served here; fine-tune {model.name!r}",
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
                f"got {shown(method.get('type'))}",
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
            400, f"seed must be an integer from 0 to {hp.MAX_SEED}, got {shown(seed)}", "seed"
        )
    validation_file = body.get("validation_file")
    return JobRequest(body.get("training_file"), validation_file, raw, where, suffix, seed)


def _param(param: str, prefix: str) -> str:
    """``hyperparameters.x`` as the client named its hyperparameters object."""
    return prefix + param.removeprefix("hyperparameters")
