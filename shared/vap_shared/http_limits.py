"""HTTP time limits as plain numbers, so that a module can name them without importing httpx.

httpx costs ~15 ms of a cold start; it is imported where a request is made (a GPU progress callback
never makes one). httpx takes a timeout as a (connect, read, write, pool) tuple, which `Timeouts` is.
"""

from __future__ import annotations

from typing import NamedTuple


class Timeouts(NamedTuple):
    connect: float
    read: float
    write: float
    pool: float


# Downloads and other calls through the runtime's shared client.
HTTP_TIMEOUT = Timeouts(connect=3.0, read=30.0, write=30.0, pool=3.0)
# One backend request (a submit, a status or cancel request).
SUBMIT_TIMEOUT = Timeouts(connect=3.0, read=10.0, write=10.0, pool=3.0)
