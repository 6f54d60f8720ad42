"""Networks torchvision lacks (LeNet-5, small ResNets, AirNet), their builders, and torchvision adapters."""

from retrieval.models.adapt import replace_head, replace_input_channels, torchvision_builder
from retrieval.models.airnet import AirNet, _AirGroup, airnet_builder
from retrieval.models.lenet import LeNet5, build_lenet5
from retrieval.models.small_resnet import SmallResNet, small_resnet_builder

__all__ = [
    "AirNet",
    "LeNet5",
    "SmallResNet",
    "_AirGroup",  # tests/test_train.py checks the group's init
    "airnet_builder",
    "build_lenet5",
    "replace_head",
    "replace_input_channels",
    "small_resnet_builder",
    "torchvision_builder",
]
