"""End to end: sender-constrained access tokens from a real OpenID provider, verified by the
gateway as ``gateway run`` serves them.

panva's oidc-provider (tests/e2e/oidc/provider.mjs, with ``MTLS=1``) runs as a Node.js process
on 127.0.0.1 and issues, through the client_credentials grant:

- DPoP-bound JWT access tokens (RFC 9449) when the token request carries a ``DPoP`` proof for
  the token endpoint, made by a Python client with its own key (tests/integration/senderkit.py):
  ``token_type: DPoP`` and ``cnf.jkt``, the client key's thumbprint;
- certificate-bound ones (RFC 8705) for its mTLS client: ``cnf["x5t#S256"]``, the SHA-256 of the
  client certificate.  The provider listens on plain http as if behind a TLS-terminating proxy,
  so the token request passes the certificate (URL-encoded PEM) in the header its
  ``getCertificate`` reads.

The gateway is a real ``python -m gateway run`` process with a TLS listener that verifies
client certificates against a trustme CA (``client_cert: optional``), in front of an echo
upstream; it finds the provider by OpenID discovery.  Route ``/dpop`` has ``auth.dpop:
required``, route ``/mtls`` ``auth.certificate_bound: required``.  With these real tokens: the
holder gets through, and each attack is refused with its reason, its challenge and (in the
access log's ``detail``) the check that refused it.  Behind a TLS-terminating proxy instead, the
gateway on plain http reads the certificate from the proxy's header (``client_cert_header``,
only from ``trusted_proxies``), the same header the provider read.

Real processes, real time, bounded waits; no mocks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
import trustme
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.e2e.node import installed
from tests.fakes import EchoUpstream
from tests.integration.e2e_helpers import free_port, wait_until
from tests.integration.senderkit import DpopClient, dpop

if shutil.which("node") is None:
    pytest.skip(
        "node is not on PATH: the OpenID provider of this test is oidc-provider (Node.js)",
        allow_module_level=True,
    )

from tests.e2e.test_oidc_rotation import (  # after the skip: it needs node too
    CLIENT_ID,
    CLIENT_SECRET,
    OIDC_DIR,
    RESOURCE,
    SCOPE,
    OidcProvider,
    new_key,
)
from tests.integration.test_operations import GatewayProcess, spawn_gateway

MTLS_CLIENT_ID = "gateway-e2e-mtls"
CERT_HEADER = "X-SSL-Client-Cert"  # what the provider's getCertificate reads (URL-encoded PEM)
ISSUER_ID = "op"
PROOF_ALGS = "ES256"  # the gateway's dpop.algorithms; oidc-provider accepts ES256 too
PROOF_MAX_AGE_S = 60
PROOF_LEEWAY_S = 5
REQUEST_TIMEOUT_S = 5.0
BOUND = "cert_binding_mismatch"


# --- the provider ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def oidc_dir() -> Path:
    return installed(OIDC_DIR, "oidc-provider")


@pytest.fixture
async def provider(oidc_dir: Path, tmp_path: Path) -> AsyncIterator[OidcProvider]:
    """The provider with certificate-bound tokens on, started; stopped by PID at the end."""
    op = OidcProvider(
        oidc_dir,
        tmp_path,
        env={"MTLS": "1", "MTLS_CLIENT_ID": MTLS_CLIENT_ID, "CERT_HEADER": CERT_HEADER},
    )
    op.write_keys(new_key("rsa-e2e"))
    try:
        await op.start()
        yield op
    finally:
        await op.stop()
        op.close_logs()


@dataclass
class Discovered:
    token_endpoint: str
    jwks: dict[str, Any]
    metadata: dict[str, Any]


async def discover(session: aiohttp.ClientSession, issuer: str) -> Discovered:
    async with session.get(f"{issuer}/.well-known/openid-configuration") as response:
        assert response.status == 200
        metadata = await response.json()
    async with session.get(metadata["jwks_uri"]) as response:
        assert response.status == 200
        jwks = await response.json()
    return Discovered(metadata["token_endpoint"], jwks, metadata)


async def token_request(
    session: aiohttp.ClientSession,
    endpoint: str,
    *,
    client_id: str = CLIENT_ID,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """A client_credentials POST: (status, JSON body)."""
    async with session.post(
        endpoint,
        headers={
            "Authorization": aiohttp.encode_basic_auth(client_id, CLIENT_SECRET),
            **(headers or {}),
        },
        data={"grant_type": "client_credentials", "resource": RESOURCE, "scope": SCOPE},
    ) as response:
        return response.status, await response.json()


def verified_claims(token: str, discovered: Discovered, issuer: str) -> dict[str, Any]:
    """The token's claims, its signature checked with the provider's published key."""
    (published,) = discovered.jwks["keys"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims: dict[str, Any] = jwt.decode(
        token,
        RSAAlgorithm.from_jwk(json.dumps(published)),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience=RESOURCE,
        issuer=issuer,
    )
    return claims


# --- certificates --------------------------------------------------------------------------
@dataclass
class Pki:
    ca: trustme.CA
    directory: Path
    holder: trustme.LeafCert  # the certificate the token is bound to
    other: trustme.LeafCert  # another one from the same CA

    def context(self, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client is not None:
            client.configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "server-key.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    return Pki(
        ca,
        tmp_path,
        ca.issue_cert("service-a@example.test"),
        ca.issue_cert("service-b@example.test"),
    )


def pem_of(cert: trustme.LeafCert) -> str:
    return cert.cert_chain_pems[0].bytes().decode()


def x5t_s256(cert: trustme.LeafCert) -> str:
    """RFC 8705 §3.1, computed here: base64url(SHA-256(the certificate's DER))."""
    der = ssl.PEM_cert_to_DER_cert(pem_of(cert))
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


# --- the gateway ---------------------------------------------------------------------------
def gateway_document(issuer: str, upstream: EchoUpstream, pki: Pki) -> dict[str, Any]:
    def route(route_id: str, **binding: str) -> dict[str, Any]:
        return {
            "id": route_id,
            "match": {"path_prefix": f"/{route_id}"},
            "upstream": upstream.url,
            "auth": {
                "issuers": [ISSUER_ID],
                "audiences": [RESOURCE],
                "required_scopes": [SCOPE],
                **binding,
            },
            "claim_headers": {"X-Client-Id": "client_id", "X-Dpop-Jkt": "cnf.jkt"},
        }

    return {
        "listen": {
            "host": "127.0.0.1",
            "port": free_port(),
            "tls": {
                "cert_file": str(pki.directory / "server.pem"),
                "key_file": str(pki.directory / "server-key.pem"),
                "client_ca_file": str(pki.directory / "clients.pem"),
                "client_cert": "optional",
            },
        },
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "issuers": {
            ISSUER_ID: {
                "issuer": issuer,  # no jwks_uri: OpenID discovery
                "algorithms": ["RS256"],
                "typ": "at+jwt",
                "leeway_s": 5,
            }
        },
        "dpop": {
            "algorithms": PROOF_ALGS.split(),
            "proof_max_age_s": PROOF_MAX_AGE_S,
            "proof_leeway_s": PROOF_LEEWAY_S,
        },
        "upstream_defaults": {"connect_timeout_s": 1, "timeout_s": 2},
        "routes": [route("dpop", dpop="required"), route("mtls", certificate_bound="required")],
    }


@contextlib.asynccontextmanager
async def gateway_run(document: dict[str, Any], directory: Path) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway run`` with ``document``, ready; ended by PID on the way out."""
    gw = await spawn_gateway(document, directory / f"{document['listen']['port']}.yaml")
    try:
        await gw.wait_ready()  # /readyz: the keys were found by discovery
        yield gw
    finally:
        await gw.cleanup()


@pytest.fixture
async def gateway(
    provider: OidcProvider, upstream: EchoUpstream, pki: Pki, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """The gateway with its TLS listener verifying client certificates."""
    async with gateway_run(gateway_document(provider.issuer, upstream, pki), tmp_path) as gw:
        yield gw


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh connection per request: the client certificate belongs to the connection.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    ) as s:
        yield s


@dataclass
class Answer:
    status: int
    reason: str  # error.reason of a rejection, "ok" for a 200
    challenges: list[str]
    seen: dict[str, str]  # the headers the upstream received (200 only)


async def call(
    session: aiohttp.ClientSession,
    gw: GatewayProcess,
    context: ssl.SSLContext | None,
    path: str,
    headers: dict[str, str],
    method: str = "GET",
) -> Answer:
    """One request to the gateway: over TLS with ``context``, plain http without."""
    scheme = "http" if context is None else "https"
    url = f"{scheme}://127.0.0.1:{gw.port}{path}"
    async with session.request(method, url, headers=headers, ssl=context or True) as response:
        body = await response.json()
        challenges = response.headers.getall("WWW-Authenticate", [])
        if response.status == 200:
            seen = {name.lower(): value for name, value in body["headers"]}
            return Answer(200, "ok", challenges, seen)
        return Answer(response.status, body["error"]["reason"], challenges, {})


@dataclass(frozen=True)
class Attack:
    """A request the gateway must refuse: with ``reason``, by the check ``detail`` names."""

    name: str
    headers: dict[str, str]
    reason: str
    detail: str  # as the access log line has it, spaces as underscores

    def request_id(self, n: int) -> str:
        return f"attack-{n:02d}"


async def assert_logged(gw: GatewayProcess, attacks: list[Attack]) -> None:
    """Each attack's access-log line (found by its request id) has its reason and detail."""
    last = f"request_id={attacks[-1].request_id(len(attacks) - 1)} "
    await wait_until(lambda: last in gw.log(), within=5, what="the last attack's log line")
    lines = {
        line.split("request_id=", 1)[1].split(" ", 1)[0]: line
        for line in gw.log_lines()
        if "event=request " in line and "request_id=" in line
    }
    for n, attack in enumerate(attacks):
        line = lines[attack.request_id(n)]
        assert f" reason={attack.reason} " in line, (attack.name, line)
        assert line.endswith(f" detail={attack.detail.replace(' ', '_')}"), (attack.name, line)


# --- DPoP proofs the gateway must refuse ------------------------------------------------------
def _segment(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _payload(client: DpopClient, method: str, url: str, token: str) -> dict[str, Any]:
    proof = client.proof(method, url, token, now=time.time())
    claims: dict[str, Any] = jwt.decode(proof, options={"verify_signature": False})
    return claims


def unsigned_proof(client: DpopClient, method: str, url: str, token: str) -> str:
    head = {"typ": "dpop+jwt", "alg": "none", "jwk": client.jwk}
    return f"{_segment(head)}.{_segment(_payload(client, method, url, token))}."


def hmac_proof(client: DpopClient, method: str, url: str, token: str) -> str:
    """HS256 keyed with the public JWK's bytes: the classic algorithm confusion."""
    head = {"typ": "dpop+jwt", "alg": "HS256", "jwk": client.jwk}
    signing_input = f"{_segment(head)}.{_segment(_payload(client, method, url, token))}"
    mac = hmac.new(json.dumps(client.jwk).encode(), signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{base64.urlsafe_b64encode(mac.digest()).rstrip(b'=').decode()}"


# --- the tests -------------------------------------------------------------------------------
async def test_a_dpop_bound_token_passes_with_a_fresh_proof_and_every_attack_is_refused(
    provider: OidcProvider, gateway: GatewayProcess, session: aiohttp.ClientSession, pki: Pki
) -> None:
    discovered = await discover(session, provider.issuer)
    assert "ES256" in discovered.metadata["dpop_signing_alg_values_supported"]
    endpoint = discovered.token_endpoint

    # Without a proof the provider still issues a plain Bearer token (the rotation test's).
    status, body = await token_request(session, endpoint)
    assert status == 200, body
    assert body["token_type"] == "Bearer"
    plain = body["access_token"]
    assert "cnf" not in verified_claims(plain, discovered, provider.issuer)

    # With a proof for the token endpoint: a DPoP-bound token, cnf.jkt the client's thumbprint.
    client = DpopClient("ES256")
    token_proof = client.proof("POST", endpoint, None, now=time.time())
    status, body = await token_request(session, endpoint, headers={"DPoP": token_proof})
    assert status == 200, body
    assert body["token_type"] == "DPoP"
    token = body["access_token"]
    claims = verified_claims(token, discovered, provider.issuer)
    assert claims["cnf"] == {"jkt": client.jkt}
    assert claims["client_id"] == CLIENT_ID

    no_cert = pki.context()
    url = f"https://127.0.0.1:{gateway.port}/dpop/orders"

    async def send(headers: dict[str, str], method: str = "GET") -> Answer:
        return await call(session, gateway, no_cert, "/dpop/orders", headers, method)

    def fresh(method: str = "GET", target: str = url) -> str:
        return client.proof(method, target, token, now=time.time())

    # The holder, a fresh proof per request: through, the proof not forwarded.
    proof = fresh()
    ok = await send(dpop(token, proof))
    assert (ok.status, ok.reason) == (200, "ok"), ok
    assert ok.seen["x-dpop-jkt"] == client.jkt
    assert ok.seen["x-client-id"] == CLIENT_ID
    assert "dpop" not in ok.seen
    assert "authorization" not in ok.seen
    post = await send(dpop(token, fresh("POST")), "POST")
    assert (post.status, post.reason) == (200, "ok"), post

    thief = DpopClient("ES256")
    private_jwk = {**client.jwk, **ECAlgorithm.to_jwk(client.key.private, as_dict=True)}
    now = time.time()
    attacks = [
        Attack("replayed proof", dpop(token, proof), "dpop_proof_replayed", "jti seen before"),
        Attack(
            "proof for another method",
            dpop(token, fresh("POST")),
            "dpop_proof_invalid",
            "htm is not the request method",
        ),
        Attack(
            "proof for another URL",
            dpop(token, fresh(target=url.replace("/dpop/orders", "/dpop/other"))),
            "dpop_proof_invalid",
            "htu is not the request URL",
        ),
        Attack(
            "proof for another host",
            dpop(token, fresh(target=f"https://localhost:{gateway.port}/dpop/orders")),
            "dpop_proof_invalid",
            "htu is not the request URL",
        ),
        Attack(
            "ath of another token",
            dpop(token, client.proof("GET", url, plain, now=now)),
            "dpop_proof_invalid",
            "ath is not the access token's hash",
        ),
        Attack(
            "stolen token, no proof",
            {"Authorization": f"DPoP {token}"},
            "dpop_proof_invalid",
            "0 DPoP headers",
        ),
        Attack(
            "proof by a key other than cnf.jkt",
            dpop(token, thief.proof("GET", url, token, now=now)),
            "dpop_binding_mismatch",
            "cnf.jkt is not the proof's key",
        ),
        Attack(
            "DPoP-bound token sent as Bearer",
            {"Authorization": f"Bearer {token}"},
            "dpop_binding_mismatch",
            "DPoP-bound token sent as Bearer",
        ),
        Attack(
            "alg none",
            dpop(token, unsigned_proof(client, "GET", url, token)),
            "dpop_proof_invalid",
            "alg 'none' not allowed",
        ),
        Attack(
            "alg HS256",
            dpop(token, hmac_proof(client, "GET", url, token)),
            "dpop_proof_invalid",
            "alg 'HS256' not allowed",
        ),
        Attack(
            "jwk with private members",
            dpop(token, client.proof("GET", url, token, now=now, header={"jwk": private_jwk})),
            "dpop_proof_invalid",
            "jwk has private members ['d']",
        ),
        Attack(
            "iat too old",
            dpop(token, client.proof("GET", url, token, now=now - PROOF_MAX_AGE_S - 30)),
            "dpop_proof_invalid",
            "iat is too old",
        ),
        Attack(
            "iat in the future",
            dpop(token, client.proof("GET", url, token, now=now + PROOF_LEEWAY_S + 30)),
            "dpop_proof_invalid",
            "iat is in the future",
        ),
        Attack(
            "unbound Bearer token where DPoP is required",
            {"Authorization": f"Bearer {plain}"},
            "dpop_required",
            "Bearer where DPoP is required",
        ),
    ]
    got = [
        await send({**attack.headers, "X-Request-ID": attack.request_id(n)})
        for n, attack in enumerate(attacks)
    ]
    report = {
        attack.name: (answer.status, answer.reason)
        for attack, answer in zip(attacks, got, strict=True)
    }
    print("\n--- DPoP attacks with a real oidc-provider token ---")
    for name, outcome in report.items():
        print(f"{name}: {outcome}")
    assert report == {attack.name: (401, attack.reason) for attack in attacks}
    for attack, answer in zip(attacks, got, strict=True):
        error = "invalid_dpop_proof" if attack.reason.startswith("dpop_proof_") else "invalid_token"
        (challenge,) = answer.challenges
        assert challenge.startswith(f'DPoP realm="gateway", algs="{PROOF_ALGS}", '), attack.name
        assert f'error="{error}"' in challenge, (attack.name, challenge)
    # Each refused by the check it attacks: the access log's detail says which.
    await assert_logged(gateway, attacks)

    # None of that spent the token: its holder still gets through.
    again = await send(dpop(token, fresh()))
    assert (again.status, again.reason) == (200, "ok"), again


async def test_a_certificate_bound_token_from_the_provider_passes_only_with_its_certificate(
    provider: OidcProvider, gateway: GatewayProcess, session: aiohttp.ClientSession, pki: Pki
) -> None:
    discovered = await discover(session, provider.issuer)
    assert discovered.metadata["tls_client_certificate_bound_access_tokens"] is True
    endpoint = discovered.token_endpoint

    # The mTLS client's token request needs its certificate (from the proxy's header).
    status, body = await token_request(session, endpoint, client_id=MTLS_CLIENT_ID)
    assert (status, body["error"]) == (400, "invalid_grant"), body
    status, body = await token_request(
        session,
        endpoint,
        client_id=MTLS_CLIENT_ID,
        headers={CERT_HEADER: quote(pem_of(pki.holder))},
    )
    assert status == 200, body
    assert body["token_type"] == "Bearer"  # RFC 8705 §3: still the Bearer scheme
    token = body["access_token"]
    claims = verified_claims(token, discovered, provider.issuer)
    assert claims["cnf"] == {"x5t#S256": x5t_s256(pki.holder)}
    assert claims["client_id"] == MTLS_CLIENT_ID
    # A plain token of the other client, for the required route.
    status, body = await token_request(session, endpoint)
    assert status == 200, body
    plain = body["access_token"]

    headers = {"Authorization": f"Bearer {token}"}
    ok = await call(session, gateway, pki.context(pki.holder), "/mtls/orders", headers)
    assert (ok.status, ok.reason) == (200, "ok"), ok
    assert ok.seen["x-client-id"] == MTLS_CLIENT_ID
    assert "authorization" not in ok.seen

    holder, other, no_cert = pki.context(pki.holder), pki.context(pki.other), pki.context()
    cases = [
        (
            other,
            Attack(
                "another certificate from the same CA", headers, BOUND, "another client certificate"
            ),
        ),
        (no_cert, Attack("no certificate", headers, BOUND, "no client certificate")),
        (
            holder,
            Attack(
                "an unbound token with the holder's certificate",
                {"Authorization": f"Bearer {plain}"},
                BOUND,
                "token is not certificate-bound",
            ),
        ),
    ]
    got = [
        await call(
            session,
            gateway,
            context,
            "/mtls/orders",
            {**attack.headers, "X-Request-ID": attack.request_id(n)},
        )
        for n, (context, attack) in enumerate(cases)
    ]
    report = {attack.name: (a.status, a.reason) for (_, attack), a in zip(cases, got, strict=True)}
    print("\n--- certificate-bound token from a real oidc-provider ---")
    for name, outcome in report.items():
        print(f"{name}: {outcome}")
    assert report == {attack.name: (401, BOUND) for _, attack in cases}
    for (_, attack), answer in zip(cases, got, strict=True):
        (challenge,) = answer.challenges
        assert challenge.startswith("Bearer "), (attack.name, challenge)
        assert 'error="invalid_token"' in challenge, (attack.name, challenge)
    await assert_logged(gateway, [attack for _, attack in cases])

    # The DPoP route does not take it as DPoP-less Bearer either (dpop: required).
    dpop_route = await call(session, gateway, pki.context(pki.holder), "/dpop/orders", headers)
    assert (dpop_route.status, dpop_route.reason) == (401, "dpop_required")


async def test_behind_a_tls_terminating_proxy_the_certificate_comes_from_its_header(
    provider: OidcProvider,
    upstream: EchoUpstream,
    session: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """A proxy like nginx terminates TLS and passes the client certificate, URL-encoded PEM
    (``$ssl_client_escaped_cert``), in one header to both the provider and the gateway: the
    gateway (plain http, ``client_cert_header`` from ``trusted_proxies``) reads the same value
    the provider bound the token to.  The test plays the proxy on 127.0.0.1."""
    discovered = await discover(session, provider.issuer)
    forwarded = {CERT_HEADER: quote(pem_of(pki.holder))}
    status, body = await token_request(
        session, discovered.token_endpoint, client_id=MTLS_CLIENT_ID, headers=forwarded
    )
    assert status == 200, body
    token = body["access_token"]
    assert verified_claims(token, discovered, provider.issuer)["cnf"] == {
        "x5t#S256": x5t_s256(pki.holder)
    }

    document = gateway_document(provider.issuer, upstream, pki)
    del document["listen"]["tls"]
    document["trusted_proxies"] = ["127.0.0.1/32"]
    document["client_cert_header"] = {"name": CERT_HEADER, "format": "pem"}
    headers = {"Authorization": f"Bearer {token}"}
    async with gateway_run(document, tmp_path) as gw:
        ok = await call(session, gw, None, "/mtls/orders", {**headers, **forwarded})
        assert (ok.status, ok.reason) == (200, "ok"), ok
        cases = [
            Attack(
                "the proxy forwards another certificate",
                {**headers, CERT_HEADER: quote(pem_of(pki.other))},
                BOUND,
                "another client certificate",
            ),
            Attack("the proxy forwards none", headers, BOUND, "no client certificate"),
        ]
        got = [
            await call(
                session, gw, None, "/mtls/orders", {**a.headers, "X-Request-ID": a.request_id(n)}
            )
            for n, a in enumerate(cases)
        ]
        # A thief holding the token and the (public) certificate, but not behind the proxy:
        # from 127.0.0.2, not in trusted_proxies, the header is not believed.
        thief = Attack(
            "a forged header from an untrusted peer",
            {**headers, **forwarded},
            BOUND,
            "no client certificate",
        )
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, local_addr=("127.0.0.2", 0)),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        ) as elsewhere:
            got.append(
                await call(
                    elsewhere,
                    gw,
                    None,
                    "/mtls/orders",
                    {**thief.headers, "X-Request-ID": thief.request_id(len(cases))},
                )
            )
        cases.append(thief)
        assert [(g.status, g.reason) for g in got] == [(401, BOUND)] * len(cases)
        await assert_logged(gw, cases)
