"""The replay's prompts: the trace's lengths exactly, and a shared head when asked."""

from __future__ import annotations

from sglang_harli.bench.trace import TraceRequest
from sglang_harli.bench.workload import prompt_ids


def test_prompts_have_the_trace_lengths_and_share_only_the_head_asked_for():
    requests_ = [TraceRequest(0.0, n, 8) for n in (100, 40, 10)]
    plain = [prompt_ids(r, i, 1000) for i, r in enumerate(requests_)]
    assert [len(p) for p in plain] == [100, 40, 10]
    assert plain[0][:8] != plain[1][:8]  # random prompts: nothing for a radix cache to reuse
    shared = [prompt_ids(r, i, 1000, shared_prefix=32) for i, r in enumerate(requests_)]
    assert [len(p) for p in shared] == [100, 40, 10]
    assert shared[0][:32] == shared[1][:32] and shared[2] == shared[0][:10]
    assert shared[0][32:40] != shared[1][32:40]  # after the head, each its own
    assert all(100 <= t < 500 for p in shared for t in p)  # away from the special tokens
