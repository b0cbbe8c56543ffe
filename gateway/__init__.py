"""gateway: an asyncio verifying reverse proxy for JWT bearer tokens."""

from __future__ import annotations

from .admin import create_admin_app
from .app import create_app
from .config import GatewayConfig, load_config, loads_config
from .errors import ConfigError, GatewayError, Rejection
from .reasons import REASON_SPECS, Reason
from .server import compiled

__version__ = "0.1.0"


__all__ = [
    "REASON_SPECS",
    "ConfigError",
    "GatewayConfig",
    "GatewayError",
    "Reason",
    "Rejection",
    "__version__",
    "compiled",
    "create_admin_app",
    "create_app",
    "load_config",
    "loads_config",
]
