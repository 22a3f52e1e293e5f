"""A fine-tuning job's states, the moves between them, and the names its adapter goes by.

The one place that says what a job may become next: the store applies a transition only from the
states listed here (``UPDATE ... WHERE status IN (...)``), so a late writer (a runner that fails
after a cancel, a publisher racing a cancel) cannot resurrect or overwrite a finished job.

    validating_files -> queued -> running -> succeeded
                          ^          |  \\-> failed
                          +----------+   \\-> cancelled      (queued -> cancelled as well)
                         (lease expired: re-queued)

``running`` covers training and, once the adapter is written (``adapter_path`` set), the short
wait for the publisher to load it into SGLang's LoRA serving. A training job has one owner (a
scheduler process) holding a lease it renews; a job whose lease expired goes back to ``queued``
(``JobStore.requeue_expired``; see docs/jobs.md). Imports nothing heavy: the CLI uses it.
"""

from __future__ import annotations

import enum
import re


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATES = frozenset(JobStatus) - FINAL_STATES

# target state -> the states a job may be in to move there
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.VALIDATING_FILES, JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset(ACTIVE_STATES),
}


# Model names that clients send without meaning an adapter: SGLang's default ``model`` ("default",
# what a request without one gets), and the OpenAI model names that OpenAI-written clients and
# tools send by default (GPT, ChatGPT, the o-series reasoning models, the legacy completion
# models that OpenAI's own fine-tuning started from). SGLang answers each with the base model;
# an adapter named so would capture their requests. Compared case-insensitively.
CLIENT_ALIASES = re.compile(
    r"default|gpt-.*|chatgpt.*|o[0-9]+(-.*)?|text-(davinci|curie|babbage|ada).*|davinci.*|babbage.*",
    re.IGNORECASE,
)


def reserved_name_reason(name: str, base_names: set[str] | frozenset[str]) -> str | None:
    """Why ``name`` may not name an adapter (None if it may): it is one of ``base_names`` (what
    the served model goes by: its served name, path, the path's last part) or a name clients
    send for the base model (:data:`CLIENT_ALIASES`). Case-insensitive: "Default" too."""
    folded = name.casefold()
    if any(folded == base.casefold() for base in base_names):
        return f"{name!r} names the served base model"
    if CLIENT_ALIASES.fullmatch(name):
        return (
            f"{name!r} is a model name clients send for the base model (SGLang's default, or an "
            "OpenAI model name)"
        )
    return None


def adapter_name(suffix: str | None, job_id: str) -> str:
    """The name SGLang serves the adapter under: the job's suffix, or else the job's id."""
    return suffix or job_id


def fine_tuned_model_name(base_model: str, adapter: str) -> str:
    """What requests name to use the adapter: ``<base>:<adapter>`` (SGLang's LoRA syntax)."""
    return f"{base_model}:{adapter}"


def checkpoint_model_name(base_model: str, adapter: str, step: int) -> str:
    return f"{fine_tuned_model_name(base_model, adapter)}:ckpt-step-{step}"
