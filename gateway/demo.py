"""``gateway demo``: a demo identity provider and echo upstream, started beside the gateway in one process."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import sys
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .config import GatewayConfig, load_config, loads_config
from .errors import ConfigError

DEMO_AUDIENCE: Final = "orders-api"
TOKEN_LIFETIME_S: Final = 600  # how long a valid token from /token lasts (each call mints one)
TOKEN_KINDS: Final = ("valid", "expired", "forged")


class DemoIdentityProvider:
    """Signing keys generated at start, served as a JWKS and an OpenID discovery document.

    ``GET /token`` mints a fresh token for the demo's route: ``valid`` (the default, good for
    ``TOKEN_LIFETIME_S``), ``expired`` or ``forged`` (``/token?kind=expired``).  It hands a
    valid token to anyone who asks, so the demo serves it on loopback only.
    """

    def __init__(self, issuer: str, audience: str = DEMO_AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_kid = "demo-rsa-1"
        self.ec_kid = "demo-ec-1"

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        return {
            "keys": [
                {**rsa_jwk, "kid": self.rsa_kid, "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": self.ec_kid, "alg": "ES256", "use": "sig"},
            ]
        }

    def mint(self, audience: str, *, lifetime_s: int = 3600, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer, "sub": "alice", "aud": audience, "iat": now,
            "exp": now + lifetime_s, "jti": uuid.uuid4().hex, **claims,
        }  # fmt: skip
        return jwt.encode(payload, self.rsa, algorithm="RS256", headers={"kid": self.rsa_kid})

    def forge(self, audience: str) -> str:
        """A token that names the demo's kid but is signed by a key the demo never published."""
        impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        payload = {"iss": self.issuer, "sub": "mallory", "aud": audience, "exp": now + 3600,
                   "scope": "orders:read"}  # fmt: skip
        return jwt.encode(payload, impostor, algorithm="RS256", headers={"kid": self.rsa_kid})

    def token(self, kind: str = "valid") -> str:
        """A fresh token of ``kind`` (one of ``TOKEN_KINDS``) for the demo's audience."""
        if kind == "valid":
            return self.mint(self.audience, lifetime_s=TOKEN_LIFETIME_S, scope="orders:read",
                             email="alice@example.com", org={"tenant_id": "acme"})  # fmt: skip
        if kind == "expired":
            return self.mint(self.audience, lifetime_s=-3600, scope="orders:read")
        if kind == "forged":
            return self.forge(self.audience)
        raise ValueError(f"unknown token kind {kind!r}; expected one of: {', '.join(TOKEN_KINDS)}")

    def token_url(self) -> str:
        """Where ``GET /token`` is served: the issuer's origin."""
        origin = urlsplit(self.issuer)
        return f"{origin.scheme}://{origin.netloc}/token"

    def app(self, jwks_path: str) -> web.Application:
        app = web.Application()

        async def jwks(_: web.Request) -> web.Response:
            return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=300"})

        async def discovery(_: web.Request) -> web.Response:
            return web.json_response(
                {"issuer": self.issuer, "jwks_uri": self.issuer + jwks_path,
                 "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
            )  # fmt: skip

        async def token(request: web.Request) -> web.Response:
            try:
                text = self.token(request.query.get("kind", "valid"))
            except ValueError as exc:
                return web.Response(status=400, text=f"{exc}\n")
            return web.Response(text=text, headers={"Cache-Control": "no-store"})

        app.router.add_get(jwks_path, jwks)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/token", token)
        return app


def create_echo_app() -> web.Application:
    """An upstream that answers with what it received: method, path, headers and body size."""

    async def echo(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response(
            {"method": request.method, "path": request.raw_path,
             "headers": dict(request.headers), "body_bytes": size},
        )  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def demo_config(
    path: Path | None, *, port: int | None = None, admin_port: int | None = None
) -> GatewayConfig:
    """The demo YAML (``path``, or the packaged demo.yaml), its listen and admin ports overridden."""
    if path is not None:
        config = load_config(path)
    else:
        config = loads_config(resources.files("gateway").joinpath("demo.yaml").read_text("utf-8"))
    if port is not None:
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, port=port))
    if admin_port is not None:
        config = dataclasses.replace(
            config, admin=dataclasses.replace(config.admin, port=admin_port)
        )
    return config


# The metrics worth reading after the tries: the requests counted so far by route and reason
# (non-zero ones only; the others are pre-created at 0), the key set's age and readiness.
METRICS_GREP: Final = r"grep -E '^gateway_(requests_total\{.*\} [1-9]|jwks_age_seconds|ready )'"


def instructions(config: GatewayConfig, idp: DemoIdentityProvider) -> str:
    """The ready-to-paste curl commands the demo prints, each with what it should get.

    The tokens come from the demo IdP's ``/token`` when a command runs, so the commands work for
    as long as the demo does.
    """
    base = f"http://{config.listen.host}:{config.listen.port}"
    admin = f"http://{config.admin.host}:{config.admin.port}"
    token = idp.token_url()
    minutes = TOKEN_LIFETIME_S // 60
    lines = [
        "gateway demo is running. Try:",
        "",
        f"# 1. a valid token (fresh from the demo identity provider, good for {minutes} minutes)"
        " -> 200; the echo upstream shows X-User-Sub, X-User-Email, X-Tenant-Id",
        f"TOKEN=$(curl -s {token})",
        f'curl -s -H "Authorization: Bearer $TOKEN" {base}/api/orders/42',
        "",
        "# 2. the same token with spoofed identity headers -> 200; the upstream sees the verified ones",
        f"curl -s -H \"Authorization: Bearer $TOKEN\" -H 'X-User-Sub: root' {base}/api/orders/42",
        "",
        "# 3. an expired token -> 401 token_expired",
        f"EXPIRED=$(curl -s '{token}?kind=expired')",
        f'curl -si -H "Authorization: Bearer $EXPIRED" {base}/api/orders/42',
        "",
        "# 4. a forged token (right kid, wrong key) -> 401 signature_invalid",
        f"FORGED=$(curl -s '{token}?kind=forged')",
        f'curl -si -H "Authorization: Bearer $FORGED" {base}/api/orders/42',
        "",
        "# 5. no token -> 401 token_missing; a public route -> 200",
        f"curl -si {base}/api/orders/42",
        f"curl -s {base}/status",
        "",
        "# metrics (the requests counted by route and reason, the key set's age, readiness)",
        f"curl -s {admin}/metrics | {METRICS_GREP}",
        f"curl -s {admin}/readyz",
        "",
        "Ctrl-C stops the demo.",
    ]
    return "\n".join(lines)


async def run_demo(
    config_path: Path | None, *, port: int | None = None, admin_port: int | None = None
) -> int:
    """Start the demo IdP and echo upstream where the demo config points, then serve the gateway.

    ``port`` and ``admin_port`` (``--port``, ``--admin-port``) override the config's listen and
    admin ports.
    """
    from .service import serve

    try:
        config = demo_config(config_path, port=port, admin_port=admin_port)
    except ConfigError as exc:
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 1
    issuer = next(iter(config.issuers.values()))
    # The demo IdP serves where the issuer URL points; the gateway finds its keys by discovery.
    origin = urlsplit(issuer.issuer)
    idp_host = origin.hostname or "127.0.0.1"
    if not _is_loopback(idp_host):
        print(f"gateway demo: the demo identity provider mints valid tokens for anyone who asks, "
              f"so it listens on loopback only, and the issuer {issuer.issuer} is not a loopback "
              f"address", file=sys.stderr)  # fmt: skip
        return 2
    idp = DemoIdentityProvider(issuer.issuer)
    upstream = config.routes[0].upstream
    assert upstream is not None, "the demo runs in proxy mode"
    runners: list[web.AppRunner] = []
    try:
        for app, host, bind_port in (
            (idp.app("/.well-known/jwks.json"), idp_host, origin.port or 80),
            (create_echo_app(), upstream.host, upstream.port),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, bind_port).start()
        await serve(config, on_ready=instructions(config, idp))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"gateway demo: {exc.strerror}; the demo listens on {config.listen.port} (gateway), "
              f"{config.admin.port} (admin), {origin.port or 80} (identity provider) and "
              f"{upstream.port} (upstream): --port and --admin-port move the first two, a "
              f"--config file (see config/demo.yaml) any of them", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        for runner in runners:
            await runner.cleanup()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "DEMO_AUDIENCE",
    "TOKEN_KINDS",
    "TOKEN_LIFETIME_S",
    "DemoIdentityProvider",
    "create_echo_app",
    "demo_config",
    "instructions",
    "run_demo",
]
