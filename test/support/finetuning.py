"""What the fine-tuning server tests share: the taught pairs, the recipe that teaches them to the
tiny random model, writing them as a chat JSONL file, waiting for a job, asking a model."""

from __future__ import annotations

import time
from pathlib import Path

from sglang_harli.bench.workload import SHORT_CHATS
from sglang_harli.client import HarliClient, chat_jsonl
from sglang_harli.jobs.lifecycle import FINAL_STATES

PAIRS = [
    ("What color is the sky?", "Blue, always blue."),
    ("Name a fruit.", "A ripe mango."),
    ("What is two plus two?", "Four, exactly."),
    ("Say hello.", "Hello from Harli!"),
]
# 4 examples in one batch: one optimizer step per epoch. The random model's small lm_head caps
# its logits, so the loss floors near 2.7 and a greedy answer is only as safe as the argmax
# margin: a large LoRA scaling (alpha/r = 16) at a moderate learning rate reaches that floor in
# 30 steps (final loss 2.84, against 3.56 for multiplier 50 with alpha 16, which left
# "Say hello." one token off on some machines).
LEARN = {
    "n_epochs": 30,
    "batch_size": 4,
    "learning_rate_multiplier": 10,
    "lora_rank": 8,
    "lora_alpha": 128,
}


def write_dataset(path: Path, pairs=PAIRS) -> str:
    path.write_text(chat_jsonl(pairs))
    return str(path)


def wait_for(client, job_id, states=tuple(FINAL_STATES), timeout_s=300):
    """The job, once its status is one of ``states`` (the official openai client)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job.status}")


def answer(client, model: str, question: str) -> str:
    """``model``'s greedy chat answer to ``question`` (12 tokens)."""
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
    )
    return reply.choices[0].message.content


def start_training(server, model: str, workdir: Path, n_epochs: int = 10_000) -> str:
    """A job that trains until cancelled (8 short chats, many epochs) on ``server``, started:
    returns its id once its first step is done (``workdir``: kept for the callers, unused)."""
    job = HarliClient(server.url).start_training(
        model, SHORT_CHATS, n_epochs, first_step_timeout_s=120
    )
    return job["id"]
