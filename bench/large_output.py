"""Storing a large output: the fal path's streamed download into S3 versus read-all-then-put.

A synthetic MP4 of `--size-mb` MiB is served from a loopback HTTP server; an S3 stand-in on the
loopback accepts PutObject and multipart uploads and discards the bytes (counting them), so what is
measured is the client process, not an emulator holding 500 MB. Each approach runs in its own
subprocess (`python -m bench.large_output --child ...`) so its peak RSS (`ru_maxrss`) is its own;
the baseline is the RSS after imports and client construction, right before the transfer.

- streaming: `vap_shared.s3io.stream_url_to_s3` with the webhook's httpx/boto3 client settings
- naive: `http.get(url).content`, then one `s3.put_object`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.common import ROOT, SHARED, BackgroundServer

BUCKET = "bench-bucket"
MIB = 1024 * 1024
# An ISO-BMFF `ftyp` box, so the streamed path's MP4 check passes; the rest is random bytes.
FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
APPROACHES = ("streaming", "naive")


# ----------------------------------------------------------------------------- servers (parent)
def source_handler(size: int) -> type[BaseHTTPRequestHandler]:
    block = FTYP + os.urandom(MIB - len(FTYP))

    class Source(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            view = memoryview(block)
            sent = 0
            while sent < size:
                n = min(len(view), size - sent)
                self.wfile.write(view[:n])
                sent += n

    return Source


class SinkState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stored: dict[str, int] = {}  # key -> bytes of the completed object
        self.parts: dict[str, int] = {}  # upload id -> bytes received so far
        self.requests = 0


def sink_handler(state: SinkState) -> type[BaseHTTPRequestHandler]:
    """Just enough of the S3 REST API for PutObject and multipart uploads; bodies are discarded."""

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _drain(self) -> int:
            length = self.headers.get("Content-Length")
            received = 0
            if length is not None:
                remaining = int(length)
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, MIB))
                    if not chunk:
                        break
                    received += len(chunk)
                    remaining -= len(chunk)
            elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    received += len(self.rfile.read(size))
                    self.rfile.readline()
            decoded = self.headers.get("x-amz-decoded-content-length")
            return int(decoded) if decoded and decoded.isdigit() else received

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            if body:
                self.send_header("Content-Type", "application/xml")
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _target(self) -> tuple[str, dict[str, list[str]]]:
            parts = urlsplit(self.path)
            return parts.path.lstrip("/"), parse_qs(parts.query, keep_blank_values=True)

        def do_PUT(self) -> None:
            path, query = self._target()
            received = self._drain()
            etag = f'"{uuid.uuid4().hex}"'
            with state.lock:
                state.requests += 1
                if "uploadId" in query:
                    upload = query["uploadId"][0]
                    state.parts[upload] = state.parts.get(upload, 0) + received
                else:
                    state.stored[path] = received
            self._reply(200, headers={"ETag": etag})

        def do_POST(self) -> None:
            path, query = self._target()
            self._drain()
            bucket, _, key = path.partition("/")
            with state.lock:
                state.requests += 1
                if "uploads" in query:
                    upload = uuid.uuid4().hex
                    state.parts[upload] = 0
                    body = (
                        "<?xml version='1.0' encoding='UTF-8'?>"
                        '<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                        f"<Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{upload}</UploadId>"
                        "</InitiateMultipartUploadResult>"
                    )
                    self._reply(200, body.encode())
                    return
                upload = query.get("uploadId", [""])[0]
                state.stored[path] = state.parts.pop(upload, 0)
            body = (
                "<?xml version='1.0' encoding='UTF-8'?>"
                '<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Location>/{path}</Location><Bucket>{bucket}</Bucket><Key>{key}</Key>"
                f'<ETag>"{uuid.uuid4().hex}-1"</ETag></CompleteMultipartUploadResult>'
            )
            self._reply(200, body.encode())

        def do_DELETE(self) -> None:
            _path, query = self._target()
            with state.lock:
                state.requests += 1
                state.parts.pop(query.get("uploadId", [""])[0], None)
            self._reply(204)

    return Sink


# ----------------------------------------------------------------------------- child process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(approach: str, url: str, endpoint: str, size: int) -> dict[str, Any]:
    import resource

    import boto3
    import httpx
    from botocore.config import Config
    from vap_shared.http_limits import HTTP_TIMEOUT
    from vap_shared.s3io import stream_url_to_s3

    # The same client settings as `vap_shared.runtime.Runtime.build` (path style: loopback endpoint).
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 - a dummy for the loopback stand-in
        config=Config(
            signature_version="s3v4", retries={"mode": "standard"}, s3={"addressing_style": "path"}
        ),
    )
    http = httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False)
    key = f"outputs/bench/{approach}/video.mp4"
    baseline = _rss_bytes()
    started = time.perf_counter()
    if approach == "streaming":
        stored = stream_url_to_s3(
            http,
            s3,
            url,
            BUCKET,
            key,
            allowed_hosts=(),
            max_bytes=size,
            timeout_s=600.0,
            allow_http_loopback=True,
        )
    elif approach == "naive":
        response = http.get(url)
        response.raise_for_status()
        body = response.content
        s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="video/mp4")
        stored = len(body)
    else:
        raise ValueError(approach)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "approach": approach,
        "bytes": stored,
        "seconds": seconds,
        "baseline_rss": baseline,
        "peak_rss": peak,
    }


# ----------------------------------------------------------------------------- driver
@dataclass
class TransferResult:
    approach: str
    size_bytes: int
    seconds: float
    throughput_mb_s: float
    baseline_rss_mb: float
    peak_rss_mb: float
    peak_above_baseline_mb: float
    stored_bytes: int
    runs: int = 1


def run_one(approach: str, size: int, source_url: str, sink_url: str, state: SinkState) -> TransferResult:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SHARED), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    command = [
        sys.executable,
        "-m",
        "bench.large_output",
        "--child",
        approach,
        "--url",
        f"{source_url}/video.mp4",
        "--endpoint",
        sink_url,
        "--size-bytes",
        str(size),
    ]
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{approach} transfer failed:\n{done.stderr[-4000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    key = f"{BUCKET}/outputs/bench/{approach}/video.mp4"
    with state.lock:
        stored = state.stored.get(key, -1)
    return TransferResult(
        approach=approach,
        size_bytes=size,
        seconds=data["seconds"],
        throughput_mb_s=size / 1e6 / data["seconds"],
        baseline_rss_mb=data["baseline_rss"] / 1e6,
        peak_rss_mb=data["peak_rss"] / 1e6,
        peak_above_baseline_mb=max(0, data["peak_rss"] - data["baseline_rss"]) / 1e6,
        stored_bytes=stored,
    )


def run(
    size_mb: float = 500, repeat: int = 3, approaches: tuple[str, ...] = APPROACHES
) -> list[TransferResult]:
    """Each approach `repeat` times, alternating; median time, highest peak."""
    size = int(size_mb * MIB)
    state = SinkState()
    samples: dict[str, list[TransferResult]] = {a: [] for a in approaches}
    with BackgroundServer(source_handler(size)) as source, BackgroundServer(sink_handler(state)) as sink:
        for _ in range(repeat):
            for approach in approaches:
                result = run_one(approach, size, source.url, sink.url, state)
                if result.stored_bytes != size:
                    raise RuntimeError(f"{approach}: stored {result.stored_bytes} bytes, expected {size}")
                samples[approach].append(result)
    results = []
    for rows in samples.values():
        seconds = statistics.median(r.seconds for r in rows)
        worst = max(rows, key=lambda r: r.peak_above_baseline_mb)
        results.append(replace(worst, seconds=seconds, throughput_mb_s=size / 1e6 / seconds, runs=len(rows)))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=500, help="video size in MiB (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per approach (median time)")
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--size-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.url, args.endpoint, args.size_bytes)), flush=True)
        return
    for result in run(args.size_mb, args.repeat):
        print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
