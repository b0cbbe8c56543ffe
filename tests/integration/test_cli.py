"""The command line, run as a real subprocess: check-config, run and demo."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from gateway.demo import demo_config as load_demo_config
from tests.integration.e2e_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted(
    {
        *ROOT.glob("config/**/*.yaml"),
        *ROOT.glob("config/**/*.yml"),
        *ROOT.glob("deploy/**/gateway.yaml"),
    }
)
BAD_CONFIG = """\
issuers:
  corp:
    issuer: https://corp.example
    jwks_uri: https://corp.example/jwks.json
    algorithms: [RS256]
routes:
  - id: orders
    match: {path_prefix: /orders}
    upstream: http://127.0.0.1:9000
    auth:
      issuers: [crop]
      audiences: [orders]
"""
BAD_MESSAGE = "routes[0].auth.issuers[0]: unknown issuer 'crop'; expected one of: corp"


def gateway_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_shipped_configs_exist():
    assert any(p.parent.name == "config" for p in SHIPPED_CONFIGS)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_check_config_accepts_every_shipped_config(path):
    result = gateway_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    mode = "forward_auth" if path.parent.name == "forward-auth" else "proxy"
    assert re.fullmatch(
        rf"{re.escape(str(path))}: ok \(\d+ routes, \d+ issuers, mode {mode}\)\n", result.stdout
    )


def test_owned_headers_prints_what_a_forward_auth_caller_must_overwrite(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "mode: forward_auth\ntrusted_proxies: [10.0.0.0/8]\n"
        "issuers: {corp: {issuer: 'https://idp.example.com', algorithms: [RS256]}}\n"
        "routes:\n"
        "- {id: a, match: {path_prefix: /a}, auth: {issuers: [corp], audiences: [x]},\n"
        "   claim_headers: {X-User-Sub: sub, X_Tenant: tid}, payload_header: X-Claims}\n"
        "- {id: b, match: {path_prefix: /b}, auth: none}\n"
    )
    result = gateway_cli("owned-headers", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "x-claims", "x-gateway-auth-outcome", "x-tenant", "x-user-sub"
    ]  # fmt: skip


def test_check_config_rejects_a_bad_file_naming_the_yaml_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = gateway_cli("check-config", str(bad))
    assert result.returncode == 1
    assert result.stderr == f"{bad}: {BAD_MESSAGE}\n"
    assert result.stdout == ""


def test_run_with_a_bad_config_exits_1_with_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = gateway_cli("run", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}: {BAD_MESSAGE}" in result.stderr.splitlines()


# --- the demo ------------------------------------------------------------------------------
def demo_config(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """gateway/demo.yaml with its four ports moved to free loopback ports.

    ``ports`` also holds two more free ports, ``port`` and ``admin_port``, for ``--port`` and
    ``--admin-port``: a demo that ignored them would listen on ``listen`` and ``admin`` instead.
    """
    doc: dict[str, Any] = yaml.safe_load((ROOT / "gateway" / "demo.yaml").read_text())
    names = ("listen", "admin", "idp", "upstream", "port", "admin_port")
    # A port freed by one free_port() call may be handed out again by the next: draw until
    # the six differ (bounded: a collision is rare).
    for _ in range(20):
        ports = {name: free_port() for name in names}
        if len(set(ports.values())) == len(names):
            break
    assert len(set(ports.values())) == len(names), ports
    doc["listen"]["port"] = ports["listen"]
    doc["admin"]["port"] = ports["admin"]
    issuer = doc["issuers"]["demo"]
    issuer["issuer"] = f"http://127.0.0.1:{ports['idp']}"
    issuer["jwks_uri"] = f"http://127.0.0.1:{ports['idp']}/.well-known/jwks.json"
    for route in doc["routes"]:
        route["upstream"] = f"http://127.0.0.1:{ports['upstream']}"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, ports


def test_the_packaged_demo_config_is_the_one_in_config():
    # README: `config/demo.yaml` is what `gateway demo` runs (the packaged copy is what it reads).
    assert (ROOT / "gateway" / "demo.yaml").read_bytes() == (
        ROOT / "config" / "demo.yaml"
    ).read_bytes()


def test_demo_ports_default_to_the_demo_config_and_flags_override_them():
    packaged = load_demo_config(None)
    assert (packaged.listen.port, packaged.admin.port) == (8080, 9100)  # what the README names
    moved = load_demo_config(None, port=18080, admin_port=19100)
    assert (moved.listen.port, moved.admin.port) == (18080, 19100)
    assert moved.listen.host == moved.admin.host == "127.0.0.1"
    assert moved.issuers == packaged.issuers
    assert moved.routes == packaged.routes


@pytest.mark.parametrize("flag", ["--port", "--admin-port"])
@pytest.mark.parametrize("value", ["0", "65536", "http"])
def test_demo_refuses_a_port_it_could_not_print(flag: str, value: str):
    result = gateway_cli("demo", flag, value)
    assert result.returncode == 2
    assert f"argument {flag}: expected" in result.stderr


def test_demo_keeps_its_token_minting_identity_provider_on_loopback(tmp_path):
    # /token hands a valid token to anyone who asks: a config that would serve it elsewhere is refused.
    path, _ = demo_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    # The config allows any issuer string once jwks_uri (loopback here) says where the keys are;
    # TEST-NET-1 is never this host's address, so nothing is served if the check is missing.
    doc["issuers"]["demo"]["issuer"] = "http://192.0.2.1:9400"
    path.write_text(yaml.safe_dump(doc))
    result = gateway_cli("demo", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "listens on loopback only" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_names_a_busy_port_and_the_flag_that_moves_it(tmp_path):
    path, ports = demo_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = gateway_cli("demo", "--config", str(path), "--port", str(taken))
    assert result.returncode == 1, result.stderr
    assert f"('127.0.0.1', {taken}): address already in use" in result.stderr
    assert f"the demo listens on {taken} (gateway), {ports['admin']} (admin)" in result.stderr
    assert "--port and --admin-port move the first two" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_names_the_yaml_path_of_a_bad_config(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text(BAD_CONFIG)
    result = gateway_cli("demo", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}: {BAD_MESSAGE}" in result.stderr.splitlines()


async def read_instructions(process: asyncio.subprocess.Process, deadline: float) -> list[str]:
    """The demo's printed lines up to 'Ctrl-C stops the demo.', within ``deadline``."""
    assert process.stdout is not None
    lines: list[str] = []
    while not lines or lines[-1] != "Ctrl-C stops the demo.":
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no complete instructions in time; got {lines}"
        raw = await asyncio.wait_for(process.stdout.readline(), remaining)
        assert raw, f"demo exited early (code {process.returncode}); got {lines}"
        lines.append(raw.decode().rstrip("\n"))
    return lines


@dataclasses.dataclass
class Answer:
    """What one printed ``curl`` got: status, body (JSON when it is JSON) and, after a ``|``,
    the lines the printed filter let through."""

    url: str
    status: int
    body: Any
    filtered: list[str] | None = None


ASSIGN = re.compile(r"([A-Z]+)=\$\(curl -s (\S+)\)")


async def run_printed(
    lines: list[str], http: aiohttp.ClientSession
) -> tuple[dict[str, str], dict[str, list[Answer]]]:
    """Run the demo's printed commands as a shell would, in order: ``NAME=$(curl -s URL)`` sets
    a variable; ``curl [-s|-si] [-H 'Name: value']... URL [| filter]`` is sent with ``$NAME``
    expanded, and its filter (a ``grep``) runs for real on the body.  Any other line fails.

    Returns the variables and, for each numbered heading ('1', '2', ...; 'admin' for the last),
    the answers of its curls.
    """
    variables: dict[str, str] = {}
    answers: dict[str, list[Answer]] = {}
    heading = ""
    body_lines = lines[lines.index("gateway demo is running. Try:") + 1 : -1]
    for line in body_lines:
        if not line:
            continue
        if line.startswith("# "):
            number = re.match(r"# (\d+)\.", line)
            heading = number.group(1) if number else "admin"
            continue
        if assign := ASSIGN.fullmatch(line):
            (url,) = shlex.split(assign.group(2))
            async with http.get(url) as response:
                assert response.status == 200, (line, await response.text())
                variables[assign.group(1)] = (await response.text()).rstrip("\n")
            continue
        command, bar, filter_command = line.partition(" | ")
        words = shlex.split(re.sub(r"\$([A-Z]+)", lambda m: variables[m.group(1)], command))
        assert words[0] == "curl", line
        headers: dict[str, str] = {}
        urls: list[str] = []
        rest = iter(words[1:])
        for word in rest:
            if word == "-H":
                name, _, value = next(rest).partition(":")
                headers[name] = value.strip()
            elif word.startswith("http://"):
                urls.append(word)
            else:
                assert word in ("-s", "-si"), (word, line)
        (url,) = urls
        async with http.get(url, headers=headers) as response:
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else text
            answer = Answer(url, response.status, body)
        if bar:
            grep = await asyncio.create_subprocess_exec(
                *shlex.split(filter_command),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(grep.communicate(text.encode()), 10)
            assert grep.returncode == 0, (filter_command, err)
            answer.filtered = out.decode().splitlines()
        answers.setdefault(heading, []).append(answer)
    return variables, answers


async def test_demo_prints_working_curls_and_stops_cleanly_on_sigint(tmp_path):
    # --port and --admin-port move the gateway and the admin listener off the config's ports.
    config, ports = demo_config(tmp_path)
    stderr_path = tmp_path / "demo.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--config",
            str(config),
            "--port",
            str(ports["port"]),
            "--admin-port",
            str(ports["admin_port"]),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        lines = await read_instructions(process, time.monotonic() + 20)
        printed = "\n".join(lines)
        # No token is printed: each comes from the demo IdP when its command runs, so the
        # commands keep working for as long as the demo runs.
        assert "eyJ" not in printed
        base = f"http://127.0.0.1:{ports['port']}"
        admin = f"http://127.0.0.1:{ports['admin_port']}"
        token_url = f"http://127.0.0.1:{ports['idp']}/token"
        assert f"TOKEN=$(curl -s {token_url})" in lines
        assert f":{ports['listen']}" not in printed
        assert f":{ports['admin']}" not in printed

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            variables, answers = await run_printed(lines, http)
            assert set(variables) == {"TOKEN", "EXPIRED", "FORGED"}
            assert len(set(variables.values())) == 3

            (valid,) = answers["1"]
            assert (valid.url, valid.status) == (f"{base}/api/orders/42", 200), valid.body
            assert valid.body["headers"]["X-User-Sub"] == "alice"
            assert valid.body["headers"]["X-User-Email"] == "alice@example.com"
            assert valid.body["headers"]["X-Tenant-Id"] == "acme"
            assert "Authorization" not in valid.body["headers"]
            (spoofed,) = answers["2"]
            assert (spoofed.status, spoofed.body["headers"]["X-User-Sub"]) == (200, "alice")
            assert [(a.status, a.body["error"]["reason"]) for a in answers["3"]] == [
                (401, "token_expired")
            ]
            assert [(a.status, a.body["error"]["reason"]) for a in answers["4"]] == [
                (401, "signature_invalid")
            ]
            missing, public = answers["5"]
            assert (missing.url, missing.status) == (f"{base}/api/orders/42", 401)
            assert missing.body["error"]["reason"] == "token_missing"
            assert (public.url, public.status, public.body["path"]) == (
                f"{base}/status",
                200,
                "/status",
            )

            # The metrics example shows the few lines worth reading: the requests the tries made,
            # the key set's age, readiness.
            metrics, ready = answers["admin"]
            assert (metrics.url, metrics.status) == (f"{admin}/metrics", 200)
            assert metrics.filtered is not None
            assert len(metrics.filtered) == 7, metrics.filtered
            assert set(metrics.filtered[:-2]) == {
                'gateway_requests_total{reason="ok",route="orders"} 2.0',
                'gateway_requests_total{reason="token_expired",route="orders"} 1.0',
                'gateway_requests_total{reason="signature_invalid",route="orders"} 1.0',
                'gateway_requests_total{reason="token_missing",route="orders"} 1.0',
                'gateway_requests_total{reason="ok",route="status"} 1.0',
            }
            assert re.fullmatch(
                r'gateway_jwks_age_seconds\{issuer="demo"\} \d+\.\d+(e-\d+)?', metrics.filtered[-2]
            )
            assert metrics.filtered[-1] == "gateway_ready 1.0"
            assert (ready.url, ready.status, ready.body["status"]) == (
                f"{admin}/readyz",
                200,
                "ready",
            )

            # /token mints a fresh, short-lived token on every call; each gets through the gateway.
            async def mint(kind: str | None = None) -> str:
                async with http.get(token_url, params={"kind": kind} if kind else None) as response:
                    assert response.status == 200
                    assert response.headers["Cache-Control"] == "no-store"
                    return await response.text()

            first, second = await mint(), await mint()
            assert first != second
            now = time.time()
            for token in (first, second):
                claims = jwt.decode(token, options={"verify_signature": False})
                assert 300 <= claims["exp"] - claims["iat"] <= 900
                assert claims["exp"] > now + 300
                assert {k: claims[k] for k in ("sub", "aud", "scope", "email", "org")} == {
                    "sub": "alice", "aud": "orders-api", "scope": "orders:read",
                    "email": "alice@example.com", "org": {"tenant_id": "acme"},
                }  # fmt: skip
                headers = {"Authorization": f"Bearer {token}"}
                async with http.get(f"{base}/api/orders/7", headers=headers) as response:
                    assert response.status == 200, await response.text()
            assert await mint("expired") != variables["EXPIRED"]
            async with http.get(token_url, params={"kind": "admin"}) as response:
                assert response.status == 400
                assert "expected one of: valid, expired, forged" in await response.text()

        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
        assert code == 0, stderr_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 5)


SHADOWED = """\
issuers:
  corp: {issuer: "https://idp.example.com", algorithms: [RS256]}
routes:
  - id: admin_reset
    match: {path: /svc/admin/reset}
    upstream: http://svc:8080
    auth: {issuers: [corp], audiences: [svc], required_scopes: [admin]}
  - id: svc
    match: {path_prefix: /svc}
    upstream: http://svc:8080
    auth: {issuers: [corp], audiences: [svc]}
"""


def test_check_config_warns_about_policy_shadowing_and_strict_makes_it_an_error(tmp_path):
    path = tmp_path / "shadowed.yaml"
    path.write_text(SHADOWED)
    warned = gateway_cli("check-config", str(path))
    assert warned.returncode == 0
    assert warned.stdout.startswith(f"{path}: ok")
    assert (
        f"{path}: warning: routes[0] ('admin_reset'): /svc/admin/reset/ reaches routes[1] "
        "('svc'), which does not require the scopes admin; an upstream that ignores a trailing "
        "slash serves it as /svc/admin/reset\n"
    ) in warned.stderr
    assert "/svc/admin/reset.json reaches routes[1]" in warned.stderr
    strict = gateway_cli("check-config", "--strict", str(path))
    assert strict.returncode == 1
    assert strict.stdout == ""
    assert f"{path}: error: routes[0] ('admin_reset'): /svc/admin/reset/" in strict.stderr


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_have_no_policy_shadowing(path):
    result = gateway_cli("check-config", "--strict", str(path))
    assert result.returncode == 0, result.stderr


def test_gateway_run_logs_policy_shadowing_at_start(caplog):
    from gateway import loads_config
    from gateway.cli import log_policy_shadowing

    caplog.set_level("WARNING", logger="gateway.cli")
    assert log_policy_shadowing(loads_config(SHADOWED)) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all(line.startswith("event=policy_shadowing problem=routes[0]") for line in lines)


def test_schema_prints_the_shipped_json_schema_and_the_reference_table():
    from importlib import resources

    printed = gateway_cli("schema")
    assert printed.returncode == 0, printed.stderr
    # The installed package carries the same file editors are pointed at.
    shipped = resources.files("gateway").joinpath("config.schema.json").read_text("utf-8")
    assert printed.stdout == shipped
    schema = json.loads(printed.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "routes" in schema["required"]

    table = gateway_cli("schema", "--markdown")
    assert table.returncode == 0, table.stderr
    assert "| `routes[].auth.audiences` | required |" in table.stdout
    assert table.stdout.strip() in (ROOT / "README.md").read_text("utf-8")
