"""The model zoo: standard sizes, any channel count / image size, the features/classifier protocol."""

import pytest
import torch

from kd import models
from kd.errors import UserError

# Millions of parameters for 100 classes: RepDistiller / CRD's table for the CIFAR nets (resnet8 and
# resnet20 to one more digit: the table's 0.08M / 0.27M are rounded down, 0.27M being He et al.'s
# 10-class figure); torchvision's for the ImageNet ResNets (11.69M, 21.80M, 25.56M at 1000 classes,
# less 900 x (512 or 2048 + 1)).
STANDARD_PARAMS_M = {
    "resnet8": 0.084,
    "resnet14": 0.18,
    "resnet20": 0.278,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.25,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "resnet18": 11.23,
    "resnet34": 21.34,
    "resnet50": 23.71,
    "cnn": 0.0303,  # ours (kd.models.cifar.cnn, widths 16, 32, 64): no published figure
}
IMAGE_MODELS = sorted(set(models.REGISTRY) - {"mlp"})
# The most compute-hungry nets run forward only, to keep the file fast on CPU; their blocks are the
# same code as the small nets' (one builder per family), which do take a backward step.
FORWARD_ONLY = {"resnet110", "resnet32x4", "wrn_40_2", "vgg13", "resnet34", "resnet50"}


def test_every_image_model_has_a_standard_size():
    assert set(IMAGE_MODELS) == set(STANDARD_PARAMS_M)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2 gain nothing from a second thread, which only thrashes on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_step(name, net, shape, num_classes):
    with torch.set_grad_enabled(name not in FORWARD_ONLY):
        logits = net(torch.randn(2, *shape))
    assert logits.shape == (2, num_classes)
    if name not in FORWARD_ONLY:
        logits.square().sum().backward()
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_model_size_training_step_and_features_protocol(name):
    torch.manual_seed(0)
    net = models.get(name, num_classes=100, input_shape=(3, 32, 32))
    if name in STANDARD_PARAMS_M:
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(STANDARD_PARAMS_M[name], rel=0.03)
    training_step(name, net, (3, 32, 32), 100)
    net.eval()  # batch-norm statistics frozen, so the two paths compute the same function
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = net.features(x)
        assert h.shape == (2, net.classifier.in_features)
        torch.testing.assert_close(net.classifier(h), net(x))
    training_step(name, models.get(name, num_classes=7, input_shape=(1, 28, 28)), (1, 28, 28), 7)


def test_small_input_keeps_resolution():
    big, small = (models.get("resnet18", num_classes=10, input_shape=(3, 32, 32), small_input=s) for s in (False, True))
    x = torch.randn(1, 3, 32, 32)
    net_big, net_small = big.features, small.features
    assert net_small.conv1.stride == (1, 1) and isinstance(net_small.maxpool, torch.nn.Identity)
    assert net_small.layer1(net_small.relu(net_small.bn1(net_small.conv1(x)))).shape[-1] == 32
    assert net_big.maxpool(net_big.conv1(x)).shape[-1] == 8


def test_in_channels_overrides_the_data_channels():
    net = models.get("resnet20", num_classes=10, input_shape=(3, 32, 32), in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="resnet21.*choose one of.*resnet20"):
        models.get("resnet21", num_classes=10, input_shape=(3, 32, 32))


def test_flat_inputs_are_a_user_error():
    with pytest.raises(UserError, match=r"needs image inputs.*\(32,\).*model=mlp"):
        models.get("resnet20", num_classes=10, input_shape=(32,))


def test_bad_depth_is_a_user_error():
    from kd.models.cifar import resnet

    with pytest.raises(UserError, match="depth=21"):
        resnet(num_classes=10, input_shape=(3, 32, 32), depth=21)
