"""ResNets for ImageNet-sized images (He et al. 2016, torchvision's layout and parameter names):
a 7x7 stride-2 stem with max pooling, four groups, adaptive average pooling, so they also run
on small inputs (64x64 and up). A torchvision ``state_dict`` loads into them unchanged."""

from __future__ import annotations

from kdbench.models import register_model
from kdbench.models._image import image_channels
from kdbench.models.resnet_cifar import BasicBlock, Bottleneck, ResNet

_WIDTHS = [64, 128, 256, 512]


@register_model("resnet18_imagenet")
def resnet18_imagenet(num_classes: int, input_shape: tuple[int, ...]) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2] (11.69M parameters at 1000 classes)."""
    channels = image_channels("resnet18_imagenet", input_shape)
    return ResNet(BasicBlock, [2, 2, 2, 2], _WIDTHS, 64, num_classes, channels, True)


@register_model("resnet34_imagenet")
def resnet34_imagenet(num_classes: int, input_shape: tuple[int, ...]) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3] (21.80M parameters at 1000 classes)."""
    channels = image_channels("resnet34_imagenet", input_shape)
    return ResNet(BasicBlock, [3, 4, 6, 3], _WIDTHS, 64, num_classes, channels, True)


@register_model("resnet50_imagenet")
def resnet50_imagenet(num_classes: int, input_shape: tuple[int, ...]) -> ResNet:
    """ResNet-50 (v1.5, stride on the 3x3): bottlenecks [3, 4, 6, 3] (25.56M at 1000 classes)."""
    channels = image_channels("resnet50_imagenet", input_shape)
    return ResNet(Bottleneck, [3, 4, 6, 3], _WIDTHS, 64, num_classes, channels, True)
