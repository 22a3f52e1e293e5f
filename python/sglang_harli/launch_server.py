"""``python -m sglang_harli.launch_server [--harli-*] [sglang flags]``.

SGLang's own HTTP server and OpenAI-compatible API, with the Harli scheduler injected into each
spawned scheduler process. Every flag that is not ``--harli-*`` goes to SGLang unchanged. With
no ``--model-path`` it serves SmolLM2-135M-Instruct built from PyPI (``default_model.py``; the
tiny random Llama of ``tiny_model.py`` without PyPI); without a CUDA driver it runs SGLang on the
CPU (``srt/cpu.py``). Nothing here imports SGLang before the CPU guards are in place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sglang_harli.config import DefaultModel, HarliConfigError, add_harli_args, parse_harli_args
from sglang_harli.srt import cpu
from sglang_harli.srt.support import UnsupportedConfigError, check_model_path, check_port_free

logger = logging.getLogger("sglang_harli")
PROG = "python -m sglang_harli.launch_server"
LOG_FORMAT = "[%(asctime)s harli] %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # our log level follows SGLang's --log-level (SGLang configures its own processes likewise)
    level = (cpu.flag_value(argv, "--log-level") or "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=LOG_FORMAT)
    on_cpu = not cpu.cuda_available()
    if on_cpu:
        cpu.enable()  # before anything imports SGLang
    if "-h" in argv or "--help" in argv:
        _help_parser().print_help()
        return 0
    try:
        harli_config, sglang_argv = parse_harli_args(argv)
        harli_config = harli_config.resolved(has_cuda=not on_cpu)
        sglang_argv = _expand_config_file(sglang_argv)
        embedded = _names_no_model(sglang_argv)
        sglang_argv = _with_model(sglang_argv, harli_config.default_model)
        harli_config = harli_config.with_objective_default(
            given=cpu.has_flag(argv, "--harli-tpot-slo-ms"), embedded_on_cpu=embedded and on_cpu
        )
        if harli_config.enabled:
            from sglang_harli.lora_serving import lora_serving_flags

            # finished jobs' adapters are served through SGLang's own LoRA serving
            sglang_argv += lora_serving_flags(lambda flag: cpu.has_flag(sglang_argv, flag))
        if on_cpu:
            extra = cpu.server_flags(sglang_argv)
            sglang_argv += extra
            os.environ.update(cpu.rank_env(sglang_argv, dict(os.environ)))  # before SGLang spawns
            logger.info("no CUDA driver: running SGLang on the CPU (%s)", cpu.describe(extra))

        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args

        load_plugins()
        server_args = prepare_server_args(sglang_argv)
        check_port_free(server_args.host, server_args.port)
        if harli_config.enabled:
            from sglang_harli.srt.support import check_server_args

            check_server_args(server_args)
    except (HarliConfigError, UnsupportedConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    from sglang_harli.srt.server import run

    run(server_args, harli_config)
    return 0


def _help_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SGLang's server with LoRA finetuning on its spare capacity. Every SGLang "
        "flag works as in `python -m sglang.launch_server`; --model-path defaults to "
        "SmolLM2-135M-Instruct, built once from PyPI (see --harli-default-model).",
    )
    ServerArgs.add_cli_args(parser)
    add_harli_args(parser)
    return parser


def _expand_config_file(argv: list[str]) -> list[str]:
    """Merge ``--config file.yaml`` into argv, as SGLang would, so our defaults see its flags."""
    if "--config" not in argv:
        return argv
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ConfigArgumentMerger(parser).merge_config_with_args(argv)


def _names_no_model(argv: list[str]) -> bool:
    """Whether SGLang's flags leave the model to us (the embedded default is served)."""
    return (cpu.flag_value(argv, "--model-path") or cpu.flag_value(argv, "--model")) is None


def _with_model(argv: list[str], default_model: DefaultModel) -> list[str]:
    """argv with the embedded default model when it names none, under its short name."""
    model_path = cpu.flag_value(argv, "--model-path") or cpu.flag_value(argv, "--model")
    if model_path is not None:
        check_model_path(model_path)
        return argv
    from sglang_harli.default_model import embedded_model

    model = embedded_model(default_model)
    argv = [*argv, "--model-path", str(model.path)]
    # clients name the model by this id (and adapters as <id>:<suffix>), not by a cache path
    if not cpu.has_flag(argv, "--served-model-name"):
        argv += ["--served-model-name", model.served_name]
    name = cpu.flag_value(argv, "--served-model-name")
    logger.info(
        "no --model-path: serving the %s from %s as %r", model.description, model.path, name
    )
    return argv


if __name__ == "__main__":
    sys.exit(main())
