"""`vap` command line: submit Video-As-Prompt jobs to the stack and follow them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from vap_shared.contract import BACKEND_CHOICES, GPU_COUNTS

from . import commands, costs, gallery, logs, urls
from .errors import EXIT_JOB_FAILED, EXIT_STACK, CliError

EPILOG = """\
The stack: --stack NAME (or VAP_STACK) with --profile/--region for a deployed one; otherwise the
local stack of `make local` (.local/stack.json, or --local-state / VAP_LOCAL_STATE).
Exit codes: 0 ok, 1 job failed/cancelled, 2 invalid input (nothing uploaded), 3 stack/AWS problem.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stack")
    group.add_argument("--stack", help="deployed CloudFormation stack name (default: $VAP_STACK, else local)")
    group.add_argument("--profile", help="AWS profile (default: the usual AWS environment)")
    group.add_argument("--region", help="AWS region")
    group.add_argument("--local-state", type=Path, help="local stack state file (default .local/stack.json)")


def _waiting(parser: argparse.ArgumentParser, wait_help: str) -> None:
    parser.add_argument("--wait", action="store_true", help=wait_help)
    parser.add_argument("--out", help="folder for the downloaded MP4 (with --wait; default .)")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait at most (default 3600)"
    )
    parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)  # seconds between reads
    parser.add_argument(
        "--find-timeout", type=float, default=60.0, help="seconds to wait for ingest to pick up a sidecar"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vap", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="upload a video + image (or a sidecar) and start a job")
    p.add_argument("video", nargs="?", help="reference video: a local file, or an https/s3/data URL")
    p.add_argument("image", nargs="?", help="target image: a local file, or an https/s3/data URL")
    p.add_argument("--sidecar", help="an existing sidecar JSON (its local media files are uploaded too)")
    p.add_argument("--prompt", help="what the target should do")
    p.add_argument("--video-description", dest="video_description", help="caption of the reference video")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-frames", dest="num_frames", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--aspect-ratio", dest="aspect_ratio")
    p.add_argument("--resolution")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    p.add_argument("--backend", help=f"{', '.join(BACKEND_CHOICES)} (default: the stack's)")
    p.add_argument(
        "--gpus", type=int, choices=GPU_COUNTS, help="GPUs for this job on Modal (default: the stack's)"
    )
    p.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_const",
        const=False,
        default=None,
        help="run again even if an equal earlier job (same media, settings and seed) has a result",
    )
    p.add_argument("--name", help="<dir>/<name> in the bucket (default: the image's or sidecar's file name)")
    _waiting(p, "follow the job (queued → dispatched → running step k/N → storing → done) and save the MP4")
    _common(p)
    p.set_defaults(func=commands.submit)

    p = sub.add_parser("batch", help="submit one job per row of a CSV or JSONL manifest")
    p.add_argument(
        "manifest", help="CSV/JSONL: video, image, prompt, video_description, [name], [sidecar fields]"
    )
    _waiting(p, "wait for every job, then print the summary (and save MP4s with --out)")
    _common(p)
    p.set_defaults(func=commands.batch)

    p = sub.add_parser("status", help="a job's state (JOB id, or NAME for its latest run)")
    p.add_argument("job", metavar="JOB|NAME")
    p.add_argument("--json", action="store_true", help="print status.json as is")
    _waiting(p, "follow it until it ends")
    _common(p)
    p.set_defaults(func=commands.status)

    p = sub.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--status", action="append", help="only these states (repeat or comma-separate)")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(func=commands.list_)

    p = sub.add_parser("cost", help="estimated cost of recent jobs, summed by backend")
    p.add_argument(
        "--since", default="7d", help="jobs uploaded since: 7d, 24h, 30m, 2w or a date (default 7d)"
    )
    p.add_argument("--json", action="store_true", help="print the totals as JSON")
    _common(p)
    p.set_defaults(func=costs.cost)

    p = sub.add_parser("cancel", help="cancel a job at its backend and mark it cancelled")
    p.add_argument("job", metavar="JOB|NAME")
    _common(p)
    p.set_defaults(func=commands.cancel)

    p = sub.add_parser("get", help="download a finished job's MP4 + metadata (or error report)")
    p.add_argument("job", metavar="JOB|NAME")
    p.add_argument("--out", default=".", help="folder (default .)")
    _common(p)
    p.set_defaults(func=commands.get)

    p = sub.add_parser("url", help="a fresh presigned URL for a finished job's video (or --file poster, …)")
    p.add_argument("job", metavar="JOB|NAME")
    p.add_argument("--file", choices=tuple(urls.FILES), default="video", help="which result (default video)")
    p.add_argument(
        "--expires",
        type=int,
        default=urls.DEFAULT_EXPIRES_S,
        help="seconds (default 3600; less if your credentials expire sooner)",
    )
    _common(p)
    p.set_defaults(func=urls.url)

    p = sub.add_parser("logs", help="the stack's log group names (deployed stacks), e.g. for `aws logs tail`")
    p.add_argument("function", nargs="?", help="ingest, webhook, sweeper, …: print only its log group")
    _common(p)
    p.set_defaults(func=logs.logs)

    p = sub.add_parser("gallery", help="an HTML page showing each job's inputs and output side by side")
    p.add_argument("--prefix", help="only names starting with this (e.g. balloon/ or balloon/horse)")
    p.add_argument("--since", help="only jobs uploaded since: 7d, 24h, 30m, 2w or a date (default: all)")
    p.add_argument("--status", action="append", help="only these states (repeat or comma-separate)")
    p.add_argument("--limit", type=int, default=100, help="the newest N jobs that match (default 100)")
    p.add_argument("--out", default="gallery", help="folder for index.html (and media/; default gallery)")
    p.add_argument(
        "--download", action="store_true", help="save the media beside the page (offline, zippable)"
    )
    p.add_argument(
        "--expires",
        default=gallery.DEFAULT_EXPIRES,
        help="lifetime of the presigned media links: 1d, 12h, 30m or seconds (default 1d; at most 7d "
        "and what your credentials allow)",
    )
    p.add_argument("--open", action="store_true", help="open the page in your browser")
    _common(p)
    p.set_defaults(func=gallery.gallery)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"vap: {exc.message}", file=sys.stderr)
        return exc.code
    except NoCredentialsError:
        print(
            "vap: no AWS credentials found: run `aws configure`/`aws sso login` or pass --profile.",
            file=sys.stderr,
        )
        return EXIT_STACK
    except ClientError as exc:
        error = exc.response.get("Error", {})
        print(f"vap: AWS refused the request: {error.get('Code')}: {error.get('Message')}", file=sys.stderr)
        return EXIT_STACK
    except BotoCoreError as exc:
        print(f"vap: AWS request failed: {exc}", file=sys.stderr)
        return EXIT_STACK
    except TimeoutError as exc:
        print(f"vap: gave up waiting: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        print("\nvap: interrupted (the job keeps running; `vap status` follows it)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
