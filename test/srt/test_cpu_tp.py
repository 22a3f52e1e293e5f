"""Tensor parallelism on real SGLang servers (CPU, tiny model, TP 2).

SGLang 0.5.23 cannot start ``--tp-size 2`` on a CPU by itself; with the launcher's CPU guards it
does, and plain SGLang semantics hold: greedy outputs at TP 2 equal TP 1's, token for token. A
Harli server at TP 2 trains a job on its ranks' shards exactly as TP 1 does (float32 servers, so
that "within float tolerance" is tight: the losses agree to about 1e-5 relative), writes one
PEFT adapter that PEFT and SGLang at any TP size load, and keeps the TPOT objective while the
job trains under a streaming load, with no request retracted.

Three servers, each started once: plain SGLang at TP 2 (``--harli-mode off``: greedy outputs,
and the solo decode gaps that set the objective ``S``), Harli at TP 1 and Harli at TP 2.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

from sglang_harli.corun.stats import quantile
from sglang_harli.loadgen import stream_load
from test.srt.test_corun_slo import ATTAINMENT, STREAMS, corun, delta
from test.srt.test_server import greedy_outputs
from test.support.finetuning import LEARN, PAIRS, answer, start_training, wait_for, write_dataset
from test.support.server_process import harli_server

pytestmark = pytest.mark.server

DTYPE = ["--dtype", "float32"]
LOSS_RTOL = 1e-4  # per step, TP 2 against TP 1 (measured: 3e-6 over 30 steps)
ADAPTER_RTOL = 0.01  # max |TP 2 - TP 1| over max |TP 1|, per tensor (measured: 2e-3)
LOAD_S = 12.0
# Attainment with the job at least that without, less this. Measured 0.0-4.8 points in three
# runs, then 9.7 in a full-suite run (97.6% -> 87.9%, of which 0.7% missed with units in them):
# on 2 cores the two ranks' units leave no core to the HTTP server, detokenizer and clients,
# which then preempt the next decode iterations. The finetune-caused bound (ATTAINMENT) is the
# TP 1 test's; this one only catches a job that ruins decode (time-sliced: 0% within S).
NOISE_MARGIN = 0.15


@pytest.fixture(scope="module")
def plain_tp2(tiny_model_dir, tmp_path_factory):
    """Plain SGLang at TP 2: its greedy outputs, and S = twice its median solo streamed gap."""
    logs = tmp_path_factory.mktemp("plain")
    server = harli_server(
        logs / "server.log",
        "--harli-mode",
        "off",
        "--model-path",
        str(tiny_model_dir),
        "--tp-size",
        "2",
        *DTYPE,
    )
    try:
        server.wait_ready()
        outputs = greedy_outputs(server, str(tiny_model_dir))
        stream_load(server.url, 3.0, STREAMS)  # warm-up
        gaps = stream_load(server.url, 8.0, STREAMS)
    finally:
        server.stop()
    return {"outputs": outputs, "objective_ms": 2 * statistics.median(gaps) * 1e3}


def harli_at(tp: int, plain_tp2, model_dir, logs: Path):
    server = harli_server(
        logs / f"tp{tp}.log",
        "--model-path",
        str(model_dir),
        "--tp-size",
        str(tp),
        "--harli-state-dir",
        str(logs / "state"),
        "--harli-tpot-slo-ms",
        f"{plain_tp2['objective_ms']:.3f}",
        *DTYPE,
    )
    server.state_dir = logs / "state"
    return server


@pytest.fixture(scope="module")
def servers(plain_tp2, tiny_model_dir, tmp_path_factory):
    """Harli at TP 2 and at TP 1, each started on first use (the TP 2 server's load test runs
    first, alone on the machine as ``S`` was measured)."""
    started = {}

    def get(tp: int):
        if tp not in started:
            logs = tmp_path_factory.mktemp(f"harli-tp{tp}")
            started[tp] = harli_at(tp, plain_tp2, tiny_model_dir, logs)
            started[tp].wait_ready()
        return started[tp]

    try:
        yield get
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def trained(servers, tiny_model_dir, tmp_path_factory):
    """The same job (data, seed, hyperparameters) trained at TP 1 and at TP 2."""
    data = write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")
    jobs = {}
    for tp in (1, 2):
        server = servers(tp)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        upload = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=str(tiny_model_dir),
            training_file=upload.id,
            suffix=f"tp{tp}",
            seed=1,
            hyperparameters=LEARN,
        )
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        losses = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics"}
        jobs[tp] = {"client": client, "job": job, "losses": losses, "server": server}
    return jobs


def adapter_dir(entry) -> Path:
    return entry["server"].state_dir / "jobs" / entry["job"].id / "adapter"


def test_tp2_keeps_the_objective_while_a_job_trains(servers, plain_tp2, tiny_model_dir, tmp_path):
    """The same load, side by side on one TP 2 server: without a job (this machine's own noise:
    two ranks, the HTTP server, the detokenizer and the clients share 2 cores, so decode alone
    misses more often than at TP 1), then while a job trains. Fine-tuning makes at most as many
    iterations miss as the TP 1 test allows, and the job adds at most ``NOISE_MARGIN`` to all
    misses; no request is retracted."""
    server = servers(2)
    stream_load(server.url, 3.0, STREAMS)  # warm-up
    before = corun(server)
    stream_load(server.url, LOAD_S, STREAMS)
    alone = delta(before, corun(server))
    job = start_training(server, str(tiny_model_dir), tmp_path)
    retractions: list[int] = []
    try:
        stream_load(server.url, 3.0, STREAMS)  # the predictor learns this load's shape
        before = corun(server)
        step0 = server.get(f"/v1/fine_tuning/jobs/{job}")["step"]
        gaps = stream_load(server.url, LOAD_S, STREAMS, retractions=retractions)
        after = corun(server)
        steps = server.get(f"/v1/fine_tuning/jobs/{job}")["step"] - step0
    finally:
        server.post(f"/v1/fine_tuning/jobs/{job}/cancel", {})
    d = delta(before, after)
    status = server.get("/harli/status")["schedulers"][0]
    print(
        f"TP 2, S {plain_tp2['objective_ms']:.2f} ms: alone {alone['attainment']:.4f}; with the "
        f"job {d}; client p99 {quantile(gaps, 0.99) * 1e3:.2f} ms; {steps} steps; "
        f"{status['tensor_parallel']}; hooks {status['hooks']}"
    )
    assert alone["iterations"] > 200 and d["iterations"] > 200
    assert 1 - d["misses_with_finetune"] / d["iterations"] >= ATTAINMENT, d
    assert d["attainment"] >= alone["attainment"] - NOISE_MARGIN, (alone, d)
    assert steps > 0 and d["finetune_tokens"] > 0
    assert retractions and sum(retractions) == 0
    assert status["tensor_parallel"]["size"] == 2 and status["tensor_parallel"]["exchanges"] > 0


def test_greedy_outputs_at_tp2_equal_tp1(plain_tp2, servers, tiny_model_dir):
    tp2 = plain_tp2["outputs"]
    tp1 = greedy_outputs(servers(1), str(tiny_model_dir))
    assert tp2["generate"][2]["cached_tokens"] > 0  # a radix-cache hit is compared too
    assert tp2["chat"] == tp1["chat"]
    for at2, at1 in zip(tp2["generate"], tp1["generate"], strict=True):
        assert at2["output_ids"] == at1["output_ids"]
    # and the Harli server at TP 2 serves the same tokens as plain SGLang at TP 2
    harli = greedy_outputs(servers(2), str(tiny_model_dir))
    assert harli["chat"] == tp2["chat"]
    assert [g["output_ids"] for g in harli["generate"]] == [
        g["output_ids"] for g in tp2["generate"]
    ]


def test_the_same_job_at_tp2_trains_as_at_tp1(trained):
    tp1, tp2 = trained[1]["losses"], trained[2]["losses"]
    assert sorted(tp2) == sorted(tp1) == list(range(1, LEARN["n_epochs"] + 1))
    for step, loss in tp1.items():
        assert tp2[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    whole = {tp: load_file(adapter_dir(trained[tp]) / "adapter_model.safetensors") for tp in (1, 2)}
    assert whole[2].keys() == whole[1].keys()
    for name, at1 in whole[1].items():
        assert whole[2][name].shape == at1.shape, name  # whole tensors, gathered
        err = (whole[2][name] - at1).abs().max().item()
        assert err <= ADAPTER_RTOL * at1.abs().max().item(), (name, err)


def test_the_tp2_adapter_gives_the_trained_answers_at_every_tp_size(trained, tiny_model_dir):
    entry = trained[2]
    for question, expected in PAIRS:  # served at TP 2, by the server that trained it
        assert answer(entry["client"], entry["job"].fine_tuned_model, question).startswith(
            expected[:-1]
        )
    # SGLang at TP 1 loads the very directory, through its own API
    tp1 = trained[1]["server"]
    tp1.post("/load_lora_adapter", {"lora_name": "from-tp2", "lora_path": str(adapter_dir(entry))})
    for question, expected in PAIRS:
        assert answer(trained[1]["client"], f"{tiny_model_dir}:from-tp2", question).startswith(
            expected[:-1]
        )


def test_the_tp2_adapter_loads_in_peft(trained, tiny_model_dir):
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir(trained[2]))
    for question, expected in PAIRS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text.startswith(expected[:-1]), (question, text)
