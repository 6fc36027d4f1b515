"""The webhook's routes, written once: the URLs the service hands the GPU side and fal are built here,
and the webhook Lambda matches requests against the same templates (docs/contracts.md).

- `gpu`:  `POST {WEBHOOK_BASE_URL}/callbacks/gpu/{job_id}`: a signed GPU callback (`GpuCallback`)
- `urls`: `POST {WEBHOOK_BASE_URL}/callbacks/gpu/{job_id}/urls`: fresh presigned URLs for a run
- `fal`:  `POST {WEBHOOK_BASE_URL}/callbacks/fal/{job_id}?token=…`: fal's webhook (`fal_token`)
"""

from __future__ import annotations

import re
from typing import Final, Literal
from urllib.parse import quote

RouteName = Literal["gpu", "urls", "fal"]
PATHS: Final[dict[RouteName, str]] = {
    "gpu": "/callbacks/gpu/{job_id}",
    "urls": "/callbacks/gpu/{job_id}/urls",
    "fal": "/callbacks/fal/{job_id}",
}
# A job id is one path segment; anything else (an extra segment, an empty id) matches no route.
_PATTERNS: Final = tuple(
    (name, re.compile(re.escape(path).replace(re.escape("{job_id}"), "([^/]+)")))
    for name, path in PATHS.items()
)


def path(route: RouteName, job_id: str) -> str:
    """The route's path for `job_id` (quoted as one path segment)."""
    return PATHS[route].format(job_id=quote(job_id, safe=""))


def url(base_url: str, route: RouteName, job_id: str) -> str:
    """`{base_url}{path}`: the URL the GPU side or fal is given (a trailing `/` of the base is dropped)."""
    return base_url.rstrip("/") + path(route, job_id)


def match_route(raw_path: str) -> tuple[RouteName, str] | None:
    """(route, job id as it appears in the path) for a request path; None when no route matches."""
    for name, pattern in _PATTERNS:
        found = pattern.fullmatch(raw_path)
        if found:
            return name, found.group(1)
    return None
