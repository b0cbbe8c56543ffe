"""Node.js programs the end-to-end tests run, each pinned by its folder's package-lock.json."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NPM_CI_TIMEOUT_S = 180.0


def installed(folder: Path, package: str) -> Path:
    """``folder`` with its node_modules installed (``npm ci`` once if ``package`` is missing)."""
    if (folder / "node_modules" / package / "package.json").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"node is installed but npm is not: cannot run 'npm ci' in {folder}")
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"'npm ci' in {folder} took over {NPM_CI_TIMEOUT_S:g}s")
    if done.returncode != 0:
        pytest.fail(f"'npm ci' in {folder} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return folder
