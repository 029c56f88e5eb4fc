"""benchmarks/cnn_layout.py times the MNIST CNN in the layout the task builds (channels-last) against PyTorch's
default, on the same weights: the two must be the same function, or the timing compares different work."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark


def test_both_layouts_are_the_same_network_with_the_same_weights() -> None:
    torch = pytest.importorskip("torch")
    bench = load_benchmark("cnn_layout")
    nets = bench.models()
    nhwc, nchw = nets["channels-last"], nets["NCHW"]
    # The second convolution (32 → 64 channels): the first one's single input channel is both layouts at once.
    conv = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)][1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # what the task trains
    conv = [m for m in nchw.modules() if isinstance(m, torch.nn.Conv2d)][1]
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (7, 784)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(nhwc(x), nchw(x), rtol=1e-4, atol=1e-4)


def test_each_case_is_compared_with_the_variant_the_task_uses() -> None:
    bench = load_benchmark("cnn_layout")
    assert bench.baseline("train, 1 thread, batch 10, NCHW", 2) == "train, 1 thread, batch 10, channels-last"
    assert bench.baseline("evaluate, 2 threads, batch 1000, NCHW", 2) == "evaluate, 2 threads, batch 100, channels-last"
    row = {"median": 2.0, "min": 1.9, "max": 2.2, "ratio": 1.25, "seconds": [2.0]}
    text = bench.table({"date": "d", "cpu": "c", "command": "python benchmarks/cnn_layout.py", "commit": "abc",
                        "repeats": 1, "cases": {"evaluate, 2 threads, batch 1000, NCHW": row}})
    assert "| evaluate, 2 threads, batch 1000, NCHW | 2.000 | 1.900 | 2.200 | 1.25 |" in text
