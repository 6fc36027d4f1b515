"""`python -m local_stack.demo` (`make demo`): one job through the whole local pipeline.

Starts the local stack, makes a small reference clip and target image with ffmpeg, uploads
them and then the sidecar under `inbox/demo/`, waits for the SNS notification, prints it and
saves the MP4 (and its metadata) under `out/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from local_stack.media import synth_image, synth_mp4
from local_stack.stack import ROOT, LocalStack, LocalStackConfig

SIDECAR = {
    "prompt": "A red balloon slowly inflates, lifts off and floats out of the top of the frame.",
    "video_description": "A sneaker inflates into a smooth sphere and rises out of the frame; static camera.",
    "video_url": "clip.mp4",
    "image_url": "image.png",
    "num_frames": 9,
    "fps": 8,
    "seed": 42,
}


def run(out_dir: Path, engine: str, timeout_s: float) -> int:
    started = time.monotonic()
    # No state file: a `make local` running beside the demo keeps its own .local/stack.json.
    config = LocalStackConfig(gpu_engine=engine)
    with LocalStack(config) as stack:
        up = time.monotonic() - started
        print(f"local stack up in {up:.1f}s: s3://{stack.bucket}, webhook {stack.webhook_url}")
        folder = f"inbox/demo/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        key = f"{folder}/balloon.json"
        media = {f"{folder}/clip.mp4": synth_mp4(), f"{folder}/image.png": synth_image()}
        stack.put_job(key, SIDECAR, media)
        print(f"uploaded {', '.join(media)} and then {key}; waiting for the notification...")
        (note,) = stack.wait_for_notification(key, timeout_s=timeout_s)
        body = note.body
        print(f"\nSNS notification ({note.subject}; attributes {note.attributes}):")
        print(json.dumps(body, indent=2))
        if body.get("status") != "succeeded":
            return 1
        target = out_dir / key.removeprefix("inbox/").removesuffix(".json") / body["job_id"]
        target.mkdir(parents=True, exist_ok=True)
        for object_key in (body["output_key"], body["metadata_key"]):
            path = target / object_key.rsplit("/", 1)[1]
            stack.s3.download_file(stack.bucket, object_key, str(path))
        video = target / "video.mp4"
        print(
            f"\nMP4 saved to {video} ({video.stat().st_size:,} bytes); metadata in {target / 'metadata.json'}"
        )
        print(f"S3 location: s3://{stack.bucket}/{body['output_key']}")
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_stack.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--engine", default="tiny", choices=["tiny", "fake"])
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The handlers log JSON lines at INFO through Powertools; keep the demo output readable.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    return run(args.out, args.engine, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
