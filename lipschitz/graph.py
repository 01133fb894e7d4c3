"""A small, explicit description of a network's computation for Lipschitz composition.

``lipschitz.trace.graph_from_module`` produces these trees from any fx-traceable module; a tree can also be
built by hand and passed to ``network_bound``. ``lipschitz`` composes per-node bounds over the tree. Every
node wraps the real ``nn.Module`` it stands for where there is one, so weights are read at bound time,
never copied.

Semantics (input ``x``):
- ``Layer(module)``: ``module(x)`` for a conv (1d/2d) or linear module (bias ignored by norms).
- ``BatchNorm(module)``: eval-mode batch norm, a per-channel affine map.
- ``Activation(kind)``: elementwise nonlinearity; ``kind`` in ``ACTIVATION_KINDS``.
- ``Sequential(children)``: composition, first child applied first.
- ``Residual(branch, shortcut)``: ``shortcut(x) + branch(x)``; ``shortcut=None`` is the identity.
- ``Pool(module)``: average / max / adaptive average pooling module.
- ``Flatten()``, ``Identity()`` (dropout in eval, no-op modules), ``Normalize(mean, std)``:
  ``(x - mean) / std`` per channel.
- ``Concat(parts, dim)``: ``torch.cat([p(x) for p in parts], dim)`` (dim >= 1); Lipschitz constant
  <= sqrt(sum L_i^2) (docs/network-bounds.md).
- ``Leaf(module, lipschitz)``: ``module(x)`` with a Lipschitz constant given by a registered rule
  (``lipschitz.register_leaf``): a float, or ``lipschitz(module, input_shape)``.
``role`` tags structure for reports: "stem", "stage", "block", "head" or None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import torch
from torch import nn
from torch.nn import functional as F

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
    note: str = ""  # why the tracer took a module as this activation (reported in NetworkBound.notes)

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


@dataclass
class Concat:
    parts: list
    dim: int = 1
    name: str = ""
    role: str | None = None


@dataclass
class Leaf:
    module: nn.Module
    lipschitz: Union[float, Callable[[nn.Module, tuple], float]]
    name: str = ""
    note: str = ""

    def constant(self, in_shape: tuple) -> float:
        """The registered Lipschitz constant at input shape ``in_shape`` (without batch)."""
        value = self.lipschitz(self.module, tuple(in_shape)) if callable(self.lipschitz) else self.lipschitz
        value = float(getattr(value, "value", value))
        if not value >= 0.0 or value == float("inf"):
            raise ValueError(f"leaf {self.name or type(self.module).__name__}: registered Lipschitz constant must be "
                             f"finite and >= 0, got {value}")
        return value


Node = Union[Layer, BatchNorm, Activation, Pool, Flatten, Identity, Normalize, Sequential, Residual, Concat, Leaf]
NODE_TYPES = (Layer, BatchNorm, Activation, Pool, Flatten, Identity, Normalize, Sequential, Residual, Concat, Leaf)


def activation_fn(kind: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Apply the activation ``kind`` (``ACTIVATION_KINDS``) with ``params`` to ``x``."""
    if kind == "relu":
        return F.relu(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, params.get("negative_slope", 0.01))
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x, approximate=params.get("approximate", "none"))
    if kind == "softplus":
        return F.softplus(x, beta=params.get("beta", 1.0), threshold=params.get("threshold", 20.0))
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown activation {kind!r}; supported: {', '.join(ACTIVATION_KINDS)}")


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
    elif isinstance(node, Concat):
        for part in node.parts:
            yield from iter_nodes(part)


def interpret(node: Node, x: torch.Tensor, shapes: dict[int, tuple] | None = None) -> torch.Tensor:
    """Evaluate a graph on a batch; record each node's (input shape, output shape) without batch in ``shapes``."""
    in_shape = tuple(x.shape[1:])
    if isinstance(node, (Layer, BatchNorm, Pool)):
        y = node.module(x)
    elif isinstance(node, Activation):
        y = activation_fn(node.kind, node.params, x)
    elif isinstance(node, Leaf):
        y = node.module(x)
    elif isinstance(node, Concat):
        y = torch.cat([interpret(part, x, shapes) for part in node.parts], dim=node.dim)
    elif isinstance(node, Flatten):
        y = x.flatten(1)
    elif isinstance(node, Identity):
        y = x
    elif isinstance(node, Normalize):
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - torch.as_tensor(node.mean, dtype=x.dtype).view(view)) / torch.as_tensor(node.std, dtype=x.dtype).view(view)
    elif isinstance(node, Sequential):
        y = x
        for child in node.children:
            y = interpret(child, y, shapes)
    elif isinstance(node, Residual):
        y = interpret(node.branch, x, shapes)
        y = y + (x if node.shortcut is None else interpret(node.shortcut, x, shapes))
    else:
        raise ValueError(f"unsupported graph node {type(node).__name__}")
    if shapes is not None:
        shapes[id(node)] = (in_shape, tuple(y.shape[1:]))
    return y
