"""The SGLang flags that size LoRA serving for finished jobs' adapters.

A Harli server adds them (``launch_server.py``) unless the user gave them; the replay gives the
same to its ``off`` server (``bench/replay.py``), so plain SGLang is measured on the decode path
the Harli modes run on (LoRA serving costs decode time whether or not a job trains).
"""

from __future__ import annotations

from collections.abc import Callable

from sglang_harli.finetune.base_model import PROJECTIONS

# What --enable-lora is sized for when the user does not say.
DEFAULT_MAX_LORA_RANK = 16


def lora_serving_flags(has_flag: Callable[[str], bool] = lambda flag: False) -> list[str]:
    """SGLang flags that size LoRA serving for finished jobs' adapters, unless given."""
    flags = [] if has_flag("--enable-lora") else ["--enable-lora"]
    if not has_flag("--max-lora-rank"):
        flags += ["--max-lora-rank", str(DEFAULT_MAX_LORA_RANK)]
    if not has_flag("--lora-target-modules"):
        flags += ["--lora-target-modules", *PROJECTIONS]
    return flags
