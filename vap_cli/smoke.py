"""`make smoke STACK=…`: one small job through a deployed stack (or the local one), end to end.

Submits a 9-frame 480p job with `vap`'s own submission code (synthetic inputs, nothing to supply),
waits for it, and prints a pass/fail report: job created, status.json terminal and succeeded, the
SNS notification received (a temporary SQS queue subscribed to the topic for the run), the MP4
probed (codec, size, frames, fps), and timings. Exit 0 when every check passed.

    python -m vap_cli.smoke [--stack NAME --region R --profile P | --local-state FILE] [--backend modal]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError
from vap_shared.contract import (
    BACKEND_CHOICES,
    DEFAULT_FPS,
    NUM_FRAMES_MIN,
    AspectRatio,
    Resolution,
    frame_size,
)

from vap_cli.config import StackInfo, discover
from vap_cli.errors import CliError
from vap_cli.jobs import find_upload
from vap_cli.progress import follow
from vap_cli.submission import from_files, upload, validate

PROMPT = "A small test pattern slowly drifts to the right (VAP smoke test)."
DESCRIPTION = "Coloured bars slide to the right over a gradient."
# The smallest job (fewest frames, 480p), landscape, and the size it must come back as.
ASPECT_RATIO: AspectRatio = "16:9"
RESOLUTION: Resolution = "480p"
EXPECTED_SIZE = frame_size(ASPECT_RATIO, RESOLUTION)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not checked
    detail: str


@dataclass
class SmokeReport:
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float | None] = field(default_factory=dict)
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def text(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}
        lines = [f"smoke test{f' job {self.job_id}' if self.job_id else ''}:"]
        lines += [f"  {mark[c.ok]}  {c.name}: {c.detail}" for c in self.checks]
        shown = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if v is not None)
        lines.append(f"  timings: {shown or 'none'}")
        lines.append("PASSED" if self.ok else "FAILED")
        return "\n".join(lines)


class NotificationListener:
    """A temporary SQS queue subscribed to the stack's topic (raw delivery) for one run."""

    def __init__(self, stack: StackInfo) -> None:
        self.stack = stack
        self.queue_url: str | None = None
        self.subscription: str | None = None

    def __enter__(self) -> NotificationListener:
        sqs, sns = self.stack.client("sqs"), self.stack.client("sns")
        name = f"vap-smoke-{uuid.uuid4().hex[:12]}"
        self.queue_url = sqs.create_queue(QueueName=name, Attributes={"SqsManagedSseEnabled": "true"})[
            "QueueUrl"
        ]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": self.stack.topic_arn}},
                }
            ],
        }
        sqs.set_queue_attributes(QueueUrl=self.queue_url, Attributes={"Policy": json.dumps(policy)})
        self.subscription = sns.subscribe(
            TopicArn=self.stack.topic_arn,
            Protocol="sqs",
            Endpoint=arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        return self

    def wait_for(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        assert self.queue_url is not None
        sqs = self.stack.client("sqs")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            wait = int(max(0, min(5, deadline - time.monotonic())))
            got = sqs.receive_message(QueueUrl=self.queue_url, WaitTimeSeconds=wait, MaxNumberOfMessages=10)
            for message in got.get("Messages", []):
                body = json.loads(message["Body"])
                if body.get("job_id") == job_id:
                    return dict(body)
        return None

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            if self.subscription:
                self.stack.client("sns").unsubscribe(SubscriptionArn=self.subscription)
        with contextlib.suppress(ClientError, BotoCoreError):
            if self.queue_url:
                self.stack.client("sqs").delete_queue(QueueUrl=self.queue_url)


@contextlib.contextmanager
def _inputs() -> Iterator[tuple[Path, Path]]:
    from local_stack.media import synth_image, synth_mp4

    with tempfile.TemporaryDirectory(prefix="vap-smoke-") as tmp:
        video, image = Path(tmp) / "clip.mp4", Path(tmp) / "image.png"
        video.write_bytes(synth_mp4(256, 144, frames=17, fps=16))
        image.write_bytes(synth_image(256, 144))
        yield video, image


def _probe(stack: StackInfo, status: dict[str, Any], frames: int, fps: int, report: SmokeReport) -> None:
    from gpu.service.media import MediaError, probe_mp4

    key = status.get("output_key")
    if not key:
        report.add("MP4 probed", False, "no output_key in status.json")
        return
    data = stack.client("s3").get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    try:
        info = probe_mp4(data)
    except MediaError as exc:
        report.add("MP4 probed", False, f"s3://{stack.bucket}/{key} is not a playable MP4: {exc}")
        return
    ok = (
        info.codec == "h264"
        and (info.width, info.height) == EXPECTED_SIZE
        and info.num_frames == frames
        and abs(info.fps - fps) < 0.01
        and info.faststart
    )
    detail = (
        f"{info.codec} {info.width}x{info.height}, {info.num_frames} frames at {info.fps:g} fps, "
        f"fast-start {info.faststart}, {len(data):,} bytes (expected h264 {EXPECTED_SIZE[0]}x"
        f"{EXPECTED_SIZE[1]}, {frames} frames at {fps} fps)"
    )
    report.add("MP4 probed", ok, detail)


def run(
    stack: StackInfo,
    out: TextIO,
    backend: str | None = None,
    frames: int = NUM_FRAMES_MIN,
    fps: int = DEFAULT_FPS,
    timeout_s: float = 3600.0,
    poll_s: float = 2.0,
    notification: bool = True,
) -> SmokeReport:
    report = SmokeReport()
    started = time.monotonic()
    # reuse: false: a smoke run must exercise the pipeline, not copy an earlier smoke run's result.
    settings: dict[str, Any] = {
        "num_frames": frames,
        "fps": fps,
        "aspect_ratio": ASPECT_RATIO,
        "resolution": RESOLUTION,
        "seed": 7,
        "reuse": False,
    }
    if backend:
        settings["backend"] = backend
    name = f"smoke/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    listener = NotificationListener(stack) if notification and stack.topic_arn else None
    with _inputs() as (video, image), contextlib.ExitStack() as cleanup:
        if listener is not None:
            cleanup.enter_context(listener)
        sub = from_files(str(video), str(image), PROMPT, DESCRIPTION, settings, name)
        validate(sub, stack)
        out.write(f"smoke: submitting {frames} frames at {RESOLUTION} to the {stack.describe()}\n")
        etag = upload(sub, stack)
        uploaded = time.monotonic()
        status = find_upload(stack, sub.name, etag, timeout_s=min(300.0, timeout_s))
        if status is None:
            report.add("job created", False, f"no status.json under {sub.outputs_folder(stack)} after upload")
            return report
        report.job_id = str(status["job_id"])
        report.timings["upload -> job created"] = time.monotonic() - uploaded
        report.add("job created", True, f"s3://{stack.bucket}/{sub.outputs_folder(stack)}{report.job_id}/")
        key = f"{sub.outputs_folder(stack)}{report.job_id}/status.json"
        try:
            final = follow(stack, key, timeout_s=timeout_s, interval_s=poll_s, out=out)
        except TimeoutError as exc:
            report.add("status.json terminal", False, str(exc))
            return report
        state = final.get("state")
        errors = "; ".join(str(e.get("message")) for e in final.get("errors") or [])
        report.add(
            "status.json terminal",
            state == "succeeded",
            f"{state} on {final.get('backend')}" + (f" (fell back from {final['fallback_from']})" if
                                                     final.get("fallback_from") else "")
            + (f": {errors}" if errors else ""),
        )  # fmt: skip
        timings = final.get("timings") or {}
        for label, field_name in (("queued", "queue_s"), ("generation", "generation_s"), ("job", "total_s")):
            report.timings[label] = timings.get(field_name)
        if state == "succeeded":
            _probe(stack, final, frames, fps, report)
        if listener is None:
            report.add("notification received", None, "not checked (--no-notification or no topic)")
        else:
            note = listener.wait_for(report.job_id, timeout_s=120.0)
            if note is None:
                report.add("notification received", False, "no SNS notification for the job within 120 s")
            else:
                same = note.get("status") == state and note.get("output_key") == final.get("output_key")
                report.add("notification received", same, f"status {note.get('status')}, backend "
                           f"{note.get('backend')}, output {note.get('output_key')}")  # fmt: skip
    report.timings["wall"] = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stack", help="deployed stack (default: $VAP_STACK, else the local stack)")
    parser.add_argument("--profile")
    parser.add_argument("--region")
    parser.add_argument("--local-state", type=Path, help="local stack state file (default .local/stack.json)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, help="default: the stack's")
    parser.add_argument("--frames", type=int, default=NUM_FRAMES_MIN)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    parser.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-notification", action="store_true", help="skip the SNS subscription")
    args = parser.parse_args(argv)
    try:
        stack = discover(args.stack or None, args.profile or None, args.region or None, args.local_state)
        report = run(
            stack,
            sys.stdout,
            backend=args.backend,
            frames=args.frames,
            timeout_s=args.timeout,
            poll_s=args.poll,
            notification=not args.no_notification,
        )
    except CliError as exc:
        print(f"smoke: {exc.message}", file=sys.stderr)
        return exc.code
    except (ClientError, BotoCoreError) as exc:
        print(f"smoke: AWS: {exc}", file=sys.stderr)
        return 3
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
