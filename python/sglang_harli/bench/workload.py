"""What a replay sends: the fine-tuning job every mode trains and the prompts of the trace.

The job is the same on every mode's server, in the profile tool (its throwaway job) and in the
fleet simulation (its units are cut from these chats), so a profile, a replay and a simulation
measure one workload.
"""

from __future__ import annotations

import random

from sglang_harli.bench.trace import TraceRequest

# The job every mode trains: short chats of different lengths (each unit kind is measured at
# several costs), many epochs, so it runs through the whole replay.
JOB_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("What color is grass?", "Grass is green."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("Say something kind.", "You are doing great today."),
    ("What is water made of?", "Hydrogen and oxygen."),
    ("Which planet is red?", "Mars is the red planet."),
    ("What do bees make?", "Bees make honey."),
]


def prompt_ids(
    request: TraceRequest, index: int, vocab_size: int, shared_prefix: int = 0
) -> list[int]:
    """A prompt of exactly the trace's length: seeded token ids away from the special tokens
    (which tokenizers put at either end of the vocabulary). The first ``shared_prefix`` of them
    are the same in every prompt, as a deployment's system prompt is (the trace has lengths,
    not text: without it no two prompts share a prefix for SGLang's radix cache to reuse)."""
    low, high = vocab_size // 10, vocab_size // 2
    shared = random.Random(-1)
    head = [shared.randrange(low, high) for _ in range(min(shared_prefix, request.context_tokens))]
    rng = random.Random(index)
    return head + [rng.randrange(low, high) for _ in range(request.context_tokens - len(head))]


# The job the benchmark scripts and the server tests train beside decode until they cancel it:
# one-word chats, the cheapest units there are, so its cost is the co-run loop's, not the data's.
SHORT_CHATS = [("hi", "hello")] * 8
