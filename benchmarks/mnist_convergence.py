"""MNIST / Fashion-MNIST: rounds needed to reach a test accuracy, FedAvg against FedSGD, IID against
pathological non-IID (2 label shards per worker), after McMahan et al. (2017).

    python benchmarks/mnist_convergence.py                                  # 2NN (MLP), target 0.97
    python benchmarks/mnist_convergence.py --model cnn --target 0.99 --max-rounds 300   # the paper's CNN
    python benchmarks/mnist_convergence.py --task fashion-mnist --data-dir ../shared/data/fashion-mnist \\
        --model cnn --target 0.90

100 workers sharing the 60k training images less the --val examples the coordinator keeps apart
(``fedfleet run --server-val``: 550 each with the default 5,000), fraction 0.1 (10 workers a round), many
logical workers per worker process (--processes). FedAvg: E=5 local epochs, batch B=10. FedSGD: E=1 and
B=all of a worker's data: one gradient step per round. Each algorithm's learning rate is the best of a
small sweep (--lrs, --sgd-lrs) by VALIDATION accuracy (the --val examples, which no worker trains on)
after --sweep-rounds IID rounds: the test set chooses nothing, it only scores the reported runs. Every
cell is one real `fedfleet run` with --target-accuracy, so a run stops at the first round whose global
model reaches the target on the test set (the paper's "rounds to target"), or at --max-rounds; next to
it the table gives the first round whose validation accuracy reached the target (within the rounds run).
Writes benchmarks/results/convergence-TASK-MODEL.{json,md} (--results for another folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.storage.run_dir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 60_000
# (local epochs E, batch size B); None: all of a worker's data in one batch (B=∞ in the paper)
ALGORITHMS: dict[str, tuple[int, int | None]] = {"FedAvg": (5, 10), "FedSGD": (1, None)}
PARTITIONS = {"IID": "iid", "non-IID (2 shards)": "natural"}


def run(args: argparse.Namespace, partition: str, epochs: int, batch: int | None, lr: float, rounds: int,
        target: float | None, out: Path) -> dict[str, Any]:
    batch = batch or -(-(TRAIN_IMAGES - args.val) // args.workers)  # B=all: the largest IID share in one batch
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", args.task, "--task-option", f"data_dir={args.data_dir}",
           "--task-option", f"model={args.model}", "--workers", str(args.workers), "--fraction", str(args.fraction),
           "--processes", str(args.processes), "--partition", partition, "--local-epochs", str(epochs),
           "--batch-size", str(batch), "--lr", str(lr), "--rounds", str(rounds), "--val-fraction", "0",
           "--seed", str(args.seed), "--round-timeout", "3600", "--worker-timeout", "600", "--out", str(out),
           "--overwrite", "--quiet"]
    if target is not None:
        cmd += ["--target-accuracy", str(target)]
    if args.val:
        cmd += ["--server-val", str(args.val)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    run_dir = RunDir(out)
    s = run_dir.read_summary()
    if s is None:
        raise RuntimeError(f"the run in {out} ended without a summary; see {out / 'logs'}")
    records = run_dir.read_rounds()
    accs = [r.accuracy for r in records if r.accuracy is not None]
    if s.final_accuracy is None or len(accs) != len(records):
        raise RuntimeError(f"the run in {out} has rounds without a test accuracy: the study needs one each round")
    vals = [r.val_accuracy for r in records]
    return {"lr": lr, "rounds_run": s.rounds, "rounds_to_target": first_reaching(accs, target),
            "val_rounds_to_target": first_reaching(vals, target), "final_accuracy": s.final_accuracy,
            "final_val_accuracy": s.final_val_accuracy, "best_accuracy": max(accs), "seconds": round(wall, 1),
            "seconds_per_round": round(wall / max(1, len(accs)), 2),
            "accuracy_by_round": [round(a, 4) for a in accs],
            "val_accuracy_by_round": [None if v is None else round(v, 4) for v in vals]}


def first_reaching(scores: list[float | None], target: float | None) -> int | None:
    """The first round (1-based) whose score is at least ``target``; None if none is, or no target.

    >>> first_reaching([0.5, None, 0.91, 0.95], 0.9), first_reaching([0.5], 0.9), first_reaching([0.99], None)
    (3, None, None)
    """
    return next((i + 1 for i, a in enumerate(scores) if target is not None and a is not None and a >= target), None)


def select_lr(tried: list[dict[str, Any]]) -> float:
    """The learning rate of the sweep run with the best last-round VALIDATION accuracy (the first of equals):
    never the test accuracy, which the reported runs are scored on. ValueError if a run has no validation score.

    >>> select_lr([{"lr": 0.1, "val_accuracy": 0.90, "test_accuracy": 0.95},
    ...            {"lr": 0.2, "val_accuracy": 0.93, "test_accuracy": 0.91}])
    0.2
    """
    missing = [t["lr"] for t in tried if t.get("val_accuracy") is None]
    if not tried or missing:
        raise ValueError(f"the sweep selects on validation accuracy; runs without one (lr {missing}): give --val > 0")
    return float(max(tried, key=lambda t: float(t["val_accuracy"]))["lr"])


def sweep(args: argparse.Namespace, epochs: int, batch: int | None, lrs: list[float], tmp: Path,
          name: str) -> tuple[float, list[dict[str, Any]]]:
    tried = []
    for lr in lrs:
        r = run(args, "iid", epochs, batch, lr, args.sweep_rounds, None, tmp / f"sweep-{name}-{lr}")
        # The test accuracy is kept for the record only: select_lr never reads it.
        tried.append({"lr": lr, "val_accuracy": r["final_val_accuracy"], "test_accuracy": r["final_accuracy"]})
        print(f"  sweep {name} lr {lr:g}: validation accuracy after {args.sweep_rounds} rounds "
              f"{r['final_val_accuracy']:.4f}", flush=True)
    return select_lr(tried), tried


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [f"# Rounds to {a['target']:.0%} test accuracy: {a['task']}, {a['model']} ({result['date']}, "
             f"{result['machine']})", "",
             f"`{result['command']}`: {a['workers']} workers sharing {TRAIN_IMAGES - a['val']} examples "
             f"({a['val']} kept by the coordinator for validation), fraction {a['fraction']}, seed {a['seed']}, "
             f"FedAvg E=5 B=10, FedSGD E=1 B=all; learning rates from a {a['sweep_rounds']}-round IID sweep; "
             f"runs capped at {a['max_rounds']} rounds (FedSGD {a['sgd_max_rounds']}).", "",
             f"Chosen on what: {result['selection']}", "",
             "| data | algorithm | lr | rounds to target (test) | rounds to target (validation) | best accuracy | "
             "final accuracy | rounds run | s / round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in result["cells"]:
        lines.append(f"| {cell['data']} | {cell['algorithm']} | {cell['lr']:g} | "
                     f"{_rounds(cell['rounds_to_target'], cell['rounds_run'])} | "
                     f"{_rounds(cell.get('val_rounds_to_target'), cell['rounds_run'])} | {cell['best_accuracy']:.4f} | "
                     f"{cell['final_accuracy']:.4f} | {cell['rounds_run']} | {cell['seconds_per_round']:.2f} |")
    if a.get("lr") is not None:
        lines += ["", f"Learning rate {a['lr']:g} given (--lr), not swept."]
    elif result["sweeps"]:
        lines += ["", "Learning-rate sweeps (IID, after the sweep rounds; chosen by validation accuracy, the test "
                      "accuracy shown for the record only):", ""]
    for name, tried in result["sweeps"].items():
        lines.append(f"- {name}: " + ", ".join(f"lr {t['lr']:g} → validation {t['val_accuracy']:.4f} "
                                               f"(test {t['test_accuracy']:.4f})" for t in tried))
    return "\n".join(lines) + "\n"


def _rounds(reached: int | None, run: int) -> str:
    return str(reached) if reached else f"not in {run}"


def selection(args: argparse.Namespace) -> str:
    """What each choice of the study was made on, for its results file."""
    if args.lr is not None:
        return (f"the learning rate {args.lr:g} was given (--lr), not chosen by this study; the test set scores the "
                "runs and chooses nothing.")
    return (f"each algorithm's learning rate is the one with the best validation accuracy after {args.sweep_rounds} "
            f"IID rounds, on {args.val} examples of the training pool the coordinator kept from every worker "
            "(fedfleet run --server-val); the test set scores the reported runs and chooses nothing. \"Rounds to "
            "target (test)\" is the first round whose test accuracy reached the target (the run stops there); "
            "\"(validation)\" the first whose validation accuracy did, within the rounds run.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist", choices=["mnist", "fashion-mnist"])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--max-rounds", type=int, default=100)
    ap.add_argument("--sgd-max-rounds", type=int, default=300)
    ap.add_argument("--lrs", default="0.02,0.05,0.1", help="FedAvg learning rates to sweep")
    ap.add_argument("--sgd-lrs", default="0.1,0.3,1.0", help="FedSGD learning rates to sweep")
    ap.add_argument("--sweep-rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algorithm", action="append", choices=list(ALGORITHMS), help="default: both")
    ap.add_argument("--partition", action="append", choices=list(PARTITIONS.values()),
                    help="iid or natural (2 label shards per worker); default: both")
    ap.add_argument("--lr", type=float, help="skip the sweep and use this learning rate")
    ap.add_argument("--name", default="", help="suffix of the results file, to keep several studies")
    ap.add_argument("--val", type=int, default=5000,
                    help="examples of the training pool the coordinator keeps for validation (--server-val): what "
                         "the learning rate is chosen on; 0 only with --lr")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder the results files are written to")
    args = ap.parse_args(argv)
    if args.val <= 0 and args.lr is None:
        ap.error("--val must be > 0 unless --lr is given: the learning rate is chosen on validation accuracy")
    algorithms = args.algorithm or list(ALGORITHMS)
    partitions = {data: p for data, p in PARTITIONS.items() if p in (args.partition or PARTITIONS.values())}
    command = "python benchmarks/mnist_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "command": command.strip(), "args": {k: v for k, v in vars(args).items() if k not in ("data_dir", "results")},
        "selection": selection(args), "sweeps": {}, "cells": []}
    stem = args.results / f"convergence-{args.task}-{args.model}{'-' + args.name if args.name else ''}"
    with tempfile.TemporaryDirectory(prefix="fedfleet-conv-") as tmpdir:
        tmp = Path(tmpdir)
        for algo in algorithms:
            epochs, batch = ALGORITHMS[algo]
            if args.lr is None:
                lrs = [float(x) for x in (args.lrs if algo == "FedAvg" else args.sgd_lrs).split(",")]
                lr, result["sweeps"][algo] = sweep(args, epochs, batch, lrs, tmp, algo)
            else:
                lr = args.lr
            cap = args.max_rounds if algo == "FedAvg" else args.sgd_max_rounds
            for data, partition in partitions.items():
                r = run(args, partition, epochs, batch, lr, cap, args.target, tmp / f"{algo}-{partition}")
                result["cells"].append({"data": data, "algorithm": algo, **r})
                print(f"{data:>20} {algo:>7} lr {lr:g}: rounds to {args.target:g}: {r['rounds_to_target']} "
                      f"(best {r['best_accuracy']:.4f}, {r['rounds_run']} rounds, {r['seconds']:.0f} s)", flush=True)
                write(stem, result)  # after every cell: a study of hours keeps what it has if it is cut off
    write(stem, result)
    print(markdown(result))
    return 0


def write(stem: Path, result: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a --name such as "lr0.05" has a dot that it would take for a suffix.
    stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
