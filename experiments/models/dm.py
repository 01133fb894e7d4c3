"""The DeepMind-style WideResNet and pre-activation ResNet, with input normalisation inside the model.

This is the layout of most top CIFAR entries since 2021 (Gowal et al. 2020, Rebuffi et al. 2021 and the
models built on their code), with its exact key names so that those state dicts load strictly:

- ``DMWideResNet``: ``mean``, ``std`` (buffers), ``init_conv``, ``layer.{i}.block.{j}.{batchnorm_0, relu_0,
  conv_0, batchnorm_1, relu_1, conv_1, shortcut}``, ``batchnorm``, ``relu``, ``logits``;
- ``DMPreActResNet``: ``mean``, ``std``, ``conv_2d``, ``layer_{i}.{j}.{batchnorm_0, relu_0, conv_2d_1,
  batchnorm_1, relu_1, conv_2d_2, shortcut}``, ``batchnorm``, ``relu``, ``logits``.

Any per-stage depth and width, any activation of ``ACTIVATIONS`` (the published models use ReLU or Swish =
SiLU; the activation module keeps the name ``relu`` either way, as in the reference). Strided 3x3 convs pad
TensorFlow-style ("SAME": one zero row/column after the input only), as the reference does. The reference
pools with ``avg_pool2d(out, 8)`` (resp. 4) on 32x32 inputs; here pooling is global, which is the same
there and also works for other input sizes. Forward passes are torch.fx-traceable (no data-dependent
control flow; normalisation is ``(x - mean) / std`` with buffers; activations are modules).

References: Gowal et al., "Uncovering the Limits of Adversarial Training against Norm-Bounded Adversarial
Examples", 2020; Rebuffi et al., "Fixing Data Augmentation to Improve Adversarial Robustness", 2021.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from experiments.models.layers import conv1x1, conv3x3, make_activation

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
BN_MOMENTUM = 0.01  # the published training code's batch-norm momentum (decay 0.99)


def _same_padding(stride: int) -> tuple[nn.Module | None, int]:
    """TensorFlow "SAME" padding of a 3x3 conv: (explicit pad module or None, the conv's own padding)."""
    if stride == 1:
        return None, 1
    if stride == 2:
        return nn.ZeroPad2d((0, 1, 0, 1)), 0
    raise ValueError(f"this family supports strides 1 and 2 only, got {stride}")


def _norm_buffers(module: nn.Module, normalize: Any, in_channels: int) -> None:
    """``mean``/``std`` buffers (C, 1, 1); ``normalize=None``: the reference's CIFAR-10 statistics for 3 channels,
    the identity (0, 1) otherwise."""
    if normalize is None:
        normalize = (CIFAR10_MEAN, CIFAR10_STD) if in_channels == 3 else ((0.0,) * in_channels, (1.0,) * in_channels)
    if len(normalize) != 2:
        raise ValueError("normalize must be a (mean, std) pair with one entry per input channel")
    mean = [float(v) for v in torch.as_tensor(normalize[0], device="cpu").flatten().tolist()]
    std = [float(v) for v in torch.as_tensor(normalize[1], device="cpu").flatten().tolist()]
    if len(mean) != in_channels or len(std) != in_channels or min(std) <= 0:
        raise ValueError(f"normalize needs {in_channels} means and {in_channels} positive stds, got {mean} and {std}")
    module.normalize_values = [mean, std]  # also readable on the meta device
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(in_channels, 1, 1))
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(in_channels, 1, 1))


def _check_sizes(depths: Sequence[int], widths: Sequence[int], strides: Sequence[int] | None,
                 stem: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    depths, widths = tuple(int(d) for d in depths), tuple(int(w) for w in widths)
    n_widths = len(depths) + (1 if stem else 0)
    if not depths or len(widths) != n_widths or min(depths + widths) < 1:
        raise ValueError(f"need positive depths (one per stage) and {n_widths} positive widths, "
                         f"got {list(depths)} and {list(widths)}")
    strides = tuple(int(s) for s in (strides if strides is not None else (1,) + (2,) * (len(depths) - 1)))
    if len(strides) != len(depths):
        raise ValueError(f"strides needs one entry per stage ({len(depths)}), got {list(strides)}")
    return depths, widths, strides


def _common_config(model: nn.Module) -> dict[str, Any]:
    return {"num_classes": model.num_classes, "activation": model.activation, "in_channels": model.in_channels,
            "normalize": ([list(v) for v in model.normalize_values] if model.mean.is_meta  # the buffers, once loaded
                          else [model.mean.flatten().tolist(), model.std.flatten().tolist()]),
            "input_padding": model.input_padding}


class DMBlock(nn.Module):
    """WideResNet block: ``a = act(bn0(x))``; ``conv_1(act(bn1(conv_0(a)))) + (shortcut(a) if in != out else x)``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: str) -> None:
        super().__init__()
        if in_planes == out_planes and stride != 1:
            raise ValueError("an equal-width block with stride 2 has no shortcut in this family; change the widths")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.relu_0 = make_activation(activation)
        self.pad_0, padding = _same_padding(stride)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=padding, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=BN_MOMENTUM)
        self.relu_1 = make_activation(activation)
        self.conv_1 = conv3x3(out_planes, out_planes, 1)
        self.shortcut = conv1x1(in_planes, out_planes, stride) if in_planes != out_planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(a if self.pad_0 is None else self.pad_0(a))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (x if self.shortcut is None else self.shortcut(a)) + out


class DMBlockGroup(nn.Module):
    """A stage of ``depth`` blocks held in ``.block``."""

    def __init__(self, depth: int, in_planes: int, out_planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.block = nn.Sequential(*[DMBlock(in_planes if j == 0 else out_planes, out_planes,
                                             stride if j == 0 else 1, activation) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _DMNet(nn.Module):
    """What both DM networks share: input padding and normalisation, and the ``relu(batchnorm)`` -> pool ->
    ``logits`` head."""

    def _setup_input(self, num_classes: int, activation: str, in_channels: int, normalize: Any,
                     input_padding: int) -> None:
        make_activation(activation)
        self.num_classes, self.activation, self.in_channels = int(num_classes), activation, int(in_channels)
        self.input_padding = int(input_padding)
        _norm_buffers(self, normalize, self.in_channels)
        self.input_pad = nn.ZeroPad2d(self.input_padding) if self.input_padding > 0 else None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_pad is not None:
            x = self.input_pad(x)
        return (x - self.mean) / self.std

    def _head(self, out: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.batchnorm(out))
        return self.logits(torch.flatten(self.global_pooling(out), 1))


class DMWideResNet(_DMNet):
    """``(x - mean) / std`` -> ``init_conv`` -> stages ``layer.i`` -> ``relu(batchnorm(.))`` -> pool -> ``logits``.

    ``widths[0]`` is the stem width and ``widths[i + 1]`` that of stage ``i``; ``depths[i]`` blocks per stage;
    strides default to 1 for the first stage and 2 after. WRN-28-10: ``depths=(4, 4, 4), widths=(16, 160, 320,
    640)``. ``input_padding`` zero-pads the input before normalising (the reference's ``padding``).
    """

    def __init__(self, depths: Sequence[int] = (4, 4, 4), widths: Sequence[int] = (16, 160, 320, 640),
                 strides: Sequence[int] | None = None, num_classes: int = 10, activation: str = "relu",
                 in_channels: int = 3, normalize: Any = None, input_padding: int = 0) -> None:
        super().__init__()
        self.depths, self.widths, self.strides = _check_sizes(depths, widths, strides, stem=True)
        self._setup_input(num_classes, activation, in_channels, normalize, input_padding)
        self.init_conv = conv3x3(self.in_channels, self.widths[0], 1)
        self.layer = nn.Sequential(*[DMBlockGroup(d, self.widths[i], self.widths[i + 1], s, activation)
                                     for i, (d, s) in enumerate(zip(self.depths, self.strides))])
        self.batchnorm = nn.BatchNorm2d(self.widths[-1], momentum=BN_MOMENTUM)
        self.relu = make_activation(activation)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(self.widths[-1], self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.layer(self.init_conv(self._normalise(x))))

    def arch_config(self) -> dict[str, Any]:
        return {"family": "dm-wideresnet", "depths": list(self.depths), "widths": list(self.widths),
                "strides": list(self.strides), **_common_config(self)}


class DMPreActBlock(nn.Module):
    """Pre-activation ResNet block: ``conv_2d_2(act(bn1(conv_2d_1(act(bn0(x)))))) + shortcut(x)``.

    The shortcut (when the stride or width changes) is a 3x3 conv on the raw input ``x``, "SAME"-padded.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.relu_0 = make_activation(activation)
        self.pad, padding = _same_padding(stride)
        self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=padding, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=BN_MOMENTUM)
        self.relu_1 = make_activation(activation)
        self.conv_2d_2 = conv3x3(out_planes, out_planes, 1)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        out = self.conv_2d_1(out if self.pad is None else self.pad(out))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        if self.shortcut is None:
            return out + x
        return out + self.shortcut(x if self.pad is None else self.pad(x))


class DMPreActResNet(_DMNet):
    """``(x - mean) / std`` -> ``conv_2d`` -> ``layer_0 .. layer_{n-1}`` -> ``relu(batchnorm(.))`` -> pool -> ``logits``.

    ``widths[i]`` is the width of stage ``i`` (the stem has ``widths[0]``); PreActResNet-18: ``num_blocks=(2, 2,
    2, 2), widths=(64, 128, 256, 512)``; -34: ``num_blocks=(3, 4, 6, 3)``.
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 strides: Sequence[int] | None = None, num_classes: int = 10, activation: str = "relu",
                 in_channels: int = 3, normalize: Any = None, input_padding: int = 0) -> None:
        super().__init__()
        self.num_blocks, self.stage_widths, self.strides = _check_sizes(num_blocks, widths, strides, stem=False)
        self._setup_input(num_classes, activation, in_channels, normalize, input_padding)
        self.conv_2d = conv3x3(self.in_channels, self.stage_widths[0], 1)
        in_planes = self.stage_widths[0]
        for i, (n, w, s) in enumerate(zip(self.num_blocks, self.stage_widths, self.strides)):
            self.add_module(f"layer_{i}", nn.Sequential(*[DMPreActBlock(in_planes if j == 0 else w, w, s if j == 0 else 1,
                                                                        activation) for j in range(n)]))
            in_planes = w
        self.batchnorm = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.relu = make_activation(activation)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(in_planes, self.num_classes)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer_{i}") for i in range(len(self.num_blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_2d(self._normalise(x))
        for stage in self.stages():
            out = stage(out)
        return self._head(out)

    def arch_config(self) -> dict[str, Any]:
        return {"family": "dm-preact-resnet", "num_blocks": list(self.num_blocks), "widths": list(self.stage_widths),
                "strides": list(self.strides), **_common_config(self)}
