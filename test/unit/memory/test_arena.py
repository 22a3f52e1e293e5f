"""The arena (``memory/arena.py``) seen from its users, on plain CPU tensors.

Everything is checked the way an engine would observe it: where a handed-out tensor lies
(``data_ptr`` ranges against the lent chunks), what writing into it changes in the lent buffer,
what a revoke does to blocks and owners, and what the stats report.
"""

from __future__ import annotations

import random

import pytest
import torch

from sglang_harli.memory.arena import ALIGN, Arena, Block, as_bytes

F32 = torch.float32


# --- helpers -------------------------------------------------------------------------------------


def span(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` byte addresses of a contiguous tensor."""
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def chunk_holding(block: Block, chunks: list[torch.Tensor]) -> list[int]:
    """Indices of the chunks that hold the block's bytes entirely."""
    lo, hi = span(block.tensor)
    return [i for i, c in enumerate(chunks) if span(c)[0] <= lo and hi <= span(c)[1]]


def aligned(numel: int, dtype: torch.dtype = torch.uint8, align: int = ALIGN) -> torch.Tensor:
    """A buffer whose first byte is ``align``-aligned. CPU torch only guarantees 64 bytes, and
    the arena pads every block up to ``ALIGN``: tests that count exact fits need this."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(numel * itemsize + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    return raw[skip : skip + numel * itemsize].view(dtype)


def assert_disjoint(blocks: list[Block]) -> None:
    ranges = sorted(span(b.tensor) for b in blocks)
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end <= start, "two live blocks overlap"


def kv_lease(layers: int, slots: int, lo: int, hi: int, heads: int = 2, dim: int = 64):
    """Chunks the way the MHA KV lender lends a run of slots ``[lo, hi)``: that run's rows
    of every layer's K and V buffer (bf16), ``2 x layers`` chunks, not adjacent."""

    def buffer() -> torch.Tensor:
        return aligned(slots * heads * dim, torch.bfloat16).view(slots, heads, dim)

    k = [buffer() for _ in range(layers)]
    v = [buffer() for _ in range(layers)]
    return k, v, [*(b[lo:hi] for b in k), *(b[lo:hi] for b in v)]


# --- hand-outs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((7,), F32),
        ((3, 5), torch.float16),
        ((2, 3, 4), torch.int64),
        ((), torch.int8),
        ((9,), torch.bool),
    ],
)
def test_alloc_gives_asked_shape_dtype_aligned_inside_one_chunk(shape, dtype):
    chunks = [torch.zeros(1000, dtype=F32), torch.zeros(300, dtype=torch.int32)]
    arena = Arena()
    arena.add_lease(chunks)
    for _ in range(5):
        block = arena.alloc(shape, dtype)
        assert block is not None and block.valid
        assert block.tensor.shape == torch.Size(shape)
        assert block.tensor.dtype == dtype
        assert block.tensor.is_contiguous()
        assert block.tensor.data_ptr() % ALIGN == 0
        assert block.nbytes == block.tensor.numel() * block.tensor.element_size()
        assert len(chunk_holding(block, chunks)) == 1


@pytest.mark.parametrize("align", [1, 8, 64, 1024])
def test_custom_align_is_honoured(align):
    buf = torch.zeros(8192, dtype=torch.uint8)
    arena = Arena(align=align)
    arena.add_lease([buf])
    for n in (1, 3, 17, 100):
        block = arena.alloc((n,), torch.uint8)
        assert block is not None
        assert block.tensor.data_ptr() % align == 0


@pytest.mark.parametrize("align", [0, -4, 3, 100])
def test_bad_align_is_rejected(align):
    with pytest.raises(ValueError):
        Arena(align=align)


def test_non_contiguous_chunk_is_rejected():
    arena = Arena()
    with pytest.raises(ValueError):
        arena.add_lease([torch.zeros(16, 16).t()])
    with pytest.raises(ValueError):
        arena.add_lease([torch.zeros(64)[::2]])


def test_block_is_a_view_of_the_lent_buffer():
    buf = torch.zeros(4096, dtype=torch.uint8)
    arena = Arena()
    arena.add_lease([buf])
    arena.alloc((10,), torch.uint8)  # so the block under test is not at the very start
    block = arena.alloc((4, 8), F32)
    block.tensor.copy_(torch.arange(32, dtype=F32).view(4, 8))
    offset = block.tensor.data_ptr() - buf.data_ptr()
    seen = buf[offset : offset + block.nbytes].view(F32).view(4, 8)
    assert torch.equal(seen, torch.arange(32, dtype=F32).view(4, 8))
    # and the other way: the lender writing its buffer is what the block holds
    buf[offset : offset + 4].view(F32).fill_(-7.0)
    assert block.tensor[0, 0].item() == -7.0


def test_the_lenders_writes_elsewhere_do_not_break_a_backward_that_saved_a_block():
    """SGLang stores each decode step's KV in other slots of the very buffer a block lives in;
    autograd must not take that for a write to the block (a backward between two decode steps
    failed with "modified by an inplace operation")."""
    buf = torch.zeros(4096, dtype=torch.uint8)
    arena = Arena()
    arena.add_lease([buf])
    block = arena.alloc((4, 8), F32)
    block.tensor.copy_(torch.randn(4, 8))
    x = block.tensor.detach().requires_grad_()
    y = (x * x).sum()  # saves x for the backward
    buf[-64:].fill_(3)  # the lender writes its own slots, after the block's
    y.backward()
    assert torch.equal(x.grad, 2 * block.tensor)


def test_bf16_chunks_hand_out_float32_tensors():
    k, v, chunks = kv_lease(layers=2, slots=64, lo=16, hi=48)
    arena = Arena()
    arena.add_lease(chunks)
    block = arena.alloc((100,), F32)
    assert block is not None and block.tensor.dtype == F32
    values = torch.linspace(-3.0, 3.0, 100)
    block.tensor.copy_(values)
    (i,) = chunk_holding(block, chunks)
    offset = block.tensor.data_ptr() - chunks[i].data_ptr()
    # exact float32 bits survive the trip through the bf16 buffer
    assert torch.equal(as_bytes(chunks[i])[offset : offset + 400].view(F32), values)
    # nothing outside the lent rows was touched
    for buffer in (*k, *v):
        assert not buffer[:16].any() and not buffer[48:].any()


def test_kv_lease_capacity_and_placement():
    layers, lo, hi, heads, dim = 3, 8, 40, 2, 64
    k, v, chunks = kv_lease(layers, 64, lo, hi, heads, dim)
    arena = Arena()
    lease = arena.add_lease(chunks)
    chunk_bytes = (hi - lo) * heads * dim * 2
    assert arena.lease_capacity(lease) == 2 * layers * chunk_bytes == arena.capacity_bytes
    # every chunk has room for exactly one chunk-sized block
    blocks = [arena.alloc((chunk_bytes // 4,), F32) for _ in range(2 * layers)]
    assert all(b is not None for b in blocks)
    assert sorted(i for b in blocks for i in chunk_holding(b, chunks)) == list(range(2 * layers))
    assert arena.alloc((1,), torch.uint8) is None


def test_block_never_straddles_adjacent_chunks():
    # two chunks that are neighbours in memory: only the arena's bookkeeping separates them
    buf = aligned(2048)
    a, b = buf[:1024], buf[1024:]
    arena = Arena()
    arena.add_lease([a, b])
    x1 = arena.alloc((768,), torch.uint8)  # a[0:768]
    x2 = arena.alloc((256,), torch.uint8)  # a[768:1024]
    y1 = arena.alloc((256,), torch.uint8)  # b[0:256]
    y2 = arena.alloc((768,), torch.uint8)  # b[256:1024]
    assert [chunk_holding(x, [a, b]) for x in (x1, x2, y1, y2)] == [[0], [0], [1], [1]]
    arena.free(x2)
    arena.free(y1)
    # 512 free bytes in a row in memory, but 256 on each side of the boundary
    assert arena.largest_free_bytes() == 256
    assert arena.alloc((512,), torch.uint8) is None
    assert arena.alloc((257,), torch.uint8) is None
    assert arena.stats.failed_allocations == 2
    for _ in range(2):
        block = arena.alloc((256,), torch.uint8)
        assert block is not None and len(chunk_holding(block, [a, b])) == 1


def test_random_alloc_free_keeps_blocks_disjoint_inside_chunks_and_intact():
    rng = random.Random(1234)
    chunks = [
        torch.zeros(3000, dtype=F32),
        torch.zeros(5000, dtype=torch.bfloat16),
        torch.zeros(777, dtype=torch.uint8),
        aligned(4096),
    ]
    arena = Arena()
    arena.add_lease(chunks)
    dtypes = [F32, torch.float16, torch.int32, torch.uint8, torch.int64]
    live: dict[int, tuple[Block, int]] = {}  # id -> (block, the value it was filled with)
    stamp = 0
    for _ in range(2000):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            block, value = live.pop(key)
            # nobody else wrote into it while it was live
            assert (block.tensor == value).all()
            arena.free(block)
            assert not block.valid
        else:
            shape = tuple(rng.randint(1, 12) for _ in range(rng.randint(1, 3)))
            block = arena.alloc(shape, rng.choice(dtypes))
            if block is None:
                continue
            stamp = stamp % 100 + 1
            block.tensor.fill_(stamp)
            live[id(block)] = (block, stamp)
        blocks = [b for b, _ in live.values()]
        assert_disjoint(blocks)
        assert all(len(chunk_holding(b, chunks)) == 1 for b in blocks)
        assert arena.in_use_bytes == sum(b.nbytes for b in blocks)
        assert {id(b) for b in arena.blocks()} == set(live)
    for block, value in live.values():
        assert (block.tensor == value).all()
        arena.free(block)
    assert arena.in_use_bytes == 0
    assert arena.largest_free_bytes() == max(c.numel() * c.element_size() for c in chunks)


# --- free, reuse, coalescing ---------------------------------------------------------------------


def test_freed_space_is_reused_and_coalesced():
    buf = aligned(4096)
    arena = Arena()
    arena.add_lease([buf])
    blocks = []
    while (block := arena.alloc((100,), torch.uint8)) is not None:
        blocks.append(block)
    assert len(blocks) == 4096 // ALIGN  # 100 bytes + padding up to the next aligned start
    assert arena.alloc((4096,), torch.uint8) is None
    # free in an order that needs merging on both sides
    for i in [*range(1, len(blocks), 2), *range(0, len(blocks), 2)]:
        arena.free(blocks[i])
    assert arena.in_use_bytes == 0
    assert arena.largest_free_bytes() == 4096
    whole = arena.alloc((1024,), F32)
    assert whole is not None and whole.tensor.data_ptr() == buf.data_ptr()


def test_first_fit_reuses_a_freed_hole():
    buf = aligned(4096)
    arena = Arena()
    arena.add_lease([buf])
    first, second, _ = (arena.alloc((ALIGN,), torch.uint8) for _ in range(3))
    arena.free(second)
    again = arena.alloc((ALIGN,), torch.uint8)
    assert again.tensor.data_ptr() == second.tensor.data_ptr()
    assert first.valid and again.valid


def test_free_twice_is_harmless():
    arena = Arena()
    arena.add_lease([torch.zeros(1024)])
    a = arena.alloc((10,), F32)
    b = arena.alloc((10,), F32)
    arena.free(a)
    arena.free(a)
    assert b.valid and arena.in_use_bytes == b.nbytes
    # the double free did not hand a's space out twice
    c, d = arena.alloc((10,), F32), arena.alloc((10,), F32)
    assert_disjoint([b, c, d])


def test_alloc_returns_none_and_counts_when_nothing_fits():
    arena = Arena()
    assert arena.alloc((1,), F32) is None  # no lease at all
    arena.add_lease([aligned(64, F32)])  # 256 bytes
    assert arena.alloc((65,), F32) is None
    block = arena.alloc((64,), F32)
    assert block is not None
    assert arena.alloc((1,), torch.uint8) is None
    assert arena.stats.failed_allocations == 3
    assert arena.stats.allocations == 1


def test_empty_chunks_are_ignored():
    arena = Arena()
    lease = arena.add_lease([torch.zeros(0), aligned(16, F32)])
    assert arena.lease_capacity(lease) == 64
    assert arena.alloc((16,), F32) is not None


# --- revoke --------------------------------------------------------------------------------------


def test_revoke_invalidates_that_lease_only_and_tells_owners_once():
    told: list[Block] = []

    def owner(block: Block) -> None:
        assert not block.valid  # the owner must see it already invalid
        told.append(block)

    kept_chunk = aligned(1024, F32)
    lent_chunk = aligned(1024, F32)
    arena = Arena()
    kept = arena.add_lease([kept_chunk])
    lent = arena.add_lease([lent_chunk])
    # fill the first lease so that the blocks below land in the second
    filler = arena.alloc((1024,), F32, owner)
    lost = [arena.alloc((16,), F32, owner) for _ in range(3)]
    quiet = arena.alloc((16,), F32)  # no owner: revoked silently
    freed = arena.alloc((16,), F32, owner)
    arena.free(freed)
    assert all(chunk_holding(b, [lent_chunk]) == [0] for b in [*lost, quiet])
    assert arena.lease_in_use(lent) == 4 * 64

    returned = arena.revoke(lent)

    assert {id(b) for b in returned} == {id(b) for b in [*lost, quiet]}
    assert [id(b) for b in told] == [id(b) for b in lost]  # once each; not the freed one
    assert not any(b.valid for b in returned)
    assert filler.valid
    assert arena.leases() == [kept]
    assert arena.stats.leases_revoked == 1 and arena.stats.revoked_blocks == 4
    assert arena.in_use_bytes == filler.nbytes
    assert arena.capacity_bytes == 4096
    # freeing a revoked block changes nothing, and does not call the owner again
    arena.free(lost[0])
    assert not lost[0].valid and len(told) == 3
    assert arena.in_use_bytes == filler.nbytes


def test_revoked_memory_is_never_handed_out_again():
    other = torch.zeros(4096, dtype=torch.uint8)
    lent = torch.zeros(4096, dtype=torch.uint8)
    arena = Arena()
    arena.add_lease([lent])
    arena.add_lease([other])
    block = arena.alloc((100,), torch.uint8)
    assert chunk_holding(block, [lent]) == [0]
    arena.revoke(block.lease)
    arena.free(block)  # a no-op: must not put the revoked range back on a free list
    got = []
    while (b := arena.alloc((1,), torch.uint8)) is not None:
        got.append(b)
    assert got and all(chunk_holding(b, [other]) == [0] for b in got)
    lo, hi = span(lent)
    assert not any(lo <= b.tensor.data_ptr() < hi for b in got)


def test_revoke_then_fresh_lease_of_same_memory():
    # the lender lends the same rows again later: that is a new lease, usable as normal
    buf = aligned(1024, F32)
    arena = Arena()
    first = arena.add_lease([buf])
    old = arena.alloc((1024,), F32)
    arena.revoke(first)
    second = arena.add_lease([buf])
    assert second != first
    new = arena.alloc((1024,), F32)
    assert new is not None and new.valid and not old.valid
    assert new.lease == second
    assert arena.stats.leases_added == 2


# --- reserve first -------------------------------------------------------------------------------


def test_non_revocable_lease_is_used_first():
    lent = aligned(1024, F32)
    reserve = aligned(1024, F32)
    arena = Arena()
    lent_id = arena.add_lease([lent])
    reserve_id = arena.add_lease([reserve], revocable=False)  # added later, still preferred
    first = arena.alloc((512,), F32)
    second = arena.alloc((512,), F32)
    assert chunk_holding(first, [reserve]) == [0] and first.lease == reserve_id
    assert chunk_holding(second, [reserve]) == [0]
    # only once the reserve is full does the revocable lease get used
    third = arena.alloc((16,), F32)
    assert chunk_holding(third, [lent]) == [0] and third.lease == lent_id
    arena.revoke(lent_id)
    assert first.valid and second.valid and not third.valid


# --- poison --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16, torch.float64])
def test_poison_fills_float_blocks_with_nan(dtype):
    buf = torch.zeros(4096, dtype=torch.uint8)
    arena = Arena(poison=True)
    arena.add_lease([buf])
    block = arena.alloc((5, 7), dtype)
    assert torch.isnan(block.tensor).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int8, torch.int16])
def test_poison_fills_int_blocks_with_ff_bytes(dtype):
    buf = torch.zeros(4096, dtype=torch.uint8)
    arena = Arena(poison=True)
    arena.add_lease([buf])
    block = arena.alloc((5, 7), dtype)
    assert (block.tensor.reshape(-1).view(torch.uint8) == 0xFF).all()


def test_poison_stays_inside_the_block_and_applies_on_reuse():
    buf = torch.full((4096,), 0x5A, dtype=torch.uint8)
    arena = Arena(poison=True)
    arena.add_lease([buf])
    block = arena.alloc((10,), F32)
    lo = block.tensor.data_ptr() - buf.data_ptr()
    hi = lo + block.nbytes
    assert (buf[:lo] == 0x5A).all() and (buf[hi:] == 0x5A).all()
    block.tensor.fill_(1.0)
    arena.free(block)
    again = arena.alloc((10,), F32)
    assert torch.isnan(again.tensor).all()  # the previous owner's data is not visible


def test_without_poison_memory_is_left_as_it_was():
    buf = torch.arange(4096, dtype=torch.int64).to(torch.uint8)
    before = buf.clone()
    arena = Arena()
    arena.add_lease([buf])
    block = arena.alloc((10,), F32)
    assert torch.equal(buf, before)
    lo = block.tensor.data_ptr() - buf.data_ptr()
    assert torch.equal(block.tensor.view(torch.uint8), before[lo : lo + 40])


# --- reporting -----------------------------------------------------------------------------------


def test_to_dict_reports_what_happened():
    chunks = [torch.zeros(1000, dtype=F32), torch.zeros(300, dtype=torch.bfloat16)]
    arena = Arena()
    lease = arena.add_lease(chunks)
    reserve = arena.add_lease([aligned(256)], revocable=False)
    a = arena.alloc((64,), F32)  # the whole reserve
    b = arena.alloc((100,), F32)
    c = arena.alloc((10,), torch.int64)
    assert arena.alloc((10**6,), F32) is None
    arena.free(a)
    peak = a.nbytes + b.nbytes + c.nbytes
    d = arena.to_dict()
    assert d == {
        "leases": 2,
        "capacity_bytes": 4000 + 600 + 256,
        "in_use_bytes": b.nbytes + c.nbytes,
        "blocks": 2,
        "leases_added": 2,
        "leases_revoked": 0,
        "allocations": 3,
        "failed_allocations": 1,
        "revoked_blocks": 0,
        "peak_in_use_bytes": peak,
    }
    arena.revoke(lease)
    d = arena.to_dict()
    assert d["leases"] == 1 and d["capacity_bytes"] == 256
    assert d["in_use_bytes"] == 0 and d["blocks"] == 0
    assert d["leases_revoked"] == 1 and d["revoked_blocks"] == 2
    assert d["peak_in_use_bytes"] == peak  # a peak is a peak
    assert arena.leases() == [reserve]


def test_lease_in_use_and_capacity():
    arena = Arena()
    lease = arena.add_lease([aligned(100, F32), aligned(50, torch.int16)])
    assert arena.lease_capacity(lease) == 500
    assert arena.lease_in_use(lease) == 0
    a = arena.alloc((3, 3), F32)
    assert arena.alloc((7,), torch.int16) is not None
    assert arena.lease_in_use(lease) == 36 + 14
    arena.free(a)
    assert arena.lease_in_use(lease) == 14


# --- edge cases: empty shapes, alignment below the element size -----------------------------------


def test_zero_element_alloc_does_not_raise_or_leak():
    # an empty tensor is handed out (and freed) like any other, and no space is lost
    buf = aligned(1024)
    arena = Arena()
    arena.add_lease([buf])
    for shape, dtype in [((0,), torch.uint8), ((0,), F32), ((2, 0), torch.float16)]:
        block = arena.alloc(shape, dtype)
        assert block is None or block.tensor.shape == torch.Size(shape)
        if block is not None:
            arena.free(block)
    assert arena.largest_free_bytes() == 1024


def test_align_smaller_than_itemsize_still_gives_a_usable_block():
    # a block starts at a multiple of its element size even when `align` is smaller
    arena = Arena(align=1)
    arena.add_lease([aligned(1024)])
    assert arena.alloc((1,), torch.uint8) is not None
    block = arena.alloc((2,), F32)
    assert block is not None and block.tensor.data_ptr() % 4 == 0
    arena.free(block)
    assert arena.largest_free_bytes() == 1023
