"""Policy shadowing: a route whose paths a looser route reaches through a spelling upstreams treat as the same.

The gateway matches paths exactly, but many upstream frameworks do not: they ignore a trailing
slash (Express, Spring before 6), match without regard to case (ASP.NET, IIS, Spring with
``setUseCaseSensitiveMatch(false)``) or strip a ``.json``-style suffix (Rails formats, Spring's
suffix pattern matching).  When exact ``/svc/admin/reset`` needs scope ``admin`` and prefix
``/svc`` does not, ``/svc/admin/reset/`` takes ``/svc`` here and lands on the reset handler
there: no scope needed.  ``gateway check-config`` reports each such pair, as a warning, or as an
error with ``--strict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .config import AuthMode, AuthPolicy, GatewayConfig, RouteConfig
from .errors import Rejection
from .routing import RouteTable

_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class Shadow:
    """``variant`` of ``route``'s path is taken by the looser ``by`` route."""

    route: RouteConfig
    route_index: int
    path: str  # the route's own path (or prefix)
    variant: str
    how: str  # what upstream habit makes the variant the same path
    by: RouteConfig
    by_index: int
    looser: str  # what ``by`` does not require that ``route`` does

    def describe(self) -> str:
        return (
            f"routes[{self.route_index}] ({self.route.id!r}): {self.variant} reaches "
            f"routes[{self.by_index}] ({self.by.id!r}), which {self.looser}; an upstream that "
            f"{self.how} serves it as {self.path}"
        )


def _variants(path: str, exact: bool) -> Iterator[tuple[str, str]]:
    if path != "/":
        if exact:
            if path.endswith("/"):
                yield path.rstrip("/") or "/", "ignores a trailing slash"
            else:
                yield path + "/", "ignores a trailing slash"
        yield path.rstrip("/") + _SUFFIX, "strips a format suffix such as .json"
    if path.upper() != path:
        yield path.upper(), "matches paths without regard to case"


def looser(strict: AuthPolicy | None, other: AuthPolicy | None) -> str | None:
    """What ``other`` fails to require that ``strict`` does, or ``None`` if it is as strict."""
    if strict is None:
        return None
    if other is None:
        return "is public (auth: none)"
    if strict.mode is AuthMode.REQUIRED and other.mode is not AuthMode.REQUIRED:
        return f"only has mode {other.mode.value}"
    if not {i.id for i in other.issuers} <= {i.id for i in strict.issuers}:
        return "trusts other issuers"
    if strict.audiences is not None and (
        other.audiences is None or not other.audiences <= strict.audiences
    ):
        return "accepts other audiences"
    if _scopes_looser(strict, other):
        return f"does not require the scopes {' '.join(sorted(strict.required_scopes))}"
    if not set(strict.claim_matchers) <= set(other.claim_matchers):
        return "does not check the same claims"
    if not set(strict.required_claims) <= set(other.required_claims):
        return "does not require the same claims"
    return None


def _scopes_looser(strict: AuthPolicy, other: AuthPolicy) -> bool:
    """Whether a token can meet ``other``'s scope requirement and fail ``strict``'s."""
    need, have = strict.required_scopes, other.required_scopes
    if not need:
        return False
    if not strict.scopes_any_of:  # all of ``need``: ``other`` must demand all of them too
        return other.scopes_any_of or not need <= have
    # one of ``need``: every way to meet ``other`` must include one of them
    if other.scopes_any_of:
        return not (have and have <= need)
    return not have & need


def _host_for(route: RouteConfig) -> str:
    """A host the route serves ("" when it serves any)."""
    match = route.match
    if match.hosts:
        return min(match.hosts)
    if match.host_suffixes:
        return "a" + match.host_suffixes[0]
    return ""


def find_shadows(config: GatewayConfig) -> list[Shadow]:
    """Every (route, path variant) that a looser route takes; the table's own order decides."""
    table = RouteTable(config.routes)
    index = {route.id: i for i, route in enumerate(config.routes)}
    shadows: list[Shadow] = []
    for i, route in enumerate(config.routes):
        match = route.match
        path = match.path if match.path is not None else match.path_prefix
        assert path is not None
        host = _host_for(route)
        methods = sorted(match.methods) or ["GET"]
        for variant, how in _variants(path, match.path is not None):
            for method in methods:
                try:
                    taken = table.match(method, variant, host)
                except Rejection:
                    continue
                if taken is None or taken.id == route.id:
                    continue
                why = looser(route.auth, taken.auth)
                if why is not None:
                    shadows.append(
                        Shadow(route, i, path, variant, how, taken, index[taken.id], why)
                    )
                    break
    return shadows
