"""Parameter counts and multiply-accumulates per stage, read from a model's traced Lipschitz graph."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lipschitz import graph
from lipschitz.trace import graph_from_module


@dataclass
class PartDescription:
    name: str
    role: str | None
    params: int
    macs: int
    output_shape: list[int] | None


@dataclass
class ModelDescription:
    """Per-part (stem, stages, head) parameters and conv/linear MACs for one input of ``input_shape``."""

    model: str
    input_shape: list[int]
    parts: list[PartDescription] = field(default_factory=list)
    total_params: int = 0
    total_macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'part':<12} {'params':>14} {'MACs':>16}  output"]
        for p in self.parts:
            lines.append(f"{p.name:<12} {p.params:>14,} {p.macs:>16,}  {p.output_shape}")
        lines.append(f"{'total':<12} {self.total_params:>14,} {self.total_macs:>16,}")
        return "\n".join(lines)


def _node_modules(node: graph.Node) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for n in graph.iter_nodes(node):
        module = getattr(n, "module", None)
        if isinstance(module, nn.Module):
            seen.setdefault(id(module), module)
    return list(seen.values())


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample = output[0].numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = int(torch.tensor(module.kernel_size).prod())
        return per_sample * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def describe(model: nn.Module, input_shape: Sequence[int]) -> ModelDescription:
    """Parameters and MACs (conv and linear layers, one input without batch dim) per top-level part.

    ``input_shape`` excludes the batch dimension, e.g. ``(3, 32, 32)``. Parameters of modules that the
    graph does not reach are reported in a part named ``"other"`` so that the parts always sum to the total.
    """
    input_shape = [int(s) for s in input_shape]
    root = graph_from_module(model, input_shape)
    parts_nodes = root.children if isinstance(root, graph.Sequential) else [root]
    groups = [(getattr(n, "name", "") or type(n).__name__, getattr(n, "role", None), _node_modules(n))
              for n in parts_nodes]

    macs: dict[int, int] = {}
    shapes: dict[int, list[int]] = {}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        macs[id(module)] = macs.get(id(module), 0) + _macs(module, output)
        shapes[id(module)] = list(output.shape[1:])

    handles = [m.register_forward_hook(hook) for _, _, mods in groups for m in mods]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros([1, *input_shape], device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    desc = ModelDescription(model=getattr(model, "model_name", type(model).__name__), input_shape=input_shape)
    counted: set[int] = set()
    for name, role, mods in groups:
        params = sum(p.numel() for m in mods for p in m.parameters(recurse=False))
        counted.update(id(p) for m in mods for p in m.parameters(recurse=False))
        shape = next((shapes[id(m)] for m in reversed(mods) if id(m) in shapes), None)
        desc.parts.append(PartDescription(name, role, params, sum(macs.get(id(m), 0) for m in mods), shape))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    if other:
        desc.parts.append(PartDescription("other", None, other, 0, None))
    desc.total_params = sum(p.params for p in desc.parts)
    desc.total_macs = sum(p.macs for p in desc.parts)
    return desc
