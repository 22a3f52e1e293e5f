"""``python -m sglang_harli.finetune``: fine-tuning jobs on a running sglang-harli server.

    create DATASET.jsonl [--wait] [--suffix S] [--n-epochs N] [--lora-rank R] ...
    list | get JOB | events JOB [--follow] | cancel JOB | checkpoints JOB
    mode [--mode M] [--tpot-slo-ms MS|auto] [--slo-margin F] ...   (the server's co-run settings)

It speaks the server's OpenAI-style fine-tuning API over HTTP. Keys follow SGLang's rules: reads
send ``--api-key``; writes (upload, create, cancel) send ``--admin-api-key`` if given, else
``--api-key``. Requests wait ``--timeout`` seconds (default 60) for an answer; an upload waits as
long as the server validates the file (``--upload-timeout`` to bound it) and is streamed from
disk. Exit codes: 0 success; 1 the job failed or was cancelled (``create --wait``, ``get``,
``events --follow``); 2 the request was refused (bad input, unknown job, a missing or wrong key);
3 the server could not be reached (nothing was sent); 4 no answer came back (a timeout or a broken
connection: the request may have taken effect, check with ``list`` or ``get``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sglang_harli.client import (
    DEFAULT_TIMEOUT_S,
    ApiError,
    ClientError,
    HarliClient,
    TransportError,
    Unreachable,
)
from sglang_harli.jobs.lifecycle import FINAL_STATES, JobStatus

DEFAULT_SERVER = os.environ.get("HARLI_SERVER", "http://127.0.0.1:30000")
# 1 is "the job failed": a transport failure must not read as that (a script would act on it)
EXIT_OK, EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_NO_ANSWER = 0, 1, 2, 3, 4
BAR_WIDTH = 24


def exit_code(error: ClientError) -> int:
    """The CLI's exit code for a request that failed this way."""
    if isinstance(error, ApiError):
        return EXIT_REFUSED
    if isinstance(error, Unreachable):
        return EXIT_UNREACHABLE
    if isinstance(error, TransportError):
        return EXIT_NO_ANSWER
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    client = HarliClient(
        args.server,
        args.api_key,
        admin_api_key=args.admin_api_key,
        ca_cert=args.ca_cert,
        timeout_s=args.timeout,
        upload_timeout_s=args.upload_timeout,
    )
    try:
        return args.run(client, args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:  # a dataset that cannot be read: bad input, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


# --- commands ----------------------------------------------------------------------------------


def cmd_create(client: HarliClient, args: argparse.Namespace) -> int:
    model = args.model or client.model_id()
    training = client.upload(Path(args.training_file))
    body: dict[str, Any] = {
        "model": model,
        "training_file": training["id"],
        "hyperparameters": {
            name: value
            for name in (
                "n_epochs",
                "batch_size",
                "learning_rate_multiplier",
                "lora_rank",
                "lora_alpha",
                "lora_dropout",
                "lora_target_modules",
                "max_seq_length",
            )
            if (value := getattr(args, name)) is not None
        },
    }
    if args.validation_file:
        body["validation_file"] = client.upload(Path(args.validation_file))["id"]
    if args.suffix:
        body["suffix"] = args.suffix
    if args.seed is not None:
        body["seed"] = args.seed
    job = client.request("POST", "/v1/fine_tuning/jobs", write=True, json=body)  # all fields
    print(f"created {job['id']} (training file {training['id']})")
    if not args.wait:
        return EXIT_OK
    return wait(client, job["id"], args.poll)


def cmd_list(client: HarliClient, args: argparse.Namespace) -> int:
    for job in client.jobs(args.limit):
        print(
            f"{job['id']}  {job['status']:<10}  step {job.get('step', 0)}/"
            f"{job.get('total_steps') or '?'}  {job['fine_tuned_model'] or ''}"
        )
    return EXIT_OK


def cmd_get(client: HarliClient, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    print(json.dumps(job, indent=2))
    return EXIT_JOB_FAILED if job["status"] in (JobStatus.FAILED, JobStatus.CANCELLED) else EXIT_OK


def cmd_events(client: HarliClient, args: argparse.Namespace) -> int:
    seen: set[str] = set()

    def show_new() -> None:
        for event in client.events(args.job):
            if event["id"] not in seen:
                seen.add(event["id"])
                print(f"{_clock(event['created_at'])}  {event['level']:<5}  {event['message']}")

    show_new()
    while True:
        job = client.job(args.job)
        if not args.follow or job["status"] in FINAL_STATES:
            break
        time.sleep(args.poll)
        show_new()
    if args.follow:
        show_new()  # the events written as the job ended (read after its final status)
    return EXIT_JOB_FAILED if job["status"] in (JobStatus.FAILED, JobStatus.CANCELLED) else EXIT_OK


def cmd_cancel(client: HarliClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    print(f"{job['id']}: {job['status']}")
    return EXIT_OK


def cmd_checkpoints(client: HarliClient, args: argparse.Namespace) -> int:
    for ckpt in client.checkpoints(args.job):
        loss = ckpt["metrics"].get("train_loss")
        shown = "   n/a" if loss is None else f"{loss:.4f}"  # non-finite losses are stored as null
        print(f"step {ckpt['step_number']:>6}  loss {shown}  {ckpt['fine_tuned_model_checkpoint']}")
    return EXIT_OK


def cmd_mode(client: HarliClient, args: argparse.Namespace) -> int:
    """The server's co-run settings; switched first when any is given."""
    settings = {name: getattr(args, name) for name in MODE_SETTINGS}
    if any(value is not None for value in settings.values()):
        answer = client.set_mode(**settings)
        control, objective = answer["control"], answer["objective"]
    else:
        scheduler = client.scheduler()
        if scheduler is None:
            print("the server runs --harli-mode off: no co-run settings")
            return EXIT_OK
        control, objective = scheduler["control"], scheduler["corun"]["objective"]
    print(
        f"mode {control['mode']}  objective {control['tpot_slo_ms']}"
        f"{' ms' if control['tpot_slo_ms'] != 'auto' else ''}  margin {control['slo_margin']}  "
        f"share {control['static_share']}  budget {control['finetune_budget_ms']} ms  "
        f"switches {control['switches']}"
    )
    if objective["tpot_slo_ms"] is not None and control["tpot_slo_ms"] == "auto":
        print(f"auto objective now {objective['tpot_slo_ms']:.2f} ms")
    if objective.get("reason"):
        print(objective["reason"])
    return EXIT_OK


MODE_SETTINGS = ("mode", "tpot_slo_ms", "slo_margin", "static_share", "finetune_budget_ms")


def wait(client: HarliClient, job_id: str, poll_s: float) -> int:
    """Show progress until the job ends; the exit code says how it ended."""
    tty = sys.stdout.isatty()
    last_line = None
    while True:
        job = client.job(job_id)
        line = progress_line(job, _latest_loss(client, job_id))
        if line != last_line:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last_line = line
        if job["status"] in FINAL_STATES:
            break
        time.sleep(poll_s)
    if tty:
        print()
    if job["status"] == JobStatus.SUCCEEDED:
        print(f'succeeded: use "model": "{job["fine_tuned_model"]}"')
        return EXIT_OK
    reason = (job.get("error") or {}).get("message", "")
    print(f"{job['status']}{': ' + reason if reason else ''}", file=sys.stderr)
    return EXIT_JOB_FAILED


def progress_line(job: dict, loss: float | None) -> str:
    step, total = job.get("step") or 0, job.get("total_steps") or 0
    filled = BAR_WIDTH * step // total if total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    parts = [f"{job['status']:<9}", f"[{bar}]", f"step {step}/{total or '?'}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if job["status"] == JobStatus.RUNNING and job.get("estimated_finish"):
        parts.append(f"eta {max(0, job['estimated_finish'] - int(time.time()))}s")
    return "  ".join(parts)


def _latest_loss(client: HarliClient, job_id: str) -> float | None:
    for event in reversed(client.events(job_id, limit=5)):
        if event.get("type") == "metrics" and event.get("data"):
            return event["data"].get("train_loss")
    return None


def _clock(timestamp: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


# --- arguments ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_harli.finetune",
        description="Fine-tuning jobs on a running sglang-harli server.",
    )
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"default: {DEFAULT_SERVER}")
    parser.add_argument(
        "--ca-cert",
        default=os.environ.get("HARLI_CA_CERT"),
        help="an https server's certificate (or its CA) to trust, e.g. the server's own "
        "--ssl-certfile when it is self-signed (default: $HARLI_CA_CERT)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HARLI_API_KEY"),
        help="the server's --api-key, for every request (default: $HARLI_API_KEY)",
    )
    parser.add_argument(
        "--admin-api-key",
        default=os.environ.get("HARLI_ADMIN_API_KEY"),
        help="the server's --admin-api-key, for uploads, create and cancel "
        "(default: $HARLI_ADMIN_API_KEY; without it they send --api-key)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for a connection and for each answer (default %(default)g)",
    )
    parser.add_argument(
        "--upload-timeout",
        type=_seconds,
        default=None,
        help="seconds to wait for an upload's answer (default: no limit; the server validates "
        "the whole file before it answers)",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="upload a JSONL dataset and start a job")
    create.add_argument("training_file", help="JSONL: chat 'messages' or prompt/completion")
    create.add_argument("--model", help="default: the server's model")
    create.add_argument("--validation-file")
    create.add_argument("--suffix", help="adapter name: the model becomes <base>:<suffix>")
    create.add_argument("--seed", type=int)
    create.add_argument("--n-epochs", type=int)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--learning-rate-multiplier", type=float)
    create.add_argument("--lora-rank", type=int)
    create.add_argument("--lora-alpha", type=float)
    create.add_argument("--lora-dropout", type=float)
    create.add_argument("--lora-target-modules", nargs="+")
    create.add_argument("--max-seq-length", type=int)
    create.add_argument("--wait", action="store_true", help="show progress until the job ends")
    create.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    create.set_defaults(run=cmd_create)

    sub.add_parser("list", help="recent jobs").set_defaults(run=cmd_list)
    sub.choices["list"].add_argument("--limit", type=int, default=20)
    for name, run, text in (
        ("get", cmd_get, "one job, as JSON"),
        ("events", cmd_events, "a job's events"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("checkpoints", cmd_checkpoints, "a job's checkpoints"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("job")
        command.set_defaults(run=run)
    mode = sub.add_parser(
        "mode",
        help="the server's co-run mode and objective; given any option, switch them (POST "
        "/harli/mode, the admin key if the server has one)",
    )
    mode.add_argument("--mode", help="harli, time-sliced or idle-only (what the server runs)")
    mode.add_argument("--tpot-slo-ms", type=_number_or_auto, help="the objective (ms), or auto")
    mode.add_argument("--slo-margin", type=float, help="fraction of the objective kept free")
    mode.add_argument("--static-share", type=float, help="static mode: the finetune share")
    mode.add_argument("--finetune-budget-ms", type=float, help="time-sliced mode: ms per iteration")
    mode.set_defaults(run=cmd_mode)
    sub.choices["events"].add_argument("--follow", action="store_true")
    sub.choices["events"].add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    return parser


def _number_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of ms or auto: {text}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
