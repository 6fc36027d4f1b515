"""`vap gallery`: one self-contained HTML page showing each job's inputs and output side by side.

Gathering (`gallery_jobs`), media links or downloads (`gallery_media`) and the page
(`gallery_page`, `gallery_template`) each have their module; this one is the command.
"""

from __future__ import annotations

import argparse
import re
import sys
import webbrowser
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from .config import discover
from .costs import parse_since
from .errors import EXIT_INVALID, CliError
from .gallery_jobs import Filters, gather
from .gallery_media import DownloadedLinks, Linker, PresignedLinks, link_all, link_lifetime
from .gallery_page import PageInfo, render
from .progress import bar

PAGE = "index.html"
DEFAULT_EXPIRES = "1d"
_SPAN = re.compile(r"^(\d+)\s*([smhdw]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expires(text: str) -> int:
    """`--expires`: `1d`, `12h`, `30m`, `2w` or seconds."""
    found = _SPAN.match(text.strip().lower())
    if not found or int(found.group(1)) == 0:
        raise CliError(
            f"--expires {text!r}: give a lifetime like 1d, 12h, 30m or 3600 (seconds).", EXIT_INVALID
        )
    return int(found.group(1)) * _SECONDS[found.group(2)]


class Progress:
    """A bar redrawn in place on a terminal (one line per phase otherwise), on stderr so the
    command's own output stays clean."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()

    def phase(self, label: str) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            line = f"{label} {bar(done, total)}"
            if self.tty:
                self.out.write("\r\033[K" + line + ("\n" if done >= total else ""))
            elif done >= total:
                self.out.write(line + "\n")
            self.out.flush()

        return update


def _describe_filters(filters: Filters, since_text: str | None) -> str:
    parts = [f"names under {filters.prefix!r}" if filters.prefix else "all names"]
    if since_text:
        parts.append(f"uploaded since {since_text}")
    if filters.states:
        parts.append("state " + " or ".join(filters.states))
    parts.append(f"newest {filters.limit}")
    return ", ".join(parts)


def gallery(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError("--limit must be at least 1.", EXIT_INVALID)
    states = tuple(s.strip() for value in args.status or [] for s in value.split(",") if s.strip())
    since = parse_since(args.since) if args.since else None
    expires_s = parse_expires(args.expires)
    stack = discover(args.stack, args.profile, args.region, args.local_state)
    filters = Filters(prefix=args.prefix or "", since=since, states=states, limit=args.limit)
    progress = Progress()
    jobs = gather(stack, filters, progress.phase("reading jobs   "), progress.phase("reading results"))

    out = Path(args.out)
    linker: Linker
    expires_at = None
    if args.download:
        linker = DownloadedLinks(stack, out)
    else:
        lifetime = link_lifetime(expires_s, stack.session)
        if lifetime.seconds <= 0:
            raise CliError("Your AWS credentials have expired: log in again (or use --download).")
        if lifetime.limited_by:
            print(
                f"vap: links are valid until {lifetime.expires_at:%Y-%m-%d %H:%M} UTC only, limited by "
                f"{lifetime.limited_by}; --download saves the files instead.",
                file=sys.stderr,
            )
        linker, expires_at = PresignedLinks(stack, lifetime), lifetime.expires_at
    stack.client("s3")  # made once here: creating boto3 clients from one session is not thread-safe
    sources = [source for job in jobs for source in job.media.values()]
    label = "saving media   " if args.download else "linking media  "
    links = link_all(linker, sources, progress.phase(label))

    info = PageInfo(
        stack=stack.describe(),
        generated_at=datetime.now(UTC),
        filters=_describe_filters(filters, args.since),
        links_expire_at=expires_at,
    )
    out.mkdir(parents=True, exist_ok=True)
    page = out / PAGE
    page.write_text(render(jobs, links, info), encoding="utf-8")
    unavailable = sorted({link.problem for link in links.values() if link.problem})
    for problem in unavailable[:5]:
        print(f"vap: {problem}", file=sys.stderr)
    if len(unavailable) > 5:
        print(f"vap: … and {len(unavailable) - 5} more media problems (shown on the cards)", file=sys.stderr)
    print(f"wrote {page} ({len(jobs)} job(s), {len(links)} media file(s))")
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0
