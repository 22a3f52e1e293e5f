"""A real server whose scheduler also reports the loss of a fixed batch, through srt/weights.py.

``python -m test.srt.weights_probe OUT.json --model-path M [sglang flags]`` starts SGLang's HTTP
server like our launcher does, but each scheduler is a subclass of HarliScheduler that, once
SGLang has loaded the model, views its weights with ``base_model_view`` and writes to OUT.json
the loss of ``TOKENS`` and whether every viewed tensor lies in the served model's own storage.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from sglang_harli.config import HarliConfig

# loss on every token after the first
TOKENS = [1, 17, 300, 42, 99, 1500, 7, 256, 1024, 3, 64, 900]


def packed_batch():
    from sglang_harli.finetune.data import Example, pack

    return pack([Example(tuple(TOKENS), (False,) + (True,) * (len(TOKENS) - 1))])


def fp32_loss(view) -> float:
    import torch

    from sglang_harli.finetune.graph import loss_sum

    with torch.no_grad():
        return float(loss_sum(view, None, packed_batch(), dtype=torch.float32, training=False))


def run_scheduler_process(out_path: str, *args, **kwargs):
    from sglang.srt.managers import scheduler as sglang_scheduler

    from sglang_harli.srt.scheduler import HarliScheduler
    from sglang_harli.srt.weights import base_model_view

    class ProbeScheduler(HarliScheduler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            model = self.tp_worker.model_runner.model
            view = base_model_view(model)
            served = {p.untyped_storage().data_ptr() for p in model.parameters()}
            report = {
                "loss": fp32_loss(view),
                "shares_storage": all(
                    t.untyped_storage().data_ptr() in served for t in view.tensors()
                ),
                "requires_grad": any(t.requires_grad for t in view.tensors()),
                "dtype": str(view.dtype),
            }
            with open(out_path, "w") as f:
                json.dump(report, f)

    state_dir = os.path.join(os.path.dirname(out_path), "state")
    sglang_scheduler.Scheduler = functools.partial(
        ProbeScheduler, harli_config=HarliConfig(mode="time-sliced", state_dir=state_dir)
    )
    return sglang_scheduler.run_scheduler_process(*args, **kwargs)


def main(out_path: str, argv: list[str]) -> None:
    from sglang_harli.srt import cpu

    if not cpu.cuda_available():
        cpu.enable()
        argv = [*argv, *cpu.server_flags(argv)]
    from sglang.srt.entrypoints import http_server
    from sglang.srt.server_args import prepare_server_args

    http_server.launch_server(
        prepare_server_args(argv),
        run_scheduler_process_func=functools.partial(run_scheduler_process, out_path),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
