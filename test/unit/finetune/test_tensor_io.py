"""Checkpoint files written a tensor at a time read back exactly, by safetensors itself."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sglang_harli.finetune.tensor_io import drain, encode_safetensors, encoding_tree, load_tree

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b": torch.randn(4, 2).to(torch.bfloat16),
    "half": torch.randn(7).to(torch.float16),
    "step": torch.tensor(12.0),  # AdamW's 0-dim step
    "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "mask": torch.tensor([True, False, True]),
    "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
}


def test_safetensors_readers_read_what_we_write(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    encode_safetensors(TENSORS, metadata={"format": "pt"}).save(ours)
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, str(theirs), {"format": "pt"})
    got, want = load_file(str(ours)), load_file(str(theirs))
    assert got.keys() == want.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
    with safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_tree_round_trips_with_its_structure(tmp_path):
    tree = {
        "adapters": {"x": torch.randn(2, 2)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },
        "state": {"step": 3, "last_loss": None, "name": "__tensor__"},
    }
    drain(encoding_tree(tree)).save(tmp_path / "s.pt", tmp_path / "s.safetensors")
    back = load_tree(tmp_path / "s.pt", tmp_path / "s.safetensors")
    assert torch.equal(back["adapters"]["x"], tree["adapters"]["x"])
    assert torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], tree["optimizer"]["state"][0]["exp_avg"]
    )
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert back["state"] == tree["state"]


def test_an_older_checkpoint_with_inline_tensors_still_loads(tmp_path):
    tree = {"adapters": {"x": torch.randn(2, 2)}, "state": {"step": 1}}
    torch.save(tree, tmp_path / "old.pt")
    back = load_tree(tmp_path / "old.pt", tmp_path / "missing.safetensors")
    assert torch.equal(back["adapters"]["x"], tree["adapters"]["x"])
