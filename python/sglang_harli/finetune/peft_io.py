"""Adapters as PEFT directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are what ``peft.PeftModel.from_pretrained`` loads onto a Hugging Face Llama/Qwen2
model: key ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``,
A ``[r, in_features]``, B ``[out_features, r]``.

The writers fill a directory in place; callers that need a crash to leave either the old or the
whole new adapter write into ``durable.new_directory(path)`` (the trainer's checkpoints do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from .base_model import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig
from .lora import LoraAdapters, LoraConfig
from .tensor_io import Encoded, drain, encoding_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)
# PEFT options whose non-default values change what an adapter means: we refuse to guess.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "layers_to_transform": None,
    "layer_replication": None,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def peft_key(layer: int, module: str, which: str) -> str:
    """PEFT's saved name of the ``which`` ("A" or "B") matrix of ``module`` in ``layer``."""
    block = "self_attn" if module in ATTENTION_PROJECTIONS else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


_NAME = re.compile(r"layers\.(\d+)\.(\w+)\.lora_([AB])")  # LoraAdapters.named_parameters()


def save_adapter(
    path: str | Path,
    adapters: LoraAdapters,
    *,
    dtype: torch.dtype,
    base_model_name_or_path: str = "",
) -> None:
    """Write a PEFT LoRA directory, weights in ``dtype`` (the base model's, to serve with)."""
    save_adapter_tensors(
        path,
        adapters.config,
        adapters.named_parameters(),
        dtype=dtype,
        base_model_name_or_path=base_model_name_or_path,
    )


def save_adapter_tensors(
    path: str | Path,
    cfg: LoraConfig,
    named: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    base_model_name_or_path: str = "",
) -> None:
    """:func:`save_adapter` from ``(name, tensor)`` pairs named as
    ``LoraAdapters.named_parameters()`` names them (e.g. a host copy taken for a checkpoint)."""
    write_adapter(path, cfg, encode_adapter(named, dtype), base_model_name_or_path)


def encode_adapter(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Encoded:
    """The adapter weights file, encoded (PEFT's names, ``dtype``): the torch work of saving."""
    return drain(encoding_adapter(named, dtype))


def encoding_adapter(
    named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Generator[None, None, Encoded]:
    """:func:`encode_adapter` a tensor per step."""
    tensors = {}
    for name, t in named:
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"unexpected adapter tensor name {name!r}")
        key = peft_key(int(match[1]), match[2], match[3])
        tensors[key] = t.detach().to("cpu", dtype).contiguous()
        yield
    return (yield from encoding_safetensors(tensors, metadata={"format": "pt"}))


def write_adapter(
    path: str | Path, cfg: LoraConfig, weights: Encoded, base_model_name_or_path: str = ""
) -> None:
    """A PEFT LoRA directory: ``weights`` (from :func:`encode_adapter`) and its config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights.save(path / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": list(cfg.target_modules),
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        **_UNSUPPORTED,
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(
    path: str | Path, model: ModelConfig, device: torch.device | str = "cpu"
) -> LoraAdapters:
    """Read a PEFT LoRA directory back as fp32 master weights (to resume or to evaluate)."""
    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}, not LORA")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key)
        if value is not None and value != default:
            raise NotImplementedError(f"{path}: {key}={value!r} is not supported")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match[2] not in PROJECTIONS:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        found[int(match[1]), match[2], match[3]] = t
    modules = tuple(m for m in PROJECTIONS if any(k[1] == m for k in found))
    lora = LoraConfig(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=modules,
    )
    adapters = LoraAdapters.create(model, lora, device)
    state = {f"layers.{i}.{m}.lora_{w}": t.float() for (i, m, w), t in found.items()}
    adapters.load_state_dict(state)  # checks that every layer and shape is there
    return adapters
