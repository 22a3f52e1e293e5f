"""LoRA finetune engine over a served model's own frozen weights.

Plain torch + safetensors: nothing here imports SGLang (``srt/weights.py`` adapts SGLang's
model to :class:`BaseModelView`). See ``docs/finetune.md``.
"""

from . import graph, ops
from .base_model import (
    BaseModelView,
    FusedLayerWeights,
    LayerWeights,
    ModelConfig,
    RopeConfig,
)
from .data import DatasetError, Example, PackedBatch, load_jsonl, pack, parse_jsonl_lines
from .lora import LoraAdapters, LoraConfig, LoraPair
from .ops import make_ops
from .peft_io import load_adapter, save_adapter
from .trainer import StepResult, TrainConfig, Trainer, TrainerState, WorkUnit, lr_at

__all__ = [
    "BaseModelView",
    "DatasetError",
    "Example",
    "FusedLayerWeights",
    "LayerWeights",
    "LoraAdapters",
    "LoraConfig",
    "LoraPair",
    "ModelConfig",
    "PackedBatch",
    "RopeConfig",
    "StepResult",
    "TrainConfig",
    "Trainer",
    "TrainerState",
    "WorkUnit",
    "graph",
    "load_adapter",
    "load_jsonl",
    "lr_at",
    "make_ops",
    "ops",
    "pack",
    "parse_jsonl_lines",
    "save_adapter",
]
