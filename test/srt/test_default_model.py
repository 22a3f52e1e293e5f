"""The embedded default, SmolLM2-135M-Instruct, on a real server started as the README says.

One server for the module, no flags but a state directory: it serves SmolLM2 under its short
name, answers sensibly, and the README's demo works on it: the CLI teaches it eight facts with
default hyperparameters, and the adapter gives the trained answers the base model does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test.support.server_process import REPO, harli_server

pytestmark = pytest.mark.server

MODEL = "SmolLM2-135M-Instruct"
FACTS = REPO / "examples" / "facts.jsonl"  # the README's demo file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smollm2")
    started = harli_server(workdir / "server.log", "--harli-state-dir", str(workdir / "state"))
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def ask(server, model: str, question: str) -> str:
    reply = server.post(
        "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    return reply["choices"][0]["message"]["content"].strip()


def test_serves_smollm2_under_its_short_name(server):
    assert [m["id"] for m in server.get("/v1/models")["data"]] == [MODEL]


def test_it_knows_the_capital_of_france(server):
    assert "Paris" in ask(server, MODEL, "What is the capital of France?")


def test_the_readme_demo_teaches_it_eight_facts(server):
    facts = [json.loads(line)["messages"] for line in FACTS.read_text().splitlines()]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang_harli.finetune",
            "--server",
            server.url,
            "create",
            str(FACTS),
            "--suffix",
            "facts",
            "--wait",
        ],
        capture_output=True,
        text=True,
        # about a minute on the machine the README was measured on; about 16 minutes (104 bf16
        # steps at ~9 s) on a 2-core AMD EPYC without AVX-512, where 900 s cut it short
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr
    adapter = f"{MODEL}:facts"
    assert adapter in [m["id"] for m in server.get("/v1/models")["data"]]
    taught = [ask(server, adapter, user["content"]) == answer["content"] for user, answer in facts]
    before = [ask(server, MODEL, user["content"]) == answer["content"] for user, answer in facts]
    print(f"adapter: {sum(taught)} of {len(facts)} answers exact; base model: {sum(before)}")
    assert sum(taught) >= 6 and sum(before) == 0, (taught, before)
