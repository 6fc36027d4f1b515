"""`python -m local_stack` (`make local`): run the local stack until interrupted.

Writes `.local/stack.json` (endpoint, bucket, topic, webhook URL, ...) when ready and removes it
on exit. Any sidecar dropped under `inbox/` of the bucket is processed end to end.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from vap_shared.contract import BACKEND_CHOICES

from local_stack.stack import ROOT, LocalStack, LocalStackConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_stack", description=__doc__)
    parser.add_argument("--engine", default="tiny", choices=["tiny", "fake", "none"], help="local GPU engine")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, help="DefaultBackend parameter")
    parser.add_argument("--state-file", type=Path, default=ROOT / ".local" / "stack.json")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("botocore", "urllib3", "werkzeug", "httpx", "httpcore", "moto"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    parameters = {"DefaultBackend": args.backend} if args.backend else {}
    config = LocalStackConfig(parameters=parameters, gpu_engine=args.engine, state_file=args.state_file)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with LocalStack(config) as stack:
        print(json.dumps(stack.describe(), indent=2))
        print(
            f"ready: drop media + a sidecar under s3://{stack.bucket}/inbox/ "
            f"(state in {args.state_file}); Ctrl-C stops"
        )
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
