"""deploy/k8s: every manifest validates offline against the Kubernetes JSON schemas, and the
rendered kustomization is wired together (probes, ports, grace period, config, selectors)."""

from __future__ import annotations

import ipaddress
from typing import Any

import jsonschema
import pytest
from kubernetes_validate import latest_version, validate

from gateway import loads_config
from gateway.config import GatewayConfig
from tests.deploy.support import K8S, Manifest, one, render_kustomization

# The oldest Kubernetes minor the manifests target, and the newest whose schemas are bundled.
K8S_VERSIONS = ("1.29", latest_version())
MANIFESTS = render_kustomization()
CORE_KINDS = {
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
}
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")

# The ServiceMonitor is a CRD, so kubernetes-validate has no schema for it. This is the part of
# the Prometheus Operator's CRD schema that our manifest uses, closed to unknown fields so a typo
# (`endpoint`, `matchlabels`) fails here instead of being pruned silently by the API server.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^([0-9]+(ms|s|m|h))+$",
                            },
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def _kind(manifest: Manifest) -> tuple[str, str]:
    return manifest["apiVersion"], manifest["kind"]


def _container(deployment: Manifest) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, f"no containerPort named {name!r}: {sorted(ports)}"
    port: int = ports[name]
    return port


def _gateway_config() -> GatewayConfig:
    data = one(MANIFESTS, "ConfigMap")["data"]
    return loads_config(data["gateway.yaml"], base_dir=K8S)


def _duration_s(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(value[:-1]) * units[value[-1]]


def test_the_kustomization_renders_every_expected_kind() -> None:
    kinds = {_kind(m) for m in MANIFESTS}
    assert kinds == {*CORE_KINDS, SERVICE_MONITOR}
    assert len(MANIFESTS) == len(kinds), "one manifest of each kind"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "manifest",
    [m for m in MANIFESTS if _kind(m) in CORE_KINDS],
    ids=lambda m: f"{m['kind']}/{m['metadata']['name']}",
)
def test_core_manifests_validate_against_the_kubernetes_schema(
    manifest: Manifest, version: str
) -> None:
    # strict: the schemas refuse unknown fields (a misspelt key fails instead of being dropped).
    validate(manifest, version, strict=True)


def test_the_service_monitor_has_the_operator_crd_shape() -> None:
    jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(
        one(MANIFESTS, "ServiceMonitor")
    )


def test_the_service_monitor_selects_the_admin_port_of_the_gateway_service() -> None:
    monitor, service = one(MANIFESTS, "ServiceMonitor"), one(MANIFESTS, "Service")
    container = _container(one(MANIFESTS, "Deployment"))
    config = _gateway_config()
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert _duration_s(endpoint["scrapeTimeout"]) <= _duration_s(endpoint["interval"])
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert endpoint["port"] in service_ports, "a ServiceMonitor names a Service port by name"
    admin = service_ports[endpoint["port"]]
    # The Service port forwards to the container port that the gateway's admin listener binds.
    assert _container_port(container, admin["targetPort"]) == config.admin.port
    assert endpoint["port"] == "admin"


def test_the_probes_hit_the_admin_listener_named_in_the_service() -> None:
    deployment, service = one(MANIFESTS, "Deployment"), one(MANIFESTS, "Service")
    container = _container(deployment)
    config = _gateway_config()
    admin_target = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["admin"]
    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == admin_target, f"{probe} must use the Service's admin port"
    assert _container_port(container, admin_target) == config.admin.port
    # The kubelet probes the pod IP: the admin listener must not be bound to loopback only.
    assert ipaddress.ip_address(config.admin.host).is_unspecified
    http_target = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["http"]
    assert _container_port(container, http_target) == config.listen.port


def test_the_grace_period_outlasts_pre_stop_and_the_drain() -> None:
    pod = one(MANIFESTS, "Deployment")["spec"]["template"]["spec"]
    pre_stop = _container(one(MANIFESTS, "Deployment"))["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        assert len(command) == 2, command
        sleep_s = float(command[1])
    shutdown_s = _gateway_config().listen.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > sleep_s + shutdown_s


def test_the_config_map_is_a_valid_gateway_config_mounted_where_the_container_reads_it() -> None:
    deployment, config_map = one(MANIFESTS, "Deployment"), one(MANIFESTS, "ConfigMap")
    config = _gateway_config()
    assert config.routes, "the deployed config serves routes"
    container = _container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    [mount] = [
        m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]
    ]  # the config volume
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mount["readOnly"] is True
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    directory, _, key = config_path.rpartition("/")
    assert directory == mount["mountPath"].rstrip("/")
    assert key in config_map["data"]


def test_the_pod_runs_locked_down() -> None:
    deployment = one(MANIFESTS, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_selectors_hpa_and_pdb_agree_with_the_pods() -> None:
    deployment = one(MANIFESTS, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service, pdb, hpa = (
        one(MANIFESTS, k) for k in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler")
    )
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    # A voluntary eviction (node drain) must always leave a serving pod.
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    # CPU utilization targets need a CPU request to be computed against.
    assert "cpu" in _container(deployment)["resources"]["requests"]
