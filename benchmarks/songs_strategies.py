"""Song era: every strategy on every kind of split, after a fixed budget of rounds, next to central training.

    python benchmarks/songs_strategies.py                     # 9 strategies x 4 splits, 8 workers, 30 rounds
    python benchmarks/songs_strategies.py --rounds 10 --strategy fedavg --strategy median

Each cell is one real `fedfleet run` (coordinator and worker processes on loopback); the central
reference is the same logistic regression trained on the whole training pool for as many epochs as
there are rounds. Prints a table and writes benchmarks/results/songs_strategies.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedfleet.storage.run_dir import RunDir
from fedfleet.strategies import STRATEGIES
from fedfleet.tasks.songs import SongsTask

PARTITIONS = ("iid", "dirichlet:1.0", "dirichlet:0.1", "natural")
RESULTS = Path(__file__).resolve().parent / "results"


def central(rounds: int, lr: float, batch: int) -> float:
    task = SongsTask()
    return task.evaluate(task.fit_central(rounds, lr, batch), task.load_test())["accuracy"]


def federated(strategy: str, partition: str, workers: int, rounds: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fedfleet", "run", "--workers", str(workers), "--rounds", str(rounds),
           "--strategy", strategy, "--partition", partition, "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True)
    s = RunDir(out).read_summary()
    if s is None:
        raise RuntimeError(f"the run in {out} ended without a summary; see {out / 'logs'}")
    return {"accuracy": s.final_accuracy, "loss": s.final_loss, "seconds": s.seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--strategy", action="append", choices=list(STRATEGIES), help="default: all")
    ap.add_argument("--partition", action="append", choices=PARTITIONS, help="default: all")
    args = ap.parse_args()
    strategies = args.strategy or list(STRATEGIES)
    partitions = args.partition or list(PARTITIONS)
    ref = central(args.rounds, 0.05, 32)
    print(f"central reference ({args.rounds} epochs): {ref:.4f}", flush=True)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fedfleet-songs-") as tmp:
        for strategy in strategies:
            for partition in partitions:
                r = federated(strategy, partition, args.workers, args.rounds,
                              Path(tmp) / f"{strategy}-{partition.replace(':', '')}")
                cells.setdefault(strategy, {})[partition] = r
                print(f"{strategy:>13} {partition:>14}: accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}",
                      flush=True)
    header = "| strategy | " + " | ".join(partitions) + " |\n|---|" + "---:|" * len(partitions)
    rows = [f"| {s} | " + " | ".join(f"{cells[s][p]['accuracy']:.4f}" for p in partitions) + " |" for s in strategies]
    rows.append("| central (same model, all data) | " + " | ".join(f"{ref:.4f}" for _ in partitions) + " |")
    table = "\n".join([header, *rows])
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"rounds": args.rounds, "workers": args.workers, "central": ref, "date": time.strftime("%Y-%m-%d"),
            "seconds": time.time() - t0}
    (RESULTS / "songs_strategies.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    (RESULTS / "songs_strategies.md").write_text(
        f"# Song era: test accuracy after {args.rounds} rounds, {args.workers} workers ({meta['date']})\n\n"
        "Logistic regression, local SGD lr 0.05, batch 32, 1 local epoch; the majority class is 0.40.\n\n"
        + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
