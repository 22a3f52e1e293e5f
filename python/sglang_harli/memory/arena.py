"""The arena: typed tensors carved out of memory that someone else lends, and takes back.

A *lease* is a set of byte regions (chunks) that an owner of memory lends for a while: for
SGLang's MHA pool a run of free KV slots, which is ``2 x layers`` equal chunks (the run's rows of
every layer's K and V buffer, ``srt/kv_lender.py``); a fixed reserve of ordinary memory is a
lease that is never revoked. The arena hands out :class:`Block` s: a tensor of the asked shape
and dtype, aligned, inside one chunk (a tensor never straddles two chunks: they are not
adjacent). Freed space is coalesced and reused, first fit.

``revoke(lease)`` is how the lender takes memory back: every block inside the lease becomes
invalid at once and its owner's callback hears of it. An invalid block's tensor still points
into the lent memory, which the lender's owner may already be writing: the owner of a block
checks :attr:`Block.valid` before trusting what it holds, and recomputes what it lost.

``poison`` fills every hand-out with NaN (or all-ones bytes for integer dtypes): a debugging and
testing aid, so that anything that ever read arena memory it did not own shows up as garbage.

Plain tensors only: nothing here knows SGLang, and the engine uses the arena through
:meth:`alloc`, :meth:`free` and :attr:`Block.valid`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

ALIGN = 256  # bytes: what CUDA's allocator guarantees, enough for any vectorized kernel load


@dataclasses.dataclass(eq=False)
class Block:
    """A tensor handed out by the arena. Trust ``tensor`` only while ``valid``."""

    tensor: torch.Tensor
    lease: int
    nbytes: int
    owner: Callable[[Block], None] | None = dataclasses.field(default=None, repr=False)
    valid: bool = True
    _chunk: _Chunk | None = dataclasses.field(default=None, repr=False)
    _offset: int = 0  # bytes into the chunk
    _span: int = 0  # bytes taken from the chunk (alignment padding included)


@dataclasses.dataclass(eq=False)
class _Chunk:
    storage: torch.Tensor  # 1-D uint8 view of the lent bytes
    lease: int
    free: list[tuple[int, int]]  # (offset, size), sorted by offset, coalesced

    @property
    def base(self) -> int:
        return self.storage.data_ptr()


@dataclasses.dataclass
class _Lease:
    id: int
    chunks: list[_Chunk]
    revocable: bool
    blocks: dict[int, Block] = dataclasses.field(default_factory=dict)  # id(block) -> block

    @property
    def capacity(self) -> int:
        return sum(c.storage.numel() for c in self.chunks)

    @property
    def in_use(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


@dataclasses.dataclass
class ArenaStats:
    leases_added: int = 0
    leases_revoked: int = 0
    allocations: int = 0
    failed_allocations: int = 0  # no chunk had room: the caller waits or shrinks its work
    revoked_blocks: int = 0  # blocks invalidated by a revoke while in use
    peak_in_use_bytes: int = 0


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a flat uint8 view (it must be contiguous: a chunk is one region)."""
    if not t.is_contiguous():
        raise ValueError("an arena chunk must be one contiguous region")
    return t.reshape(-1).view(torch.uint8)


def _own_alias(t: torch.Tensor) -> torch.Tensor:
    """The memory of ``t`` in a tensor of its own: a view would share the version counter of
    the whole lent buffer, so the owner's in-place writes elsewhere in it (SGLang storing a
    decode step's KV in other slots) would look to autograd like writes to this block, and the
    backward of a graph that saved the block would refuse to run."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return alias


def _locked(method):
    """One caller at a time: with a concurrent executor the finetune worker allocates and frees
    blocks while the scheduler thread lends and reads what is in use (``corun/executor.py``)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Arena:
    def __init__(self, *, align: int = ALIGN, poison: bool = False):
        if align < 1 or align & (align - 1):
            raise ValueError(f"align must be a power of two, not {align}")
        self.align, self.poison = align, poison
        self.stats = ArenaStats()
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # --- leases --------------------------------------------------------------------------------

    @_locked
    def add_lease(self, chunks: Sequence[torch.Tensor], *, revocable: bool = True) -> int:
        """Take ``chunks`` (contiguous tensors, any dtype) as one lease; returns its id."""
        lease = _Lease(next(self._ids), [], revocable)
        for t in chunks:
            storage = as_bytes(t)
            if storage.numel():
                lease.chunks.append(_Chunk(storage, lease.id, [(0, storage.numel())]))
        self._leases[lease.id] = lease
        self.stats.leases_added += 1
        return lease.id

    @_locked
    def revoke(self, lease_id: int) -> list[Block]:
        """Take the lease back: its blocks become invalid (their owners are told) and its
        memory is never handed out again. Returns the blocks that were in use."""
        lease = self._leases.pop(lease_id)
        lost = list(lease.blocks.values())
        for block in lost:
            block.valid = False
        self.stats.leases_revoked += 1
        self.stats.revoked_blocks += len(lost)
        for block in lost:
            if block.owner is not None:
                block.owner(block)
        return lost

    @_locked
    def leases(self) -> list[int]:
        return list(self._leases)

    @_locked
    def lease_in_use(self, lease_id: int) -> int:
        """Bytes of live blocks in the lease (what revoking it would cost its owners)."""
        return self._leases[lease_id].in_use

    @_locked
    def lease_capacity(self, lease_id: int) -> int:
        return self._leases[lease_id].capacity

    # --- blocks --------------------------------------------------------------------------------

    @_locked
    def alloc(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        owner: Callable[[Block], None] | None = None,
    ) -> Block | None:
        """A tensor of ``shape`` and ``dtype`` inside one chunk, or None if none has room.
        Never-revoked memory (a reserve) is used first: what lives there is never lost."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        for lease in sorted(self._leases.values(), key=lambda lease: lease.revocable):
            for chunk in lease.chunks:
                block = self._carve(chunk, nbytes, itemsize, shape, dtype, owner)
                if block is not None:
                    lease.blocks[id(block)] = block
                    self.stats.allocations += 1
                    self.stats.peak_in_use_bytes = max(
                        self.stats.peak_in_use_bytes, self.in_use_bytes
                    )
                    if self.poison:
                        _poison(block.tensor)
                    return block
        self.stats.failed_allocations += 1
        return None

    @_locked
    def free(self, block: Block) -> None:
        """Give a block's space back; a block already revoked or freed is ignored."""
        if not block.valid:
            return
        block.valid = False
        chunk = block._chunk
        lease = self._leases.get(chunk.lease) if chunk is not None else None
        if lease is None or lease.blocks.pop(id(block), None) is None:
            return
        chunk.free = _coalesce([*chunk.free, (block._offset, block._span)])

    def _carve(self, chunk, nbytes, itemsize, shape, dtype, owner) -> Block | None:
        base, align = chunk.base, max(self.align, itemsize)
        for k, (offset, size) in enumerate(chunk.free):
            start = -(-(base + offset) // align) * align - base
            span = start - offset + max(1, nbytes)  # an empty tensor still takes a byte
            if span > size:
                continue
            view = _own_alias(chunk.storage[start : start + nbytes].view(dtype).view(tuple(shape)))
            rest = [(offset + span, size - span)] if size > span else []
            chunk.free[k : k + 1] = rest  # only once the view exists: a failure loses nothing
            # the padding in front of `start` stays with the block: freed together
            return Block(view, chunk.lease, nbytes, owner, True, chunk, offset, span)
        return None

    # --- reporting -----------------------------------------------------------------------------

    def blocks(self) -> Iterator[Block]:
        with self._lock:
            blocks = [b for lease in self._leases.values() for b in lease.blocks.values()]
        yield from blocks

    @property
    def capacity_bytes(self) -> int:
        with self._lock:
            return sum(lease.capacity for lease in self._leases.values())

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            return sum(lease.in_use for lease in self._leases.values())

    @_locked
    def largest_free_bytes(self) -> int:
        """The biggest block that could be handed out now (before alignment)."""
        return max(
            (size for lease in self._leases.values() for c in lease.chunks for _, size in c.free),
            default=0,
        )

    @_locked
    def count_fitting(self, nbytes: int) -> int:
        """How many blocks of ``nbytes`` the free space holds now (each aligned, one chunk
        each): what a caller sizes its work by before asking."""
        return sum(
            self.fitting_in(size, nbytes)
            for lease in self._leases.values()
            for chunk in lease.chunks
            for _, size in chunk.free
        )

    def fitting_in(self, region_bytes: int, nbytes: int) -> int:
        """How many aligned blocks of ``nbytes`` one free region of ``region_bytes`` holds,
        wherever it starts (the worst case of alignment padding)."""
        if region_bytes < nbytes:
            return 0
        return (region_bytes - self.align + 1) // self.span(nbytes)

    def span(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` takes in a chunk, its alignment padding included."""
        return -(-max(1, nbytes) // self.align) * self.align

    def region_for(self, count: int, nbytes: int) -> int:
        """The bytes of one region that holds ``count`` blocks of ``nbytes`` however it is
        aligned: what a reserve for them is sized to."""
        return count * self.span(nbytes) + self.align

    @_locked
    def fixed_fitting(self, nbytes: int) -> int:
        """How many blocks of ``nbytes`` the never-revoked leases (reserves) hold when empty."""
        return sum(
            self.fitting_in(chunk.storage.numel(), nbytes)
            for lease in self._leases.values()
            if not lease.revocable
            for chunk in lease.chunks
        )

    @_locked
    def to_dict(self) -> dict[str, Any]:
        return {
            "leases": len(self._leases),
            "capacity_bytes": self.capacity_bytes,
            "in_use_bytes": self.in_use_bytes,
            "blocks": sum(len(lease.blocks) for lease in self._leases.values()),
            **dataclasses.asdict(self.stats),
        }


def _coalesce(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, size in sorted(regions):
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((offset, size))
    return merged


def _poison(t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0xFF)
