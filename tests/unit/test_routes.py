"""`vap_shared.routes`: the webhook's paths, built and matched from one definition, as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from vap_shared import routes

ROOT = Path(__file__).resolve().parents[2]
JOB = "20261125T180000Z-3f2a9c1d7e"


@pytest.mark.parametrize("route", sorted(routes.PATHS))
def test_a_built_path_matches_its_own_route(route: routes.RouteName) -> None:
    assert routes.match_route(routes.path(route, JOB)) == (route, JOB)
    url = routes.url("https://hooks.example/", route, JOB)
    assert url == "https://hooks.example" + routes.path(route, JOB)


@pytest.mark.parametrize(
    "path",
    ["/callbacks/gpu/", "/callbacks/gpu/a/b", "/callbacks/fal/a/urls", "/callbacks/gpu/a/urls/", "/x/gpu/a"],
)
def test_anything_else_matches_no_route(path: str) -> None:
    assert routes.match_route(path) is None


def test_a_job_id_is_one_path_segment() -> None:
    assert routes.path("fal", "a/b#c") == "/callbacks/fal/a%2Fb%23c"


@pytest.mark.parametrize("route", sorted(routes.PATHS))
def test_the_contracts_doc_states_each_route(route: routes.RouteName) -> None:
    text = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    assert f"POST {{WEBHOOK_BASE_URL}}{routes.PATHS[route]}" in text or (
        f"{{WEBHOOK_BASE_URL}}{routes.PATHS[route]}?token=" in text
    )
