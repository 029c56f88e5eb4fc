"""Your own PyTorch model in a few lines: a small MLP on each site's NPZ files of points ``x`` and labels ``y``.

Make some sites' files (three blobs of 2-D points, a different mix at each site), then train across them,
from this folder (PYTHONPATH: where the coordinator and the workers find this module)::

    python torch_task.py sites 3
    export PYTHONPATH=$PWD
    fedfleet coordinator --task torch_task:BlobsTask --workers 3 --rounds 5 --test-data sites/test.npz &
    fedfleet worker --coordinator http://127.0.0.1:8080 --allow-task torch_task:BlobsTask \
        --data sites/site-0.npz    # and a worker each for site-1.npz and site-2.npz

``TorchTask`` (``fedfleet.tasks.torch_task``) does the rest: initial weights, local SGD (and FedProx),
evaluation (loss and accuracy), the validation split, the weights on the wire.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from fedfleet.tasks.torch_task import TorchTask


class BlobsTask(TorchTask):
    name = "blobs"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))

    def load_data(self, source: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        x, y = [], []
        for path in source:  # the site's --data files
            with np.load(path) as npz:  # arrays only: np.load never unpickles unless allow_pickle=True
                x.append(npz["x"])
                y.append(npz["y"])
        return np.concatenate(x), np.concatenate(y)


def write_sites(folder: Path, sites: int, per_site: int = 200, seed: int = 0) -> list[Path]:
    """``site-K.npz`` for each site (blobs mixed in different shares per site) and ``test.npz``."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    folder.mkdir(parents=True, exist_ok=True)
    mixes = {f"site-{k}": rng.dirichlet(np.ones(3)) for k in range(sites)} | {"test": np.ones(3) / 3}
    for name, shares in mixes.items():
        y = rng.choice(3, size=per_site, p=shares)
        np.savez(folder / f"{name}.npz", x=centres[y] + rng.normal(size=(per_site, 2)), y=y)
    return [folder / f"{name}.npz" for name in mixes]


if __name__ == "__main__":
    print("\n".join(str(p) for p in write_sites(Path(sys.argv[1]), int(sys.argv[2]))))
