"""`vap gallery` against the local stack, opened in headless Chromium.

A few jobs run (two runs of one name, one answered by result reuse, one failed at fal, one whose
target image was a `data:` URI stored under work/); the page built from them is loaded from a
file:// URL like a user opens it, its media coming from the local S3 (plain http on 127.0.0.1)
through presigned URLs, or from files beside it with --download. The reference clip is encoded
by the GPU service's own encoder (`gpu.service.media.encode_mp4`), so the H.264 it writes is what plays.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageStat
from stack_helpers import get_json

from gpu.service.media import encode_mp4
from local_stack import LocalStack
from local_stack.demo import SIDECAR
from local_stack.fal_server import FalBehaviour, FalServer
from vap_cli.__main__ import main
from vap_cli.gallery_browser import Browser, Page, media_state

pytestmark = pytest.mark.stack

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def state(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vap") / "stack.json"
    path.write_text(json.dumps(stack.describe()), encoding="utf-8")
    return path


def _job(stack: LocalStack, key: str, sidecar: dict[str, Any], count: int = 1) -> dict[str, Any]:
    stack.put_job(key, sidecar)
    notes = stack.wait_for_notification(key, count=count, timeout_s=TIMEOUT_S)
    name = key.removeprefix("inbox/").removesuffix(".json")
    return dict(get_json(stack, f"outputs/{name}/{notes[-1].body['job_id']}/status.json"))


@pytest.fixture(scope="module")
def jobs(stack: LocalStack, sample_media: dict[str, bytes]) -> Iterator[dict[str, Any]]:
    """Four jobs under a fresh folder; their status objects by role."""
    folder = f"inbox/gallery-{uuid.uuid4().hex[:10]}"
    fal = stack.fal
    assert isinstance(fal, FalServer)
    # What the tiny model's 480p result looks like to the encoder: noise, 9 frames.
    noise = np.random.default_rng(7).integers(0, 256, size=(9, 832, 480, 3), dtype=np.uint8)
    for name, data in {"clip.mp4": encode_mp4(noise, 8), "image.png": sample_media["image.png"]}.items():
        stack.s3.put_object(Bucket=stack.bucket, Key=f"{folder}/{name}", Body=data)
    seed = secrets.randbelow(2**31)  # equal jobs of other tests never answer ours by reuse
    base = {**SIDECAR, "seed": seed, "backend": "fal"}
    found: dict[str, Any] = {"folder": folder}
    found["first"] = _job(stack, f"{folder}/balloon.json", base)
    image = "data:image/png;base64," + base64.b64encode(sample_media["image.png"]).decode()
    found["second"] = _job(
        stack,
        f"{folder}/balloon.json",
        {**base, "seed": seed + 1, "image_url": image, "reuse": False},
        count=2,
    )
    found["reused"] = _job(stack, f"{folder}/balloon-again.json", base)
    fal.behaviour = FalBehaviour(webhook_status="ERROR")
    try:
        found["failed"] = _job(
            stack, f"{folder}/kite.json", {**base, "prompt": "A red kite.", "reuse": False}
        )
    finally:
        fal.behaviour = FalBehaviour()
    yield found


def test_the_jobs_are_what_the_gallery_must_show(jobs: dict[str, Any]) -> None:
    assert [jobs[r]["state"] for r in ("first", "second", "reused", "failed")] == ["succeeded"] * 3 + [
        "failed"
    ]
    assert jobs["reused"]["reused_from"] == jobs["first"]["job_id"]
    assert jobs["second"]["inputs"]["media"]["image_url"]["key"].startswith("work/")
    assert jobs["failed"]["inputs"]["settings"]["prompt"] == "A red kite."


def gallery(state: Path, jobs: dict[str, Any], out: Path, *extra: str) -> Path:
    prefix = jobs["folder"].removeprefix("inbox/") + "/"
    assert main(["gallery", "--prefix", prefix, "--out", str(out), "--local-state", str(state), *extra]) == 0
    return out / "index.html"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with Browser() as opened:
        yield opened


@pytest.fixture
def browser(chromium: Browser) -> Iterator[Browser]:
    yield chromium
    chromium.close_pages()


def open_page(browser: Browser, page_file: Path) -> Page:
    page = browser.page(1280, 900)
    page.goto(page_file.resolve().as_uri())
    # Every card on screen at once, so every video starts (they play while visible).
    height = page.evaluate("document.documentElement.scrollHeight")
    page.viewport(1280, int(height))
    return page


def assert_all_media_play(page: Page, cards: int) -> None:
    found = media_state(page, timeout_s=30)
    videos, images = found["videos"], found["images"]
    # A reference and a generated video per succeeded card, the reference alone on the failed one.
    assert len(videos) == 2 * cards - 1, videos
    for video in videos:
        assert video["error"] is None and video["readyState"] >= 2 and video["width"] > 0, video
    assert len(images) == cards and all(i["complete"] and i["width"] > 0 for i in images), images


def test_the_gallery_plays_every_job_in_chromium(
    state: Path, jobs: dict[str, Any], browser: Browser, tmp_path: Path
) -> None:
    page_file = gallery(state, jobs, tmp_path / "gallery")
    page = open_page(browser, page_file)
    ids = {role: jobs[role]["job_id"] for role in ("first", "second", "reused", "failed")}
    cards = page.evaluate("Array.from(document.querySelectorAll('.card')).map(function (c) { return c.id; })")
    assert sorted(cards) == sorted(f"job-{i}" for i in ids.values())
    assert_all_media_play(page, len(cards))
    # Media come from the local S3 over plain http, presigned.
    sources = page.evaluate(
        "Array.from(document.querySelectorAll('video, img')).map(function (m) { return m.src; })"
    )
    assert all(
        s.startswith(f"{json.loads(state.read_text())['endpoint_url']}/") and "X-Amz-Signature=" in s
        for s in sources
    )

    failed = page.evaluate(f"document.getElementById('job-{ids['failed']}').innerText")
    for error in jobs["failed"]["errors"]:
        assert error["message"] in failed
    assert "A red kite." in failed
    reused = page.evaluate(f"document.getElementById('job-{ids['reused']}').innerText")
    assert f"result reused from job\n{ids['first']}" in reused
    groups = page.evaluate(
        "Array.from(document.querySelectorAll('.group')).map(function (g) {"
        " return [g.getAttribute('data-name'), g.querySelectorAll('.card').length]; })"
    )
    prefix = jobs["folder"].removeprefix("inbox/")
    assert sorted(groups) == [[f"{prefix}/balloon", 2], [f"{prefix}/balloon-again", 1], [f"{prefix}/kite", 1]]

    png = page.screenshot()
    assert page.errors == []
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (1280, page.evaluate("window.innerHeight"))
    assert len(image.getcolors(1 << 20) or []) > 1000 and ImageStat.Stat(image.convert("L")).stddev[0] > 20


def test_filter_and_sort_work_in_the_browser(
    state: Path, jobs: dict[str, Any], browser: Browser, tmp_path: Path
) -> None:
    page = open_page(browser, gallery(state, jobs, tmp_path / "gallery"))
    visible = page.evaluate(
        "(function () { var f = document.getElementById('filter'); f.value = 'KITE red';"
        " f.dispatchEvent(new Event('input'));"
        " return [Array.from(document.querySelectorAll('.card')).filter(function (c) { return !c.hidden; })"
        "   .map(function (c) { return c.id; }), document.getElementById('shown').textContent]; })()"
    )
    assert visible == [[f"job-{jobs['failed']['job_id']}"], "1 of 4 jobs"]
    order = """(function (by) {
      var f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'));
      var s = document.getElementById('sort'); s.value = by; s.dispatchEvent(new Event('change'));
      return Array.from(document.querySelectorAll('.group')).map(function (g) {
        return Array.from(g.querySelectorAll('.card')).map(function (c) {
          var v = c.getAttribute('data-' + by); return by === 'name' ? v : Number(v); }); });
    })"""
    by_name = page.evaluate(order + "('name')")
    assert [g[0] for g in by_name] == sorted(g[0] for g in by_name)
    for by in ("cost", "duration", "time"):
        groups = page.evaluate(order + f"('{by}')")
        firsts = [g[0] for g in groups]
        assert firsts == sorted(firsts, reverse=True), (by, groups)
        assert all(g == sorted(g, reverse=True) for g in groups), (by, groups)
    assert page.errors == []


def test_a_downloaded_gallery_plays_from_its_own_folder(
    state: Path, jobs: dict[str, Any], browser: Browser, tmp_path: Path
) -> None:
    page_file = gallery(state, jobs, tmp_path / "shared", "--download")
    html = page_file.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|poster)="([^"]+)"', html)
    assert sources and all(s.startswith("media/") and (page_file.parent / s).is_file() for s in sources)
    assert not re.search(r'(?:src|href|poster)="[a-z]+:', html)  # nothing to fetch: it works offline
    page = open_page(browser, page_file)
    assert_all_media_play(page, 4)
    assert page.errors == []

    # A file gone from beside the page: its player is replaced by a note saying so.
    gone = next(s for s in sources if s.endswith("-video.mp4"))
    (page_file.parent / gone).unlink()
    page.close()
    page = open_page(browser, page_file)
    found = media_state(page, timeout_s=30)
    assert gone not in " ".join(v["src"] for v in found["videos"]) and len(found["videos"]) == 6
    notes = page.evaluate(
        "Array.from(document.querySelectorAll('.broken')).map(function (e) { return e.textContent; })"
    )
    assert notes == ["Could not load this file: it is no longer there, or not readable."]
    assert [e for e in page.errors if gone in e], page.errors  # and the browser reports it too


def test_status_and_limit_choose_the_cards(state: Path, jobs: dict[str, Any], tmp_path: Path) -> None:
    def card_ids(*extra: str) -> list[str]:
        html = gallery(state, jobs, tmp_path / uuid.uuid4().hex, *extra).read_text(encoding="utf-8")
        return re.findall(r'<article id="job-([^"]+)"', html)

    assert card_ids("--status", "failed") == [jobs["failed"]["job_id"]]
    newest = sorted((jobs[r]["job_id"] for r in ("first", "second", "reused", "failed")), reverse=True)[:2]
    assert sorted(card_ids("--limit", "2")) == sorted(newest)
    assert card_ids("--since", "2999-01-01") == []
