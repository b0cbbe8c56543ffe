"""The sender check on its own: which certificate a request showed (the listener's TLS peer, or
a trusted proxy's header in each format), and which URL a DPoP proof must name."""

from __future__ import annotations

import hashlib
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.binding import DPOP_HEADER, SenderCheck, thumbprint_from_header
from gateway.config import BEARER_HEADER, CertHeaderFormat, GatewayConfig, loads_config
from gateway.errors import Rejection
from gateway.reasons import Reason
from tests.fakes import FakeClock
from tests.integration.senderkit import DpopClient, b64url

CA = trustme.CA()
OWNER = CA.issue_cert("owner@example.test")
OTHER = CA.issue_cert("other@example.test")


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def x5t(cert: trustme.LeafCert) -> str:
    return b64url(hashlib.sha256(der(cert)).digest())


def pem(cert: trustme.LeafCert) -> str:
    return cert.cert_chain_pems[0].bytes().decode()


class Connection:
    """What the listener's request offers the sender check: its scheme, peer and certificate."""

    def __init__(self, scheme: str = "http", remote: str = "127.0.0.1", cert: bytes | None = None):
        self.scheme = scheme
        self.remote = remote
        self._cert = cert

    def peer_certificate(self) -> bytes | None:
        return self._cert


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


# --- the certificate a proxy's header names ------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"Hash={hashlib.sha256(der(OWNER)).hexdigest()}", id="hash"),
        pytest.param(f"HASH={hashlib.sha256(der(OWNER)).hexdigest()}", id="hash-key-case"),
        pytest.param(f'Hash="{hashlib.sha256(der(OWNER)).hexdigest()}"', id="hash-quoted"),
        pytest.param(f'Cert="{quote(pem(OWNER))}"', id="cert-only"),
        pytest.param(
            f'Subject="CN=x;O=y";Hash={hashlib.sha256(der(OWNER)).hexdigest()}',
            id="hash-last-after-a-quoted-semicolon",
        ),
        pytest.param(
            f"Hash={hashlib.sha256(der(OWNER)).hexdigest()};"
            f'Subject="CN=x;Hash={hashlib.sha256(der(OTHER)).hexdigest()}"',
            id="a-hash-inside-a-quoted-subject-is-not-a-field",
        ),
        pytest.param(
            f"By=spiffe://gw;Hash={hashlib.sha256(der(OWNER)).hexdigest()};"
            'Subject="CN=owner,O=Acme;Inc=1";URI=spiffe://client',
            id="quoted-commas-semicolons-and-equals",
        ),
    ],
)
def test_an_xfcc_element_names_its_certificate(value: str) -> None:
    assert thumbprint_from_header(value, CertHeaderFormat.XFCC) == x5t(OWNER)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Hash=" + "ab" * 31, id="hash-of-31-bytes"),
        pytest.param("Hash=not-hex", id="hash-not-hex"),
        pytest.param(
            f"Hash={hashlib.sha256(der(OWNER)).hexdigest()},Hash={'0' * 64}", id="two-elements"
        ),
        pytest.param('Subject="CN=x"', id="no-hash-no-cert"),
        pytest.param('Cert="not a certificate"', id="cert-junk"),
    ],
)
def test_an_xfcc_value_naming_no_single_certificate_names_none(value: str) -> None:
    assert thumbprint_from_header(value, CertHeaderFormat.XFCC) is None


def test_a_pem_header_names_its_certificate_and_junk_names_none() -> None:
    assert thumbprint_from_header(quote(pem(OWNER)), CertHeaderFormat.PEM) == x5t(OWNER)
    assert thumbprint_from_header("junk", CertHeaderFormat.PEM) is None


# --- the sender check --------------------------------------------------------------------------
def config(tmp_path: Path, settings: dict[str, Any] | None = None, **auth: Any) -> GatewayConfig:
    server = CA.issue_cert("gateway.test")
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    CA.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    document = {
        "listen": {"tls": {"cert_file": "cert.pem", "key_file": "key.pem", "client_ca_file": "ca.pem"}},
        "trusted_proxies": ["10.0.0.1/32"],
        "dpop": settings or {},
        "issuers": {"corp": {"issuer": "https://id.example", "jwks_uri": "https://id.example/k", "algorithms": ["ES256"]}},
        "routes": [{
            "id": "api", "match": {"path_prefix": "/"}, "upstream": "http://u:1",
            "auth": {"issuers": ["corp"], "audiences": ["api"], **auth},
        }],
    }  # fmt: skip
    return loads_config(json.dumps(document), base_dir=tmp_path)


def check(
    sender: SenderCheck, cfg: GatewayConfig, claims: dict[str, Any], connection: Any, **kw: Any
) -> None:
    sender.check(
        cfg.routes[0], kw.pop("source", BEARER_HEADER), kw.pop("token", "t"), claims,
        method="GET", raw_path="/orders", host="api.example:8443",
        headers=kw.pop("headers", headers()), connection=connection,
    )  # fmt: skip


def test_over_the_listener_the_tls_peer_certificate_is_the_one_checked(tmp_path: Path) -> None:
    cfg = config(tmp_path, certificate_bound="required")
    sender = SenderCheck(cfg, FakeClock())
    claims = {"cnf": {"x5t#S256": x5t(OWNER)}}
    check(sender, cfg, claims, Connection(cert=der(OWNER)))
    for connection in (Connection(cert=der(OTHER)), Connection(cert=None), None):
        with pytest.raises(Rejection) as refused:
            check(sender, cfg, claims, connection)
        assert refused.value.reason is Reason.CERT_BINDING_MISMATCH


@pytest.mark.parametrize(
    ("connection", "extra", "htu", "passes"),
    [
        pytest.param(
            Connection("https"), {}, "https://api.example:8443/orders", True, id="tls-listener"
        ),
        pytest.param(
            Connection("https"),
            {},
            "http://api.example:8443/orders",
            False,
            id="tls-listener-http-htu",
        ),
        pytest.param(None, {}, "http://api.example:8443/orders", True, id="no-connection-is-http"),
        pytest.param(
            Connection("https", "10.0.0.1"),
            {},
            "https://api.example:8443/orders",
            True,
            id="trusted-without-forwarded-headers",
        ),
        pytest.param(
            Connection("https", "10.0.0.1"),
            {"X_Forwarded_Proto": "http"},
            "http://api.example:8443/orders",
            True,
            id="trusted-forwarded-http",
        ),
        pytest.param(
            Connection("http", "10.0.0.1"),
            {"X_Forwarded_Proto": "HTTPS", "X_Forwarded_Host": "api.example"},
            "https://api.example/orders",
            True,
            id="trusted-forwarded-https-and-host",
        ),
        pytest.param(
            Connection("http", "10.0.0.1"),
            {"X_Forwarded_Proto": "gopher"},
            "http://api.example:8443/orders",
            True,
            id="trusted-unknown-proto-ignored",
        ),
        pytest.param(
            Connection("http", "10.0.0.1"),
            {"X_Forwarded_Host": "bad host"},
            "http://api.example:8443/orders",
            True,
            id="trusted-invalid-host-ignored",
        ),
        pytest.param(
            Connection("http", "10.0.0.9"),
            {"X_Forwarded_Proto": "https"},
            "https://api.example:8443/orders",
            False,
            id="untrusted-forwarded-ignored",
        ),
    ],
)
def test_the_url_a_proof_must_name(
    tmp_path: Path, connection: Any, extra: dict[str, str], htu: str, passes: bool
) -> None:
    cfg = config(tmp_path, dpop="required")
    clock = FakeClock()
    sender = SenderCheck(cfg, clock)
    client = DpopClient("ES256")
    proof = client.proof("GET", htu, "t", now=clock.time())
    run = lambda: check(  # noqa: E731
        sender, cfg, {"cnf": {"jkt": client.jkt}}, connection,
        source=DPOP_HEADER, headers=headers(DPoP=proof, **extra),
    )  # fmt: skip
    if passes:
        run()
    else:
        with pytest.raises(Rejection) as refused:
            run()
        assert refused.value.reason is Reason.DPOP_PROOF_INVALID


def test_with_nonces_an_allowed_route_still_challenges_both_schemes(tmp_path: Path) -> None:
    cfg = config(tmp_path, settings={"nonce": True}, dpop="allowed")
    challenge = SenderCheck(cfg, FakeClock()).challenge(cfg.routes[0])
    assert challenge is not None
    assert (challenge.bearer_too, challenge.nonce is not None) == (True, True)


def test_a_required_route_refuses_an_unbound_token_whatever_the_certificate(tmp_path: Path) -> None:
    cfg = config(tmp_path, certificate_bound="required")
    with pytest.raises(Rejection) as refused:
        check(SenderCheck(cfg, FakeClock()), cfg, {"sub": "a"}, Connection(cert=der(OWNER)))
    assert refused.value.reason is Reason.CERT_BINDING_MISMATCH


def test_from_a_proxy_header_a_request_without_a_connection_shows_no_certificate(
    tmp_path: Path,
) -> None:
    # `gateway explain` judges a request that came over no connection at all.
    cfg = loads_config(
        json.dumps({
            "trusted_proxies": ["10.0.0.1/32"],
            "client_cert_header": {"name": "X-Forwarded-Client-Cert"},
            "issuers": {"corp": {"issuer": "https://id.example", "jwks_uri": "https://id.example/k", "algorithms": ["ES256"]}},
            "routes": [{
                "id": "api", "match": {"path_prefix": "/"}, "upstream": "http://u:1",
                "auth": {"issuers": ["corp"], "audiences": ["api"], "certificate_bound": "required"},
            }],
        })
    )  # fmt: skip
    claims = {"cnf": {"x5t#S256": x5t(OWNER)}}
    forwarded = headers(X_Forwarded_Client_Cert=f"Hash={hashlib.sha256(der(OWNER)).hexdigest()}")
    sender = SenderCheck(cfg, FakeClock())
    check(sender, cfg, claims, Connection(remote="10.0.0.1"), headers=forwarded)
    with pytest.raises(Rejection) as refused:
        check(sender, cfg, claims, None, headers=forwarded)
    assert refused.value.reason is Reason.CERT_BINDING_MISMATCH
