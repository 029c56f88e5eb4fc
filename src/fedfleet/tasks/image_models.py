"""The ``images`` task's models, for batches of uint8 images (n × channels × size × size).

- ``paper_cnn``: the CNN of the FedAvg paper (McMahan et al. 2017), as ``mnist``'s, for any channel count
  and image size: conv5x5 32 → maxpool 2 → conv5x5 64 → maxpool 2 → dense 512 → one logit per class
  (1,663,370 parameters for 28×28 grey images of 10 classes; the dense layer grows with size²).
- ``small_resnet``: a ResNet-8 (He et al. 2016, the CIFAR-10 family with one residual block per stage: 16,
  32 and 64 channels, the image halved at the second and third) ending in global average pooling, so its
  78k-odd parameters do not depend on the image size. It normalises with GroupNorm instead of BatchNorm:
  BatchNorm's running statistics, averaged over sites whose data differ, match none of them, and
  GroupNorm has none (Hsieh et al. 2020, "The Non-IID Data Quagmire of Decentralized Machine Learning").

Both scale the pixels to [0, 1] in their first layer, so that the images stay uint8 (a quarter of the
memory of float32) until a batch is used, and a model is complete on its own: raw pixels in, logits out.
"""

from __future__ import annotations

import torch
from torch import nn

GROUPS = 8  # GroupNorm's groups: 2, 4 and 8 channels each at the ResNet's widths of 16, 32 and 64


class Rescale(nn.Module):
    """uint8 pixels → float32 in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0


def _channels_last(model: nn.Module) -> nn.Module:
    # oneDNN's convolutions and pooling are faster on CPUs with NHWC tensors (see mnist.build_model); the
    # weights are the same values and go out C-ordered (torch_common.weights_of). Module.to(memory_format=...)
    # works but is missing from torch's type stubs.
    nhwc: nn.Module = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return nhwc


def paper_cnn(channels: int, size: int, classes: int) -> nn.Module:
    """The FedAvg paper's CNN for ``channels`` × ``size`` × ``size`` images (``size`` ≥ 4) and ``classes`` outputs."""
    side = size // 4  # after the two 2×2 poolings (each rounds down)
    return _channels_last(nn.Sequential(
        Rescale(),
        nn.Conv2d(channels, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512), nn.ReLU(),
        nn.Linear(512, classes),  # logits: the softmax is in the cross-entropy loss
    ))


class Block(nn.Module):
    """A basic residual block: two 3×3 convolutions, and a 1×1 one on the shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(GROUPS, cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                          nn.GroupNorm(GROUPS, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def small_resnet(channels: int, classes: int) -> nn.Module:
    """ResNet-8 with GroupNorm for ``channels``-channel images of any size and ``classes`` outputs."""
    return _channels_last(nn.Sequential(
        Rescale(),
        nn.Conv2d(channels, 16, kernel_size=3, padding=1, bias=False), nn.GroupNorm(GROUPS, 16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, classes),
    ))
