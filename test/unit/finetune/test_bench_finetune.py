"""scripts/bench_finetune.py, run as a user runs it (tiny model, a step or two): both sides
train, and the JSON holds each side's tokens/s and peak memory and their ratios."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "bench_finetune.py"


def test_bench_reports_both_sides_and_ratios(model_dirs):
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model-path",
        str(model_dirs["llama"]),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--rank",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--threads",
        "1",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert (result["batch_size"], result["seq_len"], result["rank"]) == (2, 16, 4)
    for side in ("engine", "hf_peft"):
        s = result[side]
        assert s["tokens_per_s"] > 0 and s["tokens_per_s_best"] >= s["tokens_per_s"]
        assert s["peak_memory_bytes"] >= 0
        # the same data, model and adapter init scheme: both start from the same loss
        assert abs(s["first_loss"] - result["engine"]["first_loss"]) < 1e-3
    assert result["ratio"]["tokens_per_s"] > 0 and result["ratio"]["peak_memory"] > 0
    assert "peak RSS" in result["memory_measure"]
