"""Log output: one key=value decision line per request, and the logging set-up of the CLI."""

from __future__ import annotations

import logging
import re
import sys
from typing import Final

REQUEST_LOGGER: Final = "gateway.request"

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.:/\-+@]")


def kv(**fields: object) -> str:
    """Render fields as ``key=value`` pairs; values are made whitespace- and quote-free."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if _UNSAFE.search(text):
            text = _UNSAFE.sub("_", text)[:200]
        parts.append(f"{key}={text or '-'}")
    return " ".join(parts)


def setup_logging(level: str = "INFO") -> None:
    """Send logs to stderr, one line each, for the CLI."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would repeat our decision line without the reason.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
