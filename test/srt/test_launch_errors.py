"""Bad start-up input: the launcher exits non-zero with a clear message and starts nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from test.support.server_process import REPO

pytestmark = pytest.mark.server


def launch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_harli.launch_server", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_harli_mode_is_refused():
    result = launch("--harli-mode", "nonsense")
    assert result.returncode == 2
    assert "--harli-mode" in result.stderr and "'nonsense'" in result.stderr


def test_unknown_harli_flag_is_refused():
    result = launch("--harli-modee", "off")
    assert result.returncode == 2
    assert "unknown flag --harli-modee" in result.stderr


def test_missing_model_path_is_refused(tmp_path):
    missing = tmp_path / "no-such-model"
    result = launch("--model-path", str(missing))
    assert result.returncode == 2
    assert f"model path {missing} does not exist" in result.stderr


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    result = launch("--model-path", str(tmp_path))
    assert result.returncode == 2
    assert "GPT2LMHeadModel" in result.stderr and "--harli-mode off" in result.stderr


def test_speculative_decoding_is_refused(tiny_model_dir):
    result = launch("--model-path", str(tiny_model_dir), "--speculative-algorithm", "EAGLE")
    assert result.returncode == 2
    assert "speculative decoding" in result.stderr


def test_pipeline_and_data_parallelism_are_refused(tiny_model_dir):
    for flag in ("--pp-size", "--dp-size"):
        result = launch("--model-path", str(tiny_model_dir), flag, "2")
        assert result.returncode == 2
        assert "pipeline or data parallelism" in result.stderr


def test_a_tp_size_that_does_not_split_the_heads_is_refused(tiny_model_dir):
    # the tiny model has 4 heads and 2 KV heads: SGLang would replicate KV heads at TP 4
    result = launch("--model-path", str(tiny_model_dir), "--tp-size", "4")
    assert result.returncode == 2
    assert "cannot be trained at --tp-size 4" in result.stderr
    assert "2 KV heads do not split evenly over 4" in result.stderr


@pytest.mark.parametrize("mode", ["harli", "off"])
def test_a_port_in_use_is_refused_before_anything_starts(tiny_model_dir, mode):
    # SGLang itself would load the model, fail to bind, then wait minutes in its shutdown
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch(
            "--model-path", str(tiny_model_dir), "--harli-mode", mode,
            "--host", "127.0.0.1", "--port", str(port),
        )  # fmt: skip
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


def test_help_shows_sglang_and_harli_flags():
    result = launch("--help")
    assert result.returncode == 0
    assert "--harli-mode" in result.stdout
    assert "--model-path" in result.stdout and "--tp-size" in result.stdout


def test_triton_kernels_need_a_gpu():
    from sglang_harli.srt import cpu

    if cpu.cuda_available():
        pytest.skip("this machine has a GPU: --harli-kernels triton is valid here")
    result = launch("--harli-kernels", "triton")
    assert result.returncode == 2
    assert "--harli-kernels triton needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("level, shown", [("info", True), ("warning", False)])
def test_our_log_lines_follow_sglangs_log_level(tiny_model_dir, level, shown):
    from sglang_harli.srt import cpu

    if cpu.cuda_available():
        pytest.skip("the line checked is the CPU recipe's, logged only without a GPU")
    # refused after the launcher logged what it applied: quick, and starts nothing
    result = launch("--model-path", str(tiny_model_dir), "--pp-size", "2", "--log-level", level)
    assert result.returncode == 2
    assert ("running SGLang on the CPU" in result.stderr) is shown
