"""Song era: which model does best, every choice made on validation songs, repeated over seeds.

    python benchmarks/songs_models.py                    # 3 seeds: central models, then federated runs
    python benchmarks/songs_models.py --part central     # only the central models (or: --part federated)
    python benchmarks/songs_models.py --quick            # one seed, tiny grids: a smoke run (the test's size)

1. **Central.** For each seed s, a seeded, stratified 20% of the song task's training pool (the songs outside
   the fixed test 20%; ``songs.stratified_mask(y, 0.2, 1000 + s)``) is the validation set and the other 80%
   trains. Each model trains with every setting of its grid and is scored on the validation songs after every
   epoch (every boosting iteration for trees); the (setting, epoch) with the best validation accuracy is chosen,
   and only that model is scored on the test songs. Models: the songs task's logistic regression (its own numpy
   SGD), the songs-mlp task's MLP (15-64-64-3) and wider or deeper ones (128 x 2, 256 x 2, 128 x 3 hidden)
   trained by the same local SGD as a worker's (``torch_common.fit``, batch 32), and scikit-learn's
   HistGradientBoostingClassifier (when installed) over learning rate x leaf count.
2. **Federated.** ``fedfleet run`` with 8 workers, IID, 30 rounds, ``--server-val`` as many songs as the central
   validation set (taken out of the pool before partitioning, seeded by the run's seed), ``--val-fraction 0``:
   the songs task (logistic regression) and songs-mlp. Each one's local learning rate is the one of its grid
   with the best final validation accuracy at the first seed; every seed then runs with it, and the final
   model's test accuracy is reported.

Tables give the mean ± sample std over seeds; the test set chooses nothing. Writes
benchmarks/results/songs_models.{json,md} (or --results DIR) after every model.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from fedfleet.tasks.base import Dataset, TrainParams
from fedfleet.tasks.songs import SongsTask, stratified_mask, training_rows
from fleet import run_fedfleet
from machine import provenance, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = "benchmarks/songs_models.py"
VAL_FRACTION = 0.2
BATCH = 32
# (name, hidden units, hidden layers); 64 x 2 is the songs-mlp task's model.
MLPS = (("MLP 64 x 2 (songs-mlp)", 64, 2), ("MLP 128 x 2", 128, 2), ("MLP 256 x 2", 256, 2), ("MLP 128 x 3", 128, 3))
# The grids were widened twice, on validation scores only, each time a run chose at their edges: first logistic
# regression lr 0.01 near the 40-epoch cap, MLP lr 0.03, 63 leaves, federated lr 0.1 and 0.2; then 127 leaves
# (2 seeds of 3) and the federated MLP's lr 0.4. Each grid now reaches past what was chosen.
FULL = {"seeds": (0, 1, 2), "logreg_lrs": (0.003, 0.01, 0.05, 0.2), "mlp_lrs": (0.01, 0.03, 0.1), "epochs": 50,
        "hgb_rates": (0.05, 0.1, 0.2), "hgb_leaves": (31, 63, 127, 255), "hgb_iterations": 400,
        "fed_models": {"songs": (0.05, 0.1, 0.2, 0.4), "songs-mlp": (0.1, 0.2, 0.4, 0.8)}, "workers": 8, "rounds": 30}
QUICK = {"seeds": (0,), "logreg_lrs": (0.05,), "mlp_lrs": (0.1,), "epochs": 2, "hgb_rates": (0.1,),
         "hgb_leaves": (15,), "hgb_iterations": 20, "fed_models": {"songs": (0.05,), "songs-mlp": (0.1,)},
         "workers": 2, "rounds": 2}


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` to 4 places; one value alone.

    >>> mean_std([0.68, 0.69, 0.70]), mean_std([0.5])
    ('0.6900 ± 0.0100', '0.5000')
    """
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def best_by_validation(curves: dict[Any, list[float]]) -> tuple[Any, int]:
    """The setting and 1-based epoch whose validation accuracy is highest (the earliest of equals, then the first
    setting): what is chosen, never by a test score.

    >>> best_by_validation({0.1: [0.60, 0.66, 0.65], 0.3: [0.64, 0.66]})
    (0.1, 2)
    """
    return max(((setting, epoch) for setting, curve in curves.items() for epoch in range(1, len(curve) + 1)),
               key=lambda se: (curves[se[0]][se[1] - 1], -se[1]))


def split(seed: int) -> tuple[Dataset, Dataset]:
    """The central study's (training, validation) songs of ``seed``: a stratified 20% of the pool validates."""
    x, y, _ = training_rows()
    val = stratified_mask(y, VAL_FRACTION, 1000 + seed)
    return Dataset(x[~val], y[~val]), Dataset(x[val], y[val])


def accuracy(predict: Callable[[Any, np.ndarray], np.ndarray], weights: Any, data: Dataset) -> float:
    return float((predict(weights, data.x).argmax(axis=1) == data.y).mean())


def sgd_model(fit_one_epoch: Callable[[Any, int], Any], predict: Callable[[Any, np.ndarray], np.ndarray],
              start: Any, epochs: int, val: Dataset, test: Dataset) -> Iterator[tuple[float, float]]:
    """(validation, test) accuracy after each of ``epochs`` epochs from ``start``; the test score is read only
    for the epoch the validation curve picks."""
    weights = start
    for epoch in range(epochs):
        weights = fit_one_epoch(weights, epoch)
        yield accuracy(predict, weights, val), accuracy(predict, weights, test)


def central_logreg(seed: int, lrs: Sequence[float], epochs: int) -> dict[str, Any]:
    task = SongsTask()
    fit, val = split(seed)
    test = task.load_test()
    start = task.apply_stats(task.init_weights(seed), task.local_stats(fit))
    runs = {lr: list(sgd_model(lambda w, e, lr=lr: task.fit(w, fit, TrainParams(1, BATCH, lr, seed=e)).weights,
                               task.predict_proba, start, epochs, val, test)) for lr in lrs}
    return chosen(runs, "lr")


def central_mlp(seed: int, hidden: int, layers: int, lrs: Sequence[float], epochs: int) -> dict[str, Any]:
    import torch

    from fedfleet.tasks import torch_common
    from fedfleet.tasks.songs_mlp import build_model

    task = SongsTask()  # the songs-mlp task's standardisation: its statistics into the model's scaler buffers
    fit, val = split(seed)
    test = task.load_test()
    model = build_model(hidden, layers)
    torch.manual_seed(seed)
    start = task.apply_stats(torch_common.weights_of(build_model(hidden, layers)), task.local_stats(fit))

    def one_epoch(weights: Any, epoch: int, lr: float) -> Any:
        return torch_common.fit(model, weights, fit, TrainParams(1, BATCH, lr, seed=seed * 1000 + epoch),
                                transform=lambda x: x.astype(np.float32)).weights

    def predict(weights: Any, x: np.ndarray) -> np.ndarray:
        return torch_common.predict_logits(model, weights, x.astype(np.float32), batch_size=4096)

    runs = {lr: list(sgd_model(lambda w, e, lr=lr: one_epoch(w, e, lr), predict, start, epochs, val, test))
            for lr in lrs}
    return chosen(runs, "lr")


def central_hgb(seed: int, rates: Sequence[float], leaves: Sequence[int], iterations: int) -> dict[str, Any] | None:
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier  # type: ignore[import-not-found]
    except ImportError:
        return None
    fit, val = split(seed)
    test = SongsTask().load_test()
    runs = {}
    for rate in rates:
        for leaf in leaves:
            model = HistGradientBoostingClassifier(learning_rate=rate, max_leaf_nodes=leaf, max_iter=iterations,
                                                   early_stopping=False, random_state=seed).fit(fit.x, fit.y)
            runs[(rate, leaf)] = [(float((v == val.y).mean()), float((t == test.y).mean())) for v, t in
                                  zip(model.staged_predict(val.x), model.staged_predict(test.x), strict=True)]
    out = chosen(runs, "setting")
    rate, leaf = out.pop("setting")
    return {**out, "learning_rate": rate, "max_leaf_nodes": leaf}


def chosen(runs: dict[Any, list[tuple[float, float]]], name: str) -> dict[str, Any]:
    """The (setting, epoch) the validation curves pick, with its validation and test accuracy."""
    setting, epoch = best_by_validation({k: [v for v, _ in curve] for k, curve in runs.items()})
    val_acc, test_acc = runs[setting][epoch - 1]
    return {name: setting, "epochs": epoch, "val_accuracy": val_acc, "test_accuracy": test_acc,
            "val_by_setting": {str(k): max(v for v, _ in curve) for k, curve in runs.items()}}


def central(cfg: dict[str, Any], record: Callable[[str, list[dict[str, Any]]], None]) -> None:
    seeds = cfg["seeds"]
    models: list[tuple[str, Callable[[int], dict[str, Any] | None]]] = [
        ("logistic regression", lambda s: central_logreg(s, cfg["logreg_lrs"], cfg["epochs"]))]
    models += [(name, lambda s, h=h, n=n: central_mlp(s, h, n, cfg["mlp_lrs"], cfg["epochs"]))
               for name, h, n in MLPS]
    models.append(("HistGradientBoosting (scikit-learn)",
                   lambda s: central_hgb(s, cfg["hgb_rates"], cfg["hgb_leaves"], cfg["hgb_iterations"])))
    for name, train in models:
        cells = []
        for seed in seeds:
            started = time.perf_counter()
            cell = train(seed)
            if cell is None:
                print(f"{name}: scikit-learn is not installed, not run", flush=True)
                break
            cells.append({"seed": seed, **cell, "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name} seed {seed}: validation {cell['val_accuracy']:.4f} test {cell['test_accuracy']:.4f} "
                  f"({cells[-1]['seconds']} s)", flush=True)
        if cells:
            record(name, cells)


def federated(cfg: dict[str, Any], val_songs: int, work: Path,
              record: Callable[[str, dict[str, Any]], None]) -> None:
    for task, lrs in cfg["fed_models"].items():
        def run(lr: float, seed: int, task: str = task) -> dict[str, Any]:
            args = ["run", "--task", task, "--workers", str(cfg["workers"]), "--rounds", str(cfg["rounds"]),
                    "--partition", "iid", "--lr", str(lr), "--server-val", str(val_songs), "--val-fraction", "0",
                    "--seed", str(seed), "--overwrite"]
            summary, _, seconds = run_fedfleet(args, work / f"{task}-{lr}-{seed}")
            print(f"federated {task} lr {lr:g} seed {seed}: validation {summary['final_val_accuracy']:.4f} "
                  f"test {summary['final_accuracy']:.4f} ({seconds:.0f} s)", flush=True)
            return {"lr": lr, "seed": seed, "val_accuracy": summary["final_val_accuracy"],
                    "test_accuracy": summary["final_accuracy"], "seconds": round(seconds, 1),
                    "command": "fedfleet " + shlex.join([*args, "--out", "OUT"])}

        first, *others = cfg["seeds"]
        sweep = [run(lr, first) for lr in lrs]
        lr = max(sweep, key=lambda r: r["val_accuracy"])["lr"]  # validation only; the test score is not read here
        cells = [next(r for r in sweep if r["lr"] == lr)] + [run(lr, seed) for seed in others]
        record(task, {"lr": lr, "sweep": [{k: r[k] for k in ("lr", "val_accuracy")} for r in sweep],
                      "cells": cells})


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# Song era: models over seeds, chosen on validation songs ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']} ({meta['versions']}; commit {meta['commit']}).", "",
             f"Chosen on what: {result['selection']}", ""]
    if result["central"]:
        lines += ["## Central (80% of the training pool; the other 20% validates)", "",
                  "| model | test accuracy | validation accuracy | chosen (per seed) | seeds |",
                  "|---|---:|---:|---|---:|"]
        for name, cells in result["central"].items():
            picks = "; ".join(_pick(c) for c in cells)
            lines.append(f"| {name} | {mean_std([c['test_accuracy'] for c in cells])} | "
                         f"{mean_std([c['val_accuracy'] for c in cells])} | {picks} | {len(cells)} |")
        lines.append("")
    if result["federated"]:
        lines += [f"## Federated ({meta['workers']} workers, IID, {meta['rounds']} rounds, "
                  f"--server-val {meta['val_songs']})", "",
                  "| task | local lr (chosen) | test accuracy | validation accuracy | seeds | sweep (validation) |",
                  "|---|---:|---:|---:|---:|---|"]
        for task, r in result["federated"].items():
            cells = r["cells"]
            sweep = ", ".join(f"{s['lr']:g}: {s['val_accuracy']:.4f}" for s in r["sweep"])
            lines.append(f"| {task} | {r['lr']:g} | {mean_std([c['test_accuracy'] for c in cells])} | "
                         f"{mean_std([c['val_accuracy'] for c in cells])} | {len(cells)} | {sweep} |")
        lines.append("")
    return "\n".join(lines)


def _pick(cell: dict[str, Any]) -> str:
    if "learning_rate" in cell:
        return f"rate {cell['learning_rate']:g}, {cell['max_leaf_nodes']} leaves, {cell['epochs']} iterations"
    return f"lr {cell['lr']:g}, {cell['epochs']} epoch{'' if cell['epochs'] == 1 else 's'}"


SELECTION = ("central models: the setting (learning rate; for trees, learning rate and leaf count) and the epoch (for "
             "trees, the iteration) with the best accuracy on the validation 20% of the training pool, per seed; "
             "federated: the local learning rate with the best final accuracy on the coordinator's --server-val "
             "songs at the first seed, then every seed. The test songs score the chosen models and choose nothing.")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--part", choices=("central", "federated", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="one seed, tiny grids, 2 workers x 2 rounds: a smoke run")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for songs_models.json and .md")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    started = time.perf_counter()
    val_songs = int(stratified_mask(training_rows()[1], VAL_FRACTION, 1000).sum())
    result: dict[str, Any] = {
        "selection": SELECTION, "config": {k: v for k, v in cfg.items()}, "central": {}, "federated": {},
        "meta": {**provenance(SCRIPT, argv, "numpy", "torch", "scikit-learn", "fedfleet"), "quick": a.quick,
                 "workers": cfg["workers"], "rounds": cfg["rounds"], "val_songs": val_songs}}

    def save() -> None:
        result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        write_results(a.results, "songs_models", result, markdown(result))

    def add_central(name: str, cells: list[dict[str, Any]]) -> None:
        result["central"][name] = cells
        save()  # after every model: a long study keeps what it has if it is cut off

    def add_federated(task: str, r: dict[str, Any]) -> None:
        result["federated"][task] = r
        save()

    if a.part in ("central", "both"):
        central(cfg, add_central)
    if a.part in ("federated", "both"):
        with tempfile.TemporaryDirectory(prefix="fedfleet-songs-models-") as tmp:
            federated(cfg, val_songs, Path(tmp), add_federated)
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
