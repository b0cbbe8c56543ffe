"""Bench keys and tokens, minted once and cached in ``bench/.cache/``.

Keys: an RSA-2048 (RS256) and a P-256 (ES256) private key, generated once and kept as PEM in
``bench/.cache/keys/``; their kids are RFC 7638 thumbprints.  Tokens live in
``bench/.cache/tokens-<key pair id>/``, one per line:

- ``rs256-one.txt``, ``es256-one.txt``: the one repeated token;
- ``rs256-5000.txt``, ``es256-5000.txt``: the 5,000 distinct tokens in rotation;
- ``rs256-cold.txt``: the cold pool, every token used at most once per gateway process.

Every token expires ``TOKEN_LIFETIME_S`` after minting; a set with less than ``MIN_REMAINING_S``
left is minted again.  Minting runs in one process per CPU.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER: Final = "https://issuer.bench.example"
AUDIENCE: Final = "bench-api"
TOKEN_LIFETIME_S: Final = 14 * 24 * 3600
MIN_REMAINING_S: Final = 6 * 3600  # far longer than any run
WARM_SET_SIZE: Final = 5000
CACHE_DIR: Final = Path(__file__).resolve().parent / ".cache"
ALGS: Final = ("RS256", "ES256")


@dataclass(frozen=True)
class BenchKey:
    alg: str
    kid: str
    pem: bytes  # PKCS8 private key

    def private(self) -> Any:
        return serialization.load_pem_private_key(self.pem, password=None)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private().public_key()
        algo = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        jwk: dict[str, Any] = algo.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def load_keys(cache_dir: Path = CACHE_DIR) -> dict[str, BenchKey]:
    """The bench key pair, generated on first use and stored as PEM in ``cache_dir/keys``."""
    key_dir = cache_dir / "keys"
    key_dir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, BenchKey] = {}
    for alg in ALGS:
        path = key_dir / f"{alg.lower()}.pem"
        if not path.exists():
            private: Any = (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                if alg == "RS256"
                else ec.generate_private_key(ec.SECP256R1())
            )
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pem)
            tmp.chmod(0o600)
            tmp.replace(path)
        pem = path.read_bytes()
        public: Any = serialization.load_pem_private_key(pem, password=None).public_key()
        algo = RSAAlgorithm if alg == "RS256" else ECAlgorithm
        kid = _thumbprint(algo.to_jwk(public, as_dict=True))
        keys[alg] = BenchKey(alg=alg, kid=kid, pem=pem)
    return keys


def jwks_document(keys: dict[str, BenchKey]) -> dict[str, Any]:
    return {"keys": [keys[alg].public_jwk() for alg in ALGS]}


def key_pair_id(keys: dict[str, BenchKey]) -> str:
    return hashlib.sha256("|".join(keys[alg].kid for alg in ALGS).encode()).hexdigest()[:16]


# --- minting (in worker processes) ------------------------------------------------------------

_worker_key: Any = None
_worker_meta: tuple[str, str, int] = ("", "", 0)


def _init_worker(pem: bytes, alg: str, kid: str, iat: int) -> None:
    global _worker_key, _worker_meta
    # the parent may turn SIGTERM into KeyboardInterrupt; a pool worker must just die on it
    # (Pool.terminate), and leave Ctrl-C to the parent, which terminates the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_key = serialization.load_pem_private_key(pem, password=None)
    _worker_meta = (alg, kid, iat)


def _pool_mint(job: tuple[str, int, int]) -> list[str]:
    return _mint_range(job, _worker_key, _worker_meta)


def _mint_range(job: tuple[str, int, int], private: Any, meta: tuple[str, str, int]) -> list[str]:
    prefix, start, stop = job
    alg, kid, iat = meta
    out = []
    for i in range(start, stop):
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"user-{i}",
            "jti": f"{prefix}-{i}",
            "scope": "bench:read",
            "iat": iat,
            "exp": iat + TOKEN_LIFETIME_S,
        }
        out.append(jwt.encode(payload, private, algorithm=alg, headers={"kid": kid, "typ": "JWT"}))
    return out


def mint(key: BenchKey, prefix: str, start: int, stop: int, iat: int) -> Iterator[str]:
    """Tokens ``prefix-start`` .. ``prefix-(stop-1)``, in order, minted in parallel processes."""
    count = stop - start
    if count <= 0:
        return
    if count < 2000:
        yield from _mint_range((prefix, start, stop), key.private(), (key.alg, key.kid, iat))
        return
    chunk = 2000
    jobs = [(prefix, s, min(s + chunk, stop)) for s in range(start, stop, chunk)]
    ctx = multiprocessing.get_context("fork")
    procs = os.cpu_count() or 1
    with ctx.Pool(
        procs, initializer=_init_worker, initargs=(key.pem, key.alg, key.kid, iat)
    ) as pool:
        for part in pool.imap(_pool_mint, jobs):
            yield from part


# --- the cached token sets ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSets:
    directory: Path
    one: dict[str, Path]  # alg -> file with the one repeated token
    warm: dict[str, Path]  # alg -> file with WARM_SET_SIZE tokens
    cold: Path  # RS256 cold pool
    cold_count: int
    expires_at: int


def _count_lines(path: Path) -> int:
    """Complete lines; a partial last line (a run killed mid-write) is cut off."""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
        return data.count(b"\n")


def prepare_tokens(
    keys: dict[str, BenchKey], cold_needed: int, log: Any = print, cache_dir: Path = CACHE_DIR
) -> TokenSets:
    """Make sure the cached sets exist, are valid for ``MIN_REMAINING_S`` and the cold pool
    holds at least ``cold_needed`` tokens (extending it, never re-minting what is there)."""
    directory = cache_dir / f"tokens-{key_pair_id(keys)}"
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    now = int(time.time())
    meta: dict[str, Any] = {}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    if not meta or meta.get("iat", 0) + TOKEN_LIFETIME_S < now + MIN_REMAINING_S:
        for old in directory.glob("*.txt"):
            old.unlink()
        meta = {"iat": now - 60, "issuer": ISSUER, "audience": AUDIENCE}
        meta_path.write_text(json.dumps(meta))
    iat = int(meta["iat"])
    one: dict[str, Path] = {}
    warm: dict[str, Path] = {}
    for alg in ALGS:
        key = keys[alg]
        one[alg] = directory / f"{alg.lower()}-one.txt"
        warm[alg] = directory / f"{alg.lower()}-{WARM_SET_SIZE}.txt"
        if not one[alg].exists():
            _write(one[alg], mint(key, "one", 0, 1, iat))
        if not warm[alg].exists():
            log(f"minting {WARM_SET_SIZE} {alg} tokens ...")
            _write(warm[alg], mint(key, "warm", 0, WARM_SET_SIZE, iat))
    cold = directory / "rs256-cold.txt"
    have = _count_lines(cold) if cold.exists() else 0
    if have < cold_needed:
        started = time.monotonic()
        log(
            f"minting {cold_needed - have} more RS256 cold tokens "
            f"({have} cached; {os.cpu_count()} processes) ..."
        )
        with cold.open("a") as fh:
            for token in mint(keys["RS256"], "cold", have, cold_needed, iat):
                fh.write(token + "\n")
        log(f"  minted in {time.monotonic() - started:.0f} s, cached in {cold}")
        have = cold_needed
    return TokenSets(directory, one, warm, cold, have, iat + TOKEN_LIFETIME_S)


def _write(path: Path, tokens: Iterator[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for token in tokens:
            fh.write(token + "\n")
    tmp.replace(path)


def read_tokens(path: Path, start: int = 0, count: int | None = None) -> list[str]:
    out: list[str] = []
    with path.open() as fh:
        for index, line in enumerate(fh):
            if index < start:
                continue
            if count is not None and len(out) >= count:
                break
            out.append(line.strip())
    return out


def forged(token: str) -> str:
    """The same token with its signature changed: must be refused."""
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{head}.{payload}.{flipped}"
