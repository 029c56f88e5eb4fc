"""What FedProx's proximal term costs a worker's local fit: the MNIST CNN, one thread, one local epoch of 600
images in batches of 10, without the term, with it as the task adds it, and with it through autograd.

    python benchmarks/prox_cost.py               # 7 alternating repeats, ~1 min
    python benchmarks/prox_cost.py --repeats 11 --mu 0.1

Why it exists: ``torch_common.add_prox_gradient`` adds the term's gradient, μ·(w − w_global), to each weight's
gradient after the backward pass (in place, as μ·w − μ·w_global, so that no weight-sized temporary is allocated a
batch: that allocation, fresh pages past glibc's mmap threshold, once cost more than the arithmetic), where the
first version added μ/2·‖w − w_global‖² to the loss and let autograd differentiate it. The two are the same update;
this script times both (the autograd one passes the term inside the loss function to the same
``torch_common.train`` with ``prox_mu`` 0) against plain FedAvg's fit, and checks that they agree (the largest
weight difference after 10 steps, float rounding only, next to how far the term moves the weights in them). The
pixels are random and the labels a fixed linear map of them (the time does not depend on either): learnable, with a
small learning rate (0.01), because fitting noise is chaotic and float rounding alone (which differs between
processes in PyTorch's CPU kernels) then ends two fits far apart. Each repeat times every case once, in turn, so a
machine that gets busier part-way slows them all alike.

Writes benchmarks/results/prox_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from cnn_layout import TRAIN_EXAMPLES, summarise, timed
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import FitResult, TrainParams
from fedfleet.tasks.mnist import build_model
from machine import provenance, write_results

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 10
AGREE_EXAMPLES = 100  # the fits compared for agreement: 10 steps


def cases(mu: float, examples: int = TRAIN_EXAMPLES) -> dict[str, Callable[[], FitResult]]:
    """One local fit each, from the same weights on the same images: no term, the task's term, autograd's."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    pixels = rng.random((examples, 784), dtype=np.float32)
    x = torch.from_numpy(pixels)
    # labels a fixed linear map of the pixels gives: learnable, so the epoch is not the chaos of fitting noise
    y = torch.from_numpy((pixels @ rng.standard_normal((784, 10)).astype(np.float32)).argmax(axis=1))
    net = build_model("cnn")
    weights = torch_common.weights_of(net)
    anchors = [torch.from_numpy(np.array(weights[name])) for name, p in net.named_parameters() if p.requires_grad]

    def batches(order: np.ndarray) -> Iterator[tuple[Any, Any]]:
        idx = torch.from_numpy(order)
        for start in range(0, len(idx), BATCH):
            rows = idx[start:start + BATCH]
            yield x[rows], y[rows]

    def with_term(outputs: Any, targets: Any) -> Any:
        prox = sum((p - a).square().sum() for p, a in zip(net.parameters(), anchors, strict=True))
        return F.cross_entropy(outputs, targets) + 0.5 * mu * prox

    def fit(prox_mu: float, loss: Callable[[Any, Any], Any]) -> Callable[[], FitResult]:
        params = TrainParams(local_epochs=1, batch_size=BATCH, lr=0.01, seed=0, prox_mu=prox_mu)
        return lambda: torch_common.train(net, weights, params, examples, batches, loss,
                                          torch_common.accuracy)

    return {"no proximal term (FedAvg)": fit(0.0, F.cross_entropy),
            f"μ {mu:g}, gradient added (the task)": fit(mu, F.cross_entropy),
            f"μ {mu:g}, term in the loss (autograd)": fit(0.0, with_term)}


def measure(repeats: int, mu: float) -> tuple[dict[str, list[float]], float, float]:
    torch_common.use_threads(1)  # a worker process trains on one thread
    # Agreement over the first AGREE_EXAMPLES images: in a whole epoch, rounding that differs between runs of
    # PyTorch's CPU kernels grows with every step, and would hide what the comparison is after.
    plain, a, b = (fn().weights for fn in cases(mu, AGREE_EXAMPLES).values())
    runs = cases(mu)
    for fn in runs.values():  # warm-up
        fn()
    differ = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    term = max(float(np.abs(a[k] - plain[k]).max()) for k in a)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
        print(f"repeat {r + 1}/{repeats} done", flush=True)
    return seconds, differ, term


def table(result: dict[str, Any]) -> str:
    lines = [f"# FedProx's proximal term in a worker's fit ({result['date']}, {result['machine']})", "",
             f"`{result['command']}` at {result['commit']}: the MNIST CNN, one thread, one local epoch of "
             f"{TRAIN_EXAMPLES} images in batches of {BATCH}; median of {result['repeats']} alternating repeats. "
             "\"× FedAvg\" is the case's time over the fit without the term. After 10 steps the task's and autograd's "
             f"fits end {result['max_weight_difference']:.1e} apart at most, where the term itself moves a weight "
             f"by up to {result['max_term_effect']:.1e} (against the fit without it).", "",
             "| case | median s | min s | max s | × FedAvg |", "|---|---:|---:|---:|---:|"]
    for name, row in result["cases"].items():
        lines.append(f"| {name} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} | {row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mu", type=float, default=0.01, help="FedProx's μ (the strategy's default: 0.01)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or not args.mu > 0:
        ap.error("--repeats must be at least 1 and --mu above 0")
    seconds, differ, term = measure(args.repeats, args.mu)
    plain = next(iter(seconds))
    rows = summarise(seconds, lambda name: plain)
    result = {**provenance("benchmarks/prox_cost.py", argv, "torch", "numpy"), "repeats": args.repeats,
              "mu": args.mu, "max_weight_difference": differ, "max_term_effect": term, "cases": rows}
    text = table(result)
    write_results(args.results, "prox_cost", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
