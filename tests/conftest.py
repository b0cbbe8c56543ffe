"""Shared fixtures: keys, a fake clock, the fake IdP and echo upstream on loopback, and a gateway factory."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway import create_admin_app, create_app, loads_config
from gateway.app import JWKS_KEY
from gateway.config import GatewayConfig
from gateway.jwks import JwksCache
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token

ISSUER = "https://idp.test"
AUDIENCE = "api"
ALL_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


@pytest.fixture(scope="session")
def signing_keys() -> dict[str, SigningKey]:
    """One key per algorithm, generated once per test session."""
    return {alg: generate_key(alg, f"key-{alg.lower()}") for alg in ALL_ALGORITHMS}


@pytest.fixture(scope="session")
def rsa_key(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["RS256"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def idp(aiohttp_server: Any, signing_keys: dict[str, SigningKey]) -> AsyncIterator[FakeIdP]:
    """The fake identity provider on loopback, publishing every key of ``signing_keys``."""
    fake = FakeIdP()
    fake.publish(*signing_keys.values())
    server = await aiohttp_server(fake.app())
    fake.jwks_uri = str(server.make_url("/jwks.json"))
    fake.issuer = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release.set()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[EchoUpstream]:
    """The echo upstream on loopback."""
    fake = EchoUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release.set()


def base_config(idp: FakeIdP, upstream: EchoUpstream) -> dict[str, Any]:
    """The config most tests run: one issuer trusting every algorithm, four routes."""
    return {
        "issuers": {
            "test": {
                "issuer": ISSUER,
                "jwks_uri": idp.jwks_uri,
                "algorithms": list(ALL_ALGORITHMS),
                "leeway_s": 30,
                "jwks_cache_ttl_s": 300,
                "jwks_refetch_cooldown_s": 30,
                "jwks_fetch_timeout_s": 0.5,
            }
        },
        "upstream_defaults": {"connect_timeout_s": 1, "timeout_s": 1},
        "routes": [
            {
                "id": "api",
                "match": {"path_prefix": "/api"},
                "upstream": upstream.url,
                "auth": {"issuers": ["test"], "audiences": [AUDIENCE], "required_claims": ["sub"]},
                "claim_headers": {
                    "X-User-Sub": "sub",
                    "X-User-Email": "email",
                    "X-Tenant-Id": "org.tenant_id",
                },
            },
            {
                "id": "scoped",
                "match": {"path_prefix": "/scoped"},
                "upstream": upstream.url,
                "auth": {
                    "issuers": ["test"],
                    "audiences": [AUDIENCE],
                    "required_scopes": ["orders:read"],
                },
                "claim_headers": {"X-Scope": "scope"},
            },
            {
                "id": "public",
                "match": {"path_prefix": "/public", "methods": ["GET", "POST"]},
                "upstream": upstream.url,
                "auth": "none",
            },
        ],
    }


@dataclass
class RunningGateway:
    """A gateway app under test, with its client, admin client, registry and key cache."""

    client: TestClient
    admin: TestClient
    app: web.Application
    registry: CollectorRegistry
    config: GatewayConfig

    @property
    def jwks(self) -> JwksCache:
        return self.app[JWKS_KEY]

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from this gateway's registry (0.0 when the series does not exist)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(
    aiohttp_client: Any, idp: FakeIdP, upstream: EchoUpstream, clock: FakeClock
) -> GatewayFactory:
    """Start a gateway; ``edit`` may change the base config dict before it is loaded."""

    async def start(
        edit: Callable[[dict[str, Any]], None] | None = None, *, settle: bool = True
    ) -> RunningGateway:
        document = copy.deepcopy(base_config(idp, upstream))
        if edit is not None:
            edit(document)
        config = loads_config(yaml.safe_dump(document))
        registry = CollectorRegistry()
        app = create_app(config, registry=registry, clock=clock)
        client = await aiohttp_client(app)
        if settle:
            await app[JWKS_KEY].settled()
        admin = await aiohttp_client(create_admin_app(app))
        return RunningGateway(client, admin, app, registry, config)

    return start


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> RunningGateway:
    """A gateway on the base config, with its first key fetch done."""
    return await make_gateway()


@pytest.fixture
def token(rsa_key: SigningKey, clock: FakeClock) -> Callable[..., str]:
    """Mint a valid RS256 token for the base config; keyword arguments override claims."""

    def mint(key: SigningKey | None = None, **claims: Any) -> str:
        defaults: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice"}
        return make_token(key or rsa_key, clock, **{**defaults, **claims})

    return mint


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
