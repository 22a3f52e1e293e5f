"""``multipart/form-data`` uploads streamed to disk, stopping at a size cap.

FastAPI's ``UploadFile`` receives the whole body (into memory, then a temporary file outside
the state dir) before a route runs, so a client could send any amount. Here the file part goes
straight to a file the caller names, chunk by chunk as it arrives; the upload is refused with
:class:`UploadRefused` (413) as soon as it passes the cap, and (408) when the client sends
nothing for ``idle_timeout_s``: a stalled body must not hold its socket and temporary file
forever. Parsing runs on the event loop (a few microseconds per network chunk); disk writes run
in a worker thread, a megabyte at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    parse_options_header,
)
from starlette.concurrency import run_in_threadpool

WRITE_BYTES = 1 << 20  # file data is handed to a writer thread in pieces of about this size
MAX_FIELD_BYTES = 4096  # a form field (purpose) is a short string
MAX_PARTS = 16
MAX_HEADER_BYTES = 16384  # per part


class UploadRefused(Exception):
    """The request cannot be stored: ``status`` (400, 408 or 413) and a message for the client."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclasses.dataclass
class Upload:
    """What a multipart body held besides the file's bytes (written to the destination)."""

    filename: str | None = None  # None: no file part came
    size: int = 0
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


def boundary_of(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRefused(
            400, "the body must be multipart/form-data, with a 'file' part and a 'purpose' field"
        )
    boundary = params[b"boundary"]
    if len(boundary) > MAX_BOUNDARY_LENGTH:  # python-multipart's own limit (RFC 2046 says 70)
        raise UploadRefused(
            400,
            f"the multipart boundary is {len(boundary)} characters long; at most "
            f"{MAX_BOUNDARY_LENGTH} are accepted (RFC 2046 allows 70)",
        )
    return boundary


async def receive(
    chunks: AsyncIterator[bytes],
    content_type: str,
    destination: Path,
    max_bytes: int,
    file_field: str = "file",
    idle_timeout_s: float | None = None,
) -> Upload:
    """Parse the body from ``chunks``; the part named ``file_field`` is written (fsynced) to
    ``destination``, which the caller removes if this raises. A wait of more than
    ``idle_timeout_s`` for the next chunk ends the upload (408)."""
    parts = _Parts(file_field, max_bytes)
    parser = MultipartParser(boundary_of(content_type), parts.callbacks())
    out: BinaryIO = await run_in_threadpool(open, destination, "wb")
    try:
        async for chunk in _timed(chunks, idle_timeout_s):
            parser.write(chunk)
            if len(parts.pending) >= WRITE_BYTES:
                await run_in_threadpool(out.write, parts.take())
        parser.finalize()
        if not parts.finished:
            raise UploadRefused(400, "the multipart body ends before its closing boundary")
        await run_in_threadpool(_finish, out, parts.take())
    except FormParserError as exc:
        raise UploadRefused(400, f"malformed multipart body ({exc})") from None
    finally:
        await run_in_threadpool(out.close)
    return parts.upload


async def _timed(
    chunks: AsyncIterator[bytes], idle_timeout_s: float | None
) -> AsyncIterator[bytes]:
    """``chunks``, each awaited at most ``idle_timeout_s`` (None: for ever)."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadRefused(
                408,
                f"the upload's body stalled: nothing arrived for {idle_timeout_s:g} s "
                "(--harli-upload-timeout-s)",
                param="file",
                code="upload_timeout",
            ) from None
        yield chunk


def _finish(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    out.flush()
    os.fsync(out.fileno())  # the store renames it into place: durable before its row exists


class _Parts:
    """python-multipart callbacks: the file part's bytes are queued in ``pending``."""

    def __init__(self, file_field: str, max_bytes: int):
        self.file_field, self.max_bytes = file_field, max_bytes
        self.upload = Upload()
        self.pending = bytearray()
        self.finished = False
        self._count = 0
        self._header_bytes = 0
        self._name, self._value = b"", b""
        self._disposition = b""
        self._in_file = False
        self._field: bytearray | None = None
        self._field_name = ""

    def take(self) -> bytes:
        data, self.pending = bytes(self.pending), bytearray()
        return data

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._count += 1
        if self._count > MAX_PARTS:
            raise UploadRefused(400, f"too many form parts (at most {MAX_PARTS})")
        self._header_bytes, self._disposition = 0, b""
        self._in_file, self._field = False, None

    def _header_data(self, data: bytes, start: int, end: int) -> bytes:
        self._header_bytes += end - start
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UploadRefused(400, "a form part's headers are too long")
        return data[start:end]

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += self._header_data(data, start, end)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += self._header_data(data, start, end)

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == self.file_field:
            if self.upload.filename is not None:
                raise UploadRefused(400, "more than one file in the upload", param="file")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.upload.filename = os.path.basename(filename.replace("\\", "/")) or "upload"
            self._in_file = True
        else:
            self._field, self._field_name = bytearray(), name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise UploadRefused(
                    413,
                    f"the file is larger than this server accepts ({_megabytes(self.max_bytes)}, "
                    "--harli-max-upload-mb)",
                    param="file",
                    code="file_too_large",
                )
            self.pending += data[start:end]
        elif self._field is not None:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise UploadRefused(400, f"form field {self._field_name!r} is too long")

    def on_part_end(self) -> None:
        if self._field is not None:
            try:
                self.upload.fields[self._field_name] = self._field.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadRefused(
                    400, f"form field {self._field_name!r} is not UTF-8", param=self._field_name
                ) from None
        self._in_file, self._field = False, None

    def on_end(self) -> None:
        self.finished = True


def _megabytes(n: int) -> str:
    return f"{n / 2**20:g} MB"
