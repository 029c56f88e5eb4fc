"""The MNIST CNN's memory layout and evaluation batch on this CPU: channels-last (NHWC, what the task builds)
against PyTorch's default NCHW, in a worker's training (one thread, batch 10) and the coordinator's evaluation
(every core, batches of 100 or 1000 images).

    python benchmarks/cnn_layout.py               # 5 alternating repeats, ~2 min on 2 cores
    python benchmarks/cnn_layout.py --repeats 9

Why it exists: the choices in ``mnist.build_model`` (channels-last) and ``torch_common.predict_logits`` (batches
of 100) rest on these timings, and docs/learning.md quotes them. Each repeat times every variant once, in turn,
so a machine that gets busier part-way slows them all alike; the table gives the median seconds and the
ratio to the variant the task uses. The weights are the same values in either layout, only their strides differ;
the pixels are random (the time of a convolution does not depend on them). Run it on a quiet machine.

Writes benchmarks/results/cnn_layout.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import Dataset, TrainParams
from fedfleet.tasks.mnist import build_model
from machine import commit, cpu_model, versions, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_EXAMPLES = 600  # one worker's share in the FedAvg paper's setting, one local epoch
EVAL_EXAMPLES = 10_000  # the test set the coordinator scores every round


def models() -> dict[str, Any]:
    """The task's CNN (channels-last) and the same network, same weights, in PyTorch's default layout."""
    import torch

    nhwc = build_model("cnn")
    nchw = build_model("cnn").to(memory_format=torch.contiguous_format)
    nchw.load_state_dict(nhwc.state_dict())
    return {"channels-last": nhwc, "NCHW": nchw}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(repeats: int, eval_threads: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    train = Dataset(rng.integers(0, 256, (TRAIN_EXAMPLES, 784)).astype(np.float32),
                    rng.integers(0, 10, TRAIN_EXAMPLES))
    test = rng.integers(0, 256, (EVAL_EXAMPLES, 784)).astype(np.float32)
    nets = models()
    weights = torch_common.weights_of(nets["channels-last"])
    params = TrainParams(local_epochs=1, batch_size=10, lr=0.01, seed=0)
    def train_once(net: Any) -> Callable[[], object]:
        return lambda: (torch_common.use_threads(1), torch_common.fit(net, weights, train, params))

    def evaluate_once(net: Any, batch: int) -> Callable[[], object]:
        return lambda: (torch_common.use_threads(eval_threads),
                        torch_common.predict_logits(net, weights, test, batch_size=batch))

    cases: dict[str, Callable[[], object]] = {}
    for layout, net in nets.items():
        cases[f"train, 1 thread, batch 10, {layout}"] = train_once(net)
        for batch in (100, 1000):
            cases[f"evaluate, {eval_threads} threads, batch {batch}, {layout}"] = evaluate_once(net, batch)
    for fn in cases.values():  # warm-up: oneDNN picks and caches its kernels on a first call
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            seconds[name].append(timed(fn))
        print(f"repeat {r + 1}/{repeats} done", flush=True)
    return seconds


def table(result: dict[str, Any]) -> str:
    rows = result["cases"]
    lines = [f"# The MNIST CNN's layout and evaluation batch ({result['date']}, {result['cpu']})", "",
             f"`{result['command']}` at {result['commit']}: median of {result['repeats']} alternating repeats; "
             f"training is one local epoch over {TRAIN_EXAMPLES} images, evaluation {EVAL_EXAMPLES} images. "
             "\"× the task's\" is the variant's time over the one the task uses (channels-last; evaluation in "
             "batches of 100): above 1 is slower.", "",
             "| case | median s | min s | max s | × the task's |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} | {row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def summarise(seconds: dict[str, list[float]], base: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Each case's median, min, max and times, and its median over that of the case ``base`` names for it."""
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    return {name: {"median": medians[name], "min": min(s), "max": max(s), "seconds": s,
                   "ratio": medians[name] / medians[base(name)]} for name, s in seconds.items()}


def baseline(name: str, eval_threads: int) -> str:
    """The variant the task uses for the same work as ``name``."""
    if name.startswith("train"):
        return "train, 1 thread, batch 10, channels-last"
    return f"evaluate, {eval_threads} threads, batch 100, channels-last"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-threads", type=int, default=torch_common.usable_cpus(),
                    help="threads of the evaluation cases (default: the cores this process may use)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.eval_threads < 1:
        ap.error("--repeats and --eval-threads must be at least 1")
    seconds = measure(args.repeats, args.eval_threads)
    cases = summarise(seconds, lambda name: baseline(name, args.eval_threads))
    command = "python benchmarks/cnn_layout.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"date": time.strftime("%Y-%m-%d"), "command": command.strip(), "commit": commit(),
              "machine": f"{platform.machine()}, {torch_common.usable_cpus()} CPUs", "cpu": cpu_model(),
              "versions": versions("torch", "numpy"), "repeats": args.repeats, "cases": cases}
    text = table(result)
    write_results(args.results, "cnn_layout", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
