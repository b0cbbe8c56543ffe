"""Policy shadowing: which path variants a looser route takes, and what "looser" means."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway import loads_config
from gateway.shadowing import find_shadows

ISSUERS = {
    "corp": {"issuer": "https://idp.example.com", "algorithms": ["RS256"]},
    "partner": {"issuer": "https://partner.example.com", "algorithms": ["RS256"]},
}


def _auth(**policy: Any) -> dict[str, Any]:
    return {"issuers": ["corp"], "audiences": ["svc"], **policy}


def shadows(strict: dict[str, Any], loose: dict[str, Any] | str, **match: Any) -> list[str]:
    document = {
        "issuers": ISSUERS,
        "routes": [
            {"id": "strict", "match": match or {"path": "/svc/admin/reset"},
             "upstream": "http://svc:8080", "auth": strict},
            {"id": "loose", "match": {"path_prefix": "/svc"}, "upstream": "http://svc:8080",
             "auth": loose},
        ],
    }  # fmt: skip
    return [s.variant for s in find_shadows(loads_config(yaml.safe_dump(document)))]


@pytest.mark.parametrize(
    ("strict", "loose"),
    [
        pytest.param(_auth(required_scopes=["admin"]), _auth(), id="missing-scope"),
        pytest.param(_auth(), "none", id="public"),
        pytest.param(_auth(), _auth(mode="optional"), id="optional"),
        pytest.param(_auth(), _auth(mode="report-only"), id="report-only"),
        pytest.param(_auth(), {**_auth(), "issuers": ["corp", "partner"]}, id="more-issuers"),
        pytest.param(_auth(), {**_auth(), "audiences": "any"}, id="any-audience"),
        pytest.param(
            _auth(required_scopes=["a", "b"]), _auth(required_scopes=["a"]), id="fewer-scopes"
        ),
        pytest.param(
            _auth(required_scopes=["a", "b"]),
            _auth(required_scopes={"any_of": ["a", "b"]}),
            id="all-of-vs-any-of",
        ),
        pytest.param(
            _auth(required_scopes={"any_of": ["a", "b"]}),
            _auth(required_scopes={"any_of": ["a", "c"]}),
            id="any-of-wider",
        ),
        pytest.param(
            _auth(claims=[{"path": "tier", "equals": "gold"}]), _auth(), id="missing-matcher"
        ),
        pytest.param(_auth(required_claims=["tenant"]), _auth(), id="missing-required-claim"),
    ],
)
def test_a_looser_route_reached_by_a_variant_is_reported(strict, loose) -> None:
    assert shadows(strict, loose) == ["/svc/admin/reset/", "/svc/admin/reset.json"]


@pytest.mark.parametrize(
    ("strict", "loose"),
    [
        pytest.param(
            _auth(required_scopes=["admin"]),
            _auth(required_scopes=["admin", "x"]),
            id="as-strict-and-more",
        ),
        pytest.param(_auth(), _auth(), id="same-policy"),
        pytest.param("none", _auth(), id="strict-route-is-public"),
        pytest.param(
            _auth(required_scopes={"any_of": ["a", "b"]}),
            _auth(required_scopes=["a", "z"]),
            id="all-of-including-one-of-the-any-of",
        ),
        pytest.param(
            _auth(required_scopes={"any_of": ["a", "b", "c"]}),
            _auth(required_scopes={"any_of": ["a", "b"]}),
            id="any-of-narrower",
        ),
    ],
)
def test_an_equally_strict_route_is_not_reported(strict, loose) -> None:
    assert shadows(strict, loose) == []


def test_prefix_routes_are_checked_for_case_and_suffix_variants() -> None:
    found = shadows(_auth(required_scopes=["admin"]), _auth(), path_prefix="/svc/admin")
    assert found == ["/svc/admin.json"]  # /svc/admin/ is inside the prefix already


def test_case_variant_reported_when_a_catch_all_takes_it() -> None:
    document = {
        "issuers": ISSUERS,
        "routes": [
            {"id": "admin", "match": {"path_prefix": "/admin"}, "upstream": "http://a:1",
             "auth": _auth(required_scopes=["admin"])},
            {"id": "rest", "match": {"path_prefix": "/"}, "upstream": "http://a:1",
             "auth": "none"},
        ],
    }  # fmt: skip
    found = find_shadows(loads_config(yaml.safe_dump(document)))
    assert [(s.variant, s.by.id) for s in found] == [("/admin.json", "rest"), ("/ADMIN", "rest")]


def test_a_variant_with_no_route_at_all_is_not_reported() -> None:
    document = {
        "issuers": ISSUERS,
        "routes": [
            {"id": "admin", "match": {"path": "/admin/reset", "methods": ["POST"]},
             "upstream": "http://a:1", "auth": _auth(required_scopes=["admin"])},
            {"id": "reads", "match": {"path_prefix": "/admin", "methods": ["GET"]},
             "upstream": "http://a:1", "auth": "none"},
        ],
    }  # fmt: skip
    # /admin/reset/ with POST reaches no route (reads is GET only): the gateway answers 404.
    assert find_shadows(loads_config(yaml.safe_dump(document))) == []
