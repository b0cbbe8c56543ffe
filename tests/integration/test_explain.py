"""``gateway explain``, run as a real subprocess against the fake IdP on loopback.

The subprocess is started with ``asyncio.create_subprocess_exec`` so that this test's event loop
keeps serving the IdP while the CLI fetches its keys.  The fake clock cannot reach another
process: tokens are minted with real time (a fresh ``FakeClock()`` starts at the wall clock).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AUDIENCE, ISSUER
from tests.fakes import FakeClock, FakeIdP, SigningKey, make_token

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def explain(config: Path, route: str, token: str | None, stdin: str = "") -> Ran:
    args = [sys.executable, "-m", "gateway", "explain", "--config", str(config), "--route", route]
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


@pytest.fixture
def config_document(idp: FakeIdP) -> dict[str, Any]:
    """Two routes: ``api`` (scopes, a claim matcher, claim and payload headers) and public ``docs``."""
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
                "upstream": "http://127.0.0.1:9",
                "auth": {
                    "issuers": ["test"],
                    "audiences": [AUDIENCE],
                    "required_claims": ["sub"],
                    "required_scopes": ["orders:read"],
                    "claims": [{"path": "tenant", "equals": "acme"}],
                },
                "claim_headers": {"X-User-Sub": "sub", "X-Roles": "realm_access.roles"},
                "payload_header": "X-Jwt-Payload",
            },
            {
                "id": "docs",
                "match": {"path_prefix": "/docs"},
                "upstream": "http://127.0.0.1:9",
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


# Each check of an admitted token, in order (a fragment of its line).
CHECKS = (
    "parses",
    "iss names issuer 'test'",
    "alg RS256 is pinned",
    "typ 'JWT'",
    "key 'key-rs256'",
    "signature verifies",
    "exp, nbf and iat",
    "aud",
    "'sub'",
    "orders:read",
    "tenant equals acme",
)


def assert_in_order(lines: list[str], fragments: tuple[str, ...]) -> None:
    position = 0
    for fragment in fragments:
        found = [i for i, line in enumerate(lines) if i >= position and fragment in line]
        assert found, f"{fragment!r} not found after line {position}:\n" + "\n".join(lines)
        position = found[0] + 1


def check_lines(ran: Ran) -> list[str]:
    return [line for line in ran.lines if line.startswith("  ok ")]


async def test_admitted_token_prints_every_check_and_the_upstream_headers(
    config_file: Path, rsa_key: SigningKey, idp: FakeIdP
) -> None:
    token = mint(rsa_key)
    fetches = idp.hits

    ran = await explain(config_file, "api", token)

    assert ran.code == 0, ran.out + ran.err
    assert "checks on route 'api' (mode required):" in ran.lines
    assert len(check_lines(ran)) == len(CHECKS)
    assert_in_order(check_lines(ran), CHECKS)
    assert "FAIL" not in ran.out
    result = ran.lines.index("result: admitted; the upstream would receive:")
    assert sorted(ran.lines[result + 1 :]) == [
        f"  X-Jwt-Payload: {token.split('.')[1]}",
        "  X-Roles: a,b",
        "  X-User-Sub: alice",
    ]
    assert '"tenant": "acme"' in ran.out  # the decoded claims are shown
    assert idp.hits == fetches + 1  # keys fetched as the gateway would


@pytest.mark.parametrize(
    ("claims", "status_line", "challenge", "passed"),
    [
        pytest.param(
            {"iat": -7200, "exp": -3600},
            "result: 401 token_expired: The token has expired.",
            'Bearer realm="gateway", error="invalid_token", '
            'error_description="The token has expired."',
            "signature verifies",
            id="expired",
        ),
        pytest.param(
            {"scope": "profile"},
            "result: 403 insufficient_scope: The token does not grant the required scope.",
            'Bearer realm="gateway", error="insufficient_scope", '
            'error_description="The token does not grant the required scope.", '
            'scope="orders:read"',
            "'sub'",
            id="insufficient-scope",
        ),
        pytest.param(
            {"aud": "other"},
            "result: 401 audience_not_allowed: The token is not meant for this service.",
            'Bearer realm="gateway", error="invalid_token", '
            'error_description="The token is not meant for this service."',
            "exp, nbf and iat",
            id="wrong-audience",
        ),
    ],
)
async def test_refused_token_prints_fail_status_and_challenge(
    claims: dict[str, Any],
    status_line: str,
    challenge: str,
    passed: str,
    config_file: Path,
    rsa_key: SigningKey,
) -> None:
    now = int(FakeClock().time())
    resolved = {k: now + v if k in ("iat", "exp") else v for k, v in claims.items()}

    ran = await explain(config_file, "api", mint(rsa_key, **resolved))

    assert ran.code == 1, ran.out + ran.err
    assert passed in check_lines(ran)[-1]  # the checks before the failing one
    [fail] = [line for line in ran.lines if "FAIL" in line]
    assert_in_order(ran.lines, (fail, status_line, f"WWW-Authenticate: {challenge}"))
    assert "admitted" not in ran.out
    assert "X-User-Sub" not in ran.out


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
    assert "unknown route 'nope'; expected one of: api, docs" in ran.out
    assert "checks on route" not in ran.out


async def test_public_route_admits_anything(config_file: Path) -> None:
    ran = await explain(config_file, "docs", "not-a-jwt")

    assert ran.code == 0
    assert "route 'docs' is public (auth: none)" in ran.out


async def test_bad_config_exits_2_naming_the_yaml_path(
    tmp_path: Path, config_document: dict[str, Any]
) -> None:
    config_document["routes"][0]["auth"]["mode"] = "enforce"
    bad = write_config(tmp_path, config_document, "bad.yaml")

    ran = await explain(bad, "api", "x")

    assert ran.code == 2
    assert ran.err == (
        f"{bad}: routes[0].auth.mode: got 'enforce'; "
        "expected one of: required, optional, report-only\n"
    )
