"""`vap gallery`'s page, rendered from job descriptions: what each card shows, grouping by name,
escaping of users' text, and that the page loads nothing from anywhere but its media links."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from vap_shared.jobs import Job
from vap_shared.status_object import status_body

from vap_cli.config import StackInfo
from vap_cli.gallery_jobs import GalleryJob, MediaSource, describe
from vap_cli.gallery_media import Link
from vap_cli.gallery_page import PageInfo, render

BUCKET = "vap-bucket"
NAME = "balloon/horse"
SETTINGS = {
    "prompt": "A horse <script>alert(1)</script> floats & flies",
    "video_description": 'A sneaker "inflates"',
    "seed": 42,
    "num_frames": 49,
    "fps": 16,
    "enable_safety_checker": True,
    "aspect_ratio": "9:16",
    "resolution": "480p",
    "guidance_scale": 5.0,
}
INPUTS = {
    "video_url": {"kind": "s3", "bucket": BUCKET, "key": "inbox/balloon/clip.mp4"},
    "image_url": {"kind": "https", "url": "https://media.example.com/horse.png"},
}
INFO = PageInfo(
    stack="local stack at http://127.0.0.1:5000 (us-east-1), bucket vap-bucket",
    generated_at=datetime(2026, 11, 25, 18, 30, tzinfo=UTC),
    filters="all names, newest 100",
    links_expire_at=datetime(2026, 11, 26, 18, 30, tzinfo=UTC),
)


def stack() -> StackInfo:
    # describe() of these jobs reads nothing (no metadata key), so no client is ever made.
    return StackInfo(kind="local", name="vap-local", region="us-east-1", bucket=BUCKET, session=None)


def job_status(job_id: str, state: str, **fields: Any) -> dict[str, Any]:
    job = Job(
        job_id=job_id,
        state=state,  # type: ignore[arg-type]
        name=fields.pop("name", NAME),
        sidecar_key=f"inbox/{NAME}.json",
        output_prefix=f"outputs/{NAME}/{job_id}/",
        settings=SETTINGS,
        inputs=INPUTS,
        received_at="2026-11-25T18:23:01Z",
        completed_at="2026-11-25T18:27:01Z",
        **fields,
    )
    return status_body(job)


def links_for(jobs: list[GalleryJob]) -> dict[MediaSource, Link]:
    host = f"https://{BUCKET}.s3.us-east-1.amazonaws.com"
    return {s: Link(f"{host}/{s.key or 'x'}?sig") for j in jobs for s in j.media.values()}


def cards(page: str) -> dict[str, str]:
    return dict(re.findall(r'<article id="job-([^"]+)"(.*?)</article>', page, re.S))


def test_status_object_names_the_inputs_of_a_failed_job() -> None:
    # A failed job has no metadata.json: its status object is where a user (no job table) finds
    # what it was asked to make.
    status = job_status("20261125T182301Z-aaaaaaaaaa", "failed", errors=[{"field": None, "message": "boom"}])
    assert status["inputs"] == {"settings": SETTINGS, "media": INPUTS}
    bare = status_body(Job(job_id="20261125T182301Z-bbbbbbbbbb", state="failed", output_prefix="outputs/x/"))
    assert bare["inputs"] is None


def test_a_failed_card_shows_its_inputs_and_errors_instead_of_a_video() -> None:
    status = job_status(
        "20261125T182301Z-aaaaaaaaaa",
        "failed",
        backend="fal",
        errors=[{"field": None, "message": "fal reported an error: CUDA out of memory"}],
        cost={"total": 0.0006},
    )
    job = describe(stack(), status)
    assert job.media == {
        "reference": MediaSource("s3", bucket=BUCKET, key="inbox/balloon/clip.mp4"),
        "target": MediaSource("https", url="https://media.example.com/horse.png"),
    }
    links = links_for([job])
    page = render([job], links, INFO)
    (body,) = cards(page).values()
    assert "fal reported an error: CUDA out of memory" in body
    assert body.count("<video") == 1  # the reference video; no generated one
    assert f'<img src="{links[job.media["target"]].href}"' in body
    assert "~$0.0006" in body and 'class="card state-failed"' in body


def test_a_succeeded_card_plays_its_output_with_the_poster_and_names_a_reused_source() -> None:
    earlier = describe(
        stack(), job_status("20261125T182301Z-aaaaaaaaaa", "succeeded", backend="modal", gpus=2)
    )
    reused_status = job_status(
        "20261125T190000Z-bbbbbbbbbb",
        "succeeded",
        name="balloon/again",
        reused_from="20261125T182301Z-aaaaaaaaaa",
        poster_key=f"outputs/{NAME}/20261125T190000Z-bbbbbbbbbb/poster.jpg",
        output_key=f"outputs/{NAME}/20261125T190000Z-bbbbbbbbbb/video.mp4",
    )
    reused = describe(stack(), reused_status)
    assert set(reused.media) == {"reference", "target", "output", "poster"}
    page = render([reused, earlier], links_for([reused, earlier]), INFO)
    found = cards(page)
    body = found["20261125T190000Z-bbbbbbbbbb"]
    assert body.count("<video") == 2
    assert re.search(r'<video src="[^"]+video\.mp4\?sig" poster="[^"]+poster\.jpg\?sig" muted loop', body)
    assert 'href="#job-20261125T182301Z-aaaaaaaaaa"' in body and "none (result reused)" in body
    assert "<dt>GPUs</dt><dd>2</dd>" in found["20261125T182301Z-aaaaaaaaaa"]


def test_runs_of_one_name_are_grouped_newest_first_and_users_text_is_escaped() -> None:
    jobs = [
        describe(stack(), job_status("20261125T190000Z-cccccccccc", "succeeded")),
        describe(stack(), job_status("20261125T185000Z-dddddddddd", "succeeded", name="kite/red")),
        describe(stack(), job_status("20261125T182301Z-aaaaaaaaaa", "succeeded")),
    ]
    page = render(jobs, links_for(jobs), INFO)
    groups = re.findall(r'<section class="group" data-name="([^"]+)">(.*?)</section>', page, re.S)
    assert [name for name, _ in groups] == [NAME, "kite/red"]
    assert re.findall(r'id="job-([^"]+)"', groups[0][1]) == [
        "20261125T190000Z-cccccccccc",
        "20261125T182301Z-aaaaaaaaaa",
    ]
    assert "2 runs" in groups[0][1]
    assert "<script>alert(1)</script>" not in page
    assert "A horse &lt;script&gt;alert(1)&lt;/script&gt; floats &amp; flies" in page
    assert "A sneaker &quot;inflates&quot;" in page


def test_the_page_loads_nothing_but_its_media_links() -> None:
    job = describe(stack(), job_status("20261125T182301Z-aaaaaaaaaa", "succeeded"))
    links = links_for([job])
    page = render([job], links, INFO)
    assert not re.search(r"<link\b|<script\s+src|@import|url\(|<iframe|<object|<embed", page, re.I)
    urls = set(re.findall(r'(?:src|href|poster)="([^"#][^"]*)"', page))
    assert urls == {link.href for link in links.values()}
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    policy = dict(part.strip().split(" ", 1) for part in html.unescape(csp.group(1)).split(";"))
    assert policy["default-src"] == "'none'"
    assert f"https://{BUCKET}.s3.us-east-1.amazonaws.com" in policy["media-src"].split()


@pytest.mark.parametrize("state", ["queued", "running"])
def test_an_unfinished_job_says_how_far_it_got(state: str) -> None:
    status = job_status("20261125T182301Z-aaaaaaaaaa", "running" if state == "running" else "received")
    status["progress"] = {"step": 3, "total": 50} if state == "running" else None
    page = render([describe(stack(), status)], {}, INFO)
    expected = "running, step 3 of 50" if state == "running" else "queued"
    assert f"Not finished yet: {expected}." in page
