"""The launcher on real SGLang (CPU here): endpoints, /harli/status, and identical outputs.

Each server starts once per module. The reference outputs come from plain
``python -m sglang.launch_server`` and from ours in ``--harli-mode off``; the default-mode server
is started with the README's serve command and no --model-path, with the tiny embedded default
(``--harli-default-model tiny``: the same weights the reference servers load by path, served
under its short name). ``test_default_model.py`` serves the real default, SmolLM2.
"""

from __future__ import annotations

import pytest

from test.support.server_process import harli_server, plain_sglang_server

pytestmark = pytest.mark.server

# The third prompt extends the first, so it hits the radix cache.
PROMPTS = ["def hello(world):", "import os, sys", "def hello(world):\n    return", "class Foo:"]
CHAT = [{"role": "user", "content": "hello"}]
MAX_NEW_TOKENS = 12
TINY = "tiny-llama"  # what the embedded tiny default is served as


def greedy_outputs(server, model: str) -> dict:
    """Token ids for each prompt (sent one at a time, in order) and for one chat request."""
    generations = []
    for prompt in PROMPTS:
        out = server.post(
            "/generate",
            {
                "text": prompt,
                "sampling_params": {
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            },
        )
        generations.append(
            {"output_ids": out["output_ids"], "cached_tokens": out["meta_info"]["cached_tokens"]}
        )
    chat = server.post(
        "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": MAX_NEW_TOKENS, "temperature": 0},
    )
    return {"generate": generations, "chat": chat["choices"][0]["message"]["content"]}


def _outputs_of(server, model: str) -> dict:
    try:
        server.wait_ready()
        return greedy_outputs(server, model)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plain_outputs(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("plain") / "server.log"
    return _outputs_of(plain_sglang_server(log, tiny_model_dir), str(tiny_model_dir))


@pytest.fixture(scope="module")
def off_outputs(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("off") / "server.log"
    server = harli_server(log, "--harli-mode", "off", "--model-path", str(tiny_model_dir))
    try:
        server.wait_ready()
        status = server.get("/harli/status")
        return {**greedy_outputs(server, str(tiny_model_dir)), "status": status}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def harli(tmp_path_factory):
    """Our server in its default mode, started as the README says, no --model-path."""
    server = harli_server(
        tmp_path_factory.mktemp("harli") / "server.log", "--harli-default-model", "tiny"
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def harli_outputs(harli):
    return greedy_outputs(harli, TINY)


def test_serves_the_embedded_default_model_under_its_short_name(harli):
    models = harli.get("/v1/models")["data"]
    assert [m["id"] for m in models] == [TINY]


def test_openai_and_native_endpoints_answer(harli):
    chat = harli.post(
        "/v1/chat/completions",
        {"model": TINY, "messages": CHAT, "max_tokens": 8, "temperature": 0},
    )
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] == 8

    completion = harli.post(
        "/v1/completions",
        {"model": TINY, "prompt": "import os", "max_tokens": 8, "temperature": 0},
    )
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"]

    generated = harli.post(
        "/generate", {"text": "def f(x):", "sampling_params": {"max_new_tokens": 8}}
    )
    assert len(generated["output_ids"]) == 8
    assert generated["text"]


def test_radix_cache_is_hit(harli_outputs):
    assert harli_outputs["generate"][2]["cached_tokens"] > 0


def test_greedy_outputs_identical_to_plain_sglang(plain_outputs, off_outputs, harli_outputs):
    assert plain_outputs["generate"][2]["cached_tokens"] > 0  # the comparison covers a cache hit
    for outputs in (off_outputs, harli_outputs):
        assert outputs["chat"] == plain_outputs["chat"]
        for ours, theirs in zip(outputs["generate"], plain_outputs["generate"], strict=True):
            assert ours["output_ids"] == theirs["output_ids"]


def test_status_counts_decode_iterations(harli):
    before = harli.get("/harli/status")
    assert before["mode"] == "harli"  # the CPU default
    new_tokens = 9
    harli.post(
        "/generate",
        {
            "text": "x = 1",
            "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True},
        },
    )
    after = harli.get("/harli/status")
    # prefill yields the first token; each further token is one decode iteration
    assert after["decode_iterations"] - before["decode_iterations"] == new_tokens - 1
    [scheduler] = after["schedulers"]
    assert scheduler["last_decode"]["batch_size"] == 1
    hooks = scheduler["hooks"]
    assert hooks["before_decode"]["calls"] == after["decode_iterations"]
    assert hooks["reclaim_kv"]["calls"] >= after["decode_iterations"]
    assert scheduler["hook_overhead_us"] > 0
    # the decode-to-decode intervals are measured; the last one stays open until the next batch
    # (judged against the objective, or not judged while an auto objective has none yet)
    corun, was = scheduler["corun"], before["schedulers"][0]["corun"]
    measured = corun["iterations"] + corun["unjudged"]
    assert measured - (was["iterations"] + was["unjudged"]) == new_tokens - 2
    # the embedded model on a CPU: the objective is auto, a multiple of the measured decode
    assert corun["objective"]["source"] == "auto"
    assert scheduler["control"]["tpot_slo_ms"] == "auto"
    assert corun["within_slo"] <= corun["iterations"]


def test_mode_off_runs_plain_sglang_scheduler(off_outputs):
    assert off_outputs["status"] == {"mode": "off", "schedulers": []}
