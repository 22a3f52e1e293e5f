"""Shared pieces of the finetune tests: tiny models, random data and the HF + PEFT reference."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sglang_harli.finetune import BaseModelView, Example, LoraAdapters, TrainConfig, lr_at
from sglang_harli.finetune.data import IGNORE_INDEX
from sglang_harli.finetune.peft_io import peft_key
from sglang_harli.tiny_model import TinyModelSpec

SPECS = {
    arch: TinyModelSpec(
        arch=arch, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2
    )
    for arch in ("llama", "qwen2")
}

# Float32 tolerances of our engine against HF transformers + PEFT, same inputs and adapters:
# - gradients: max |ours - ref| <= REL_TOL * max |ref|, per tensor (observed: below 2e-6);
# - losses: relative difference <= LOSS_RTOL (observed: below 2e-7);
# - adapters after AdamW steps: max |ours - ref| <= ADAM_TOL * (sum of the learning rates
#   applied), per tensor. Adam divides each gradient by its own running magnitude, which
#   amplifies float noise on near-zero gradient elements, so the honest yardstick is how far
#   Adam can move an element (about lr per step); a real bug moves elements by ~lr
#   (observed: below 6e-4).
REL_TOL = 1e-5
LOSS_RTOL = 1e-5
ADAM_TOL = 2e-3

# The worst error seen per kind of check, in units of its tolerance's yardstick; printed at the
# end of a run with HARLI_REPORT_ERRORS=1 (how the "observed" figures above were measured).
OBSERVED: dict[str, float] = {}


def observe(kind: str, value: float) -> None:
    OBSERVED[kind] = max(OBSERVED.get(kind, 0.0), value)


def load_hf(path, dtype=torch.float32, **config_overrides):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    return transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)


def random_examples(n: int, vocab: int, seed: int = 0, lo: int = 6, hi: int = 20) -> list[Example]:
    """``n`` random sequences, each a prompt (no loss) then a completion (loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        ids = torch.randint(6, vocab, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        out.append(Example(tuple(ids), (False,) * prompt + (True,) * (length - prompt)))
    return out


def perturb_b(adapters: LoraAdapters, seed: int = 1, std: float = 0.05) -> None:
    """Give B non-zero values, so that A gets non-zero gradients from the first step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pairs in adapters.layers:
            for pair in pairs.values():
                pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * std)


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL, what=""):
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    observe("gradient, relative to max |ref|", err / max(scale, 1e-30))
    assert err <= rel * max(scale, 1e-12), f"{what}: max err {err:.3e}, scale {scale:.3e}"


class PeftReference:
    """HF transformers + PEFT with the same adapter values, trained the textbook way."""

    def __init__(self, hf_model, adapters: LoraAdapters):
        import peft

        cfg = adapters.config
        self.adapters = adapters
        self.model = peft.get_peft_model(
            hf_model,
            peft.LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                use_rslora=cfg.use_rslora,
                target_modules=list(cfg.target_modules),
            ),
        )
        named = dict(self.model.named_parameters())
        self.params = {}  # our name -> PEFT's parameter
        for i, pairs in enumerate(adapters.layers):
            for module in pairs:
                for w in "AB":
                    key = peft_key(i, module, w).replace(".weight", ".default.weight")
                    self.params[f"layers.{i}.{module}.lora_{w}"] = named[key]
        self.load_from(adapters)

    def load_from(self, adapters: LoraAdapters) -> None:
        with torch.no_grad():
            for name, p in adapters.named_parameters():
                self.params[name].copy_(p)

    def loss_sum(self, examples: list[Example]) -> torch.Tensor:
        """Summed next-token loss over completion tokens, one unpadded sequence at a time."""
        total = 0.0
        for ex in examples:
            out = self.model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            targets = torch.tensor(
                [
                    ex.input_ids[t + 1] if ex.loss_mask[t + 1] else IGNORE_INDEX
                    for t in range(len(ex.input_ids) - 1)
                ]
            )
            total = total + F.cross_entropy(out, targets, reduction="sum")
        return total

    def grads(self) -> dict[str, torch.Tensor]:
        return {k: p.grad for k, p in self.params.items()}

    def train(self, batches: list[list[Example]], config: TrainConfig, total_steps: int):
        """Plain optimizer steps: mean loss over each batch's targets, clip, AdamW."""
        params = list(self.params.values())
        opt = torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        losses = []
        for step, batch in enumerate(batches):
            num_targets = sum(e.num_targets for e in batch)
            loss = self.loss_sum(batch) / num_targets
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            for g in opt.param_groups:
                g["lr"] = lr_at(config, step, total_steps)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses


def view_and_adapters(hf_model, lora_config, perturb: bool = True):
    view = BaseModelView.from_hf(hf_model)
    adapters = LoraAdapters.create(view.config, lora_config)
    if perturb:
        perturb_b(adapters)
    return view, adapters


def replace(config, **kw):
    return dataclasses.replace(config, **kw)
