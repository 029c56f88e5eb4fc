"""Song-era prediction: the request and answer of ``POST /v1/predict``, and the song search of the page.

Feature ranges are what Spotify's audio analysis can produce (its API documents 0..1 for the
ratios, -1..11 for ``key``, roughly -60..0 dB for ``loudness``), widened just enough that every song
of the shipped data set passes (a test checks that): a value outside them is a typo or a unit
mix-up (seconds for ``duration_ms``, percent for a ratio), and a prediction from it would be noise.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfleet.tasks.songs import ERAS, FEATURES, SongsTask, load_songs, test_mask
from fedfleet.types import Weights

MAX_BATCH = 1000


def _spec(low: float, high: float, unit: str, help: str) -> Any:
    return Field(ge=low, le=high, description=help, json_schema_extra={"unit": unit})


class SongFeatures(BaseModel):
    """One song's audio features, in the order and units of the data set (Spotify's audio features)."""

    # allow_inf_nan: Starlette's JSON parser accepts NaN and Infinity, which would poison the softmax.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    danceability: float = _spec(0, 1, "", "how suitable for dancing, 0 to 1")
    energy: float = _spec(0, 1, "", "intensity and activity, 0 to 1")
    key: int = _spec(-1, 11, "", "pitch class, 0 = C … 11 = B; -1 if no key was detected")
    loudness: float = _spec(-60, 5, "dB", "average loudness in decibels, usually -60 to 0")
    mode: int = _spec(0, 1, "", "1 = major, 0 = minor")
    speechiness: float = _spec(0, 1, "", "presence of spoken words, 0 to 1")
    acousticness: float = _spec(0, 1, "", "confidence the track is acoustic, 0 to 1")
    instrumentalness: float = _spec(0, 1, "", "likelihood of no vocals, 0 to 1")
    liveness: float = _spec(0, 1, "", "presence of an audience, 0 to 1")
    valence: float = _spec(0, 1, "", "musical positiveness, 0 to 1")
    tempo: float = _spec(0, 300, "BPM", "estimated tempo in beats per minute")
    duration_ms: float = _spec(1_000, 3 * 3_600_000, "ms", "length in milliseconds")
    time_signature: int = _spec(0, 7, "", "estimated beats per bar (0 or 1 when none was detected)")
    chorus_hit: float = _spec(0, 3 * 3_600, "s", "when the chorus starts, in seconds from the beginning")
    sections: int = _spec(0, 1_000, "", "number of sections the track divides into")

    @model_validator(mode="after")
    def _chorus_inside(self) -> Self:
        if self.chorus_hit > self.duration_ms / 1000:
            raise ValueError(f"'chorus_hit' ({self.chorus_hit:g} s) is after the end of the song "
                             f"('duration_ms' {self.duration_ms:g} = {self.duration_ms / 1000:g} s)")
        return self

    def vector(self) -> list[float]:
        return [float(getattr(self, f)) for f in FEATURES]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    songs: list[SongFeatures] = Field(min_length=1, max_length=MAX_BATCH,
                                      description=f"1 to {MAX_BATCH} songs to predict the era of")


class Prediction(BaseModel):
    era: str = Field(description="the most probable era")
    probabilities: dict[str, float] = Field(description="probability of each era; they sum to 1")


class PredictResponse(BaseModel):
    model_version: int
    round: int = Field(description="training rounds the model has been through (0: not trained yet)")
    classes: list[str]
    predictions: list[Prediction]


class FeatureInfo(BaseModel):
    name: str
    minimum: float
    maximum: float
    integer: bool
    unit: str
    description: str


class PredictInfo(BaseModel):
    """What the prediction page needs to draw its form."""

    task: str
    model_version: int
    round: int
    classes: list[str]
    features: list[FeatureInfo]


class SongMatch(BaseModel):
    uri: str
    title: str
    artist: str
    era: str = Field(description="the song's true era in the data set")
    held_out: bool = Field(description="in the coordinator's test set, so no worker trained on it")
    features: dict[str, float]


class SongSearch(BaseModel):
    query: str
    total: int = Field(description="songs that match; at most `limit` are listed")
    songs: list[SongMatch]


def feature_infos() -> list[FeatureInfo]:
    props = SongFeatures.model_json_schema()["properties"]
    return [FeatureInfo(name=name, minimum=props[name]["minimum"], maximum=props[name]["maximum"],
                        integer=props[name]["type"] == "integer", unit=props[name]["unit"],
                        description=props[name]["description"]) for name in FEATURES]


def predict(task: SongsTask, weights: Weights, songs: Sequence[SongFeatures]) -> list[Prediction]:
    x = np.array([s.vector() for s in songs], dtype=np.float64)
    probs = task.predict_proba(weights, x).astype(np.float64)
    # float32 softmax rows sum to 1 within ~1e-7; renormalising in float64 makes the JSON sum exactly so.
    probs /= probs.sum(axis=1, keepdims=True)
    return [Prediction(era=ERAS[int(row.argmax())], probabilities=dict(zip(ERAS, row.tolist(), strict=True)))
            for row in probs]


def explain(errors: Sequence[Any], most: int = 10) -> str:
    """Validation errors as one line; for a song, it names the song (by index) and the feature.

    A song's missing features are listed together, and past ``most`` problems the rest are counted,
    so that a batch of a thousand empty songs still gets a message a person can read.
    """
    parts: list[str] = []
    missing: dict[str, list[str]] = {}
    for err in errors:
        loc = [p for p in err["loc"] if p != "body"]
        kind, got = err["type"], err.get("input")
        ctx = err.get("ctx") or {}
        if len(loc) >= 2 and loc[0] == "songs" and isinstance(loc[1], int):
            where = f"song {loc[1]}"
            feature = str(loc[2]) if len(loc) > 2 else None
        else:
            where, feature = ".".join(str(p) for p in loc) or "body", None
        if kind == "json_invalid":
            parts.append(f"body is not valid JSON ({ctx.get('error', err['msg'])})")
        elif feature is None:
            text = str(ctx.get("error", err["msg"])) if kind == "value_error" else err["msg"]
            parts.append(f"{where}: {text}")
        elif kind == "missing":
            if where not in missing:
                missing[where] = []
                parts.append(where)  # a placeholder, filled in below once all its features are known
            missing[where].append(feature)
        elif kind == "extra_forbidden":
            parts.append(f"{where}: '{feature}' is not a feature; the features are {', '.join(FEATURES)}")
        elif kind == "finite_number":
            parts.append(f"{where}: '{feature}' must be a finite number, got {got!r}")
        elif kind in ("greater_than_equal", "less_than_equal"):
            props = SongFeatures.model_json_schema()["properties"][feature]
            unit = f" {props['unit']}" if props["unit"] else ""
            parts.append(f"{where}: '{feature}' = {got!r} is outside its plausible range "
                         f"[{_num(props['minimum'])}, {_num(props['maximum'])}]{unit} ({props['description']})")
        elif kind.startswith("int_"):
            parts.append(f"{where}: '{feature}' must be a whole number, got {got!r}")
        elif kind.startswith("float_"):
            parts.append(f"{where}: '{feature}' must be a number, got {got!r}")
        else:
            parts.append(f"{where}: '{feature}' {err['msg'][:1].lower()}{err['msg'][1:]}, got {got!r}")
    for n, part in enumerate(parts):
        if part in missing:
            names = ", ".join(f"'{f}'" for f in missing[part])
            parts[n] = f"{part}: feature {names} is missing" if len(missing[part]) == 1 \
                else f"{part}: features {names} are missing"
    more = f"; and {len(parts) - most} more problems" if len(parts) > most else ""
    return "invalid request: " + "; ".join(parts[:most]) + more


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def search_songs(task: SongsTask, query: str, limit: int) -> SongSearch:
    """Songs of the data set whose title or artist holds every word of ``query``, best matches first."""
    songs = load_songs(task.data_dir)
    haystack, held_out = _index(task.data_dir)
    words = query.casefold().split()
    hits = [i for i, text in enumerate(haystack) if all(w in text for w in words)]
    q = query.casefold().strip()
    # Titles that are the query, then titles that start with it, then the rest, each alphabetical.
    best = heapq.nsmallest(limit, hits, key=lambda i: (
        songs.track[i].casefold() != q, not songs.track[i].casefold().startswith(q),
        songs.track[i].casefold(), songs.artist[i].casefold()))
    out = [SongMatch(uri=songs.uri[i], title=songs.track[i], artist=songs.artist[i], era=ERAS[songs.era[i]],
                     held_out=bool(held_out[i]),
                     features={f: float(v) for f, v in zip(FEATURES, songs.x[i].tolist(), strict=True)})
           for i in best]
    return SongSearch(query=query, total=len(hits), songs=out)


@functools.cache
def _index(data_dir: str | None) -> tuple[list[str], np.ndarray]:
    """Per song: its title and artist case-folded for search, and whether it is in the test set."""
    s = load_songs(data_dir)
    text = [f"{t}\n{a}".casefold() for t, a in zip(s.track, s.artist, strict=True)]
    return text, test_mask(s.era)
