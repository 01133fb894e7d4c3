"""Pre-activation WideResNet with per-stage depth, width and stride.

Parameter names follow RobustBench's ``RobustWideResNet`` (``stem_conv``, ``blocks.{i}.layer.{j}.{bn1,
conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so the Huang2021Exploring checkpoints load strictly.

References: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; Huang et al., "Exploring
Architectural Ingredients of Adversarially Robust Deep Neural Networks", NeurIPS 2021.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.layers import conv1x1, conv3x3, make_activation, make_normalization


SHORTCUT_INPUTS = ("input", "preact")


class WideBasicBlock(nn.Module):
    """Pre-activation block (TRADES/RobustWideResNet semantics); ``a = act(bn1(x))``, ``r = conv2(act(bn2(conv1(a))))``.

    - ``in == out and stride == 1``: ``x + r`` (identity shortcut);
    - ``in != out``: ``convShortcut(a) + r`` (the shortcut sees the pre-activated input);
    - ``in == out and stride != 1``: ``convShortcut(x) + r``, the shortcut on the raw block input, as the
      paper's ``RobustWideResNet`` does (``equal_width_shortcut="preact"`` gives archlip's behaviour before
      checkpoint format 2, which applied it to ``a``).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: str, dropout: float,
                 equal_width_shortcut: str = "input") -> None:
        super().__init__()
        if equal_width_shortcut not in SHORTCUT_INPUTS:
            raise ValueError(f"unknown equal_width_shortcut {equal_width_shortcut!r}; choose one of: "
                             f"{', '.join(SHORTCUT_INPUTS)}")
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = make_activation(activation)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.act2 = make_activation(activation)
        self.conv2 = conv3x3(out_planes, out_planes, 1)
        self.dropout = dropout
        self.activation = activation
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else conv1x1(in_planes, out_planes, stride)
        # where the shortcut conv reads from: the pre-activation when the width changes, else the raw input
        self.shortcut_on_preact = in_planes != out_planes or equal_width_shortcut == "preact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        out = self.act2(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(a if self.shortcut_on_preact else x) + out


class WideStage(nn.Module):
    """A stage of ``depth`` blocks, held in ``.layer`` (RobustBench's ``NetworkBlock``)."""

    def __init__(
        self, depth: int, in_planes: int, out_planes: int, stride: int, activation: str, dropout: float,
        equal_width_shortcut: str = "input",
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if j == 0 else out_planes, out_planes, stride if j == 0 else 1,
                               activation, dropout, equal_width_shortcut)
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _as_int_tuple(name: str, values: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}") from None
    if any(int(v) != v for v in values) or any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive integers, got {list(values)}")
    return out


class WideResNet(nn.Module):
    """Pre-activation WideResNet: ``stem_conv`` -> stages -> ``act(bn1(.))`` -> global average pool -> ``fc``.

    ``widths[0]`` is the stem width and ``widths[i + 1]`` the width of stage ``i``; ``depths[i]`` blocks per
    stage; ``strides[i]`` is the stride of the first block of stage ``i``. Inputs are in [0, 1]; an optional
    ``normalize=(mean, std)`` is applied inside the model. Returns logits.
    """

    def __init__(
        self,
        depths: Sequence[int] = (5, 5, 5),
        widths: Sequence[int] = (16, 320, 640, 512),
        strides: Sequence[int] = (1, 2, 2),
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        dropout: float = 0.0,
        equal_width_shortcut: str = "input",
    ) -> None:
        super().__init__()
        depths = _as_int_tuple("depths", depths)
        widths = _as_int_tuple("widths", widths)
        strides = _as_int_tuple("strides", strides)
        if len(widths) != len(depths) + 1:
            raise ValueError(
                f"widths needs one entry for the stem plus one per stage ({len(depths) + 1}), got {list(widths)}"
            )
        if len(strides) != len(depths):
            raise ValueError(f"strides needs one entry per stage ({len(depths)}), got {list(strides)}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        make_activation(activation)  # validates the name
        self.depths, self.widths, self.strides = depths, widths, strides
        self.num_classes, self.activation, self.in_channels, self.dropout = num_classes, activation, in_channels, dropout
        self.equal_width_shortcut = equal_width_shortcut
        self.normalize = make_normalization(normalize, in_channels)
        self.stem_conv = conv3x3(in_channels, widths[0], 1)
        self.blocks = nn.ModuleList(
            WideStage(d, widths[i], widths[i + 1], s, activation, dropout, equal_width_shortcut)
            for i, (d, s) in enumerate(zip(depths, strides))
        )
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.act = make_activation(activation)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        out = self.stem_conv(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.act(self.bn1(out))
        return self.fc(torch.flatten(self.global_pooling(out), 1))

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly) that rebuild this architecture."""
        norm = self.normalize
        return {
            "family": "wideresnet",
            "depths": list(self.depths),
            "widths": list(self.widths),
            "strides": list(self.strides),
            "num_classes": self.num_classes,
            "activation": self.activation,
            "in_channels": self.in_channels,
            "normalize": None if norm is None else [norm.mean.flatten().tolist(), norm.std.flatten().tolist()],
            "dropout": self.dropout,
            "equal_width_shortcut": self.equal_width_shortcut,
        }
