"""A first end-to-end check that the harness and the gateway fit together."""

from __future__ import annotations

from tests import conftest


async def test_valid_token_is_forwarded_with_claim_headers(gateway, token, upstream):
    response = await gateway.client.get(
        "/api/orders",
        headers={
            **conftest.bearer(token(email="a@x", org={"tenant_id": "acme"})),
            "X-User-Sub": "root",
        },
    )
    assert response.status == 200
    seen = dict((await response.json())["headers"])
    assert seen["X-User-Sub"] == "alice"
    assert seen["X-Tenant-Id"] == "acme"
    assert "Authorization" not in seen
    assert upstream.hits == 1
