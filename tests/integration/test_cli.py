"""The command line, run as a real subprocess: check-config, run and demo."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
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
    ports = {name: free_port() for name in names}
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


def parse_curls(lines: list[str]) -> dict[str, list[tuple[str | None, str]]]:
    """Map each numbered heading ('1', '2', ...; 'admin' for the last) to its (token, url) pairs."""
    out: dict[str, list[tuple[str | None, str]]] = {}
    heading = ""
    for line in lines:
        if line.startswith("# "):
            number = re.match(r"# (\d+)\.", line)
            heading = number.group(1) if number else "admin"
        elif line.startswith("curl"):
            tok = re.search(r"Authorization: Bearer ([A-Za-z0-9_.-]+)'", line)
            url = re.search(r"(http://\S+)", line)
            assert url is not None, line
            out.setdefault(heading, []).append((tok.group(1) if tok else None, url.group(1)))
    return out


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
        assert "gateway demo is running. Try:" in lines
        curls = parse_curls(lines)
        base = f"http://127.0.0.1:{ports['port']}"
        (valid, valid_url), (spoof_token, spoof_url) = curls["1"][0], curls["2"][0]
        (expired, expired_url), (forged, forged_url) = curls["3"][0], curls["4"][0]
        assert valid
        assert expired
        assert forged
        assert spoof_token == valid
        assert valid_url == f"{base}/api/orders/42"
        assert {u for _, u in curls["5"]} == {f"{base}/api/orders/42", f"{base}/status"}
        assert [u for _, u in curls["admin"]] == [
            f"http://127.0.0.1:{ports['admin_port']}/metrics",
            f"http://127.0.0.1:{ports['admin_port']}/readyz",
        ]

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def get(url: str, tok: str | None = None, **headers: str) -> tuple[int, Any]:
                if tok:
                    headers["Authorization"] = f"Bearer {tok}"
                async with http.get(url, headers=headers) as response:
                    return response.status, await response.json()

            status, body = await get(valid_url, valid)
            assert status == 200, body
            assert body["headers"]["X-User-Sub"] == "alice"
            assert body["headers"]["X-User-Email"] == "alice@example.com"
            assert body["headers"]["X-Tenant-Id"] == "acme"
            assert "Authorization" not in body["headers"]

            status, body = await get(spoof_url, valid, **{"X-User-Sub": "root"})
            assert (status, body["headers"]["X-User-Sub"]) == (200, "alice")

            status, body = await get(expired_url, expired)
            assert (status, body["error"]["reason"]) == (401, "token_expired")
            status, body = await get(forged_url, forged)
            assert (status, body["error"]["reason"]) == (401, "signature_invalid")
            status, body = await get(f"{base}/api/orders/42")
            assert (status, body["error"]["reason"]) == (401, "token_missing")
            status, body = await get(f"{base}/status")
            assert (status, body["path"]) == (200, "/status")
            status, body = await get(f"http://127.0.0.1:{ports['admin_port']}/readyz")
            assert (status, body["status"]) == (200, "ready")
            async with http.get(f"http://127.0.0.1:{ports['admin_port']}/metrics") as response:
                metrics = await response.text()
            assert 'gateway_requests_total{reason="ok",route="orders"} 2.0' in metrics

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
