"""ResNet-18 and PreActResNet-18 in the CIFAR layout most robustness repositories use.

Keys: ``conv1``, ``bn1`` (ResNet stem) / ``bn`` (PreActResNet head), ``layer{1..4}.{j}.{conv1,bn1,conv2,bn2}``,
``layer{k}.0.shortcut.0`` (conv; plus ``shortcut.1`` BN for ResNet), ``linear``.

References: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; He et al., "Identity
Mappings in Deep Residual Networks", ECCV 2016; Rice et al., "Overfitting in adversarially robust deep
learning", ICML 2020 (the PreActResNet-18 layout with a final ``bn``); Wong et al., "Fast is better than
free", ICLR 2020 (the shortcut on the raw block input).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from experiments.models.layers import conv1x1, conv3x3, make_activation, make_normalization


class BasicBlock(nn.Module):
    """Post-activation block: ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)
        self.activation = activation
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


PREACT_SHORTCUTS = ("preact", "input")


class PreActBlock(nn.Module):
    """Pre-activation block: ``a = act(bn1(x))``; ``conv2(act(bn2(conv1(a)))) + shortcut``.

    The shortcut is ``x`` without a conv; with one, ``shortcut="preact"`` applies it to ``a`` (Rice et al. and
    kuangliu's ``PreActBlock``) and ``shortcut="input"`` to the raw ``x`` (the fast_adversarial code and
    RobustBench's default ``PreActBlock``). Both have the same keys: only the name tells them apart.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str, shortcut: str = "preact") -> None:
        super().__init__()
        if shortcut not in PREACT_SHORTCUTS:
            raise ValueError(f"unknown pre-activation shortcut {shortcut!r}; choose one of: {', '.join(PREACT_SHORTCUTS)}")
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1)
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)
        self.activation = activation
        self.shortcut_input = shortcut
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        if self.shortcut is None:
            return out + x
        return out + self.shortcut(a if self.shortcut_input == "preact" else x)


class _CifarResNet(nn.Module):
    """Shared skeleton: stem ``conv1``, four stages ``layer1..layer4``, global average pool, ``linear``."""

    preact: bool = False

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        num_blocks, widths = tuple(int(n) for n in num_blocks), tuple(int(w) for w in widths)
        if len(num_blocks) != 4 or len(widths) != 4 or min(num_blocks + widths) < 1:
            raise ValueError(f"num_blocks and widths need 4 positive entries, got {list(num_blocks)}, {list(widths)}")
        make_activation(activation)
        self.num_blocks, self.stage_widths = num_blocks, widths
        self.num_classes, self.activation, self.in_channels = num_classes, activation, in_channels
        self.normalize = make_normalization(normalize, in_channels)
        self.conv1 = conv3x3(in_channels, widths[0], 1)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.act = make_activation(activation)
        in_planes = widths[0]
        for k, (n, w) in enumerate(zip(num_blocks, widths)):
            stride = 1 if k == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(self._block(in_planes, w, stride if j == 0 else 1, activation))
                in_planes = w
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
        if self.preact:
            self.bn = nn.BatchNorm2d(widths[-1])
            self.act = make_activation(activation)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _block(self, in_planes: int, planes: int, stride: int, activation: str) -> nn.Module:
        return BasicBlock(in_planes, planes, stride, activation)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        out = self.conv1(x)
        if not self.preact:
            out = self.act(self.bn1(out))
        for stage in self.stages():
            out = stage(out)
        if self.preact:
            out = self.act(self.bn(out))
        return self.linear(torch.flatten(self.global_pooling(out), 1))

    def arch_config(self) -> dict[str, Any]:
        norm = self.normalize
        return {
            "family": "preact-resnet" if self.preact else "resnet",
            "num_blocks": list(self.num_blocks),
            "widths": list(self.stage_widths),
            "num_classes": self.num_classes,
            "activation": self.activation,
            "in_channels": self.in_channels,
            "normalize": None if norm is None else [norm.mean.flatten().tolist(), norm.std.flatten().tolist()],
        }


class ResNet(_CifarResNet):
    """Post-activation CIFAR ResNet (ResNet-18 with the defaults)."""

    preact = False


class PreActResNet(_CifarResNet):
    """Pre-activation CIFAR ResNet with a final ``bn`` (PreActResNet-18 with the defaults).

    ``shortcut``: what a block's shortcut conv reads, "preact" (``act(bn1(x))``, Rice et al. / kuangliu) or
    "input" (the raw ``x``, fast_adversarial / RobustBench); see :class:`PreActBlock`.
    """

    preact = True

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 10, activation: str = "relu", in_channels: int = 3,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None, shortcut: str = "preact") -> None:
        if shortcut not in PREACT_SHORTCUTS:
            raise ValueError(f"unknown pre-activation shortcut {shortcut!r}; choose one of: {', '.join(PREACT_SHORTCUTS)}")
        self.shortcut_input = shortcut
        super().__init__(num_blocks, widths, num_classes, activation, in_channels, normalize)

    def _block(self, in_planes: int, planes: int, stride: int, activation: str) -> nn.Module:
        return PreActBlock(in_planes, planes, stride, activation, self.shortcut_input)

    def arch_config(self) -> dict[str, Any]:
        return {**super().arch_config(), "shortcut": self.shortcut_input}
