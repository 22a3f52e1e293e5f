"""Read-only views of a served model's frozen weights (Llama and Qwen2).

The finetune engine trains adapters on the very tensors the server decodes with, so a view
holds *handles* (detached aliases sharing storage), never copies. Two constructors:

* :meth:`BaseModelView.from_fused_layers` takes SGLang's fused layout (``qkv_proj`` rows
  q|k|v, ``gate_up_proj`` rows gate|up) and slices rows, which are views of the same storage;
* :meth:`BaseModelView.from_hf` takes a Hugging Face ``LlamaForCausalLM`` or
  ``Qwen2ForCausalLM`` (split projections).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

ARCHS = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
# The linear projections of a decoder layer, in the order adapters and files list them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    # Llama 3 frequency-dependent scaling (rope_type "llama3").
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeConfig:
        """Transformers 5 keeps everything in ``rope_parameters``; 4 uses ``rope_theta`` plus an
        optional ``rope_scaling`` dict (SGLang may hand us either)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        if not params:
            params = dict(getattr(config, "rope_scaling", None) or {})
            params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise NotImplementedError(f"rope_type {rope_type!r} (supported: {ROPE_TYPES})")
        defaults = cls()
        return cls(
            theta=float(params.get("rope_theta", defaults.theta)),
            rope_type=rope_type,
            factor=float(params.get("factor", defaults.factor)),
            low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
            high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
            original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings", defaults.original_max_position_embeddings
                )
            ),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of projection ``name`` in every layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]

    def sharded(self, tp_size: int) -> ModelConfig:
        """The shapes one of ``tp_size`` tensor-parallel ranks holds: its attention heads and
        its share of the MLP's intermediate features (the vocabulary is split apart, see
        :class:`BaseModelView`). Raises if they do not split evenly: SGLang would replicate KV
        heads then, which the engine does not train on."""
        if tp_size == 1:
            return self
        for what, n in (
            ("attention heads", self.num_heads),
            ("KV heads", self.num_kv_heads),
            ("intermediate features", self.intermediate_size),
        ):
            if n % tp_size:
                raise ValueError(
                    f"{n} {what} do not split evenly over {tp_size} tensor-parallel ranks"
                )
        return dataclasses.replace(
            self,
            num_heads=self.num_heads // tp_size,
            num_kv_heads=self.num_kv_heads // tp_size,
            intermediate_size=self.intermediate_size // tp_size,
        )

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelConfig:
        arch = config.model_type
        if arch not in ARCHS:
            raise NotImplementedError(f"model_type {arch!r} (supported: {ARCHS})")
        if getattr(config, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r}")
        heads = config.num_attention_heads
        return cls(
            arch=arch,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            rope=RopeConfig.from_hf_config(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's frozen tensors, in the ``[out_features, in_features]`` layout."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    # Qwen2 always has q/k/v biases; Llama has q/k/v/o biases only with attention_bias=True.
    biases: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def weight(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def tensors(self) -> Iterator[torch.Tensor]:
        for f in dataclasses.fields(self):
            if f.name != "biases":
                yield getattr(self, f.name)
        yield from self.biases.values()


@dataclasses.dataclass(frozen=True)
class FusedLayerWeights:
    """One layer in SGLang's fused layout, the input of :meth:`BaseModelView.from_fused_layers`."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_proj: torch.Tensor  # [q_size + 2 * kv_size, hidden], rows q|k|v
    o_proj: torch.Tensor
    gate_up_proj: torch.Tensor  # [2 * intermediate, hidden], rows gate|up
    down_proj: torch.Tensor
    qkv_bias: torch.Tensor | None = None  # [q_size + 2 * kv_size]
    o_bias: torch.Tensor | None = None


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """An alias of ``t``'s storage that autograd never writes a ``.grad`` into."""
    return t.detach()


class BaseModelView:
    """The frozen base model, as the training graph reads it. Nothing here is ever copied.

    With ``tp`` (a ``parallel.TensorParallel``) the view holds one rank's shards: ``config`` is
    still the whole model's (adapters and files are the whole model's), ``local`` the shapes of
    this rank's layers, and ``embed_tokens``/``lm_head`` the vocabulary rows from
    ``vocab_start`` (``finetune/parallel.py``).
    """

    def __init__(
        self,
        config: ModelConfig,
        embed_tokens: torch.Tensor,
        layers: Sequence[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        tp: Any = None,
        vocab_start: int = 0,
    ):
        self.config = config
        self.tp = tp
        self.local = config if tp is None else config.sharded(tp.size)
        self.vocab_start = vocab_start
        # Servers may pad the vocabulary rows (SGLang pads to a multiple of 64): keep the real
        # rows only, as a view.
        rows = max(0, min(embed_tokens.shape[0], config.vocab_size - vocab_start))
        self.embed_tokens = _frozen(embed_tokens)[:rows]
        self.lm_head = _frozen(lm_head)[:rows]
        self.final_norm = _frozen(final_norm)
        self.layers = [
            LayerWeights(
                **{
                    f.name: _frozen(getattr(lw, f.name))
                    for f in dataclasses.fields(lw)
                    if f.name != "biases"
                },
                biases={k: _frozen(v) for k, v in lw.biases.items()},
            )
            for lw in layers
        ]
        self._check_shapes()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every frozen tensor the view holds (the tied lm_head is yielded twice)."""
        yield self.embed_tokens
        for layer in self.layers:
            yield from layer.tensors()
        yield self.final_norm
        yield self.lm_head

    @classmethod
    def from_fused_layers(
        cls,
        config: ModelConfig,
        embed_tokens: torch.Tensor,
        layers: Sequence[FusedLayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        tp: Any = None,
        vocab_start: int = 0,
    ) -> BaseModelView:
        """A view over fused q|k|v and gate|up tensors: row slices alias the fused storage.
        With ``tp``, the tensors are that rank's shards (see the class)."""
        local = config if tp is None else config.sharded(tp.size)
        q, kv, inter = local.q_size, local.kv_size, local.intermediate_size
        split = []
        for fl in layers:
            if fl.qkv_proj.shape[0] != q + 2 * kv or fl.gate_up_proj.shape[0] != 2 * inter:
                raise ValueError(
                    f"fused shapes qkv {tuple(fl.qkv_proj.shape)} / gate_up "
                    f"{tuple(fl.gate_up_proj.shape)} do not match the config "
                    f"(q {q}, kv {kv}, intermediate {inter} per rank)"
                )
            biases = {}
            if fl.qkv_bias is not None:
                biases = dict(
                    q_proj=fl.qkv_bias[:q],
                    k_proj=fl.qkv_bias[q : q + kv],
                    v_proj=fl.qkv_bias[q + kv :],
                )
            if fl.o_bias is not None:
                biases["o_proj"] = fl.o_bias
            split.append(
                LayerWeights(
                    input_norm=fl.input_norm,
                    post_norm=fl.post_norm,
                    q_proj=fl.qkv_proj[:q],
                    k_proj=fl.qkv_proj[q : q + kv],
                    v_proj=fl.qkv_proj[q + kv :],
                    o_proj=fl.o_proj,
                    gate_proj=fl.gate_up_proj[:inter],
                    up_proj=fl.gate_up_proj[inter:],
                    down_proj=fl.down_proj,
                    biases=biases,
                )
            )
        return cls(config, embed_tokens, split, final_norm, lm_head, tp, vocab_start)

    def shard(self, tp: Any) -> BaseModelView:
        """Rank ``tp.rank``'s shards of this whole view, laid out as SGLang shards the served
        model (copies: for tests and tools; a server's view aliases its own shards)."""
        if self.tp is not None:
            raise ValueError("this view is a shard already")
        self.config.sharded(tp.size)  # raises if the shapes do not split evenly
        rows = {  # [out, in] tensors: column parallel slices rows, row parallel columns
            "q_proj": (tp.slice(self.config.q_size), slice(None)),
            "k_proj": (tp.slice(self.config.kv_size), slice(None)),
            "v_proj": (tp.slice(self.config.kv_size), slice(None)),
            "gate_proj": (tp.slice(self.config.intermediate_size), slice(None)),
            "up_proj": (tp.slice(self.config.intermediate_size), slice(None)),
            "o_proj": (slice(None), tp.slice(self.config.q_size)),
            "down_proj": (slice(None), tp.slice(self.config.intermediate_size)),
        }
        layers = [
            LayerWeights(
                input_norm=lw.input_norm.clone(),
                post_norm=lw.post_norm.clone(),
                **{name: lw.weight(name)[rows[name]].clone() for name in PROJECTIONS},
                # a row parallel layer's bias is added once, after the ranks' sum
                biases={
                    name: b.clone() if name in ("o_proj", "down_proj") else b[rows[name][0]].clone()
                    for name, b in lw.biases.items()
                },
            )
            for lw in self.layers
        ]
        per = -(-self.config.vocab_size // tp.size)  # vocabulary rows per rank, the last short
        vocab = slice(tp.rank * per, (tp.rank + 1) * per)
        return BaseModelView(
            self.config,
            self.embed_tokens[vocab].clone(),
            layers,
            self.final_norm.clone(),
            self.lm_head[vocab].clone(),
            tp,
            vocab_start=tp.rank * per,
        )

    @classmethod
    def from_hf(cls, model: Any) -> BaseModelView:
        """A view over a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``."""
        config = ModelConfig.from_hf_config(model.config)
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            biases = {
                name: getattr(attn, name).bias
                for name in ATTENTION_PROJECTIONS
                if getattr(attn, name).bias is not None
            }
            layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    **{n: getattr(attn, n).weight for n in ATTENTION_PROJECTIONS},
                    **{n: getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")},
                    biases=biases,
                )
            )
        return cls(
            config,
            model.model.embed_tokens.weight,
            layers,
            model.model.norm.weight,
            model.lm_head.weight,
        )

    def _check_shapes(self) -> None:
        c = self.local
        if len(self.layers) != c.num_layers:
            raise ValueError(f"{len(self.layers)} layers, config says {c.num_layers}")
        rows = c.vocab_size if self.tp is None else self.embed_tokens.shape[0]
        for t, name in ((self.embed_tokens, "embed_tokens"), (self.lm_head, "lm_head")):
            if tuple(t.shape) != (rows, c.hidden_size):
                raise ValueError(f"{name} is {tuple(t.shape)}, want ({rows}, hidden)")
        for i, layer in enumerate(self.layers):
            for name in PROJECTIONS:
                fan_in, fan_out = c.projection_shape(name)
                if tuple(layer.weight(name).shape) != (fan_out, fan_in):
                    raise ValueError(
                        f"layer {i} {name} is {tuple(layer.weight(name).shape)}, "
                        f"want ({fan_out}, {fan_in})"
                    )
            for name, b in layer.biases.items():
                if tuple(b.shape) != (c.projection_shape(name)[1],):
                    raise ValueError(f"layer {i} {name} bias is {tuple(b.shape)}")
