"""LoRA adapters: fp32 master weights for the target projections of every layer.

Semantics follow PEFT's ``LoraConfig`` so that a saved adapter means the same thing there:
``y = W x + b + scaling * B (A dropout(x))`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), A initialised like PEFT's default (Kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in))) and B zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Iterator, Sequence

import torch

from .base_model import PROJECTIONS, ModelConfig


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = PROJECTIONS
    seed: int = 0  # initialisation of A

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(PROJECTIONS))
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules {unknown or '[]'}: choose among {PROJECTIONS}")
        # Canonical order, so the same set always gives the same parameters and files.
        object.__setattr__(
            self, "target_modules", tuple(m for m in PROJECTIONS if m in self.target_modules)
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass
class LoraPair:
    A: torch.Tensor  # [r, in_features], fp32 leaf with requires_grad
    B: torch.Tensor  # [out_features, r]


class LoraAdapters:
    """Adapters for every layer of one model: ``layers[i][module] -> LoraPair``."""

    def __init__(self, config: LoraConfig, layers: Sequence[dict[str, LoraPair]]):
        self.config = config
        self.layers = list(layers)

    @classmethod
    def create(
        cls, model: ModelConfig, config: LoraConfig, device: torch.device | str = "cpu"
    ) -> LoraAdapters:
        """Fresh adapters; the same seed gives the same A on any device (drawn on the CPU)."""
        gen = torch.Generator().manual_seed(config.seed)
        layers = []
        for _ in range(model.num_layers):
            pairs = {}
            for name in config.target_modules:
                fan_in, fan_out = model.projection_shape(name)
                bound = 1.0 / math.sqrt(fan_in)
                a = torch.empty(config.r, fan_in).uniform_(-bound, bound, generator=gen)
                pairs[name] = LoraPair(
                    A=a.to(device).requires_grad_(),
                    B=torch.zeros(fan_out, config.r, device=device).requires_grad_(),
                )
            layers.append(pairs)
        return cls(config, layers)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``("layers.{i}.{module}.lora_A", tensor)`` in a fixed order."""
        for i, pairs in enumerate(self.layers):
            for name, pair in pairs.items():
                yield f"layers.{i}.{name}.lora_A", pair.A
                yield f"layers.{i}.{name}.lora_B", pair.B

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"adapter keys differ: missing {missing[:4]}, unexpected {extra[:4]}")
        with torch.no_grad():
            for k, p in own.items():
                if p.shape != state[k].shape:
                    raise ValueError(f"{k}: shape {tuple(state[k].shape)}, want {tuple(p.shape)}")
                p.copy_(state[k])

    def make_optimizer(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> torch.optim.AdamW:
        """AdamW over the fp32 masters; its state (moments, step) lives beside them."""
        return torch.optim.AdamW(
            self.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )


def _mix(*ints: int) -> int:
    """A 63-bit seed from a tuple of integers, stable across runs and platforms."""
    digest = hashlib.blake2b(struct.pack(f"<{len(ints)}q", *ints), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class DropoutPlan:
    """LoRA-input dropout masks keyed by (sequence, layer, module), not by call order.

    Each packed sequence carries its own seed, so recomputing a layer for the backward pass
    (activation checkpointing), redoing an abandoned step, or packing the same sequences into
    micro-batches differently all draw the very same masks.
    """

    p: float
    seeds: tuple[int, ...]  # one per sequence of the packed micro-batch
    lengths: tuple[int, ...]

    def mask(
        self, layer: int, module: str, features: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """[tokens, features] mask already scaled by 1 / (1 - p), as ``nn.Dropout`` applies."""
        module_index = PROJECTIONS.index(module)
        parts = []
        for seed, n in zip(self.seeds, self.lengths, strict=True):
            gen = torch.Generator(device=device).manual_seed(_mix(seed, layer, module_index))
            keep = torch.empty(n, features, device=device).bernoulli_(1.0 - self.p, generator=gen)
            parts.append(keep)
        return (torch.cat(parts) / (1.0 - self.p)).to(dtype)


def sequence_seed(seed: int, step: int, index: int) -> int:
    """The dropout seed of the ``index``-th sequence of optimizer step ``step``."""
    return _mix(seed, step, index)
