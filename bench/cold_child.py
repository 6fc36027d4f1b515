"""One cold start, run by `bench.cold_start` in a fresh interpreter (stdlib only until timed).

    python3.13 -I cold_child.py MODE PATH [PATH ...]

PATHs go first on sys.path in order (like Lambda: /var/task, /opt/python, /var/runtime). Prints one
JSON line: milliseconds to import (`import_ms`), to construct what the handler builds at cold start
(`clients_ms`), and then what its first request builds on first use (`first_use_ms`: the clients and
adapters a Modal dispatch, a GPU callback or a sweep touches; no network).
"""

import json
import resource
import sys
import time

CLIENTS = ("s3", "dynamodb", "sns", "secretsmanager")
# Runtime attributes each handler's first request touches (built lazily; plain attributes before).
FIRST_USE = {
    "ingest": ("store", "s3", "secrets", "backends"),  # a sidecar dispatched to Modal
    "webhook": ("store", "s3", "secrets"),  # a signed GPU callback (progress or result)
    "store": ("store", "s3", "sqs", "http"),  # a finished run's result downloaded and stored
    "sweeper": ("store", "s3", "secrets", "http"),  # overdue jobs checked with their backend
}


def main() -> None:
    mode, paths = sys.argv[1], sys.argv[2:]
    sys.path[:0] = paths
    rt: object = None
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
        rt = ingest.get_ingestor().rt
        t2 = time.perf_counter()
    elif mode == "webhook":
        import webhook

        t1 = time.perf_counter()
        rt = webhook.get_runtime()
        t2 = time.perf_counter()
    elif mode == "store":
        import store

        t1 = time.perf_counter()
        rt = store.get_runtime()
        t2 = time.perf_counter()
    elif mode == "sweeper":
        import sweeper

        t1 = time.perf_counter()
        rt = sweeper.get_runtime()
        t2 = time.perf_counter()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    modules = len(sys.modules)  # loaded at cold start, before the first request
    for name in FIRST_USE.get(mode, ()):
        getattr(rt, name)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "mode": mode,
                "import_ms": (t1 - t0) * 1000,
                "clients_ms": (t2 - t1) * 1000,
                "total_ms": (t2 - t0) * 1000,
                "first_use_ms": (t3 - t2) * 1000,
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "modules": modules,
            }
        )
    )


if __name__ == "__main__":
    main()
