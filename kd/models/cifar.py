"""The CIFAR model zoo of the KD literature (RepDistiller / CRD definitions), for any input size.

ResNets are 3-stage basic-block nets of depth 6n+2; ``x4`` variants are 4x wider with a 32-wide
stem. WRN-d-k is the pre-activation wide ResNet; VGG-8/13 have batch norm; ``cnn`` is a small VGG-like
net of ours, for CPU budgets. One difference from RepDistiller: every net ends in adaptive average
pooling, so images of any size and channel count work (it equals RepDistiller's fixed pooling on
32x32 inputs).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from kd.errors import UserError


class GlobalAvgPool(nn.Module):
    """Mean over H and W: any input size, and an exact backward under deterministic=true on CUDA
    (AdaptiveAvgPool2d's CUDA backward is on PyTorch's nondeterministic list)."""

    def forward(self, x):
        return x.mean((2, 3))


class PooledNet(nn.Module):
    """``features`` = body, global average pool, flatten; ``classifier`` = linear class templates."""

    def __init__(self, body: nn.Sequential, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*body, GlobalAvgPool())
        self.classifier = nn.Linear(width, num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):  # He init (fan-out) as in RepDistiller
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


def image_channels(input_shape) -> int:
    """Channels of an image input (C, H, W); a one-line error for flat inputs."""
    if len(input_shape) != 3:
        raise UserError(
            f"this model needs image inputs (C, H, W), but the data gives input_shape="
            f"{tuple(input_shape)}; use model=mlp for flat inputs"
        )
    return input_shape[0]


def resnet(num_classes: int, input_shape, depth: int, widths=(16, 16, 32, 64)) -> PooledNet:
    """CIFAR ResNet-``depth``: stem of ``widths[0]``, three stages of (depth-2)/6 basic blocks."""
    if (depth - 2) % 6:
        raise UserError(f"model.depth={depth} is not valid for a CIFAR ResNet; use 6n+2 (8, 14, 20, 32, 56, 110)")
    blocks, width = [], widths[0]
    for stage, planes in enumerate(widths[1:]):
        for i in range((depth - 2) // 6):
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or width != planes:
                downsample = nn.Sequential(conv1x1(width, planes, stride), nn.BatchNorm2d(planes))
            blocks.append(BasicBlock(width, planes, stride, downsample))
            width = planes
    stem = [conv3x3(image_channels(input_shape), widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    return PooledNet(nn.Sequential(*stem, *blocks), width, num_classes)


class WideBlock(nn.Module):
    """Pre-activation block of WRN; when the shape changes, the shortcut sees the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True))
        self.residual = nn.Sequential(
            conv3x3(in_planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(inplace=True), conv3x3(planes, planes)
        )
        self.shortcut = None if in_planes == planes and stride == 1 else conv1x1(in_planes, planes, stride)

    def forward(self, x):
        out = self.pre(x)
        return self.residual(out) + (x if self.shortcut is None else self.shortcut(out))


def wide_resnet(num_classes: int, input_shape, depth: int, widen: int) -> PooledNet:
    """WRN-``depth``-``widen``: three stages of (depth-4)/6 pre-activation blocks, 16k/32k/64k wide."""
    if (depth - 4) % 6:
        raise UserError(f"model.depth={depth} is not valid for a wide ResNet; use 6n+4 (16, 28, 40)")
    layers, width = [conv3x3(image_channels(input_shape), 16)], 16
    for stage, planes in enumerate((16 * widen, 32 * widen, 64 * widen)):
        for i in range((depth - 4) // 6):
            layers.append(WideBlock(width, planes, 2 if stage > 0 and i == 0 else 1))
            width = planes
    body = nn.Sequential(*layers, nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    return PooledNet(body, width, num_classes)


VGG_STAGES = {8: [[64], [128], [256], [512], [512]], 13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


def plain(num_classes: int, input_shape, stages) -> PooledNet:
    """Stages of 3x3 conv + batch norm + ReLU layers (one per width in a stage), 2x2 max pools between."""
    layers, width = [], image_channels(input_shape)
    for stage, stage_widths in enumerate(stages):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for planes in stage_widths:
            layers += [nn.Conv2d(width, planes, 3, padding=1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
            width = planes
    return PooledNet(nn.Sequential(*layers), width, num_classes)


def vgg(num_classes: int, input_shape, depth: int) -> PooledNet:
    """VGG-``depth`` with batch norm: five conv stages, 2x2 max pools between the first four."""
    return plain(num_classes, input_shape, VGG_STAGES[depth])


def cnn(num_classes: int, input_shape, widths: tuple[int, ...] = (16, 32, 64)) -> PooledNet:
    """The VGG pattern at the scale of a CPU: one conv layer per stage, ``widths`` channels (ours; the
    zoo's nets are too slow for Fashion-MNIST on a laptop, configs/experiment/fig3_fashion_mnist.yaml)."""
    return plain(num_classes, input_shape, [[w] for w in widths])


MODELS = {
    **{f"resnet{d}": partial(resnet, depth=d) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": partial(resnet, depth=d, widths=(32, 64, 128, 256)) for d in (8, 32)},
    **{f"wrn_{d}_{k}": partial(wide_resnet, depth=d, widen=k) for d, k in ((16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": partial(vgg, depth=d) for d in VGG_STAGES},
    "cnn": cnn,
}
