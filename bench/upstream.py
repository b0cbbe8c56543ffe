"""Fallback upstream when nginx is missing: a minimal asyncio raw-protocol HTTP/1.1 server.

Answers every request with a small fixed 200 body, except ``GET /jwks.json`` (the JWKS file).
Keep-alive, pipelining-safe, no parsing beyond what a GET needs.

    python bench/upstream.py --port 18080 --jwks FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Final

BODY: Final = b"ok\n"


def _response(body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Http(asyncio.Protocol):
    def __init__(self, ok: bytes, jwks: bytes) -> None:
        self.ok = ok
        self.jwks = jwks
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            skip = 0
            lower = head.lower()
            marker = lower.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = lower.find(b"\r\n", marker + 2)
                line_end = len(lower) if line_end < 0 else line_end
                skip = int(lower[marker + 17 : line_end].strip() or b"0")
            if len(self.buffer) < end + 4 + skip:
                break
            self.buffer = self.buffer[end + 4 + skip :]
            out.append(self.jwks if head.startswith(b"GET /jwks.json ") else self.ok)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int, jwks_body: bytes) -> None:
    jwks = _response(jwks_body, b"application/json")
    ok = _response(BODY, b"text/plain")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(ok, jwks), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwks", required=True)
    args = parser.parse_args()
    with open(args.jwks, "rb") as fh:
        jwks_body = fh.read()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, jwks_body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
