"""Song era under central differential privacy: test accuracy against the ε spent, next to plain FedAvg.

    python benchmarks/dp_songs.py                  # 8 workers 3 times, 64 workers once; 30 rounds, IID
    python benchmarks/dp_songs.py --fleet 8x1      # quicker: 8 workers, one repeat

Each cell is real `fedfleet run`s (coordinator and worker processes on loopback) of the song task, IID, every
worker sampled every round (q = 1), FedAvg with server learning rate 1, local SGD lr 0.05, batch 32, one
local epoch. The rows:

- ``FedAvg, no DP``: the plain run (its standardisation computed from the workers' data in a statistics round);
- ``DP, noise ~0``: --dp central with σ = 0.001 and --dp-clip C: what clipping and the public standardisation
  (``SongsTask.public_stats``, which a DP run uses instead of the statistics round) cost before any noise;
- ``DP, ε = k``: σ solved for ε = k over the 30 rounds at δ = 1e-5 (--dp-target-epsilon).

The noise is seeded (--dp-seed = the repeat's number) so that the table can be made again; a real run draws
it from the OS. Accuracy is the mean (and min..max) over the repeats (a fleet of 64 runs once by default:
a run of it takes about a minute on 2 cores). Prints a table and writes
benchmarks/results/dp_songs.{json,md,png} (the plot: test accuracy against ε, one line per fleet, its no-DP
level dashed). ``--plot-only`` redraws the plot from the JSON without running anything:

    python benchmarks/dp_songs.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.storage.run_dir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
EPSILONS = (8.0, 4.0, 2.0, 1.0)
DELTA = 1e-5
NO_DP = "FedAvg, no DP"
CLIP_ONLY = "DP, noise ~0 (sigma 0.001)"


def run(out: Path, workers: int, rounds: int, dp: list[str]) -> dict[str, float | None]:
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", "songs", "--workers", str(workers), "--rounds",
           str(rounds), "--partition", "iid", "--out", str(out), "--quiet", *dp]
    subprocess.run(cmd, check=True)
    s = RunDir(out).read_summary()
    if s is None or s.state != "finished":
        raise RuntimeError(f"the run in {out} did not finish; see {out / 'logs'}")
    return {"accuracy": s.final_accuracy, "epsilon": s.dp.epsilon if s.dp else None,
            "noise_multiplier": s.dp.noise_multiplier if s.dp else None, "seconds": s.seconds}


def plot(result: dict[str, Any], png: Path) -> None:
    """Test accuracy against the ε spent, one line per fleet (mean, bars min..max over the repeats), the
    fleet's no-DP accuracy as a dashed line of its colour and its 'noise ~0' row (clipping alone; its ε is ~1e7,
    off the axis) as a dotted one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = result["meta"]
    fig = Figure(figsize=(8.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for colour, (workers, cells) in zip(colours * 4, result["cells"].items(), strict=False):
        dp = sorted(((c["epsilon"], c) for label, c in cells.items()
                     if label.startswith("DP, epsilon") and c["epsilon"] is not None), key=lambda t: t[0])
        if dp:
            eps = [e for e, _ in dp]
            mean = [c["accuracy_mean"] for _, c in dp]
            err = [[m - c["accuracy_min"] for m, (_, c) in zip(mean, dp, strict=True)],
                   [c["accuracy_max"] - m for m, (_, c) in zip(mean, dp, strict=True)]]
            ax.errorbar(eps, mean, yerr=err, marker="o", capsize=3, color=colour, label=f"{workers} workers, DP")
        if NO_DP in cells:
            ax.axhline(cells[NO_DP]["accuracy_mean"], color=colour, linestyle="--", linewidth=1,
                       label=f"{workers} workers, no DP")
        if CLIP_ONLY in cells:
            ax.axhline(cells[CLIP_ONLY]["accuracy_mean"], color=colour, linestyle=":", linewidth=1,
                       label=f"{workers} workers, clipping, noise ~0")
    ax.set_xscale("log", base=2)
    ticks = sorted({c["epsilon"] for cells in result["cells"].values() for label, c in cells.items()
                    if label.startswith("DP, epsilon") and c["epsilon"] is not None})
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.set_xlabel(f"ε (δ = {meta['delta']:g}, {meta['rounds']} rounds)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Song era (logistic regression), central DP (q = {meta.get('sample_rate', 1.0):g}, "
                 f"clip {meta['clip']:g})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", action="append", metavar="WORKERSxREPEATS", help="default: 8x3 and 64x1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clip", type=float, default=0.5, help="--dp-clip (the median update norm is ~0.3-0.9)")
    ap.add_argument("--plot-only", action="store_true", help="run nothing: redraw --png from --json")
    ap.add_argument("--json", type=Path, default=RESULTS / "dp_songs.json",
                    help="the results JSON; the .md goes next to it (default %(default)s)")
    ap.add_argument("--png", type=Path, default=RESULTS / "dp_songs.png", help="the plot (default %(default)s)")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(args.json.read_text()), args.png)
        print(f"wrote {args.png}")
        return 0
    fleets = {int(w): int(r) for w, _, r in (f.partition("x") for f in args.fleet or ["8x3", "64x1"])}
    dp = ["--dp", "central", "--dp-clip", str(args.clip), "--dp-delta", str(DELTA)]
    rows: list[tuple[str, list[str]]] = [(NO_DP, []),
                                         (CLIP_ONLY, [*dp, "--dp-noise-multiplier", "0.001"])]
    rows += [(f"DP, epsilon = {e:g}", [*dp, "--dp-target-epsilon", str(e)]) for e in EPSILONS]
    cells: dict[str, dict[str, dict[str, object]]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fedfleet-dp-") as tmp:
        for workers, repeats in fleets.items():
            for i, (label, flags) in enumerate(rows):
                runs = []
                for r in range(repeats):
                    seed = ["--dp-seed", str(r)] if flags else []
                    runs.append(run(Path(tmp) / f"{workers}-{i}-{r}", workers, args.rounds,
                                    [*flags, *seed, "--seed", str(r)]))
                acc = [float(x["accuracy"] or 0.0) for x in runs]
                cell = {"accuracy_mean": statistics.fmean(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
                        "epsilon": runs[0]["epsilon"], "noise_multiplier": runs[0]["noise_multiplier"],
                        "flags": flags, "runs": runs}
                cells.setdefault(str(workers), {})[label] = cell
                eps = "inf" if cell["epsilon"] is None else f"{cell['epsilon']:.3g}"
                print(f"{workers:>3} workers  {label:<28} epsilon {eps:>8}  accuracy {cell['accuracy_mean']:.4f} "
                      f"({min(acc):.4f}..{max(acc):.4f})", flush=True)
    lines = []
    for workers in fleets:
        lines += [f"\n### {workers} workers\n", "| run | sigma | epsilon (delta 1e-5) | noise std on the mean delta, "
                  "per coordinate | test accuracy, mean (min..max) |", "|---|---:|---:|---:|---:|"]
        for label, cell in cells[str(workers)].items():
            sigma = cell["noise_multiplier"]
            eps = "inf" if cell["epsilon"] is None else f"{cell['epsilon']:.3g}"
            std = "0" if sigma is None else f"{float(sigma) * args.clip / workers:.3g}"  # type: ignore[arg-type]
            lines.append(f"| {label} | {'-' if sigma is None else f'{sigma:.3g}'} | {eps} | {std} | "
                         f"{cell['accuracy_mean']:.4f} ({cell['accuracy_min']:.4f}..{cell['accuracy_max']:.4f}) |")
    table = "\n".join(lines)
    print(table)
    meta = {"rounds": args.rounds, "repeats_by_workers": fleets, "clip": args.clip, "delta": DELTA,
            "sample_rate": 1.0, "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0,
            "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
            "command": "python benchmarks/dp_songs.py " + " ".join(sys.argv[1:])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    plot({"meta": meta, "cells": cells}, args.png)
    args.json.with_suffix(".md").write_text(
        f"# Song era under central DP: test accuracy against epsilon ({meta['date']})\n\n"
        f"Made by `{meta['command'].strip()}` in {meta['seconds']:.0f} s: real `fedfleet run`s, song task, IID, "
        f"{args.rounds} rounds, every worker sampled every round (q = 1), FedAvg (server lr 1), local SGD lr 0.05, "
        f"batch 32, 1 local epoch; --dp-clip {args.clip:g}, delta {DELTA:g}; sigma solved by --dp-target-epsilon "
        f"for the {args.rounds} rounds; repeats (workers: count) {fleets}, repeat r seeding the split, the model "
        "and the noise with r. The unit of privacy is a worker (all its songs). 'noise ~0' isolates what "
        "clipping and the public standardisation cost. The majority class is 0.40.\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
