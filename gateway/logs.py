"""Log output: key=value (logfmt) or JSON lines, one decision line per request, and the CLI's set-up."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final

REQUEST_LOGGER: Final = "gateway.request"

# Whitespace, quotes, backslashes and controls become "_": every field stays one
# whitespace-free token, so a client-chosen value can never forge another field
# or line for whitespace-splitting tools (Envoy's response-details rationale).
_UNSAFE: Final = re.compile(r"[\s\"\\\x00-\x1f\x7f]")
_MAX_VALUE: Final = 300


class KV(str):
    """A log message in logfmt that also carries its fields, for the JSON formatter."""

    fields: dict[str, Any]


def kv(**fields: object) -> KV:
    """Render fields as ``key=value`` pairs (logfmt without quoting); ``None`` values are left out.
    The message also carries the raw fields, which the JSON formatter writes as they are."""
    kept: dict[str, Any] = {}
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)[:_MAX_VALUE]
        kept[key] = value if isinstance(value, int | float | bool) else text
        parts.append(f"{key}={_UNSAFE.sub('_', text) or '-'}")
    message = KV(" ".join(parts))
    message.fields = kept
    return message


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then the message's fields (or its text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, KV) and not record.args:
            entry.update(record.msg.fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr, one line each: ``text`` (logfmt after a timestamp) or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would repeat our decision line without the reason.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
