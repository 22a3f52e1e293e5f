from __future__ import annotations

from sglang_harli.tiny_model import TinyModelSpec, ensure_tiny_model


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
