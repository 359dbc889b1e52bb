"""CIFAR networks of the original sam.pytorch table, plus a tiny one for tests.

Every builder takes ``num_classes`` and returns an ``nn.Module`` mapping float images
(N, 3, 32, 32) to logits (N, num_classes). Parameter counts (CIFAR-10 head):

    resnet20           0.27M   He et al. 2016, 3 stages x 3 basic blocks, option-A shortcuts
    resnet56           0.85M   same with 9 blocks per stage
    wrn28_2            1.47M   Zagoruyko & Komodakis 2016, pre-activation, 4 blocks per stage
    wrn28_10          36.5M    same, widen factor 10
    resnext29_32x4d    4.78M   Xie et al. 2017 bottleneck blocks, cardinality 32, base width 4,
                               3 stages x 3 blocks, group width doubling per stage (the variant
                               of kuangliu/pytorch-cifar, whose count matches the 4.8M published
                               with sam.pytorch; the paper's own CIFAR models are 8x64d/16x64d)
    tiny               1.6K    two conv+BN stages; only for fast tests, not a CIFAR baseline

and any timm model, named ``timm:NAME[,key=value,...]`` (``timm.create_model(NAME, pretrained=False,
num_classes=..., key=value, ...)``; values are Python literals), e.g. a ViT for 32x32 images:
``timm:vit_tiny_patch16_224,img_size=32,patch_size=4``.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def init_conv_and_linear(module: nn.Module) -> None:
    """He-normal convolutions, BN weight 1 / bias 0, as in the reference implementations."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --- CIFAR ResNet (He et al. 2016, section 4.2) --------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs; the option-A shortcut subsamples and zero-pads channels (no parameters),
    which is what keeps ResNet-20 at 0.27M."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        init_conv_and_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10) -> nn.Module:
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> nn.Module:
    return CifarResNet(9, num_classes)


# --- Wide ResNet (Zagoruyko & Komodakis 2016) -----------------------------------------------


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 conv shortcut where width or resolution changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the authors' code.
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_and_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wrn28_2(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 2, num_classes)


def wrn28_10(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 10, num_classes)


# --- ResNeXt-29 (Xie et al. 2017) -----------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """1x1 reduce, 3x3 grouped conv over ``cardinality`` groups, 1x1 expand to 2x group width."""

    def __init__(self, in_planes: int, cardinality: int, group_width: int, stride: int):
        super().__init__()
        width = cardinality * group_width
        out_planes = 2 * width
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt29(nn.Module):
    def __init__(self, cardinality: int, group_width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, in_planes = [], 64
        for stage, stride in enumerate((1, 2, 2)):
            width = group_width * 2**stage
            for i in range(3):
                blocks.append(ResNeXtBlock(in_planes, cardinality, width, stride if i == 0 else 1))
                in_planes = 2 * cardinality * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_and_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnext29_32x4d(num_classes: int = 10) -> nn.Module:
    return ResNeXt29(32, 4, num_classes)


# --- tiny test model ------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Two conv-BN-ReLU stages and a linear head: has BatchNorm buffers like the real models,
    compiles in seconds, so tests of the trainer's machinery stay fast."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        init_conv_and_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny(num_classes: int = 10) -> nn.Module:
    return TinyNet(num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "wrn28_2": wrn28_2,
    "wrn28_10": wrn28_10,
    "resnext29_32x4d": resnext29_32x4d,
    "tiny": tiny,
}

# Published parameter counts (CIFAR-10 head) that tests hold the builders to, within 5%.
PUBLISHED_PARAMS = {
    "resnet20": 0.27e6,
    "resnet56": 0.85e6,
    "wrn28_2": 1.5e6,
    "wrn28_10": 36.5e6,
    "resnext29_32x4d": 4.8e6,
}


TIMM_PREFIX = "timm:"


def build_model(name: str, num_classes: int) -> nn.Module:
    """The named network (one of ``MODELS`` or ``timm:NAME[,key=value,...]``), freshly initialised
    from the global torch RNG."""
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_name, options = parse_timm_model(name)
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **options)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or timm:NAME")
    return MODELS[name](num_classes)


def parse_timm_model(name: str) -> tuple[str, dict[str, Any]]:
    """``("vit_tiny_patch16_224", {"img_size": 32})`` from ``"timm:vit_tiny_patch16_224,img_size=32"``:
    the timm name and its keyword arguments (Python literals; anything else stays a string).
    A ValueError names what is malformed or unknown (timm imported here only)."""
    timm_name, *pairs = name[len(TIMM_PREFIX):].split(",")
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"{name!r}: options after the timm model's name are key=value pairs separated by "
                             f"commas, got {pair!r} (e.g. timm:vit_tiny_patch16_224,img_size=32,patch_size=4)")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"{name!r} needs timm: pip install timm (or funcsam[timm])") from err
    if not timm.is_model(timm_name):
        raise ValueError(f"timm has no model {timm_name!r} (timm {timm.__version__}); list them with "
                         "timm.list_models('*vit*')")
    return timm_name, options


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
