"""Files in the job store (paths, pages, deletion guarded by jobs) and streamed uploads."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from sglang_harli.jobs.lifecycle import JobStatus
from sglang_harli.jobs.store import FileInUseError, JobStore
from sglang_harli.srt import uploads
from sglang_harli.srt.api_errors import ApiError


def test_paths_are_stored_relative_and_read_back_absolute(tmp_path):
    store = JobStore(tmp_path / "state")
    record = store.add_file("train.jsonl", "fine-tune", b"abc")
    with sqlite3.connect(store.db_path) as db:
        (stored,) = db.execute("SELECT path FROM files WHERE id = ?", (record.id,)).fetchone()
    assert stored == f"files/{record.id}"
    assert store.get_file(record.id).path == str(tmp_path / "state" / "files" / record.id)

    moved = tmp_path / "moved"
    (tmp_path / "state").rename(moved)  # a state dir that moved keeps its files
    again = JobStore(moved).get_file(record.id)
    assert open(again.path, "rb").read() == b"abc" and again.bytes == 3


def test_rows_with_absolute_paths_are_still_read(tmp_path):
    store = JobStore(tmp_path)
    record = store.add_file("old.jsonl", "batch", b"old")
    with sqlite3.connect(store.db_path) as db:  # as the store wrote them before
        db.execute("UPDATE files SET path = ? WHERE id = ?", (record.path, record.id))
    assert open(store.get_file(record.id).path, "rb").read() == b"old"
    assert store.delete_file(record.id) and not (tmp_path / "files" / record.id).exists()


def test_a_written_upload_is_moved_into_place(tmp_path):
    store = JobStore(tmp_path)
    tmp = store.upload_path()
    tmp.write_bytes(b"streamed")
    record = store.add_file("up.jsonl", "fine-tune", tmp)
    assert not tmp.exists() and record.bytes == 8
    assert open(record.path, "rb").read() == b"streamed"
    assert tmp.parent == store.files_dir and ".tmp-" in tmp.name  # a restart clears leftovers


def test_files_page_newest_first(tmp_path):
    store = JobStore(tmp_path)
    ids = [
        store.add_file(f"{i}.jsonl", "fine-tune" if i % 2 else "batch", b"x").id for i in range(5)
    ]
    newest = ids[::-1]
    assert [f.id for f in store.list_files()] == newest
    assert [f.id for f in store.list_files(limit=2)] == newest[:2]
    assert [f.id for f in store.list_files(after=newest[1], limit=2)] == newest[2:4]
    assert [f.id for f in store.list_files(after=newest[3])] == newest[4:]
    assert [f.id for f in store.list_files("fine-tune")] == [ids[3], ids[1]]
    assert [f.id for f in store.list_files("fine-tune", after=ids[3])] == [ids[1]]


@pytest.mark.parametrize("status", ["validating_files", "queued", "running"])
@pytest.mark.parametrize("role", ["training_file", "validation_file"])
def test_a_file_an_unfinished_job_needs_cannot_be_deleted(tmp_path, status, role):
    store = JobStore(tmp_path)
    needed = store.add_file("train.jsonl", "fine-tune", b"x")
    other = store.add_file("other.jsonl", "fine-tune", b"y")
    files = {"training_file": other.id, "validation_file": None, role: needed.id}
    job = store.create_job("m", hyperparameters={}, seed=0, status=JobStatus(status), **files)
    with pytest.raises(FileInUseError) as refused:
        store.delete_file(needed.id)
    assert refused.value.job_ids == [job.id]
    assert store.get_file(needed.id) is not None and open(needed.path, "rb").read() == b"x"

    store.set_status(job.id, JobStatus.CANCELLED)  # once it is over, the file may go
    assert store.delete_file(needed.id) and store.get_file(needed.id) is None


# --- streamed multipart uploads ------------------------------------------------------------

BOUNDARY = "harli-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(fields: dict[str, str], file: bytes | None, filename: str = "train.jsonl") -> bytes:
    out = b""
    for name, value in fields.items():
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    if file is not None:
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        out += file + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def receive(body: bytes, destination, max_bytes: int, content_type=None, chunk: int = 1000):
    """Feed ``body`` in chunks as a server would; returns the upload and the bytes consumed."""
    consumed = [0]

    async def chunks():
        for i in range(0, len(body), chunk):
            consumed[0] += len(body[i : i + chunk])
            yield body[i : i + chunk]

    try:
        upload = asyncio.run(
            uploads.receive(chunks(), content_type or CONTENT_TYPE, destination, max_bytes)
        )
    except uploads.UploadRefused as exc:
        exc.consumed = consumed[0]
        raise
    return upload, consumed[0]


def test_the_file_part_streams_to_the_destination(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one write piece
    destination = tmp_path / "upload"
    upload, _ = receive(multipart({"purpose": "fine-tune"}, data), destination, 2 * len(data))
    assert upload.filename == "train.jsonl" and upload.size == len(data)
    assert upload.fields == {"purpose": "fine-tune"}
    assert destination.read_bytes() == data


def test_an_upload_past_the_cap_stops_reading_there(tmp_path):
    body = multipart({"purpose": "fine-tune"}, b"x" * 100_000)
    with pytest.raises(uploads.UploadRefused) as refused:
        receive(body, tmp_path / "upload", max_bytes=10_000)
    assert refused.value.status == 413 and refused.value.code == "file_too_large"
    assert "--harli-max-upload-mb" in refused.value.message
    assert refused.value.consumed < 12_000  # within a chunk of the cap, not the whole body


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        (b"not multipart", "application/json", 400),
        (b"--x\r\n", "multipart/form-data", 400),  # no boundary
        (multipart({"purpose": "fine-tune"}, b"abc")[:-10], None, 400),  # cut short
        (multipart({"purpose": "p" * 5000}, b"abc"), None, 400),  # field too long
        (multipart({f"f{i}": "v" for i in range(20)}, b"abc"), None, 400),  # too many parts
    ],
)
def test_malformed_bodies_are_400(tmp_path, body, content_type, status):
    with pytest.raises(uploads.UploadRefused) as refused:
        receive(body, tmp_path / "upload", 1 << 20, content_type=content_type)
    assert refused.value.status == status and refused.value.message


def test_the_filename_keeps_its_last_component(tmp_path):
    body = multipart({"purpose": "batch"}, b"abc", filename="C:\\\\data\\\\train.jsonl")
    upload, _ = receive(body, tmp_path / "upload", 1 << 20)
    assert upload.filename == "train.jsonl"


def test_a_boundary_past_the_parsers_limit_is_a_400_that_says_so(tmp_path):
    long = "b" * 300  # python-multipart refuses more than 256; it used to escape as a 500
    with pytest.raises(uploads.UploadRefused) as refused:
        receive(b"--x\r\n", tmp_path / "upload", 1 << 20, f"multipart/form-data; boundary={long}")
    assert refused.value.status == 400 and "boundary is 300 characters" in refused.value.message


def test_a_stalled_body_is_cut_off_with_408(tmp_path):
    async def stalls():
        yield multipart({"purpose": "batch"}, b"abc")[:50]
        await asyncio.sleep(30)

    async def run():
        return await uploads.receive(
            stalls(), CONTENT_TYPE, tmp_path / "upload", 1 << 20, idle_timeout_s=0.2
        )

    with pytest.raises(uploads.UploadRefused) as refused:
        asyncio.run(asyncio.wait_for(run(), 10))
    assert refused.value.status == 408 and "--harli-upload-timeout-s" in refused.value.message


# --- the upload route on SGLang's app (FastAPI), with a real SQLite store -------------------


@pytest.fixture
def api(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sglang_harli.jobs.hyperparameters import ServingLimits
    from sglang_harli.srt.http_api import FineTuningApi

    store = JobStore(tmp_path / "state", busy_timeout_ms=200)
    app = FastAPI()
    FineTuningApi(store, ServingLimits(max_lora_rank=8), max_upload_bytes=1 << 20).mount(app)
    with TestClient(app) as client:
        yield store, client


def test_an_upload_while_the_store_is_locked_is_a_retryable_503(api):
    store, client = api
    holder = sqlite3.connect(store.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the timeout
    try:
        response = client.post(
            "/v1/files", files={"file": ("a.bin", b"abc")}, data={"purpose": "batch"}
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "store_busy"
    assert store.list_files() == [] and not list(store.files_dir.iterdir())  # nothing stored
    response = client.post(
        "/v1/files", files={"file": ("a.bin", b"abc")}, data={"purpose": "batch"}
    )
    assert response.status_code == 200, response.text  # the retry is stored


def test_a_long_boundary_on_the_route_is_a_400(api):
    _, client = api
    response = client.post(
        "/v1/files",
        content=b"--x\r\n",
        headers={"content-type": "multipart/form-data; boundary=" + "b" * 300},
    )
    assert response.status_code == 400, response.text
    assert "boundary" in response.json()["error"]["message"]


# --- a dataset tokenized once: at upload, kept beside the file for job creation -------------


def test_a_datasets_tokens_are_kept_at_upload_and_used_by_job_creation(tmp_path, tiny_model_dir):
    import transformers

    from sglang_harli.finetune.data import load_examples
    from sglang_harli.jobs.hyperparameters import ServingLimits
    from sglang_harli.srt import datasets
    from sglang_harli.srt.serving_files import FileService
    from sglang_harli.srt.serving_jobs import JobService

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    store, tokenizers = JobStore(tmp_path / "state"), datasets.Tokenizers(served=tokenizer)
    limits = ServingLimits(max_lora_rank=8)
    files = FileService(store, tokenizers, limits, 1 << 20, max_in_flight=4, idle_timeout_s=1)
    jobs = JobService(store, tokenizers, limits)
    lines = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "1 + 1 =", "completion": " 2"}]
    upload = store.upload_path()
    upload.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    checked = datasets.tokenize_file(tokenizers, upload, 64, "the file", "file")
    record = files.add_file("train.jsonl", "fine-tune", upload, checked)
    cache = datasets.cache_path(store.files_dir, record.id)
    assert cache.is_file()

    # the stored file is not read again: job creation takes the lengths from the cache...
    Path(record.path).write_text("not JSON any more\n")
    dataset = jobs.dataset(record.id, "training_file", 64)
    assert dataset.cached == cache and len(dataset) == 2 and dataset.longest > 3
    with pytest.raises(ApiError, match="too long"):  # a job's lower max_seq_length
        jobs.dataset(record.id, "training_file", 3)
    # ...and copies it as the job's dataset
    dataset.write(tmp_path / "train.npz")
    assert load_examples(tmp_path / "train.npz") == checked.examples()

    # without a cache (an older version's upload), the file is tokenized then
    cache.unlink()
    Path(record.path).write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    fresh = jobs.dataset(record.id, "training_file", 64)
    assert fresh.cached is None and fresh.tokenized.examples() == checked.examples()
    assert not cache.exists()  # a job being validated writes nothing of the file's

    files.delete_file(record.id)  # the cache goes with its file
    assert not list(store.files_dir.iterdir())


def test_datasets_checked_at_once_are_capped_with_a_retryable_503(tiny_model_dir):
    import transformers

    from sglang_harli.srt import datasets

    tokenizers = datasets.Tokenizers(
        size=2, served=transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    )
    with tokenizers.borrow() as first, tokenizers.borrow() as second:
        assert first is not second  # each dataset has its own copy
        with pytest.raises(ApiError) as busy, tokenizers.borrow():
            pass
        assert busy.value.status == 503 and int(busy.value.headers["Retry-After"]) > 0
    with tokenizers.borrow() as again:  # given back
        assert again in (first, second)
