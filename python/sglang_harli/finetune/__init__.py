"""LoRA finetune engine over a served model's own frozen weights.

Plain torch + safetensors: nothing here imports SGLang, SQLite or HTTP code
(``srt/weights.py`` adapts SGLang's model to :class:`BaseModelView`). See ``docs/finetune.md``.

The names below are imported on first use (PEP 562), so that ``python -m
sglang_harli.finetune`` (the CLI, which only speaks HTTP) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "graph": None,
    "ops": None,
    "torch_ops": None,
    "BaseModelView": "base_model",
    "FusedLayerWeights": "base_model",
    "LayerWeights": "base_model",
    "ModelConfig": "base_model",
    "RopeConfig": "base_model",
    "DatasetError": "data",
    "Example": "data",
    "PackedBatch": "data",
    "load_jsonl": "data",
    "pack": "data",
    "parse_jsonl_lines": "data",
    "LoraAdapters": "lora",
    "LoraConfig": "lora",
    "LoraPair": "lora",
    "make_ops": "ops",
    "load_adapter": "peft_io",
    "save_adapter": "peft_io",
    "StepResult": "trainer",
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "TrainerState": "trainer",
    "WorkUnit": "trainer",
    "lr_at": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name] or name}")
    return module if _EXPORTS[name] is None else getattr(module, name)
