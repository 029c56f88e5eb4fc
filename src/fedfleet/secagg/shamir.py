"""Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) of 32-byte secrets over the prime
field GF(2^521 − 1): any ``threshold`` shares give the secret back, fewer tell nothing about it.

The field's prime is a Mersenne prime larger than every 256-bit secret, so a secret is one field
element and a share is one element too, written as ``SHARE_BYTES`` big-endian bytes. Share ``x``
coordinates are small positive integers that name the holder (``secagg.graph`` gives each sampled
worker its own).

>>> shares = split(bytes(range(32)), [1, 2, 3, 4], threshold=3)
>>> combine({x: shares[x] for x in (1, 3, 4)}) == bytes(range(32))
True
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, xs: Iterable[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for the holders at ``xs`` (distinct, in 1 .. PRIME − 1); ``threshold`` of them
    reconstruct it. The polynomial's coefficients come from the operating system's CSPRNG."""
    points = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(points)} holders")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share coordinates must be distinct and in 1 .. PRIME - 1")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in points}


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares ``{x: share}`` (Lagrange interpolation at 0). With fewer shares than the
    threshold, or a wrong one among them, the result is some other value: check it against a commitment."""
    if not shares:
        raise ValueError("no shares to combine")
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    if any(len(y) != SHARE_BYTES for y in shares.values()) or any(y >= PRIME for _, y in points):
        raise ValueError(f"a share is a field element of {SHARE_BYTES} bytes below the prime")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        # Not a 32-byte value: the shares were not all of one secret (or too few of them).
        return b""
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    """Σ cₖ xᵏ mod PRIME (Horner)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y
