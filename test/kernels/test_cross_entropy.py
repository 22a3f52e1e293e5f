"""The fused LM-head cross-entropy kernel against the engine's torch loss head
(``torch_ops.chunked_cross_entropy``, the summed loss over valid targets)."""

import pytest
import torch
from kernel_testutil import LaunchSpy, assert_close, leaf

import harli_kernels.cross_entropy as ce_mod
from harli_kernels import fused_linear_cross_entropy
from sglang_harli.finetune import torch_ops

T, H, V = 21, 24, 50


def _data(dtype, device, n_ignored=3, label_dtype=torch.int64, ignore_index=-100):
    hidden = torch.randn(T, H, dtype=dtype, device=device)
    w = (torch.randn(V, H, dtype=dtype, device=device) / 3).contiguous()
    labels = torch.randint(0, V, (T,), device=device)
    labels[0] = V - 1  # last vocabulary row (tail of the last chunk)
    labels[1] = 0
    if n_ignored:
        labels[torch.randperm(T, device=device)[:n_ignored]] = ignore_index
    return hidden, w, labels.to(label_dtype)


def _engine_ce(hidden, w, labels, ignore_index=-100, reduction="mean", vocab_chunk=16):
    """``torch_ops.chunked_cross_entropy`` on the kernel's arguments: it takes valid targets only
    (as ``graph.head_loss_sum`` selects them) and sums; the mean divides by their count."""
    valid = labels != ignore_index
    total = torch_ops.chunked_cross_entropy(hidden[valid], w, labels[valid].long(), vocab_chunk)
    return total if reduction == "sum" else total / valid.sum().clamp_min(1)


def _run(hidden, w, labels, num_sms, chunk_size, **kw):
    h = leaf(hidden)
    loss = fused_linear_cross_entropy(h, w, labels, num_sms, chunk_size=chunk_size, **kw)
    loss.backward(torch.tensor(1.7, device=loss.device))
    hr = leaf(hidden)
    ref = _engine_ce(hr, w, labels, **kw)
    ref.backward(torch.tensor(1.7, device=ref.device))
    return loss, h.grad, ref, hr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [24, 7, 4096])
def test_fused_ce_chunks(dtype, chunk_size, device):
    # 24: 3 chunks, last one partial; 7: chunk smaller than a vocab block; 4096: a single chunk
    loss, g, ref, gr = _run(*_data(dtype, device), 3, chunk_size)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, dtype, "loss", factor=0.5)
    assert_close(g, gr, dtype, "d_hidden")
    assert g.dtype == dtype


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_fused_ce_num_sms_and_grid(num_sms, device):
    with (
        LaunchSpy(ce_mod, "_lce_fwd_kernel") as fwd,
        LaunchSpy(ce_mod, "_lce_dlogits_kernel") as bw,
    ):
        loss, g, ref, gr = _run(*_data(torch.bfloat16, device), num_sms, 24)
    assert_close(loss, ref, torch.bfloat16, "loss", factor=0.5)
    assert_close(g, gr, torch.bfloat16, "d_hidden")
    cfg = ce_mod._config()
    t_blocks = -(-T // cfg["BLOCK_T"])
    assert fwd.grids == [(min(num_sms, t_blocks * 3),)]  # 3 vocabulary chunks of 24
    assert len(bw.grids) == 3  # one dlogits launch per chunk
    for (g_,) in bw.grids:
        assert 1 <= g_ <= num_sms


def test_fused_ce_sum_int32_labels_custom_ignore(device):
    hidden, w, labels = _data(
        torch.float32, device, n_ignored=5, label_dtype=torch.int32, ignore_index=7
    )
    loss, g, ref, gr = _run(hidden, w, labels, 3, 16, ignore_index=7, reduction="sum")
    assert_close(loss, ref, torch.float32, "sum loss")
    assert_close(g, gr, torch.float32, "d_hidden")
    ignored = labels == 7
    assert torch.count_nonzero(g[ignored]) == 0


def test_fused_ce_all_ignored_is_zero(device):
    hidden, w, labels = _data(torch.bfloat16, device)
    labels[:] = -100
    h = leaf(hidden)
    loss = fused_linear_cross_entropy(h, w, labels, 3, chunk_size=24)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0


def test_fused_ce_mean_matches_torch_module(device):
    # independent check against plain nn.functional on full logits
    hidden, w, labels = _data(torch.float32, device)
    loss = fused_linear_cross_entropy(hidden, w, labels, 3, chunk_size=16)
    full = torch.nn.functional.cross_entropy(hidden @ w.t(), labels, ignore_index=-100)
    assert_close(loss, full, torch.float32, "mean CE")


def test_fused_ce_bad_arguments(device):
    hidden, w, labels = _data(torch.bfloat16, device)
    with pytest.raises(ValueError, match="num_sms"):
        fused_linear_cross_entropy(hidden, w, labels, 0)
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_cross_entropy(hidden, leaf(w), labels, 2)
    with pytest.raises(ValueError, match="labels must be int"):
        fused_linear_cross_entropy(hidden, w, labels.float(), 2)
    with pytest.raises(ValueError, match="labels has shape"):
        fused_linear_cross_entropy(hidden, w, labels[:-1], 2)
    with pytest.raises(ValueError, match="disagree on H"):
        fused_linear_cross_entropy(hidden, w[:, :-1], labels, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, w, labels, 2, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, w, labels, 2, reduction="none")
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden.int(), w, labels, 2)
