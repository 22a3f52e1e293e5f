"""The CPU-only recipe: flags added only where the user gave none, and per-process guards."""

from __future__ import annotations

import json
import subprocess
import sys

from sglang_harli.srt import cpu


def test_server_flags_fill_in_only_what_is_missing():
    flags = cpu.server_flags(["--model-path", "/nonexistent", "--attention-backend=triton"])
    as_dict = dict(zip(flags[::2], flags[1::2], strict=True))
    assert as_dict["--device"] == "cpu"
    assert as_dict["--lora-backend"] == "torch_native"
    assert "--attention-backend" not in as_dict
    assert int(as_dict["--max-total-tokens"]) > 0
    assert "--disaggregation-decode-retraction-backup" not in as_dict

    assert (
        cpu.server_flags(["--device", "cpu", "--max-total-tokens", "4096"]).count("--device") == 0
    )
    decode = cpu.server_flags(["--disaggregation-mode", "decode"])
    assert decode[decode.index("--disaggregation-decode-retraction-backup") + 1] == "cpu_tensor"


def test_fp32_only_where_the_cpu_lacks_bf16_arithmetic(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 4, "hidden_size": 256, "num_hidden_layers": 2})
    )
    model = ["--model-path", str(tmp_path)]

    def flags(argv, bf16: bool):
        monkeypatch.setattr(cpu, "bf16_arithmetic", lambda: bf16)
        out = cpu.server_flags(argv)
        return dict(zip(out[::2], out[1::2], strict=True))

    slow, fast = flags(model, bf16=False), flags(model, bf16=True)
    assert slow["--dtype"] == "float32" and "--dtype" not in fast
    # fp32 KV takes twice the bytes: the pool picked for the same RAM is half as many tokens
    # (unless the cap binds)
    assert int(slow["--max-total-tokens"]) <= int(fast["--max-total-tokens"])
    assert cpu.default_kv_tokens(str(tmp_path), 1 << 28, 4) * 2 == cpu.default_kv_tokens(
        str(tmp_path), 1 << 28, 2
    )
    assert "--dtype" not in flags([*model, "--dtype", "bfloat16"], bf16=False)  # the user's


def test_default_kv_pool_fits_in_ram(tmp_path):
    config = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 32}))
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16
    # an 8B-shaped model in 4 GiB of free RAM: 1/8 of it, not SGLang's ~72%
    assert cpu.default_kv_tokens(str(tmp_path), 4 << 30) == (4 << 30) // 8 // per_token
    assert cpu.default_kv_tokens(str(tmp_path), 1 << 50) == cpu.MAX_DEFAULT_KV_TOKENS
    assert cpu.default_kv_tokens(str(tmp_path), 1 << 20) == cpu.MIN_DEFAULT_KV_TOKENS
    assert cpu.default_kv_tokens(None, 1 << 30) > 0  # unreadable config: a safe default


def test_flag_values_in_both_forms():
    argv = ["--model-path", "a", "--port=3", "--model-path=b"]
    assert cpu.flag_value(argv, "--model-path") == "b"
    assert cpu.flag_value(argv, "--port") == "3"
    assert cpu.flag_value(argv, "--host") is None
    assert cpu.has_flag(argv, "--port") and not cpu.has_flag(argv, "--po")


GUARDED = """
import sgl_kernel, torch
from sgl_kernel.kvcacheio import transfer_kv_all_layer
x = torch.empty(4, pin_memory=True)
y = torch.zeros(2).pin_memory()
try:
    transfer_kv_all_layer()
except NotImplementedError as e:
    print("raised:", e)
print("ok", x.shape[0], y.shape[0])
"""


def test_guards_apply_in_a_fresh_process_through_the_environment():
    result = subprocess.run(
        [sys.executable, "-c", GUARDED], env=cpu.child_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (
        "raised: sgl_kernel.kvcacheio.transfer_kv_all_layer needs the CUDA build" in result.stdout
    )
    assert "ok 4 2" in result.stdout


def test_nothing_is_applied_without_the_environment():
    env = {k: v for k, v in cpu.child_env().items() if k != cpu.GUARD_ENV}
    probe = "import sys, torch; print(any('Guard' in type(f).__name__ for f in sys.meta_path))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    ours = {"OMP_NUM_THREADS": str(cpu.intra_op_threads())}
    assert cpu.rank_env(["--tp-size", "1"], dict(ours)) == {}
    assert cpu.rank_env(["--tp-size", "2"], dict(ours)) == {
        cpu.BIND_ENV: "0-3|4-7",
        "OMP_NUM_THREADS": "4",
    }
    assert cpu.rank_env(["--tp", "2", "--dp-size", "2"], dict(ours))[cpu.BIND_ENV] == (
        "0-1|2-3|4-5|6-7"
    )
    # what the user set stays
    mine = {cpu.BIND_ENV: "0-1|6-7", "OMP_NUM_THREADS": "2"}
    assert cpu.rank_env(["--tp-size", "2"], mine) == {}


def test_more_ranks_than_cores_share_them(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
    env = cpu.rank_env(["--tp-size", "4"], {})
    assert env == {cpu.BIND_ENV: "0-0|1-1|0-0|1-1", "OMP_NUM_THREADS": "1"}


PYNCCL_PROBE = """
import sglang.srt.distributed.parallel_state as ps
calls = []
ps.GroupCoordinator = lambda **kwargs: calls.append(kwargs["use_pynccl"])
ps.init_model_parallel_group([[0, 1]], 0, "gloo")
ps.init_model_parallel_group([[0, 1]], 0, "gloo", use_pynccl=True)
print(calls)
"""


def test_model_parallel_groups_are_made_without_pynccl_on_cpu():
    """SGLang's groups would build a PyNccl communicator on the CPU device and fail; with the
    guards, they do not unless asked (collectives then go over gloo)."""
    done = subprocess.run(
        [sys.executable, "-c", PYNCCL_PROBE],
        env=cpu.child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[False, True]"
