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
benchmarks/results/dp_songs.{json,md}.
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

from fedfleet.storage.run_dir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
EPSILONS = (8.0, 4.0, 2.0, 1.0)
DELTA = 1e-5


def run(out: Path, workers: int, rounds: int, dp: list[str]) -> dict[str, float | None]:
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", "songs", "--workers", str(workers), "--rounds",
           str(rounds), "--partition", "iid", "--out", str(out), "--quiet", *dp]
    subprocess.run(cmd, check=True)
    s = RunDir(out).read_summary()
    if s is None or s.state != "finished":
        raise RuntimeError(f"the run in {out} did not finish; see {out / 'logs'}")
    return {"accuracy": s.final_accuracy, "epsilon": s.dp.epsilon if s.dp else None,
            "noise_multiplier": s.dp.noise_multiplier if s.dp else None, "seconds": s.seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", action="append", metavar="WORKERSxREPEATS", help="default: 8x3 and 64x1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clip", type=float, default=0.5, help="--dp-clip (the median update norm is ~0.3-0.9)")
    args = ap.parse_args()
    fleets = {int(w): int(r) for w, _, r in (f.partition("x") for f in args.fleet or ["8x3", "64x1"])}
    dp = ["--dp", "central", "--dp-clip", str(args.clip), "--dp-delta", str(DELTA)]
    rows: list[tuple[str, list[str]]] = [("FedAvg, no DP", []),
                                         ("DP, noise ~0 (sigma 0.001)", [*dp, "--dp-noise-multiplier", "0.001"])]
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
    RESULTS.mkdir(exist_ok=True)
    meta = {"rounds": args.rounds, "repeats_by_workers": fleets, "clip": args.clip, "delta": DELTA,
            "sample_rate": 1.0, "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0,
            "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
            "command": "python benchmarks/dp_songs.py " + " ".join(sys.argv[1:])}
    (RESULTS / "dp_songs.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    (RESULTS / "dp_songs.md").write_text(
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
