"""Adapter publishing and model ids on a real server over https (CPU, tiny model).

One server runs with ``--ssl-certfile/--ssl-keyfile`` (a self-signed certificate made here) and
both an api key and an admin key, so the publisher must reach SGLang over TLS with the admin key.
A short job teaches four answers; then every id ``/v1/models`` lists must answer chat and
completion requests as what it names, the fine-tuned id with the trained answers, and the bare
adapter name must never get the base model. Clients verify the certificate (``httpx`` with it).
"""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest
import requests

from test.support.finetuning import LEARN, PAIRS, answer, wait_for, write_dataset
from test.support.server_process import COMMON_FLAGS, REPO, Server
from test.unit.srt.test_publisher import self_signed_cert

pytestmark = pytest.mark.server

API_KEY, ADMIN_KEY = "user-key", "admin-key"


class TlsServer(Server):
    """Our launcher over https; requests verify the server's certificate."""

    scheme = "https"

    def __init__(self, log_path, cert, *flags: str):
        script = str(REPO / "scripts" / "serve.sh")
        self.cert = str(cert)  # given on each call: REQUESTS_CA_BUNDLE would beat a session's
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {API_KEY}"
        super().__init__([script, *COMMON_FLAGS, *flags], log_path)

    def healthy(self) -> bool:
        return self.session.get(self.url + "/health", verify=self.cert, timeout=5).ok

    def post_raw(self, path: str, body: dict) -> requests.Response:
        return self.session.post(self.url + path, json=body, verify=self.cert, timeout=120)

    def get(self, path: str, timeout: float = 30) -> dict:
        response = self.session.get(self.url + path, verify=self.cert, timeout=timeout)
        assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
        return response.json()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tiny_model_dir, cert, tmp_path_factory):
    cert_path, key_path = cert
    server = TlsServer(
        tmp_path_factory.mktemp("tls-server") / "server.log",
        cert_path,
        "--model-path", str(tiny_model_dir),
        "--harli-state-dir", str(tmp_path_factory.mktemp("state")),
        "--ssl-certfile", str(cert_path),
        "--ssl-keyfile", str(key_path),
        "--api-key", API_KEY,
        "--admin-api-key", ADMIN_KEY,
    )  # fmt: skip
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def https_client(server, cert, key: str) -> openai.OpenAI:
    http_client = httpx.Client(verify=ssl.create_default_context(cafile=cert[0]), timeout=120)
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=key, http_client=http_client, max_retries=0
    )


@pytest.fixture(scope="module")
def client(server, cert):
    return https_client(server, cert, API_KEY)


@pytest.fixture(scope="module")
def trained(client, server, cert, tiny_model_dir, tmp_path_factory):
    admin = https_client(server, cert, ADMIN_KEY)  # uploads and job creation are admin routes
    dataset = write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")
    upload = admin.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=upload.id,
        suffix="demo",
        seed=1,  # test_finetune_jobs' recipe, seed included: the four answers are learnt
        hyperparameters=LEARN,
    )
    return wait_for(client, job.id, timeout_s=240)


def complete(client, model: str, prompt: str) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    return reply.choices[0].text


def chat_prompt(model_dir, question: str) -> str:
    """The text the chat route builds for ``question``: what the adapter was trained on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_job_ends_succeeded_over_https_with_the_admin_key(trained, tiny_model_dir):
    assert trained.status == "succeeded", trained.error
    assert trained.fine_tuned_model == f"{tiny_model_dir}:demo"


def test_models_lists_the_base_then_the_fine_tuned_id(client, trained, tiny_model_dir):
    base = str(tiny_model_dir)
    listed = client.models.list().data
    assert [m.id for m in listed] == [base, trained.fine_tuned_model]
    assert listed[1].parent == base
    assert client.models.retrieve(trained.fine_tuned_model).parent == base
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("demo")  # the list and look-ups agree on one id per model


def test_every_listed_id_answers_as_what_it_names(client, server, trained, tiny_model_dir):
    base = str(tiny_model_dir)
    for model in (m.id for m in client.models.list().data):
        assert answer(client, model, PAIRS[0][0])
        assert complete(client, model, PAIRS[0][0])
    # where the adapter was trained the fine-tuned id answers otherwise than the base model,
    # with what it was taught
    tuned = {q: answer(client, trained.fine_tuned_model, q) for q, _ in PAIRS}
    assert all(tuned[q] != answer(client, base, q) for q, _ in PAIRS)
    assert any(tuned[q].startswith(a[:-1]) for q, a in PAIRS), tuned
    prompt = chat_prompt(tiny_model_dir, PAIRS[0][0])
    assert complete(client, trained.fine_tuned_model, prompt) != complete(client, base, prompt)


def test_a_bare_adapter_name_never_gets_the_base_model(client, server, trained, tiny_model_dir):
    base = str(tiny_model_dir)
    prompt = chat_prompt(tiny_model_dir, PAIRS[0][0])
    for question, _ in PAIRS:
        assert answer(client, "demo", question) == answer(
            client, trained.fine_tuned_model, question
        )
    assert complete(client, "demo", prompt) == complete(client, trained.fine_tuned_model, prompt)
    assert complete(client, "demo", prompt) != complete(client, base, prompt)
    # an adapter that does not exist is refused, not answered by the base model
    unknown = server.post_raw(
        "/v1/chat/completions",
        {"model": f"{base}:nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert unknown.status_code == 400 and "nope" in unknown.text


def test_an_adapter_named_like_the_base_never_answers_for_it(client, server, trained, cert):
    """An adapter stored under a name clients send for the base model (loaded here as SGLang
    would load one from before suffixes were checked): ``"model": "default"`` still gets the
    base model; the adapter answers as ``<base>:default``."""
    base = trained.fine_tuned_model.rsplit(":", 1)[0]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loaded = requests.post(
        server.url + "/load_lora_adapter",
        json={"lora_name": "default", "lora_path": trained_adapter_path(server, trained)},
        headers=admin,
        verify=server.cert,
        timeout=120,
    )
    assert loaded.status_code == 200, loaded.text
    try:
        for question, _ in PAIRS:
            assert answer(client, "default", question) == answer(client, base, question)
            assert answer(client, f"{base}:default", question) == answer(
                client, trained.fine_tuned_model, question
            )
    finally:
        requests.post(
            server.url + "/unload_lora_adapter",
            json={"lora_name": "default"},
            headers=admin,
            verify=server.cert,
            timeout=120,
        )


def trained_adapter_path(server, trained) -> str:
    """The adapter's directory, as ``/v1/models`` shows it (``root``)."""
    return server.get(f"/v1/models/{trained.fine_tuned_model}")["root"]
