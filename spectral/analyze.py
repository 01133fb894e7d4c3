"""Per-layer spectral table of any ``nn.Module``: every conv/linear at the input shape it really sees.

``analyze(model, input_shape)`` (or an example input with its batch dimension) runs one eval-mode, no-grad
forward pass with hooks (every submodule's mode is restored afterwards, so an analysis changes nothing in the
model: no BatchNorm statistics, no spectral-norm power-iteration buffers), records each ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Linear``, ``nn.ConvTranspose1d`` and ``nn.ConvTranspose2d`` call with its real input shape
and its parameters, folds an eval-mode BatchNorm that directly consumes a layer's output into it (``W * gamma
/ sqrt(var + eps)`` per output channel, in float64; the bias does not change a norm), then sandwiches each
layer (``spectral.sandwich``) and adds the random-matrix baseline. A transposed convolution is the adjoint of
the convolution with the same weight from its output shape back to its input shape, and a map and its adjoint
have the same operator norm, so its row is that convolution's sandwich. Modules with weights that are not
analysed (unsupported types, or layers never called as modules) are listed in ``meta["not_analyzed"]``.
Pre-activation blocks (BN -> ReLU -> conv) have no BN *after* a conv, so nothing is folded there:
network-level folding belongs to ``lipschitz``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from spectral.folding import fold_batchnorm, fold_scale
from spectral.random_matrix import random_conv_norm_prediction, random_norm_ratio
from spectral.sandwich import sandwich

__all__ = ["LayerTable", "LayerRecord", "analyze", "record_layers", "fold_batchnorm", "eval_mode", "example_input_for"]

_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear) + _TRANSPOSED_TYPES

CSV_COLUMNS = [
    "name", "kind", "weight_shape", "input_shape", "output_shape", "stride", "padding", "padding_mode",
    "dilation", "groups", "folded_batchnorm", "lower", "upper", "gap", "exact", "lower_guarantee",
    "upper_guarantee", "lower_method", "upper_method", "converged", "reason", "suggestion", "random_baseline",
    "random_baseline_guarantee", "ratio_to_random", "seconds",
]


@dataclass
class LayerRecord:
    """One call of a conv/linear module during the example forward pass."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    folded_batchnorm: str | None = None
    bn_scale: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    weight: torch.Tensor | None = None  # the weight this call used (a parametrized weight as computed then)

    @property
    def kind(self) -> str:
        return type(self.module).__name__


@dataclass
class LayerTable:
    """Rows of per-layer results (list of dicts); export with ``to_json`` / ``to_csv``."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, name_or_index: str | int) -> dict[str, Any]:
        if isinstance(name_or_index, int):
            return self.rows[name_or_index]
        for row in self.rows:
            if row["name"] == name_or_index:
                return row
        raise KeyError(f"no layer named {name_or_index!r}; layers: {', '.join(r['name'] for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _csv_cell(row.get(k)) for k in CSV_COLUMNS})
        return path


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else json.dumps(value)
    return "" if value is None else value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def record_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerRecord]:
    """Run ``model(example_input)`` once in eval mode, without gradients, with hooks; return each
    conv/linear/transposed-conv call in call order. Every submodule's mode is restored afterwards.

    A BatchNorm whose input tensor *is* a recorded layer's output (conv -> BN) is attached to that record.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(example_input):
        raise TypeError(f"example_input must be a tensor (with a batch dimension), got {type(example_input).__name__}")
    records: list[LayerRecord] = []
    outputs: dict[int, tuple[torch.Tensor, LayerRecord, int]] = {}
    calls: dict[str, int] = {}
    names = {id(m): name for name, m in model.named_modules()}
    handles = []

    def layer_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
            return
        base = names.get(id(module), type(module).__name__) or type(module).__name__
        calls[base] = calls.get(base, 0) + 1
        name = base if calls[base] == 1 else f"{base}#{calls[base]}"
        rec = LayerRecord(name, module, tuple(args[0].shape[1:]), tuple(output.shape[1:]),
                          weight=module.weight.detach())
        records.append(rec)
        # keep the tensor alive so its id stays unique; its version detects in-place changes (conv -> ReLU_ -> BN)
        outputs[id(output)] = (output, rec, output._version)

    def bn_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not args or not torch.is_tensor(args[0]):
            return
        hit = outputs.get(id(args[0]))
        if hit is None or hit[0] is not args[0]:
            return
        rec = hit[1]
        if args[0]._version != hit[2]:
            rec.notes.append("output modified in place before a BatchNorm: not folded")
            return
        bn_name = names.get(id(module), type(module).__name__)
        if rec.folded_batchnorm is not None:
            rec.notes.append(f"output also consumed by BatchNorm {bn_name}; only {rec.folded_batchnorm} folded")
            return
        if not module.track_running_stats or module.running_var is None:
            rec.notes.append(f"BatchNorm {bn_name} uses batch statistics (track_running_stats=False): not folded")
            return
        if isinstance(rec.module, nn.Linear) and len(rec.output_shape) != 1:
            # BatchNorm scales dim 1 of its input; a linear layer's features are the last dim
            rec.notes.append(f"BatchNorm {bn_name} scales dim 1, not this linear layer's features: not folded")
            return
        if module.running_var.shape[0] != rec.output_shape[0]:
            rec.notes.append(f"BatchNorm {bn_name} does not act on this layer's output channels: not folded")
            return
        rec.folded_batchnorm = bn_name
        rec.bn_scale = fold_scale(module)

    for module in model.modules():
        if isinstance(module, _LAYER_TYPES):
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_hook(bn_hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    return records


def _layer_params(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Linear):
        return {"stride": None, "padding": None, "padding_mode": None, "dilation": None, "groups": None}
    params = {
        "stride": list(module.stride), "padding": module.padding if isinstance(module.padding, str)
        else list(module.padding), "padding_mode": module.padding_mode, "dilation": list(module.dilation),
        "groups": module.groups,
    }
    if isinstance(module, _TRANSPOSED_TYPES):
        params["output_padding"] = list(module.output_padding)
    return params


def _input_size(rec: LayerRecord) -> list[int] | None:
    return list(rec.input_shape[1:]) if not isinstance(rec.module, nn.Linear) else None


def _sandwich_record(rec: LayerRecord, weight: torch.Tensor, sandwich_kwargs: dict[str, Any]):
    """The sandwich of one recorded call; a transposed conv is sandwiched as its adjoint conv."""
    module = rec.module
    if isinstance(module, nn.Linear):
        # leading dims of a linear input do not change the norm
        return sandwich(weight, (rec.input_shape[-1],), **sandwich_kwargs)
    if isinstance(module, _TRANSPOSED_TYPES):
        result = sandwich(weight, rec.output_shape, stride=module.stride, padding=module.padding,
                          dilation=module.dilation, groups=module.groups, **sandwich_kwargs)
        if tuple(result.layer["out_shape"]) != tuple(rec.input_shape):
            raise ValueError(f"{rec.name}: the adjoint conv of this {rec.kind} maps {rec.output_shape} to "
                             f"{tuple(result.layer['out_shape'])}, not to its input shape {rec.input_shape}; "
                             "its norm cannot be certified this way")
        return result
    return sandwich(weight, rec.input_shape, stride=module.stride, padding=module.padding,
                    padding_mode=module.padding_mode, dilation=module.dilation, groups=module.groups,
                    **sandwich_kwargs)


def _baseline(rec: LayerRecord, weight: torch.Tensor, upper: float, row: dict[str, Any]) -> None:
    """Random-matrix baseline columns of a row (a note instead when the weight cannot give one)."""
    module = rec.module
    try:
        if isinstance(module, nn.Linear):
            base = random_conv_norm_prediction(weight)
        else:
            size = rec.output_shape[1:] if isinstance(module, _TRANSPOSED_TYPES) else rec.input_shape[1:]
            base = random_conv_norm_prediction(weight, size, module.stride, module.groups)
    except ValueError as err:  # e.g. a single weight has no entry standard deviation
        row.update(random_baseline=None, random_baseline_guarantee=None, ratio_to_random=None)
        row["notes"].append(f"no random-matrix baseline: {err}")
        return
    row["random_baseline"] = base.value
    row["random_baseline_guarantee"] = base.guarantee.value
    row["ratio_to_random"] = random_norm_ratio(upper, base)


def _row(rec: LayerRecord, sandwich_kwargs: dict[str, Any], random_baseline: bool) -> dict[str, Any]:
    module = rec.module
    weight = rec.weight if rec.weight is not None else module.weight.detach()
    transposed = isinstance(module, _TRANSPOSED_TYPES)
    if rec.bn_scale is not None:
        weight = fold_batchnorm(weight, rec.bn_scale, transposed, getattr(module, "groups", 1))
    result = _sandwich_record(rec, weight, sandwich_kwargs)
    notes = list(rec.notes)
    if transposed:
        notes.append(f"{rec.kind}: the norm of its adjoint convolution (same weight) from the output shape "
                     "back to the input shape; a map and its adjoint have the same operator norm")
    row: dict[str, Any] = {
        "name": rec.name, "kind": rec.kind, "weight_shape": list(weight.shape), "dtype": str(weight.dtype),
        "input_shape": list(rec.input_shape), "output_shape": list(rec.output_shape),
        "input_size": _input_size(rec), **_layer_params(module), "folded_batchnorm": rec.folded_batchnorm,
        "lower": result.lower.value, "upper": result.upper.value, "gap": result.gap,
        "exact": result.exact.value if result.exact is not None else None,
        "lower_guarantee": result.lower.guarantee.value, "upper_guarantee": result.upper.guarantee.value,
        "lower_method": result.lower.method, "upper_method": result.upper.method,
        "methods": result.methods, "seconds": result.seconds, "notes": notes,
        "rtol": result.rtol, "converged": result.converged, "reason": result.reason,
        "suggestion": result.suggestion,
    }
    if result.probabilistic_upper is not None:
        row["probabilistic_upper"] = result.probabilistic_upper.value
        row["failure_probability"] = result.probabilistic_upper.details["failure_probability"]
    if random_baseline:
        _baseline(rec, weight, result.upper.value, row)
    return row


def _kwargs_record(sandwich_kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly record of the sandwich keywords (an options object as its fields, dtypes as strings)."""
    out = dict(sandwich_kwargs)
    options = out.pop("options", None)
    if options is not None:
        out = {**dataclasses.asdict(options), **out}
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in out.items()}


def not_analyzed(model: nn.Module, records: list[LayerRecord]) -> list[dict[str, str]]:
    """Modules holding a weight matrix/kernel (a parameter with >= 2 dims) that have no row: unsupported types,
    and supported layers never called as modules in the forward pass (e.g. used through their weight)."""
    from torch.nn.utils.parametrize import ParametrizationList

    seen = {id(r.module) for r in records}
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ParametrizationList) or id(m) in seen:
            continue
        weight = getattr(m, "weight", None)
        has_weight = (torch.is_tensor(weight) and weight.dim() >= 2) or \
            any(p.dim() >= 2 for p in m.parameters(recurse=False))
        if isinstance(m, _LAYER_TYPES):
            out.append({"name": name, "kind": type(m).__name__, "reason": "not called as a module in the forward pass"})
        elif has_weight:
            out.append({"name": name, "kind": type(m).__name__, "reason": "unsupported module type; analyze "
                        "supports Conv1d/Conv2d/Linear/ConvTranspose1d/ConvTranspose2d"})
    return out


def example_input_for(model: nn.Module, input_or_shape: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The example input of a shape given without the batch (one zero sample in the model's dtype and on its
    device), or the tensor itself when one is given (it carries the batch dimension)."""
    if torch.is_tensor(input_or_shape):
        return input_or_shape
    if isinstance(input_or_shape, (str, bytes)) or not isinstance(input_or_shape, Sequence) or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_or_shape):
        raise TypeError(f"expected an input shape without the batch, e.g. (3, 32, 32), or an example input tensor "
                        f"with the batch, got {input_or_shape!r}")
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros((1, *input_or_shape), dtype=dtype, device=device)


def analyze(
    model: nn.Module,
    input_shape: torch.Tensor | Sequence[int],
    *,
    progress: bool = True,
    random_baseline: bool = True,
    **sandwich_kwargs: Any,
) -> LayerTable:
    """Per-layer certified spectral norms of every conv/linear/transposed-conv layer of ``model``.

    ``input_shape`` excludes the batch, e.g. ``(3, 32, 32)`` (as in ``lipschitz.network_bound``); an example
    input tensor *with* the batch dimension is accepted too (one sample is enough). The forward pass runs in
    eval mode without gradients and the model is left as it was (modes, buffers). ``sandwich_kwargs`` go to
    ``spectral.sandwich`` (``rtol``, ``options=SandwichOptions(...)`` or any of its fields). Rows: name, kind, shapes,
    stride/padding/..., folded_batchnorm, lower, upper, gap, exact, guarantee labels, methods, seconds, notes,
    the random-matrix baseline (ESTIMATE) and ``ratio_to_random`` (upper / baseline). ``meta["not_analyzed"]``
    lists modules with weights that have no row (also warned about).

    References: Sedghi et al. (2019); Gordon (1985); Bandeira & van Handel (2016).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    example_input = example_input_for(model, input_shape)
    records = record_layers(model, example_input)
    with eval_mode(model), torch.no_grad():  # nothing below may step a parametrization or a hook
        rows = [_row(rec, sandwich_kwargs, random_baseline)
                for rec in tqdm(records, desc="layers", disable=not progress, leave=False)]
    skipped = not_analyzed(model, records)
    if skipped:
        shown = ", ".join(f"{s['name'] or '<root>'} ({s['kind']})" for s in skipped[:5])
        warnings.warn(f"analyze: {len(skipped)} module(s) with weights have no row: {shown}"
                      f"{' ...' if len(skipped) > 5 else ''}; see meta['not_analyzed']", stacklevel=2)
    meta = {
        "model": type(model).__name__, "input_shape": list(example_input.shape[1:]),
        "example_input_shape": list(example_input.shape),
        "layers": len(rows), "seconds": time.perf_counter() - t0, "torch": torch.__version__,
        "sandwich_kwargs": _kwargs_record(sandwich_kwargs),
        "max_gap": max((r["gap"] for r in rows), default=0.0), "evaluated_in_eval_mode": True,
        "model_was_training": bool(model.training), "not_analyzed": skipped,
        "not_converged": sum(not r["converged"] for r in rows),
    }
    return LayerTable(rows, meta)
