"""Tensor parallelism in the engine, on plain tensors: two gloo processes,
each with its rank's shard of a tiny model, train the same job as one process with the whole
model. Losses, gradient norms and the gathered adapters must match TP 1 within float
tolerance, and a checkpoint resumes at either TP size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_harli.finetune import (
    BaseModelView,
    LoraAdapters,
    LoraConfig,
    TrainConfig,
    Trainer,
    graph,
    pack,
)
from sglang_harli.finetune.parallel import TensorParallel, shard_adapters

from .helpers import ADAM_TOL, LOSS_RTOL, load_hf, random_examples

TP = 2
STEPS = 3
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.1, seed=3)  # dropout: row-parallel masks sliced
TRAIN = TrainConfig(
    lr=1e-2, lr_schedule="constant", global_batch_size=4, micro_batch_size=2, total_steps=STEPS
)


@dataclasses.dataclass
class Run:
    losses: list[float]
    grad_norms: list[float]
    adapters: dict[str, torch.Tensor]  # whole (gathered) after the last step
    resumed_losses: list[float]  # steps 2.. again, from the whole checkpoint after step 1
    valid_loss: float
    checkpoint: dict  # the whole checkpoint after step 1
    resumed_from_given: list[float] | None  # steps 2.. from another run's checkpoint


def resume(view: BaseModelView, checkpoint: dict) -> list[float]:
    examples = random_examples(8, view.config.vocab_size, seed=5)
    adapters = shard_adapters(LoraAdapters.create(view.config, LORA), view.tp)
    trainer = Trainer(view, adapters, examples, TRAIN)
    trainer.restore(checkpoint)
    return [trainer.run_step().loss for _ in range(STEPS - 1)]


def train(view: BaseModelView, given: dict | None = None) -> Run:
    examples = random_examples(8, view.config.vocab_size, seed=5)
    adapters = shard_adapters(LoraAdapters.create(view.config, LORA), view.tp)
    trainer = Trainer(view, adapters, examples, TRAIN)
    first = trainer.run_step()
    saved = trainer.snapshot()  # whole at any TP size (gathered)
    checkpoint = saved.to_dict()
    rest = [trainer.run_step() for _ in range(STEPS - 1)]
    results = [first, *rest]
    whole = trainer.snapshot().adapters
    resumed = resume(view, checkpoint)
    batch = pack(examples[:3])
    with torch.no_grad():
        valid = float(graph.loss_sum(view, trainer.adapters, batch, training=False))
    return Run(
        [r.loss for r in results],
        [r.grad_norm for r in results],
        {k: v.clone() for k, v in whole.items()},
        resumed,
        valid,
        checkpoint,
        None if given is None else resume(view, given),
    )


def _rank(rank: int, model_dir: str, store: str, out: str, given: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=TP)
    try:
        tp = TensorParallel(rank, TP)
        view = BaseModelView.from_hf(load_hf(model_dir)).shard(tp)
        run = train(view, torch.load(given))
        if rank == 0:
            torch.save(dataclasses.asdict(run), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases sliced
def test_tp2_trains_as_tp1(arch, model_dirs, tmp_path):
    tp1 = dataclasses.asdict(train(BaseModelView.from_hf(load_hf(model_dirs[arch]))))
    given = tmp_path / "tp1-checkpoint.pt"
    torch.save(tp1["checkpoint"], given)
    out = tmp_path / "tp2.pt"
    mp.spawn(
        _rank,
        args=(str(model_dirs[arch]), str(tmp_path / "store"), str(out), str(given)),
        nprocs=TP,
        join=True,
    )
    tp2 = torch.load(out)
    # a checkpoint is whole at any TP size: TP 2 resumes TP 1's, as TP 1 does
    assert tp2["resumed_from_given"] == pytest.approx(tp1["resumed_losses"], rel=LOSS_RTOL)
    assert tp2["checkpoint"]["adapters"].keys() == tp1["checkpoint"]["adapters"].keys()

    for key in ("losses", "grad_norms", "resumed_losses"):
        assert tp2[key] == pytest.approx(tp1[key], rel=LOSS_RTOL), key
    assert tp2["losses"][1:] == pytest.approx(tp2["resumed_losses"], rel=LOSS_RTOL)
    assert tp2["valid_loss"] == pytest.approx(tp1["valid_loss"], rel=LOSS_RTOL)
    # the whole adapters, gathered in the same names and shapes as TP 1's
    assert tp2["adapters"].keys() == tp1["adapters"].keys()
    for name, whole in tp1["adapters"].items():
        assert tp2["adapters"][name].shape == whole.shape, name
        err = (tp2["adapters"][name] - whole).abs().max().item()
        assert err <= ADAM_TOL * TRAIN.lr * STEPS, (name, err)
    assert any(v.abs().sum() > 0 for k, v in tp1["adapters"].items() if "lora_B" in k)


def test_shard_is_what_each_rank_holds(model_dirs):
    """Shards of every rank put together are the whole view (shapes SGLang's ranks hold)."""
    whole = BaseModelView.from_hf(load_hf(model_dirs["qwen2"]))
    shards = [whole.shard(TensorParallel(r, TP)) for r in range(TP)]
    c = whole.config
    assert shards[0].local.num_heads == c.num_heads // TP
    assert shards[1].local.intermediate_size == c.intermediate_size // TP
    layer = [s.layers[1] for s in shards]
    assert torch.equal(torch.cat([x.q_proj for x in layer]), whole.layers[1].q_proj)
    assert torch.equal(torch.cat([x.o_proj for x in layer], 1), whole.layers[1].o_proj)
    assert torch.equal(
        torch.cat([x.biases["k_proj"] for x in layer]), whole.layers[1].biases["k_proj"]
    )
    assert torch.equal(torch.cat([s.lm_head for s in shards]), whole.lm_head)
    assert shards[1].vocab_start == shards[0].lm_head.shape[0]
    with pytest.raises(ValueError, match="split evenly"):
        whole.shard(TensorParallel(0, 3))
