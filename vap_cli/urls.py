"""`vap url JOB`: a fresh presigned URL for a finished job's video (or poster, preview, metadata).

A notification's `output_url` is signed by a Lambda function, whose temporary credentials may stop
working before the URL's own expiry; this one is signed now with your credentials, for `--expires`
seconds or until your credentials expire if that is sooner (`vap_shared.url_lifetime`). The URL goes
to stdout alone (`curl -o out.mp4 "$(vap url JOB)"`), its expiry to stderr.
"""

from __future__ import annotations

import argparse
import sys

from vap_shared.jobs import iso, utcnow
from vap_shared.notifier import OUTPUT_URL_TTL
from vap_shared.s3io import presign_get
from vap_shared.url_lifetime import MAX_PRESIGN_S, url_lifetime

from .config import discover
from .errors import EXIT_INVALID, EXIT_JOB_FAILED, CliError
from .jobs import describe_progress, get_status

# What `--file` may name: the status.json field holding its key.
FILES = {"video": "output_key", "poster": "poster_key", "preview": "preview_key", "metadata": "metadata_key"}
DEFAULT_EXPIRES_S = OUTPUT_URL_TTL


def url(args: argparse.Namespace) -> int:
    if not 1 <= args.expires <= MAX_PRESIGN_S:
        raise CliError(f"--expires must be between 1 and {MAX_PRESIGN_S} seconds (7 days).", EXIT_INVALID)
    stack = discover(args.stack, args.profile, args.region, args.local_state)
    found = get_status(stack, args.job)
    if found.get("state") != "succeeded":
        raise CliError(
            f"job {found.get('job_id')} is {describe_progress(found)}: it has no result.", EXIT_JOB_FAILED
        )
    key = found.get(FILES[args.file])
    if not key:
        raise CliError(f"job {found.get('job_id')} has no {args.file}.", EXIT_INVALID)
    s3 = stack.client("s3")
    now = utcnow()
    lifetime = url_lifetime(s3, args.expires, now)
    print(presign_get(s3, stack.bucket, str(key), lifetime.seconds), flush=True)
    print(
        f"valid until {iso(lifetime.expires_at(now))} ({lifetime.seconds} s: {lifetime.why})", file=sys.stderr
    )
    return 0
