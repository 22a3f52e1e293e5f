"""The tiny model: a random-weight Llama (or Qwen2) built locally, for tests and offline use.

The tests' models, and the server's model with ``--harli-default-model tiny`` or when the
default SmolLM2 cannot be downloaded (``default_model.py``), are built here with no network: a
byte-level BPE tokenizer trained on local text (this interpreter's standard-library sources), a
ChatML chat template, and seeded random weights saved as bf16 safetensors. A build is cached
under a name that encodes its settings, so the same settings always give the same directory,
built once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the build itself changes, so stale caches are not reused.
BUILD_VERSION = 1

STAGING = ".build-"  # a build's temporary directory: .build-<builder pid>-<random>
# A staging directory of a builder that may still run (its pid is alive: or reused) is left
# alone until it is this old; one without a pid (older builds) after an hour.
STALE_LIVE_S = 24 * 3600.0
STALE_UNKNOWN_S = 3600.0

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "llama"  # "llama" or "qwen2"
    vocab_size: int = 2000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    seed: int = 0
    tokenizer_files: int = 300

    def cache_name(self) -> str:
        key = json.dumps({**dataclasses.asdict(self), "build": BUILD_VERSION}, sort_keys=True)
        return f"tiny-{self.arch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def user_cache_dir() -> Path:
    """Where sglang-harli keeps what it builds: ``$XDG_CACHE_HOME/sglang_harli``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sglang_harli"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, a model directory that ``build`` fills, built only if it is not there yet.

    ``build`` fills a temporary sibling directory, renamed to ``target`` once whole: a crash or
    an error leaves no half-built model under the name later starts trust. What a killed build
    left (its builder is gone) is deleted by the next build in the same directory.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)  # atomic: a concurrent builder may have won, which is fine
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def remove_stale_builds(directory: Path, now: float | None = None) -> list[Path]:
    """Delete the staging directories under ``directory`` whose builder is dead (a build killed
    before it could clean up), or that are too old to be a live build's; the ones deleted."""
    now = time.time() if now is None else now
    removed = []
    for child in directory.glob(f"{STAGING}*"):
        pid_text = child.name[len(STAGING) :].split("-", 1)[0]
        pid = int(pid_text) if pid_text.isascii() and pid_text.isdigit() else None
        try:
            age = now - child.stat().st_mtime
        except FileNotFoundError:  # its builder finished meanwhile
            continue
        if pid is None:
            stale = age > STALE_UNKNOWN_S
        else:
            stale = not _alive(pid) or age > STALE_LIVE_S
        if stale and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        logger.info("removed %d unfinished model build(s) under %s", len(removed), directory)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def ensure_tiny_model(spec: TinyModelSpec = TinyModelSpec(), cache_dir: Path | None = None) -> Path:
    """The directory of the tiny model for ``spec``, building it on first use."""
    target = (cache_dir or user_cache_dir() / "models") / spec.cache_name()
    if not (target / "config.json").is_file():
        logger.info("building the tiny %s model once into %s", spec.arch, target)
    return build_once(target, lambda out: build_tiny_model(spec, out))


def build_tiny_model(spec: TinyModelSpec, out: Path) -> None:
    """Write tokenizer, config and random bf16 weights for ``spec`` into ``out``."""
    import torch
    import transformers

    tokenizer = _train_tokenizer(spec)
    tokenizer.save_pretrained(out)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        dtype="bfloat16",
    )
    if spec.arch == "llama":
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    elif spec.arch == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny-model architecture {spec.arch!r} (llama or qwen2)")
    torch.manual_seed(spec.seed)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")
    files = sorted(glob.glob(pattern, recursive=True))[: spec.tokenizer_files]
    if not files:
        raise RuntimeError(f"no local text to train the tokenizer on ({pattern})")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok
