"""The KV lender: free KV-cache slots lent to fine-tuning, and taken back before decode needs them.

SGLang sizes its KV pool for the worst case, and a decode instance rarely fills it. The lender
takes runs of free slots out of SGLang's allocator (so SGLang cannot hand them out), gives the
arena their rows of every layer's K and V buffer (``2 x layers`` chunks per run), and gives them
back through SGLang's own free path:

- **what it lends**: free slots, up to ``max_fraction`` of the pool, one run of
  ``lease_tokens`` slots at a time, and only while what decode may need next, plus
  ``headroom_tokens``, stays free;
- **cached prefixes are reclaimable memory**: SGLang's radix cache keeps every finished
  request's KV until a request needs the room, so under steady traffic it soon holds nearly the
  whole pool and nothing is free. As SGLang itself does when a request needs room, the lender
  evicts the least recently used *unreferenced* entries (lock count 0: never a running
  request's) to lend their slots, but only down to a floor (``cache_floor`` of the pool stays
  cached, give or take one cached node) and never while requests wait in the queue (the
  prefixes they matched would be lost to them). The floor is a fraction, not a hit-rate rule:
  on the replays the prefixes reused are few and recent (``docs/memory.md``);
- **reclaim**: before SGLang plans each batch (``get_next_batch_to_run``) and, on a PD decode
  server, before it pre-allocates for incoming transfers, :meth:`KVLender.reclaim` revokes
  leases until the free slots cover that demand: the running requests' remaining output
  tokens, the waiting queue's prompts and outputs, the PD pre-allocation queue and SGLang's
  reserved decode tokens. Each request counts at most SGLang's own clip of ``max_new_tokens``
  (``SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION``), which is what its admission assumes, times 1 (not
  SGLang's new-token ratio): SGLang never retracts, refuses or delays a request because slots
  are lent. Leases with nothing in use go first, then those with the least;
- after a reclaim it lends again only after ``relend_delay_s``: a burst usually comes with more;
- on a GPU, before revoked slots go back, SGLang's streams wait on an event recorded after the
  last finetune work (not a device-wide sync): decode never writes KV the finetune still reads;
- **the leak check stays exact**: SGLang's idle check asserts that the pool's counters add up
  to its size; lent slots are added to its ``uncached`` term (:func:`account_lent_slots`), so a
  slot lost for real is still caught.

Lending works on ``TokenToKVPoolAllocator`` and ``PagedTokenToKVPoolAllocator`` (whole pages)
over an ``MHATokenToKVPool``; ``HarliScheduler`` refuses other pools at start-up.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

import torch
from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

from sglang_harli.corun.stats import Window
from sglang_harli.memory.arena import Arena

logger = logging.getLogger(__name__)

LEASES_PER_POOL = 16  # a lease is 1/16 of the pool: reclaims give back about what is needed
MAX_REPORTED_BLOCKS = 256  # arena blocks listed in the status (addresses, for checks)


@dataclasses.dataclass(frozen=True)
class LendConfig:
    max_fraction: float  # of the pool's slots, lent at most
    headroom_tokens: int  # kept free beyond the demand, for decode growth
    relend_delay_s: float  # after a reclaim, no lending for this long
    cache_floor: float  # of the pool's slots, kept in the radix cache when lending evicts


@dataclasses.dataclass
class _Run:
    lo_page: int
    pages: int


@dataclasses.dataclass
class LendStats:
    lends: int = 0
    lent_peak_slots: int = 0
    reclaims: int = 0  # reclaim calls that revoked something
    reclaimed_slots: int = 0
    revoked_in_use: int = 0  # leases revoked with finetune data in them
    released_all: int = 0  # every lease given back: no job trains
    cache_evicted_slots: int = 0  # radix-cache tokens evicted to lend their slots
    fence_waits: int = 0  # give-backs that waited for finetune units in flight
    fence_wait_s: float = 0.0  # and for how long, in all


class KVLender:
    def __init__(self, scheduler, config: LendConfig, arena: Arena):
        self.scheduler, self.config, self.arena = scheduler, config, arena
        self.allocator = scheduler.token_to_kv_pool_allocator
        self.kv = self.allocator.get_kvcache()
        self.page_size = self.allocator.page_size
        self.total_slots = scheduler.max_total_num_tokens
        pages = max(1, self.total_slots // LEASES_PER_POOL // self.page_size)
        self.lease_pages = pages
        self.slot_bytes = sum(
            b[0].nbytes for b in (*self.kv.k_buffer, *self.kv.v_buffer)
        )  # one slot's rows, all layers, K and V
        self.stats = LendStats()
        self._runs: dict[int, _Run] = {}  # arena lease id -> the slots it is
        self._relend_at = 0.0
        self._reclaim_ms = Window(256)  # recent reclaim latencies
        self._finetune_done: Any = None  # a CUDA event after the last finetune work
        # the executor's last fence (corun/executor.py): units in flight may use lent slots,
        # so a lease goes back to decode only once they have finished
        self.fence: Any = None

    # --- what is lent ------------------------------------------------------------------------

    @property
    def lent_slots(self) -> int:
        return sum(run.pages for run in self._runs.values()) * self.page_size

    @property
    def limit_slots(self) -> int:
        return int(self.config.max_fraction * self.total_slots)

    def demand(self) -> int:
        """Free slots SGLang may need before the next batch: see the module docstring."""
        s = self.scheduler
        reqs = {id(r): r for r in getattr(s.running_batch, "reqs", None) or []}
        last = s.last_batch
        if last is not None and last.forward_mode.is_extend():
            reqs.update((id(r), r) for r in last.reqs)  # merged into the running batch next
        ps = self.page_size
        need = sum(_remaining(r) + ps for r in reqs.values())
        waiting = list(s.waiting_queue)
        prealloc = getattr(s, "disagg_decode_prealloc_queue", None)
        if prealloc is not None:
            waiting += [d.req for d in prealloc.queue]
            need += prealloc.num_reserved_decode_tokens
        chunked = getattr(s, "chunked_req", None)
        if chunked is not None:
            waiting.append(chunked)
        need += sum(len(r.origin_input_ids) + _remaining(r) + ps for r in waiting)
        return need + self.config.headroom_tokens

    # --- taking back -------------------------------------------------------------------------

    def reclaim(self) -> int:
        """Revoke leases until the free slots cover :meth:`demand`; returns slots given back."""
        if not self._runs:
            return 0
        need = self.demand()
        if self.allocator.available_size() >= need:
            return 0
        start = time.perf_counter()
        freed = 0
        # the cheapest first: leases nobody uses, then the least used
        for lease in sorted(self._runs, key=self.arena.lease_in_use):
            freed += self._give_back(lease)
            if self.allocator.available_size() >= need:
                break
        self._note_reclaim(start, freed)
        return freed

    def release_all(self) -> int:
        """Every lease back (no job trains, or the server stops lending)."""
        if not self._runs:
            return 0
        start = time.perf_counter()
        freed = sum(self._give_back(lease) for lease in list(self._runs))
        self._note_reclaim(start, freed)
        self.stats.released_all += 1
        return freed

    def _note_reclaim(self, start: float, freed: int) -> None:
        self.stats.reclaims += 1
        self.stats.reclaimed_slots += freed
        self._reclaim_ms.add((time.perf_counter() - start) * 1e3)
        self._relend_at = time.monotonic() + self.config.relend_delay_s

    def _give_back(self, lease: int) -> int:
        fence = None if self.fence is None else self.fence()
        if fence is not None and not fence.done():
            began = time.perf_counter()
            fence.wait()
            self.stats.fence_waits += 1
            self.stats.fence_wait_s += time.perf_counter() - began
        run = self._runs.pop(lease)
        if self.arena.lease_in_use(lease):
            self.stats.revoked_in_use += 1
        self.arena.revoke(lease)
        self._fence()
        pages = torch.arange(
            run.lo_page, run.lo_page + run.pages, dtype=torch.int64, device=self.allocator.device
        )
        self.allocator.free_page_ids(pages)  # SGLang's own free path
        return run.pages * self.page_size

    def mark_finetune_work(self) -> None:
        """After finetune work that may touch the arena: on a GPU, what a give-back waits for."""
        if self.allocator.device != "cpu" and torch.cuda.is_available():
            self._finetune_done = torch.cuda.Event()
            self._finetune_done.record()

    def _fence(self) -> None:
        if self._finetune_done is None:
            return
        streams = {torch.cuda.current_stream()}
        forward_stream = getattr(self.scheduler, "forward_stream", None)
        if isinstance(forward_stream, torch.cuda.Stream):
            streams.add(forward_stream)
        for stream in streams:
            stream.wait_event(self._finetune_done)

    # --- lending -----------------------------------------------------------------------------

    def lend(self) -> int:
        """Lend one more run of free slots if the limits allow; returns slots lent."""
        if time.monotonic() < self._relend_at:
            return 0
        pages = min(self.lease_pages, (self.limit_slots - self.lent_slots) // self.page_size)
        if pages < 1:
            return 0  # at the limit: no need to look at the queues
        demand = self.demand()
        spare = self.allocator.available_size() - demand
        if spare < pages * self.page_size:
            spare += self._evict_cache(pages * self.page_size - spare)
        pages = min(pages, spare // self.page_size)
        if pages < 1:
            return 0
        run = self._take_run(pages)
        if run is None:
            return 0
        lo, hi = run.lo_page * self.page_size, (run.lo_page + run.pages) * self.page_size
        chunks = [b[lo:hi] for b in (*self.kv.k_buffer, *self.kv.v_buffer)]
        self._runs[self.arena.add_lease(chunks)] = run
        self.stats.lends += 1
        self.stats.lent_peak_slots = max(self.stats.lent_peak_slots, self.lent_slots)
        return hi - lo

    def most_fitting(self, nbytes: int) -> int:
        """How many blocks of ``nbytes`` lent slots could ever hold: every lease the limit
        allows at full length, each chunk (a layer's K or V rows of the run) empty. A job whose
        smallest micro-batch needs more can never run on lent memory alone."""
        lease_slots = self.lease_pages * self.page_size
        full, rest = divmod(self.limit_slots // self.page_size * self.page_size, lease_slots)
        rows = [b[0].nbytes for b in (*self.kv.k_buffer, *self.kv.v_buffer)]

        def per_lease(slots: int) -> int:
            return sum(self.arena.fitting_in(slots * row, nbytes) for row in rows)

        return full * per_lease(lease_slots) + (per_lease(rest) if rest else 0)

    def cache_floor_slots(self) -> int:
        return int(self.config.cache_floor * self.total_slots)

    def _cached_slots(self) -> int | None:
        """Slots the radix cache holds that no request does (what lending may evict)."""
        cache = getattr(self.scheduler, "tree_cache", None)
        return None if cache is None else int(cache.evictable_size())

    def _evict_cache(self, tokens: int) -> int:
        """Up to ``tokens`` of the least recently used unreferenced radix-cache entries freed,
        leaving the cache at least its floor; nothing while requests wait. Returns slots freed."""
        cache = getattr(self.scheduler, "tree_cache", None)
        if cache is None or self.scheduler.waiting_queue:
            return 0
        evictable = cache.evictable_size()
        tokens = min(tokens, evictable - self.cache_floor_slots())
        if tokens <= 0:
            return 0
        before = self.allocator.available_size()
        self.allocator.evict_to_free_tokens(cache, before + tokens)  # SGLang's own eviction
        freed = self.allocator.available_size() - before
        self.stats.cache_evicted_slots += max(0, freed)
        return max(0, freed)

    def _take_run(self, pages: int) -> _Run | None:
        """Up to ``pages`` consecutive free pages, out of SGLang's free list: the highest run
        long enough (SGLang allocates from the low end), else the longest there is."""
        a = self.allocator
        a.merge_and_sort_free()  # staged frees folded in
        free = a.free_pages
        if free.numel() == 0:
            return None
        ids = torch.sort(free).values
        breaks = torch.nonzero(ids[1:] - ids[:-1] != 1).flatten()
        ends = torch.cat([breaks, breaks.new_tensor([ids.numel() - 1])])
        starts = torch.cat([breaks.new_tensor([0]), breaks + 1])
        lengths = ends - starts + 1
        long_enough = torch.nonzero(lengths >= pages).flatten()
        k = int(long_enough[-1]) if long_enough.numel() else int(torch.argmax(lengths))
        hi = int(ids[ends[k]]) + 1
        lo = hi - min(pages, int(lengths[k]))
        a.free_pages = free[(free < lo) | (free >= hi)]  # SGLang's order kept
        return _Run(lo, hi - lo)

    # --- reporting ---------------------------------------------------------------------------

    def recent_reclaim_ms(self, n: int) -> list[float]:
        return list(self._reclaim_ms.values)[-n:] if n > 0 else []

    def to_dict(self) -> dict[str, Any]:
        lent = self.lent_slots
        return {
            "kv_lent_slots": lent,
            "kv_lent_bytes": lent * self.slot_bytes,
            "kv_lent_leases": len(self._runs),
            "kv_lent_limit_slots": self.limit_slots,
            "kv_pool_slots": self.total_slots,
            "kv_dtype": str(self.kv.dtype).removeprefix("torch."),
            "kv_cache_floor_slots": self.cache_floor_slots(),
            "kv_cached_slots": self._cached_slots(),
            "kv_available_slots": self.allocator.available_size(),
            "kv_lend_stats": dataclasses.asdict(self.stats),
            "kv_reclaim_ms": {
                "p50": self._reclaim_ms.quantile(0.5),
                "p99": self._reclaim_ms.quantile(0.99),
                "max": max(self._reclaim_ms.values, default=None),
            },
            "arena": self.arena.to_dict(),
            # addresses, so a check can see that finetune tensors lie inside the KV buffers
            "kv_buffers": [
                [b.data_ptr(), b.nbytes] for b in (*self.kv.k_buffer, *self.kv.v_buffer)
            ],
            "arena_blocks": [
                [b.tensor.data_ptr(), b.nbytes]
                for b in itertools.islice(self.arena.blocks(), MAX_REPORTED_BLOCKS)
            ],
        }


def _remaining(req) -> int:
    """Output tokens a request may still need KV for, as SGLang's admission counts them."""
    max_new = req.sampling_params.max_new_tokens
    if max_new is None:
        max_new = CLIP_MAX_NEW_TOKENS
    return max(0, min(max_new, CLIP_MAX_NEW_TOKENS) - len(req.output_ids))


def account_lent_slots(scheduler, lender: KVLender) -> None:
    """Keep SGLang's pool-leak check on and exact: lent slots count as held, nothing else."""
    checker = scheduler.invariant_checker
    base = type(checker)

    class LentAwareChecker(base):
        __slots__ = ()

        def _check_full_pool(self, ps, uncached: int = 0):
            return super()._check_full_pool(ps, uncached + lender.lent_slots)

    checker.__class__ = LentAwareChecker
