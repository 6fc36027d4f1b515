"""`python -m vap_cli.gallery_shot` (`make gallery-screenshot`): the README's gallery picture.

Starts the local stack, runs the demo's job (`local_stack.demo`: the tiny model on the local GPU
server) and a few variations of it (another seed of the same name on fal, an equal job answered
by result reuse, a job fal fails), builds `vap gallery` from them, opens it in headless Chromium
and saves a screenshot (default docs/gallery.png). It refuses to write one when a video does not
play or the page logs an error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .gallery_browser import Browser, media_state

FOLDER = "inbox/demo"
WIDTH = 1280
MAX_HEIGHT = 2400
MAX_BYTES = 300_000


def run_demo_jobs(stack: Any, timeout_s: float) -> list[dict[str, Any]]:
    """The demo's job and three variations; their notification bodies."""
    from local_stack.demo import SIDECAR
    from local_stack.fal_server import FalBehaviour
    from local_stack.media import synth_image, synth_mp4

    media = {f"{FOLDER}/clip.mp4": synth_mp4(), f"{FOLDER}/image.png": synth_image()}
    balloon, again, kite = (f"{FOLDER}/{n}.json" for n in ("balloon", "balloon-again", "kite"))
    # One upload of a sidecar at a time: a job whose sidecar is replaced before ingest reads it
    # fails (rightly), so the second run of the name starts once the first has ended.
    stack.put_job(balloon, {**SIDECAR, "backend": "fal", "seed": 7}, media)
    notes = stack.wait_for_notification(balloon, timeout_s=timeout_s)
    print("running the demo's job on the tiny model...", flush=True)
    stack.put_job(balloon, {**SIDECAR, "backend": "modal"})
    notes = stack.wait_for_notification(balloon, count=2, timeout_s=timeout_s)
    stack.put_job(again, {**SIDECAR, "backend": "modal"})
    stack.fal.behaviour = FalBehaviour(webhook_status="ERROR")
    try:
        stack.put_job(kite, {**SIDECAR, "backend": "fal", "prompt": "A red kite climbs into a grey sky."})
        notes += stack.wait_for_notification(again, timeout_s=timeout_s)
        notes += stack.wait_for_notification(kite, timeout_s=timeout_s)
    finally:
        stack.fal.behaviour = FalBehaviour()
    return [dict(note.body) for note in notes]


def screenshot(page_file: Path, width: int = WIDTH) -> bytes:
    """A PNG of the whole page (up to MAX_HEIGHT) once every video can play; raises otherwise."""
    with Browser() as browser:
        page = browser.page(width, 900)
        page.goto(page_file.resolve().as_uri())
        height = min(int(page.evaluate("document.documentElement.scrollHeight")), MAX_HEIGHT)
        page.viewport(width, height)
        state = media_state(page, timeout_s=60)
        not_ready = [v for v in state["videos"] if v["readyState"] < 2 or v["error"] is not None]
        broken = [i for i in state["images"] if not i["width"]]
        if not_ready or broken or page.errors:
            raise RuntimeError(f"the gallery does not play: {not_ready} {broken} {page.errors}")
        time.sleep(0.5)  # a few frames into the loop, past the first (often flat) frame
        return page.screenshot()


def shrink(png: bytes, max_bytes: int = MAX_BYTES) -> bytes:
    """A palette PNG (the page is flat colours; the videos are noise), smaller until it fits."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for scale in (1.0, 0.85, 0.7, 0.6, 0.5):
        size = (round(image.width * scale), round(image.height * scale))
        resized = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        resized.quantize(colors=128, dither=Image.Dither.NONE).save(out, format="PNG", optimize=True)
        if out.tell() <= max_bytes:
            return out.getvalue()
    raise RuntimeError(f"the screenshot does not fit in {max_bytes} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vap_cli.gallery_shot", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "gallery.png")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    from local_stack.stack import LocalStack, LocalStackConfig

    from .__main__ import main as vap

    with LocalStack(LocalStackConfig(gpu_engine="tiny")) as stack, tempfile.TemporaryDirectory() as tmp:
        bodies = run_demo_jobs(stack, args.timeout)
        print("jobs: " + ", ".join(f"{b['job_id']} {b['status']}" for b in bodies), flush=True)
        state = Path(tmp) / "stack.json"
        state.write_text(json.dumps(stack.describe()), encoding="utf-8")
        prefix, out = FOLDER.removeprefix("inbox/") + "/", Path(tmp) / "gallery"
        if vap(["gallery", "--prefix", prefix, "--out", str(out), "--local-state", str(state)]):
            return 1
        png = shrink(screenshot(out / "index.html"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"saved {args.out} ({len(png):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
