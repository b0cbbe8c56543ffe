"""Build hook: with ``GATEWAY_COMPILE=1`` the request path is compiled to C by mypyc.

    GATEWAY_COMPILE=1 pip install .        # what the Dockerfile and bench/run.py build

Without it (the default, and every editable install) the package stays pure Python: the same
source, which the tests, the mutation runs and a debugger see.  The compiled build runs the
same code about 1.5 times faster (bench/run.py and bench/hotpath.py measure both; README,
Performance), and `.ci/run` runs the whole test suite against it too.
"""

from __future__ import annotations

import os

from setuptools import setup

# The modules a request runs through, from the listener to the verifier.  Modules outside the
# request path (config loading, the CLI, the admin listener, the JWKS client) stay Python: they
# gain nothing, and mypyc's rules (no monkeypatching, no subclassing of some builtins) would
# constrain them for nothing.  gateway/errors.py stays Python: ClientGone subclasses
# ConnectionError, which a compiled class cannot.
COMPILED = (
    "admission",
    "claims",
    "clock",
    "extractor",
    "gate",
    "handler",
    "headers",
    "metrics",
    "middleware",
    "proxy",
    "reasons",
    "record",
    "routing",
    "server",
    "token_cache",
    "tracing",
    "upstream",
    "verifier",
)


def ext_modules() -> list[object]:
    if os.environ.get("GATEWAY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify([f"gateway/{name}.py" for name in COMPILED], opt_level="3"))


setup(ext_modules=ext_modules())
