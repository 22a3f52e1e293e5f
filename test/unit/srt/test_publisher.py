"""The adapter publisher without SGLang: the address it dials, the certificate it trusts, and
what a job becomes when loading its adapter fails, against small HTTP(S) servers started here
that answer ``/load_lora_adapter`` the way SGLang does (its status codes and error bodies)."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sglang_harli.jobs.lifecycle import JobStatus
from sglang_harli.jobs.store import JobStore
from sglang_harli.srt.loopback import ServerEndpoint, error_message, server_url
from sglang_harli.srt.publisher import AdapterPublisher, RetryPolicy

FAST = RetryPolicy(attempts=3, first_delay_s=0.01, max_delay_s=0.05, timeout_s=5)


def self_signed_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1: (cert, key) PEM paths.

    With the ``cryptography`` package when it is installed, else with the ``openssl`` CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key),
             "-out", str(cert), "-addext",
             "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


# --- the address and the trust -------------------------------------------------------------


@pytest.mark.parametrize(
    "host, tls, url",
    [
        ("127.0.0.1", False, "http://127.0.0.1:30000"),
        ("0.0.0.0", False, "http://127.0.0.1:30000"),  # a wildcard bind is dialled on loopback
        ("", True, "https://127.0.0.1:30000"),
        (None, False, "http://127.0.0.1:30000"),
        ("::", True, "https://[::1]:30000"),
        ("::1", False, "http://[::1]:30000"),
        ("[::1]", False, "http://[::1]:30000"),
        ("fd00::5", True, "https://[fd00::5]:30000"),
        ("10.1.2.3", True, "https://10.1.2.3:30000"),
        ("decode-7.internal", True, "https://decode-7.internal:30000"),
    ],
)
def test_server_url(host, tls, url):
    assert server_url(host, 30000, tls) == url


def server_args(**given):
    fields = dict(
        host="0.0.0.0", port=30000, ssl_certfile=None, ssl_ca_certs=None,
        api_key=None, admin_api_key=None,
    )  # fmt: skip
    return SimpleNamespace(**{**fields, **given})


def test_endpoint_follows_the_server_flags():
    plain = ServerEndpoint.from_server_args(server_args())
    assert plain == ServerEndpoint("http://127.0.0.1:30000")
    assert plain.ssl_context() is None

    tls = ServerEndpoint.from_server_args(server_args(host="::", ssl_certfile="/c.pem"))
    assert (tls.url, tls.pinned_cert, tls.ca_file) == ("https://[::1]:30000", "/c.pem", None)

    with_ca = ServerEndpoint.from_server_args(server_args(ssl_certfile="/c", ssl_ca_certs="/ca"))
    assert (with_ca.pinned_cert, with_ca.ca_file) == (None, "/ca")

    # /load_lora_adapter is an admin route: the admin key when there is one, else the api key
    assert ServerEndpoint.from_server_args(server_args(api_key="k")).bearer == "k"
    both = server_args(api_key="k", admin_api_key="admin")
    assert ServerEndpoint.from_server_args(both).bearer == "admin"


def test_error_message_reads_every_sglang_error_shape():
    refusal = {"success": False, "error_message": "rank 32 is too large", "loaded_adapters": None}
    assert error_message(refusal) == "rank 32 is too large"
    assert error_message({"error": "Unauthorized"}) == "Unauthorized"
    assert error_message({"error": {"message": "bad", "code": 400}}) == "bad"
    assert error_message({"detail": [{"msg": "field required"}]}) == "[{'msg': 'field required'}]"
    assert error_message("<html>Bad Gateway</html>\n") == "<html>Bad Gateway</html>"
    assert error_message(None) is None


# --- a small server that answers /load_lora_adapter ----------------------------------------


class LoadServer:
    """Answers each POST with the next of ``answers`` (status, JSON body or text, delay s),
    the last one for ever; per adapter name when ``answers`` is a dict. Records requests."""

    def __init__(self, answers, tls: tuple[Path, Path] | None = None):
        self.answers = answers
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                script = outer.answers
                if isinstance(script, dict):
                    script = script[body["lora_name"]]
                count = sum(r["body"]["lora_name"] == body["lora_name"] for r in outer.requests)
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status, answer, delay = script[min(count, len(script) - 1)]
                time.sleep(delay)
                raw = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


LOADED = (200, {"success": True, "error_message": None, "loaded_adapters": {}}, 0)


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "state")


def finished_training(store: JobStore, suffix: str = "demo", model: str = "base-model") -> str:
    """A job whose adapter is written: running, waiting for the publisher."""
    job = store.create_job(model, "file-x", {}, 0, suffix=suffix, status=JobStatus.QUEUED)
    assert store.set_status(job.id, JobStatus.RUNNING)
    adapter = store.job_dir(job.id) / "adapter"
    adapter.mkdir(parents=True)
    store.update_progress(job.id, adapter_path=store.relative(adapter))
    return job.id


def publish_until_final(store, endpoint, job_ids, policy=FAST, timeout_s=15.0):
    """Publisher passes until none of ``job_ids`` is running any more; their final records."""
    if isinstance(endpoint, str):
        endpoint = ServerEndpoint(endpoint)
    publisher = AdapterPublisher(store, endpoint, policy=policy)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        publisher.publish_pending()
        jobs = [store.get_job(j) for j in job_ids]
        if all(j.status != JobStatus.RUNNING for j in jobs):
            return jobs
        time.sleep(0.01)
    raise TimeoutError([j.status for j in jobs])


@pytest.fixture
def serve():
    servers = []

    def start(answers, tls=None) -> LoadServer:
        servers.append(LoadServer(answers, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_transient_failures_are_tried_again_then_the_job_succeeds(store, serve):
    server = serve([(503, "<html>Service Unavailable</html>", 0), (500, {"error": "x"}, 0), LOADED])
    job_id = finished_training(store)
    endpoint = ServerEndpoint(server.url, bearer="admin-key")
    [job] = publish_until_final(store, endpoint, [job_id])
    assert job.status == JobStatus.SUCCEEDED
    assert job.fine_tuned_model == "base-model:demo"
    assert len(server.requests) == 3
    request = server.requests[-1]
    assert request["path"] == "/load_lora_adapter"
    assert request["headers"]["Authorization"] == "Bearer admin-key"
    assert request["body"]["lora_name"] == "demo"
    assert Path(request["body"]["lora_path"]) == (store.job_dir(job_id) / "adapter").resolve()


def test_a_server_error_that_persists_fails_the_job_after_bounded_tries(store, serve):
    server = serve([(500, {"error": {"message": "CUDA out of memory"}}, 0)])
    job_id = finished_training(store)
    [job] = publish_until_final(store, server.url, [job_id])
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "adapter_load_failed"
    assert "CUDA out of memory" in job.error["message"] and "after 3 tries" in job.error["message"]
    assert len(server.requests) == FAST.attempts
    events, _ = store.list_events(job_id)
    assert events[0].level == "error" and "could not be loaded for serving" in events[0].message


def test_sglang_refusing_the_adapter_fails_the_job_at_once_with_its_reason(store, serve):
    reason = "LoRA adapter demo with rank 32 is incompatible with the current LoRA memory pool"
    server = serve([(400, {"success": False, "error_message": reason, "loaded_adapters": None}, 0)])
    job_id = finished_training(store)
    [job] = publish_until_final(store, server.url, [job_id])
    assert job.status == JobStatus.FAILED
    assert reason in job.error["message"]
    assert len(server.requests) == 1


def test_a_refused_key_fails_the_job_at_once(store, serve):
    server = serve([(401, {"error": "Unauthorized"}, 0)])
    job_id = finished_training(store)
    [job] = publish_until_final(store, server.url, [job_id])
    assert "refused the publisher's key (401: Unauthorized)" in job.error["message"]
    assert len(server.requests) == 1


def test_an_unreachable_server_fails_the_job_after_bounded_tries(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    job_id = finished_training(store)
    endpoint = ServerEndpoint(f"http://127.0.0.1:{port}")
    [job] = publish_until_final(store, endpoint, [job_id])
    assert job.status == JobStatus.FAILED
    assert f"cannot reach http://127.0.0.1:{port}" in job.error["message"]
    assert "after 3 tries" in job.error["message"]


def test_a_lost_answer_then_already_loaded_counts_as_loaded(store, serve):
    message = "Failed to load LoRA adapter demo because it is already loaded"  # SGLang's words
    already = {"success": False, "error_message": message}
    server = serve([(200, LOADED[1], 1.0), (400, already, 0)])  # the first answer comes too late
    job_id = finished_training(store)
    policy = RetryPolicy(attempts=3, first_delay_s=0.01, timeout_s=0.3)
    [job] = publish_until_final(store, server.url, [job_id], policy)
    assert job.status == JobStatus.SUCCEEDED
    assert len(server.requests) == 2


def test_one_adapter_being_retried_does_not_hold_up_another(store, serve):
    server = serve({"slow": [(503, "busy", 0)], "fast": [LOADED]})
    slow, fast = finished_training(store, "slow"), finished_training(store, "fast")
    policy = RetryPolicy(attempts=3, first_delay_s=1.0, timeout_s=5)
    publisher = AdapterPublisher(store, ServerEndpoint(server.url), policy=policy)
    publisher.publish_pending()  # slow fails once and waits 1 s; fast is loaded meanwhile
    assert store.get_job(fast).status == JobStatus.SUCCEEDED
    assert store.get_job(slow).status == JobStatus.RUNNING


def test_an_earlier_adapter_that_cannot_come_back_leaves_its_job_succeeded(store, serve):
    server = serve([(400, {"success": False, "error_message": "adapter files are gone"}, 0)])
    job_id = finished_training(store)
    store.set_status(job_id, JobStatus.SUCCEEDED, fine_tuned_model="base-model:demo")
    publisher = AdapterPublisher(store, ServerEndpoint(server.url), policy=FAST)
    for _ in range(3):
        publisher.publish_pending()
    assert store.get_job(job_id).status == JobStatus.SUCCEEDED
    assert len(server.requests) == 1  # given up, not tried on every pass
    events, _ = store.list_events(job_id)
    assert "after a restart: adapter files are gone" in events[0].message


def test_tls_trusts_the_servers_own_certificate_and_no_other(store, serve, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    other, _ = self_signed_cert(tmp_path, "other")
    server = serve([LOADED], tls=(cert, key))
    bad = finished_training(store, "bad")
    endpoint = ServerEndpoint(server.url, pinned_cert=str(other))
    [job] = publish_until_final(store, endpoint, [bad])
    assert job.status == JobStatus.FAILED
    assert "TLS certificate is not trusted" in job.error["message"]
    assert server.requests == []  # refused in the handshake, and not tried again

    good = finished_training(store, "good")
    endpoint = ServerEndpoint(server.url, pinned_cert=str(cert))
    [job] = publish_until_final(store, endpoint, [good])
    assert job.status == JobStatus.SUCCEEDED

    # a CA file verifies the host name as well: the certificate names 127.0.0.1
    endpoint = ServerEndpoint(server.url, ca_file=str(cert))
    assert endpoint.post_json("/load_lora_adapter", {"lora_name": "x"}, 5).ok


def test_only_adapters_of_the_served_model_are_published(store, serve):
    server = serve([LOADED])
    ours, theirs = finished_training(store, "ours"), finished_training(store, "theirs", "other")
    publisher = AdapterPublisher(store, ServerEndpoint(server.url), "base-model", policy=FAST)
    publisher.publish_pending()
    assert store.get_job(ours).status == JobStatus.SUCCEEDED
    assert store.get_job(theirs).status == JobStatus.RUNNING  # left to its own server
    assert [r["body"]["lora_name"] for r in server.requests] == ["ours"]
