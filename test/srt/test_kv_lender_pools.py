"""The KV lender against SGLang's real KV allocators and MHA pool, built on the CPU (no server).

``KVLender`` reaches into SGLang's ``TokenToKVPoolAllocator`` (page size 1) and
``PagedTokenToKVPoolAllocator`` (page size 4), with and without ``need_sort`` (the PD servers'
staged, sorted free list), over a small ``MHATokenToKVPool``. Every check is phrased as what
SGLang itself would observe: its free list, ``available_size()``, what its ``alloc`` paths hand
out, the bytes of its K/V buffers, its radix cache's eviction and its idle leak check
(``SchedulerInvariantChecker``). The scheduler is a ``SimpleNamespace`` holding the attributes
the lender reads; requests are namespaces with the fields SGLang's ``Req`` has.
"""

from __future__ import annotations

import random
import time
import types
from array import array

import pytest
import torch  # noqa: E402
from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: E402
from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS  # noqa: E402
from sglang.srt.managers.scheduler_components.invariant_checker import (  # noqa: E402
    SchedulerInvariantChecker,
)
from sglang.srt.managers.scheduler_components.pool_stats_observer import (  # noqa: E402
    SchedulerPoolStatsObserver,
)
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402

from sglang_harli.memory.arena import Arena  # noqa: E402
from sglang_harli.srt import kv_lender  # noqa: E402
from sglang_harli.srt.kv_lender import KVLender, LendConfig, account_lent_slots  # noqa: E402

POOL = 256  # slots
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
DTYPE = torch.bfloat16
SLOT_BYTES = 2 * LAYERS * HEADS * HEAD_DIM * DTYPE.itemsize  # one slot: K and V, every layer

POOLS = [(1, False), (1, True), (4, False), (4, True)]
POOL_IDS = ["ps1", "ps1-need_sort", "ps4", "ps4-need_sort"]


# --- SGLang's pools, and a scheduler the lender can read ------------------------------------


def build_allocator(page_size: int, need_sort: bool):
    """The allocator SGLang builds for this page size (kv_cache_configurator), over its pool."""
    kv = MHATokenToKVPool(
        POOL,
        page_size=page_size,
        dtype=DTYPE,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )
    if page_size == 1:
        return TokenToKVPoolAllocator(
            POOL, dtype=DTYPE, device="cpu", kvcache=kv, need_sort=need_sort
        )
    return PagedTokenToKVPoolAllocator(
        POOL, page_size=page_size, dtype=DTYPE, device="cpu", kvcache=kv, need_sort=need_sort
    )


@pytest.fixture(params=POOLS, ids=POOL_IDS)
def allocator(request):
    return build_allocator(*request.param)


def make_req(prompt: int, max_new: int | None, out: int = 0):
    """The fields of SGLang's Req that the lender's demand reads."""
    return types.SimpleNamespace(
        origin_input_ids=list(range(prompt)),
        output_ids=[0] * out,
        sampling_params=types.SimpleNamespace(max_new_tokens=max_new),
    )


def make_scheduler(allocator, *, running=(), waiting=(), tree_cache=None):
    return types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator,
        max_total_num_tokens=allocator.size,
        running_batch=types.SimpleNamespace(reqs=list(running)),
        last_batch=None,
        waiting_queue=list(waiting),
        chunked_req=None,
        tree_cache=tree_cache,
    )


def make_lender(
    scheduler,
    *,
    fraction: float = 0.5,
    headroom: int = 0,
    relend_delay_s: float = 0.0,
    cache_floor: float = 0.25,
    poison: bool = False,
    align: int = 256,
) -> tuple[KVLender, Arena]:
    arena = Arena(poison=poison, align=align)
    config = LendConfig(
        max_fraction=fraction,
        headroom_tokens=headroom,
        relend_delay_s=relend_delay_s,
        cache_floor=cache_floor,
    )
    return KVLender(scheduler, config, arena), arena


def make_radix_cache(allocator) -> RadixCache:
    return RadixCache(
        CacheInitParams(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=allocator,
            page_size=allocator.page_size,
        )
    )


def cache_pages(cache: RadixCache, slots: torch.Tensor, first_token: int) -> None:
    """Put ``slots`` in the radix cache as one-page entries (distinct keys, each a leaf), as
    finished requests leave their prefixes: evictable, held by no request."""
    ps = cache.page_size
    for i, page in enumerate(slots.view(-1, ps)):
        key = RadixKey(array("q", [first_token + i] + [0] * (ps - 1)))
        cache.insert(InsertParams(key=key, value=page.clone()))


# --- what SGLang sees -----------------------------------------------------------------------


def free_pages(allocator) -> list[int]:
    """Every page SGLang may still hand out (staged frees included), in its order."""
    return allocator.get_all_free_pages().tolist()


def all_pages(allocator) -> list[int]:
    return list(range(1, allocator.size // allocator.page_size + 1))  # page 0 is padding


def pages_of(slots: torch.Tensor, page_size: int) -> set[int]:
    return set((slots // page_size).tolist())


def hold(allocator, keep, rng: random.Random) -> set[int]:
    """SGLang's own alloc and free, leaving the pages where ``keep(page)`` allocated (as live
    requests would) and the free list out of order: everything is allocated, then the rest
    freed one page at a time in random order."""
    ps = allocator.page_size
    slots = allocator.alloc(allocator.available_size())
    pages = sorted(pages_of(slots, ps))
    for page in rng.sample(pages, len(pages)):
        if not keep(page):
            allocator.free(torch.arange(page * ps, (page + 1) * ps))
    return {p for p in pages if keep(p)}


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive page ids, as [lo, hi)."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def lend_all(lender: KVLender) -> int:
    """lend() until it lends nothing more (bounded: a lender that never stops fails)."""
    total = 0
    for _ in range(200):
        n = lender.lend()
        if n == 0:
            return total
        total += n
    raise AssertionError("lend() never stopped lending")


def buffers(allocator) -> list[torch.Tensor]:
    kv = allocator.get_kvcache()
    return [*kv.k_buffer, *kv.v_buffer]


def fill_arena(arena: Arena, value: float) -> list:
    """Allocate small blocks until the arena is full, and write ``value`` through each."""
    blocks = []
    while (block := arena.alloc((HEAD_DIM,), DTYPE)) is not None:
        block.tensor.fill_(value)
        blocks.append(block)
    return blocks


# --- lend -----------------------------------------------------------------------------------


def test_lend_takes_one_run_of_free_pages_out_of_sglangs_free_list(allocator):
    ps = allocator.page_size
    # live requests hold 2 pages in every 20: free runs of 18 pages, out of order
    held = hold(allocator, lambda p: p % 20 in (0, 1), random.Random(1))
    allocator.merge_and_sort_free()  # lend() folds staged frees in first: compare after that
    before, available = free_pages(allocator), allocator.available_size()
    lender, _ = make_lender(make_scheduler(allocator))

    got = lender.lend()

    after = free_pages(allocator)
    lent = set(before) - set(after)
    assert got == lender.lent_slots == len(lent) * ps == lender.lease_pages * ps > 0
    assert sorted(lent) == list(range(min(lent), max(lent) + 1))  # one run of pages
    # only the lent pages left SGLang's free list; the rest kept SGLang's order
    assert after == [p for p in before if p not in lent]
    assert allocator.available_size() == available - got
    # the top of the highest free run long enough (SGLang allocates from the low end)
    top = max(hi for lo, hi in runs(before) if hi - lo >= lender.lease_pages)
    assert max(lent) + 1 == top
    assert not lent & held

    # everything SGLang has left: never a lent page (nor a held one), and then nothing
    rest = allocator.alloc(allocator.available_size())
    assert rest is not None and rest.numel() == available - got
    assert not pages_of(rest, ps) & (lent | held)
    assert allocator.alloc(ps) is None


def test_lend_takes_the_longest_run_when_no_run_is_long_enough(allocator):
    ps = allocator.page_size
    held = hold(allocator, lambda p: p % 3 == 0, random.Random(2))  # free runs of 2 pages
    lender, _ = make_lender(make_scheduler(allocator))
    before = set(free_pages(allocator))

    got = lender.lend()

    lent = before - set(free_pages(allocator))
    assert got == 2 * ps and len(lent) == 2 and max(lent) - min(lent) == 1
    assert not lent & held


@pytest.mark.parametrize("need_sort", [False, True], ids=["ps4", "ps4-need_sort"])
def test_paged_alloc_extend_never_returns_lent_pages(need_sort):
    allocator = build_allocator(4, need_sort)
    if allocator.use_triton_kernels:
        pytest.skip("SGLang's Triton alloc kernels need GPU tensors")
    ps = allocator.page_size
    hold(allocator, lambda p: p % 20 in (0, 1), random.Random(3))
    lender, _ = make_lender(make_scheduler(allocator))
    before = set(free_pages(allocator))
    assert lend_all(lender) > 0
    lent = before - set(free_pages(allocator))

    # one prefill per free page (SGLang's extend path, no prefix): all of what is left
    rng = random.Random(4)
    seq_lens = [rng.randint(1, ps) for _ in range(allocator.available_size() // ps)]

    def extend(lens):
        seq = torch.tensor(lens, dtype=torch.int64)
        prefix = torch.zeros_like(seq)
        last_loc = torch.full_like(seq, -1)
        return allocator.alloc_extend(prefix, prefix, seq, seq, last_loc, int(seq.sum()))

    out = extend(seq_lens)
    assert out is not None and out.numel() == sum(seq_lens)
    assert len(pages_of(out, ps)) == len(seq_lens)
    assert not pages_of(out, ps) & lent
    assert allocator.available_size() == 0
    assert extend([1]) is None  # the lent pages are not SGLang's to hand out


def test_arena_chunks_are_exactly_the_lent_rows_of_every_k_and_v_buffer(allocator):
    ps = allocator.page_size
    hold(allocator, lambda p: p % 20 in (0, 1), random.Random(5))
    torch.manual_seed(0)
    for b in buffers(allocator):
        b.copy_(torch.randn(b.shape))  # live KV everywhere
    snapshot = [b.clone() for b in buffers(allocator)]
    before = set(free_pages(allocator))
    # blocks packed with no gaps (2-byte alignment): filling the arena writes every lent byte
    lender, arena = make_lender(make_scheduler(allocator), poison=True, align=2)

    assert lender.lend() > 0

    lent = before - set(free_pages(allocator))
    lo, hi = min(lent) * ps, (max(lent) + 1) * ps  # the lent slots, which are rows
    assert lender.slot_bytes == SLOT_BYTES
    assert arena.capacity_bytes == lender.lent_slots * SLOT_BYTES == (hi - lo) * SLOT_BYTES

    blocks = fill_arena(arena, 3.0)
    assert blocks
    for b, old in zip(buffers(allocator), snapshot, strict=True):
        changed = (b.view(torch.uint8) != old.view(torch.uint8)).flatten(1).any(dim=1)
        # every layer's K and V buffer: exactly the lent rows were written, nothing else
        assert changed.nonzero().flatten().tolist() == list(range(lo, hi))
    for block in blocks:  # each block is a view into one buffer's lent rows
        start, end = block.tensor.data_ptr(), block.tensor.data_ptr() + block.nbytes
        assert any(
            b[lo].data_ptr() <= start and end <= b[lo].data_ptr() + (hi - lo) * b[0].nbytes
            for b in buffers(allocator)
        )

    status = lender.to_dict()
    assert status["kv_lent_slots"] == hi - lo
    assert status["kv_lent_bytes"] == arena.capacity_bytes
    assert status["kv_available_slots"] == allocator.available_size()
    assert len(status["arena_blocks"]) == len(blocks)
    for ptr, nbytes in status["arena_blocks"]:
        assert any(b <= ptr and ptr + nbytes <= b + n for b, n in status["kv_buffers"])


# --- limits: max_fraction, demand, relend delay ---------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.05, 0.0])
def test_lending_never_exceeds_max_fraction(allocator, fraction):
    ps = allocator.page_size
    lender, _ = make_lender(make_scheduler(allocator), fraction=fraction)
    assert lender.limit_slots == int(fraction * POOL)

    lent = lend_all(lender)

    # as much as the limit allows in whole pages, never more, though the pool is all free
    assert lent == lender.lent_slots == lender.limit_slots // ps * ps
    assert lender.stats.lent_peak_slots == lent
    assert allocator.available_size() == POOL - lent


def test_demand_counts_what_sglang_may_allocate_before_the_next_batch(allocator):
    ps = allocator.page_size
    running = [make_req(10, 40, out=10), make_req(5, 3, out=3)]  # 30 more outputs, then none
    waiting = [make_req(20, 50)]
    sched = make_scheduler(allocator, running=running, waiting=waiting)
    sched.chunked_req = make_req(12, 8)
    lender, _ = make_lender(sched, fraction=1.0, headroom=16)

    demand = (30 + ps) + (0 + ps) + (20 + 50 + ps) + (12 + 8 + ps) + 16
    assert lender.demand() == demand

    # an extend batch's requests join the running batch next: counted once each
    joining = make_req(7, 9)
    sched.last_batch = types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, reqs=[joining, running[0]]
    )
    assert lender.demand() == demand + 9 + ps
    sched.last_batch.forward_mode = ForwardMode.DECODE  # decode: already in the running batch
    assert lender.demand() == demand

    # a PD decode server's pre-allocation queue and its reserved decode tokens
    sched.disagg_decode_prealloc_queue = types.SimpleNamespace(
        queue=[types.SimpleNamespace(req=make_req(30, 2))], num_reserved_decode_tokens=64
    )
    assert lender.demand() == demand + (30 + 2 + ps) + 64


def test_lending_leaves_the_demand_and_headroom_free(allocator):
    ps = allocator.page_size
    sched = make_scheduler(
        allocator, running=[make_req(10, 40, out=10)], waiting=[make_req(20, 50)]
    )
    lender, _ = make_lender(sched, fraction=1.0, headroom=16)
    demand = lender.demand()

    assert lend_all(lender) > 0

    spare = allocator.available_size() - demand
    assert 0 <= spare < ps  # lent up to the demand, not into it


def test_max_new_tokens_count_as_sglang_clips_them(allocator):
    ps = allocator.page_size
    assert CLIP_MAX_NEW_TOKENS > POOL  # one such request may need the whole pool
    unset = make_req(8, None)  # the lender's fallback; SGLang's intake always sets an int
    huge = make_req(8, 10**9, out=5)
    lender, _ = make_lender(make_scheduler(allocator, waiting=[unset, huge]), fraction=1.0)

    assert lender.demand() == 2 * (8 + ps) + CLIP_MAX_NEW_TOKENS + (CLIP_MAX_NEW_TOKENS - 5)
    assert lender.lend() == 0
    assert allocator.available_size() == POOL


def test_a_request_with_no_new_tokens_counts_only_its_prompt(allocator):
    ps = allocator.page_size
    # SGLang's intake stores max_new_tokens as an int, clipped to the pool (0 when the prompt
    # leaves no room, or when asked for 0); its admission then counts min(0, CLIP) = 0
    lender, _ = make_lender(make_scheduler(allocator, waiting=[make_req(8, 0)]), fraction=1.0)
    # (counting 0 as "unknown", i.e. the clip, would take every lease back for no reason)
    assert lender.demand() == 8 + ps
    assert lender.lend() > 0


def test_no_lending_within_relend_delay_after_a_reclaim(allocator, monkeypatch):
    clock = [1000.0]  # the lender's monotonic clock, moved by hand
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter)
    monkeypatch.setattr(kv_lender, "time", fake_time)
    sched = make_scheduler(allocator)
    lender, _ = make_lender(sched, relend_delay_s=5.0)
    assert lender.lend() > 0

    sched.waiting_queue.append(make_req(POOL - 8, 1))  # a burst: nearly the whole pool
    assert lender.reclaim() > 0
    sched.waiting_queue.clear()  # gone at once: lending would be allowed but for the delay

    assert lender.lend() == 0
    clock[0] += 4.9
    assert lender.lend() == 0
    clock[0] += 0.2
    assert lender.lend() > 0

    assert lender.release_all() > 0  # release_all starts the same delay
    assert lender.lend() == 0
    clock[0] += 5.1
    assert lender.lend() > 0


# --- reclaim and release_all ----------------------------------------------------------------


def test_reclaim_gives_back_the_least_used_leases_first(allocator):
    ps = allocator.page_size
    sched = make_scheduler(allocator)
    lender, arena = make_lender(sched)
    lost = []

    assert lender.lend() > 0
    full = arena.leases()[0]
    while (b := arena.alloc((HEAD_DIM,), DTYPE, owner=lost.append)) is not None:
        assert b.lease == full  # the only lease: filled up
    assert lender.lend() > 0
    small = arena.alloc((HEAD_DIM,), DTYPE, owner=lost.append)
    assert small.lease != full  # the first lease is full: one block in the second
    assert lender.lend() > 0 and lender.lend() > 0  # two more, empty
    empty = [lease for lease in arena.leases() if lease not in (full, small.lease)]
    lease_slots = lender.lease_pages * ps

    # free slots cover the demand: nothing to give back
    assert lender.reclaim() == 0 and len(arena.leases()) == 4

    # a demand one lease above what is free: one empty lease back is enough
    available = allocator.available_size()
    sched.waiting_queue.append(make_req(available + lease_slots - ps - 1, 1))
    before = set(free_pages(allocator))
    assert lender.reclaim() == lease_slots
    assert allocator.available_size() >= lender.demand()
    assert set(arena.leases()) == {full, small.lease, empty[1]}  # the oldest empty one went
    back = set(free_pages(allocator)) - before
    assert len(back) * ps == lease_slots  # through SGLang's free path (staged with need_sort)
    assert small.valid and not lost and lender.stats.revoked_in_use == 0

    # two leases more: the other empty one, then the least used
    sched.waiting_queue[0] = make_req(allocator.available_size() + 2 * lease_slots - ps - 1, 1)
    assert lender.reclaim() == 2 * lease_slots
    assert allocator.available_size() >= lender.demand()
    assert arena.leases() == [full]
    assert not small.valid and lost == [small]
    assert lender.stats.revoked_in_use == 1

    # more than the pool: everything back, the full lease's blocks invalid too
    sched.waiting_queue[0] = make_req(POOL, 1)
    assert lender.reclaim() == lease_slots
    assert arena.leases() == [] and lender.lent_slots == 0
    assert allocator.available_size() == POOL
    assert all(not b.valid for b in lost) and len(lost) > 2
    assert lender.stats.reclaims == 3
    assert lender.stats.reclaimed_slots == 4 * lease_slots
    assert len(lender.recent_reclaim_ms(10)) == 3


def test_release_all_returns_every_slot_to_sglang(allocator):
    ps = allocator.page_size
    lender, arena = make_lender(make_scheduler(allocator))
    lent = lend_all(lender)
    blocks = fill_arena(arena, 1.0)

    assert lender.release_all() == lent > 0
    assert lender.lent_slots == 0 and arena.leases() == []
    assert all(not b.valid for b in blocks)
    assert allocator.available_size() == POOL
    assert lender.stats.released_all == 1
    assert lender.release_all() == 0 and lender.reclaim() == 0  # nothing left to give

    everything = allocator.alloc(POOL)  # SGLang can hand out the whole pool again
    assert sorted(pages_of(everything, ps)) == all_pages(allocator)


def test_no_slot_lost_or_duplicated_across_lend_and_give_back_cycles(allocator):
    ps = allocator.page_size
    rng = random.Random(6)
    original = all_pages(allocator)
    assert sorted(free_pages(allocator)) == original
    sched = make_scheduler(allocator)
    lender, arena = make_lender(sched, fraction=0.6)
    held: list[torch.Tensor] = []  # what SGLang's requests hold

    for _ in range(120):
        r = rng.random()
        if r < 0.3:
            lender.lend()
            arena.alloc((rng.randint(1, 64),), DTYPE)  # the job uses some of it
        elif r < 0.5:
            idx = allocator.alloc(rng.randint(1, 6) * ps)
            if idx is not None:
                held.append(idx)
        elif r < 0.7 and held:
            allocator.free(held.pop(rng.randrange(len(held))))
        elif r < 0.95:
            sched.waiting_queue[:] = [make_req(rng.randint(0, POOL), 1)]
            lender.reclaim()
            assert allocator.available_size() >= lender.demand() or lender.lent_slots == 0
            sched.waiting_queue.clear()
        else:
            lender.release_all()
        # free, held by requests and lent: each page in exactly one of them
        free = free_pages(allocator)
        held_pages = [p for idx in held for p in sorted(pages_of(idx, ps))]
        assert len(set(free)) == len(free) and len(set(held_pages)) == len(held_pages)
        assert not set(free) & set(held_pages)
        assert len(free) + len(held_pages) + lender.lent_slots // ps == len(original)
        assert arena.capacity_bytes == lender.lent_slots * SLOT_BYTES

    for idx in held:
        allocator.free(idx)
    lender.release_all()
    allocator.merge_and_sort_free()
    assert sorted(free_pages(allocator)) == original
    assert len(free_pages(allocator)) == len(original)  # and no page twice


# --- the radix cache and SGLang's leak check ------------------------------------------------


def test_cached_prefixes_are_lent_down_to_the_floor(allocator):
    """The cache holds the whole pool (a busy server's steady state): the lender evicts the
    least recently used unreferenced entries, a lease at a time, and stops at the floor."""
    ps = allocator.page_size
    cache = make_radix_cache(allocator)
    cache_pages(cache, allocator.alloc(POOL), first_token=1000)
    assert allocator.available_size() == 0 and cache.evictable_size() == POOL
    sched = make_scheduler(allocator, tree_cache=cache)

    lender, _ = make_lender(sched, fraction=1.0, cache_floor=0.5)
    lease_slots = lender.lease_pages * ps
    got = lender.lend()
    # eviction is asked in tokens: a whole lease of pages comes free and is lent
    assert got == lease_slots
    assert allocator.available_size() == POOL - cache.evictable_size() - got
    while lender.lend():
        pass
    assert cache.evictable_size() == POOL // 2  # the floor: half the pool stays cached
    assert lender.lent_slots == POOL // 2
    assert lender.stats.cache_evicted_slots == POOL // 2
    assert lender.to_dict()["kv_cache_floor_slots"] == POOL // 2


def test_a_floor_of_one_lends_only_free_slots(allocator):
    cache = make_radix_cache(allocator)
    cache_pages(cache, allocator.alloc(POOL), first_token=1000)
    lender, _ = make_lender(make_scheduler(allocator, tree_cache=cache), cache_floor=1.0)
    assert lender.lend() == 0
    assert cache.evictable_size() == POOL and lender.stats.cache_evicted_slots == 0


def test_nothing_evicted_while_requests_wait_or_hold_it(allocator):
    """A waiting request may have matched a cached prefix: the lender leaves the cache alone
    while any waits. What a running request holds (locked) is never evictable."""
    cache = make_radix_cache(allocator)
    cache_pages(cache, allocator.alloc(POOL), first_token=1000)
    waiting = make_scheduler(allocator, waiting=[make_req(4, 4)], tree_cache=cache)
    lender, _ = make_lender(waiting, cache_floor=0.0)
    assert lender.lend() == 0 and cache.evictable_size() == POOL

    # lock every entry, as requests running on these prefixes do
    for child in list(cache.root_node.children.values()):
        cache.inc_lock_ref(child)
    assert cache.evictable_size() == 0
    lender, _ = make_lender(make_scheduler(allocator, tree_cache=cache), cache_floor=0.0)
    assert lender.lend() == 0 and cache.protected_size() == POOL


def checker_for(allocator, cache) -> tuple[SchedulerInvariantChecker, SchedulerPoolStatsObserver]:
    """SGLang's own invariant checker and pool-stats observer, as Scheduler.__init__ builds
    them for a plain (non-hybrid, non-PD) server."""
    observer = SchedulerPoolStatsObserver(
        tree_cache=cache,
        token_to_kv_pool_allocator=allocator,
        req_to_token_pool=None,
        session_controller=None,
        hisparse_coordinator=None,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hisparse=False,
        full_tokens_per_layer=None,
        swa_tokens_per_layer=None,
        max_total_num_tokens=POOL,
    )
    checker = SchedulerInvariantChecker(
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        disaggregation_mode=DisaggregationMode.NULL,
        page_size=allocator.page_size,
        full_tokens_per_layer=None,
        swa_tokens_per_layer=None,
        max_total_num_tokens=POOL,
        tree_cache=cache,
        token_to_kv_pool_allocator=allocator,
        req_to_token_pool=None,
        pool_stats_observer=observer,
        get_last_batch=lambda: None,
        get_running_batch=lambda: None,
        scheduler_stage_metrics=None,
    )
    return checker, observer


def test_account_lent_slots_keeps_sglangs_idle_leak_check_on_and_exact(allocator):
    ps = allocator.page_size
    cache = make_radix_cache(allocator)
    cache_pages(cache, allocator.alloc(3 * ps), first_token=1000)  # an idle server's cache
    checker, observer = checker_for(allocator, cache)
    sched = make_scheduler(allocator, tree_cache=cache)
    sched.invariant_checker = checker

    def idle_check():  # what Scheduler.on_idle runs
        # the check reads the parallel config a server publishes at start: one rank, no DCP
        with get_parallel().override(dcp_enabled=False):
            leak, messages = sched.invariant_checker._check_all_pools(observer.get_pool_stats())
        return leak, messages[0]

    assert idle_check()[0] is False
    lender, _ = make_lender(sched)
    assert lend_all(lender) > 0
    assert idle_check()[0] is True  # SGLang alone takes the lent slots for a leak

    account_lent_slots(sched, lender)

    assert sched.invariant_checker is checker and isinstance(checker, SchedulerInvariantChecker)
    leak, message = idle_check()
    assert not leak, message
    assert message.endswith(f"uncached={lender.lent_slots}")
    # a slot lost for real is still caught
    lost = allocator.alloc(ps)
    assert idle_check()[0] is True
    allocator.free(lost)
    assert idle_check()[0] is False
    # and once everything is back, nothing is added
    lender.release_all()
    leak, message = idle_check()
    assert not leak and message.endswith("uncached=0")


def test_hnd_layout_is_lent_by_page_or_refused(monkeypatch):
    """SGLANG_USE_HND_KVCACHE gives the same pool class page-major rows (page, head, offset,
    dim): a slot is no longer a row."""
    from sglang_harli.srt.scheduler import HarliScheduler
    from sglang_harli.srt.support import UnsupportedConfigError

    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    allocator = build_allocator(4, False)
    kv = allocator.get_kvcache()
    assert type(kv) is MHATokenToKVPool and kv.kv_cache_layout == "hnd"
    sched = make_scheduler(allocator)
    try:
        HarliScheduler._check_kv_pools(sched)
    except UnsupportedConfigError:
        return  # refused at start-up: fine
    hold(allocator, lambda p: p % 20 in (0, 1), random.Random(7))
    before = set(free_pages(allocator))
    lender, arena = make_lender(sched)
    assert lender.lend() > 0
    lent = before - set(free_pages(allocator))
    lo, hi = min(lent), max(lent) + 1  # pages, which are the rows here
    blocks = fill_arena(arena, 1.0)
    # lent by page (were HND ever allowed): the arena holds exactly those rows
    assert arena.capacity_bytes == lender.lent_slots * SLOT_BYTES
    for block in blocks:
        start = block.tensor.data_ptr()
        assert any(
            b[lo].data_ptr() <= start < b[lo].data_ptr() + (hi - lo) * b[0].nbytes
            for b in buffers(allocator)
        )
