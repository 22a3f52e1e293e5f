"""What runs first in each spawned scheduler process.

SGLang starts schedulers with the spawn method, so a patch made in the launcher does not exist
in the child. ``launch_server`` hands SGLang this function (bound to our config) as its
``run_scheduler_process_func``; it swaps in ``HarliScheduler`` and then runs SGLang's own
``run_scheduler_process``, which constructs the scheduler through that module global.
"""

from __future__ import annotations

import functools

from sglang_harli.config import HarliConfig


def run_scheduler_process(harli_config: HarliConfig, *args, **kwargs):
    from sglang.srt.managers import scheduler as sglang_scheduler

    from sglang_harli.srt.scheduler import HarliScheduler

    sglang_scheduler.Scheduler = functools.partial(HarliScheduler, harli_config=harli_config)
    return sglang_scheduler.run_scheduler_process(*args, **kwargs)
