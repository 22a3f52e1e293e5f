"""``/v1/files`` behind its routes: uploads (received, checked, stored), content and delete.

An upload is bounded at every step, so that no number of clients, however slow or hostile,
takes the serving process down with it:

- at most ``max_in_flight`` uploads are received at once (each holds a socket and a temporary
  file): one more gets 503 with Retry-After before any of its body is read or a file is opened;
- a body that sends nothing for ``idle_timeout_s`` is cut off with 408 (``uploads.py``);
- the body streams to a temporary file within the size cap (413 beyond);
- a fine-tune file is checked as it is read back from that file, a line at a time, each line
  refused before it is parsed or rendered if max length could never hold it
  (``finetune.data``), with its own copy of the tokenizer, at most ``TOKENIZING_AT_ONCE`` at
  once (``datasets.py``; 503 beyond);
- a store that cannot take the row now (another writer's lock held past the timeout) is a 503
  (the routes' one mapping of store failures, ``http_api._route``)
  with Retry-After: nothing was stored, the client tries again.

The tokenized examples are kept beside the stored file for job creation (``datasets.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from sglang_harli import durable
from sglang_harli.finetune.data import TokenizedDataset
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.jobs.store import FileInUseError, FileRecord, JobStore
from sglang_harli.srt import datasets, uploads
from sglang_harli.srt.api_errors import ApiError, busy

logger = logging.getLogger(__name__)

FILE_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "vision", "evals")
# multipart framing around the file (boundaries, part headers, the purpose field): a declared
# Content-Length beyond the cap by more than this cannot hold an acceptable file
MULTIPART_SLACK = 64 * 1024
READ_BYTES = 1 << 20


class FileService:
    def __init__(
        self,
        store: JobStore,
        tokenizers: datasets.Tokenizers,
        limits: hp.ServingLimits,
        max_upload_bytes: int,
        max_in_flight: int,
        idle_timeout_s: float | None,
    ):
        self.store, self.tokenizers, self.limits = store, tokenizers, limits
        self.max_upload_bytes, self.max_in_flight = max_upload_bytes, max_in_flight
        self.idle_timeout_s = idle_timeout_s
        self.in_flight = 0  # uploads being received or checked; counted on the event loop

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
        if self.in_flight >= self.max_in_flight:
            raise busy(
                f"{self.max_in_flight} uploads are in progress already "
                "(--harli-max-uploads-in-flight); try again shortly",
                code="server_busy",
            )
        self.in_flight += 1
        tmp = self.store.upload_path()
        try:
            try:
                received = await uploads.receive(
                    request.stream(),
                    request.headers.get("content-type", ""),
                    tmp,
                    self.max_upload_bytes,
                    idle_timeout_s=self.idle_timeout_s,
                )
            except uploads.UploadRefused as exc:
                raise ApiError(exc.status, exc.message, exc.param, exc.code) from None
            purpose = received.fields.get("purpose")
            if purpose not in FILE_PURPOSES:
                raise ApiError(400, f"purpose must be one of {list(FILE_PURPOSES)}", "purpose")
            if received.filename is None:
                raise ApiError(400, "the upload has no 'file' part", param="file")
            dataset = None
            if purpose == "fine-tune":
                dataset = await run_in_threadpool(self.check_dataset_file, tmp)
            return await run_in_threadpool(self.add_file, received.filename, purpose, tmp, dataset)
        finally:  # moved into place on success; nothing is left of a refused upload
            self.in_flight -= 1
            await run_in_threadpool(tmp.unlink, True)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the file is larger than this server accepts ({self.max_upload_bytes / 2**20:g} "
            "MB, --harli-max-upload-mb)",
            param="file",
            code="file_too_large",
        )

    def check_dataset_file(self, path: Path) -> TokenizedDataset:
        max_length = datasets.served_model(self.limits).limits.max_example_tokens
        return datasets.tokenize_file(self.tokenizers, path, max_length, "the file", "file")

    def add_file(
        self, filename: str, purpose: str, tmp: Path, dataset: TokenizedDataset | None
    ) -> FileRecord:
        """Store the checked upload, then its tokenized examples beside it."""
        # a store locked past its timeout raises here: the route answers a retryable 503
        record = self.store.add_file(filename, purpose, tmp)
        if dataset is not None:
            path = datasets.cache_path(self.store.files_dir, record.id)
            datasets.save_cache(path, dataset, self.tokenizers.identity())
            if self.store.get_file(record.id) is None:  # deleted meanwhile: no orphan cache
                path.unlink(missing_ok=True)
        return record

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
        datasets.cache_path(self.store.files_dir, file_id).unlink(missing_ok=True)
        durable.fsync_dir(self.store.files_dir)
