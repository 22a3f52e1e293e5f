"""What sglang-harli can run on, checked at start-up so that nothing is silently ignored.

The finetune engine reads the served model's frozen weights in the Llama/Qwen2 layout and lends
slots of a plain MHA KV pool; the scheduler hooks sit in SGLang's HTTP server's scheduler
processes. Anything else is refused here, with the reason and the way out (``--harli-mode off``
runs plain SGLang and accepts every configuration SGLang does).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class UnsupportedConfigError(RuntimeError):
    """A server configuration sglang-harli cannot co-run finetuning with."""


def looks_like_local_path(model_path: str) -> bool:
    return model_path.startswith(("/", "./", "../", "~")) or Path(model_path).exists()


def check_model_path(model_path: str) -> None:
    """A local model path must exist (SGLang would otherwise try the model hub with it)."""
    path = Path(model_path).expanduser()
    if looks_like_local_path(model_path) and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UnsupportedConfigError(f"model path {model_path} {what}")


def check_port_free(host: str, port: int) -> None:
    """The HTTP port must be free before anything starts.

    SGLang binds it only after the model is loaded, and when that bind fails its shutdown joins
    its warmup thread, which polls the port 120 times (up to 5 s each when something else
    listens there) before it kills the server: minutes of a server that neither answers nor
    exits. Binding as uvicorn does (``SO_REUSEADDR``, so a socket in TIME_WAIT is no conflict)
    and closing again finds the common case; a port taken during start-up still waits so.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UnsupportedConfigError(f"--host {host}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UnsupportedConfigError(
                    f"port {port} on {host} is already in use; pick another with --port"
                ) from exc
            raise UnsupportedConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def check_server_args(server_args) -> None:
    """Refuse SGLang configurations the Harli scheduler cannot serve beside finetuning."""
    refusals = {
        "speculative decoding (--speculative-algorithm)": server_args.speculative_algorithm,
        "unified memory pools (--enable-unified-memory)": server_args.enable_unified_memory,
        "encoder-only servers (--encoder-only)": server_args.encoder_only,
        "the gRPC server (--smg-grpc-mode/--grpc-mode)": server_args.smg_grpc_mode
        or server_args.grpc_mode,
        "Ray launch (--use-ray)": server_args.use_ray,
        # the engine trains on tensor-parallel shards; a pipeline stage or a data-parallel
        # replica would hold a part of the model or of the requests the job knows nothing of
        "pipeline or data parallelism (--pp-size/--dp-size > 1)": max(
            server_args.pp_size, server_args.dp_size
        )
        > 1,
        # the fine-tuning API lives on the main process's app; extra tokenizer workers serve
        # HTTP from apps of their own, without it (and SGLang has no API keys there)
        "several tokenizer workers (--tokenizer-worker-num > 1)": (
            server_args.tokenizer_worker_num > 1
        ),
    }
    for what, requested in refusals.items():
        if requested:
            raise UnsupportedConfigError(
                f"sglang-harli does not support {what}; run with --harli-mode off for plain SGLang"
            )
    check_architecture(server_args.model_path, server_args.trust_remote_code, server_args.tp_size)


def check_architecture(model_path: str, trust_remote_code: bool = False, tp_size: int = 1) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to read it means we cannot vouch
        raise UnsupportedConfigError(
            f"cannot read the model config of {model_path}: {exc}"
        ) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedConfigError(
            f"sglang-harli supports {', '.join(SUPPORTED_ARCHITECTURES)}; {model_path} is "
            f"{', '.join(architectures) or 'of unknown architecture'}. "
            "Run with --harli-mode off for plain SGLang"
        )
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedConfigError(
            f"{model_path} uses sliding-window attention, which needs SGLang's hybrid KV pool; "
            "sglang-harli supports full attention only. Run with --harli-mode off for plain SGLang"
        )
    if tp_size > 1:
        from sglang_harli.finetune.base_model import ModelConfig

        try:
            ModelConfig.from_hf_config(config).sharded(tp_size)
        except ValueError as exc:  # SGLang would replicate KV heads: no shard to train on
            raise UnsupportedConfigError(
                f"{model_path} cannot be trained at --tp-size {tp_size}: {exc}. Choose a TP size "
                "that divides them, or run with --harli-mode off for plain SGLang"
            ) from exc
