"""Song era: every strategy on every kind of split, after a fixed budget of rounds, next to central training.

    python benchmarks/songs_strategies.py                     # 9 strategies x 4 splits, 8 workers, 30 rounds
    python benchmarks/songs_strategies.py --rounds 10 --strategy fedavg --strategy median

Each cell is one real `fedfleet run` (coordinator and worker processes on loopback); the central
reference is the same logistic regression trained on the whole training pool for as many epochs as
there are rounds. Prints a table and writes benchmarks/results/songs_strategies.{json,md}.

Nothing here is tuned: every strategy runs with its defaults and the local learning rate is fedfleet run's
default (--lr 0.05), fixed beforehand, so the test set only scores. benchmarks/songs_models.py is the study
whose learning rates are chosen on validation songs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.storage.run_dir import RunDir
from fedfleet.strategies import STRATEGIES
from fedfleet.tasks.songs import SongsTask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import provenance, write_results

SCRIPT = "benchmarks/songs_strategies.py"
LR, BATCH = 0.05, 32  # fedfleet run's defaults: the song task's local SGD
PARTITIONS = ("iid", "dirichlet:1.0", "dirichlet:0.1", "natural")
RESULTS = Path(__file__).resolve().parent / "results"


def central(rounds: int, lr: float, batch: int) -> float:
    task = SongsTask()
    return task.evaluate(task.fit_central(rounds, lr, batch), task.load_test())["accuracy"]


def federated(strategy: str, partition: str, workers: int, rounds: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fedfleet", "run", "--workers", str(workers), "--rounds", str(rounds),
           "--strategy", strategy, "--partition", partition, "--lr", str(LR), "--batch-size", str(BATCH),
           "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True)
    s = RunDir(out).read_summary()
    if s is None:
        raise RuntimeError(f"the run in {out} ended without a summary; see {out / 'logs'}")
    return {"accuracy": s.final_accuracy, "loss": s.final_loss, "seconds": s.seconds}


def markdown(result: dict[str, Any]) -> str:
    m, cells = result["meta"], result["cells"]
    partitions = m["partitions"]
    header = "| strategy | " + " | ".join(partitions) + " |\n|---|" + "---:|" * len(partitions)
    rows = [f"| {s} | " + " | ".join(f"{by[p]['accuracy']:.4f}" for p in partitions) + " |" for s, by in cells.items()]
    rows.append("| central (same model, all data) | " + " | ".join(f"{m['central']:.4f}" for _ in partitions) + " |")
    return "\n".join([
        f"# Song era: test accuracy after {m['rounds']} rounds, {m['workers']} workers ({m['date']})", "",
        f"`{m['command']}` ({m['seconds'] / 60:.1f} min) at commit {m['commit']}, on {m['machine']} "
        f"({m['versions']}). Every cell is one real `fedfleet run` (coordinator and {m['workers']} worker "
        "processes on loopback), e.g. `" + m["example"] + "`.", "",
        f"Logistic regression, local SGD lr {LR}, batch {BATCH}, 1 local epoch; the majority class is 0.40. "
        "Nothing was tuned: each strategy runs with its defaults and the learning rate is fedfleet run's default, "
        "fixed beforehand; the test songs only score. The central reference is the same model trained on the "
        f"whole training pool for {m['rounds']} epochs.", "",
        header, *rows, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--strategy", action="append", choices=list(STRATEGIES), help="default: all")
    ap.add_argument("--partition", action="append", choices=PARTITIONS, help="default: all")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    strategies = args.strategy or list(STRATEGIES)
    partitions = args.partition or list(PARTITIONS)
    t0 = time.time()
    ref = central(args.rounds, LR, BATCH)
    print(f"central reference ({args.rounds} epochs): {ref:.4f}", flush=True)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedfleet-songs-") as tmp:
        for strategy in strategies:
            for partition in partitions:
                r = federated(strategy, partition, args.workers, args.rounds,
                              Path(tmp) / f"{strategy}-{partition.replace(':', '')}")
                cells.setdefault(strategy, {})[partition] = r
                print(f"{strategy:>13} {partition:>14}: accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}",
                      flush=True)
    example = (f"fedfleet run --workers {args.workers} --rounds {args.rounds} --strategy {strategies[0]} "
               f"--partition {partitions[0]} --lr {LR} --batch-size {BATCH} --out OUT --quiet")
    meta = {**provenance(SCRIPT, argv, "numpy", "fedfleet"), "rounds": args.rounds, "workers": args.workers,
            "partitions": partitions, "central": ref, "seconds": time.time() - t0, "example": example}
    result = {"meta": meta, "cells": cells}
    write_results(args.results, "songs_strategies", result, markdown(result))
    print("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
