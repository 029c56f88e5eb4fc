"""How ``fedfleet run`` spreads its workers: by default one worker process per CPU the run may use (never
more than the workers), each told how many torch threads to use so that the processes do not
oversubscribe the cores; and ``$FEDFLEET_TORCH_THREADS`` as a worker process reads it."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedfleet import runner
from fedfleet.runner import default_processes, spread, torch_threads
from fedfleet.tasks import torch_common


@pytest.mark.parametrize(("workers", "cpus", "expected"), [
    (10, 2, 2), (10, 1, 1), (1, 8, 1), (3, 8, 3), (100, 16, 16), (8, 8, 8), (1, 1, 1)])
def test_default_processes_is_one_per_usable_cpu_and_at_most_the_workers(workers: int, cpus: int,
                                                                         expected: int) -> None:
    assert default_processes(workers, cpus) == expected


def test_default_processes_reads_the_cpus_this_process_may_use() -> None:
    assert default_processes(10_000) == torch_common.usable_cpus()
    assert default_processes(1) == 1


@pytest.mark.parametrize(("counts", "cpus", "expected"), [
    ([5, 5], 2, [1, 1]),              # the MNIST run: 10 workers on 2 cores
    ([1], 2, [2]),                    # one worker: it gets both cores
    ([1], 8, [8]),
    ([1, 1, 1], 8, [3, 3, 2]),        # the cores shared out as evenly as the processes
    ([2, 1], 8, [2, 4]),              # a process's share split among the workers it hosts
    ([4], 2, [1]),                    # never below one
    ([2, 2, 1, 1, 1, 1, 1, 1], 2, [1] * 8),  # more processes than cores: one each
    ([], 4, []),
])
def test_torch_threads_share_the_cores_out(counts: list[int], cpus: int, expected: list[int]) -> None:
    assert torch_threads(counts, cpus) == expected


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 10, 100])
@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
def test_the_default_spread_never_oversubscribes(workers: int, cpus: int) -> None:
    counts = spread(workers, default_processes(workers, cpus))
    assert sum(counts) == workers and min(counts) >= 1 and max(counts) - min(counts) <= 1
    threads = torch_threads(counts, cpus)
    # at most one torch thread per core, or one per logical worker where there are more workers than cores
    assert sum(t * k for t, k in zip(threads, counts, strict=True)) <= max(cpus, workers)


def test_runner_docstring_examples() -> None:
    result = doctest.testmod(runner)
    assert result.attempted >= 2 and result.failed == 0


def _threads_in_child(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != torch_common.THREADS_ENV}
    if value is not None:
        env[torch_common.THREADS_ENV] = value
    code = "from fedfleet.tasks import torch_common as t; print(t.require_torch('x').get_num_threads())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("value", "expected"), [(None, "1"), ("2", "2"), (" 3 ", "3")])
def test_a_process_takes_its_torch_threads_from_the_environment(value: str | None, expected: str) -> None:
    pytest.importorskip("torch")
    r = _threads_in_child(value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_torch_threads_setting_is_an_error_naming_it(value: str) -> None:
    pytest.importorskip("torch")
    r = _threads_in_child(value)
    assert r.returncode != 0
    assert f"$FEDFLEET_TORCH_THREADS must be a whole number >= 1 (torch threads per process). Got {value.strip()!r}" \
        in r.stderr


THREADS_TASK = '''
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import FitResult
from fedfleet.tasks.null import NullTask


class ThreadsTask(NullTask):
    """The null task, reporting the torch threads of the worker process that trained."""

    def fit(self, weights, data, params):
        done = super().fit(weights, data, params)
        threads = torch_common.require_torch("threads").get_num_threads()
        return FitResult(done.weights, done.num_examples, {"torch_threads": float(threads)})
'''


@pytest.mark.parametrize(("workers", "processes", "threads"), [(1, 1, 2), (3, 2, 1)])
def test_a_run_on_two_cpus_spreads_its_workers_by_default(tmp_path: Path, workers: int, processes: int,
                                                          threads: int) -> None:
    pytest.importorskip("torch")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or torch_common.usable_cpus() < 2:
        pytest.skip("needs two CPUs this process may use")
    (tmp_path / "threads_task.py").write_text(textwrap.dedent(THREADS_TASK))
    out = tmp_path / "out"
    # fedfleet run as if on a two-CPU machine: its affinity (which its children inherit) is two CPUs
    code = (f"import os, sys; os.sched_setaffinity(0, {cpus[:2]!r}); from fedfleet.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "run", "--task", "threads_task:ThreadsTask", "--task-option",
                        "params=10", "--workers", str(workers), "--rounds", "1", "--val-fraction", "0", "--out",
                        str(out)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"on {workers} workers in {processes} processes" in r.stdout
    assert sorted(p.name for p in (out / "logs").glob("worker-*.log")) == [f"worker-{i}.log" for i in range(processes)]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["participants"] == workers
    assert record["worker_metrics"]["torch_threads"] == threads
