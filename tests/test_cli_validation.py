"""Mistakes get one clear line, early (issue 13, items 9, 10, 12 and 14).

A bad task name or task option ends ``fedfleet run`` / ``fedfleet coordinator`` before anything is
started or written; a port in use is one line and no run files; ``fedfleet serve`` answers
/v1/health; a task's own score name and recommended training settings reach the user.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HOST, Fleet, run_fedfleet, stop_process
from fedfleet.cli import build_parser, run_config
from fedfleet.errors import ConfigError
from fedfleet.options import Option
from fedfleet.tasks import BUILTIN, declared_options, find_task, load_task, task_arguments
from test_config import bad_values

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ERROR = "fedfleet: error: "


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed (stderr), checked to be one line without a traceback."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), r.stderr
    return lines[0]


def config_of(*argv: str) -> Any:
    return run_config(build_parser().parse_args(list(argv)))


# --- task names and task options, checked in the parent --------------------------------------------

@pytest.mark.parametrize("command", ["run", "coordinator"])
def test_an_unknown_task_is_one_line_naming_the_built_in_ones_and_nothing_is_written(
        tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    where = ["--out", str(out)] if command == "run" else ["--data-dir", str(out)]
    r = run_fedfleet(command, "--task", "sogns", *where, timeout=60)
    assert r.returncode != 0
    line = one_error_line(r)
    assert "unknown task 'sogns'" in line and "did you mean 'songs'?" in line
    assert all(name in line for name in BUILTIN)
    # Checked before run_local's first step (making --out) or the coordinator's (its data dir): no
    # coordinator or worker was started.
    assert not out.exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--task-option", "bogus=1"], "The task 'songs' takes the options data_dir, model, n_trees, max_depth, "
     "learning_rate, min_child_weight, l2, bins. Got 'bogus' instead."),
    (["--task", "null", "--task-option", "examples=abc"],
     "The 'examples' task option must be an int in the range [1, 10000000]. Got 'abc' instead."),
    (["--task", "mnist", "--task-option", "model=resnet"],
     "The 'model' task option must be one of 'cnn', 'mlp'. Got 'resnet' instead."),
])
def test_a_bad_task_option_is_one_line_naming_it_and_nothing_is_written(
        tmp_path: Path, options: list[str], message: str) -> None:
    out = tmp_path / "out"
    r = run_fedfleet("run", *options, "--out", str(out), timeout=60)
    assert r.returncode == 2
    assert one_error_line(r) == ERROR + message
    assert not out.exists()


TASK_OPTIONS = [(name, opt) for name in BUILTIN for opt in declared_options(find_task(name), name) or ()]
BAD = [pytest.param(name, opt, value, id=f"{name}-{opt.name}-{label}")
       for name, opt in TASK_OPTIONS for label, value in bad_values(opt)]


@pytest.mark.parametrize(("name", "opt", "value"), BAD)
def test_every_task_option_rejects_bad_values_naming_itself(name: str, opt: Option, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^The '{opt.name}' task option must be .* instead.$"):
        task_arguments(find_task(name), name, {opt.name: value})


def test_every_built_in_task_declares_its_options() -> None:
    assert {name for name, _ in TASK_OPTIONS} == set(BUILTIN)


def test_task_options_come_converted_to_their_types_with_defaults_filled_in() -> None:
    assert task_arguments(find_task("null"), "null", {"params": "12"}) == {"params": 12, "examples": 100}
    task = load_task("null", {"params": "12", "examples": 3})
    assert task.init_weights(0)["w"].shape == (12,)
    assert len(task.load_test()) == 3


def test_task_options_from_a_config_file_are_checked_like_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('task = "null"\n[task_options]\nparams = 0\nexamples = 0\n')
    with pytest.raises(ConfigError, match=r"^The 'examples' task option must be an int in the range \[1, "):
        config_of("run", "--config", str(path))
    assert config_of("run", "--config", str(path), "--task-option", "examples=5").task_options_dict == {
        "examples": "5", "params": "0"}


def test_a_task_of_ones_own_is_found_from_the_folder_fedfleet_run_is_started_in(tmp_path: Path) -> None:
    # As the `fedfleet` console script: -I leaves the current folder off sys.path (python -m puts it on).
    # The coordinator and workers `fedfleet run` starts are `python -m fedfleet` there, so the check
    # looks there too: the module is found, and the misspelt class named.
    r = subprocess.run([sys.executable, "-I", "-c", "import sys; from fedfleet.cli import main; sys.exit(main())",
                        "run", "--task", "mean_task:MeanTsak", "--out", str(tmp_path / "out")],
                       cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
    assert one_error_line(r) == ERROR + "task module 'mean_task' has no attribute 'MeanTsak'"
    assert not (tmp_path / "out").exists()


def test_help_lists_the_built_in_tasks_with_their_options_and_training_settings() -> None:
    text = run_fedfleet("run", "--help", timeout=60).stdout
    listed = text[text.index("built-in tasks"):]
    for name in BUILTIN:
        assert f"\n  {name}" in listed
    assert "songs-mlp --lr 0.1" in listed
    assert "model: the FedAvg paper's CNN" in listed


def test_a_childs_error_is_printed_with_one_prefix(tmp_path: Path) -> None:
    # The data is missing: only the coordinator finds out, and the runner quotes its last lines.
    empty = tmp_path / "no-songs"
    empty.mkdir()
    r = run_fedfleet("run", "--task-option", f"data_dir={empty}", "--out", str(tmp_path / "out"), "--quiet",
                     timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith(ERROR) and r.stderr.count(ERROR) == 1, r.stderr
    assert "song CSVs" in r.stderr


# --- a port in use ------------------------------------------------------------------------------------

@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_port_in_use_stops_the_coordinator_with_one_line_and_no_run_files(tmp_path: Path, busy_port: int) -> None:
    data_dir = tmp_path / "coordinator"
    r = run_fedfleet("coordinator", "--task", "null", "--host", HOST, "--port", str(busy_port),
                     "--data-dir", str(data_dir), timeout=60)
    assert r.returncode != 0
    assert one_error_line(r) == (f"{ERROR}port {busy_port} on {HOST} is in use: choose another with --port "
                                 "(--port 0 picks a free one)")
    assert not data_dir.exists()  # so no config.toml, no state.sqlite


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    r = run_fedfleet("run", "--task", "null", "--task-option", "params=10", "--workers", "1", "--rounds", "1",
                     "--val-fraction", "0", "--out", str(out), "--quiet", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_port_in_use_stops_serve_with_one_line_and_writes_nothing(finished_run: Path, busy_port: int) -> None:
    before = files_of(finished_run)
    r = run_fedfleet("serve", "--run", str(finished_run), "--host", HOST, "--port", str(busy_port), timeout=60)
    assert r.returncode != 0
    assert one_error_line(r) == (f"{ERROR}port {busy_port} on {HOST} is in use: choose another with --port "
                                 "(--port 0 picks a free one)")
    assert files_of(finished_run) == before


def test_serve_answers_health(finished_run: Path) -> None:
    log = finished_run.parent / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "serve", "--run", str(finished_run), "--host",
                                 HOST, "--port", "0"], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Its first line gives the URL: "serving run ... at http://127.0.0.1:PORT (prediction page: ...".
        for _ in range(600):
            if " at http" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        url = log.read_text().split(" at ")[1].split()[0]
        r = httpx.get(f"{url}/v1/health", timeout=10)
        assert r.status_code == 200
        assert r.json() == {"ok": True, "state": "finished"}
    finally:
        stop_process(proc)


# --- the example: a safe folder name, its own score --------------------------------------------------

def test_the_example_writes_to_a_folder_without_a_colon_and_shows_its_own_score(tmp_path: Path) -> None:
    r = run_fedfleet("run", "--task", "mean_task:MeanTask", "--workers", "2", "--rounds", "1", "--val-fraction", "0",
                     "--task-option", "examples=200", env={"PYTHONPATH": str(EXAMPLES), "COLUMNS": "200"},
                     cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["mean_task.MeanTask-iid"]
    summary = json.loads((tmp_path / "runs" / "mean_task.MeanTask-iid" / "summary.json").read_text())
    learned = summary["final_accuracy"]  # the score's field, whatever the task calls it
    assert learned > 0.1  # worker 1's numbers lie around 1, worker 0's around 0
    row = next(line for line in r.stdout.splitlines() if "final mean" in line)
    assert f"{learned:.4f}" in row
    assert "final accuracy" not in r.stdout


# --- a task's recommended training settings ----------------------------------------------------------

def test_a_tasks_training_defaults_apply_unless_the_user_sets_them(tmp_path: Path) -> None:
    assert config_of("run", "--task", "songs-mlp").lr == 0.1
    assert config_of("run", "--task", "songs-mlp", "--lr", "0.05").lr == 0.05
    assert config_of("run", "--task", "songs").lr == 0.05  # the run's default: songs recommends none
    path = tmp_path / "run.toml"
    path.write_text('task = "songs-mlp"\nlr = 0.05\n')
    assert config_of("coordinator", "--config", str(path)).lr == 0.05
    path.write_text('task = "songs-mlp"\nbatch-size = 64\n')
    config = config_of("coordinator", "--config", str(path))
    assert (config.lr, config.batch_size) == (0.1, 64)


def saved_config(data_dir: Path) -> dict[str, Any]:
    return tomllib.loads((data_dir / "config.toml").read_text())


def run_id(data_dir: Path) -> str:
    return str(json.loads((data_dir / "coordinator.json").read_text())["run_id"])


def test_config_toml_records_the_tasks_lr_and_the_same_command_resumes(fleet: Fleet, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    flags = ("--task", "songs-mlp", "--workers", "1", "--rounds", "2", "--linger", "0")
    first = fleet.coordinator(*flags, data_dir=tmp_path / "a")
    assert saved_config(first.data_dir)["lr"] == 0.1
    started = run_id(first.data_dir)
    stop_process(first.proc)
    again = fleet.coordinator(*flags, data_dir=tmp_path / "a")  # fails the test if the config "differs"
    assert run_id(again.data_dir) == started
    assert saved_config(again.data_dir)["lr"] == 0.1
    chosen = fleet.coordinator(*flags, "--lr", "0.05", data_dir=tmp_path / "b")
    assert saved_config(chosen.data_dir)["lr"] == 0.05
