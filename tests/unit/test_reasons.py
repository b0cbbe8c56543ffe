"""The reason vocabulary: complete, stable names, and RFC 6750 challenges derived from it."""

from __future__ import annotations

import re

import pytest

from gateway.reasons import REASON_SPECS, Outcome, Reason, www_authenticate

ALL_REASONS = list(Reason)
REJECTION_401 = [r for r in Reason if REASON_SPECS[r].status == 401]


def test_every_reason_has_exactly_one_spec() -> None:
    assert set(REASON_SPECS) == set(Reason)
    assert len(REASON_SPECS) == len(Reason)


def test_reason_values_are_unique_snake_case() -> None:
    values = [r.value for r in Reason]
    assert len(values) == len(set(values))
    for value in values:
        assert re.fullmatch(r"[a-z_]+", value), value


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        (Reason.OK, "ok"),
        (Reason.TOKEN_MISSING, "token_missing"),
        (Reason.INVALID_REQUEST, "invalid_request"),
        (Reason.TOKEN_EXPIRED, "token_expired"),
        (Reason.SIGNATURE_INVALID, "signature_invalid"),
        (Reason.INSUFFICIENT_SCOPE, "insufficient_scope"),
        (Reason.JWKS_UNAVAILABLE, "jwks_unavailable"),
    ],
    ids=lambda v: str(v),
)
def test_public_reason_values_are_stable(reason: Reason, value: str) -> None:
    # These strings are in dashboards and alert rules: renaming one is a breaking change.
    assert reason.value == value
    assert str(reason) == value


@pytest.mark.parametrize("reason", REJECTION_401, ids=str)
def test_401_reasons_carry_a_bearer_challenge(reason: Reason) -> None:
    spec = REASON_SPECS[reason]
    assert spec.challenge
    assert spec.outcome is Outcome.REJECTED
    if reason is Reason.TOKEN_MISSING:
        # RFC 6750 §3.1: a request without credentials gets no error code.
        assert spec.bearer_error is None
    elif reason in DPOP_ONLY:
        # About the DPoP scheme: the Bearer challenge beside it says nothing of it.
        assert spec.bearer_error is None
        assert spec.dpop_error is not None
    else:
        assert spec.bearer_error == "invalid_token"


DPOP_ONLY = {
    Reason.DPOP_REQUIRED,
    Reason.DPOP_PROOF_INVALID,
    Reason.DPOP_PROOF_REPLAYED,
    Reason.DPOP_NONCE_REQUIRED,
}


def test_only_token_missing_and_dpop_reasons_are_401s_without_a_bearer_error_code() -> None:
    assert {r for r in REJECTION_401 if REASON_SPECS[r].bearer_error is None} == {
        Reason.TOKEN_MISSING,
        *DPOP_ONLY,
    }


@pytest.mark.parametrize(
    ("reason", "dpop_error"),
    [
        (Reason.DPOP_PROOF_INVALID, "invalid_dpop_proof"),
        (Reason.DPOP_PROOF_REPLAYED, "invalid_dpop_proof"),
        (Reason.DPOP_NONCE_REQUIRED, "use_dpop_nonce"),
        (Reason.DPOP_BINDING_MISMATCH, "invalid_token"),
        (Reason.DPOP_REQUIRED, "invalid_token"),
        (Reason.TOKEN_EXPIRED, "invalid_token"),
        (Reason.INSUFFICIENT_SCOPE, "insufficient_scope"),
        (Reason.TOKEN_MISSING, None),
    ],
)
def test_dpop_challenges_carry_the_rfc_9449_error(reason: Reason, dpop_error: str | None) -> None:
    assert REASON_SPECS[reason].dpop_error == dpop_error


@pytest.mark.parametrize(
    ("reason", "status", "bearer_error"),
    [
        (Reason.INSUFFICIENT_SCOPE, 403, "insufficient_scope"),
        (Reason.INVALID_REQUEST, 400, "invalid_request"),
        (Reason.ROUTE_NOT_FOUND, 404, None),
        (Reason.REQUEST_REJECTED, 400, None),
        (Reason.JWKS_UNAVAILABLE, 503, None),
        (Reason.UPSTREAM_UNAVAILABLE, 502, None),
        (Reason.UPSTREAM_TIMEOUT, 504, None),
        (Reason.INTERNAL_ERROR, 500, None),
    ],
    ids=lambda v: str(v),
)
def test_status_and_bearer_error(reason: Reason, status: int, bearer_error: str | None) -> None:
    spec = REASON_SPECS[reason]
    assert spec.status == status
    assert spec.bearer_error == bearer_error
    assert spec.challenge == (bearer_error is not None)


def test_status_is_none_only_where_the_response_is_not_ours() -> None:
    assert {r for r in Reason if REASON_SPECS[r].status is None} == {
        Reason.OK,
        Reason.UPSTREAM_ABORTED,
        Reason.CLIENT_DISCONNECTED,
        Reason.REQUEST_CANCELLED,
    }


# 5xx by RFC 9110, but the client's doing (a protocol it should not speak): a rejection, so
# that a client sending HTTP/2.0 or gzip-coded bodies never counts against the error rate.
CLIENT_CAUSED_5XX = {Reason.VERSION_NOT_SUPPORTED, Reason.TRANSFER_CODING_NOT_SUPPORTED}


def test_only_ok_is_allowed_and_server_side_failures_are_errors() -> None:
    assert [r for r in Reason if REASON_SPECS[r].outcome is Outcome.ALLOWED] == [Reason.OK]
    for reason in Reason:
        status = REASON_SPECS[reason].status
        if status is not None and status >= 500:
            expected = Outcome.REJECTED if reason in CLIENT_CAUSED_5XX else Outcome.ERROR
            assert REASON_SPECS[reason].outcome is expected, reason


@pytest.mark.parametrize("reason", ALL_REASONS, ids=str)
def test_messages_fit_a_quoted_string(reason: Reason) -> None:
    # The message becomes error_description="..." unescaped (RFC 6750 §3).
    message = REASON_SPECS[reason].message
    assert message
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", message), message


@pytest.mark.parametrize(
    ("reason", "scope", "expected"),
    [
        pytest.param(Reason.TOKEN_MISSING, None, 'Bearer realm="gw"', id="token-missing"),
        pytest.param(
            Reason.TOKEN_EXPIRED,
            None,
            'Bearer realm="gw", error="invalid_token", error_description="The token has expired."',
            id="token-expired",
        ),
        pytest.param(
            Reason.SIGNATURE_INVALID,
            "ignored",
            'Bearer realm="gw", error="invalid_token", '
            'error_description="The token\'s signature is invalid."',
            id="scope-ignored-for-other-reasons",
        ),
        pytest.param(
            Reason.INVALID_REQUEST,
            None,
            'Bearer realm="gw", error="invalid_request", '
            'error_description="The request carries a malformed, oversized or repeated token."',
            id="invalid-request",
        ),
        pytest.param(
            Reason.INSUFFICIENT_SCOPE,
            "orders:read orders:write",
            'Bearer realm="gw", error="insufficient_scope", '
            'error_description="The token does not grant the required scope.", '
            'scope="orders:read orders:write"',
            id="insufficient-scope-with-scope",
        ),
        pytest.param(
            Reason.INSUFFICIENT_SCOPE,
            None,
            'Bearer realm="gw", error="insufficient_scope", '
            'error_description="The token does not grant the required scope."',
            id="insufficient-scope-without-scope",
        ),
    ],
)
def test_www_authenticate_format(reason: Reason, scope: str | None, expected: str) -> None:
    assert www_authenticate(reason, "gw", scope) == expected


@pytest.mark.parametrize("reason", [r for r in Reason if not REASON_SPECS[r].challenge], ids=str)
def test_no_challenge_without_a_bearer_problem(reason: Reason) -> None:
    assert www_authenticate(reason, "gw", "scope") is None
