"""Start SGLang's HTTP server with the Harli pieces attached (main process).

Harli mode: our routes (``http_api.py``), the model ids of ``model_ids.py`` (``/v1/models`` lists
``<base>:<adapter>``; a bare adapter name reaches its adapter), our scheduler in every scheduler
process, and, once SGLang answers, the adapter publisher, which calls SGLang at SGLang's own
address (https under ``--ssl-certfile``), trusting the server's certificate, with its admin or
api key (``loopback.ServerEndpoint``). Mode ``off``: SGLang's own ``run_server``, nothing of
ours but ``/harli/status``.
"""

from __future__ import annotations

import functools
import os

from sglang_harli.config import HarliConfig
from sglang_harli.finetune.base_model import PROJECTIONS
from sglang_harli.jobs.hyperparameters import ServingLimits


def serving_limits(server_args) -> ServingLimits:
    targets = list(server_args.lora_target_modules or [])
    if "all" in targets or not targets:
        targets = list(PROJECTIONS)
    return ServingLimits(
        max_lora_rank=server_args.max_lora_rank,
        target_modules=tuple(m for m in PROJECTIONS if m in targets),
    )


def run(server_args, harli_config: HarliConfig) -> None:
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils import kill_process_tree

    from sglang_harli.srt import model_ids, process
    from sglang_harli.srt.http_api import mount_routes

    limits = serving_limits(server_args) if harli_config.enabled else None
    mount_routes(http_server.app, harli_config, limits)
    if harli_config.enabled:
        model_ids.install(http_server.app)
    try:
        if harli_config.enabled:
            http_server.launch_server(
                server_args,
                run_scheduler_process_func=functools.partial(
                    process.run_scheduler_process, harli_config
                ),
                launch_callback=functools.partial(_start_publisher, server_args, harli_config),
            )
        else:
            from sglang.launch_server import run_server

            run_server(server_args)  # exactly SGLang's dispatch
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def _start_publisher(server_args, harli_config: HarliConfig) -> None:
    """Runs once the server answers: finished adapters are loaded through its own API."""
    from sglang.srt.entrypoints.http_server import get_global_state

    from sglang_harli.jobs.store import open_store
    from sglang_harli.srt.loopback import ServerEndpoint
    from sglang_harli.srt.publisher import AdapterPublisher

    # the name jobs are created for (the API checks it): adapters of other models are not ours
    model = get_global_state().tokenizer_manager.served_model_name
    endpoint = ServerEndpoint.from_server_args(server_args)
    AdapterPublisher(open_store(harli_config.state_dir), endpoint, model).start()
