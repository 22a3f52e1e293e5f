"""PEFT directories: PEFT loads ours and agrees; we load ours back; training resumes exactly."""

import json

import pytest
import torch
from safetensors import safe_open

from sglang_harli.finetune import (
    LoraConfig,
    TrainConfig,
    Trainer,
    graph,
    load_adapter,
    pack,
    save_adapter,
)

from .helpers import load_hf, observe, random_examples, view_and_adapters

# Logits of PEFT on the saved adapter vs ours, float32 (observed: 0, bitwise equal on CPU).
LOGITS_ATOL = 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_loads_our_adapter_and_gives_our_logits(model_dirs, arch, tmp_path):
    import peft

    hf = load_hf(model_dirs[arch])
    targets = ("q_proj", "v_proj", "down_proj")
    view, adapters = view_and_adapters(
        hf, LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=targets)
    )
    save_adapter(tmp_path, adapters, dtype=torch.float32, base_model_name_or_path="tiny")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["use_rslora"] is True and config["base_model_name_or_path"] == "tiny"
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    assert len(keys) == 2 * 3 * 2 and a.shape == (4, 128) and b.shape == (32, 4)

    batch = pack(random_examples(2, view.config.vocab_size, seed=5))
    ours = graph.logits(view, adapters, batch)
    model = peft.PeftModel.from_pretrained(hf, tmp_path)
    with torch.no_grad():
        theirs = torch.cat(
            [
                model(input_ids=batch.input_ids[s:e][None]).logits[0]
                for s, e in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:], strict=True)
            ]
        )
    without_adapter = graph.logits(view, None, batch)
    assert (ours - without_adapter).abs().max() > 100 * LOGITS_ATOL  # the adapter matters
    observe("logits vs PeftModel.from_pretrained, absolute", (ours - theirs).abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGITS_ATOL)


def test_saved_in_base_dtype_and_loaded_back(model_dirs, tmp_path):
    hf = load_hf(model_dirs["qwen2"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4, alpha=8, dropout=0.1))
    save_adapter(tmp_path / "fp32", adapters, dtype=torch.float32)
    save_adapter(tmp_path / "bf16", adapters, dtype=torch.bfloat16)
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    exact = load_adapter(tmp_path / "fp32", view.config)
    rounded = load_adapter(tmp_path / "bf16", view.config)
    assert exact.config == adapters.config
    for (name, p), (_, q), (_, r) in zip(
        adapters.named_parameters(),
        exact.named_parameters(),
        rounded.named_parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), name
        assert q.dtype == r.dtype == torch.float32 and q.requires_grad
        assert torch.equal(r, p.detach().to(torch.bfloat16).float()), name


def test_unsupported_peft_options_are_refused(model_dirs, tmp_path):
    hf = load_hf(model_dirs["llama"])
    view, adapters = view_and_adapters(hf, LoraConfig(r=4))
    save_adapter(tmp_path, adapters, dtype=torch.float32)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        load_adapter(tmp_path, view.config)


def test_resume_from_checkpoint_is_exact(model_dirs, tmp_path):
    hf = load_hf(model_dirs["llama"])
    view, _ = view_and_adapters(hf, LoraConfig(r=4))
    data = random_examples(6, view.config.vocab_size, seed=8)
    cfg = TrainConfig(
        lr=1e-2, total_steps=4, global_batch_size=4, micro_batch_size=2, warmup_steps=1
    )

    def fresh():
        from sglang_harli.finetune import LoraAdapters

        adapters = LoraAdapters.create(view.config, LoraConfig(r=4, dropout=0.1))
        return adapters, Trainer(view, adapters, data, cfg)

    _, straight = fresh()
    straight_losses = [r.loss for r in straight.train()]

    _, first = fresh()
    losses = [first.run_step().loss for _ in range(2)]
    first.save_checkpoint(tmp_path, base_model_name_or_path="tiny-llama")
    assert (tmp_path / "adapter_config.json").is_file()
    _, second = fresh()
    second.load_checkpoint(tmp_path)
    assert second.state.step == 2 and second.state.samples == 8
    losses += [r.loss for r in second.train()]

    assert losses == straight_losses
    for p, q in zip(straight.adapters.parameters(), second.adapters.parameters(), strict=True):
        assert torch.equal(p, q)
