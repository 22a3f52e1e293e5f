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


def prompt_ids(request: TraceRequest, index: int, vocab_size: int) -> list[int]:
    """A prompt of exactly the trace's length: seeded token ids away from the special tokens
    (which tokenizers put at either end of the vocabulary)."""
    rng = random.Random(index)
    low, high = vocab_size // 10, vocab_size // 2
    return [rng.randrange(low, high) for _ in range(request.context_tokens)]


# The job the benchmark scripts and the server tests train beside decode until they cancel it:
# one-word chats, the cheapest units there are, so its cost is the co-run loop's, not the data's.
SHORT_CHATS = [("hi", "hello")] * 8
