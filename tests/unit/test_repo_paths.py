"""No file in the repository names a path of the machine it was written on (a fresh clone
elsewhere must behave the same; reference material outside the repo is found relative to it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Home folders, pyenv installs and this workplace's checkouts. S3 prefixes such as `${Bucket}/work/*`
# are not machine paths, so `/work/` alone is not a finding.
MACHINE_PATHS = re.compile(
    r"/r[o]ot/|/home/[a-z_][\w-]*/|/Users/\w+/|\.pyenv/versions/|/work/(?:main|wt|shared)\b"
)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name]


def findings(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    hits = [m.group(0) for m in MACHINE_PATHS.finditer(text)]
    return hits + [p for p in extra if p in text]


def test_the_pattern_finds_machine_paths_but_not_s3_prefixes() -> None:
    # Built from pieces, so this file does not hold the very paths it looks for.
    assert findings('page = Path("/work' + '/shared/reference/x.txt")')
    assert findings("cold starts on `/ro" + "ot/.pyenv/versions/3.13.0/bin/python3.13`")
    assert findings("see /home/alice/src/vap")
    assert not findings('Resource: !Sub "arn:${AWS::Partition}:s3:::${Bucket}/work/*"')
    assert not findings('{"/inbox/*", "/work/*"}')


def test_no_tracked_file_names_a_machine_path() -> None:
    # This checkout's own location too, wherever it is.
    here = (str(ROOT) + "/",) if len(ROOT.parts) > 2 else ()
    bad: list[str] = []
    for path in tracked_files():
        if not path.is_file() or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for hit in findings(line, here):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {hit}")
    assert not bad, "\n".join(bad)
