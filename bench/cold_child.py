"""One cold start, run by `bench.cold_start` in a fresh interpreter (stdlib only until timed).

    python3.13 -I cold_child.py MODE PATH [PATH ...]

PATHs go first on sys.path in order (like Lambda: /var/task, /opt/python, /var/runtime). Prints one
JSON line: milliseconds to import (`import_ms`) and to construct the clients (`clients_ms`).
"""

import json
import resource
import sys
import time

CLIENTS = ("s3", "dynamodb", "sns", "secretsmanager")


def main() -> None:
    mode, paths = sys.argv[1], sys.argv[2:]
    sys.path[:0] = paths
    t0 = time.perf_counter()
    if mode == "floor":
        import boto3

        t1 = t2 = time.perf_counter()
    elif mode == "floor_clients":
        import boto3

        t1 = time.perf_counter()
        session = boto3.session.Session()
        for name in CLIENTS:
            session.client(name)  # type: ignore[call-overload]
        t2 = time.perf_counter()
    elif mode == "ingest":
        import ingest

        t1 = time.perf_counter()
        ingest.get_ingestor()
        t2 = time.perf_counter()
    elif mode == "webhook":
        import webhook

        t1 = time.perf_counter()
        webhook.get_runtime()
        t2 = time.perf_counter()
    elif mode == "sweeper":
        import sweeper

        t1 = time.perf_counter()
        sweeper.get_sweeper()
        t2 = time.perf_counter()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(
        json.dumps(
            {
                "mode": mode,
                "import_ms": (t1 - t0) * 1000,
                "clients_ms": (t2 - t1) * 1000,
                "total_ms": (t2 - t0) * 1000,
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "modules": len(sys.modules),
            }
        )
    )


if __name__ == "__main__":
    main()
