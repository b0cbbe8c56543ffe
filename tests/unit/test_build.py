"""The build a process reports (``gateway run``'s ``event=listening build=...``, the test
run's header) is the one it imported: mypyc's extension module, or the ``.py`` source."""

from __future__ import annotations

import importlib.machinery

import gateway.server
from gateway.server import compiled


def test_the_build_reported_is_the_build_imported() -> None:
    loader = gateway.server.__loader__
    assert compiled() is isinstance(loader, importlib.machinery.ExtensionFileLoader)
