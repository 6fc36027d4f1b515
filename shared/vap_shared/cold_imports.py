"""A handler's cold start: its imports run with the garbage collector paused.

The imports build ~90,000 long-lived objects; with the collector on, each allocation threshold
crossed scans them all again (~20 ms of an init). Afterwards they are frozen so that later
collections, during requests, do not scan them either. Stdlib only: it runs before anything else.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
