"""MNIST / Fashion-MNIST: rounds needed to reach a test accuracy, FedAvg against FedSGD, IID against
pathological non-IID (2 label shards per worker), after McMahan et al. (2017), over seeds; Dirichlet(0.5)
label skew on request (--partition dirichlet:0.5).

    python benchmarks/mnist_convergence.py                                  # 2NN (MLP), target 0.97
    python benchmarks/mnist_convergence.py --model cnn --target 0.99 --max-rounds 300   # the paper's CNN
    python benchmarks/mnist_convergence.py --task fashion-mnist --data-dir ../shared/data/fashion-mnist \\
        --model cnn --target 0.90
    python benchmarks/mnist_convergence.py --model cnn --target 0.99 --seeds 0,1,2     # 3 seeds, mean ± std
    python benchmarks/mnist_convergence.py --model cnn --target 0.99 --seeds 0,1,2 --resume   # only the missing
    python benchmarks/mnist_convergence.py --task fashion-mnist --data-dir ../shared/data/fashion-mnist \\
        --model cnn --target 0.90 --algorithm FedAvg --partition natural --strategy fedavgm \\
        --strategy-option server_lr=1 --strategy-option momentum=0.9 --local-epochs 2 --name fedavgm-noniid
    python benchmarks/mnist_convergence.py ... --strategy fedadam --sweep-option server_lr=0.01,0.03,0.1 \
        --select-last 5     # the server's rate swept with the local one; chosen on the last 5 rounds' mean

100 workers sharing the 60k training images less the --val examples the coordinator keeps apart
(``fedfleet run --server-val``: 550 each with the default 5,000), fraction 0.1 (10 workers a round), many
logical workers per worker process (--processes). FedAvg: E=--local-epochs (5) local epochs, batch B=10.
FedSGD: E=1 and B=all of a worker's data: one gradient step per round. --strategy and --strategy-option
(those of ``fedfleet run``: server momentum, FedProx, adaptive server optimisers) apply to every run.

Each algorithm's learning rate is the best of a small sweep (--lrs, --sgd-lrs) by VALIDATION accuracy (the --val
examples, which no worker trains on) after --sweep-rounds IID rounds (--sweep-partition for another split;
--select-last K: the mean of the last K rounds), run once on the first seed; --sweep-option sweeps a strategy
option with it (every learning rate × every value). Every seed's runs then use what was chosen: the test set
chooses nothing, it only scores the reported runs. A seed (``fedfleet run --seed``) changes the validation draw,
the partition, the model's initialisation and the sampling. Every cell is one real `fedfleet run` with
--target-accuracy, so a run stops at the first round whose global model reaches the target on the test set (the
paper's "rounds to target"), or at --max-rounds; next to it the table gives the first round whose validation
accuracy reached the target (within the rounds run). Tables aggregate over seeds: accuracies as mean ± sample
std, rounds to target as median [min-max] with the seeds that did not reach it counted.

Writes benchmarks/results/convergence-TASK-MODEL[-NAME].{json,md} (--results for another folder) after every
cell. --resume reads that file back, checks it was made with the same options (all but --seeds), keeps its
sweeps and cells and runs only the (data, algorithm, seed) cells it lacks; without --resume it is overwritten.
The runs live in --work (default RESULTS/.runs/NAME) until the results file holds them, so the run a sitting
was cut off in is carried on from its last round (``fedfleet run --resume``), not started again.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from fedfleet.errors import ConfigError, StorageError
from fedfleet.runner import check_out
from fedfleet.storage.run_dir import RunDir
from fedfleet.strategies import STRATEGIES, make_strategy
from machine import commit, write_results

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 60_000
# Batch size B per algorithm; None: all of a worker's data in one batch (B=∞ in the paper). FedAvg's local
# epochs E come from --local-epochs; FedSGD's are 1 by definition.
BATCH: dict[str, int | None] = {"FedAvg": 10, "FedSGD": None}
PARTITIONS = {"IID": "iid", "non-IID (2 shards)": "natural", "Dirichlet(0.5)": "dirichlet:0.5"}
# What a study runs without --partition: the paper's two. Dirichlet(0.5) is the label skew of Flower's baselines
# (milder than 2 shards: a worker holds most classes, in skewed proportions), run when asked for.
DEFAULT_PARTITIONS = ("iid", "natural")
# Options that may differ between the sittings of one resumed study: they say which cells to run, not how.
# "seed" is the one-seed option of results files written before --seeds.
SITTING_OPTIONS = frozenset({"seeds", "seed", "resume"})
# Options added after some results files were written, with the value those files were made with: such a file
# resumes under a command that gives that value (or the option's default).
LATER_OPTIONS: dict[str, Any] = {"sweep_partition": "iid", "lr_decay": 1.0, "sweep_option": {}, "select_last": 1}


def command(args: argparse.Namespace, partition: str, epochs: int, batch: int | None, lr: float, rounds: int,
            target: float | None, seed: int, out: Path, swept: dict[str, str] | None = None) -> list[str]:
    """The ``fedfleet run`` of one sweep run or cell, without --overwrite or --resume (``run`` adds one)."""
    batch = batch or -(-(TRAIN_IMAGES - args.val) // args.workers)  # B=all: the largest IID share in one batch
    # Resolved, so a cell cut off under `--data-dir ../x` resumes under the default's absolute spelling of the
    # same folder (fedfleet run --resume refuses a task option that reads differently from the run's own).
    data_dir = Path(args.data_dir).resolve()
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", args.task, "--task-option", f"data_dir={data_dir}",
           "--task-option", f"model={args.model}", "--workers", str(args.workers), "--fraction", str(args.fraction),
           "--processes", str(args.processes), "--partition", partition, "--local-epochs", str(epochs),
           "--batch-size", str(batch), "--lr", str(lr), "--rounds", str(rounds), "--val-fraction", "0",
           "--seed", str(seed), "--strategy", args.strategy, "--round-timeout", "3600", "--worker-timeout", "600",
           "--out", str(out), "--quiet"]
    for key, value in {**strategy_options(args.strategy_option), **(swept or {})}.items():
        cmd += ["--strategy-option", f"{key}={value}"]
    if args.lr_decay != 1.0:
        cmd += ["--lr-decay", str(args.lr_decay)]
    if target is not None:
        cmd += ["--target-accuracy", str(target)]
    if args.val:
        cmd += ["--server-val", str(args.val)]
    return cmd


def run(args: argparse.Namespace, partition: str, epochs: int, batch: int | None, lr: float, rounds: int,
        target: float | None, seed: int, out: Path, swept: dict[str, str] | None = None) -> dict[str, Any]:
    """One ``fedfleet run`` in ``out``; ``swept``: strategy options a sweep chose, over --strategy-option's.

    A run a cut-off sitting left in ``out`` is not started again: a finished one is read as it is, an
    unfinished one (stopped or killed) carried on with ``fedfleet run --resume`` from its last round; either is
    marked ``resumed``, its time per round taken from the coordinator's round records, not the wall clock."""
    cmd = command(args, partition, epochs, batch, lr, rounds, target, seed, out, swept)
    prior = _left_over(out)
    t0 = time.time()
    if prior != "finished":
        subprocess.run([*cmd, "--resume" if prior == "unfinished" else "--overwrite"], check=True)
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
    if prior is not None:
        wall = sum(r.seconds for r in records)
    return {"lr": lr, "rounds_run": s.rounds, "rounds_to_target": first_reaching(accs, target),
            "val_rounds_to_target": first_reaching(vals, target), "final_accuracy": s.final_accuracy,
            "final_val_accuracy": s.final_val_accuracy, "best_accuracy": max(accs), "seconds": round(wall, 1),
            "seconds_per_round": round(wall / max(1, len(accs)), 2),
            "accuracy_by_round": [round(a, 4) for a in accs],
            "val_accuracy_by_round": [None if v is None else round(v, 4) for v in vals],
            **({"resumed": True} if prior is not None else {})}


def _left_over(out: Path) -> str | None:
    """What a cut-off sitting left in ``out``: "finished", "unfinished" (fedfleet run --resume carries it on) or
    None (nothing to keep: no run, or one that failed)."""
    try:
        summary = RunDir(out).read_summary()
        if summary is not None and summary.state == "finished":
            return "finished"
        check_out(out, overwrite=False, resume=True)  # ConfigError: no run there, or it has ended
    except (ConfigError, StorageError):
        return None
    return "unfinished"


def first_reaching(scores: list[float | None], target: float | None) -> int | None:
    """The first round (1-based) whose score is at least ``target``; None if none is, or no target.

    >>> first_reaching([0.5, None, 0.91, 0.95], 0.9), first_reaching([0.5], 0.9), first_reaching([0.99], None)
    (3, None, None)
    """
    return next((i + 1 for i, a in enumerate(scores) if target is not None and a is not None and a >= target), None)


def sweep_score(t: dict[str, Any], last: int) -> float | None:
    """What a sweep run is chosen on: its validation accuracy in the last round, or the mean over its last
    ``last`` rounds; None without validation scores.

    >>> sweep_score({"val_accuracy": 0.7, "val_by_round": [0.5, 0.9, 0.6, 0.7]}, 1)
    0.7
    >>> round(sweep_score({"val_accuracy": 0.7, "val_by_round": [0.5, 0.9, 0.6, 0.7]}, 3), 4)
    0.7333
    """
    if last == 1:
        return t.get("val_accuracy")
    scores = (t.get("val_by_round") or [])[-last:]
    if len(scores) < last or any(v is None for v in scores):
        return None
    return statistics.fmean(scores)


def select(tried: list[dict[str, Any]], last: int = 1) -> dict[str, Any]:
    """The sweep run (learning rate, and ``options`` when a strategy option was swept) with the best
    VALIDATION score (``sweep_score``; the first of equals): never the test accuracy, which the reported runs
    are scored on. ValueError if a run has no validation score.

    >>> select([{"lr": 0.1, "val_accuracy": 0.90, "test_accuracy": 0.95},
    ...         {"lr": 0.2, "val_accuracy": 0.93, "test_accuracy": 0.91}])["lr"]
    0.2
    >>> select([{"lr": 0.1, "val_accuracy": 0.93, "val_by_round": [0.90, 0.80, 0.93]},
    ...         {"lr": 0.2, "val_accuracy": 0.91, "val_by_round": [0.88, 0.90, 0.91]}], last=2)["lr"]
    0.2
    """
    missing = [t["lr"] for t in tried if sweep_score(t, last) is None]
    if not tried or missing:
        raise ValueError(f"the sweep selects on validation accuracy; runs without one (lr {missing}): give --val > 0")
    return max(tried, key=lambda t: float(sweep_score(t, last) or 0.0))


def sweep_grid(entries: Sequence[str] | None) -> list[dict[str, str]]:
    """``--sweep-option KEY=V1,V2,...`` entries as the strategy options of each sweep run: every combination of
    the values ([{}]: nothing swept).

    >>> sweep_grid(None), sweep_grid(["server_lr=0.01,0.1"])
    ([{}], [{'server_lr': '0.01'}, {'server_lr': '0.1'}])
    >>> len(sweep_grid(["server_lr=0.01,0.1", "tau=0.001,0.01,0.1"]))
    6
    >>> sweep_grid(["server_lr"])
    Traceback (most recent call last):
    ValueError: --sweep-option must look like KEY=VALUE,VALUE,... Got 'server_lr' instead.
    """
    grid: list[dict[str, str]] = [{}]
    for key, values in parse_sweep_options(entries).items():
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


def parse_sweep_options(entries: Sequence[str] | None) -> dict[str, list[str]]:
    """``--sweep-option`` entries as {key: values}, keys sorted (how a results file records them)."""
    options: dict[str, list[str]] = {}
    for entry in entries or ():
        key, sep, values = entry.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts) or len(set(parts)) != len(parts):
            raise ValueError(f"--sweep-option must look like KEY=VALUE,VALUE,... Got {entry!r} instead.")
        if key in options:
            raise ValueError(f"--sweep-option {key} is given twice; give all its values in one, e.g. {key}=1,2")
        options[key] = parts
    return dict(sorted(options.items()))


def sweep(args: argparse.Namespace, epochs: int, batch: int | None, lrs: list[float], seed: int, work: Path,
          name: str) -> list[dict[str, Any]]:
    """Every sweep run's learning rate (and swept options) with its scores; ``select`` chooses among them."""
    tried = []
    for lr in lrs:
        for swept in sweep_grid(args.sweep_option):
            suffix = "".join(f"-{k}{v}" for k, v in swept.items())
            r = run(args, args.sweep_partition, epochs, batch, lr, args.sweep_rounds, None, seed,
                    work / f"sweep-{name}-{lr}{suffix}", swept)
            # The test accuracy is kept for the record only: select never reads it.
            t = {"lr": lr, "val_accuracy": r["final_val_accuracy"], "test_accuracy": r["final_accuracy"],
                 "val_by_round": r["val_accuracy_by_round"]}
            if swept:
                t["options"] = swept
            tried.append(t)
            print(f"  sweep {name} lr {lr:g}{_options_text(swept)} (seed {seed}): validation accuracy "
                  f"{_score_text(args.select_last, args.sweep_rounds)} {sweep_score(t, args.select_last):.4f}",
                  flush=True)
    return tried


def _options_text(options: dict[str, str] | None) -> str:
    return "".join(f", {k}={v}" for k, v in (options or {}).items())


def _score_text(last: int, rounds: int) -> str:
    """What a sweep is chosen on, in words.

    >>> _score_text(1, 20), _score_text(5, 20)
    ('after 20 rounds', 'over rounds 16-20 (mean)')
    """
    return f"after {rounds} rounds" if last == 1 else f"over rounds {rounds - last + 1}-{rounds} (mean)"


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a comma list of distinct seeds, in the order they are run (the first one sweeps).

    >>> parse_seeds("0,1,2"), parse_seeds("7")
    ([0, 1, 2], [7])
    >>> parse_seeds("0,0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: seeds must be distinct whole numbers >= 0, e.g. 0,1,2; got '0,0'
    """
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct whole numbers >= 0, e.g. 0,1,2; got {text!r}")
    return seeds


def strategy_options(entries: Sequence[str] | None) -> dict[str, str]:
    """``--strategy-option KEY=VALUE`` entries as a dict sorted by key (a later KEY wins, as in ``fedfleet run``).

    >>> strategy_options(["momentum=0.9", "server_lr=1", "momentum=0.5"])
    {'momentum': '0.5', 'server_lr': '1'}
    """
    options: dict[str, str] = {}
    for entry in entries or ():
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"--strategy-option must look like KEY=VALUE. Got {entry!r} instead.")
        options[key] = value
    return dict(sorted(options.items()))


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options a results file records: everything but where the data, runs and results are (paths of one
    machine) and --resume (how this sitting started, not what the study is)."""
    recorded = {k: v for k, v in vars(args).items() if k not in ("data_dir", "results", "resume", "work")}
    recorded["strategy_option"] = strategy_options(args.strategy_option)
    recorded["sweep_option"] = parse_sweep_options(args.sweep_option)
    return recorded


def differing(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The options (as flags) on which a saved study's args and this command's differ, the seeds aside.

    >>> differing({"seeds": [0], "max_rounds": 100, "lr": None}, {"seeds": [0, 1, 2], "max_rounds": 100, "lr": None})
    []
    >>> differing({"seed": 0, "max_rounds": 100}, {"seeds": [1], "max_rounds": 150, "strategy": "fedavgm"})
    ['--max-rounds', '--strategy']
    >>> differing({"lr": None}, {"lr": None, "sweep_partition": "iid"})   # a file from before --sweep-partition
    []
    """
    keys = (saved.keys() | given.keys()) - SITTING_OPTIONS
    return ["--" + k.replace("_", "-") for k in sorted(keys)
            if saved.get(k, LATER_OPTIONS.get(k)) != given.get(k, LATER_OPTIONS.get(k))]


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sample std`` (n-1) to ``digits`` places; one value alone.

    >>> mean_std([0.9812, 0.9850, 0.9831]), mean_std([0.5]), mean_std([1.5, 2.5], digits=2)
    ('0.9831 ± 0.0019', '0.5000', '2.00 ± 0.71')
    """
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def rounds_summary(reached: Sequence[int | None], rounds_run: Sequence[int]) -> str:
    """Rounds to target over seeds: ``median [min-max]`` of the seeds that reached it, and how many did not.

    ``reached[i]`` is seed i's first round at the target (None: not within its ``rounds_run[i]`` rounds). The
    median counts a seed that did not reach the target as beyond its rounds run; where that decides the
    median, only a bound is known and it is given as ``>N``.

    >>> rounds_summary([18], [18]), rounds_summary([None], [150]), rounds_summary([18, 16, 20], [18, 16, 20])
    ('18', 'not in 150', '18 [16-20]')
    >>> rounds_summary([18, None, 20], [18, 30, 20])
    '20 [18-20], 1 of 3 not in 30'
    >>> rounds_summary([None, 18, None], [30, 18, 30]), rounds_summary([None, None, None], [150, 150, 150])
    ('>30 [18], 2 of 3 not in 30', '3 of 3 not in 150')
    >>> rounds_summary([20, None], [20, 30])
    '>25 [20], 1 of 2 not in 30'
    """
    n = len(reached)
    missed = sorted({run for r, run in zip(reached, rounds_run, strict=True) if r is None})
    not_in = f"not in {'/'.join(map(str, missed))}"
    hits = sorted(r for r in reached if r is not None)
    if not hits:
        return not_in if n == 1 else f"{n} of {n} {not_in}"
    # A seed that missed sorts after every hit (it would have needed more rounds than it ran); its value in the
    # median is its rounds run, a lower bound, so a median that takes one in is a lower bound too.
    ordered = sorted(((r, False) if r is not None else (run, True) for r, run in zip(reached, rounds_run,
                                                                                     strict=True)),
                     key=lambda pair: (pair[1], pair[0]))
    middle = ordered[(n - 1) // 2: n // 2 + 1]
    median = statistics.fmean(v for v, _ in middle)
    text = (">" if any(censored for _, censored in middle) else "") + f"{median:g}"
    if n == 1:
        return text
    span = f"{hits[0]}" if len(hits) == 1 else f"{hits[0]}-{hits[-1]}"
    return f"{text} [{span}]" + (f", {n - len(hits)} of {n} {not_in}" if missed else "")


def rows(cells: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The cells grouped by (data, algorithm), groups in the order they first appear, seeds in seed order.

    >>> {k: [c.get("seed") for c in v] for k, v in rows([{"data": "IID", "algorithm": "FedAvg", "seed": 1},
    ...     {"data": "IID", "algorithm": "FedAvg", "seed": 0}, {"data": "IID", "algorithm": "FedSGD"}]).items()}
    {('IID', 'FedAvg'): [0, 1], ('IID', 'FedSGD'): [None]}
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["data"], cell["algorithm"]), []).append(cell)
    # Cells of files from before --seeds have no seed: one each, nothing to order.
    return {k: sorted(v, key=lambda c: c.get("seed") or 0) for k, v in groups.items()}


def strategy_text(a: dict[str, Any]) -> str:
    """The strategy of a study's args, with its options; fedavg for files that predate --strategy.

    >>> strategy_text({"strategy": "fedavgm", "strategy_option": {"momentum": "0.5"}}), strategy_text({})
    ('fedavgm (momentum=0.5)', 'fedavg')
    """
    options = a.get("strategy_option") or {}
    name = str(a.get("strategy", "fedavg"))
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    # .get with the old defaults throughout: files written before --seeds, --val and --strategy still render.
    val = a.get("val", 0)
    seeds = (sorted({c["seed"] for c in result["cells"] if c.get("seed") is not None}) or a.get("seeds")
             or [a.get("seed", 0)])
    strategy = strategy_text(a)
    swept = "" if result.get("sweep_seed") is None else f" (on seed {result['sweep_seed']})"
    lrs = (f"learning rate {a['lr']:g} given" if a.get("lr") is not None
           else f"{swept_what(a)} from a {a['sweep_rounds']}-round {sweep_label(a)} sweep{swept}")
    lines = [f"# Rounds to {a['target']:.0%} test accuracy: {a['task']}, {a['model']} ({result['date']}, "
             f"{result['machine']})", "",
             f"`{result['command']}`: {a['workers']} workers sharing {TRAIN_IMAGES - val} examples "
             f"({val} kept by the coordinator for validation), fraction {a['fraction']}, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, strategy {strategy}, "
             f"FedAvg E={a.get('local_epochs', 5)} B=10, FedSGD E=1 B=all{decay_text(a)}; {lrs}; runs capped at "
             f"{a['max_rounds']} rounds (FedSGD {a['sgd_max_rounds']}).", "",
             f"Chosen on what: {result.get('selection', 'not recorded (this file predates the record).')}", "",
             "Accuracies are on the test set, mean ± sample std over the seeds; rounds to target are the median "
             "[min-max] over the seeds that reached it, with those that did not counted.", "",
             "| data | algorithm | lr | rounds to target (test) | rounds to target (validation) | "
             "final test accuracy | best test accuracy over rounds | s / round | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    label = "" if strategy == "fedavg" else f", {strategy}"
    for (data, algorithm), cells in rows(result["cells"]).items():
        runs = [c["rounds_run"] for c in cells]
        lrs = "/".join(sorted({f"{c['lr']:g}{_options_text(c.get('options'))}" for c in cells}))
        lines.append(f"| {data} | {algorithm}{label} | {lrs} | "
                     f"{rounds_summary([c['rounds_to_target'] for c in cells], runs)} | "
                     f"{_val_rounds(cells)} | "
                     f"{mean_std([c['final_accuracy'] for c in cells])} | "
                     f"{mean_std([c['best_accuracy'] for c in cells])} | "
                     f"{statistics.fmean(c['seconds_per_round'] for c in cells):.2f} | {len(cells)} |")
    if a.get("lr") is not None:
        lines += ["", f"Learning rate {a['lr']:g} given (--lr), not swept."]
    elif any(t.get("val_accuracy") is None for tried in result["sweeps"].values() for t in tried):
        lines += ["", f"Learning-rate sweeps ({sweep_label(a)}, after the sweep rounds; this file predates "
                      "--server-val: they have test accuracies only, and the rate was chosen on them):", ""]
    elif result["sweeps"]:
        last = a.get("select_last", LATER_OPTIONS["select_last"])
        lines += ["", f"Sweeps ({sweep_label(a)}; chosen by validation accuracy "
                      f"{_score_text(last, a['sweep_rounds'])}, the last round's test accuracy shown for the record "
                      "only):", ""]
    for name, tried in result["sweeps"].items():
        lines.append(f"- {name}: " + ", ".join(_tried(t, a.get("select_last", 1)) for t in tried))
    sittings = result.get("sittings") or []
    if len(sittings) > 1:
        lines += ["", f"Run in {len(sittings)} sittings (--resume): " + "; ".join(
            f"{s['date']} at {s.get('commit') or 'an unknown commit'}: {s['cells_run']} cell(s)" for s in sittings)
            + "."]
    return "\n".join(lines) + "\n"


def _val_rounds(cells: list[dict[str, Any]]) -> str:
    # Without validation scores (a file from before --server-val, or --val 0) "not in N" would claim a miss.
    if not any(v is not None for c in cells for v in c.get("val_accuracy_by_round") or ()):
        return "—"
    return rounds_summary([c.get("val_rounds_to_target") for c in cells], [c["rounds_run"] for c in cells])


def _tried(t: dict[str, Any], last: int = 1) -> str:
    run = f"lr {t['lr']:g}{_options_text(t.get('options'))}"
    if t.get("val_accuracy") is None:  # a sweep from before --server-val: on test accuracy, shown as what it is
        return f"{run} → test {t.get('test_accuracy', t.get('accuracy')):.4f}"
    score = sweep_score(t, last)
    return f"{run} → validation {'—' if score is None else f'{score:.4f}'} (test {t['test_accuracy']:.4f})"


def swept_what(a: dict[str, Any]) -> str:
    """What a study's sweep chose, for its header.

    >>> swept_what({}), swept_what({"sweep_option": {"server_lr": ["0.01", "0.1"]}})
    ('learning rates', 'learning rates and server_lr')
    """
    return " and ".join(["learning rates", *(a.get("sweep_option") or {})])


def decay_text(a: dict[str, Any]) -> str:
    """How a study's learning rate decays, for its table's header; nothing for a constant rate.

    >>> decay_text({"lr_decay": 0.99}), decay_text({})
    (', lr × 0.99^(round − 1)', '')
    """
    decay = a.get("lr_decay", LATER_OPTIONS["lr_decay"])
    return "" if decay == 1.0 else f", lr × {decay:g}^(round − 1)"


def sweep_label(a: dict[str, Any]) -> str:
    """The data a study's learning-rate sweep ran on, as its tables name it; IID for files from before
    --sweep-partition.

    >>> sweep_label({}), sweep_label({"sweep_partition": "natural"})
    ('IID', 'non-IID (2 shards)')
    """
    partition = a.get("sweep_partition", LATER_OPTIONS["sweep_partition"])
    return next(label for label, p in PARTITIONS.items() if p == partition)


def selection(args: argparse.Namespace, sweep_seed: int | None) -> str:
    """What each choice of the study was made on, for its results file."""
    best = ("\"Best test accuracy over rounds\" is a maximum over the test scores, reported for the record: it "
            "chooses nothing.")
    if args.lr is not None:
        return (f"the learning rate {args.lr:g} was given (--lr), not chosen by this study; the test set scores the "
                f"runs and chooses nothing. {best}")
    chosen = ("learning rate" if not args.sweep_option else
              "learning rate and " + ", ".join(parse_sweep_options(args.sweep_option)))
    on = (f"after {args.sweep_rounds} {sweep_label(vars(args))} rounds of seed {sweep_seed}" if args.select_last == 1
          else f"{_score_text(args.select_last, args.sweep_rounds)} of {sweep_label(vars(args))} runs of seed "
          f"{sweep_seed}")
    return (f"each algorithm's {chosen} is the one with the best validation accuracy {on}, on {args.val} examples "
            "of the training pool the coordinator kept from every worker (fedfleet run --server-val); every seed's "
            "runs use it, and the test set scores them and chooses nothing. \"Rounds to target (test)\" is the first "
            "round whose test accuracy reached the target (the run stops there); \"(validation)\" the first whose "
            f"validation accuracy did, within the rounds run. {best}")


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--sweep-partition", default="iid", choices=list(PARTITIONS.values()),
                    help="the data the learning-rate sweep runs on (default iid, the paper's protocol); a study of "
                         "one non-IID setting may tune on that setting itself, still by validation accuracy")
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seeds", "--seed", dest="seeds", type=parse_seeds, default=[0],
                    help="comma list of seeds (fedfleet run --seed), each cell runs once per seed; the first one "
                         "runs the learning-rate sweep (default 0; --seed is the same option)")
    ap.add_argument("--local-epochs", type=int, default=5, help="FedAvg's local epochs E (FedSGD's are 1)")
    ap.add_argument("--lr-decay", type=float, default=1.0,
                    help="round t trains with lr x decay^(t-1), in every run, sweeps included (fedfleet run "
                         "--lr-decay; default 1: constant)")
    ap.add_argument("--strategy", default="fedavg", choices=list(STRATEGIES),
                    help="how the coordinator aggregates and applies updates, for every run (fedfleet run --strategy)")
    ap.add_argument("--strategy-option", action="append", metavar="KEY=VALUE",
                    help="option of the strategy, e.g. momentum=0.9 (repeatable; fedfleet run --strategy-option)")
    ap.add_argument("--sweep-option", action="append", metavar="KEY=V1,V2",
                    help="a strategy option swept with the learning rate: every rate x every value, the best by "
                         "validation accuracy, e.g. server_lr=0.01,0.03,0.1 (repeatable: a grid of several)")
    ap.add_argument("--select-last", type=int, default=1, metavar="K",
                    help="choose on the mean validation accuracy of the sweep runs' last K rounds (default 1: the "
                         "last round; on non-IID data rounds swing by points and a mean of several is steadier)")
    ap.add_argument("--algorithm", action="append", choices=list(BATCH), help="default: both")
    ap.add_argument("--partition", action="append", choices=list(PARTITIONS.values()),
                    help="iid, natural (2 label shards per worker) or dirichlet:0.5 (label proportions drawn from "
                         "Dirichlet(0.5), as in Flower's baselines); repeatable; default: iid and natural")
    ap.add_argument("--lr", type=float, help="skip the sweep and use this learning rate")
    ap.add_argument("--name", default="", help="suffix of the results file, to keep several studies")
    ap.add_argument("--val", type=int, default=5000,
                    help="examples of the training pool the coordinator keeps for validation (--server-val): what "
                         "the learning rate is chosen on; 0 only with --lr")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder the results files are written to")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder the study's runs live in while it runs (default: RESULTS/.runs/NAME); each is "
                         "deleted once the results file holds it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the sweeps and cells of this study's results file (same options but --seeds) and run "
                         "only the missing (data, algorithm, seed) cells")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.val <= 0 and args.lr is None:
        ap.error("--val must be > 0 unless --lr is given: the learning rate is chosen on validation accuracy")
    if not 0 < args.lr_decay <= 1:
        ap.error(f"--lr-decay must be in (0, 1]. Got {args.lr_decay} instead.")
    if args.local_epochs < 1:
        ap.error(f"--local-epochs must be at least 1. Got {args.local_epochs} instead.")
    if not 1 <= args.select_last <= args.sweep_rounds:
        ap.error(f"--select-last must be between 1 and --sweep-rounds ({args.sweep_rounds}). "
                 f"Got {args.select_last} instead.")
    # Checked now, not by the first fedfleet run: a bad option is one line before a study, not a failed hour.
    try:
        fixed = strategy_options(args.strategy_option)
        grid = sweep_grid(args.sweep_option)
        twice = sorted(fixed.keys() & grid[0].keys())
        if twice:
            raise ValueError(f"{', '.join(twice)}: given both by --strategy-option and --sweep-option; give one")
        if args.lr is not None and args.sweep_option:
            raise ValueError("--sweep-option sweeps with the learning rate; --lr skips the sweep: give one")
        for swept in grid:
            make_strategy(args.strategy, {**fixed, **swept})
    except (ConfigError, ValueError) as exc:
        ap.error(str(exc))
    algorithms = args.algorithm or list(BATCH)
    partitions = {data: p for data, p in PARTITIONS.items() if p in (args.partition or DEFAULT_PARTITIONS)}
    command = ("python benchmarks/mnist_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    name = f"convergence-{args.task}-{args.model}{'-' + args.name if args.name else ''}"
    saved_file = args.results / f"{name}.json"
    given = recorded_args(args)
    result: dict[str, Any] = {"sweeps": {}, "cells": [], "sittings": []}
    if args.resume and saved_file.exists():
        result = json.loads(saved_file.read_text())
        changed = differing(result.get("args", {}), given)
        if changed:
            ap.error(f"--resume: {saved_file.name} was made with other values of {', '.join(changed)}; give the "
                     "same options as that study (only --seeds may differ), or another --name for a new study")
        print(f"resuming {saved_file.name}: {len(result['cells'])} cell(s) done", flush=True)
    elif args.resume:
        print(f"--resume: no {saved_file.name} yet, starting the study", flush=True)
    done = {(c["data"], c["algorithm"], c.get("seed")) for c in result["cells"]}
    # The study's seeds: those already in the file, then the new ones, so the file says what it holds.
    earlier = [c["seed"] for c in result["cells"] if c.get("seed") is not None]
    seeds = list(dict.fromkeys([*earlier, *args.seeds]))
    if args.lr is None:
        result.setdefault("sweep_seed", args.seeds[0])
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    sitting: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "commit": commit(),
                               "command": command, "cells_run": 0}
    result.update({"date": sitting["date"], "machine": machine, "command": command, "args": {**given, "seeds": seeds},
                   "selection": selection(args, result.get("sweep_seed"))})
    result.setdefault("sittings", []).append(sitting)

    def save() -> None:
        # After every sweep and cell: a study of hours keeps what it has if it is cut off, and --resume goes on.
        write_results(args.results, name, result, markdown(result))

    # The runs live in ``work`` while the study runs, so that a sitting cut off mid-run leaves them for --resume;
    # a new study (no --resume) starts with none, and each is deleted once the results file holds it.
    work = args.work or args.results / ".runs" / name
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    # Per algorithm: the learning rate, and the strategy options --sweep-option chose ({} when none).
    chosen: dict[str, tuple[float, dict[str, str]]] = {}
    for algo in algorithms:
        epochs = args.local_epochs if algo == "FedAvg" else 1
        if args.lr is not None:
            chosen[algo] = args.lr, {}
            continue
        if algo not in result["sweeps"]:
            lrs = [float(x) for x in (args.lrs if algo == "FedAvg" else args.sgd_lrs).split(",")]
            result["sweeps"][algo] = sweep(args, epochs, BATCH[algo], lrs, result["sweep_seed"], work, algo)
            save()
            for old in work.glob(f"sweep-{algo}-*"):
                shutil.rmtree(old)
        best = select(result["sweeps"][algo], args.select_last)
        chosen[algo] = float(best["lr"]), dict(best.get("options") or {})
    # Seed by seed, so a study cut off part-way has every cell at its first seeds rather than some at all.
    for seed in args.seeds:
        for algo in algorithms:
            epochs = args.local_epochs if algo == "FedAvg" else 1
            cap = args.max_rounds if algo == "FedAvg" else args.sgd_max_rounds
            for data, partition in partitions.items():
                if (data, algo, seed) in done:
                    continue
                lr, swept = chosen[algo]
                out = work / f"{algo}-{partition.replace(':', '')}-{seed}-lr{lr:g}{_options_text(swept)}"
                r = run(args, partition, epochs, BATCH[algo], lr, cap, args.target, seed, out, swept)
                result["cells"].append({"data": data, "algorithm": algo, "seed": seed,
                                        "date": sitting["date"], **r, **({"options": swept} if swept else {})})
                sitting["cells_run"] += 1
                print(f"{data:>20} {algo:>7} seed {seed} lr {lr:g}{_options_text(swept)}: rounds to "
                      f"{args.target:g}: {r['rounds_to_target']} (best {r['best_accuracy']:.4f}, "
                      f"{r['rounds_run']} rounds, {r['seconds']:.0f} s)", flush=True)
                save()
                shutil.rmtree(out)
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
