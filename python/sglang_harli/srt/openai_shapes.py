"""OpenAI's JSON shapes for the job store's records (files, jobs, events, checkpoints, lists),
so the official ``openai`` client parses what the fine-tuning routes return."""

from __future__ import annotations

from sglang_harli.jobs.lifecycle import JobStatus, checkpoint_model_name
from sglang_harli.jobs.records import CheckpointRecord, Event, FileRecord, Job


def file_json(f: FileRecord) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def job_status(job: Job) -> str:
    """``cancelling``: a running job whose cancel is requested, until its trainer stops it."""
    if job.status == JobStatus.RUNNING and job.cancel_requested:
        return "cancelling"
    return job.status


def job_json(job: Job) -> dict:
    h = dict(job.hyperparameters)
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": "org-local",
        "result_files": [],
        "status": job_status(job),
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": h,
        "method": {"type": "supervised", "supervised": {"hyperparameters": h}},
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "seed": job.seed,
        "estimated_finish": job.estimated_finish if job.status == "running" else None,
        "integrations": [],
        "user_provided_suffix": job.suffix,
        "step": job.step,
        "total_steps": job.total_steps,
    }


def event_json(e: Event) -> dict:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


def checkpoint_json(c: CheckpointRecord, job: Job) -> dict:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": checkpoint_model_name(job.model, job.adapter_name, c.step),
        "fine_tuning_job_id": c.job_id,
        "step_number": c.step,
        "metrics": c.metrics,
    }


def list_json(data: list, has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}
