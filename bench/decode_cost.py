"""PyJWT's own cost: ``jwt.decode`` (signature, exp, iss, aud) with a ``PyJWK`` key, in a loop.

Run pinned to one core (bench/run.py pins it to the gateway's core); prints one JSON object
``{alg: {"us_per_decode": ..., "decodes_per_s": ..., "n": ...}}``.

    python bench/decode_cost.py --seconds 2 RS256=FILE ES256=FILE JWKS_FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokens import AUDIENCE, ISSUER, read_tokens


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("sets", nargs="+", help="ALG=TOKENS_FILE ..., then the JWKS file")
    args = parser.parse_args()
    *sets, jwks_path = args.sets
    with open(jwks_path) as fh:
        jwks = json.load(fh)
    result = {}
    for item in sets:
        alg, _, path = item.partition("=")
        jwk = next(k for k in jwks["keys"] if k["alg"] == alg)
        key = PyJWK(jwk, algorithm=alg)
        result[alg] = measure(read_tokens(Path(path), 0, 1000), key, alg, args.seconds)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
