"""The dashboard and prediction API (the songs task's): /v1/predict, /v1/songs, /v1/dashboard, /v1/events, `serve`.

Most tests read one finished run (``fedfleet run --workers 2 --rounds 2``) served by a real
``fedfleet serve`` process; the others start coordinators and workers.
The browser drives the pages in test_web_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
from fastapi import FastAPI

from conftest import Coordinator
from fedfleet.errors import TaskError
from fedfleet.strategies.privacy import epsilon
from fedfleet.tasks.predict import predictor
from fedfleet.tasks.songs import ERAS, FEATURES, LIMITS, SongsTask, load_songs
from fedfleet.web.routes import ASSETS, create_router
from fedfleet.web.sources import FinishedRun, Model, history_page

TIMEOUT = 30.0


def fedfleet(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedfleet", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("web") / "run"
    r = fedfleet("run", "--workers", "2", "--rounds", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def start_serve(run_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """``fedfleet serve --run RUN_DIR --port 0`` and the URL its first line of output gives."""
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "serve", "--run", str(run_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    if match is None:
        proc.kill()
        pytest.fail(f"fedfleet serve did not say where it listens: {line}{proc.stdout.read()}", pytrace=False)
    return proc, match.group(0)


@contextlib.contextmanager
def serve_client(run_dir: Path) -> Iterator[httpx.Client]:
    """An HTTP client of a real `fedfleet serve` process serving ``run_dir``, stopped on leaving."""
    proc, url = start_serve(run_dir)
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            yield http
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[httpx.Client]:
    """An HTTP client of a real `fedfleet serve` process serving the finished run."""
    with serve_client(run_dir) as http:
        yield http


def song_rows(indices: list[int]) -> tuple[np.ndarray, list[dict[str, float]]]:
    x = load_songs().x[indices]
    return x, [dict(zip(FEATURES, row.tolist(), strict=True)) for row in x]


# "Yesterday" by The Beatles, as the data set has it; a constant, so collecting the tests loads no data.
YESTERDAY = {"danceability": 0.332, "energy": 0.179, "key": 5, "loudness": -11.83, "mode": 1, "speechiness": 0.0326,
             "acousticness": 0.879, "instrumentalness": 0.0, "liveness": 0.0886, "valence": 0.315, "tempo": 96.529,
             "duration_ms": 125667, "time_signature": 4, "chorus_hit": 26.05427, "sections": 7}


def a_song(**changes: Any) -> dict[str, Any]:
    """A valid song with ``changes``; a feature set to ``...`` is left out."""
    song = {**YESTERDAY, **changes}
    return {k: v for k, v in song.items() if v is not ...}


def files_of(folder: Path) -> dict[Path, tuple[int, int]]:
    """Size and mtime of each file, but SQLite's shared-memory index (-shm), which any reader touches."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if not p.name.endswith("-shm")}


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a text/event-stream's lines."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# --- POST /v1/predict --------------------------------------------------------------------------------

def test_predict_matches_the_task_on_the_final_model(client: httpx.Client, run_dir: Path) -> None:
    indices = [0, 7, 123, 4567, 40_000]
    x, songs = song_rows(indices)
    r = client.post("/v1/predict", json={"rows": songs})
    assert r.status_code == 200, r.text
    body = r.json()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert body["classes"] == list(ERAS) and body["problem"] == "classification" and body["task"] == "songs"
    assert body["round"] == 2 and body["model_version"] == summary["model_version"]

    expected = SongsTask().predict_proba(safetensors.numpy.load_file(run_dir / "model.safetensors"), x)
    assert len(body["predictions"]) == len(indices)
    for pred, want in zip(body["predictions"], expected, strict=True):
        got = np.array([pred["probabilities"][era] for era in ERAS])
        assert math.isclose(got.sum(), 1.0, abs_tol=1e-9)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert pred["class"] == ERAS[int(want.argmax())] and pred["value"] is None
        assert pred["missing"] == [] and pred["other"] == {}
    # A trained model does not answer the same for every song.
    assert len({tuple(round(p, 6) for p in pred["probabilities"].values()) for pred in body["predictions"]}) > 1


BAD_SONGS = [
    pytest.param([a_song(), a_song(tempo=...)], ["row 1", "'tempo'", "missing"], id="missing"),
    pytest.param([a_song(tempo=None)], ["row 0: feature 'tempo' is missing"], id="null"),
    pytest.param([a_song(tempo=..., key=...)], ["row 0", "'key', 'tempo' are missing"], id="two-missing"),
    pytest.param([a_song(danceability=1.5)], ["row 0", "'danceability' = 1.5", "plausible range [0, 1]"],
                 id="ratio-over-1"),
    pytest.param([a_song(), a_song(), a_song(duration_ms=215)],
                 ["row 2: 'duration_ms' = 215 is outside its plausible range [1,000, 10,800,000] ms"],
                 id="seconds-for-ms"),
    pytest.param([a_song(loudness=-1e9)], ["row 0", "'loudness'", "dB"], id="loudness"),
    pytest.param([a_song(tempo="fast")], ["row 0: 'tempo' must be a number, got 'fast'"], id="not-a-number"),
    pytest.param([a_song(tempo=True)], ["row 0: 'tempo' must be a number, got true"], id="a-boolean"),
    pytest.param([a_song(key=5.5)], ["row 0: 'key' must be a whole number, got 5.5"], id="fractional-key"),
    pytest.param([a_song(year=1999)], ["row 0", "'year' is not a feature"], id="unknown-feature"),
    pytest.param([a_song(chorus_hit=500.0, duration_ms=200_000)], ["row 0", "'chorus_hit' (500 s)", "after the end"],
                 id="chorus-after-end"),
    pytest.param([], ["rows", "at least 1"], id="empty-batch"),
    pytest.param([a_song(), [1, 2]], ["row 1: must be an object"], id="not-an-object"),
]


@pytest.mark.parametrize(("songs", "words"), BAD_SONGS)
def test_predict_rejects_bad_songs_naming_row_and_feature(client: httpx.Client, songs: list[Any],
                                                          words: list[str]) -> None:
    r = client.post("/v1/predict", json={"rows": songs})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, detail


def test_a_422_lists_each_problem_with_its_row_and_features(client: httpx.Client) -> None:
    r = client.post("/v1/predict", json={"rows": [a_song(tempo=900, key=...), a_song(year=1999, decade=90)]})
    assert r.status_code == 422
    assert r.json()["problems"] == [
        {"row": 0, "features": ["tempo"], "message": "'tempo' = 900 is outside its plausible range [0, 300] BPM "
                                                     "(estimated tempo in beats per minute)"},
        {"row": 0, "features": ["key"], "message": "feature 'key' is missing"},
        {"row": 1, "features": ["year", "decade"], "message": "'year', 'decade' are not features; the features are "
                                                              + ", ".join(FEATURES)}]


def test_songs_is_another_name_of_rows(client: httpx.Client) -> None:
    """The request of the songs-only API before prediction was generic still works."""
    r = client.post("/v1/predict", json={"songs": [a_song()]})
    assert r.status_code == 200 and r.json()["predictions"][0]["class"] in ERAS


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_predict_rejects_non_finite_values(client: httpx.Client, literal: str) -> None:
    # Python's and Starlette's JSON parsers accept these literals, so the request must be checked for them.
    good = json.dumps(a_song())
    bad = json.dumps(a_song(valence=0.123456)).replace("0.123456", literal)
    r = client.post("/v1/predict", content=f'{{"rows": [{good}, {bad}]}}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "row 1: 'valence' must be a finite number" in r.json()["detail"]


def test_predict_rejects_malformed_and_oversized_bodies(client: httpx.Client) -> None:
    r = client.post("/v1/predict", content=b'{"rows": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = client.post("/v1/predict", json={"rows": [a_song()] * 1001})
    assert r.status_code == 422 and "at most 1000" in r.json()["detail"]
    # Many broken songs still give a message a person can read, and a body of bounded size.
    r = client.post("/v1/predict", json={"rows": [{}] * 500})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "and 490 more problems" in detail and len(detail) < 4000
    assert len(r.json()["problems"]) == 100


def test_every_song_of_the_data_set_is_plausible() -> None:
    """The feature limits reject typos, never a real song; whole-number features hold whole numbers."""
    songs = load_songs()
    schema = SongsTask().feature_schema()
    assert [f["name"] for f in schema] == list(FEATURES)  # the order the model's weights expect
    for j, f in enumerate(schema):
        low, high = f["limits"]
        assert (low, high) == (LIMITS[f["name"]].low, LIMITS[f["name"]].high)
        assert low <= songs.x[:, j].min() and songs.x[:, j].max() <= high, f["name"]
        assert not f["integer"] or np.all(songs.x[:, j] == np.round(songs.x[:, j])), f["name"]
    weights = SongsTask().init_weights(0)
    _, rows = song_rows(list(range(len(songs.x))))
    assert SongsTask().predict_rows(weights, rows).shape == (len(rows), len(ERAS))  # no chorus after its song
    with pytest.raises(TaskError, match="row 1: feature 'tempo' is missing"):
        SongsTask().predict_rows(weights, [a_song(), a_song(tempo=...)])
    assert predictor(SongsTask()) is not None


# --- GET /v1/songs and GET /v1/predict ------------------------------------------------------------------

def test_song_search_finds_title_and_artist(client: httpx.Client) -> None:
    r = client.get("/v1/songs", params={"q": "yesterday BEATLES"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 1
    (song,) = body["songs"]
    assert (song["title"], song["artist"], song["era"]) == ("Yesterday", "The Beatles", "1960s-70s")
    data = load_songs()
    i = data.uri.index(song["uri"])
    assert [song["features"][f] for f in FEATURES] == data.x[i].tolist()

    r = client.get("/v1/songs", params={"q": "yesterday", "limit": 3}).json()
    assert r["total"] > 3 and len(r["songs"]) == 3
    assert all("yesterday" in (s["title"] + " " + s["artist"]).lower() for s in r["songs"])
    assert r["songs"][0]["title"].lower() == "yesterday"  # exact titles first

    assert client.get("/v1/songs", params={"q": "zzqxj nothing like this"}).json() == {
        "query": "zzqxj nothing like this", "total": 0, "songs": []}
    r = client.get("/v1/songs", params={"q": ""})
    assert r.status_code == 422 and "q" in r.json()["detail"]


def test_predict_info_lists_eras_and_feature_ranges(client: httpx.Client) -> None:
    info = client.get("/v1/predict").json()
    assert info["classes"] == list(ERAS) and info["round"] == 2 and info["problem"] == "classification"
    assert info["target"] == "era" and info["song_search"] is True and info["max_rows"] == 1000
    assert [f["name"] for f in info["features"]] == list(FEATURES)
    tempo = next(f for f in info["features"] if f["name"] == "tempo")
    assert (tempo["kind"], tempo["limits"], tempo["unit"], tempo["integer"], tempo["required"]) == (
        "number", [0, 300], "BPM", False, True)
    pool = SongsTask().train_pool().x[:, FEATURES.index("tempo")]
    assert (tempo["min"], tempo["max"]) == (pool.min(), pool.max()) and tempo["mean"] == pytest.approx(pool.mean())


# --- the pages and the finished run's dashboard ------------------------------------------------------

def test_pages_and_assets_are_served_from_the_package(client: httpx.Client) -> None:
    folder = resources.files("fedfleet.web") / "static"
    for name in ASSETS:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.content == (folder / name).read_bytes()
        # Works offline: nothing is fetched from another host.
        assert not re.search(rb"(src|href)=\"(https?:)?//", r.content), name
        again = client.get(f"/static/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
    for path, title in (("/", "dashboard"), ("/predict", "predict")):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"fedfleet · {title}" in page.text
        for ref in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
            assert client.get("/" + ref).status_code == 200, ref
    assert client.get("/static/../pyproject.toml").status_code == 404
    assert client.get("/static/nope.js").status_code == 404


def test_finished_run_dashboard_reads_the_run_files(client: httpx.Client, run_dir: Path) -> None:
    body = client.get("/v1/dashboard").json()
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert body["status"]["state"] == "finished" and body["status"]["round"] == 2
    assert body["status"]["accuracy"] == summary["final_accuracy"]
    assert body["rounds"] == rounds and body["rounds_from"] == 0
    # What the workers reported is in its own field, which the charts' train series read; never at the top.
    for r in body["rounds"]:
        assert {"train_loss", "train_accuracy", "train_s"} <= r["worker_metrics"].keys()
        assert not any(k.startswith("train_") for k in r)
    assert body["config"]["workers"] == 2 and body["config"]["rounds"] == 2
    assert sorted(w["partition"] for w in body["workers"]) == ["part-000-of-002", "part-001-of-002"]
    for w in body["workers"]:
        assert w["rounds_served"] == 2 and w["last_train_s"] > 0
    assert body["dp"] is None  # no differential privacy: the page shows nothing about it

    # The event stream of a finished run: one state, then it ends (nothing more will come).
    with client.stream("GET", "/v1/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert [e for e, _ in events] == ["state"]
    assert json.loads(events[0][1])["rounds"] == rounds


# --- real processes ---------------------------------------------------------------------------------------

def test_fedfleet_serve_serves_a_finished_run(run_dir: Path) -> None:
    before = files_of(run_dir)
    proc, url = start_serve(run_dir)
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            assert "fedfleet · dashboard" in http.get("/").text
            assert "fedfleet · predict" in http.get("/predict").text
            status = http.get("/v1/status").json()
            assert status["state"] == "finished" and status["round"] == 2
            _, songs = song_rows([11, 22])
            preds = http.post("/v1/predict", json={"rows": songs}).json()["predictions"]
            assert len(preds) == 2 and all(p["class"] in ERAS for p in preds)
            found = http.get("/v1/songs", params={"q": "billie jean"}).json()
            assert [(s["title"], s["artist"]) for s in found["songs"]] == [("Billie Jean", "Michael Jackson")]
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    # Serving read the run and wrote nothing into its folder.
    assert files_of(run_dir) == before


def test_fedfleet_serve_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    r = fedfleet("serve", "--run", str(tmp_path), "--port", "0", timeout=60)
    assert r.returncode == 2
    assert "is not a finished fedfleet run" in r.stderr and "summary.json" in r.stderr


def test_live_events_push_rounds_and_worker_train_times(coordinator: Any, worker: Any) -> None:
    # Several local epochs keep each round open long enough for an event to catch it open.
    coord: Coordinator = coordinator("--workers", "2", "--rounds", "3", "--local-epochs", "4", "--linger", "2")
    states: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as http, http.stream("GET", "/v1/events") as r:
        events = sse_events(r.iter_lines())
        first = json.loads(next(events)[1])
        assert first["status"]["state"] == "waiting" and first["live"] and first["rounds"] == []
        assert first["dp"] is None
        worker(coord.url, clients=2)
        # The stream ends by itself once the run is over.
        for kind, data in events:
            assert kind == "state"
            state = json.loads(data)
            states.append(state)
            rounds = rounds[: state["rounds_from"]] + state["rounds"]
    seen = [s["status"]["round"] for s in states]
    assert seen == sorted(seen) and seen[-1] == 3 and len(set(seen)) >= 2
    assert any(s["open_round"] and s["open_round"]["kind"] == "train" for s in states)
    assert states[-1]["status"]["state"] == "finished"
    assert all(s["dp"] is None for s in states)
    # The rounds sent piecemeal add up to exactly what the coordinator recorded.
    assert rounds == [json.loads(line) for line in (coord.data_dir / "metrics.jsonl").read_text().splitlines()]
    last = states[-1]["workers"]
    assert len(last) == 2
    for w in last:
        assert w["rounds_served"] == 3 and w["last_train_s"] > 0 and w["last_seen_s"] >= 0


def test_the_dashboard_carries_the_epsilon_spent_by_a_dp_run(coordinator: Any, worker: Any) -> None:
    """--dp central: every state the page gets says the epsilon spent so far (the accountant's, for the rounds
    recorded) with delta and the budget; the finished run read from its files says what summary.json does."""
    pytest.importorskip("dp_accounting")
    coord: Coordinator = coordinator("--workers", "2", "--rounds", "3", "--dp", "central", "--dp-clip", "0.5",
                                     "--dp-noise-multiplier", "1.0", "--dp-max-epsilon", "50", "--linger", "2")
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as http:
        before = http.get("/v1/dashboard").json()
        with http.stream("GET", "/v1/events") as r:
            events = sse_events(r.iter_lines())
            worker(coord.url, clients=2)
            states = [json.loads(data) for _, data in events]
    assert before["dp"] == {"mechanism": "central", "epsilon": 0.0, "delta": 1e-5, "max_epsilon": 50.0,
                            "target_epsilon": None, "clip": 0.5, "noise_multiplier": 1.0, "sample_rate": 1.0,
                            "rounds": 0}
    rounds: list[dict[str, Any]] = []
    for state in states:
        rounds = rounds[: state["rounds_from"]] + state["rounds"]
        done = state["status"]["round"]
        assert state["dp"] == {**before["dp"], "epsilon": pytest.approx(epsilon(1.0, 1.0, done, 1e-5)),
                               "rounds": done}
        # The same figure as the round records the chart draws.
        assert state["dp"]["epsilon"] == (rounds[-1]["dp_epsilon"] if rounds else 0.0)
    last = states[-1]
    assert last["status"]["state"] == "finished" and last["status"]["round"] == 3 and len(rounds) == 3
    summary = json.loads((coord.data_dir / "summary.json").read_text())["dp"]
    finished = FinishedRun.load(coord.data_dir).snapshot()["dp"]
    assert finished == last["dp"] == {key: summary[key] for key in finished}


def test_predict_needs_a_task_that_predicts(coordinator: Any) -> None:
    coord: Coordinator = coordinator("--task", "null", "--workers", "1", "--rounds", "1")
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as http:
        for r in (http.get("/v1/predict"), http.post("/v1/predict", json={"rows": [a_song()]})):
            assert r.status_code == 409, r.text
            assert r.json()["detail"] == ("this run's task 'null' offers no prediction (a task predicts when it has "
                                          "feature_schema and predict_rows: see fedfleet.tasks.predict)")
        r = http.get("/v1/songs", params={"q": "yesterday"})
        assert r.status_code == 409
        assert r.json()["detail"] == "this run's task 'null' offers no song search (the songs task does)"
        # The dashboard itself works for any task.
        assert http.get("/").status_code == 200
        assert http.get("/v1/dashboard").json()["status"]["task"] == "null"


# --- a task of one's own that predicts, served in process -------------------------------------------------

class OwnTask:
    """A predicting task whose schema and answers a test chooses: ``answer`` maps the rows to the output."""

    name = "own"

    def __init__(self, classes: tuple[str, ...], schema: Any, answer: Any) -> None:
        self.classes, self._schema, self._answer = classes, schema, answer

    def feature_schema(self) -> list[dict[str, Any]]:
        if isinstance(self._schema, Exception):
            raise self._schema
        schema: list[dict[str, Any]] = self._schema
        return schema

    def predict_rows(self, weights: Any, rows: Any) -> np.ndarray:
        out: np.ndarray = self._answer(rows)
        return out


class OwnRun:
    """A RunSource of an OwnTask, so that the routes run in this process."""

    def __init__(self, task: OwnTask) -> None:
        self.task = task

    def snapshot(self) -> dict[str, Any]:
        return {"status": {"task": "own_module:OwnTask"}}

    def rounds(self) -> list[dict[str, Any]]:
        return []

    def model(self) -> Model:
        return Model({"w": np.zeros(1, np.float32)}, version=3, round=2)

    def changed(self) -> asyncio.Event:
        return asyncio.Event()

    async def worker_history(self, offset: int, limit: int) -> dict[str, Any]:
        return history_page([], [], [], 0, offset, limit, list(self.task.classes) or None)


SIZE = [{"name": "size", "kind": "number", "min": 0, "max": 10, "mean": 4}]


def own(task: OwnTask, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the routes serving ``task``, in this process."""
    async def send() -> httpx.Response:
        app = FastAPI()
        app.include_router(create_router(OwnRun(task)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://own") as http:
            return await http.request(method, path, **kwargs)
    return asyncio.run(send())


def test_a_run_source_of_one_s_own_answers_the_workers_history() -> None:
    body = own(OwnTask(("small", "big"), SIZE, None), "GET", "/v1/dashboard/workers", params={"limit": 5}).json()
    assert body == {"rounds": [], "rounds_from": 0, "total": 0, "offset": 0, "limit": 5, "classes": ["small", "big"],
                    "workers": []}


def test_a_task_of_one_s_own_predicts_through_the_protocol() -> None:
    classes = OwnTask(("small", "big"), SIZE, lambda rows: np.array([[0.3, 0.9]] * len(rows)))
    body = own(classes, "POST", "/v1/predict", json={"rows": [{"size": 2}, {}]}).json()
    assert body["task"] == "own" and body["problem"] == "classification" and body["round"] == 2
    assert [p["probabilities"] for p in body["predictions"]] == [{"small": 0.25, "big": 0.75}] * 2
    assert [p["missing"] for p in body["predictions"]] == [[], ["size"]]
    values = OwnTask((), SIZE, lambda rows: np.arange(len(rows), dtype=float))
    assert own(values, "GET", "/v1/predict").json()["problem"] == "regression"
    body = own(values, "POST", "/v1/predict", json={"rows": [{}] * 3}).json()
    assert [p["value"] for p in body["predictions"]] == [0, 1, 2]


def refuse(message: str) -> Any:
    def answer(rows: Any) -> np.ndarray:
        raise TaskError(message)
    return answer


@pytest.mark.parametrize(("task", "status", "words"), [
    pytest.param(OwnTask(("a", "b"), TaskError("no plan here"), None), 409,
                 "this run's task 'own_module:OwnTask' cannot predict yet: no plan here", id="schema-not-yet"),
    pytest.param(OwnTask(("a", "b"), [{"name": "size", "kind": "text"}], None), 500,
                 "this run's task 'own_module:OwnTask' gave a feature schema that cannot be used: 0: Input tag 'text'",
                 id="schema-malformed"),
    pytest.param(OwnTask(("a", "b"), SIZE * 2, None), 500, "feature names repeat", id="schema-repeats"),
    pytest.param(OwnTask(("a", "b"), SIZE, lambda rows: np.zeros(len(rows))), 500,
                 "task 'own' cannot predict: predict_rows answered 1 rows with an array of shape (1,), not (1, 2)",
                 id="wrong-shape"),
    pytest.param(OwnTask(("a", "b"), SIZE, refuse("row 0: 'size' is odd")), 422,
                 "invalid request: row 0: 'size' is odd", id="the-task-refuses-a-row"),
    pytest.param(OwnTask(("a", "b"), SIZE, refuse("the weights do not fit")), 500,
                 "task 'own' cannot predict: the weights do not fit", id="the-task-fails"),
])
def test_a_task_that_cannot_predict_says_why(task: OwnTask, status: int, words: str) -> None:
    r = own(task, "POST", "/v1/predict", json={"rows": [{"size": 1}]})
    assert r.status_code == status and words in r.json()["detail"], r.text
