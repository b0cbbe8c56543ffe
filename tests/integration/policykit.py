"""Helpers for the route-policy tests: routes added to the base config, a second identity provider,
and short assertions on what the echo upstream received.

Everything goes over HTTP to real loopback servers (``send_raw`` from ``authkit``).
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

from gateway.reasons import Reason
from tests.conftest import AUDIENCE, RunningGateway
from tests.integration.authkit import (
    EXPECTED,
    RawResponse,
    echoed,
    expected_body,
    expected_challenge,
    send_raw,
    values_of,
)

Edit = Callable[[dict[str, Any]], None]
Header = tuple[str, str]

PARTNER_ISSUER = "https://partner.test"
IDENTITY = {"X-User-Sub": "sub"}  # the claim header most policy routes inject


def auth(*issuers: str, **policy: Any) -> dict[str, Any]:
    """An ``auth`` mapping trusting ``issuers`` (default: the base ``test`` issuer) for ``api``."""
    return {"issuers": list(issuers or ("test",)), "audiences": [AUDIENCE], **policy}


def route(
    route_id: str,
    match: str | dict[str, Any],
    policy: dict[str, Any] | str = "none",
    **extra: Any,
) -> dict[str, Any]:
    """A route for the base upstream; ``match`` a prefix string or a full ``match`` mapping."""
    return {
        "id": route_id,
        "match": {"path_prefix": match} if isinstance(match, str) else match,
        "auth": policy,
        **extra,
    }


def add_routes(*routes: dict[str, Any], last: bool = False) -> Edit:
    """An edit that puts ``routes`` (with the base upstream) before the base routes, or after."""

    def edit(doc: dict[str, Any]) -> None:
        url = doc["routes"][0]["upstream"]
        built = [{**copy.deepcopy(r), "upstream": url} for r in routes]
        if last:
            doc["routes"].extend(built)
        else:
            doc["routes"][0:0] = built

    return edit


def chain(*edits: Edit) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for one in edits:
            one(doc)

    return edit


async def get(
    gateway: RunningGateway, target: str, *headers: Header, method: str = "GET"
) -> RawResponse:
    return await send_raw(gateway.client, method, target, headers)


def authz(token: str, scheme: str = "Bearer") -> Header:
    return ("Authorization", f"{scheme} {token}")


def seen_by_upstream(response: RawResponse) -> list[Header]:
    """The headers the echo upstream received (asserts the request was forwarded)."""
    return echoed(response)


def one(headers: list[Header], name: str) -> str | None:
    """The single value of ``name`` the upstream saw, ``None`` if absent; fails if repeated."""
    found = values_of(headers, name)
    assert len(found) <= 1, (name, found)
    return found[0] if found else None


def assert_refused(response: RawResponse, reason: Reason, *, scope: str | None = None) -> None:
    """``response`` is the gateway's rejection for ``reason``: status, body and challenge."""
    assert response.status == EXPECTED[reason][0], response.body
    assert response.json() == expected_body(reason)
    challenge = expected_challenge(reason, scope)
    assert response.headers.getall("WWW-Authenticate", []) == ([challenge] if challenge else [])


def decode_segment(segment: str) -> Any:
    """A base64url (unpadded) JSON segment of a JWS, decoded."""
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
