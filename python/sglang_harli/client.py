"""A client for sglang-harli's own HTTP API: files, fine-tuning jobs, ``/harli/status`` and
``/harli/mode``.

One place that speaks the API for the CLI (``cli.py``), the profile tool, the benchmarks
(``bench/``, ``scripts/``) and the tests: a plain class over ``requests`` (the shape of
mini-sglang's benchmark client). It imports no torch and no SGLang, so it runs on any machine
that reaches the server.

Keys follow SGLang's rules: reads send ``api_key``; routes that write (upload, create, cancel,
``/harli/mode``) send ``admin_api_key`` if given, else ``api_key``. An https server with a
self-signed certificate is trusted through ``ca_cert`` (a file). Failures are typed, so a
caller can tell them apart: :class:`ApiError` (the server answered 4xx/5xx), :class:`Unreachable`
(nothing was sent: no connection, or the certificate could not be verified) and
:class:`TransportError` (the request was sent but the answer did not come: a read timeout or a
broken connection; whether it took effect is unknown).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import requests

from sglang_harli.jobs.lifecycle import FINAL_STATES

DEFAULT_TIMEOUT_S = 60.0
UPLOAD_CHUNK = 1 << 20  # bytes read from an uploaded file at a time: it is never held whole
# The co-run counters a benchmark or test differences between two status reads.
CORUN_COUNTERS = (
    "iterations",
    "within_slo",
    "misses_with_finetune",
    "finetune_s",
    "slack_s",
    "finetune_tokens",
)


class ClientError(Exception):
    """A request that did not succeed (one of the subclasses says how)."""


class ApiError(ClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Unreachable(ClientError):
    """Nothing reached the server: no connection, or its certificate could not be verified."""


class TransportError(ClientError):
    """The request went out but no answer came back (timed out, or the connection broke): it may
    or may not have taken effect."""


class JobNotTraining(ClientError):
    """A job ended, or made no progress in time, while the caller waited for it to train."""


def chat_jsonl(pairs: Iterable[tuple[str, str]]) -> str:
    """One chat example (a user turn, the assistant's answer) per pair, as JSONL text: the
    fine-tuning API's training file."""
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        + "\n"
        for q, a in pairs
    )


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class HarliClient:
    """sglang-harli's API at ``server`` (``http[s]://host:port``).

    ``timeout_s`` bounds connecting and each ordinary request's answer; an upload waits
    ``upload_timeout_s`` for its answer (default: as long as the server takes, since the server
    validates and tokenises the whole file before it answers, which takes minutes for a large
    one), and its body is streamed from the file, never held in memory whole.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        ca_cert: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        upload_timeout_s: float | None = None,
    ):
        self.base = server.rstrip("/")
        # an https server with a self-signed certificate: trust that certificate (a file)
        self.verify: str | bool = ca_cert or True
        # SGLang's rules: ordinary routes (reads) take api_key; with --admin-api-key on the
        # server, the routes that write or reveal data take that key instead
        self.headers = _bearer(api_key)
        self.write_headers = _bearer(admin_api_key or api_key)
        self.timeout_s = timeout_s
        self.upload_timeout_s = upload_timeout_s

    # --- transport -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        write: bool = False,
        timeout: float | tuple[float, float | None] | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The decoded JSON answer of one request; raises a :class:`ClientError` otherwise."""
        sent = {**(self.write_headers if write else self.headers), **(headers or {})}
        try:
            response = requests.request(
                method,
                self.base + path,
                headers=sent,
                timeout=self.timeout_s if timeout is None else timeout,
                verify=self.verify,
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise Unreachable(
                f"cannot verify the server's certificate at {self.base} ({exc.__class__.__name__});"
                " for a self-signed server pass --ca-cert CERT.pem"
            ) from None
        except requests.exceptions.ConnectTimeout:
            raise Unreachable(
                f"the server at {self.base} did not accept a connection in {self.timeout_s:g} s"
            ) from None
        except requests.exceptions.ReadTimeout:
            raise TransportError(
                f"{method} {path}: no answer from {self.base} within the timeout; the request "
                "may still take effect on the server"
            ) from None
        except requests.ConnectionError:
            raise Unreachable(f"cannot reach the server at {self.base}") from None
        except requests.RequestException as exc:
            raise TransportError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text}}
        if response.status_code >= 400:
            # ours and OpenAI's: {"error": {"message": ...}}; SGLang's 401: {"error": "..."}
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            raise ApiError(response.status_code, str(message or response.text))
        return body

    # --- models and files ----------------------------------------------------------------------

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models")["data"]

    def model_id(self) -> str:
        """The served base model's id (the first model listed)."""
        return self.models()[0]["id"]

    def upload(self, path: Path, purpose: str = "fine-tune") -> dict:
        """Upload a file, streamed from disk; returns the file object."""
        with open(path, "rb") as f:
            return self._upload(path.name, f, path.stat().st_size, purpose)

    def upload_bytes(self, name: str, data: bytes, purpose: str = "fine-tune") -> dict:
        return self._upload(name, io.BytesIO(data), len(data), purpose)

    def upload_chats(self, pairs: Iterable[tuple[str, str]], name: str = "chats.jsonl") -> dict:
        """A chat training file made of (question, answer) pairs, uploaded."""
        return self.upload_bytes(name, chat_jsonl(pairs).encode())

    def _upload(self, name: str, f: BinaryIO, size: int, purpose: str) -> dict:
        body = MultipartFile(name, f, size, purpose)
        return self.request(
            "POST",
            "/v1/files",
            write=True,
            data=body,
            headers={"Content-Type": body.content_type},
            timeout=(self.timeout_s, self.upload_timeout_s),
        )

    # --- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        model: str,
        training_file: str,
        hyperparameters: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict:
        """``fields``: the rest of the create body (suffix, seed, validation_file, ...)."""
        body = {"model": model, "training_file": training_file, **fields}
        if hyperparameters is not None:
            body["hyperparameters"] = hyperparameters
        return self.request("POST", "/v1/fine_tuning/jobs", write=True, json=body)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def jobs(self, limit: int = 20) -> list[dict]:
        return self.request("GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", write=True)

    def events(self, job_id: str, limit: int = 100) -> list[dict]:
        """Oldest first (the API pages newest first)."""
        page = self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit})
        return list(reversed(page["data"]))

    def checkpoints(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")["data"]

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> dict:
        """The job once it has ended (succeeded, failed or cancelled)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (job := self.job(job_id))["status"] not in FINAL_STATES:
            if deadline is not None and time.monotonic() > deadline:
                raise JobNotTraining(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)
        return job

    def wait_for_step(self, job_id: str, step: int = 1, timeout_s: float = 300) -> dict:
        """The job once ``step`` optimizer steps are done; raises if it ends or stalls first."""
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id))["step"] < step:
            if job["status"] in FINAL_STATES:
                raise JobNotTraining(f"job {job_id} ended before step {step}: {job}")
            if time.monotonic() > deadline:
                raise JobNotTraining(f"job {job_id} made no step {step} in {timeout_s} s: {job}")
            time.sleep(0.2)
        return job

    def start_training(
        self,
        model: str,
        pairs: Sequence[tuple[str, str]],
        n_epochs: int = 10_000,
        first_step_timeout_s: float = 300,
    ) -> dict:
        """A job on these chats, as the benchmarks and tests train one beside decode (many
        epochs: it runs until cancelled); returned once its first step is done."""
        upload = self.upload_chats(pairs, name="train.jsonl")
        job = self.create_job(model, upload["id"], {"n_epochs": n_epochs})
        return self.wait_for_step(job["id"], 1, first_step_timeout_s)

    # --- what the server measured --------------------------------------------------------------

    def status(self) -> dict:
        """``GET /harli/status`` as it is."""
        return self.request("GET", "/harli/status")

    def scheduler(self) -> dict | None:
        """The first scheduler's status (TP rank 0), or None when the server runs none
        (``--harli-mode off``)."""
        schedulers = self.status().get("schedulers") or []
        return schedulers[0] if schedulers else None

    def corun(self) -> dict | None:
        """The first scheduler's co-run counters (cumulative), or None without a scheduler."""
        scheduler = self.scheduler()
        return None if scheduler is None else scheduler["corun"]

    # --- runtime control -----------------------------------------------------------------------

    def set_mode(
        self,
        mode: str | None = None,
        *,
        tpot_slo_ms: float | str | None = None,
        slo_margin: float | None = None,
        static_share: float | None = None,
        finetune_budget_ms: float | None = None,
    ) -> dict:
        """``POST /harli/mode``: switch the co-run settings given (the others stay), in force
        from the server's next decode iteration. ``tpot_slo_ms`` may be ``"auto"``. Returns the
        settings in force (``control``) and the objective (``objective``); a bad value is an
        :class:`ApiError` (400) and changes nothing."""
        body = {
            name: value
            for name, value in (
                ("mode", mode),
                ("tpot_slo_ms", tpot_slo_ms),
                ("slo_margin", slo_margin),
                ("static_share", static_share),
                ("finetune_budget_ms", finetune_budget_ms),
            )
            if value is not None
        }
        return self.request("POST", "/harli/mode", write=True, json=body)

    def control(self) -> dict | None:
        """The first scheduler's settings in force and their switches (``control``), or None
        without a scheduler."""
        scheduler = self.scheduler()
        return None if scheduler is None else scheduler["control"]


def corun_delta(before: dict, after: dict) -> dict:
    """What happened between two reads of the co-run counters, with the attainment (iterations
    within the objective) and the share of the slack finetune used."""
    d = {k: after[k] - before[k] for k in CORUN_COUNTERS}
    d["attainment"] = d["within_slo"] / max(d["iterations"], 1)
    d["slack_used"] = d["finetune_s"] / max(d["slack_s"], 1e-9)
    return d


class MultipartFile:
    """A ``multipart/form-data`` body (the purpose field, then the file) read from the file as it
    is sent: ``requests`` would build the whole body in memory from ``files=``. Its length is
    known, so the request carries a Content-Length."""

    def __init__(self, name: str, f: BinaryIO, size: int, purpose: str):
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        # a quote or line break in the name would end the header: percent-encode them
        safe = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        self._parts: Iterator[bytes] = self._chunks(head, f, tail)
        self._length = len(head) + size + len(tail)
        self._pending = b""

    @staticmethod
    def _chunks(head: bytes, f: BinaryIO, tail: bytes) -> Iterator[bytes]:
        yield head
        while chunk := f.read(UPLOAD_CHUNK):
            yield chunk
        yield tail

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        if self._pending:
            yield self._pending
            self._pending = b""
        yield from self._parts

    def read(self, size: int = -1) -> bytes:
        out = [self._pending]
        have = len(self._pending)
        while size < 0 or have < size:
            chunk = next(self._parts, None)
            if chunk is None:
                break
            out.append(chunk)
            have += len(chunk)
        data = b"".join(out)
        if size < 0:
            self._pending = b""
            return data
        self._pending = data[size:]
        return data[:size]


__all__ = [
    "CORUN_COUNTERS",
    "ApiError",
    "ClientError",
    "HarliClient",
    "JobNotTraining",
    "MultipartFile",
    "TransportError",
    "Unreachable",
    "chat_jsonl",
    "corun_delta",
]
