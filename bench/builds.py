"""Which build of the gateway a benchmark runs: compiled by mypyc, or the pure-Python source.

The compiled build is what the Dockerfile ships (``GATEWAY_COMPILE=1 pip install .``, see
setup.py).  It is built here the same way, with ``pip install --no-deps --target`` into
bench/.cache/compiled/<digest of the sources>, once per source change (~2 min), and run with
``python -P -m gateway`` and that directory on ``PYTHONPATH``: ``-P`` keeps the source tree
(the working directory) off the front of ``sys.path``, so the compiled modules are the ones
imported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache" / "compiled"

COMPILED = "compiled"
PYTHON = "python"
CHOICES = (COMPILED, PYTHON)


def _digest() -> str:
    sources = [ROOT / "setup.py", ROOT / "pyproject.toml", *sorted((ROOT / "gateway").iterdir())]
    digest = hashlib.sha256()
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def compiled_tree(log: Callable[[str], None] = print) -> Path:
    """The directory holding the compiled build of the current sources (built if missing)."""
    target = CACHE / _digest()
    if (target / "gateway").is_dir():
        return target
    log(f"building the gateway with mypyc (GATEWAY_COMPILE=1, ~2 min) into {target}")
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    subprocess.run(  # noqa: S603 - our own argv
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(scratch), "."],
        cwd=ROOT,
        env={**os.environ, "GATEWAY_COMPILE": "1"},
        check=True,
    )
    for old in CACHE.iterdir():  # one build kept: the sources' current one
        if old != scratch:
            shutil.rmtree(old, ignore_errors=True)
    scratch.rename(target)
    return target


def use(build: str, log: Callable[[str], None] = print) -> tuple[list[str], str]:
    """Make ``build`` the one imported by this process and the gateways it starts; the argv
    prefix that starts such a gateway, and a label for the results."""
    if build == PYTHON:
        return [sys.executable, "-m", "gateway"], "pure Python (the source tree)"
    tree = compiled_tree(log)
    sys.path.insert(0, str(tree))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree) + (os.pathsep + previous if previous else "")
    return [sys.executable, "-P", "-m", "gateway"], "compiled by mypyc (GATEWAY_COMPILE=1)"
