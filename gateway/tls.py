"""TLS both ways: the listener's server context (reloadable certificate, optional client
certificates) and the client context of each https upstream.

Both refuse anything older than TLS 1.2.  The listener's certificate and key are re-read on
SIGHUP and when either file changes; the context object stays the same, so new handshakes get
the new certificate while established connections keep theirs, and no listener restarts.
"""

from __future__ import annotations

import logging
import ssl

from .config import ClientCertMode, ListenTls, UpstreamTls, file_signature
from .logs import kv

log = logging.getLogger(__name__)

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class ServerTls:
    """The listener's TLS context and the files it was loaded from."""

    def __init__(self, settings: ListenTls) -> None:
        self.settings = settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[settings.min_version]
        context.options |= ssl.OP_NO_COMPRESSION
        context.set_alpn_protocols(["http/1.1"])
        if settings.client_ca_file is not None:
            context.load_verify_locations(cafile=str(settings.client_ca_file))
            context.verify_mode = (
                ssl.CERT_REQUIRED
                if settings.client_cert is ClientCertMode.REQUIRED
                else ssl.CERT_OPTIONAL
            )
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        self.context = context
        self._signature = self._files_signature()

    def _files_signature(self) -> tuple[tuple[int, int] | None, ...]:
        return (file_signature(self.settings.cert_file), file_signature(self.settings.key_file))

    def changed(self) -> bool:
        """Whether the certificate or key file changed since it was last loaded."""
        return self._files_signature() != self._signature

    def reload(self, settings: ListenTls | None = None) -> bool:
        """Load the certificate and key again (from ``settings``' files when given: a config
        reload may name new ones).  A pair that does not load is logged and the old one kept."""
        settings = settings if settings is not None else self.settings
        signature = self._files_signature()
        try:
            self.context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as exc:
            log.error(kv(event="tls_reload", result="failure", file=str(settings.cert_file),
                         error=type(exc).__name__))  # fmt: skip
            return False
        self.settings = settings
        self._signature = signature
        log.info(kv(event="tls_reload", result="success", file=str(settings.cert_file)))
        return True


def client_tls_context(tls: UpstreamTls | None) -> ssl.SSLContext:
    """The TLS client context of an https upstream: TLS 1.2 or newer, the chain and name
    verified (against ``ca_file`` when given, else the system store) unless ``verify: false``,
    and a client certificate for mutual TLS when configured."""
    tls = tls if tls is not None else UpstreamTls()
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file is not None else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context
