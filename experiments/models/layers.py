"""Small building blocks shared by the model families: activations and input normalisation."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, inside the model so that inputs stay in [0, 1].

    Mean and std are non-persistent buffers: they are part of the architecture (saved in checkpoint
    metadata), not of the state_dict, so published state_dicts still load strictly.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"normalize mean has {mean_t.numel()} entries but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"normalize std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_normalization(
    normalize: tuple[Sequence[float], Sequence[float]] | None, in_channels: int
) -> InputNormalization | None:
    """``InputNormalization`` for a ``(mean, std)`` pair, or ``None``; checks the channel count."""
    if normalize is None:
        return None
    if len(normalize) != 2:
        raise ValueError("normalize must be a (mean, std) pair, e.g. ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))")
    module = InputNormalization(*normalize)
    if module.mean.numel() not in (1, in_channels):
        raise ValueError(
            f"normalize has {module.mean.numel()} channels but the model takes in_channels={in_channels}"
        )
    return module


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
