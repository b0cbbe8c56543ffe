"""Test collaborators: a clock moved by hand, signing keys, a token factory, a fake IdP and an echo upstream.

The IdP and the upstream are real aiohttp servers on 127.0.0.1 (started through
pytest-aiohttp's ``aiohttp_server``), never mocks of the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


class FakeClock:
    """A clock that moves only when a test calls ``advance``; ``sleep`` waits on it."""

    def __init__(self, wall: float | None = None) -> None:
        self._mono = 10_000.0
        self._wall = time.time() if wall is None else wall
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + max(seconds, 0.0), future))
        try:
            await future
        finally:
            self._sleepers = [(d, f) for d, f in self._sleepers if f is not future]

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake every sleeper whose deadline has passed."""
        self._mono += seconds
        self._wall += seconds
        for deadline, future in list(self._sleepers):
            if deadline <= self._mono and not future.done():
                future.set_result(None)


@dataclass(frozen=True)
class SigningKey:
    """A private key with its kid and algorithm, and its public JWK."""

    kid: str
    alg: str
    private: Any

    def public_jwk(self, *, with_alg: bool = True, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg.startswith(("RS", "PS")):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.alg.startswith("ES"):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk = {**jwk, "kid": self.kid, "use": "sig"}
        if with_alg:
            jwk["alg"] = self.alg
        return {**jwk, **extra}


_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


def generate_key(alg: str, kid: str) -> SigningKey:
    """A fresh key for ``alg`` (RSA 2048 for RS*/PS*, the matching curve for ES*, Ed25519 for EdDSA)."""
    if alg.startswith(("RS", "PS")):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg in _CURVES:
        private = ec.generate_private_key(_CURVES[alg])
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(alg)
    return SigningKey(kid=kid, alg=alg, private=private)


def make_token(
    key: SigningKey,
    clock: FakeClock,
    *,
    headers: dict[str, Any] | None = None,
    omit: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """Sign a token with ``key``; ``iat`` now and ``exp`` in 300 s unless given, ``omit`` drops claims."""
    now = int(clock.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + 300, **claims}
    for name in omit:
        payload.pop(name, None)
    header = {"kid": key.kid, **(headers or {})}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=header)


@dataclass
class FakeIdP:
    """What the fake identity provider serves, and how often it was asked.

    ``mode`` is one of: ``ok``, ``error`` (HTTP 500), ``hang`` (never answers),
    ``slow`` (answers as ``ok`` once ``release`` is set), ``garbage`` (non-JSON body), ``empty`` (a set without keys), ``huge`` (a
    body over any sane size limit), ``not_modified`` (304 whatever was asked).
    It also serves OpenID discovery at ``/.well-known/openid-configuration``
    naming ``issuer`` and its ``/jwks.json``.

    Conditional requests (RFC 9110 §13): with ``etags`` the JWKS carries an ``ETag`` derived
    from the served document, and with ``last_modified`` that ``Last-Modified``; a request
    whose ``If-None-Match`` (or, without one, ``If-Modified-Since``) still matches gets 304
    with ``headers`` and no body.  ``validators`` records what each JWKS request sent.
    """

    keys: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"
    hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    jwks_uri: str = ""  # set once the server is listening
    issuer: str = ""  # what the discovery document names (set once listening, or overridden)
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Cache-Control on the JWKS
    discovery: dict[str, Any] | None = None  # overrides the discovery document when set
    discovery_mode: str = "ok"  # ok or error
    discovery_hits: int = 0
    etags: bool = False
    last_modified: str | None = None  # an HTTP date
    not_modified_hits: int = 0
    validators: list[tuple[str | None, str | None]] = field(default_factory=list)

    def etag(self) -> str:
        """The ETag of the document served now: changes whenever the published keys do."""
        digest = hashlib.sha256(json.dumps(self.keys, sort_keys=True).encode()).hexdigest()
        return f'"{digest[:16]}"'

    def _still_valid(self, request: web.Request) -> bool:
        """Whether the client's cached copy matches (If-None-Match wins, RFC 9110 §13.2.2)."""
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None:
            tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
            return self.etags and (self.etag() in tags or "*" in tags)
        since = request.headers.get("If-Modified-Since")
        if since is None or self.last_modified is None:
            return False
        try:
            return parsedate_to_datetime(self.last_modified) <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False

    def publish(self, *keys: SigningKey) -> None:
        """Replace the served key set with the public halves of ``keys``."""
        self.keys = [k.public_jwk() for k in keys]

    @staticmethod
    def private_jwk(key: SigningKey, **extra: Any) -> dict[str, Any]:
        """The PRIVATE JWK of ``key`` (``d``, and for RSA ``p``, ``q``, ``dp``, ``dq``, ``qi``),
        marked for verification: what a misconfigured IdP publishes by mistake."""
        if key.alg.startswith(("RS", "PS")):
            jwk = RSAAlgorithm.to_jwk(key.private, as_dict=True)
        elif key.alg.startswith("ES"):
            jwk = ECAlgorithm.to_jwk(key.private, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(key.private, as_dict=True)
        jwk.pop("key_ops", None)  # PyJWT marks it ["sign"], a reason to skip it on its own
        return {**jwk, "kid": key.kid, "alg": key.alg, "use": "sig", **extra}

    def leak(self, *keys: SigningKey) -> None:
        """Add the private JWKs of ``keys`` to the served set."""
        self.keys = [*self.keys, *(self.private_jwk(k) for k in keys)]

    def app(self) -> web.Application:
        app = web.Application()

        async def jwks(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            self.validators.append(
                (request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since"))
            )
            if self.mode == "error":
                return web.Response(status=500, text="boom")
            if self.mode == "hang":
                await self.release.wait()
                return web.Response(status=500)
            if self.mode == "slow":
                await self.release.wait()
            if self.mode == "garbage":
                return web.Response(text="<html>not json</html>", content_type="text/html")
            if self.mode == "empty":
                return web.json_response({"keys": []})
            if self.mode == "huge":
                return web.Response(body=b"[" + b" " * (2 * 1024 * 1024) + b"]")
            if self.mode == "not_modified" or self._still_valid(request):
                self.not_modified_hits += 1
                return web.Response(status=304, headers=self.headers)
            headers = dict(self.headers)
            if self.etags:
                headers["ETag"] = self.etag()
            if self.last_modified is not None:
                headers["Last-Modified"] = self.last_modified
            return web.json_response({"keys": self.keys}, headers=headers)

        async def discovery(request: web.Request) -> web.Response:
            self.discovery_hits += 1
            if self.discovery_mode == "error":
                return web.Response(status=500, text="boom")
            document = self.discovery or {
                "issuer": self.issuer,
                "jwks_uri": str(request.url.with_path("/jwks.json").with_query(None)),
            }
            return web.json_response(document, headers=self.headers)

        app.router.add_get("/jwks.json", jwks)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        return app


@dataclass
class EchoUpstream:
    """An upstream that reports what it received; it can also stall, break or stream big bodies.

    ``mode``: ``echo`` (JSON of method, raw path, headers, body size and sha256),
    ``stall`` (waits for ``release`` before answering), ``cut`` (sends part of a
    chunked body, then drops the connection), ``download`` (streams
    ``download_bytes`` of deterministic data).
    """

    mode: str = "echo"
    hits: int = 0
    download_bytes: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""  # set once the server is listening

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)

        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            if self.mode == "stall":
                await self.release.wait()
            if self.mode == "cut":
                response = web.StreamResponse()
                response.enable_chunked_encoding()
                await response.prepare(request)
                await response.write(b"partial-")
                assert request.transport is not None
                request.transport.close()
                return response
            if self.mode == "download":
                response = web.StreamResponse()
                response.content_length = self.download_bytes
                await response.prepare(request)
                block = hashlib.sha256(b"block").digest() * 2048  # 64 KiB
                remaining = self.download_bytes
                while remaining > 0:
                    piece = block[: min(len(block), remaining)]
                    await response.write(piece)
                    remaining -= len(piece)
                await response.write_eof()
                return response
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            body = {
                "method": request.method,
                "path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_bytes": size,
                "body_sha256": digest.hexdigest(),
            }
            return web.Response(text=json.dumps(body), content_type="application/json")

        app.router.add_route("*", "/{tail:.*}", handle)
        return app
