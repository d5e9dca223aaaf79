"""What one token check costs in the hub's own Verifier: a fresh token, and a cached one.

``.venv/bin/python -m bench.verify_cost`` prints microseconds per token for HS256,
ES256 and RS256 (2,000 distinct tokens each), without a network or a server: the
figure the connect-storm rows of ``ssehub+auth`` add up per connection.
"""

from __future__ import annotations

import time
import timeit
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ssehub.config import AuthConfig
from ssehub.http.auth import Verifier

TOKENS = 2000


def _verifier(alg: str, key: bytes, cache_size: int) -> Verifier:
    config = AuthConfig(algorithms=(alg,), cache_size=cache_size)
    object.__setattr__(config, "key", key)  # as config loading does, after reading the file
    return Verifier(config)


def measure(alg: str, private: Any) -> tuple[float, float]:
    """Microseconds per token: verified from scratch, and served from the cache."""
    if isinstance(private, bytes):
        public = private
    else:
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    exp = int(time.time()) + 3600
    claims = {"exp": exp, "ssehub": {"subscribe": ["c*"]}}
    tokens = [jwt.encode({**claims, "sub": str(i)}, private, algorithm=alg) for i in range(TOKENS)]
    fresh = _verifier(alg, public, 0)
    cold = timeit.timeit(lambda: [fresh.verify(t) for t in tokens], number=1) / TOKENS
    cached = _verifier(alg, public, TOKENS)
    for t in tokens:
        cached.verify(t)
    warm = timeit.timeit(lambda: [cached.verify(t) for t in tokens], number=5) / (5 * TOKENS)
    return cold * 1e6, warm * 1e6


def main() -> None:
    keys: dict[str, Any] = {
        "HS256": b"s" * 32,
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    for alg, private in keys.items():
        cold, warm = measure(alg, private)
        print(f"{alg}: verify {cold:.1f} us/token, cached {warm:.2f} us/token")


if __name__ == "__main__":
    main()
