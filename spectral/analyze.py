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
import hashlib
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
from spectral.sandwich import Sandwich, SandwichOptions, sandwich

__all__ = ["LayerTable", "LayerRow", "LayerRecord", "SandwichKey", "analyze", "record_layers", "fold_batchnorm",
           "eval_mode", "example_input_for", "sandwich_call", "sandwich_key"]

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


@dataclass(frozen=True)
class SandwichKey:
    """What a layer's sandwich was computed for: the weight (a digest of its values in float64), the input shape and
    conv parameters of the call, ``rtol`` and the resolved ``SandwichOptions``. A result is reused only for an equal
    key (``lipschitz.network_bound(..., layer_results=)``)."""

    weight: str
    input_shape: tuple[int, ...]
    conv: tuple
    rtol: float
    options: SandwichOptions


def sandwich_call(module: nn.Module, input_shape: Sequence[int]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The input shape and conv keywords with which ``sandwich`` bounds a Conv1d/Conv2d/Linear ``module`` at the
    input shape it sees (leading dims of a linear layer's input do not change its norm)."""
    if isinstance(module, nn.Linear):
        return (int(input_shape[-1]),), {}
    return tuple(int(s) for s in input_shape), {"stride": module.stride, "padding": module.padding,
                                                 "padding_mode": module.padding_mode, "dilation": module.dilation,
                                                 "groups": module.groups}


def resolved_options(knobs: dict[str, Any]) -> SandwichOptions:
    """The ``SandwichOptions`` that ``sandwich(..., **knobs)`` runs with (``options=`` updated by the other knobs)."""
    rest = {k: v for k, v in knobs.items() if k not in ("options", "rtol")}
    return (knobs.get("options") or SandwichOptions()).updated(**rest)


def sandwich_key(weight: torch.Tensor, input_shape: Sequence[int], conv: dict[str, Any], rtol: float,
                 knobs: dict[str, Any]) -> SandwichKey:
    """The ``SandwichKey`` of ``sandwich(weight, input_shape, rtol, **conv, **knobs)``."""
    w = weight.detach().to(device="cpu", dtype=torch.float64).contiguous()
    digest = hashlib.blake2b(repr(tuple(w.shape)).encode(), digest_size=16)
    digest.update(w.numpy().tobytes())
    return SandwichKey(digest.hexdigest(), tuple(int(s) for s in input_shape), tuple(sorted(conv.items())),
                       float(rtol), resolved_options(knobs))


@dataclass
class LayerRow:
    """One conv/linear layer's certified sandwich at the input shape it sees, with the facts around it.

    The row type of ``analyze``'s table (``to_dict``: its JSON/CSV row) and of ``lipschitz.network_bound``'s layers
    (``bound_dict``: the raw layer's bounds and, there, ``folded_*`` of the layer with its channel scalings folded
    in). ``result`` and ``key`` (not serialised) are the ``Sandwich`` itself and what it was computed for; rows read
    like the dicts they replace (``row["upper"]``, ``row.get("gap")``).
    """

    name: str
    kind: str
    weight_shape: list[int]
    input_shape: list[int]
    output_shape: list[int]
    dtype: str | None = None
    input_size: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # stride, padding, padding_mode, dilation, groups, ...
    folded_batchnorm: str | None = None
    lower: float | None = None
    upper: float | None = None
    gap: float | None = None
    exact: float | None = None
    lower_guarantee: str | None = None
    upper_guarantee: str | None = None
    lower_method: str | None = None
    upper_method: str | None = None
    methods: list[dict[str, str]] = field(default_factory=list)
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    rtol: float | None = None
    converged: bool | None = None
    reason: str | None = None
    suggestion: str | None = None
    probabilistic_upper: float | None = None
    failure_probability: float | None = None
    baselined: bool = False  # the random-matrix baseline columns were computed (values may be None)
    random_baseline: float | None = None
    random_baseline_guarantee: str | None = None
    ratio_to_random: float | None = None
    folded_upper: float | None = None
    folded_guarantee: str | None = None
    folded_lower: float | None = None
    result: Sandwich | None = field(default=None, repr=False, compare=False)
    key: SandwichKey | None = field(default=None, repr=False, compare=False)

    def set_sandwich(self, result: Sandwich, key: SandwichKey | None = None) -> "LayerRow":
        """Fill the sandwich columns from ``result`` (``key``: what it was computed for, when it may be reused)."""
        self.lower, self.upper, self.gap = result.lower.value, result.upper.value, result.gap
        self.exact = result.exact.value if result.exact is not None else None
        self.lower_guarantee, self.upper_guarantee = result.lower.guarantee.value, result.upper.guarantee.value
        self.lower_method, self.upper_method = result.lower.method, result.upper.method
        self.methods, self.seconds, self.rtol = result.methods, result.seconds, result.rtol
        self.converged, self.reason, self.suggestion = result.converged, result.reason, result.suggestion
        if result.probabilistic_upper is not None:
            self.probabilistic_upper = result.probabilistic_upper.value
            self.failure_probability = result.probabilistic_upper.details["failure_probability"]
        self.result, self.key = result, key
        return self

    def to_dict(self) -> dict[str, Any]:
        """The row of ``analyze``'s JSON/CSV table."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "weight_shape": self.weight_shape, "dtype": self.dtype,
            "input_shape": self.input_shape, "output_shape": self.output_shape, "input_size": self.input_size,
            **self.params, "folded_batchnorm": self.folded_batchnorm, "lower": self.lower, "upper": self.upper,
            "gap": self.gap, "exact": self.exact, "lower_guarantee": self.lower_guarantee,
            "upper_guarantee": self.upper_guarantee, "lower_method": self.lower_method,
            "upper_method": self.upper_method, "methods": self.methods, "seconds": self.seconds, "notes": self.notes,
            "rtol": self.rtol, "converged": self.converged, "reason": self.reason, "suggestion": self.suggestion,
        }
        if self.probabilistic_upper is not None:
            out.update(probabilistic_upper=self.probabilistic_upper, failure_probability=self.failure_probability)
        if self.baselined:
            out.update(random_baseline=self.random_baseline, random_baseline_guarantee=self.random_baseline_guarantee,
                       ratio_to_random=self.ratio_to_random)
        return {**out, **self._folded()}

    def bound_dict(self) -> dict[str, Any]:
        """The row of ``lipschitz.network_bound``'s layers: the raw layer's bounds (when computed) and ``folded_*``."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "weight_shape": self.weight_shape,
                               "in_shape": self.input_shape, "out_shape": self.output_shape}
        if self.upper is not None:
            out.update(upper=self.upper, upper_guarantee=self.upper_guarantee, upper_method=self.upper_method,
                       lower=self.lower, lower_guarantee=self.lower_guarantee, gap=self.gap)
        return {**out, **self._folded()}

    def _folded(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.folded_upper is not None:
            out.update(folded_upper=self.folded_upper, folded_guarantee=self.folded_guarantee)
        if self.folded_lower is not None:
            out["folded_lower"] = self.folded_lower
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()


@dataclass
class LayerTable:
    """Rows of per-layer results (``LayerRow``); export with ``to_json`` / ``to_csv``."""

    rows: list[LayerRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __getitem__(self, name_or_index: str | int) -> LayerRow:
        if isinstance(name_or_index, int):
            return self.rows[name_or_index]
        for row in self.rows:
            if row.name == name_or_index:
                return row
        raise KeyError(f"no layer named {name_or_index!r}; layers: {', '.join(r.name for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [row.to_dict() for row in self.rows]}

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
                cells = row.to_dict()
                writer.writerow({k: _csv_cell(cells.get(k)) for k in CSV_COLUMNS})
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
    if isinstance(module, _TRANSPOSED_TYPES):
        result = sandwich(weight, rec.output_shape, stride=module.stride, padding=module.padding,
                          dilation=module.dilation, groups=module.groups, **sandwich_kwargs)
        if tuple(result.layer["out_shape"]) != tuple(rec.input_shape):
            raise ValueError(f"{rec.name}: the adjoint conv of this {rec.kind} maps {rec.output_shape} to "
                             f"{tuple(result.layer['out_shape'])}, not to its input shape {rec.input_shape}; "
                             "its norm cannot be certified this way")
        return result
    shape, conv = sandwich_call(module, rec.input_shape)
    return sandwich(weight, shape, **conv, **sandwich_kwargs)


def _baseline(rec: LayerRecord, weight: torch.Tensor, upper: float, row: LayerRow) -> None:
    """Random-matrix baseline columns of a row (a note instead when the weight cannot give one)."""
    module = rec.module
    row.baselined = True
    try:
        if isinstance(module, nn.Linear):
            base = random_conv_norm_prediction(weight)
        else:
            size = rec.output_shape[1:] if isinstance(module, _TRANSPOSED_TYPES) else rec.input_shape[1:]
            base = random_conv_norm_prediction(weight, size, module.stride, module.groups)
    except ValueError as err:  # e.g. a single weight has no entry standard deviation
        row.notes.append(f"no random-matrix baseline: {err}")
        return
    row.random_baseline = base.value
    row.random_baseline_guarantee = base.guarantee.value
    row.ratio_to_random = random_norm_ratio(upper, base)


def _row(rec: LayerRecord, sandwich_kwargs: dict[str, Any], random_baseline: bool) -> LayerRow:
    module = rec.module
    raw = rec.weight if rec.weight is not None else module.weight.detach()
    transposed = isinstance(module, _TRANSPOSED_TYPES)
    weight = raw
    if rec.bn_scale is not None:
        weight = fold_batchnorm(raw, rec.bn_scale, transposed, getattr(module, "groups", 1))
    result = _sandwich_record(rec, weight, sandwich_kwargs)
    notes = list(rec.notes)
    if transposed:
        notes.append(f"{rec.kind}: the norm of its adjoint convolution (same weight) from the output shape "
                     "back to the input shape; a map and its adjoint have the same operator norm")
    key = None
    if not transposed and rec.bn_scale is None:  # the raw layer's sandwich: what network_bound may reuse
        shape, conv = sandwich_call(module, rec.input_shape)
        key = sandwich_key(raw, shape, conv, result.rtol, sandwich_kwargs)
    row = LayerRow(rec.name, rec.kind, list(weight.shape), list(rec.input_shape), list(rec.output_shape),
                   dtype=str(weight.dtype), input_size=_input_size(rec), params=_layer_params(module),
                   folded_batchnorm=rec.folded_batchnorm, notes=notes).set_sandwich(result, key)
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
        "max_gap": max((r.gap for r in rows), default=0.0), "evaluated_in_eval_mode": True,
        "model_was_training": bool(model.training), "not_analyzed": skipped,
        "not_converged": sum(not r.converged for r in rows),
    }
    return LayerTable(rows, meta)
