from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sglang_harli.tiny_model import TinyModelSpec, build_once, ensure_tiny_model


def test_default_model_loads_and_has_a_chat_template(tiny_model_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == len(tokenizer)


def test_same_spec_same_directory_built_once(tmp_path):
    spec = TinyModelSpec(arch="qwen2", hidden_size=64, intermediate_size=128, num_layers=1)
    first = ensure_tiny_model(spec, cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(spec, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_tiny_model(TinyModelSpec(arch="qwen2", seed=1), cache_dir=tmp_path) != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")] == []


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path):
    """A build killed mid-way (kill -9: no clean-up ran) leaves its staging directory; the next
    build in the same cache removes it, and leaves alone a live builder's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    killed = tmp_path / f".build-{int(dead.stdout)}-abc"
    legacy = tmp_path / ".build-q1w2e3"  # an older build's name, without a pid
    live = tmp_path / f".build-{os.getppid()}-def"  # a builder that still runs
    for leftover in (killed, legacy, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(legacy, (two_hours_ago, two_hours_ago))

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")

    target = build_once(tmp_path / "model", build)
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])
