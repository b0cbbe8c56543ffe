"""deploy/forward-auth, the nginx side, offline: the gateway config is a valid forward_auth
config, the ingress-nginx manifests validate against the Kubernetes schemas, and every caller
config (ingress-nginx annotations, nginx.conf) overwrites exactly the headers the gateway owns.

A real nginx runs the shipped nginx.conf in tests/integration/test_forward_auth_callers.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import latest_version, validate

from gateway import load_config
from gateway.config import GatewayConfig, GatewayMode
from gateway.headers import header_key, token_carriers
from tests.deploy.support import DEPLOY, Manifest, one

FORWARD_AUTH = DEPLOY / "forward-auth"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"
INGRESS_YAML = FORWARD_AUTH / "ingress-nginx.yaml"
NGINX_CONF = FORWARD_AUTH / "nginx.conf"
K8S_VERSIONS = ("1.29", latest_version())
ANNOTATION = "nginx.ingress.kubernetes.io/"
# ingress-nginx's own check of each auth-response-headers entry (annotations/authreq).
_HEADER_NAME = re.compile(r"[A-Za-z0-9_-]+")

MANIFESTS: list[Manifest] = [
    doc for doc in yaml.safe_load_all(INGRESS_YAML.read_text(encoding="utf-8")) if doc
]


def _config() -> GatewayConfig:
    return load_config(GATEWAY_YAML)


def _token_headers(config: GatewayConfig) -> frozenset[str]:
    """The headers that carry a route's token and must not reach the application."""
    return frozenset().union(*(token_carriers(route).headers for route in config.routes))


def _annotations() -> dict[str, str]:
    ingress = one(MANIFESTS, "Ingress")
    annotations: dict[str, str] = ingress["metadata"]["annotations"]
    return {k.removeprefix(ANNOTATION): v for k, v in annotations.items()}


def test_the_gateway_config_is_a_forward_auth_config() -> None:
    config = _config()
    assert config.mode is GatewayMode.FORWARD_AUTH
    assert config.trusted_proxies, "forward_auth mode answers trusted callers only"
    for issuer in config.issuers.values():
        assert issuer.jwks_uri is not None
        assert issuer.jwks_uri.startswith("https://idp.example.com/")
    routes = {route.id: route for route in config.routes}
    api = routes["api"]
    assert api.match.path_prefix == "/api"
    assert api.auth is not None
    assert [h.header for h in api.claim_headers] == ["X-User-Sub", "X-User-Email"]
    assert any(r.auth is not None and r.auth.required_scopes for r in config.routes)
    assert any(r.auth is None for r in config.routes), "a public route"
    # The caller configs of this directory are written for exactly these owned headers.
    assert config.owned_headers == {
        "x-user-sub",
        "x-user-email",
        "x-scope",
        "x-gateway-auth-outcome",
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "manifest", MANIFESTS, ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_the_ingress_nginx_manifests_validate_against_the_kubernetes_schema(
    manifest: Manifest, version: str
) -> None:
    validate(manifest, version, strict=True)


def test_the_ingress_nginx_manifests_are_the_expected_kinds() -> None:
    kinds = sorted(m["kind"] for m in MANIFESTS)
    assert kinds == ["Ingress", "NetworkPolicy", "Service"]


def test_auth_response_headers_overwrite_every_owned_header_and_the_token() -> None:
    config = _config()
    listed = [name.strip() for name in _annotations()["auth-response-headers"].split(",")]
    assert all(_HEADER_NAME.fullmatch(name) for name in listed), listed
    keys = [header_key(name) for name in listed]
    assert len(keys) == len(set(keys)), f"a header is listed twice: {listed}"
    # Each listed header is copied from the decision or, when the decision lacks it, removed:
    # the owned headers (a client's copy never arrives) and the token's carriers (the token
    # stays at the edge, as forward_token: false says).
    assert set(keys) == config.owned_headers | _token_headers(config)
    assert config.owned_headers <= set(keys)


def test_the_auth_url_names_the_gateway_service_and_the_nginx_endpoint() -> None:
    config = _config()
    service = one(MANIFESTS, "Service")
    url = urlsplit(_annotations()["auth-url"])
    assert url.scheme == "http"
    assert url.path == "/auth/nginx"
    assert not url.query
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert url.hostname == f"{name}.{namespace}.svc.cluster.local"
    [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    assert port["targetPort"] == config.listen.port


def test_the_network_policy_admits_the_controller_to_the_decision_port() -> None:
    config = _config()
    policy, service = one(MANIFESTS, "NetworkPolicy"), one(MANIFESTS, "Service")
    assert policy["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= service["spec"]["selector"].items()
    ports: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            ports.setdefault(port["port"], []).extend(rule["from"])
    assert set(ports) == {config.listen.port, config.admin.port}
    [controller] = ports[config.listen.port]
    assert controller["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }


# --- nginx.conf, read as text (the integration test runs it) --------------------------------
def _directives(text: str) -> list[str]:
    """Every directive of ``text`` without comments, whitespace collapsed."""
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [" ".join(d.split()) for d in re.split(r"[;{}]", code) if d.strip()]


def test_nginx_conf_copies_every_owned_header_from_the_decision() -> None:
    config = _config()
    directives = _directives(NGINX_CONF.read_text(encoding="utf-8"))
    # auth_request_set $var $upstream_http_<name>;  for each header nginx takes from the answer
    from_answer = {}
    for directive in directives:
        match = re.fullmatch(r"auth_request_set \$(\w+) \$upstream_http_(\w+)", directive)
        if match:
            from_answer[match.group(1)] = match.group(2).replace("_", "-")
    sent: dict[str, list[str]] = {}
    for directive in directives:
        match = re.fullmatch(r"proxy_set_header (\S+) (.*)", directive)
        if match:
            sent.setdefault(header_key(match.group(1)), []).append(match.group(2))
    for header in config.owned_headers:
        values = sent.get(header, [])
        assert len(values) == 1, f"nginx.conf should set {header} once, towards the application"
        assert from_answer.get(values[0].removeprefix("$")) == header, (
            f"{header} must be copied from the decision ($upstream_http_...), not {values[0]}"
        )
    for header in _token_headers(config):
        assert sent.get(header) == ['""'], f"nginx.conf must clear {header} for the application"
    assert "underscores_in_headers off" in directives
    assert "ignore_invalid_headers on" in directives
    assert "proxy_pass http://gateway/auth/nginx" in directives
    assert "proxy_pass_request_body off" in directives
    assert sent["content-length"] == ['""'], "the auth subrequest announces no body"


def test_the_owned_headers_command_prints_what_the_callers_overwrite() -> None:
    # What an operator templating another caller config runs.
    done = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "gateway", "owned-headers", "--config", str(GATEWAY_YAML)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split()
    listed = {header_key(n) for n in _annotations()["auth-response-headers"].split(",")}
    assert set(printed) == _config().owned_headers
    assert set(printed) == listed - _token_headers(_config())
