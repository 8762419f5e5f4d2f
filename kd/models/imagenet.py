"""torchvision's ImageNet ResNets, wrapped to expose ``features`` and ``classifier``.

``fc`` is moved out to ``classifier`` and replaced by the identity, so the torchvision network
itself computes ``features`` (the pooled, flattened h). No pretrained weights are downloaded.
"""

from __future__ import annotations

from functools import partial

import torchvision
from torch import nn

from kd.models.cifar import image_channels


class TorchvisionResNet(nn.Module):
    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.classifier, net.fc = net.fc, nn.Identity()
        self.features = net

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet(num_classes: int, input_shape, arch: str, small_input: bool = False) -> TorchvisionResNet:
    """``torchvision.models.<arch>``; ``small_input`` swaps the 7x7/2 stem and max pool for a 3x3/1
    conv, so small images (CIFAR, MNIST) keep their resolution; the stem also follows the channels."""
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    channels = image_channels(input_shape)
    if small_input or channels != 3:
        kernel, stride = (3, 1) if small_input else (7, 2)
        net.conv1 = nn.Conv2d(channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    if small_input:
        net.maxpool = nn.Identity()
    return TorchvisionResNet(net)


MODELS = {arch: partial(resnet, arch=arch) for arch in ("resnet18", "resnet34", "resnet50")}
