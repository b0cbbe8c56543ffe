"""The address a client connection reached, as the authority an HTTP/1.0 request without a
Host is given (its ``X-Forwarded-Host``).  The listener tests reach it over IPv4 loopback
only (servers in tests listen on 127.0.0.1), so the IPv6 and Unix-socket forms are held here,
on the socket names the event loop hands over."""

from __future__ import annotations

import pytest

from gateway.server import local_authority


@pytest.mark.parametrize(
    ("sockname", "authority"),
    [
        (("127.0.0.1", 8080), "127.0.0.1:8080"),
        (("::1", 8443, 0, 0), "[::1]:8443"),  # IPv6: (host, port, flowinfo, scope id)
        (("2001:db8::7", 80, 0, 0), "[2001:db8::7]:80"),
        (("10.1.2.3", 1), "10.1.2.3:1"),
        ("/run/gateway.sock", ""),  # a Unix socket has no host and port
        (None, ""),
        (("127.0.0.1",), ""),
    ],
)
def test_the_local_address_is_an_authority(sockname: object, authority: str) -> None:
    assert local_authority(sockname) == authority
