"""Shared fixtures: keys, a fake clock, the fake IdP and echo upstream on loopback, and a gateway factory."""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from gateway import __file__ as gateway_init
from gateway import compiled, create_admin_app, create_app, load_config, loads_config
from gateway.app import GATEWAY_KEY, JWKS_KEY, gateway_runner
from gateway.config import GatewayConfig
from gateway.jwks import JwksCache
from gateway.tls import ServerTls
from gateway.upstream import UpstreamPools
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token


def pytest_report_header() -> str:
    build = "compiled by mypyc" if compiled() else "pure Python"
    return f"gateway: {build}, from {Path(gateway_init).parent}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # .ci/run's second pass (the suite against the compiled build) must not silently test the
    # source tree instead: an import-path slip would make it a copy of the first pass.
    if os.environ.get("GATEWAY_EXPECT_COMPILED") == "1" and not compiled():
        raise pytest.UsageError(f"GATEWAY_EXPECT_COMPILED=1 but {gateway_init} is Python")


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


def metric_value(source: CollectorRegistry | Iterable[Sample], name: str, **labels: str) -> float:
    """The one metric reader of the tests: the sum of the samples called ``name`` whose labels
    include ``labels`` (0.0 when there is none), from a registry or from scraped samples."""
    samples = (
        (sample for family in source.collect() for sample in family.samples)
        if isinstance(source, CollectorRegistry)
        else source
    )
    return float(
        sum(
            sample.value
            for sample in samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )
    )


@dataclass
class RunningGateway:
    """A gateway app under test on a loopback port, with its client, admin client (unless
    started without), registry and key cache."""

    client: TestClient
    admin_client: TestClient | None
    app: web.Application
    registry: CollectorRegistry
    config: GatewayConfig
    port: int = 0

    @property
    def admin(self) -> TestClient:
        assert self.admin_client is not None, "this gateway was started with admin=False"
        return self.admin_client

    @property
    def jwks(self) -> JwksCache:
        return self.app[JWKS_KEY]

    @property
    def runner(self) -> web.BaseRunner:
        runner = self.client.server.runner
        assert runner is not None
        return runner

    @property
    def upstream_pools(self) -> UpstreamPools:
        return self.app[GATEWAY_KEY].upstream_pools

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metric(self, name: str, **labels: str) -> float:
        """``metric_value`` over this gateway's registry (0.0 when the series does not exist)."""
        return metric_value(self.registry, name, **labels)

    async def shut_down(self) -> None:
        """Stop serving as ``gateway run`` does on SIGTERM (the runner's cleanup), once."""
        await self.client.server.close()

    async def close(self) -> None:
        if self.admin_client is not None:
            await self.admin_client.close()
        await self.client.close()


class GatewayTestServer(TestServer):
    """aiohttp's test server around the gateway's own listener (``gateway_runner``)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return gateway_runner(self.app, **kwargs)


Edit = Callable[[dict[str, Any]], None]
# The runner arguments of gateway.service.serve (TestServer adds handler_cancellation=True, as it does).
SERVED_RUNNER_ARGS: dict[str, Any] = {"access_log": None, "shutdown_timeout": 5}


async def start_gateway(
    config: GatewayConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Any = None,
    document_fetcher: Any = None,
    settle: bool = True,
    admin: bool = True,
    served: bool = False,
) -> RunningGateway:
    """The one gateway factory of the tests: ``create_app`` served on an ephemeral loopback
    port (with the runner arguments of ``gateway run`` when ``served``), its first key fetch
    done unless ``settle`` is false, and its admin app unless ``admin`` is false.  A config
    with ``listen.tls`` is served over TLS with the context ``gateway run`` builds from it
    (``gateway.tls.ServerTls``); its ``client`` then speaks https, so such a test uses a TLS
    client of its own.

    The caller closes it (``RunningGateway.close``); the ``make_gateway`` fixture does.
    """
    registry = CollectorRegistry() if registry is None else registry
    extra: dict[str, Any] = {}
    if clock is not None:
        extra["clock"] = clock
    if document_fetcher is not None:
        extra["document_fetcher"] = document_fetcher
    app = create_app(config, registry=registry, **extra)
    server = GatewayTestServer(app, host="127.0.0.1")
    runner_args = dict(SERVED_RUNNER_ARGS) if served else {}
    if config.listen.tls is not None:
        runner_args["ssl"] = ServerTls(config.listen.tls).context
    await server.start_server(**runner_args)
    client: TestClient = TestClient(server)
    await client.start_server()
    admin_client: TestClient | None = None
    try:
        if settle:
            await asyncio.wait_for(app[JWKS_KEY].settled(), 10)
        if admin:
            admin_client = TestClient(TestServer(create_admin_app(app), host="127.0.0.1"))
            await admin_client.start_server()
    except BaseException:
        await client.close()
        raise
    assert server.port is not None
    return RunningGateway(client, admin_client, app, registry, config, server.port)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(
    idp: FakeIdP, upstream: EchoUpstream, clock: FakeClock
) -> AsyncIterator[GatewayFactory]:
    """Start gateways for one test (closed at its end); see ``start_gateway`` for the options.

    The config is the base config changed by ``edits`` in turn, or ``document`` (a dict),
    ``text`` (YAML, through ``loads_config``) or ``path`` (a file, through ``load_config``).
    The fixture's fake clock is used unless ``clock`` is given.
    """
    started: list[RunningGateway] = []

    async def start(
        *edits: Edit | None,
        document: dict[str, Any] | None = None,
        text: str | None = None,
        path: Path | None = None,
        **options: Any,
    ) -> RunningGateway:
        if path is not None:
            config = load_config(path)
        else:
            if text is None:
                doc = copy.deepcopy(base_config(idp, upstream) if document is None else document)
                for edit in edits:
                    if edit is not None:
                        edit(doc)
                text = yaml.safe_dump(doc)
            config = loads_config(text)
        options.setdefault("clock", clock)
        gateway = await start_gateway(config, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.close()


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
