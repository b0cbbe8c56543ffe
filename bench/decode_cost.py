"""PyJWT's own cost: ``jwt.decode`` (signature, exp, iss, aud) with a ``PyJWK`` key, in a loop.

Run pinned to one core (bench/run.py pins it to the gateway's core); prints one JSON object
``{alg: {"us_per_decode": ..., "decodes_per_s": ..., "n": ...}}``.

    python bench/decode_cost.py --seconds 2 RS256=FILE ES256=FILE JWKS_FILE

With ``--unverified`` it times instead what the gateway's verifier spends on a token *before* any
signature check, for payloads of hostile shapes (each under the default 8 KB token limit) next
to a normal one: the token names an unknown ``kid``, so ``Verifier.verify`` stops at the key
lookup.  Prints ``{shape: {"us_per_token": ..., "vs_normal": ..., "payload_bytes": ...}}``.

    python bench/decode_cost.py --unverified --seconds 1

With ``--verifier`` each algorithm's entry also gets ``verifier_us_per_token``: the gateway's own
``Verifier.verify`` of the same tokens in the same kind of loop, every one a cache miss (a
one-entry token cache, so the store and eviction a never-seen token costs are in it), beside
``jwt.decode``.  ``--build compiled`` imports the mypyc build (bench/builds.py) for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

import jwt
from jwt import PyJWK

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import builds

# --build, read before the gateway is imported (as bench/hotpath.py does).
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--build", choices=builds.CHOICES, default=builds.PYTHON)
builds.use(_pre.parse_known_args()[0].build, log=lambda line: print(line, file=sys.stderr))

from tokens import AUDIENCE, ISSUER, read_tokens  # noqa: E402

from gateway.errors import Rejection  # noqa: E402
from gateway.reasons import Reason  # noqa: E402


def measure(tokens: list[str], key: PyJWK, alg: str, seconds: float) -> dict[str, Any]:
    # warm-up, and a check that the tokens do verify
    for token in tokens[:50]:
        jwt.decode(token, key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    size = len(tokens)
    while True:
        for _ in range(100):
            jwt.decode(tokens[n % size], key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - started
    return {"us_per_decode": elapsed / n * 1e6, "decodes_per_s": n / elapsed, "n": n}


# Hostile payload shapes, each a JSON text of about 6 KB (an 8 KB token once base64url-encoded).
_FILL: Final = 5600


def _shapes() -> dict[str, bytes]:
    iss = f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","exp":9999999999'

    def fill(item: str, wrap: str = "[%s]") -> str:
        return wrap % ",".join([item] * (_FILL // (len(item) + 1)))

    return {
        "normal": (iss + ',"scope":"orders:read","email":"a@example.com"}').encode(),
        "tiny-objects": (iss + ',"x":' + fill("{}") + "}").encode(),
        "tiny-arrays": (iss + ',"x":' + fill("[]") + "}").encode(),
        "integers": (iss + ',"x":' + fill("1") + "}").encode(),
        "floats": (iss + ',"x":' + fill("1e5") + "}").encode(),
        "members": (iss + "," + ",".join(f'"{i:x}":0' for i in range(_FILL // 9)) + "}").encode(),
        "nested": (iss + ',"x":' + "[" * 900 + "]" * 900 + "}").encode(),
    }


class _OneKey:
    """A key lookup holding one key, for every kid: the verifier's key step without a fetch."""

    def __init__(self, key: PyJWK) -> None:
        self._key = key

    async def get_key(self, issuer: Any, kid: Any, alg: str) -> PyJWK:
        return self._key

    def current_key(self, issuer: Any, kid: Any, alg: str) -> PyJWK | None:
        return self._key

    def lease(self, issuer: Any) -> None:
        return None


def measure_verifier(tokens: list[str], key: PyJWK, alg: str, seconds: float) -> float:
    """µs per ``Verifier.verify`` of a token it has not cached, in a loop like ``measure``'s."""
    from gateway.clock import SystemClock
    from gateway.config import AuthPolicy, IssuerConfig
    from gateway.token_cache import TokenCache
    from gateway.verifier import Verifier

    clock = SystemClock()
    issuer = IssuerConfig("bench", ISSUER, None, frozenset({alg}))
    policy = AuthPolicy(issuers=(issuer,), audiences=frozenset({AUDIENCE}))
    # One entry: each token evicts the one before, so every lookup misses, and each
    # verification is stored (weighed, evicting) as a never-seen token's is.
    verifier = Verifier(_OneKey(key), clock, TokenCache(1, clock))
    size = len(tokens)

    async def run() -> tuple[int, float]:
        for token in tokens[:50]:
            await verifier.verify(token, policy)  # warm-up, and a check that they verify
        n = 0
        started = time.perf_counter()
        while True:
            for _ in range(100):
                await verifier.verify(tokens[n % size], policy)
                n += 1
            now = time.perf_counter()
            if now - started >= seconds:
                return n, now - started

    n, elapsed = asyncio.run(run())
    return elapsed / n * 1e6


class _NoKeys:
    """A key lookup that knows no key: the verifier stops there, before any signature check."""

    async def get_key(self, issuer: Any, kid: Any, alg: str) -> PyJWK:
        raise Rejection(Reason.KEY_NOT_FOUND, "no such kid")

    def current_key(self, issuer: Any, kid: Any, alg: str) -> PyJWK | None:
        return None

    def lease(self, issuer: Any) -> None:
        return None


def measure_unverified(seconds: float) -> dict[str, Any]:
    from gateway.clock import SystemClock
    from gateway.config import AuthPolicy, IssuerConfig
    from gateway.verifier import Verifier

    issuer = IssuerConfig("bench", ISSUER, None, frozenset({"RS256"}))
    policy = AuthPolicy(issuers=(issuer,), audiences=frozenset({AUDIENCE}))
    verifier = Verifier(_NoKeys(), SystemClock())
    head = base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT","kid":"unknown"}')
    signature = "A" * 342  # an RS256-sized signature: never checked, the kid is unknown
    result: dict[str, Any] = {}
    for name, payload in _shapes().items():
        body = base64.urlsafe_b64encode(payload).rstrip(b"=")
        token = f"{head.rstrip(b'=').decode()}.{body.decode()}.{signature}"
        assert len(token) <= 8192, (name, len(token))

        async def once(token: str = token) -> None:
            try:
                await verifier.verify(token, policy)
            except Rejection:
                return
            raise AssertionError("a token with an unknown kid verified")  # pragma: no cover

        async def run() -> tuple[int, float]:
            for _ in range(20):
                await once()
            n = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                for _ in range(20):
                    await once()
                n += 20
            return n, time.perf_counter() - started

        n, elapsed = asyncio.run(run())
        result[name] = {"us_per_token": round(elapsed / n * 1e6, 1), "payload_bytes": len(payload)}
    normal = result["normal"]["us_per_token"]
    for entry in result.values():
        entry["vs_normal"] = round(entry["us_per_token"] / normal, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--unverified", action="store_true", help="hostile payloads, see above")
    parser.add_argument("--verifier", action="store_true", help="the gateway's verifier too")
    parser.add_argument("--build", choices=builds.CHOICES, default=builds.PYTHON)
    parser.add_argument("sets", nargs="*", help="ALG=TOKENS_FILE ..., then the JWKS file")
    args = parser.parse_args()
    if args.unverified:
        json.dump(measure_unverified(args.seconds), sys.stdout)
        print()
        return 0
    if len(args.sets) < 2:
        parser.error("give ALG=TOKENS_FILE ... and the JWKS file")
    *sets, jwks_path = args.sets
    with open(jwks_path) as fh:
        jwks = json.load(fh)
    result = {}
    for item in sets:
        alg, _, path = item.partition("=")
        jwk = next(k for k in jwks["keys"] if k["alg"] == alg)
        key = PyJWK(jwk, algorithm=alg)
        tokens = read_tokens(Path(path), 0, 1000)
        result[alg] = measure(tokens, key, alg, args.seconds)
        if args.verifier:
            result[alg]["verifier_us_per_token"] = measure_verifier(tokens, key, alg, args.seconds)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
