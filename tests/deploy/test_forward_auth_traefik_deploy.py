"""deploy/forward-auth/traefik-middleware.yaml: the Middlewares validate offline against the part
of Traefik's CRD schema they use, and they are wired to the gateway config beside them: the
ForwardAuth asks the gateway's /auth/traefik, never trusts a client's X-Forwarded-*, and lists
EVERY owned header of gateway.yaml in authResponseHeaders (Traefik deletes each listed header
from the request before copying it from the answer, so that list is what blocks spoofing)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway import load_config
from gateway.config import GatewayConfig, TokenLocation
from tests.deploy.support import DEPLOY

FORWARD_AUTH = DEPLOY / "forward-auth"
MIDDLEWARE_YAML = FORWARD_AUTH / "traefik-middleware.yaml"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"

# Only letters, digits and dashes: any other character makes an alias at CGI/WSGI upstreams.
_HEADER_NAME = {"type": "string", "pattern": "^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$"}
_HEADER_LIST = {"type": "array", "minItems": 1, "uniqueItems": True, "items": _HEADER_NAME}
_DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# traefik.io/v1alpha1 Middleware is a CRD, so kubernetes-validate has no schema for it. This is
# the part of Traefik's CRD schema (middlewares.traefik.io) the file uses, closed to unknown
# fields so that a typo (`authResponseHeader`, `trustForwardHeaders`) fails here instead of
# being pruned silently by the API server (which would drop the anti-spoofing list).
MIDDLEWARE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "traefik.io/v1alpha1"},
        "kind": {"const": "Middleware"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": _DNS_LABEL},
                "namespace": {"type": "string", "pattern": _DNS_LABEL},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
            "properties": {
                "forwardAuth": {
                    "type": "object",
                    "required": ["address", "authResponseHeaders", "trustForwardHeader"],
                    "additionalProperties": False,
                    "properties": {
                        "address": {"type": "string", "pattern": "^https?://[^/]+/"},
                        "trustForwardHeader": {"type": "boolean"},
                        "maxResponseBodySize": {"type": "integer", "minimum": 1},
                        "authRequestHeaders": _HEADER_LIST,
                        "authResponseHeaders": _HEADER_LIST,
                    },
                },
                "headers": {
                    "type": "object",
                    "required": ["customRequestHeaders"],
                    "additionalProperties": False,
                    "properties": {
                        "customRequestHeaders": {
                            "type": "object",
                            "propertyNames": _HEADER_NAME,
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "chain": {
                    "type": "object",
                    "required": ["middlewares"],
                    "additionalProperties": False,
                    "properties": {
                        "middlewares": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string", "pattern": _DNS_LABEL},
                                    "namespace": {"type": "string", "pattern": _DNS_LABEL},
                                },
                            },
                        }
                    },
                },
            },
        },
    },
}

Manifest = dict[str, Any]


def _manifests() -> list[Manifest]:
    text = MIDDLEWARE_YAML.read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _by_name() -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in _manifests()}


def _forward_auth() -> dict[str, Any]:
    (found,) = [m["spec"]["forwardAuth"] for m in _manifests() if "forwardAuth" in m["spec"]]
    config: dict[str, Any] = found
    return config


def _gateway() -> GatewayConfig:
    return load_config(GATEWAY_YAML)


@pytest.mark.parametrize("index", range(len(_manifests())))
def test_each_middleware_matches_the_crd_schema(index: int) -> None:
    jsonschema.validate(_manifests()[index], MIDDLEWARE_SCHEMA)


def test_names_are_unique() -> None:
    names = [m["metadata"]["name"] for m in _manifests()]
    assert len(names) == len(set(names))


def test_auth_response_headers_are_exactly_the_owned_headers() -> None:
    listed = _forward_auth()["authResponseHeaders"]
    assert {name.lower() for name in listed} == set(_gateway().owned_headers)
    assert len({name.lower() for name in listed}) == len(listed)


def test_client_forwarded_headers_are_never_trusted() -> None:
    assert _forward_auth()["trustForwardHeader"] is False


def test_the_address_is_the_gateways_traefik_endpoint() -> None:
    address = urlsplit(_forward_auth()["address"])
    assert address.scheme == "http"
    assert address.path == "/auth/traefik"
    assert not address.query
    assert not address.fragment
    assert address.port == _gateway().listen.port
    host = address.hostname or ""
    service, namespace, *rest = host.split(".")
    assert service == "gateway-forward-auth"
    assert rest == ["svc", "cluster", "local"], host
    assert namespace


def test_the_check_carries_every_header_a_route_reads_its_token_from() -> None:
    sent = {name.lower() for name in _forward_auth().get("authRequestHeaders", [])}
    if not sent:
        return  # without the list, Traefik sends every client header
    wanted = {"authorization"}
    for route in _gateway().routes:
        for source in route.auth.token_sources if route.auth else ():
            if source.location is TokenLocation.HEADER:
                wanted.add(source.name.lower())
            elif source.location is TokenLocation.COOKIE:
                wanted.add("cookie")
    assert wanted <= sent
    # Owned headers never go to the gateway: it must not judge what a client claims to be.
    assert not sent & set(_gateway().owned_headers)


def test_the_chain_decides_first_then_drops_the_token() -> None:
    by_name = _by_name()
    chains = [m for m in by_name.values() if "chain" in m["spec"]]
    (chain,) = chains
    steps = [by_name[ref["name"]]["spec"] for ref in chain["spec"]["chain"]["middlewares"]]
    assert [next(iter(step)) for step in steps] == ["forwardAuth", "headers"]
    assert steps[1]["headers"]["customRequestHeaders"] == {"Authorization": ""}
