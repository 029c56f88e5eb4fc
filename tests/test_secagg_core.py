"""Unit tests of the pure core of secure aggregation (``fedfleet.secagg``): Shamir sharing, the fixed-point
ring encoding, the neighbour graph, the cryptographic primitives, and a worker's and the coordinator's sides
of a round attempt driven together in memory (no HTTP), including dropouts, wrong shares, lying dealers,
a coordinator asking for too much, and the statistics of a masked upload."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfleet.errors import ProtocolError, RequestRejected
from fedfleet.secagg import client as client_module
from fedfleet.secagg import crypto, graph, ring, shamir
from fedfleet.secagg.client import ClientRound, Peer, masked_update
from fedfleet.secagg.labels import Labels
from fedfleet.secagg.server import (
    CIPHERTEXT_BYTES,
    Keys,
    MaskedSum,
    SecAggFailure,
    ServerRound,
    Settings,
    flat_order,
    masked_schema,
)
from fedfleet.types import TensorSpec

FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
U = 2.0**-53  # float64 unit roundoff


# --- shamir ----------------------------------------------------------------------------------------------

secrets_32 = st.binary(min_size=32, max_size=32)


@st.composite
def sharing(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    secret = draw(secrets_32)
    n = draw(st.integers(2, 20))
    if draw(st.booleans()):
        xs = list(range(1, n + 1))
    else:
        xs = sorted(draw(st.sets(st.integers(1, shamir.PRIME - 1), min_size=n, max_size=n)))
    threshold = draw(st.integers(1, n))
    return secret, xs, threshold


@FAST
@given(sharing(), st.data())
def test_shamir_any_threshold_of_the_shares_give_the_secret_back(case: tuple[bytes, list[int], int],
                                                                 data: st.DataObject) -> None:
    secret, xs, threshold = case
    shares = shamir.split(secret, xs, threshold)
    assert sorted(shares) == sorted(xs)
    assert all(len(s) == shamir.SHARE_BYTES and int.from_bytes(s, "big") < shamir.PRIME for s in shares.values())
    size = data.draw(st.integers(threshold, len(xs)), label="subset size")
    chosen = data.draw(st.permutations(xs), label="order")[:size]
    assert shamir.combine({x: shares[x] for x in chosen}) == secret


@FAST
@given(sharing(), st.data())
def test_shamir_fewer_than_threshold_shares_tell_another_value(case: tuple[bytes, list[int], int],
                                                               data: st.DataObject) -> None:
    secret, xs, threshold = case
    if threshold < 2:
        threshold = 2
    shares = shamir.split(secret, xs, threshold)
    size = data.draw(st.integers(1, threshold - 1), label="subset size")
    chosen = data.draw(st.permutations(xs), label="order")[:size]
    got = shamir.combine({x: shares[x] for x in chosen})
    assert got != secret
    assert got == b"" or len(got) == shamir.SECRET_BYTES


def test_shamir_threshold_one_shares_are_the_secret_and_shares_are_random() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3], threshold=1)
    assert all(shamir.combine({x: s}) == secret for x, s in shares.items())
    # The polynomial's other coefficients are fresh each time: two sharings of one secret differ.
    assert shamir.split(secret, [1, 2, 3], 2) != shamir.split(secret, [1, 2, 3], 2)


def test_shamir_a_wrong_share_gives_another_value() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, range(1, 6), threshold=3)
    tampered = {x: shares[x] for x in (1, 2, 3)}
    tampered[2] = tampered[2][:-1] + bytes([tampered[2][-1] ^ 1])
    assert shamir.combine(tampered) != secret


@pytest.mark.parametrize(("secret", "xs", "threshold"), [
    (bytes(31), [1, 2, 3], 2),
    (bytes(33), [1, 2, 3], 2),
    (b"", [1, 2, 3], 2),
    (bytes(32), [1, 2, 3], 0),
    (bytes(32), [1, 2, 3], 4),
    (bytes(32), [], 1),
    (bytes(32), [1, 1, 2], 2),
    (bytes(32), [0, 1, 2], 2),
    (bytes(32), [-1, 1, 2], 2),
    (bytes(32), [1, 2, shamir.PRIME], 2),
])
def test_shamir_split_refuses_bad_input(secret: bytes, xs: list[int], threshold: int) -> None:
    with pytest.raises(ValueError):
        shamir.split(secret, xs, threshold)


@pytest.mark.parametrize("shares", [
    {},
    {1: bytes(shamir.SHARE_BYTES - 1), 2: bytes(shamir.SHARE_BYTES)},
    {1: bytes(shamir.SHARE_BYTES + 1), 2: bytes(shamir.SHARE_BYTES)},
    {1: shamir.PRIME.to_bytes(shamir.SHARE_BYTES, "big"), 2: bytes(shamir.SHARE_BYTES)},
    {1: b"\xff" * shamir.SHARE_BYTES, 2: bytes(shamir.SHARE_BYTES)},
])
def test_shamir_combine_refuses_bad_shares(shares: dict[int, bytes]) -> None:
    with pytest.raises(ValueError):
        shamir.combine(shares)


# --- ring ------------------------------------------------------------------------------------------------

def exact_mean(counts: list[int], deltas: list[np.ndarray], clip: float) -> list[Fraction]:
    """Σ n·clip(Δ) / Σ n, coordinate by coordinate, in exact rational arithmetic."""
    clipped = [np.clip(np.asarray(d, dtype=np.float64), -clip, clip) for d in deltas]
    total = sum(counts)
    return [sum((Fraction(n) * Fraction(float(c[j])) for n, c in zip(counts, clipped, strict=True)), Fraction(0))
            / total for j in range(clipped[0].size)]


def max_error(mean: np.ndarray, reference: list[Fraction]) -> float:
    return float(max(abs(Fraction(float(m)) - r) for m, r in zip(mean, reference, strict=True)))


clips = st.sampled_from([1e-3, 0.1, 1.0, 3.0, 10.0, 100.0, 1234.5])


@st.composite
def workers_deltas(draw: st.DrawFn) -> tuple[float, list[int], list[np.ndarray]]:
    clip = draw(clips)
    workers = draw(st.integers(1, 6))
    size = draw(st.integers(1, 24))
    big = draw(st.booleans())
    counts = [draw(st.integers(1, 10**6 if big else 50)) for _ in range(workers)]
    value = st.one_of(
        st.floats(-3 * clip, 3 * clip, allow_nan=False),
        st.sampled_from([clip, -clip, 0.0, math.inf, -math.inf, 1e300, -1e300]),
    )
    deltas = [np.array(draw(st.lists(value, min_size=size, max_size=size)), dtype=np.float64)
              for _ in range(workers)]
    return clip, counts, deltas


@FAST
@given(workers_deltas())
def test_ring_weighted_mean_round_trips_within_its_error(case: tuple[float, list[int], list[np.ndarray]]) -> None:
    clip, counts, deltas = case
    scale = ring.scale_for(sum(counts), clip)
    total = np.zeros(deltas[0].size, dtype=np.uint64)
    for n, d in zip(counts, deltas, strict=True):
        encoded, clipped = ring.encode(d, clip, scale, n)
        assert encoded.dtype == np.uint64 and encoded.shape == (d.size,)
        assert clipped == int(np.count_nonzero(np.abs(d) > clip))
        total += encoded
    mean = ring.decode(total, scale, sum(counts))
    err = max_error(mean, exact_mean(counts, deltas, clip))
    # The grid's rounding (1 / (2 scale)) and four float64 roundings of values of at most `clip` each.
    assert err <= ring.error_bound(scale, clip)
    assert np.all(np.abs(mean) <= clip + ring.error_bound(scale, clip))


def test_ring_error_bound_holds_at_large_example_counts() -> None:
    """Where the grid's rounding dominates (many examples), the documented bound holds, against the exact
    mean and against the same mean taken in float64."""
    rng = np.random.default_rng(7)
    clip = 10.0
    counts = [int(c) for c in rng.integers(1_000, 100_000, size=8)]
    deltas = [rng.normal(0, 5, size=200) for _ in counts]
    scale = ring.scale_for(sum(counts), clip)
    total = np.zeros(200, dtype=np.uint64)
    for n, d in zip(counts, deltas, strict=True):
        total += ring.encode(d, clip, scale, n)[0]
    mean = ring.decode(total, scale, sum(counts))
    bound = ring.error_bound(scale, clip)
    assert max_error(mean, exact_mean(counts, deltas, clip)) <= bound
    float_mean = sum(n * np.clip(d, -clip, clip) for n, d in zip(counts, deltas, strict=True)) / sum(counts)
    assert np.max(np.abs(mean - float_mean)) <= bound


def test_ring_error_bound_holds_for_one_worker_with_three_examples() -> None:
    """One worker's mean is its own clipped delta, exactly: nothing but the ring's encoding can be off."""
    clip, n, x = 0.1, 3, 0.09970784024990031
    scale = ring.scale_for(n, clip)
    encoded, _ = ring.encode(np.array([x]), clip, scale, n)
    got = float(ring.decode(encoded, scale, n)[0])
    assert abs(got - x) <= ring.error_bound(scale, clip), (
        f"decoded {got!r} for {x!r}: off by {abs(got - x):.3g}, over error_bound {ring.error_bound(scale, clip):.3g}")


@pytest.mark.parametrize("total_examples", [1, 2, 3, 7, 1000, 123_457, 10**9, 10**12 * 50])
@pytest.mark.parametrize("clip", [1e-3, 1.0, 10.0, 100.0, 12345.678])
def test_ring_sum_never_wraps_at_the_extremes(total_examples: int, clip: float) -> None:
    """Every worker at +clip (or −clip, or beyond) in every coordinate: the ring sum stays in the signed range
    and decodes to ±clip."""
    scale = ring.scale_for(total_examples, clip)
    # Split the examples among up to 4 workers, unevenly.
    parts = [total_examples // 2, total_examples // 3, total_examples // 7]
    counts = [p for p in parts if p > 0]
    counts.append(total_examples - sum(counts))
    delta = np.array([clip, -clip, clip * 1e6, -math.inf, 0.0])
    total = np.zeros(delta.size, dtype=np.uint64)
    for n in counts:
        encoded, clipped = ring.encode(delta, clip, scale, n)
        assert clipped == 2
        total += encoded
    signed = total.view(np.int64)
    assert signed[0] > 0 and signed[1] < 0 and signed[2] > 0 and signed[3] < 0 and signed[4] == 0
    # Σ n·q stays within 2⁶² and a few float64 roundings of it: far from wrapping at 2⁶³.
    assert abs(int(signed[0])) <= 2**62 + 2**62 * 4 * U + total_examples
    assert abs(int(signed[3])) <= 2**62 + 2**62 * 4 * U + total_examples
    mean = ring.decode(total, scale, total_examples)
    np.testing.assert_allclose(mean, [clip, -clip, clip, -clip, 0.0], rtol=0, atol=ring.error_bound(scale, clip))


def test_ring_scale_and_bound() -> None:
    assert ring.scale_for(1000, 10.0) == 2.0**62 / 10_000
    assert ring.scale_for(1, 1.0) == 2.0**62
    assert ring.error_bound(ring.scale_for(10**6, 100.0), 100.0) < 2e-11
    for bad in [(0, 1.0), (-3, 1.0), (10, 0.0), (10, -1.0), (10, math.nan)]:
        with pytest.raises(ValueError):
            ring.scale_for(*bad)


def test_ring_encode_reads_any_shape_as_flat_float64() -> None:
    scale = ring.scale_for(2, 1.0)
    encoded, clipped = ring.encode(np.array([[0.5, -2.0], [0.25, 1.0]], dtype=np.float32), 1.0, scale, 2)
    assert encoded.shape == (4,) and clipped == 1
    np.testing.assert_array_equal(ring.decode(encoded, scale, 2), [0.5, -1.0, 0.25, 1.0])


# --- graph -----------------------------------------------------------------------------------------------

def worker_ids(n: int) -> list[str]:
    return [f"w{i:03d}" for i in range(n)]


def connected(adjacency: dict[str, tuple[str, ...]]) -> bool:
    start = next(iter(adjacency))
    seen, todo = {start}, [start]
    while todo:
        for v in adjacency[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(adjacency)


@settings(deadline=None, max_examples=150)
@given(st.integers(2, 70), st.integers(0, 80), st.integers(0, 2**32 - 1))
def test_graph_neighbours_is_a_symmetric_k_regular_ring(n: int, k: int, seed: int) -> None:
    ids = worker_ids(n)
    got = graph.neighbours(list(reversed(ids)), k, seed)
    assert set(got) == set(ids)
    for w, vs in got.items():
        assert w not in vs
        assert list(vs) == sorted(set(vs))
        assert all(w in got[v] for v in vs)
        if k >= n - 1:
            assert set(vs) == set(ids) - {w}
        else:
            assert len(vs) >= k
            assert len(vs) == 2 * math.ceil(k / 2)  # the ⌈k/2⌉ on each side of it on the ring
    if k >= 1:
        assert connected(got)
    assert graph.neighbours(ids, k, seed) == got  # the same graph for one seed, whatever the input order


def test_graph_neighbours_depend_on_the_seed() -> None:
    ids = worker_ids(30)
    graphs = {tuple(sorted(graph.neighbours(ids, 8, seed).items())) for seed in range(5)}
    assert len(graphs) == 5
    assert graph.neighbours(ids, 29, 1) == graph.neighbours(ids, 29, 2)  # everyone with everyone: no order


def smallest_k_at_least_3_log2(n: int) -> int:
    """⌈3 log₂ n⌉ in exact integer arithmetic: the least k with 2^k ≥ n³."""
    return (n**3 - 1).bit_length()


@pytest.mark.parametrize("n", range(0, 21))
def test_graph_default_neighbours_is_everyone_up_to_20(n: int) -> None:
    assert graph.default_neighbours(n) == max(n - 1, 0)


def test_graph_default_neighbours_beyond_20() -> None:
    assert [graph.default_neighbours(n) for n in (21, 30, 50, 100, 1000, 1024, 1025)] == [14, 16, 18, 20, 30, 30, 32]
    for n in range(21, 5000):
        k = smallest_k_at_least_3_log2(n)
        assert graph.default_neighbours(n) == min(n - 1, k + k % 2), n


@pytest.mark.parametrize(("holders", "share", "expected"), [
    (10, 0.6, 6), (3, 0.6, 2), (2, 0.6, 2), (1, 0.6, 1), (9, 0.6, 6), (17, 0.6, 11), (100, 0.5, 50),
    (101, 0.5, 51), (7, 1.0, 7), (10, 0.1, 2), (10, 0.7, 7), (3, 2 / 3, 2), (30, 0.3, 9),
])
def test_graph_threshold_of(holders: int, share: float, expected: int) -> None:
    assert graph.threshold_of(holders, share) == expected


@given(st.integers(1, 500), st.integers(1, 100))
def test_graph_threshold_of_is_the_ceiling_of_share_times_holders(holders: int, percent: int) -> None:
    exact = math.ceil(Fraction(percent, 100) * holders)
    assert graph.threshold_of(holders, percent / 100) == min(holders, max(2, exact))


# --- crypto ----------------------------------------------------------------------------------------------

def test_crypto_agree_is_symmetric_and_bound_to_its_label() -> None:
    a, b, c = crypto.new_private_key(), crypto.new_private_key(), crypto.new_private_key()
    ab = crypto.agree(a, crypto.public_bytes(b), b"label")
    assert len(ab) == crypto.KEY_BYTES
    assert ab == crypto.agree(b, crypto.public_bytes(a), b"label")
    assert ab == crypto.agree(crypto.key_from_bytes(crypto.private_bytes(b)), crypto.public_bytes(a), b"label")
    assert ab != crypto.agree(a, crypto.public_bytes(b), b"other label")
    assert ab != crypto.agree(a, crypto.public_bytes(c), b"label")
    assert crypto.public_bytes(a) == crypto.public_bytes(a.public_key())
    with pytest.raises(ValueError):
        crypto.agree(a, crypto.public_bytes(b)[:31], b"label")
    with pytest.raises(ValueError):
        crypto.agree(a, bytes(32), b"label")  # a low-order point: the shared secret would be all zeros


def test_crypto_derive_is_deterministic_and_label_bound() -> None:
    seed = os.urandom(32)
    assert crypto.derive(seed, b"x") == crypto.derive(seed, b"x")
    assert crypto.derive(seed, b"x") != crypto.derive(seed, b"y")
    assert crypto.derive(seed, b"x") != crypto.derive(os.urandom(32), b"x")


@given(st.binary(max_size=300), st.binary(max_size=64))
def test_crypto_encrypt_decrypt_round_trip(plaintext: bytes, aad: bytes) -> None:
    key = os.urandom(32)
    ciphertext = crypto.encrypt(key, plaintext, aad)
    assert len(ciphertext) == crypto.NONCE_BYTES + len(plaintext) + 16
    assert crypto.decrypt(key, ciphertext, aad) == plaintext
    assert crypto.encrypt(key, plaintext, aad) != ciphertext  # a fresh nonce each time


def test_crypto_decrypt_refuses_wrong_aad_key_or_tampering() -> None:
    key, aad = os.urandom(32), b"share|a|b"
    ciphertext = crypto.encrypt(key, b"x" * 132, aad)
    with pytest.raises(InvalidTag):
        crypto.decrypt(key, ciphertext, b"share|a|c")
    with pytest.raises(InvalidTag):
        crypto.decrypt(os.urandom(32), ciphertext, aad)
    for pos in (0, crypto.NONCE_BYTES, len(ciphertext) - 1):
        tampered = bytearray(ciphertext)
        tampered[pos] ^= 0x40
        with pytest.raises(InvalidTag):
            crypto.decrypt(key, bytes(tampered), aad)


def test_crypto_commitment_binds_label_and_value() -> None:
    c = crypto.commitment(b"label", b"value")
    assert len(c) == 32 and c == crypto.commitment(b"label", b"value")
    assert c != crypto.commitment(b"label", b"valuf")
    assert c != crypto.commitment(b"labek", b"value")
    assert crypto.commitment(b"ab", b"c") != crypto.commitment(b"a", b"bc")  # the label is length-prefixed


def aes_ctr_stream(seed: bytes, size: int) -> np.ndarray:
    """The reference: AES-256-CTR keystream with a zero counter block, read as little-endian uint64."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)) + encryptor.finalize(), dtype="<u8").astype(np.uint64)


def test_crypto_prg_is_the_aes_ctr_keystream_and_deterministic() -> None:
    seed = os.urandom(32)
    out = crypto.prg(seed, 1000)
    assert out.dtype == np.uint64 and out.shape == (1000,)
    np.testing.assert_array_equal(out, aes_ctr_stream(seed, 1000))
    np.testing.assert_array_equal(out, crypto.prg(seed, 1000))
    other = crypto.prg(os.urandom(32), 1000)
    assert np.count_nonzero(out == other) < 5
    assert crypto.prg(seed, 0).shape == (0,)


def test_crypto_prg_over_more_than_one_block_is_one_stream() -> None:
    seed = os.urandom(32)
    size = crypto.PRG_BLOCK + 12_345
    long = crypto.prg(seed, size)
    for m in (1, 17, crypto.PRG_BLOCK - 1, crypto.PRG_BLOCK, crypto.PRG_BLOCK + 1):
        np.testing.assert_array_equal(long[:m], crypto.prg(seed, m))
    np.testing.assert_array_equal(long[-100:], aes_ctr_stream(seed, size)[-100:])
    # The stream continues across blocks: no block repeats the first one's keystream.
    assert not np.array_equal(long[crypto.PRG_BLOCK:crypto.PRG_BLOCK + 100], long[:100])


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1000])
def test_crypto_prg_small_blocks_give_the_same_stream(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    seed = os.urandom(32)
    expected = crypto.prg(seed, 1000)
    monkeypatch.setattr(crypto, "PRG_BLOCK", block)
    # Scratch buffers a thread may keep from earlier, larger calls would hide the small blocks.
    monkeypatch.setattr(crypto, "_local", threading.local(), raising=False)
    for m in sorted({m for m in (1, block, block + 1, 2 * block + 1, 999, 1000) if m <= 1000}):
        np.testing.assert_array_equal(crypto.prg(seed, m), expected[:m])
    out = np.arange(1000, dtype=np.uint64)
    crypto.add_prg(out, seed)
    crypto.add_prg(out, seed, -1)
    np.testing.assert_array_equal(out, np.arange(1000, dtype=np.uint64))


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=200))
def test_crypto_add_prg_minus_undoes_plus_exactly(values: list[int]) -> None:
    seed = os.urandom(32)
    original = np.array(values, dtype=np.uint64)
    out = original.copy()
    crypto.add_prg(out, seed)
    np.testing.assert_array_equal(out, original + crypto.prg(seed, len(values)))  # wraps modulo 2^64
    crypto.add_prg(out, seed, sign=-1)
    np.testing.assert_array_equal(out, original)


def test_crypto_add_prg_wants_a_flat_uint64_array() -> None:
    seed = os.urandom(32)
    with pytest.raises(TypeError):
        crypto.add_prg(np.zeros(4, dtype=np.int64), seed)
    with pytest.raises(TypeError):
        crypto.add_prg(np.zeros((2, 2), dtype=np.uint64), seed)


# --- labels ----------------------------------------------------------------------------------------------

def test_labels_bind_run_round_attempt_and_pair() -> None:
    a = Labels("run", 3, 0)
    assert a.pair("x", "y") == a.pair("y", "x")
    assert a.pair("x", "y") != a.pair("x", "z")
    assert a.share_key("x", "y") != a.share_key("y", "x")
    assert a.share("mask_key", "x", "y") != a.share("self_mask", "x", "y")
    others = [Labels("run2", 3, 0), Labels("run", 4, 0), Labels("run", 3, 1)]
    assert all(o.seed("x") != a.seed("x") and o.self_mask() != a.self_mask() for o in others)


# --- a round attempt in memory ---------------------------------------------------------------------------

Tamper = Callable[[str, dict[str, bytes], dict[str, bytes]], tuple[dict[str, bytes], dict[str, bytes]]]


@dataclass
class Fleet:
    """The workers' and the coordinator's sides of one round attempt, wired together without HTTP."""

    n: int
    k: int | None = None
    threshold: float = 0.6
    clip: float = 10.0
    size: int = 300
    seed: int = 0
    client_class: dict[str, type[ClientRound]] = field(default_factory=dict)
    labels: Labels = field(default_factory=lambda: Labels("run-1", 3, 0))

    def __post_init__(self) -> None:
        self.ids = worker_ids(self.n)
        self.server = ServerRound(self.labels, tuple(self.ids), Settings(self.threshold, self.k, self.clip),
                                  seed=self.seed + 1)
        self.clients = {w: self.client_class.get(w, ClientRound)(w, self.labels) for w in self.ids}
        rng = np.random.default_rng(self.seed)
        self.counts = {w: int(rng.integers(10, 1000)) for w in self.ids}
        # Some coordinates beyond ±clip, to be clipped.
        self.deltas = {w: rng.normal(0, self.clip / 2, self.size) for w in self.ids}
        self.total = np.zeros(self.size, dtype=np.uint64)
        self.uploaded: list[str] = []

    def send_keys(self, skip: Iterable[str] = ()) -> None:
        for w in self.ids:
            if w not in skip:
                enc, mask, commitment = self.clients[w].keys()
                self.server.add_keys(w, Keys(enc, mask, commitment, self.counts[w]))
        self.server.close_keys()

    def deal(self, skip: Iterable[str] = ()) -> None:
        for w in sorted(self.server.keys):
            if w in skip:
                continue
            dealt = self.clients[w].deal([Peer(*p) for p in self.server.roster(w)], self.server.secret_threshold(w))
            self.server.add_shares(w, {d.to: (d.ciphertext, d.mask_key_commitment, d.self_mask_commitment)
                                       for d in dealt})
        self.server.close_shares()

    def upload(self, skip: Iterable[str] = ()) -> None:
        for w in sorted(self.server.dealt):
            if w in skip:
                continue
            assert self.server.upload_problem(w, self.counts[w]) is None
            neighbours, inbox = self.server.masking_for(w)
            assert self.clients[w].accept(inbox) == []
            encoded, _ = ring.encode(self.deltas[w], self.clip, self.server.scale, self.counts[w])
            self.total += self.clients[w].mask(encoded, neighbours)
            self.uploaded.append(w)
        self.server.close_masked(self.uploaded)

    def reveal(self, skip: Iterable[str] = (), tamper: Tamper | None = None) -> None:
        for w in self.uploaded:
            if w in skip:
                continue
            survivors, dropped = self.server.reveal_request(w)
            self_masks, mask_keys = self.clients[w].reveal(survivors, dropped)
            if tamper is not None:
                self_masks, mask_keys = tamper(w, self_masks, mask_keys)
            self.server.add_reveal(w, self_masks, mask_keys)

    def run(self, *, no_keys: Iterable[str] = (), no_shares: Iterable[str] = (), no_upload: Iterable[str] = (),
            no_reveal: Iterable[str] = (), tamper: Tamper | None = None) -> np.ndarray:
        self.send_keys(no_keys)
        self.deal(no_shares)
        self.upload(no_upload)
        self.reveal(no_reveal, tamper)
        return self.server.unmask(self.total.copy())

    def check(self, mean: np.ndarray) -> None:
        """``mean`` is the example-weighted mean of the clipped deltas of those that uploaded."""
        assert self.server.phase == "done"
        reference = exact_mean([self.counts[w] for w in self.uploaded], [self.deltas[w] for w in self.uploaded],
                               self.clip)
        assert max_error(mean, reference) <= ring.error_bound(self.server.scale, self.clip)


def choose_quiet(fleet: Fleet, count: int, among: Iterable[str], already: Iterable[str] = (),
                 rng_seed: int = 0) -> set[str]:
    """``count`` workers drawn at random from ``among`` such that, with them and ``already`` quiet, every
    dealer still has enough holders left to reconstruct its secrets (greedy over random orders)."""
    server = fleet.server
    rng = np.random.default_rng(rng_seed)
    candidates = sorted(set(among) - set(already))
    for _ in range(500):
        quiet: set[str] = set()
        for w in rng.permutation(candidates):
            trial = quiet | {str(w)} | set(already)
            if all(sum(h not in trial for h in server.holders(d)) >= server.secret_threshold(d)
                   for d in server.dealt):
                quiet.add(str(w))
            if len(quiet) == count:
                return quiet
    raise AssertionError(f"the neighbour graph leaves no room for {count} quiet workers")


E2E_CASES = [(3, None), (10, None), (30, None), (30, 8), (10, 4)]


@pytest.mark.parametrize(("n", "k"), E2E_CASES)
def test_round_unmasks_the_weighted_mean(n: int, k: int | None) -> None:
    fleet = Fleet(n, k)
    mean = fleet.run()
    fleet.check(mean)
    expected_k = k if k is not None else graph.default_neighbours(n)
    assert all(len(v) == min(n - 1, 2 * math.ceil(expected_k / 2)) for v in fleet.server.neighbours.values())
    assert fleet.server.bad_shares == []
    assert fleet.server.dropped() == []


@pytest.mark.parametrize(("n", "k"), E2E_CASES)
def test_round_unmasks_when_30_percent_upload_and_never_reveal(n: int, k: int | None) -> None:
    fleet = Fleet(n, k, seed=1)
    fleet.send_keys()
    fleet.deal()
    fleet.upload()
    quiet = choose_quiet(fleet, round(0.3 * n), fleet.ids)
    fleet.reveal(skip=quiet)
    assert fleet.server.reveal_missing() == sorted(quiet)
    assert fleet.server.unmaskable()
    mean = fleet.server.unmask(fleet.total.copy())
    assert set(fleet.uploaded) == set(fleet.ids)  # the quiet ones' updates are in the mean
    fleet.check(mean)


@pytest.mark.parametrize(("n", "k"), E2E_CASES)
def test_round_unmasks_when_workers_drop_after_dealing(n: int, k: int | None) -> None:
    """Workers that dealt shares and never uploaded: their pairwise masks with the survivors are removed
    from the mask keys the survivors reveal."""
    fleet = Fleet(n, k, seed=2)
    fleet.send_keys()
    fleet.deal()
    gone = choose_quiet(fleet, round(0.3 * n), fleet.ids, rng_seed=3)
    fleet.upload(skip=gone)
    assert fleet.server.dropped() == sorted(gone)
    fleet.reveal()
    mean = fleet.server.unmask(fleet.total.copy())
    assert not gone & set(fleet.uploaded)
    fleet.check(mean)


def test_round_unmasks_with_every_kind_of_dropout_at_once() -> None:
    fleet = Fleet(30, 8, seed=4)
    fleet.send_keys(skip={"w000", "w001"})  # never sent keys: not in the graph
    assert set(fleet.server.neighbours) == set(fleet.ids) - {"w000", "w001"}
    fleet.deal(skip={"w002"})  # sent keys, never dealt: nobody masks with it
    assert "w002" not in fleet.server.dealt
    assert all("w002" not in fleet.server.masking_for(w)[0] for w in fleet.server.dealt)
    assert fleet.server.upload_problem("w002", fleet.counts["w002"]) is not None
    assert all("w002" not in fleet.server.reveal_request(w)[0] + fleet.server.reveal_request(w)[1]
               for w in fleet.server.dealt)
    gone = choose_quiet(fleet, 3, fleet.server.dealt, already={"w002"})
    quiet = choose_quiet(fleet, 3, fleet.server.dealt, already={"w002"} | gone)
    fleet.upload(skip=gone)
    fleet.reveal(skip=quiet)
    mean = fleet.server.unmask(fleet.total.copy())
    assert set(fleet.uploaded) == set(fleet.ids) - {"w000", "w001", "w002"} - gone
    fleet.check(mean)


def test_a_dropped_dealer_that_no_survivor_masked_with_needs_no_unmasking() -> None:
    """On a ring of k = 2, a worker whose two neighbours never dealt masks with nobody: when it then drops too,
    there is no mask of it to remove, and no one is asked for its mask key (none of its holders could give it)."""
    fleet = Fleet(12, k=2, seed=6)
    fleet.send_keys()
    lonely = "w000"
    around = set(fleet.server.neighbours[lonely])
    assert len(around) == 2
    fleet.deal(skip=around)
    assert fleet.server.masking_for(lonely)[0] == []
    fleet.upload(skip={lonely})
    assert lonely not in fleet.server.dropped()
    assert all(lonely not in fleet.server.reveal_request(w)[1] for w in fleet.uploaded)
    fleet.reveal()
    fleet.check(fleet.server.unmask(fleet.total.copy()))


def test_masks_alone_do_not_unmask_without_the_reveals() -> None:
    """Sanity: the masked sum alone is nowhere near the mean (the masks are really there)."""
    fleet = Fleet(5)
    fleet.send_keys()
    fleet.deal()
    fleet.upload()
    raw = ring.decode(fleet.total.copy(), fleet.server.scale, sum(fleet.counts.values()))
    reference = sum(n * np.clip(fleet.deltas[w], -fleet.clip, fleet.clip) for w, n in fleet.counts.items()) \
        / sum(fleet.counts.values())
    assert np.median(np.abs(raw - reference)) > fleet.clip / 10


@pytest.mark.parametrize(("n", "k"), [(10, None), (30, 8)])
def test_round_below_threshold_of_reveals_fails_saying_how_many(n: int, k: int | None) -> None:
    fleet = Fleet(n, k)
    fleet.send_keys()
    fleet.deal()
    fleet.upload()
    dealer = "w000"  # the first survivor named in the message
    holders = fleet.server.holders(dealer)
    need = fleet.server.secret_threshold(dealer)
    # All but need − 1 of the dealer's holders stay quiet.
    quiet = set(holders[need - 1:])
    fleet.reveal(skip=quiet)
    assert not fleet.server.unmaskable()
    with pytest.raises(SecAggFailure) as info:
        fleet.server.unmask(fleet.total.copy())
    message = str(info.value)
    assert f"{n - len(quiet)} of the {n} workers that uploaded revealed their shares" in message
    assert f"{dealer}'s self-mask seed has {need - 1} valid shares of the {need} needed" in message
    assert info.value.culprits == frozenset()


def test_round_below_threshold_of_mask_key_shares_fails() -> None:
    fleet = Fleet(10)
    fleet.send_keys()
    fleet.deal()
    fleet.upload(skip={"w009"})
    liars = {"w000", "w001", "w002", "w003"}  # of the 9 that reveal w009's mask-key share: 5 valid, 6 needed

    def tamper(w: str, self_masks: dict[str, bytes], mask_keys: dict[str, bytes]) -> tuple[dict, dict]:
        if w in liars:
            mask_keys = {**mask_keys, "w009": flip_last_byte(mask_keys["w009"])}
        return self_masks, mask_keys

    fleet.reveal(tamper=tamper)
    assert fleet.server.secret_threshold("w009") == 6
    with pytest.raises(SecAggFailure) as info:
        fleet.server.unmask(fleet.total.copy())
    assert str(info.value).endswith("w009's mask key has 5 valid shares of the 6 needed")
    assert "9 of the 9 workers that uploaded revealed" in str(info.value)


@pytest.mark.parametrize("phase", ["keys", "shares", "masked"])
def test_round_below_threshold_of_workers_fails_at_each_phase(phase: str) -> None:
    fleet = Fleet(10)  # needs 6 of the 10
    missing = {f"w00{i}" for i in range(5)}
    with pytest.raises(SecAggFailure) as info:
        fleet.send_keys(skip=missing if phase == "keys" else ())
        fleet.deal(skip=missing if phase == "shares" else ())
        fleet.upload(skip=missing if phase == "masked" else ())
    what = {"keys": "sent their keys", "shares": "dealt their shares", "masked": "uploaded masked updates"}[phase]
    assert f"needs 6 of the 10 sampled workers (--secagg-threshold 0.6); only 5 {what}" in str(info.value)
    assert fleet.server.phase == "failed"


def test_masked_updates_of_several_tensors_sum_to_the_mean_in_flat_order() -> None:
    """``client.masked_update`` and the coordinator's ``MaskedSum`` lay the tensors out alike (by name), whatever
    order the schema lists them in."""
    schema = (TensorSpec("z.bias", "float32", (3,)), TensorSpec("a.weight", "float32", (2, 4)),
              TensorSpec("m", "float32", ()))
    assert [s.name for s in flat_order(schema)] == ["a.weight", "m", "z.bias"]
    assert [(s.name, s.dtype, s.shape) for s in masked_schema(schema)] == [
        ("z.bias", "uint64", (3,)), ("a.weight", "uint64", (2, 4)), ("m", "uint64", ())]
    size = sum(math.prod(s.shape) for s in schema)
    fleet = Fleet(4, size=size, seed=11)
    rng = np.random.default_rng(3)
    base = {s.name: rng.normal(0, 1, s.shape).astype(np.float32) for s in schema}
    trained = {w: {s.name: (base[s.name] + rng.normal(0, 4, s.shape)).astype(np.float32) for s in schema}
               for w in fleet.ids}
    fleet.send_keys()
    fleet.deal()
    masked_sum = MaskedSum(schema)
    for w in fleet.ids:
        neighbours, inbox = fleet.server.masking_for(w)
        fleet.clients[w].accept(inbox)
        result = masked_update(fleet.clients[w], trained[w], base, neighbours, fleet.server.scale, fleet.clip,
                               fleet.counts[w])
        update, clipped = result[0], result[1]  # (a later version adds a third item)
        assert list(update) == sorted(base) and all(update[n].shape == base[n].shape for n in base)
        assert all(update[n].dtype == np.uint64 for n in base)
        assert clipped == sum(int(np.count_nonzero(np.abs(trained[w][n].astype(np.float64) - base[n]) > fleet.clip))
                              for n in base)
        masked_sum.add(update, fleet.counts[w])
        # The flat delta, in the same (by-name) order, is what the reference mean is taken of.
        fleet.deltas[w] = np.concatenate([trained[w][n].astype(np.float64).reshape(-1)
                                          - base[n].astype(np.float64).reshape(-1) for n in sorted(base)])
        fleet.uploaded.append(w)
    assert masked_sum.count == 4
    fleet.server.close_masked(fleet.uploaded)
    fleet.reveal()
    fleet.check(fleet.server.unmask(masked_sum.total))
    with pytest.raises(ProtocolError):
        masked_update(fleet.clients["w000"], {"a.weight": base["a.weight"]}, base, [], 1.0, 1.0, 1)


@pytest.mark.parametrize(("n", "threshold"), [(3, 0.6), (7, 0.6), (10, 0.6), (11, 0.5), (30, 0.6), (9, 1 / 3),
                                              (4, 0.1), (30, 0.7), (100, 0.55)])
def test_server_needs_the_ceiling_of_threshold_times_sampled(n: int, threshold: float) -> None:
    needed = max(2, math.ceil(Fraction(threshold).limit_denominator(1000) * n))
    assert Fleet(n, threshold=threshold).server.needed == needed
    Fleet(n, threshold=threshold).send_keys(skip=worker_ids(n)[needed:])  # exactly enough
    short = Fleet(n, threshold=threshold)
    with pytest.raises(SecAggFailure, match=f"needs {needed} of the {n} sampled workers"):
        short.send_keys(skip=worker_ids(n)[needed - 1:])


# --- wrong shares and lying dealers ----------------------------------------------------------------------

def flip_last_byte(share: bytes) -> bytes:
    return share[:-1] + bytes([share[-1] ^ 0x01])


def test_a_wrong_revealed_share_is_named_and_left_out() -> None:
    fleet = Fleet(10)
    liar, victim = "w003", "w007"

    def tamper(w: str, self_masks: dict[str, bytes], mask_keys: dict[str, bytes]) -> tuple[dict, dict]:
        if w == liar:
            self_masks = {**self_masks, victim: flip_last_byte(self_masks[victim])}
        return self_masks, mask_keys

    mean = fleet.run(tamper=tamper)
    assert len(fleet.server.bad_shares) == 1
    assert f"worker {liar} sent a self-mask share of {victim}'s" in fleet.server.bad_shares[0]
    assert fleet.server.x(liar) not in fleet.server.valid_self[victim]
    assert len(fleet.server.valid_self[victim]) == 9
    fleet.check(mean)


def test_a_wrong_mask_key_share_is_named_and_left_out() -> None:
    fleet = Fleet(10, seed=5)
    liar, gone = "w001", "w008"

    def tamper(w: str, self_masks: dict[str, bytes], mask_keys: dict[str, bytes]) -> tuple[dict, dict]:
        if w == liar:
            mask_keys = {**mask_keys, gone: flip_last_byte(mask_keys[gone])}
        return self_masks, mask_keys

    fleet.send_keys()
    fleet.deal()
    fleet.upload(skip={gone})
    fleet.reveal(tamper=tamper)
    assert any(f"worker {liar} sent a mask-key share of {gone}'s" in m for m in fleet.server.bad_shares)
    fleet.check(fleet.server.unmask(fleet.total.copy()))


def test_wrong_shares_that_leave_too_few_valid_ones_fail_the_round() -> None:
    fleet = Fleet(10)
    victim = "w004"
    liars = {"w000", "w001", "w002", "w003", "w005"}  # 5 wrong of 10: 5 valid left, 6 needed

    def tamper(w: str, self_masks: dict[str, bytes], mask_keys: dict[str, bytes]) -> tuple[dict, dict]:
        if w in liars:
            self_masks = {**self_masks, victim: flip_last_byte(self_masks[victim])}
        return self_masks, mask_keys

    with pytest.raises(SecAggFailure, match=f"{victim}'s self-mask seed has 5 valid shares of the 6 needed"):
        fleet.run(tamper=tamper)
    assert len(fleet.server.bad_shares) == 5


class SeedLiar(ClientRound):
    """Commits to its real self-mask seed (and masks with it) but deals shares of another seed."""

    def deal(self, peers: Iterable[Peer], threshold: int) -> list:
        real = self._seed
        self._seed = os.urandom(shamir.SECRET_BYTES)
        try:
            return super().deal(peers, threshold)
        finally:
            self._seed = real


class MaskKeyLiar(ClientRound):
    """Announces its real mask key but deals shares of another private key."""

    def deal(self, peers: Iterable[Peer], threshold: int) -> list:
        other = crypto.new_private_key()
        original = crypto.private_bytes
        crypto.private_bytes = lambda key: original(other if key is self._mask else key)  # type: ignore[assignment]
        try:
            return super().deal(peers, threshold)
        finally:
            crypto.private_bytes = original  # type: ignore[assignment]


def test_a_dealer_whose_seed_shares_do_not_match_its_commitment_is_a_culprit() -> None:
    fleet = Fleet(10, client_class={"w006": SeedLiar})
    with pytest.raises(SecAggFailure) as info:
        fleet.run()
    assert info.value.culprits == frozenset({"w006"})
    assert "w006" in str(info.value)
    assert fleet.server.bad_shares == []  # each share matched the commitment dealt with it


def test_a_dropped_dealer_whose_mask_key_shares_do_not_match_its_key_is_a_culprit() -> None:
    fleet = Fleet(30, 8, client_class={"w011": MaskKeyLiar})
    with pytest.raises(SecAggFailure) as info:
        fleet.run(no_upload={"w011"})
    assert info.value.culprits == frozenset({"w011"})


def test_a_mask_key_liar_that_uploads_does_not_spoil_the_round() -> None:
    """A survivor's mask key is never reconstructed, so shares of another key do no harm."""
    fleet = Fleet(10, client_class={"w002": MaskKeyLiar})
    fleet.check(fleet.run())


# --- the worker's side refuses what it must --------------------------------------------------------------

@pytest.fixture
def dealt_fleet() -> Fleet:
    fleet = Fleet(5, size=10)
    fleet.send_keys()
    fleet.deal()
    fleet.upload()
    return fleet


def test_reveal_refuses_both_kinds_of_one_neighbour_in_one_call(dealt_fleet: Fleet) -> None:
    client = dealt_fleet.clients["w000"]
    with pytest.raises(ProtocolError, match="both kinds of share of w002"):
        client.reveal(["w000", "w001", "w002"], ["w002"])
    # Nothing was revealed by the refused call: an honest request still goes through.
    self_masks, mask_keys = client.reveal(["w000", "w001", "w002"], ["w003"])
    assert sorted(self_masks) == ["w000", "w001", "w002"] and sorted(mask_keys) == ["w003"]


@pytest.mark.parametrize("first_self_mask", [True, False])
def test_reveal_refuses_both_kinds_of_one_neighbour_across_calls(dealt_fleet: Fleet, first_self_mask: bool) -> None:
    client = dealt_fleet.clients["w001"]
    first, second = (["w003"], []), ([], ["w003"])
    if not first_self_mask:
        first, second = second, first
    got = client.reveal(*first)
    assert len(got[0]) + len(got[1]) == 1
    with pytest.raises(ProtocolError, match="w003"):
        client.reveal(*second)
    # The same kind again is harmless and allowed.
    assert client.reveal(*first) == got


def test_reveal_refuses_to_count_itself_as_dropped(dealt_fleet: Fleet) -> None:
    client = dealt_fleet.clients["w002"]
    with pytest.raises(ProtocolError, match="dropped"):
        client.reveal(["w000"], ["w002"])
    with pytest.raises(ProtocolError):
        client.reveal([], ["w002", "w003"])


def test_reveal_gives_the_shares_that_were_dealt(dealt_fleet: Fleet) -> None:
    server, client = dealt_fleet.server, dealt_fleet.clients["w004"]
    self_masks, mask_keys = client.reveal(["w000", "w004", "not-a-neighbour"], ["w001"])
    assert set(self_masks) == {"w000", "w004"} and set(mask_keys) == {"w001"}
    for dealer, share in self_masks.items():
        assert crypto.commitment(server.labels.share("self_mask", dealer, "w004"), share) \
            == server.commitments[(dealer, "w004")][1]
    assert crypto.commitment(server.labels.share("mask_key", "w001", "w004"), mask_keys["w001"]) \
        == server.commitments[("w001", "w004")][0]


def test_accept_leaves_out_tampered_and_unknown_shares() -> None:
    fleet = Fleet(4, size=10)
    fleet.send_keys()
    fleet.deal()
    _, inbox = fleet.server.masking_for("w000")
    tampered = dict(inbox)
    tampered["w001"] = flip_last_byte(inbox["w001"])
    tampered["stranger"] = inbox["w002"]
    tampered["w003"] = inbox["w002"]  # a share dealt by w002, claimed to be from w003
    client = fleet.clients["w000"]
    assert sorted(client.accept(tampered)) == ["stranger", "w001", "w003"]
    assert sorted(client._held) == ["w000", "w002"]


def test_deal_refuses_a_roster_without_its_own_keys_or_with_bad_coordinates() -> None:
    labels = Labels("r", 1, 0)
    a, b = ClientRound("a", labels), ClientRound("b", labels)
    pa, pb = (Peer(c.worker_id, x, *c.keys()[:2]) for c, x in ((a, 1), (b, 2)))
    assert len(a.deal([pa, pb], 2)) == 2
    with pytest.raises(ProtocolError, match="own keys"):
        ClientRound("a", labels).deal([pa, pb], 2)  # a fresh round of "a" has other keys
    with pytest.raises(ProtocolError, match="own keys"):
        a.deal([pb], 1)
    with pytest.raises(ProtocolError, match="coordinates"):
        a.deal([pa, Peer("b", 1, pb.enc_key, pb.mask_key)], 2)
    with pytest.raises(ProtocolError, match="coordinates"):
        a.deal([Peer("a", 0, pa.enc_key, pa.mask_key), pb], 2)
    for threshold in (1, 3):
        with pytest.raises(ProtocolError, match="threshold"):
            a.deal([pa, pb], threshold)


def test_mask_refuses_a_neighbour_never_introduced_or_itself(dealt_fleet: Fleet) -> None:
    client = dealt_fleet.clients["w000"]
    for bad in ("stranger", "w000"):
        with pytest.raises(ProtocolError, match="never introduced"):
            client.mask(np.zeros(10, dtype=np.uint64), ["w001", bad])


def test_keys_are_fresh_for_every_round_attempt() -> None:
    labels = Labels("r", 1, 0)
    a, b = ClientRound("w", labels).keys(), ClientRound("w", labels).keys()
    assert len({a[0], a[1], b[0], b[1]}) == 4 and a[2] != b[2]


# --- a masked upload looks uniform -----------------------------------------------------------------------

def chi_square_critical_255() -> float:
    """The chi-square statistic with 255 degrees of freedom exceeded with probability 1e-4."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return 347.654
    return float(chi2.isf(1e-4, 255))


def test_chi_square_critical_value() -> None:
    assert chi_square_critical_255() == pytest.approx(347.654, abs=1e-2)


def chi_square_256(values: np.ndarray) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.fixture
def seeded_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers' keys and self-mask seeds from a seeded generator, so that a statistical test is one fixed
    sample (it passes or fails every time, never now and then)."""
    rng = np.random.default_rng(20240601)

    def urandom(n: int) -> bytes:
        return rng.bytes(n)

    monkeypatch.setattr(client_module, "os", SimpleNamespace(urandom=urandom))
    monkeypatch.setattr(crypto, "new_private_key", lambda: X25519PrivateKey.from_private_bytes(rng.bytes(32)))


@pytest.mark.usefixtures("seeded_secrets")
@pytest.mark.parametrize("kind", ["zeros", "constant", "normal"])
def test_a_masked_upload_is_uniform_and_uncorrelated_with_the_update(kind: str) -> None:
    size = 100_000
    fleet = Fleet(3, size=size, seed=9)
    fleet.deltas = {w: {"zeros": np.zeros(size), "constant": np.full(size, 1.5),
                        "normal": np.random.default_rng(1).normal(0, 3, size)}[kind] for w in fleet.ids}
    fleet.send_keys()
    fleet.deal()
    worker = "w001"
    neighbours, inbox = fleet.server.masking_for(worker)
    assert fleet.clients[worker].accept(inbox) == []
    encoded, _ = ring.encode(fleet.deltas[worker], fleet.clip, fleet.server.scale, fleet.counts[worker])
    plain = encoded.copy()
    masked = fleet.clients[worker].mask(encoded, neighbours)
    critical = chi_square_critical_255()
    if kind != "normal":  # the test has the power to see a non-uniform vector: the plaintext's
        assert chi_square_256(plain & np.uint64(0xFF)) > critical
    assert chi_square_256(masked >> np.uint64(56)) < critical  # the top byte
    assert chi_square_256(masked & np.uint64(0xFF)) < critical  # the bottom byte
    assert chi_square_256((masked >> np.uint64(28)) & np.uint64(0xFF)) < critical  # one from the middle
    as_float = masked.astype(np.float64)
    assert abs(as_float.mean() / 2.0**64 - 0.5) < 0.01
    if kind == "normal":
        r = np.corrcoef(as_float, plain.view(np.int64).astype(np.float64))[0, 1]
        assert abs(r) < 5 / math.sqrt(size)
    # The same update, masked in another attempt, shares nothing with this one.
    again = Fleet(3, size=size, seed=9, labels=Labels("run-1", 3, 1))
    again.deltas = fleet.deltas
    again.send_keys()
    again.deal()
    neighbours, inbox = again.server.masking_for(worker)
    again.clients[worker].accept(inbox)
    other = again.clients[worker].mask(plain.copy(), neighbours)
    assert np.count_nonzero(other == masked) < 5


# --- the coordinator's side refuses what it must ---------------------------------------------------------

def keys_of(client: ClientRound, num_examples: int = 10) -> Keys:
    return Keys(*client.keys(), num_examples)


def test_server_refuses_keys_from_an_unsampled_worker_or_twice() -> None:
    fleet = Fleet(4)
    server = fleet.server
    with pytest.raises(RequestRejected) as info:
        server.add_keys("stranger", keys_of(ClientRound("stranger", fleet.labels)))
    assert info.value.status == 409 and info.value.reason == "not_sampled"
    server.add_keys("w000", keys_of(fleet.clients["w000"]))
    with pytest.raises(RequestRejected) as info:
        server.add_keys("w000", keys_of(ClientRound("w000", fleet.labels)))
    assert info.value.status == 409 and info.value.reason == "duplicate"
    assert server.keys_missing() == ["w001", "w002", "w003"]


def test_server_refuses_reused_or_malformed_public_keys() -> None:
    fleet = Fleet(4)
    server = fleet.server
    first = keys_of(fleet.clients["w000"])
    server.add_keys("w000", first)
    fresh = keys_of(fleet.clients["w001"])
    for bad in (Keys(first.enc_key, fresh.mask_key, fresh.seed_commitment, 10),
                Keys(fresh.enc_key, first.enc_key, fresh.seed_commitment, 10),
                Keys(first.mask_key, fresh.mask_key, fresh.seed_commitment, 10),
                Keys(fresh.enc_key, first.mask_key, fresh.seed_commitment, 10),
                Keys(fresh.enc_key, fresh.enc_key, fresh.seed_commitment, 10),
                Keys(fresh.enc_key[:31], fresh.mask_key, fresh.seed_commitment, 10),
                Keys(fresh.enc_key, fresh.mask_key + b"\0", fresh.seed_commitment, 10),
                Keys(fresh.enc_key, fresh.mask_key, fresh.seed_commitment[:16], 10)):
        with pytest.raises(ProtocolError) as info:
            server.add_keys("w001", bad)
        assert info.value.status == 422 and info.value.reason == "bad_secagg"
        assert not isinstance(info.value, RequestRejected)
    server.add_keys("w001", fresh)
    assert sorted(server.keys) == ["w000", "w001"]


def test_server_refuses_messages_out_of_phase() -> None:
    fleet = Fleet(4)
    server = fleet.server
    problem = server.upload_problem("w000", fleet.counts["w000"])
    assert problem is not None and problem[0] == 409 and "keys phase" in problem[1]
    with pytest.raises(RequestRejected) as info:
        server.add_shares("w000", {})
    assert info.value.status == 409 and info.value.reason == "stale"
    fleet.send_keys()
    problem = server.upload_problem("w000", fleet.counts["w000"])
    assert problem is not None and problem[0] == 409 and "shares phase" in problem[1]
    with pytest.raises(RequestRejected) as info:
        server.add_keys("w000", keys_of(ClientRound("w000", fleet.labels)))
    assert info.value.status == 409 and info.value.reason == "stale"
    with pytest.raises(RequestRejected) as info:
        server.add_reveal("w000", {}, {})
    assert info.value.status == 409 and info.value.reason == "stale"


def dealt_by(fleet: Fleet, worker: str) -> dict[str, tuple[bytes, bytes, bytes]]:
    dealt = fleet.clients[worker].deal([Peer(*p) for p in fleet.server.roster(worker)],
                                       fleet.server.secret_threshold(worker))
    return {d.to: (d.ciphertext, d.mask_key_commitment, d.self_mask_commitment) for d in dealt}


def test_server_refuses_shares_to_non_neighbours_malformed_or_twice() -> None:
    fleet = Fleet(12, k=4)
    fleet.send_keys(skip={"w011"})
    server = fleet.server
    worker = "w000"
    good = dealt_by(fleet, worker)
    assert set(good) == set(server.holders(worker)) and len(good) == 5
    stranger = next(w for w in server.keys if w not in good)
    one = next(iter(good.values()))

    def rejected(dealt: dict[str, tuple[bytes, bytes, bytes]], dealer: str = worker) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            server.add_shares(dealer, dealt)
        return info.value

    err = rejected({**good, stranger: one})
    assert err.status == 422 and err.reason == "bad_secagg" and stranger in str(err)
    err = rejected({h: v for h, v in good.items() if h != worker})
    assert err.status == 422 and "missing ['w000']" in str(err)
    holder = next(h for h in good if h != worker)
    ciphertext, c_key, c_self = good[holder]
    assert len(ciphertext) == CIPHERTEXT_BYTES
    for bad in ((ciphertext[:-1], c_key, c_self), (ciphertext + b"\0", c_key, c_self), (b"", c_key, c_self),
                (ciphertext, c_key[:31], c_self), (ciphertext, c_key, c_self + b"\0")):
        err = rejected({**good, holder: bad})
        assert err.status == 422 and err.reason == "bad_secagg" and holder in str(err)
    assert server.dealt == set() and server.inbox == {} and server.commitments == {}  # nothing half-taken
    err = rejected(good, dealer="w011")  # sent no keys
    assert isinstance(err, RequestRejected) and err.status == 409 and err.reason == "not_sampled"
    server.add_shares(worker, good)
    err = rejected(good)
    assert isinstance(err, RequestRejected) and err.status == 409 and err.reason == "duplicate"
    assert "w000" not in server.shares_missing() and "w001" in server.shares_missing()


def test_server_upload_problems() -> None:
    fleet = Fleet(6)
    fleet.send_keys()
    fleet.deal(skip={"w005"})
    server = fleet.server
    assert server.upload_problem("w000", fleet.counts["w000"]) is None
    problem = server.upload_problem("w000", fleet.counts["w000"] + 1)
    assert problem is not None and problem[0] == 422 and f"differs from the {fleet.counts['w000']}" in problem[1]
    for worker in ("w005", "stranger"):
        problem = server.upload_problem(worker, fleet.counts.get(worker, 10))
        assert problem is not None and problem[0] == 409 and "dealt no key shares" in problem[1]
    fleet.upload(skip={"w005"})
    problem = server.upload_problem("w000", fleet.counts["w000"])  # too late: the masked phase is over
    assert problem is not None and problem[0] == 409 and "unmask phase" in problem[1]


def test_server_refuses_reveals_from_non_survivors_twice_or_unasked() -> None:
    fleet = Fleet(6)
    fleet.send_keys()
    fleet.deal()
    fleet.upload(skip={"w005"})
    server = fleet.server
    survivors, dropped = server.reveal_request("w000")
    assert survivors == ["w000", "w001", "w002", "w003", "w004"] and dropped == ["w005"]
    with pytest.raises(RequestRejected) as info:
        server.add_reveal("w005", {}, {})
    assert info.value.status == 409 and info.value.reason == "not_sampled"
    self_masks, mask_keys = fleet.clients["w000"].reveal(survivors, dropped)
    for bad in (({**self_masks, "w005": self_masks["w001"]}, mask_keys),
                (self_masks, {**mask_keys, "w001": mask_keys["w005"]})):
        with pytest.raises(ProtocolError) as info:
            server.add_reveal("w000", *bad)
        assert info.value.status == 422 and info.value.reason == "bad_secagg"
    assert "w000" not in server.revealed
    server.add_reveal("w000", self_masks, mask_keys)
    with pytest.raises(RequestRejected) as info:
        server.add_reveal("w000", self_masks, mask_keys)
    assert info.value.status == 409 and info.value.reason == "duplicate"
    assert server.reveal_missing() == ["w001", "w002", "w003", "w004"]


def test_server_roster_and_coordinates() -> None:
    fleet = Fleet(30, 8)
    fleet.send_keys()
    server = fleet.server
    xs = [server.x(w) for w in fleet.ids]
    assert xs == list(range(1, 31))
    for w in fleet.ids:
        roster = server.roster(w)
        assert [r[0] for r in roster] == sorted((*server.neighbours[w], w))
        assert all(r[2] == server.keys[r[0]].enc_key and r[3] == server.keys[r[0]].mask_key for r in roster)
        assert server.secret_threshold(w) == graph.threshold_of(9, 0.6) == 6
