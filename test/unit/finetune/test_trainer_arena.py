"""The trainer on an arena: checkpointed inputs live in lent memory, and a revoke anywhere in a
step costs recomputation, never a different result.

The "lent" memory here is a plain buffer standing in for KV slots; after each revoke the test
fills the revoked region with NaN, as decode writing its KV there would, so a trainer that kept
reading revoked memory would produce NaN or different numbers.
"""

import pytest
import torch

from sglang_harli.finetune import BaseModelView, LoraAdapters, LoraConfig, TrainConfig, Trainer
from sglang_harli.finetune.trainer import MemoryWait
from sglang_harli.memory.arena import Arena, Block

from .helpers import load_hf, random_examples

CFG = TrainConfig(lr=1e-2, total_steps=3, global_batch_size=4, micro_batch_size=2)
LORA = LoraConfig(r=4, dropout=0.1)


@pytest.fixture(scope="module")
def llama(model_dirs):
    return BaseModelView.from_hf(load_hf(model_dirs["llama"]))


@pytest.fixture(scope="module")
def data(llama):
    return random_examples(8, llama.config.vocab_size, seed=3)


@pytest.fixture(scope="module")
def reference(llama, data):
    """The same job with no arena: ordinary memory."""
    adapters = LoraAdapters.create(llama.config, LORA)
    losses = [r.loss for r in Trainer(llama, adapters, data, CFG).train()]
    return losses, _flat(adapters)


class Lender:
    """Leases over one buffer, as the KV lender gives them: ``chunks`` regions per lease."""

    def __init__(self, arena: Arena, slots: int = 4096, width: int = 64, chunks: int = 4):
        self.arena, self.chunks = arena, chunks
        self.buffer = torch.zeros(chunks, slots, width)
        self.free = list(range(0, slots, slots // 8))  # 8 runs of slots // 8
        self.run = slots // 8
        self.leases: dict[int, int] = {}  # lease -> start slot

    def lend(self) -> int:
        start = self.free.pop()
        lease = self.arena.add_lease([self.buffer[c, start : start + self.run] for c in range(4)])
        self.leases[lease] = start
        return lease

    def revoke(self, lease: int) -> list[Block]:
        lost = self.arena.revoke(lease)
        start = self.leases.pop(lease)
        self.buffer[:, start : start + self.run] = float("nan")  # decode writes its KV there
        self.free.insert(0, start)
        return lost

    def inside(self, t: torch.Tensor) -> bool:
        lo, hi = self.buffer.data_ptr(), self.buffer.data_ptr() + self.buffer.nbytes
        return lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi


def _flat(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


def _trainer(llama, data, arena):
    adapters = LoraAdapters.create(llama.config, LORA)
    return adapters, Trainer(llama, adapters, data, CFG, memory=arena)


def test_checkpointed_inputs_live_in_lent_memory(llama, data):
    arena = Arena(poison=True)
    lender = Lender(arena)
    lender.lend()
    _, trainer = _trainer(llama, data, arena)
    units = trainer.pending_work()
    layers = llama.config.num_layers
    for unit in units[:layers]:  # micro-batch 0's forwards
        unit.run()
    saved = trainer._step.micro[0].saved
    assert all(isinstance(s, Block) and s.valid and lender.inside(s.tensor) for s in saved)
    assert arena.in_use_bytes >= layers * saved[0].tensor.nbytes
    trainer.run_step()
    assert arena.in_use_bytes == 0  # every block freed by its backward


def test_revokes_anywhere_in_a_step_change_nothing(llama, data, reference):
    """Step 0: every lease taken back after each recompute (between a recompute and its
    backward); step 1: after every unit; step 2: never. Same losses, same adapter, bit for bit."""
    arena = Arena(poison=True)
    lender = Lender(arena)
    lender.lend()
    adapters, trainer = _trainer(llama, data, arena)
    losses = []
    while not trainer.done:
        unit = trainer.next_unit()
        result = unit.run()
        if result is not None:
            losses.append(result.loss)
        if (unit.step == 0 and unit.kind == "recompute") or unit.step == 1:
            for lease in list(lender.leases):
                lender.revoke(lease)
            lender.lend()
    ref_losses, ref_adapter = reference
    assert losses == ref_losses
    assert torch.equal(_flat(adapters), ref_adapter)
    use = trainer.memory_use
    assert use.blocks_lost > 0 and use.recomputed_layers > 0 and arena.stats.revoked_blocks > 0


def test_a_forward_without_room_waits_and_changes_nothing(llama, data, reference):
    arena = Arena()
    adapters, trainer = _trainer(llama, data, arena)
    first = trainer.next_unit()
    with pytest.raises(MemoryWait):
        first.run()  # no lease yet
    assert trainer.next_unit() is first and trainer.memory_use.waits == 1
    # planned with no room: one sequence per micro-batch, which is the most that can wait
    assert trainer.memory_use.micro_batch_tokens == 0
    assert [len(mb.batch.lengths) for mb in trainer._step.micro] == [1, 1, 1, 1]
    Lender(arena).lend()
    losses = [r.loss for r in trainer.train()]
    assert len(losses) == len(reference[0])
    torch.testing.assert_close(losses, reference[0], rtol=1e-5, atol=0)


def test_micro_batches_follow_the_memory_lent(llama, data, reference):
    arena = Arena()
    lender = Lender(arena, slots=256, width=64)  # runs of 32 slots x 64 floats: 8 KiB chunks
    lender.lend()
    adapters, trainer = _trainer(llama, data, arena)
    trainer.pending_work()
    cap = trainer.memory_use.micro_batch_tokens
    per_token = llama.config.hidden_size * 4
    assert 0 < cap <= 32 * 64 * 4 // per_token
    assert all(mb.batch.num_tokens <= max(cap, max(mb.batch.lengths)) for mb in trainer._step.micro)
    losses = [r.loss for r in trainer.train()]
    # more micro-batches than the reference: the same maths in another summation order
    torch.testing.assert_close(losses, reference[0], rtol=1e-5, atol=0)
