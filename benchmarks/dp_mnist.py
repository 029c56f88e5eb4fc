"""MNIST under central differential privacy: test accuracy against ε for the FedAvg paper's 2NN and CNN, IID.

    python benchmarks/dp_mnist.py                                   # the study in the results (~35 min, 2 cores)
    python benchmarks/dp_mnist.py --models mlp --mlp-rounds 10      # quicker: the 2NN alone, 10 rounds

Every cell is one real `fedfleet run` (coordinator and worker processes on loopback) of the mnist task, IID,
N = --workers workers (the 60k training images split evenly; --processes worker processes, each holding many
logical workers), each keeping --val-fraction of its images as a validation split. --dp central: each
round samples every worker with probability q = --fraction (Poisson), clips each update's delta to L2 norm
C, adds N(0, (σC)²) to their sum and divides by qN; σ is solved by --dp-target-epsilon for the model's
rounds at δ = 1e-5. The unit of privacy is a worker (all its images). Local training: SGD, --local-epochs
epochs of batch --batch-size at the client lr; FedAvg with server lr 1.

Choices are made on validation data only, never on the test set: for each model, the clip norm C (and the
client lr, if --MODEL-lrs lists more than one) is the grid point whose run at ε = --MODEL-grid-epsilon has
the highest federated validation accuracy (``fed_accuracy`` in metrics.jsonl: the global model sent out in
a round, scored by the sampled workers on their own validation splits), averaged over the last
--select-rounds rounds. The grid runs use their own noise seed (--dp-seed 1000 + i), so the cell reported at
the grid's ε is a fresh run (dp seed --dp-seed), not the one that won the grid, unless the model is named
in --reuse-grid (the CNN by default, to save time; the results say so). The no-DP cell uses the chosen lr
and no clipping.
Test accuracy (``accuracy`` of the last round: the final model on the official 10k test images) is
reported, and is recorded for the grid runs too, but not used for any choice.

The noise is seeded (--dp-seed) so that the table can be made again; a real run draws it from the OS.
Prints a table and writes RESULTS/dp_mnist.{json,md,png} (RESULTS: --results, default benchmarks/results);
``--plot-only`` redraws the .md and .png from the .json without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.storage.run_dir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
MODELS = {"mlp": "2NN (MLP 2x200)", "cnn": "CNN"}
GRID_DP_SEED = 1000


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FEDFLEET_MNIST_DIR")
                    or str(ROOT.parent / "shared" / "data" / "mnist"),
                    help="the MNIST IDX files (default $FEDFLEET_MNIST_DIR, else ../shared/data/mnist)")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.2, help="q, the Poisson sampling rate")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--examples", type=int, help="task option examples: train on a fixed subset (default all 60k)")
    ap.add_argument("--seed", type=int, default=0, help="--seed of every run: the split and the initial model")
    ap.add_argument("--dp-seed", type=int, default=0, help="--dp-seed of the reported DP cells")
    ap.add_argument("--round-timeout", type=float, default=300,
                    help="--round-timeout of every run: how long a round waits for a sampled worker that never "
                         "answers (one whose local fit diverged sends nothing)")
    ap.add_argument("--select-rounds", type=int, default=5,
                    help="the grid is judged on fed_accuracy averaged over this many last rounds")
    for model, rounds, eps, clips, lrs, grid_eps in (("mlp", 50, "8,4,2,1", "0.03,0.1,0.3", "0.1", 4.0),
                                                      ("cnn", 15, "8,2", "0.1,0.3", "0.1", 8.0)):
        ap.add_argument(f"--{model}-rounds", type=int, default=rounds)
        ap.add_argument(f"--{model}-epsilons", type=floats, default=floats(eps), help=f"default {eps}")
        ap.add_argument(f"--{model}-clips", type=floats, default=floats(clips), help=f"C grid, default {clips}")
        ap.add_argument(f"--{model}-lrs", type=floats, default=floats(lrs), help=f"client lr grid, default {lrs}")
        ap.add_argument(f"--{model}-grid-epsilon", type=float, default=grid_eps)
    ap.add_argument("--reuse-grid", default="cnn", help="comma-separated models whose winning grid run is reported "
                    "as the cell at the grid's epsilon instead of a fresh run (default %(default)s; '' for none)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for dp_mnist.{json,md,png}")
    ap.add_argument("--note", default="", help="a remark to put in the results (e.g. what else ran meanwhile)")
    ap.add_argument("--plot-only", action="store_true",
                    help="run nothing: redraw dp_mnist.md and dp_mnist.png in --results from its dp_mnist.json")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.reuse_grid = [m for m in args.reuse_grid.split(",") if m]
    for m in args.models + args.reuse_grid:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}: one of {', '.join(MODELS)}")
    return args


def run(args: argparse.Namespace, model: str, rounds: int, lr: float, dp: list[str], out: Path) -> dict[str, Any]:
    """One `fedfleet run`; what it scored and spent."""
    examples = ["--task-option", f"examples={args.examples}"] if args.examples else []
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", "mnist", "--task-option", f"data_dir={args.data_dir}",
           "--task-option", f"model={model}", *examples, "--workers", str(args.workers),
           "--fraction", str(args.fraction), "--processes", str(args.processes), "--partition", "iid",
           "--local-epochs", str(args.local_epochs), "--batch-size", str(args.batch_size), "--lr", str(lr),
           "--rounds", str(rounds), "--val-fraction", str(args.val_fraction), "--seed", str(args.seed),
           "--round-timeout", f"{args.round_timeout:g}", "--worker-timeout", "600", "--out", str(out), "--overwrite",
           "--quiet", *dp]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    run_dir = RunDir(out)
    s = run_dir.read_summary()
    if s is None or s.state != "finished" or s.final_accuracy is None:
        raise RuntimeError(f"the run in {out} did not finish with a test accuracy; see {out / 'logs'}")
    records = run_dir.read_rounds()
    fed = [r.fed_accuracy for r in records]
    tail = [a for a in fed[-args.select_rounds:] if a is not None]
    participants = sum(r.participants for r in records)
    clipped = sum(r.dp_clipped or 0 for r in records)
    return {"model": model, "lr": lr, "clip": s.dp.clip if s.dp else None,
            "epsilon": s.dp.epsilon if s.dp else None, "target_epsilon": s.dp.target_epsilon if s.dp else None,
            "noise_multiplier": s.dp.noise_multiplier if s.dp else None,
            "dp_seed": int(dp[dp.index("--dp-seed") + 1]) if "--dp-seed" in dp else None,
            "rounds": s.rounds, "accuracy": s.final_accuracy,
            "fed_accuracy_selection": statistics.fmean(tail) if tail else None,
            "clipped_share": clipped / participants if s.dp and participants else None,
            "mean_sampled": statistics.fmean(r.sampled for r in records),
            "seconds": round(wall, 1), "seconds_per_round": round(s.seconds / max(1, s.rounds), 2),
            "accuracy_by_round": [None if r.accuracy is None else round(r.accuracy, 4) for r in records],
            "fed_accuracy_by_round": [None if a is None else round(a, 4) for a in fed]}


def dp_flags(clip: float, epsilon: float, seed: int) -> list[str]:
    return ["--dp", "central", "--dp-clip", f"{clip:g}", "--dp-target-epsilon", f"{epsilon:g}",
            "--dp-delta", f"{DELTA:g}", "--dp-seed", str(seed)]


def study_model(args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    """The grid at one epsilon (judged on validation), then every epsilon and no DP with the choice."""
    rounds: int = getattr(args, f"{model}_rounds")
    grid_eps: float = getattr(args, f"{model}_grid_epsilon")
    points = [(c, lr) for lr in getattr(args, f"{model}_lrs") for c in getattr(args, f"{model}_clips")]
    t0 = time.time()
    grid: list[dict[str, Any]] = []
    if len(points) > 1:
        for i, (clip, lr) in enumerate(points):
            r = run(args, model, rounds, lr, dp_flags(clip, grid_eps, GRID_DP_SEED + i), tmp / f"{model}-grid-{i}")
            grid.append(r)
            print(f"  {model} grid epsilon {grid_eps:g}: C {clip:g} lr {lr:g}: federated validation accuracy "
                  f"{r['fed_accuracy_selection']:.4f} (test {r['accuracy']:.4f}, not used; "
                  f"{r['clipped_share']:.0%} of updates clipped; {r['seconds']:.0f} s)", flush=True)
        best = max(grid, key=lambda r: r["fed_accuracy_selection"] or 0.0)
        clip, lr = best["clip"], best["lr"]
        clips = ", ".join(f"{c:g}" for c in getattr(args, f"{model}_clips"))
        lrs = ", ".join(f"{x:g}" for x in getattr(args, f"{model}_lrs"))
        how = (f"the best federated validation accuracy (mean of the last {args.select_rounds} rounds' fed_accuracy) "
               f"of the grid C in {{{clips}}} x lr in {{{lrs}}} at epsilon {grid_eps:g}")
    else:
        (clip, lr), best = points[0], None
        how = "given: a grid of one point, nothing to choose"
    cells = [{"label": "no DP", **run(args, model, rounds, lr, [], tmp / f"{model}-nodp")}]
    print(f"  {model} no DP: test accuracy {cells[0]['accuracy']:.4f} ({cells[0]['seconds']:.0f} s)", flush=True)
    for eps in sorted(getattr(args, f"{model}_epsilons"), reverse=True):
        if best is not None and eps == grid_eps and model in args.reuse_grid:
            cell = {"label": f"epsilon {eps:g}", **best, "reused_grid_run": True}
        else:
            cell = {"label": f"epsilon {eps:g}", **run(args, model, rounds, lr, dp_flags(clip, eps, args.dp_seed),
                                                       tmp / f"{model}-eps{eps:g}")}
        cells.append(cell)
        print(f"  {model} epsilon {eps:g}: sigma {cell['noise_multiplier']:.3g}, test accuracy {cell['accuracy']:.4f} "
              f"({cell['clipped_share']:.0%} clipped, {cell['seconds']:.0f} s)", flush=True)
    return {"model": model, "name": MODELS[model], "rounds": rounds, "grid_epsilon": grid_eps,
            "chosen": {"clip": clip, "lr": lr, "how": how}, "grid": grid, "cells": cells,
            "seconds": round(time.time() - t0, 1)}


def table(meta: dict[str, Any], m: dict[str, Any]) -> str:
    qn = meta["fraction"] * meta["workers"]
    lines = [f"\n### {m['name']}: {m['rounds']} rounds, C = {m['chosen']['clip']:g}, client lr "
             f"{m['chosen']['lr']:g} ({m['seconds']:.0f} s)\n",
             "| run | sigma | epsilon spent (delta 1e-5) | noise std per coordinate of the mean delta (sigma C / qN) "
             "| updates clipped | federated validation accuracy (last rounds) | test accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in m["cells"]:
        sigma, eps, clipped = c["noise_multiplier"], c["epsilon"], c["clipped_share"]
        std = None if sigma is None else sigma * c["clip"] / qn
        label = c["label"] + (" (the grid run)" if c.get("reused_grid_run") else "")
        lines.append(f"| {label} | {'-' if sigma is None else f'{sigma:.3g}'} | "
                     f"{'inf' if eps is None else f'{eps:.3g}'} | "
                     f"{'0' if std is None else f'{std:.3g}'} | "
                     f"{'-' if clipped is None else f'{clipped:.0%}'} | "
                     f"{c['fed_accuracy_selection']:.4f} | {c['accuracy']:.4f} |")
    if m["grid"]:
        lines += ["", f"Grid at epsilon {m['grid_epsilon']:g} (dp seeds {GRID_DP_SEED}+): the choice is the highest "
                  "federated validation accuracy; the test accuracy is shown, not used.", "",
                  "| C | client lr | updates clipped | federated validation accuracy (last rounds) | test accuracy |",
                  "|---:|---:|---:|---:|---:|"]
        for g in m["grid"]:
            mark = " **chosen**" if (g["clip"], g["lr"]) == (m["chosen"]["clip"], m["chosen"]["lr"]) else ""
            lines.append(f"| {g['clip']:g}{mark} | {g['lr']:g} | {g['clipped_share']:.0%} | "
                         f"{g['fed_accuracy_selection']:.4f} | {g['accuracy']:.4f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], png: Path) -> None:
    """Test accuracy against epsilon, one line per model; each model's no-DP accuracy dashed in its colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = result["meta"]
    fig = Figure(figsize=(8.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ticks: set[float] = set()
    for colour, m in zip(("tab:blue", "tab:orange", "tab:green"), result["models"], strict=False):
        dp = sorted((c for c in m["cells"] if c["epsilon"] is not None), key=lambda c: c["epsilon"])
        label = f"{m['name']}, {m['rounds']} rounds, C {m['chosen']['clip']:g}"
        if dp:
            ticks.update(c["target_epsilon"] for c in dp)
            ax.plot([c["epsilon"] for c in dp], [c["accuracy"] for c in dp], marker="o", color=colour,
                    label=f"{label}: DP")
        for c in m["cells"]:
            if c["epsilon"] is None:
                ax.axhline(c["accuracy"], color=colour, linestyle="--", linewidth=1, label=f"{label}: no DP")
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{e:g}" for e in sorted(ticks)])
    ax.set_xlabel(f"ε (δ = {DELTA:g})")
    ax.set_ylabel("test accuracy (final model)")
    ax.set_title(f"MNIST, IID, central DP: {meta['workers']} workers, q = {meta['fraction']:g}, "
                 f"E = {meta['local_epochs']}, B = {meta['batch_size']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    models = result["models"]
    qn = meta["fraction"] * meta["workers"]
    head = (f"# MNIST under central DP: test accuracy against epsilon ({meta['date']})\n\n"
            f"Made by `{meta['command']}` in {meta['seconds']:.0f} s on {meta['machine']}: real `fedfleet run`s, "
            f"task mnist, IID, {meta['workers']} workers ({meta['examples_per_worker']} images each, "
            f"{meta['val_fraction']:g} of them kept for validation) in {meta['processes']} worker process(es), "
            f"Poisson sampling q = {meta['fraction']:g} (qN = {qn:g} expected a round), local SGD "
            f"{meta['local_epochs']} epoch(s) of batch {meta['batch_size']}, FedAvg (server lr 1); --dp central with "
            f"delta {DELTA:g}, sigma solved by --dp-target-epsilon for each model's rounds; --seed {meta['seed']} "
            f"(split and initial model), --dp-seed {meta['dp_seed']} for the reported cells (sampling and noise), "
            "one run a cell. Rounds: " + ", ".join(f"{m['name']} {m['rounds']}" for m in models) + ". "
            "The unit of privacy is a worker (all its images). Test accuracy: the final model on the 10k test "
            "images.\n\n"
            "**Chosen on validation, not on the test set:** " + "; ".join(
                f"{m['name']}: C = {m['chosen']['clip']:g}, client lr {m['chosen']['lr']:g} ({m['chosen']['how']})"
                for m in models) + ". Federated validation accuracy scores the global model each round sends "
            "out on the sampled workers' validation splits. The no-DP cell is plain FedAvg with the chosen lr: no "
            f"clipping, {math.ceil(qn)} workers sampled a round (a fixed share, not Poisson), their deltas weighted by "
            "example count."
            + "".join(f" The {m['name']} cell at epsilon {m['grid_epsilon']:g} is the grid run that won "
                      f"(dp seed {next(c['dp_seed'] for c in m['cells'] if c.get('reused_grid_run'))}), not a "
                      "fresh one: its test accuracy is that of a run picked (on validation) from the grid."
                      for m in models if any(c.get("reused_grid_run") for c in m["cells"]))
            + " The validation scores the workers report, and so the choice of C, are outside the epsilon "
            "accounted (as in any tuning on private data).\n")
    note = f"\nNote: {meta['note']}\n" if meta.get("note") else ""
    if meta.get("afterword"):
        note += f"\nAdded after the run: {meta['afterword']}\n"
    if not meta.get("finished", True):
        note += "\n**Cut off:** only the models below had finished when this was written.\n"
    return head + note + "\n".join(table(meta, m) for m in models) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        result = json.loads((args.results / "dp_mnist.json").read_text())
        (args.results / "dp_mnist.md").write_text(markdown(result))
        plot(result, args.results / "dp_mnist.png")
        print(f"wrote {args.results / 'dp_mnist.md'} and {args.results / 'dp_mnist.png'}")
        return 0
    command = shlex.join(["python", "benchmarks/dp_mnist.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    train = args.examples or 60_000
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": 0.0, "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                       f"{platform.python_version()}",
            "workers": args.workers, "fraction": args.fraction, "processes": args.processes,
            "local_epochs": args.local_epochs, "batch_size": args.batch_size, "val_fraction": args.val_fraction,
            "examples": train, "examples_per_worker": train // args.workers, "delta": DELTA, "seed": args.seed,
            "dp_seed": args.dp_seed, "grid_dp_seed": GRID_DP_SEED, "select_rounds": args.select_rounds,
            "partition": "iid", "strategy": "fedavg", "round_timeout": args.round_timeout, "note": args.note,
            "finished": False}
    result: dict[str, Any] = {"meta": meta, "models": []}
    with tempfile.TemporaryDirectory(prefix="fedfleet-dp-mnist-") as tmp:
        for model in args.models:
            print(f"{MODELS[model]}:", flush=True)
            result["models"].append(study_model(args, model, Path(tmp)))
            meta["seconds"] = round(time.time() - t0, 1)
            meta["finished"] = len(result["models"]) == len(args.models)
            write(args.results, result)  # after every model: a study cut off keeps the models it finished
    print(markdown(result))
    return 0


def write(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dp_mnist.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "dp_mnist.md").write_text(markdown(result))
    plot(result, folder / "dp_mnist.png")


if __name__ == "__main__":
    sys.exit(main())
