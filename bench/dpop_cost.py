"""What a DPoP proof costs: in process (µs per check) and through the gateway (req/s).

A proof is made per request, so no proof can come from the verified-token cache; the token
itself can (the same bound token is sent every time, as a real client does until it expires).

``--micro`` (in process, one core): the gateway's whole sender check per request (proof parse,
signature with the proof's jwk, claims, thumbprint, binding, replay cache) for ES256 and RS256
proofs, beside PyJWT's ``jwt.decode`` of a never-seen RS256 token (the cold-token cost the
gateway pays on top of passthrough):

    python bench/dpop_cost.py --micro

``--http``: ``gateway run`` pinned to CPU 0, bench/upstream.py and wrk on CPU 1; rows
alternate: the bound token with a fresh ES256 proof per request, and the same route with an
unbound token as Bearer (warm: its cache hit), each ``--rounds`` times; medians and the ratio:

    python bench/dpop_cost.py --http --seconds 3 --rounds 3
"""

# ruff: noqa: S603 - every subprocess argv is built here from fixed parts, no shell
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from multidict import CIMultiDict, CIMultiDictProxy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from run import free_port, parse_wrk, pinned, wait_for  # noqa: E402

from gateway.binding import DPOP_HEADER, SenderCheck  # noqa: E402
from gateway.clock import SYSTEM_CLOCK  # noqa: E402
from gateway.config import loads_config  # noqa: E402
from tests.fakes import generate_key  # noqa: E402
from tests.integration.senderkit import DpopClient  # noqa: E402

ISSUER = "https://issuer.bench.example"
AUDIENCE = "bench-api"
HOST = "127.0.0.1"


def config_text(jwks: dict[str, Any], port: int, admin: int, upstream: int) -> str:
    return json.dumps({
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin},
        "issuers": {"bench": {"issuer": ISSUER, "jwks": jwks, "algorithms": ["RS256"]}},
        "routes": [{
            "id": "api", "match": {"path_prefix": "/"}, "upstream": f"http://{HOST}:{upstream}",
            "auth": {"issuers": ["bench"], "audiences": [AUDIENCE], "dpop": "allowed"},
        }],
    })  # fmt: skip


def mint(key: Any, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "iat": now, "exp": now + 3600}
    return jwt.encode(
        {**payload, **claims}, key.private, algorithm="RS256", headers={"kid": key.kid}
    )


def micro(seconds: float) -> dict[str, Any]:
    idp = generate_key("RS256", "bench")
    jwks = {"keys": [idp.public_jwk()]}
    config = loads_config(config_text(jwks, 1, 2, 3))
    sender = SenderCheck(config, SYSTEM_CLOCK)
    route = config.routes[0]
    out: dict[str, Any] = {}
    for alg in ("ES256", "RS256"):
        client = DpopClient(alg)
        token = mint(idp, cnf={"jkt": client.jkt})
        claims = jwt.decode(token, options={"verify_signature": False})
        url = f"http://{HOST}:8080/orders"
        proofs = [client.proof("GET", url, token, now=time.time()) for _ in range(3000)]
        headers = [CIMultiDictProxy(CIMultiDict({"DPoP": p})) for p in proofs]
        n = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds and n < len(proofs):
            sender.check(route, DPOP_HEADER, token, claims, method="GET", raw_path="/orders",
                         host=f"{HOST}:8080", headers=headers[n], connection=None)  # fmt: skip
            n += 1
        out[f"proof_check_{alg}_us"] = (time.perf_counter() - started) / n * 1e6
    token = mint(idp)
    key = jwt.PyJWK(idp.public_jwk())
    fresh = [mint(idp, jti=uuid.uuid4().hex) for _ in range(2000)]
    started = time.perf_counter()
    for token in fresh:
        jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
    out["pyjwt_decode_RS256_us"] = (time.perf_counter() - started) / len(fresh) * 1e6
    for alg in ("ES256", "RS256"):
        out[f"proof_check_{alg}_vs_cold_token"] = (
            out[f"proof_check_{alg}_us"] / out["pyjwt_decode_RS256_us"]
        )
    return out


LUA = """
local pairs_ = {}
local count, index = 0, 0
function init(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\\t")
    if tab then count = count + 1; pairs_[count] = {line:sub(1, tab - 1), line:sub(tab + 1)} end
  end
end
function request()
  index = index + 1
  local pair = pairs_[((index - 1) % count) + 1]
  if pair[2] == "-" then
    return wrk.format("GET", "/orders", {["Authorization"] = "Bearer " .. pair[1]})
  end
  return wrk.format("GET", "/orders", {["Authorization"] = "DPoP " .. pair[1], ["DPoP"] = pair[2]})
end
"""


def http(seconds: float, rounds: int, connections: int) -> dict[str, Any]:
    idp = generate_key("RS256", "bench")
    client = DpopClient("ES256")
    bound, plain = mint(idp, cnf={"jkt": client.jkt}), mint(idp)
    port, admin, upstream_port = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="dpop-bench-"))
    (work / "jwks.json").write_text("{}")
    (work / "gateway.yaml").write_text(
        config_text({"keys": [idp.public_jwk()]}, port, admin, upstream_port)
    )
    (work / "pairs.lua").write_text(LUA)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream_argv = [
            sys.executable,
            str(ROOT / "bench" / "upstream.py"),
            "--port",
            str(upstream_port),
            "--jwks",
            str(work / "jwks.json"),
        ]
        procs.append(
            subprocess.Popen(
                pinned(1, upstream_argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        gateway_argv = [
            sys.executable,
            "-m",
            "gateway",
            "--log-level",
            "WARNING",
            "run",
            "--config",
            str(work / "gateway.yaml"),
        ]
        gw = subprocess.Popen(
            pinned(0, gateway_argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(gw)
        wait_for(f"http://{HOST}:{admin}/readyz", gw, "gateway")
        rows: dict[str, list[float]] = {"dpop_fresh_proof": [], "bearer_warm": []}
        url = f"http://{HOST}:{port}/orders"
        for _ in range(rounds):
            for row in rows:
                # Enough fresh proofs for the row at a generous rate; each is used once.
                count = int(seconds * 9000) if row.startswith("dpop") else 1
                lines = (
                    [f"{plain}\t-"]
                    if count == 1
                    else [
                        f"{bound}\t{client.proof('GET', url, bound, now=time.time())}"
                        for _ in range(count)
                    ]
                )
                (work / "pairs.txt").write_text("\n".join(lines) + "\n")
                argv = [
                    "wrk",
                    "-t1",
                    f"-c{connections}",
                    f"-d{max(1, round(seconds))}s",
                    "--latency",
                    "-s",
                    str(work / "pairs.lua"),
                    url,
                    "--",
                    str(work / "pairs.txt"),
                ]
                out = subprocess.run(
                    pinned(1, argv),
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=True,
                )
                load = parse_wrk(out.stdout)
                if load.non_2xx or load.requests > count > 1:
                    raise RuntimeError(
                        f"{row}: {load.non_2xx} non-2xx, {load.requests} requests for {count} proofs"
                    )
                rows[row].append(load.rps)
        medians = {row: statistics.median(values) for row, values in rows.items()}
        return {
            "rps": medians,
            "rounds": rows,
            "dpop_vs_bearer": medians["dpop_fresh_proof"] / medians["bearer_warm"],
            "us_added_per_request": 1e6 / medians["dpop_fresh_proof"]
            - 1e6 / medians["bearer_warm"],
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.micro or not args.http:
        result["micro"] = micro(args.seconds)
    if args.http:
        result["http"] = http(args.seconds, args.rounds, args.connections)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
