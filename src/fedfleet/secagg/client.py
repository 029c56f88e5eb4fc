"""A worker's side of one secure-aggregation round attempt: its keys, the shares it deals and holds,
its masked update and the shares it reveals. Pure state and maths: the agent does the HTTP.

    keys()     two fresh X25519 key pairs (one to encrypt shares, one to agree pairwise masks) and a
               fresh self-mask seed, committed to; never reused across attempts
    deal()     Shamir-share the mask private key and the self-mask seed among its neighbours and
               itself, each share encrypted for its holder, with a commitment to each
    accept()   decrypt the shares dealt to it
    mask()     y = encode(n · Δ) + PRG(self seed) + Σ ±PRG(pair seed) over its neighbours that dealt
    reveal()   for each neighbour the coordinator says survived, its share of that one's self-mask seed;
               for each it says dropped, its share of that one's mask key; never both for one
               neighbour (both would unmask that neighbour's update)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedfleet.errors import ProtocolError
from fedfleet.secagg import crypto, ring, shamir
from fedfleet.secagg.labels import Labels
from fedfleet.types import Weights


@dataclass(frozen=True)
class Peer:
    worker_id: str
    x: int  # its share coordinate
    enc_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class Dealt:
    """One share dealt to ``to``: the encrypted pair of shares and the commitments to each."""

    to: str
    ciphertext: bytes
    mask_key_commitment: bytes
    self_mask_commitment: bytes


class ClientRound:
    def __init__(self, worker_id: str, labels: Labels) -> None:
        self.worker_id = worker_id
        self.labels = labels
        self._enc = crypto.new_private_key()
        self._mask = crypto.new_private_key()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self.peers: dict[str, Peer] = {}  # neighbours (and itself) as the coordinator introduced them
        self._held: dict[str, tuple[bytes, bytes]] = {}  # dealer -> (its mask-key share, its self-mask share)
        self._revealed: dict[str, str] = {}  # dealer -> "self_mask" | "mask_key": what was revealed of it

    def keys(self) -> tuple[bytes, bytes, bytes]:
        """(encryption public key, mask public key, commitment to the self-mask seed)."""
        return (crypto.public_bytes(self._enc), crypto.public_bytes(self._mask),
                crypto.commitment(self.labels.seed(self.worker_id), self._seed))

    def deal(self, peers: Iterable[Peer], threshold: int) -> list[Dealt]:
        """Shares of the mask key and the self-mask seed for each of ``peers`` (its neighbours and itself)."""
        self.peers = {p.worker_id: p for p in peers}
        me = self.peers.get(self.worker_id)
        if me is None or me.enc_key != crypto.public_bytes(self._enc) or me.mask_key != crypto.public_bytes(self._mask):
            raise ProtocolError("the coordinator's roster does not hold this worker's own keys")
        xs = [p.x for p in self.peers.values()]
        if len(set(xs)) != len(xs) or min(xs) < 1:
            raise ProtocolError("the coordinator gave share coordinates that are not distinct positive numbers")
        if not 2 <= threshold <= len(xs):
            raise ProtocolError(f"threshold {threshold} is not between 2 and the {len(xs)} holders")
        key_shares = shamir.split(crypto.private_bytes(self._mask), xs, threshold)
        seed_shares = shamir.split(self._seed, xs, threshold)
        out = []
        for p in self.peers.values():
            key = crypto.agree(self._enc, p.enc_key, self.labels.share_key(self.worker_id, p.worker_id))
            aad = self.labels.share_aad(self.worker_id, p.worker_id)
            out.append(Dealt(
                to=p.worker_id,
                ciphertext=crypto.encrypt(key, key_shares[p.x] + seed_shares[p.x], aad),
                mask_key_commitment=crypto.commitment(self.labels.share("mask_key", self.worker_id, p.worker_id),
                                                      key_shares[p.x]),
                self_mask_commitment=crypto.commitment(self.labels.share("self_mask", self.worker_id, p.worker_id),
                                                       seed_shares[p.x])))
        return out

    def accept(self, ciphertexts: Mapping[str, bytes]) -> list[str]:
        """Decrypt the shares dealt to this worker (by dealer); returns the dealers whose share could not be
        decrypted (tampered with, or not from who it claims), which are left out."""
        bad = []
        for dealer, ciphertext in ciphertexts.items():
            peer = self.peers.get(dealer)
            if peer is None:
                bad.append(dealer)
                continue
            key = crypto.agree(self._enc, peer.enc_key, self.labels.share_key(dealer, self.worker_id))
            try:
                plain = crypto.decrypt(key, ciphertext, self.labels.share_aad(dealer, self.worker_id))
            except Exception:  # InvalidTag, or a malformed body: the share is unusable either way
                bad.append(dealer)
                continue
            if len(plain) != 2 * shamir.SHARE_BYTES:
                bad.append(dealer)
                continue
            self._held[dealer] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        return bad

    def mask(self, encoded: np.ndarray, neighbours: Iterable[str]) -> np.ndarray:
        """``encoded`` (flat uint64, changed in place and returned) plus the self mask and the pairwise masks
        with ``neighbours`` (those that dealt shares): + for a neighbour whose id sorts after this one's."""
        crypto.add_prg(encoded, crypto.derive(self._seed, self.labels.self_mask()))
        for v in neighbours:
            peer = self.peers.get(v)
            if peer is None or v == self.worker_id:
                raise ProtocolError(f"the coordinator named {v!r} as a neighbour, which it never introduced")
            seed = crypto.agree(self._mask, peer.mask_key, self.labels.pair(self.worker_id, v))
            crypto.add_prg(encoded, seed, 1 if self.worker_id < v else -1)
        return encoded

    def reveal(self, survivors: Iterable[str], dropped: Iterable[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(self-mask shares of ``survivors``, mask-key shares of ``dropped``), from the shares held. Refuses
        (ProtocolError) a request that would reveal both kinds for one neighbour, now or with an earlier one."""
        alive, gone = set(survivors), set(dropped)
        if self.worker_id in gone:
            raise ProtocolError("the coordinator counts this worker as dropped while asking it to unmask")
        both = alive & gone | {d for d in alive if self._revealed.get(d) == "mask_key"} \
            | {d for d in gone if self._revealed.get(d) == "self_mask"}
        if both:
            raise ProtocolError(f"the coordinator asked for both kinds of share of {', '.join(sorted(both))}: refused, "
                                "since together they would unmask that worker's update")
        self_masks = {d: self._held[d][1] for d in sorted(alive) if d in self._held}
        mask_keys = {d: self._held[d][0] for d in sorted(gone) if d in self._held}
        self._revealed.update({d: "self_mask" for d in self_masks})
        self._revealed.update({d: "mask_key" for d in mask_keys})
        return self_masks, mask_keys


@dataclass(frozen=True)
class NoiseShare:
    """--dp distributed: clip the delta's L2 norm to ``clip`` and add N(0, ``std``²) to each coordinate, both
    over the tensors not in ``frozen``; the worker counts as one example (DP-FedAvg does not weigh)."""

    clip: float
    std: float
    frozen: frozenset[str] = frozenset()


def masked_update(session: ClientRound, weights: Weights, base: Weights, neighbours: Iterable[str], scale: float,
                  clip: float, num_examples: int, noise: NoiseShare | None = None,
                  rng: np.random.Generator | None = None) -> tuple[Weights, int, bool]:
    """(The update ``weights`` as the worker uploads it: its delta from ``base`` — with ``noise``, clipped and
    noised with ``rng`` — encoded in the ring (``ring.encode``) and masked (``ClientRound.mask``), as uint64
    tensors of the same names and shapes; how many coordinates were clipped to ±``clip``; whether the L2
    clipping of ``noise`` scaled the delta down). The flat vector runs over the tensors sorted by name, as
    the coordinator's masked sum does."""
    names = sorted(base)
    if sorted(weights) != names:
        raise ProtocolError("the trained model's tensors differ from the global model's")
    sizes = [int(np.asarray(base[n]).size) for n in names]
    delta = np.empty(sum(sizes), dtype=np.float64)
    pos = 0
    for name, size in zip(names, sizes, strict=True):
        np.subtract(np.asarray(weights[name], dtype=np.float64).reshape(-1),
                    np.asarray(base[name], dtype=np.float64).reshape(-1), out=delta[pos:pos + size])
        pos += size
    scaled_down = False
    if noise is not None:
        keep = np.ones(delta.size, dtype=bool)
        pos = 0
        for name, size in zip(names, sizes, strict=True):
            keep[pos:pos + size] = name not in noise.frozen
            pos += size
        delta[~keep] = 0.0
        norm = float(np.sqrt(np.einsum("i,i->", delta, delta)))
        if norm > noise.clip:
            delta *= noise.clip / norm
            scaled_down = True
        generator = rng if rng is not None else np.random.default_rng()
        delta[keep] += generator.normal(0.0, noise.std, int(keep.sum()))
        num_examples = 1
    flat, clipped = ring.encode(delta, clip, scale, num_examples)
    session.mask(flat, neighbours)
    out: Weights = {}
    pos = 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = flat[pos:pos + size].reshape(np.asarray(base[name]).shape)
        pos += size
    return out, clipped, scaled_down
