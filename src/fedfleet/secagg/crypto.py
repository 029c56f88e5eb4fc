"""The cryptographic primitives of secure aggregation, all from ``cryptography`` (OpenSSL):

- X25519 key agreement (RFC 7748), each agreed secret run through HKDF-SHA256 (RFC 5869) with a label
  that binds it to the run, the round attempt, the pair and its use;
- AES-256-GCM to encrypt a key share for the worker that will hold it (the coordinator relays it and
  cannot read it);
- a PRG that expands a 32-byte seed into ring elements: AES-256 in counter mode, whose keystream is
  indistinguishable from random bytes for anyone without the seed;
- SHA-256 commitments to a worker's secrets and to each share it deals, which let the coordinator tell
  a wrong share from a right one and name who sent it.
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
PRG_BLOCK = 1 << 20  # ring elements expanded at a time (8 MiB): bounded scratch space for any model size


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, label: bytes) -> bytes:
    """A 32-byte key both ends of a pair derive alike: HKDF-SHA256 of their X25519 secret, bound to
    ``label``. ValueError if ``peer_public`` is not a valid public key (or a low-order point)."""
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"a public key is {KEY_BYTES} bytes, not {len(peer_public)}")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(shared)


def derive(seed: bytes, label: bytes) -> bytes:
    """A 32-byte key from a 32-byte seed for one use (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(seed)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce ‖ AES-256-GCM(plaintext) with ``aad`` authenticated (who deals to whom, in which attempt)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """The plaintext; ``cryptography.exceptions.InvalidTag`` if it was tampered with or is not for us."""
    return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)


def commitment(label: bytes, value: bytes) -> bytes:
    """SHA-256 over a length-prefixed label and the value: binding, and hiding for high-entropy values
    (the secrets and shares committed to here are uniformly random)."""
    return hashlib.sha256(len(label).to_bytes(4, "big") + label + value).digest()


def add_prg(out: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """``out`` += sign · PRG(seed) in Z/2⁶⁴Z, where PRG(seed) is the AES-256-CTR keystream of ``seed`` read as
    little-endian uint64 (the nonce is zero: each seed keys one stream only). ``out`` is a flat uint64
    array; the stream is expanded ``PRG_BLOCK`` elements at a time into scratch space that each thread
    keeps (fresh buffers per call cost more in page faults than AES does)."""
    if out.dtype != np.uint64 or out.ndim != 1:
        raise TypeError("the PRG adds into a flat uint64 array")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros, scratch = _scratch(min(PRG_BLOCK, out.size))
    block = len(zeros) // 8
    for pos in range(0, out.size, block):
        n = min(block, out.size - pos)
        encryptor.update_into(memoryview(zeros)[: 8 * n], scratch)
        stream = np.frombuffer(scratch, dtype="<u8", count=n)
        if sign > 0:
            np.add(out[pos:pos + n], stream, out=out[pos:pos + n])
        else:
            np.subtract(out[pos:pos + n], stream, out=out[pos:pos + n])


_local = threading.local()


def _scratch(elements: int) -> tuple[bytes, bytearray]:
    """This thread's (zero input, keystream output) buffers for at least ``elements`` uint64 values."""
    have: tuple[bytes, bytearray] | None = getattr(_local, "buffers", None)
    if have is None or len(have[0]) < 8 * elements:
        # update_into wants room for a block more than it writes
        have = (bytes(8 * elements), bytearray(8 * elements + 15))
        _local.buffers = have
    return have


def prg(seed: bytes, size: int) -> np.ndarray:
    """PRG(seed) as ``size`` uint64 values (for tests and references)."""
    out = np.zeros(size, dtype=np.uint64)
    add_prg(out, seed)
    return out
