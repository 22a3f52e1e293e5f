"""``HarliScheduler``: SGLang's Scheduler with the co-run hooks.

It runs SGLang's own event loops unchanged; the hooks wrap three of the methods those loops call:

- ``get_next_batch_to_run`` (and its PD-decode twin): KV slots lent to finetuning must be back
  before SGLang decides whether it has room, or it would retract requests instead;
- ``run_batch`` on decode batches: the moment to decide how much finetune work runs beside
  this decode iteration;
- ``on_idle``: no batch runs, so finetune work may use the whole device in bounded quanta.

Every hook counts its calls and the time spent in our code, so the overhead Harli adds to
SGLang's loop is measured, not assumed (``GET /harli/status``). No KV is lent and no finetune
job runs yet, so the reclaim and idle hooks have nothing to do beyond being timed.
"""

from __future__ import annotations

import logging

from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_harli.config import HarliConfig
from sglang_harli.scheduler.stats import DecodeStats, HookStats
from sglang_harli.srt.support import UnsupportedConfigError

logger = logging.getLogger(__name__)

SUPPORTED_ALLOCATORS = (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator)


class HarliScheduler(Scheduler):
    def __init__(self, server_args, port_args, *, harli_config: HarliConfig):
        super().__init__(server_args, port_args)
        self.harli_config = harli_config
        self.harli_stats = HookStats()
        self._check_kv_pools()
        logger.info("Harli scheduler active (mode %s)", harli_config.mode)

    def _check_kv_pools(self) -> None:
        """Lending KV slots needs a plain MHA token pool; refuse any other kind clearly."""
        allocator = self.token_to_kv_pool_allocator
        kvcache = allocator.get_kvcache()
        if type(allocator) not in SUPPORTED_ALLOCATORS or type(kvcache) is not MHATokenToKVPool:
            raise UnsupportedConfigError(
                f"sglang-harli needs a plain MHA KV pool, but this server built "
                f"{type(allocator).__name__} over {type(kvcache).__name__} (hybrid, mamba, MLA "
                "and quantized KV pools are not supported); run with --harli-mode off"
            )

    # --- hooks -------------------------------------------------------------------------------

    def get_next_batch_to_run(self, running_batch, last_batch):
        with self.harli_stats.timed("reclaim_kv"):
            self._harli_reclaim_kv()
        return super().get_next_batch_to_run(running_batch, last_batch)

    def get_next_disagg_decode_batch_to_run(self, running_batch):
        with self.harli_stats.timed("reclaim_kv"):
            self._harli_reclaim_kv()
        return super().get_next_disagg_decode_batch_to_run(running_batch)

    def run_batch(self, batch, pp_proxy_tensors=None):
        if batch.forward_mode.is_decode():
            with self.harli_stats.timed("before_decode"):
                self.harli_stats.record_decode(decode_stats(batch))
        return super().run_batch(batch, pp_proxy_tensors)

    def on_idle(self):
        with self.harli_stats.timed("idle"):
            pass  # the idle finetune quantum goes here once jobs run (issue 4)
        return super().on_idle()

    def _harli_reclaim_kv(self) -> None:
        """Give lent KV slots back before SGLang sizes its next batch (nothing is lent yet)."""

    # --- reporting ---------------------------------------------------------------------------

    def get_internal_state(self, recv_req):
        # Rides on SGLang's own scheduler RPC, so /harli/status needs no channel of its own.
        output = super().get_internal_state(recv_req)
        output.internal_state["harli"] = {
            "mode": self.harli_config.mode,
            **self.harli_stats.to_dict(),
        }
        return output


def decode_stats(batch) -> DecodeStats:
    if batch.seq_lens_cpu is not None and len(batch.seq_lens_cpu) == batch.batch_size():
        seq_lens = batch.seq_lens_cpu.tolist()
    else:
        seq_lens = [req.seqlen for req in batch.reqs]
    return DecodeStats(
        batch_size=len(seq_lens),
        seq_lens_sum=int(sum(seq_lens)),
        seq_len_max=int(max(seq_lens, default=0)),
    )
