"""The coordinator's side of one secure-aggregation round attempt (SecAgg+: Bell et al., CCS 2020, after
Bonawitz et al., CCS 2017), as pure bookkeeping: the engine drives its phases, the HTTP layer feeds it.

    keys     sampled workers send two public keys, a commitment to their self-mask seed and their
             example count                                              → U1 (who sent keys)
    shares   each worker of U1 gets its neighbours' keys (``graph.neighbours`` over U1) and deals
             shares of its secrets to them, encrypted; the coordinator only relays them  → U2
    masked   each worker of U2 gets the shares dealt to it, trains, and uploads its masked update,
             folded into a ``MaskedSum`` as it arrives                  → U3 (who uploaded)
    unmask   each worker of U3 reveals, for each neighbour, the self-mask share of those in U3 and
             the mask-key share of those in U2 − U3; with a threshold of valid shares per secret, the
             coordinator removes the masks and is left with the sum of U3's encoded updates

Every phase needs at least ``needed`` = ⌈--secagg-threshold × sampled⌉ workers; each secret needs
⌈--secagg-threshold × its holders⌉ valid shares. Each revealed share is checked against the commitment
its dealer sent with it, so a wrong one is refused and its sender named; a secret whose valid shares do
not give back what its dealer committed to names the dealer.

The coordinator here is honest but curious: it follows the protocol and may look at everything it
receives. What it stores and sees of one worker is its public keys, ciphertexts, commitments and the
masked vector, uniform in the ring (docs/privacy.md has the threat model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedfleet.errors import ProtocolError, RequestRejected
from fedfleet.secagg import crypto, graph, ring, shamir
from fedfleet.secagg.labels import Labels
from fedfleet.types import Schema, TensorSpec, Weights

Phase = Literal["keys", "shares", "masked", "unmask", "done", "failed"]
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16  # nonce, two shares, GCM tag


class SecAggFailure(Exception):
    """The attempt cannot be unmasked (too few valid shares, a dealer whose shares do not reconstruct
    its commitment); ``culprits`` are the workers to leave out of the next attempt."""

    def __init__(self, message: str, culprits: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.culprits = frozenset(culprits)


@dataclass(frozen=True)
class Keys:
    enc_key: bytes
    mask_key: bytes
    seed_commitment: bytes
    num_examples: int


@dataclass(frozen=True)
class Settings:
    threshold: float  # --secagg-threshold
    neighbours: int | None  # --secagg-neighbours; None: graph.default_neighbours
    clip: float  # --secagg-clip
    weighted: bool = True  # False under --dp distributed: each worker encodes its update as one example


def flat_order(schema: Schema) -> list[TensorSpec]:
    """The order tensors take in the flat vector that masks cover: by name, which both sides know alike
    (not the order of a safetensors header, which an encoder may choose)."""
    return sorted(schema, key=lambda s: s.name)


def masked_schema(schema: Schema) -> Schema:
    """What a masked update looks like: each tensor's shape, its values ring elements (uint64)."""
    return tuple(TensorSpec(s.name, "uint64", s.shape) for s in schema)


class MaskedSum:
    """Σ of the masked updates in Z/2⁶⁴Z, one flat uint64 array over every tensor in ``flat_order``. It has the
    interface of ``strategies.accumulate.WeightedSum`` that the intake folds with; weights play no part
    (each update carries its own example count inside)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.base: Weights | None = None
        self._offsets: dict[str, int] = {}
        pos = 0
        for s in flat_order(schema):
            self._offsets[s.name] = pos
            pos += math.prod(s.shape)
        self.total = np.zeros(pos, dtype=np.uint64)
        self.count = 0
        self.total_weight = 0.0

    def add(self, update: Weights, weight: float) -> float:
        for s in self.schema:
            self.add_part(s.name, 0, np.asarray(update[s.name]).reshape(-1), weight)
        self.end_add(weight)
        return 0.0

    def add_part(self, name: str, start: int, values: np.ndarray, weight: float) -> float:
        begin = self._offsets[name] + start
        part = self.total[begin:begin + values.size]
        np.add(part, values.view(np.uint64).reshape(-1), out=part)
        return 0.0

    def end_add(self, weight: float) -> None:
        self.count += 1
        self.total_weight += weight

    def release(self) -> None:
        self.total = np.zeros(0, dtype=np.uint64)


@dataclass
class ServerRound:
    labels: Labels
    sampled: tuple[str, ...]
    settings: Settings
    seed: int  # of the neighbour graph
    phase: Phase = "keys"
    keys: dict[str, Keys] = field(default_factory=dict)
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)  # over U1
    inbox: dict[str, dict[str, bytes]] = field(default_factory=dict)  # holder -> dealer -> ciphertext
    commitments: dict[tuple[str, str], tuple[bytes, bytes]] = field(default_factory=dict)  # (dealer, holder)
    dealt: set[str] = field(default_factory=set)  # U2
    scale: float = 0.0
    survivors: frozenset[str] = frozenset()  # U3
    revealed: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = field(default_factory=dict)
    valid_self: dict[str, dict[int, bytes]] = field(default_factory=dict)  # dealer -> x -> share
    valid_keys: dict[str, dict[int, bytes]] = field(default_factory=dict)
    bad_shares: list[str] = field(default_factory=list)  # messages naming who sent a wrong share
    bytes_in: int = 0

    @property
    def needed(self) -> int:
        """Workers that must take part in every phase: ⌈threshold × sampled⌉, at least 2."""
        return max(2, math.ceil(self.settings.threshold * len(self.sampled) - 1e-9))

    def x(self, worker: str) -> int:
        return 1 + self.sampled.index(worker)

    def holders(self, dealer: str) -> tuple[str, ...]:
        """Who holds shares of ``dealer``'s secrets: its neighbours and itself."""
        return tuple(sorted((*self.neighbours[dealer], dealer)))

    def secret_threshold(self, dealer: str) -> int:
        return graph.threshold_of(len(self.holders(dealer)), self.settings.threshold)

    # --- keys --------------------------------------------------------------------------------------------
    def add_keys(self, worker: str, keys: Keys) -> None:
        self._expect("keys", worker, self.sampled)
        if worker in self.keys:
            raise RequestRejected(f"worker {worker} already sent its keys for this round", worker=worker,
                                  reason="duplicate")
        for name, value in (("enc_key", keys.enc_key), ("mask_key", keys.mask_key),
                            ("seed_commitment", keys.seed_commitment)):
            if len(value) != crypto.KEY_BYTES:
                raise ProtocolError(f"{name} is {len(value)} bytes, not {crypto.KEY_BYTES}", status=422,
                                    reason="bad_secagg")
        if keys.enc_key == keys.mask_key or any(k.enc_key in (keys.enc_key, keys.mask_key)
                                                or k.mask_key in (keys.enc_key, keys.mask_key)
                                                for k in self.keys.values()):
            raise ProtocolError("public keys must be fresh: this one was seen already", status=422,
                                reason="bad_secagg")
        self.keys[worker] = keys

    def keys_missing(self) -> list[str]:
        return [w for w in self.sampled if w not in self.keys]

    def close_keys(self) -> None:
        """End the keys phase: the neighbour graph over U1. SecAggFailure below ``needed``."""
        self._at_least(self.keys, "sent their keys")
        u1 = sorted(self.keys)
        k = self.settings.neighbours if self.settings.neighbours is not None else graph.default_neighbours(len(u1))
        self.neighbours = graph.neighbours(u1, k, self.seed)
        self.phase = "shares"

    def roster(self, worker: str) -> list[tuple[str, int, bytes, bytes]]:
        """(id, share coordinate, encryption key, mask key) of the holders of ``worker``'s shares."""
        return [(w, self.x(w), self.keys[w].enc_key, self.keys[w].mask_key) for w in self.holders(worker)]

    # --- shares ------------------------------------------------------------------------------------------
    def add_shares(self, dealer: str, dealt: Mapping[str, tuple[bytes, bytes, bytes]]) -> None:
        """``dealt``: holder → (ciphertext, mask-key share commitment, self-mask share commitment), one for
        each holder of the dealer's secrets, itself included."""
        self._expect("shares", dealer, self.keys)
        if dealer in self.dealt:
            raise RequestRejected(f"worker {dealer} already dealt its shares for this round", worker=dealer,
                                  reason="duplicate")
        holders = set(self.holders(dealer))
        if set(dealt) != holders:
            missing, extra = sorted(holders - set(dealt)), sorted(set(dealt) - holders)
            raise ProtocolError(f"shares must go to exactly this worker's neighbours and itself: missing "
                                f"{missing or 'none'}, not neighbours {extra or 'none'}", status=422,
                                reason="bad_secagg")
        for holder, (ciphertext, c_key, c_self) in dealt.items():
            if len(ciphertext) != CIPHERTEXT_BYTES or len(c_key) != 32 or len(c_self) != 32:
                raise ProtocolError(f"the share for {holder} is malformed: a ciphertext is {CIPHERTEXT_BYTES} bytes "
                                    "and a commitment 32", status=422, reason="bad_secagg")
        for holder, (ciphertext, c_key, c_self) in dealt.items():
            self.inbox.setdefault(holder, {})[dealer] = ciphertext
            self.commitments[(dealer, holder)] = (c_key, c_self)
        self.dealt.add(dealer)

    def shares_missing(self) -> list[str]:
        return [w for w in sorted(self.keys) if w not in self.dealt]

    def close_shares(self) -> None:
        """End the shares phase: fix the round's fixed-point scale from U2's example counts."""
        self._at_least(self.dealt, "dealt their shares")
        self.scale = ring.scale_for(sum(self._examples(w) for w in self.dealt), self.settings.clip)
        self.phase = "masked"

    def masking_for(self, worker: str) -> tuple[list[str], dict[str, bytes]]:
        """(the neighbours ``worker`` masks with: those in U2, the shares dealt to it by U2)."""
        neighbours = [v for v in self.neighbours[worker] if v in self.dealt]
        inbox = {d: c for d, c in self.inbox.get(worker, {}).items() if d in self.dealt}
        return neighbours, inbox

    def upload_problem(self, worker: str, num_examples: int) -> tuple[int, str] | None:
        """(HTTP status, message) if ``worker``'s masked update cannot be taken now, else None."""
        if self.phase != "masked":
            return 409, (f"secure aggregation of round {self.labels.round} is in its {self.phase} phase: masked "
                         "updates are taken once the key shares are dealt")
        if worker not in self.dealt:
            return 409, f"worker {worker} dealt no key shares this round, so its masked update could not be unmasked"
        announced = self.keys[worker].num_examples
        if num_examples != announced:
            return 422, (f"num_examples {num_examples} differs from the {announced} this worker announced with its "
                         "keys, which the round's scale was fixed with")
        return None

    # --- unmask ------------------------------------------------------------------------------------------
    def close_masked(self, answered: Iterable[str]) -> None:
        self.survivors = frozenset(answered)
        self._at_least(self.survivors, "uploaded masked updates")
        self.phase = "unmask"

    def reveal_request(self, worker: str) -> tuple[list[str], list[str]]:
        """(neighbours and itself whose self-mask share ``worker`` reveals, neighbours whose mask-key share)."""
        mine = set(self.holders(worker)) & self.dealt
        return sorted(mine & self.survivors), sorted((mine - self.survivors) - {worker})

    def add_reveal(self, worker: str, self_masks: Mapping[str, bytes], mask_keys: Mapping[str, bytes]) -> None:
        """Take ``worker``'s revealed shares; each is checked against its dealer's commitment, and one that
        does not match is left out, and its sender named in ``bad_shares``."""
        self._expect("unmask", worker, self.survivors)
        if worker in self.revealed:
            raise RequestRejected(f"worker {worker} already revealed its shares for this round", worker=worker,
                                  reason="duplicate")
        want_self, want_keys = self.reveal_request(worker)
        if set(self_masks) - set(want_self) or set(mask_keys) - set(want_keys):
            raise ProtocolError("shares revealed for workers the coordinator did not ask about", status=422,
                                reason="bad_secagg")
        self.revealed[worker] = (dict(self_masks), dict(mask_keys))
        x = self.x(worker)
        for kind, shares, valid, index in (("self_mask", self_masks, self.valid_self, 1),
                                           ("mask_key", mask_keys, self.valid_keys, 0)):
            for dealer, share in shares.items():
                expected = self.commitments[(dealer, worker)][index]
                if crypto.commitment(self.labels.share(kind, dealer, worker), share) != expected:
                    self.bad_shares.append(f"worker {worker} sent a {kind.replace('_', '-')} share of {dealer}'s "
                                           "that does not match the share its dealer committed to")
                    continue
                valid.setdefault(dealer, {})[x] = share

    def reveal_missing(self) -> list[str]:
        return sorted(w for w in self.survivors if w not in self.revealed)

    def unmaskable(self) -> bool:
        """Whether every secret the unmasking needs has enough valid shares."""
        return not self._short()

    def _short(self) -> list[str]:
        out = []
        for dealer in sorted(self.survivors):
            have, need = len(self.valid_self.get(dealer, {})), self.secret_threshold(dealer)
            if have < need:
                out.append(f"{dealer}'s self-mask seed has {have} valid shares of the {need} needed")
        for dealer in self.dropped():
            have, need = len(self.valid_keys.get(dealer, {})), self.secret_threshold(dealer)
            if have < need:
                out.append(f"{dealer}'s mask key has {have} valid shares of the {need} needed")
        return out

    def dropped(self) -> list[str]:
        """Workers that dealt shares and then sent no masked update, and that a survivor masked with."""
        return sorted(d for d in self.dealt - self.survivors if set(self.neighbours[d]) & self.survivors)

    def unmask(self, total: np.ndarray) -> np.ndarray:
        """Remove every mask from ``total`` (the masked sum, flat uint64, changed in place) and return the
        example-weighted mean of the survivors' clipped deltas (float64, flat). SecAggFailure, naming the
        workers to blame, if a secret cannot be reconstructed or does not match its commitment."""
        short = self._short()
        if short:
            raise SecAggFailure(f"round {self.labels.round} could not be unmasked: {len(self.revealed)} of the "
                                f"{len(self.survivors)} workers that uploaded revealed their shares; "
                                + "; ".join(short[:5]) + (f" (and {len(short) - 5} more)" if len(short) > 5 else ""))
        bad: list[str] = []
        for dealer in sorted(self.survivors):
            seed = _combine(self.valid_self[dealer], self.secret_threshold(dealer))
            if crypto.commitment(self.labels.seed(dealer), seed) != self.keys[dealer].seed_commitment:
                bad.append(dealer)
                continue
            crypto.add_prg(total, crypto.derive(seed, self.labels.self_mask()), -1)
        for dealer in self.dropped():
            raw = _combine(self.valid_keys[dealer], self.secret_threshold(dealer))
            try:
                key = crypto.key_from_bytes(raw)
            except ValueError:
                bad.append(dealer)
                continue
            if crypto.public_bytes(key) != self.keys[dealer].mask_key:
                bad.append(dealer)
                continue
            for v in self.neighbours[dealer]:
                if v in self.survivors:
                    # v added +PRG(s_vd) if v sorts before the dropped dealer, −PRG otherwise: take it back.
                    seed = crypto.agree(key, self.keys[v].mask_key, self.labels.pair(v, dealer))
                    crypto.add_prg(total, seed, -1 if v < dealer else 1)
        if bad:
            raise SecAggFailure(f"round {self.labels.round}: the shares dealt by {', '.join(bad)} do not give back "
                                "the secrets they committed to (a dealer sent inconsistent shares)", culprits=bad)
        self.phase = "done"
        return ring.decode(total, self.scale, sum(self._examples(w) for w in self.survivors))

    def _examples(self, worker: str) -> int:
        """What ``worker``'s encoded update is multiplied by: its example count, or 1 when unweighted."""
        return self.keys[worker].num_examples if self.settings.weighted else 1

    # --- helpers -----------------------------------------------------------------------------------------
    def _expect(self, phase: Phase, worker: str, members: Iterable[str]) -> None:
        if self.phase != phase:
            raise RequestRejected(f"secure aggregation of round {self.labels.round} is in its {self.phase} phase, "
                                  f"not {phase}", worker=worker, reason="stale")
        if worker not in set(members):
            raise RequestRejected(f"worker {worker} takes no part in the {phase} phase of round {self.labels.round}",
                                  worker=worker, reason="not_sampled")

    def _at_least(self, members: Iterable[str], what: str) -> None:
        got = len(set(members))
        if got < self.needed:
            self.phase = "failed"
            raise SecAggFailure(f"secure aggregation of round {self.labels.round} needs {self.needed} of the "
                                f"{len(self.sampled)} sampled workers (--secagg-threshold "
                                f"{self.settings.threshold:g}); only {got} {what}")


def _combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    chosen = dict(sorted(shares.items())[:threshold])
    return shamir.combine(chosen)
