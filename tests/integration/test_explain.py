"""``gateway explain``, run as a real subprocess against the fake IdP on loopback.

The subprocess is started with ``asyncio.create_subprocess_exec`` so that this test's event loop
keeps serving the IdP while the CLI fetches its keys.  The fake clock cannot reach another
process: tokens are minted with real time (a fresh ``FakeClock()`` starts at the wall clock).

What explain prints is checked line by line, and against a real gateway on the same config: the
answer it predicts is the one a client gets, the headers it lists are the ones the upstream gets.
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AUDIENCE, ISSUER, GatewayFactory
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, make_token
from tests.integration.authkit import send_raw, values_of

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 30.0
OUTCOME = "X-Gateway-Auth-Outcome"


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def after(self, line: str) -> list[str]:
        """The lines following ``line`` (which must be printed)."""
        assert line in self.lines, self.out + self.err
        return self.lines[self.lines.index(line) + 1 :]


async def explain(
    config: Path, route: str, token: str | None, *options: str, stdin: str = ""
) -> Ran:
    args = [sys.executable, "-m", "gateway", "explain", "--config", str(config), "--route", route]
    args += options
    if token is not None:
        args.append(token)
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), CLI_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


POLICY: dict[str, Any] = {
    "issuers": ["test"],
    "audiences": [AUDIENCE],
    "required_claims": ["sub"],
    "required_scopes": ["orders:read"],
    "claims": [{"path": "tenant", "equals": "acme"}],
}


@pytest.fixture
def config_document(idp: FakeIdP, upstream: EchoUpstream) -> dict[str, Any]:
    """``api`` (scopes, a claim matcher, claim and payload headers), the same policy in modes
    ``optional`` (``maybe``) and ``report-only`` (``shadow``), a cookie route and public ``docs``."""
    identity = {"X-User-Sub": "sub", "X-Roles": "realm_access.roles"}
    return {
        "issuers": {
            "test": {
                "issuer": ISSUER,
                "jwks_uri": idp.jwks_uri,
                "algorithms": ["RS256", "ES256"],
                "leeway_s": 30,
                "jwks_fetch_timeout_s": 5,
            }
        },
        "routes": [
            {
                "id": "api",
                "match": {"path_prefix": "/api"},
                "upstream": upstream.url,
                "auth": POLICY,
                "claim_headers": identity,
                "payload_header": "X-Jwt-Payload",
            },
            {
                "id": "maybe",
                "match": {"path_prefix": "/maybe"},
                "upstream": upstream.url,
                "auth": {**POLICY, "mode": "optional"},
                "claim_headers": identity,
            },
            {
                "id": "shadow",
                "match": {"path_prefix": "/shadow"},
                "upstream": upstream.url,
                "auth": {**POLICY, "mode": "report-only"},
                "claim_headers": identity,
            },
            {
                "id": "web",
                "match": {"path": "/web/home", "methods": ["POST"]},
                "upstream": upstream.url,
                "auth": {**POLICY, "token_from": [{"cookie": "access_token"}]},
                "claim_headers": identity,
            },
            {
                "id": "docs",
                "match": {"path_prefix": "/docs"},
                "upstream": upstream.url,
                "auth": "none",
            },
        ],
    }


def write_config(folder: Path, document: dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def config_file(tmp_path: Path, config_document: dict[str, Any]) -> Path:
    return write_config(tmp_path, config_document)


def mint(key: SigningKey, **claims: Any) -> str:
    """A token valid for the ``api`` route now (real time), unless ``claims`` say otherwise."""
    defaults: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "scope": "orders:read profile",
        "tenant": "acme",
        "realm_access": {"roles": ["a", "b"]},
    }
    return make_token(key, FakeClock(), **{**defaults, **claims})


def expired(key: SigningKey) -> str:
    now = int(FakeClock().time())
    return mint(key, iat=now - 7200, exp=now - 3600)


# What explain prints, on the api route's policy, for a token that passes every check.
TOKEN_FOUND = "  ok    token: one token in the request"
PASSED = [
    "  ok    parse: token parses as a JWS with a JSON header and payload",
    "  ok    alg: alg RS256 is pinned by an issuer of this route",
    "  ok    iss: iss names issuer 'test', trusted on this route",
    "  ok    issuer alg: alg RS256 is pinned for issuer 'test'",
    "  ok    typ: typ 'JWT' is accepted",
    "  ok    key: key 'key-rs256' found in the issuer's key set",
    "  ok    key alg: the key is bound to alg RS256",
    "  ok    signature: signature verifies",
    "  ok    payload: the signed payload is a JSON object",
    "  ok    claim types: iss, sub and jti are strings, aud a string or strings",
    "  ok    signed iss: the signed iss still names issuer 'test'",
    "  ok    exp: exp is a number and has not passed (leeway 30s)",
    "  ok    nbf: nbf, if present, is a number and has come (leeway 30s)",
    "  ok    iat: iat, if present, is a number and not in the future (leeway 30s)",
    "  ok    aud: aud names an audience of this route",
    "  ok    required claim: 'sub' is present",
    "  ok    scopes: the token grants all of: orders:read",
    "  ok    claim check: tenant equals acme holds",
]
INVALID_REQUEST_CHALLENGE = (
    'WWW-Authenticate: Bearer realm="gateway", error="invalid_request", '
    'error_description="The request carries a malformed, oversized or repeated token."'
)


def section(ran: Ran, route: str, mode: str) -> list[str]:
    """The lines between ``checks on route ...`` and ``result:``."""
    lines = ran.after(f"checks on route '{route}' (mode {mode}):")
    end = next(i for i, line in enumerate(lines) if line.startswith(("result:", "report-only:")))
    return lines[:end]


async def test_admitted_token_prints_every_check_and_the_upstream_headers(
    config_file: Path, rsa_key: SigningKey, idp: FakeIdP
) -> None:
    token = mint(rsa_key)
    fetches = idp.hits

    ran = await explain(config_file, "api", token)

    assert ran.code == 0, ran.out + ran.err
    assert ran.lines[:3] == [
        "request: GET /api",
        "  Host: localhost",
        "  Authorization: Bearer <token>",
    ]
    assert section(ran, "api", "required") == [TOKEN_FOUND, *PASSED]
    assert sorted(ran.after("result: admitted; the upstream would receive:")) == [
        f"  X-Jwt-Payload: {token.split('.')[1]}",
        "  X-Roles: a,b",
        "  X-User-Sub: alice",
    ]
    assert '"tenant": "acme"' in ran.out  # the decoded claims are shown
    assert idp.hits == fetches + 1  # keys fetched as the gateway would


@pytest.mark.parametrize(
    ("claims", "failed", "status_line", "challenge"),
    [
        pytest.param(
            {"iat": -7200, "exp": -3600},
            "  FAIL  exp: exp passed",
            "result: 401 token_expired: The token has expired.",
            'Bearer realm="gateway", error="invalid_token", '
            'error_description="The token has expired."',
            id="expired",
        ),
        pytest.param(
            {"scope": "profile"},
            "  FAIL  scopes: required scope not granted",
            "result: 403 insufficient_scope: The token does not grant the required scope.",
            'Bearer realm="gateway", error="insufficient_scope", '
            'error_description="The token does not grant the required scope.", '
            'scope="orders:read"',
            id="insufficient-scope",
        ),
        pytest.param(
            {"aud": "other"},
            "  FAIL  aud: aud not accepted",
            "result: 401 audience_not_allowed: The token is not meant for this service.",
            'Bearer realm="gateway", error="invalid_token", '
            'error_description="The token is not meant for this service."',
            id="wrong-audience",
        ),
    ],
)
async def test_refused_token_prints_the_failed_check_status_and_challenge(
    claims: dict[str, Any],
    failed: str,
    status_line: str,
    challenge: str,
    config_file: Path,
    rsa_key: SigningKey,
) -> None:
    now = int(FakeClock().time())
    resolved = {k: now + v if k in ("iat", "exp") else v for k, v in claims.items()}

    ran = await explain(config_file, "api", mint(rsa_key, **resolved))

    assert ran.code == 1, ran.out + ran.err
    lines = section(ran, "api", "required")
    position = lines.index(failed)
    assert lines[:position] == [TOKEN_FOUND, *PASSED[: position - 1]]  # every check before it
    assert all(line.endswith(": not reached") for line in lines[position + 1 :])
    assert len(lines) == 1 + len(PASSED)
    assert ran.after(failed)[len(lines) - position - 1 :] == [
        status_line,
        f"WWW-Authenticate: {challenge}",
    ]
    assert "admitted" not in ran.out
    assert "X-User-Sub" not in ran.out


async def test_optional_route_forwards_a_request_without_a_token(config_file: Path) -> None:
    ran = await explain(config_file, "maybe", "")

    assert ran.code == 0, ran.out + ran.err
    assert ran.lines[:2] == ["request: GET /maybe", "  Host: localhost"]
    assert section(ran, "maybe", "optional") == [
        "  --    token: none in the request (looked in: Authorization: Bearer)"
    ]
    assert ran.after("result: admitted; the upstream would receive:") == ["  (no identity headers)"]


async def test_optional_route_refuses_an_invalid_token_and_admits_a_valid_one(
    config_file: Path, rsa_key: SigningKey
) -> None:
    refused = await explain(config_file, "maybe", expired(rsa_key))
    admitted = await explain(config_file, "maybe", mint(rsa_key))

    assert refused.code == 1
    assert "  FAIL  exp: exp passed" in section(refused, "maybe", "optional")
    assert "result: 401 token_expired: The token has expired." in refused.lines
    assert admitted.code == 0
    assert section(admitted, "maybe", "optional") == [TOKEN_FOUND, *PASSED]
    assert sorted(admitted.after("result: admitted; the upstream would receive:")) == [
        "  X-Roles: a,b",
        "  X-User-Sub: alice",
    ]


async def test_report_only_route_forwards_a_refused_token_with_its_outcome(
    config_file: Path, rsa_key: SigningKey
) -> None:
    ran = await explain(config_file, "shadow", expired(rsa_key))

    assert ran.code == 0, ran.out + ran.err
    assert "  FAIL  exp: exp passed" in section(ran, "shadow", "report-only")
    assert ran.after("  --    claim check: not reached")[:3] == [
        "report-only: forwarded anyway (X-Gateway-Auth-Outcome: token_expired); "
        "mode required would answer 401 token_expired: The token has expired.",
        "result: admitted; the upstream would receive:",
        "  X-Gateway-Auth-Outcome: token_expired",
    ]
    assert "X-User-Sub" not in ran.out
    assert "WWW-Authenticate" not in ran.out


async def test_report_only_route_forwards_a_valid_token_with_outcome_ok(
    config_file: Path, rsa_key: SigningKey
) -> None:
    ran = await explain(config_file, "shadow", mint(rsa_key))

    assert ran.code == 0, ran.out + ran.err
    assert section(ran, "shadow", "report-only") == [TOKEN_FOUND, *PASSED]
    assert "report-only: the token is valid (X-Gateway-Auth-Outcome: ok)" in ran.lines
    assert sorted(ran.after("result: admitted; the upstream would receive:")) == [
        "  X-Gateway-Auth-Outcome: ok",
        "  X-Roles: a,b",
        "  X-User-Sub: alice",
    ]


async def test_report_only_route_without_a_token_says_token_missing(config_file: Path) -> None:
    ran = await explain(config_file, "shadow", "")

    assert ran.code == 0, ran.out + ran.err
    assert section(ran, "shadow", "report-only") == [
        "  FAIL  token: none in the request (looked in: Authorization: Bearer)"
    ]
    assert ran.after("result: admitted; the upstream would receive:") == [
        "  X-Gateway-Auth-Outcome: token_missing"
    ]


async def test_required_route_without_a_token_is_token_missing(config_file: Path) -> None:
    ran = await explain(config_file, "api", "")

    assert ran.code == 1
    assert ran.after("  FAIL  token: none in the request (looked in: Authorization: Bearer)") == [
        "result: 401 token_missing: A bearer token is required.",
        'WWW-Authenticate: Bearer realm="gateway"',
    ]


@pytest.mark.parametrize(
    ("route", "mode"), [("api", "required"), ("maybe", "optional")], ids=["required", "optional"]
)
async def test_a_credential_that_is_not_one_b64token_is_invalid_request(
    route: str, mode: str, config_file: Path, rsa_key: SigningKey
) -> None:
    """What the verifier alone would call token_malformed, the gateway refuses earlier."""
    ran = await explain(config_file, route, mint(rsa_key) + ",x")

    assert ran.code == 1, ran.out + ran.err
    assert section(ran, route, mode) == ["  FAIL  token: credentials are not a single b64token"]
    assert ran.after("  FAIL  token: credentials are not a single b64token") == [
        "result: 400 invalid_request: The request carries a malformed, oversized or repeated token.",
        INVALID_REQUEST_CHALLENGE,
    ]
    assert "token_malformed" not in ran.out


async def test_a_token_over_max_token_bytes_is_invalid_request(
    tmp_path: Path, config_document: dict[str, Any], rsa_key: SigningKey
) -> None:
    config = write_config(tmp_path, {**config_document, "max_token_bytes": 256}, "small.yaml")

    ran = await explain(config, "api", mint(rsa_key))

    assert ran.code == 1, ran.out + ran.err
    assert section(ran, "api", "required") == ["  FAIL  token: token longer than 256 bytes"]
    assert "result: 400 invalid_request: " in ran.out


async def test_a_second_credential_is_invalid_request_and_reported_on_report_only(
    config_file: Path, rsa_key: SigningKey
) -> None:
    basic = ("--header", "Authorization: Basic YWxpY2U6c2VjcmV0")

    required = await explain(config_file, "api", mint(rsa_key), *basic)
    reported = await explain(config_file, "shadow", mint(rsa_key), *basic)

    assert required.code == 1
    assert required.lines[:4] == [
        "request: GET /api",
        "  Host: localhost",
        "  Authorization: Basic YWxpY2U6c2VjcmV0",
        "  Authorization: Bearer <token>",
    ]
    assert section(required, "api", "required") == [
        "  FAIL  token: more than one Authorization header"
    ]
    assert INVALID_REQUEST_CHALLENGE in required.lines
    assert reported.code == 0
    assert reported.after("result: admitted; the upstream would receive:") == [
        "  X-Gateway-Auth-Outcome: invalid_request"
    ]


async def test_the_token_goes_where_the_route_reads_it(
    config_file: Path, rsa_key: SigningKey
) -> None:
    ran = await explain(config_file, "web", mint(rsa_key))

    assert ran.code == 0, ran.out + ran.err
    assert ran.lines[:3] == [
        "request: POST /web/home",
        "  Host: localhost",
        "  Cookie: access_token=<token>",
    ]
    assert section(ran, "web", "required") == [TOKEN_FOUND, *PASSED]


async def test_a_request_that_another_route_takes_is_judged_by_that_route(
    tmp_path: Path, config_document: dict[str, Any], rsa_key: SigningKey
) -> None:
    # An optional /api/public listed after the required /api never sees its own default request.
    config_document["routes"].insert(
        1, {**config_document["routes"][1], "id": "late", "match": {"path_prefix": "/api/public"}}
    )
    config = write_config(tmp_path, config_document, "shadowed.yaml")

    ran = await explain(config, "late", "")

    assert ran.code == 1
    assert "note: this request takes route 'api', not 'late' (an earlier route matches it)" in (
        ran.lines
    )
    assert "checks on route 'api' (mode required):" in ran.lines
    assert "result: 401 token_missing: A bearer token is required." in ran.lines


@pytest.mark.parametrize(
    "text", ["{t}\n", "Bearer {t}\n", "  {t}  "], ids=["plain", "bearer", "spaces"]
)
async def test_token_on_standard_input(text: str, config_file: Path, rsa_key: SigningKey) -> None:
    token = mint(rsa_key)

    ran = await explain(config_file, "api", "-", stdin=text.replace("{t}", token))

    assert ran.code == 0, ran.out + ran.err
    assert "  X-User-Sub: alice" in ran.lines


async def test_unknown_route_exits_2(config_file: Path, rsa_key: SigningKey) -> None:
    ran = await explain(config_file, "nope", mint(rsa_key))

    assert ran.code == 2
    assert "unknown route 'nope'; expected one of: api, maybe, shadow, web, docs" in ran.out
    assert "checks on route" not in ran.out


async def test_public_route_admits_anything(config_file: Path) -> None:
    ran = await explain(config_file, "docs", "not-a-jwt")

    assert ran.code == 0
    assert "route 'docs' is public (auth: none): every request is forwarded" in ran.lines
    assert ran.after("result: admitted; the upstream would receive:") == ["  (no identity headers)"]


async def test_bad_config_exits_2_naming_the_yaml_path(
    tmp_path: Path, config_document: dict[str, Any]
) -> None:
    config_document["routes"][0]["auth"] = {**POLICY, "mode": "enforce"}
    bad = write_config(tmp_path, config_document, "bad.yaml")

    ran = await explain(bad, "api", "x")

    assert ran.code == 2
    assert ran.err == (
        f"{bad}: routes[0].auth.mode: got 'enforce'; "
        "expected one of: required, optional, report-only\n"
    )


# --- explain against the gateway itself ------------------------------------------------------
_RESULT = re.compile(r"result: (\d{3}) ([a-z_]+): ")


@pytest.mark.parametrize("route", ["api", "maybe", "shadow"])
@pytest.mark.parametrize("kind", ["valid", "expired", "none", "not-b64token"])
async def test_explain_predicts_what_the_running_gateway_does(
    route: str,
    kind: str,
    config_file: Path,
    config_document: dict[str, Any],
    rsa_key: SigningKey,
    make_gateway: GatewayFactory,
) -> None:
    token = {
        "valid": mint(rsa_key),
        "expired": expired(rsa_key),
        "none": "",
        "not-b64token": mint(rsa_key) + ",x",
    }[kind]
    gateway = await make_gateway(document=config_document)

    ran = await explain(config_file, route, token)
    headers = [("Authorization", f"Bearer {token}")] if token else []
    response = await send_raw(gateway.client, "GET", f"/{route}", headers)

    refused = _RESULT.search(ran.out)
    if refused is not None:
        assert ran.code == 1
        assert response.status == int(refused[1]), response.body
        assert response.json()["error"]["reason"] == refused[2]
        challenge = [line.partition(": ")[2] for line in ran.lines if "WWW-Auth" in line]
        assert response.headers.getall("WWW-Authenticate", []) == challenge
        return
    assert ran.code == 0, ran.out + ran.err
    assert response.status == 200, response.body
    received = [(name, value) for name, value in response.json()["headers"]]
    predicted = ran.after("result: admitted; the upstream would receive:")
    for name in ("X-User-Sub", "X-Roles", OUTCOME):
        shown = [line.partition(": ")[2] for line in predicted if line.startswith(f"  {name}: ")]
        assert values_of(received, name) == shown, (name, ran.out)
