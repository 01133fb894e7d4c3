"""A small, explicit description of a network's computation for Lipschitz composition.

Models describe themselves with these nodes (a module may define ``lipschitz_graph(self) -> Node``);
``lipschitz`` composes per-node bounds over the tree. Every node wraps the real ``nn.Module`` it
stands for where there is one, so weights are read at bound time, never copied.

Semantics (input ``x``):
- ``Layer(module)``: ``module(x)`` for a conv (1d/2d) or linear module (bias ignored by norms).
- ``BatchNorm(module)``: eval-mode batch norm, a per-channel affine map.
- ``Activation(kind)``: elementwise nonlinearity; ``kind`` in ``ACTIVATION_KINDS``.
- ``Sequential(children)``: composition, first child applied first.
- ``Residual(branch, shortcut)``: ``shortcut(x) + branch(x)``; ``shortcut=None`` is the identity.
- ``Pool(module)``: average / max / adaptive average pooling module.
- ``Flatten()``, ``Identity()`` (dropout in eval, no-op modules), ``Normalize(mean, std)``:
  ``(x - mean) / std`` per channel.
``role`` tags structure for reports: "stem", "stage", "block", "head" or None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
from torch import nn

ACTIVATION_KINDS = ("relu", "leaky_relu", "silu", "gelu", "softplus", "tanh", "identity")


@dataclass
class Layer:
    module: nn.Module
    name: str = ""


@dataclass
class BatchNorm:
    module: nn.Module
    name: str = ""


@dataclass
class Activation:
    kind: str
    params: dict = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"unknown activation {self.kind!r}; supported: {', '.join(ACTIVATION_KINDS)}")


@dataclass
class Pool:
    module: nn.Module
    name: str = ""


@dataclass
class Flatten:
    name: str = ""


@dataclass
class Identity:
    name: str = ""


@dataclass
class Normalize:
    mean: torch.Tensor
    std: torch.Tensor
    name: str = ""


@dataclass
class Sequential:
    children: list
    name: str = ""
    role: str | None = None


@dataclass
class Residual:
    branch: "Node"
    shortcut: "Node | None" = None
    name: str = ""
    role: str | None = None


Node = Union[Layer, BatchNorm, Activation, Pool, Flatten, Identity, Normalize, Sequential, Residual]


def iter_nodes(node: Node) -> Iterator[Node]:
    """Depth-first pre-order walk over a graph."""
    yield node
    if isinstance(node, Sequential):
        for child in node.children:
            yield from iter_nodes(child)
    elif isinstance(node, Residual):
        yield from iter_nodes(node.branch)
        if node.shortcut is not None:
            yield from iter_nodes(node.shortcut)
