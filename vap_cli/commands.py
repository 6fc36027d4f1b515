"""The `vap` subcommands (argparse namespaces in, exit codes out)."""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cancel import cancel_job
from .config import StackInfo, discover
from .costs import cost_of, format_usd
from .errors import EXIT_INVALID, EXIT_JOB_FAILED, CliError
from .jobs import TERMINAL, describe_progress, find_upload, get_status, list_jobs, read_json
from .progress import follow, render
from .submission import (
    SETTING_FIELDS,
    InvalidSubmission,
    Submission,
    default_name,
    from_files,
    from_row,
    from_sidecar_file,
    upload,
    validate,
)


def _stack(args: argparse.Namespace) -> StackInfo:
    return discover(args.stack, args.profile, args.region, args.local_state)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _errors(status: dict[str, Any]) -> list[str]:
    return [str(e.get("message")) for e in status.get("errors") or []]


# Previews stored next to video.mp4 (status.json names them), saved as <name>-<job_id><suffix>.
PREVIEW_FILES = (("poster_key", ".poster.jpg"), ("preview_key", ".preview.webp"))


def download(stack: StackInfo, status: dict[str, Any], out: Path) -> Path:
    """Save a succeeded job's MP4 (and metadata.json, poster.jpg, preview.webp when it has them) as
    <out>/<name>-<job_id>.mp4, .metadata.json, .poster.jpg, .preview.webp."""
    out.mkdir(parents=True, exist_ok=True)
    leaf = str(status.get("name") or "job").rsplit("/", 1)[-1]
    target = out / f"{leaf}-{status['job_id']}.mp4"
    s3 = stack.client("s3")
    s3.download_file(stack.bucket, status["output_key"], str(target))
    if status.get("metadata_key"):
        s3.download_file(stack.bucket, status["metadata_key"], str(target.with_suffix(".metadata.json")))
    for field, suffix in PREVIEW_FILES:
        if status.get(field):
            s3.download_file(stack.bucket, str(status[field]), str(target.with_suffix(suffix)))
    return target


def _finish(stack: StackInfo, status: dict[str, Any], out: Path | None) -> int:
    if status.get("state") == "succeeded":
        if out is not None:
            _say(f"saved {download(stack, status, out)}")
        else:
            _say(f"result: s3://{stack.bucket}/{status['output_key']}")
        return 0
    _say(f"job {status.get('job_id')} {status.get('state')}:")
    for message in _errors(status):
        _say(f"  - {message}")
    return EXIT_JOB_FAILED


def _submit_one(stack: StackInfo, sub: Submission, find_timeout_s: float) -> dict[str, Any] | None:
    etag = upload(sub, stack)
    _say(f"uploaded s3://{stack.bucket}/{sub.sidecar_key(stack)} ({len(sub.uploads)} media file(s) first)")
    return find_upload(stack, sub.name, etag, timeout_s=find_timeout_s)


def submit(args: argparse.Namespace) -> int:
    stack = _stack(args)
    if args.sidecar:
        if args.video or args.image:
            raise CliError("Give either VIDEO IMAGE or --sidecar FILE, not both.", EXIT_INVALID)
        sub = from_sidecar_file(Path(args.sidecar), args.name, stack.max_sidecar_bytes)
    else:
        if not args.video or not args.image:
            raise CliError("vap submit needs VIDEO and IMAGE (or --sidecar FILE).", EXIT_INVALID)
        settings = {f: getattr(args, f) for f in SETTING_FIELDS}
        sub = from_files(args.video, args.image, args.prompt, args.video_description, settings, args.name)
    validate(sub, stack)
    _say(f"submitting to the {stack.describe()}")
    status = _submit_one(stack, sub, find_timeout_s=args.find_timeout)
    folder = f"s3://{stack.bucket}/{sub.outputs_folder(stack)}"
    if status is None:
        _say(f"the job has not appeared yet; results will appear under {folder}<job_id>/")
        _say(f"follow it with: vap status {sub.name}")
        return 0
    job_id = status["job_id"]
    _say(f"job {job_id}")
    _say(f"results: {folder}{job_id}/ (video.mp4 + metadata.json, or error.json)")
    if not args.wait:
        _say(f"follow it with: vap status {job_id}")
        return 0
    final = follow(stack, _key(stack, sub, job_id), args.timeout, args.poll)
    return _finish(stack, final, Path(args.out) if args.out else Path("."))


def _key(stack: StackInfo, sub: Submission, job_id: str) -> str:
    return f"{sub.outputs_folder(stack)}{job_id}/status.json"


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror}", EXIT_INVALID) from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise CliError(f"{path}:{number}: not JSON ({exc})", EXIT_INVALID) from None
            if not isinstance(row, dict):
                raise CliError(f"{path}:{number}: each line must be a JSON object", EXIT_INVALID)
            rows.append(row)
        return rows
    return [dict(row) for row in csv.DictReader(text.splitlines())]


def batch(args: argparse.Namespace) -> int:
    stack = _stack(args)
    manifest = Path(args.manifest)
    rows = _read_manifest(manifest)
    if not rows:
        raise CliError(f"{manifest} has no rows.", EXIT_INVALID)
    subs: list[Submission] = []
    problems: list[str] = []
    for number, row in enumerate(rows, 1):
        image = str(row.get("image") or row.get("image_url") or f"row{number}")
        default = f"{default_name(manifest.name)}/{number:03d}-{default_name(image)}"
        try:
            sub = from_row(row, manifest.parent, default)
            validate(sub, stack)
            subs.append(sub)
        except InvalidSubmission as exc:
            problems.extend(f"row {number}: {e['message']}" for e in exc.errors)
        except CliError as exc:
            problems.append(f"row {number}: {exc.message}")
    if problems:
        raise CliError(
            "The manifest has problems (nothing was uploaded):\n" + "\n".join(f"  - {p}" for p in problems),
            EXIT_INVALID,
        )
    _say(f"submitting {len(subs)} job(s) to the {stack.describe()}")
    results: list[tuple[Submission, dict[str, Any] | None]] = []
    for sub in subs:
        status = _submit_one(stack, sub, find_timeout_s=args.find_timeout)
        results.append((sub, status))
        if status:
            _say(f"  {sub.name}: job {status['job_id']}")
    if args.wait:
        results = _wait_all(stack, results, args.timeout, args.poll)
    out = Path(args.out) if args.out else None
    table = []
    failed = 0
    for sub, status in results:
        if status is None:
            table.append((sub.name, "?", "not seen yet", f"vap status {sub.name}"))
            continue
        state = str(status.get("state"))
        if state == "succeeded":
            where = (
                str(download(stack, status, out)) if out else f"s3://{stack.bucket}/{status['output_key']}"
            )
        elif state in TERMINAL:
            failed += 1
            where = "; ".join(_errors(status))[:100]
        else:
            where = describe_progress(status)
        table.append((sub.name, status["job_id"], state, where))
    _say()
    _table(("NAME", "JOB", "STATE", "RESULT"), table)
    _say(f"{len(results)} job(s); {failed} failed" if args.wait else f"{len(results)} job(s) submitted")
    return EXIT_JOB_FAILED if failed else 0


def _wait_all(
    stack: StackInfo, results: list[tuple[Submission, dict[str, Any] | None]], timeout_s: float, poll_s: float
) -> list[tuple[Submission, dict[str, Any] | None]]:
    deadline = time.monotonic() + timeout_s
    current = list(results)
    last: dict[str, str] = {}
    while True:
        pending = False
        for index, (sub, status) in enumerate(current):
            if status is None or status.get("state") in TERMINAL:
                continue
            fresh = read_json(stack, _key(stack, sub, status["job_id"])) or status
            current[index] = (sub, fresh)
            line = render(fresh)
            if last.get(sub.name) != line:
                _say(f"  {sub.name}: {line}")
                last[sub.name] = line
            pending = pending or fresh.get("state") not in TERMINAL
        if not pending or time.monotonic() > deadline:
            return current
        time.sleep(poll_s)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _say("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def status(args: argparse.Namespace) -> int:
    stack = _stack(args)
    found = get_status(stack, args.job)
    if args.json:
        found.pop("_key", None)
        _say(json.dumps(found, indent=2, sort_keys=True))
        return EXIT_JOB_FAILED if found.get("state") in ("failed", "cancelled") else 0
    _say(f"job      {found.get('job_id')}")
    _say(f"name     {found.get('name')}  (s3://{stack.bucket}/{found.get('sidecar_key')})")
    _say(f"state    {describe_progress(found)}")
    _say(
        f"backend  {found.get('backend') or '-'}"
        + (f" (fell back from {found['fallback_from']})" if found.get("fallback_from") else "")
    )
    _say(f"updated  {found.get('updated_at')}")
    if found.get("output_key"):
        _say(f"output   s3://{stack.bucket}/{found['output_key']}")
    for message in _errors(found):
        _say(f"error    {message}")
    if args.wait and found.get("state") not in TERMINAL:
        final = follow(stack, found["_key"], args.timeout, args.poll)
        return _finish(stack, final, Path(args.out) if args.out else None)
    return EXIT_JOB_FAILED if found.get("state") in ("failed", "cancelled") else 0


def list_(args: argparse.Namespace) -> int:
    stack = _stack(args)
    states = [s for value in args.status or [] for s in value.split(",") if s]
    found = list_jobs(stack, states, args.limit)
    rows = [
        (
            str(s.get("job_id")),
            describe_progress(s),
            str(s.get("backend") or "-"),
            format_usd(cost_of(stack, s)),
            str(s.get("name")),
            str(s.get("updated_at") or ""),
        )
        for s in found
    ]
    if not rows:
        _say("no jobs" + (f" with status {', '.join(states)}" if states else ""))
        return 0
    _table(("JOB", "STATE", "BACKEND", "COST", "NAME", "UPDATED"), rows)
    return 0


def cancel(args: argparse.Namespace) -> int:
    stack = _stack(args)
    job_id = get_status(stack, args.job)["job_id"]
    outcome = cancel_job(stack, job_id)
    if outcome.changed:
        _say(f"job {job_id} cancelled ({outcome.backend_note})")
        return 0
    _say(f"job {job_id} not cancelled: {outcome.backend_note}")
    return 0 if outcome.job.state == "cancelled" else EXIT_JOB_FAILED


def get(args: argparse.Namespace) -> int:
    stack = _stack(args)
    found = get_status(stack, args.job)
    if found.get("state") not in TERMINAL:
        raise CliError(
            f"job {found['job_id']} is still {describe_progress(found)}; wait with `vap status --wait "
            f"{found['job_id']} --out DIR`.",
            EXIT_JOB_FAILED,
        )
    if found.get("state") == "failed":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = out / f"{str(found.get('name')).rsplit('/', 1)[-1]}-{found['job_id']}.error.json"
        body = read_json(stack, found["error_report_key"]) if found.get("error_report_key") else None
        report.write_text(json.dumps(body or found, indent=2) + "\n", encoding="utf-8")
        _say(f"saved {report}")
    return _finish(stack, found, Path(args.out))
