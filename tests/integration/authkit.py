"""Helpers for the end-to-end auth tests: the raw HTTP/1.1 client of the tests, hand-made tokens,
expectations.

The raw client exists because aiohttp's client normalises what these tests must send as is:
dot segments in the path, repeated ``Authorization`` headers, hop-by-hop headers, ``Host``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from multidict import CIMultiDict

from gateway.logs import REQUEST_LOGGER
from gateway.reasons import REASON_SPECS, Reason
from tests.conftest import AUDIENCE, ISSUER, RunningGateway
from tests.fakes import SigningKey

REALM = "gateway"

# What each rejection must look like on the wire, written out by hand (not derived from the
# gateway's table): status, and the RFC 6750 ``error`` attribute of the challenge.  ``""`` means a
# challenge without ``error``; ``None`` means no ``WWW-Authenticate`` header at all.
EXPECTED: dict[Reason, tuple[int, str | None]] = {
    Reason.ROUTE_NOT_FOUND: (404, None),
    Reason.REQUEST_REJECTED: (400, None),
    Reason.INVALID_REQUEST: (400, "invalid_request"),
    Reason.TOKEN_MISSING: (401, ""),
    Reason.TOKEN_MALFORMED: (401, "invalid_token"),
    Reason.ALGORITHM_NOT_ALLOWED: (401, "invalid_token"),
    Reason.ISSUER_NOT_ALLOWED: (401, "invalid_token"),
    Reason.KEY_NOT_FOUND: (401, "invalid_token"),
    Reason.SIGNATURE_INVALID: (401, "invalid_token"),
    Reason.TOKEN_EXPIRED: (401, "invalid_token"),
    Reason.TOKEN_NOT_YET_VALID: (401, "invalid_token"),
    Reason.CLAIM_MISSING: (401, "invalid_token"),
    Reason.CLAIM_INVALID: (401, "invalid_token"),
    Reason.AUDIENCE_NOT_ALLOWED: (401, "invalid_token"),
    Reason.INSUFFICIENT_SCOPE: (403, "insufficient_scope"),
}

# Fragments of PyJWT / Python exception text that must never reach a client.
LIBRARY_TEXT = (
    "Signature verification failed",
    "Not enough segments",
    "Invalid header",
    "Invalid payload",
    "Invalid crypto padding",
    "Signature has expired",
    "Invalid audience",
    "Invalid issuer",
    "The token is not yet valid",
    "DecodeError",
    "InvalidSignatureError",
    "Traceback",
    "jwt.",
)


def expected_challenge(reason: Reason, scope: str | None = None) -> str | None:
    """The exact ``WWW-Authenticate`` value the gateway must send for ``reason``."""
    error = EXPECTED[reason][1]
    if error is None:
        return None
    if error == "":
        return f'Bearer realm="{REALM}"'
    text = (
        f'Bearer realm="{REALM}", error="{error}", '
        f'error_description="{REASON_SPECS[reason].message}"'
    )
    if scope is not None:
        text += f', scope="{scope}"'
    return text


def expected_body(reason: Reason) -> dict[str, Any]:
    return {
        "error": {
            "code": EXPECTED[reason][0],
            "reason": reason.value,
            "message": REASON_SPECS[reason].message,
        }
    }


# --- a raw HTTP/1.1 client --------------------------------------------------------------------
@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    reason: str = ""  # the status line's reason phrase

    def json(self) -> Any:
        return json.loads(self.body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            with contextlib.suppress(asyncio.IncompleteReadError):
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


_STATUS_LINE: Final = re.compile(r"HTTP/1\.[01] (?P<status>[1-5][0-9][0-9]) (?P<reason>[^\r\n]*)")


class RawConnection:
    """A client socket that sends exactly the given bytes, reads responses one at a time (so a
    connection can be kept alive, or requests pipelined) and watches for the server closing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, method: str = "GET", within: float = 5.0) -> RawResponse:
        """Read one response: a Content-Length or chunked body, none for HEAD/204/304, else
        the rest of the stream."""
        return await asyncio.wait_for(self._response(method), within)

    async def _response(self, method: str) -> RawResponse:
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status_match = _STATUS_LINE.fullmatch(status_line)
        assert status_match is not None, f"not an HTTP/1.x status line: {status_line!r}"
        status = int(status_match["status"])
        parsed: CIMultiDict[str] = CIMultiDict()
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                parsed.add(name.strip(), value.strip())
        if method == "HEAD" or status in (204, 304):
            payload = b""
        elif "Content-Length" in parsed:
            payload = await reader.readexactly(int(parsed["Content-Length"]))
        elif parsed.get("Transfer-Encoding", "").lower() == "chunked":
            payload = await _read_chunked(reader)
        else:
            payload = await reader.read()
        return RawResponse(status, parsed, payload, status_match["reason"])

    async def closed_by_server(self, within: float) -> tuple[float, bytes]:
        """Seconds until the server closed the connection (EOF or reset), and any bytes it sent
        first; fails if it is still open after ``within`` seconds."""
        started = time.monotonic()
        received = b""
        deadline = started + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {within}s")
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return time.monotonic() - started, received
            received += chunk

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def send_raw(
    client: TestClient,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    body: bytes = b"",
) -> RawResponse:
    """Send exactly this request line and these headers to the gateway; read one response.

    A ``Host`` header is added unless given; ``Connection: close`` unless a ``Connection`` is given.
    """
    server = client.server
    assert server.port is not None
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {server.host}:{server.port}")
    lines += [f"{name}: {value}" for name, value in headers]
    if "connection" not in names:
        lines.append("Connection: close")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    conn = RawConnection(reader, writer)
    try:
        await conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        return await conn._response(method)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def send_until_closed(port: int, data: bytes, *, within: float) -> bytes:
    """Send ``data`` as is on a new connection to 127.0.0.1:``port``; everything the server
    sent before it closed (fails if it is still open after ``within`` seconds)."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        _, received = await conn.closed_by_server(within)
    finally:
        await conn.close()
    return received


async def refused(port: int) -> bool:
    """Whether nothing accepts connections on 127.0.0.1:port any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def echoed(response: RawResponse) -> list[tuple[str, str]]:
    """The headers the echo upstream received, in order."""
    assert response.status == 200, response.body
    return [(name, value) for name, value in response.json()["headers"]]


def values_of(headers: list[tuple[str, str]], name: str) -> list[str]:
    """Every value of ``name`` (case-insensitive) in an echoed header list."""
    return [value for key, value in headers if key.lower() == name.lower()]


# --- hand-made tokens --------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def default_claims(now: float, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(now),
        "exp": int(now) + 300,
    }
    claims.update(overrides)
    return claims


def unsigned_token(alg: str, claims: dict[str, Any], kid: str = "key-rs256") -> str:
    """An ``alg: none``-style token: header and payload, empty signature."""
    return f"{b64url_json({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{b64url_json(claims)}."


def hs256_with_public_pem(key: SigningKey, claims: dict[str, Any]) -> str:
    """The algorithm-confusion token: HS256 keyed with the RSA public key's PEM, under its kid.

    Made by hand: PyJWT refuses to sign with a PEM public key as an HMAC secret.
    """
    pem = key.private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = (
        f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{b64url_json(claims)}"
    )
    mac = hmac.new(pem, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tamper_signature(token: str) -> str:
    """Change one base64url character in the middle of the signature (never a padding bit)."""
    head, payload, signature = token.split(".")
    middle = len(signature) // 2
    replacement = "A" if signature[middle] != "A" else "B"
    return f"{head}.{payload}.{signature[:middle]}{replacement}{signature[middle + 1 :]}"


def tamper_payload(token: str, **changes: Any) -> str:
    """Re-encode the payload with ``changes``, keeping the original header and signature."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{head}.{b64url_json(claims)}.{signature}"


def rekeyed(key: SigningKey, *, kid: str | None = None, private: Any = None) -> SigningKey:
    """The same algorithm with another kid and/or another private key."""
    return SigningKey(
        kid=kid if kid is not None else key.kid,
        alg=key.alg,
        private=private if private is not None else key.private,
    )


# --- observations ------------------------------------------------------------------------------
def requests_total(gateway: RunningGateway) -> float:
    """Sum of ``gateway_requests_total`` over every label set."""
    return sum(
        sample.value
        for family in gateway.registry.collect()
        if family.name == "gateway_requests"
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


def decision_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == REQUEST_LOGGER]


def assert_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    """``secret`` appears in no captured record: not in messages, arguments or tracebacks."""
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage(), record.name
        assert secret not in (record.exc_text or ""), record.name
        if record.exc_info:
            assert secret not in logging.Formatter().formatException(record.exc_info)


def logged(caplog: Any) -> dict[str, str]:
    """The fields of the one decision line logged since ``caplog`` was last cleared."""
    [line] = decision_lines(caplog)
    return dict(part.split("=", 1) for part in line.split())
