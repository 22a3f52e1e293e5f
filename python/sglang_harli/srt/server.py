"""Start SGLang's HTTP server with the Harli pieces attached (main process)."""

from __future__ import annotations

import functools
import os

from sglang_harli.config import HarliConfig


def run(server_args, harli_config: HarliConfig) -> None:
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils import kill_process_tree

    from sglang_harli.srt import process
    from sglang_harli.srt.http_api import mount_routes

    mount_routes(http_server.app, harli_config)
    try:
        if harli_config.enabled:
            http_server.launch_server(
                server_args,
                run_scheduler_process_func=functools.partial(
                    process.run_scheduler_process, harli_config
                ),
            )
        else:
            from sglang.launch_server import run_server

            run_server(server_args)  # exactly SGLang's dispatch
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
