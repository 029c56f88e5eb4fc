"""The labels that bind every derived key, encryption and commitment of secure aggregation to one run,
one round attempt and the workers concerned: nothing made for one attempt is of use in another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Labels:
    run_id: str
    round: int
    attempt: int

    def _label(self, *parts: str) -> bytes:
        return "|".join(("fedfleet-secagg-v1", self.run_id, str(self.round), str(self.attempt), *parts)).encode()

    def seed(self, worker: str) -> bytes:
        return self._label("self_seed", worker)

    def self_mask(self) -> bytes:
        return self._label("self_mask_prg")

    def pair(self, a: str, b: str) -> bytes:
        """The same for (a, b) and (b, a): both ends derive one seed."""
        lo, hi = sorted((a, b))
        return self._label("pair_mask_prg", lo, hi)

    def share_key(self, dealer: str, holder: str) -> bytes:
        return self._label("share_key", dealer, holder)

    def share_aad(self, dealer: str, holder: str) -> bytes:
        return self._label("share", dealer, holder)

    def share(self, kind: str, dealer: str, holder: str) -> bytes:
        return self._label("share_commitment", kind, dealer, holder)
