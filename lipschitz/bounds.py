"""Certified l2 Lipschitz upper bounds of whole networks, composed over a ``lipschitz.graph`` tree.

``network_bound(model_or_graph, input_shape, method=...)`` evaluates the eval-mode network:

- "product": every node separately: layer norms (certified upper bounds from ``spectral.sandwich`` at the
  layer's real input shape), batch norm max|scale|, activation slopes, pooling/normalisation constants;
  sequential product, residual ``L(shortcut) + L(branch)`` (identity shortcut: 1).
- "folded": channel scalings are folded into the neighbouring conv/linear layer: a batch norm after a conv
  into its output channels; a batch norm before an activation before a conv (pre-activation) as |scale|
  into the next conv's input channels (sigma(d z + c) = |d| psi(z) with psi as Lipschitz as sigma); input
  normalisation into the first layer. Linear chains without nonlinearity are composed exactly when small.
- "folded+liplt": additionally bounds each conv-activation-conv piece by LipLT,
  ``||B + a A2 A1|| + b ||A2|| ||A1||`` (sigma = a z + b |z|), merging a shortcut B that sees the same input.
- "lipsdp": the smaller of "folded+liplt" and LipSDP-Neuron of the whole node (any residual graph) by chain
  elimination on dense matrices (``lipschitz.sdp``), or of greedy windows of consecutive children where the
  node is too large; verified a posteriori by Cholesky (``sdp_options`` sets the limits and the optimiser).

Every rule is proved in docs/network-bounds.md. An unsupported node or module raises a ValueError naming it.
References: Fazlyab et al. 2023 (LipLT); Sedghi et al. 2019; Gouk et al. 2021 (layer-wise products); Fazlyab et
al. 2019 (LipSDP); Xu & Sivaranjani 2024 (ECLipsE).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import lipschitz.graph as G
from lipschitz.graph import interpret  # noqa: F401  (public here too: lipschitz.bounds.interpret)
from lipschitz.liplt import conv_spec, fold_weight, liplt_bound
from lipschitz.rules import (absolute_value_split, activation_slope, batchnorm_scale, normalize_scale, pool_is_linear,
                             pool_lipschitz)
from lipschitz.trace import graph_from_module
from spectral.analyze import LayerRow, SandwichKey, sandwich_call, sandwich_key
from spectral.guarantee import Guarantee, NormValue, json_safe

METHODS = ("product", "folded", "folded+liplt", "lipsdp")
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _modules_of(node: G.Node) -> list[nn.Module]:
    return [n.module for n in G.iter_nodes(node) if isinstance(n, (G.Layer, G.BatchNorm, G.Pool, G.Leaf))]


# ------------------------------------------------------------------------------------- results



def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class NetworkBound:
    """Certified l2 Lipschitz bounds of a network and of its layers, blocks and stages.

    ``value``: the whole network under ``method`` (guarantee UPPER, or EXACT for a single exact linear map).
    ``comparison``: whole-network value per evaluated method. ``layers``: one ``spectral.analyze.LayerRow`` per
    conv/linear layer (certified upper/lower of the raw layer, folded upper). ``nodes``: every named composite node
    (blocks, stages, stem, head ...) with its bound per method.
    """

    value: NormValue
    method: str
    input_shape: tuple
    comparison: dict[str, float]
    layers: list[LayerRow] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n.get("role") == "block"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n.get("role") == "stage"]

    def certified_methods(self) -> dict[str, float]:
        """{method: whole-network bound} of every evaluated method with a finite value (all certified upper)."""
        return {k: float(v) for k, v in self.comparison.items() if _finite_number(v)}

    @property
    def tightest(self) -> float | None:
        """The smallest certified upper bound of the whole network over ``comparison`` and ``value`` (every one
        of them is certified, so the smallest is as valid as each); None when none is finite."""
        values = list(self.certified_methods().values())
        if _finite_number(self.value.value):
            values.append(float(self.value.value))
        return min(values) if values else None

    def stage_bounds(self) -> dict[str, float | None]:
        """{stage name: the tightest certified bound of that stage alone over the evaluated methods}."""
        return self._role_bounds("stage")

    def block_bounds(self) -> dict[str, float | None]:
        """{block name: the tightest certified bound of that block alone over the evaluated methods}."""
        return self._role_bounds("block")

    def _role_bounds(self, role: str) -> dict[str, float | None]:
        methods = self.certified_methods()
        out: dict[str, float | None] = {}
        for node in self.nodes:
            if node.get("role") == role:
                values = [float(node[m]) for m in methods if _finite_number(node.get(m))]
                out[str(node.get("name"))] = min(values) if values else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"value": self.value.to_dict(), "method": self.method, "input_shape": list(self.input_shape),
                           "comparison": self.comparison, "layers": [r.bound_dict() for r in self.layers],
                           "nodes": self.nodes, "seconds": self.seconds, "notes": self.notes})

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


# -------------------------------------------------------------------------------------- engine

# relative round-off of a float64 channel scale gamma / sqrt(var + eps) (4 operations, 2^-53 each, with room)
DIAG_ROUNDOFF = 2.0**-49


def _diag_norm(d: torch.Tensor) -> float:
    """max|d| of a float64 channel scaling, rounded up by its own float64 round-off (``DIAG_ROUNDOFF``)."""
    return float(d.abs().max()) * (1.0 + DIAG_ROUNDOFF)


def _mul_up(*factors: float) -> float:
    """Product of non-negative bounds, each float64 multiplication rounded one ulp up (factors 1 are exact)."""
    out = 1.0
    for f in factors:
        if f != 1.0:
            out = math.nextafter(out * f, math.inf) if out != 1.0 else f
    return out


@dataclass
class _Seg:
    """An open linear segment: ops are ("diag", scale), ("layer", node), ("pool", node), ("flatten", node)."""

    ops: list = field(default_factory=list)

    def layers(self) -> list:
        return [o for o in self.ops if o[0] == "layer"]


@dataclass
class _Factor:
    kind: str  # "seg", "act", "value"
    value: float
    exact: bool
    info: dict = field(default_factory=dict)


class _Engine:
    def __init__(self, shapes: dict, method: str, rtol: float, dense_max_entries: int, sandwich_kw: dict,
                 layer_rows: dict, cache: dict):
        self.shapes, self.method, self.rtol = shapes, method, rtol
        self.dense_max_entries, self.sandwich_kw = dense_max_entries, sandwich_kw
        self.layer_rows, self.cache = layer_rows, cache
        self.node_values: dict[int, tuple[float, bool]] = {}  # id(node) -> (bound of the node alone, exact?)
        self.record_nodes = True

    # ---------------------------------------------------------------- layer norms
    def layer_norm(self, node: G.Layer, in_scale=None, out_scale=None) -> NormValue:
        key = (id(node), None if in_scale is None else tuple(in_scale.tolist()),
               None if out_scale is None else tuple(out_scale.tolist()))
        if key in self.cache:
            return self.cache[key]
        m = node.module
        in_shape = self.shapes[id(node)][0]
        row = self.layer_rows[id(node)]
        if isinstance(m, nn.Linear) and len(in_shape) != 1 and (in_scale is not None or out_scale is not None):
            # on an (L, F) input a channel scaling (BatchNorm1d) acts on dim 0, not on the weight's features:
            # no folding, ||D2 (W acting on rows) D1|| <= max|D2| ||W|| max|D1|
            base = self.layer_norm(node)
            factor = 1.0
            for sc in (in_scale, out_scale):
                if sc is not None:
                    factor = _mul_up(factor, _diag_norm(sc))
            nv = NormValue(_mul_up(base.value, factor), Guarantee.UPPER, base.method, details={"unfolded_scales": True})
            self.cache[key] = nv
            row.folded_upper, row.folded_guarantee = nv.value, nv.guarantee.value
            return nv
        if in_scale is None and out_scale is None:
            self._raw_sandwich(node, row)
            self.cache[key] = row.result.upper
            return row.result.upper
        from spectral.sandwich import sandwich

        shape, conv = sandwich_call(m, in_shape)
        sw = sandwich(fold_weight(m, in_scale, out_scale), shape, self.rtol, **conv, **self.sandwich_kw)
        self.cache[key] = sw.upper
        row.folded_upper, row.folded_guarantee = sw.upper.value, sw.upper.guarantee.value
        row.folded_lower = sw.lower.value
        return sw.upper

    def _raw_sandwich(self, node: G.Layer, row: LayerRow) -> None:
        """The raw layer's sandwich into ``row``: the caller's ``layer_results`` row computed for the same key (weights,
        input shape, conv parameters, rtol, options) when there is one, else a fresh ``spectral.sandwich``."""
        from spectral.sandwich import sandwich

        shape, conv = sandwich_call(node.module, self.shapes[id(node)][0])
        w = fold_weight(node.module, None, None)
        given = self.cache.get("layer_results")
        key = sandwich_key(w, shape, conv, self.rtol, self.sandwich_kw) if given else None
        found = _reusable(given, node.name, key, self.cache) if given else None
        result = found.result if found is not None else sandwich(w, shape, self.rtol, **conv, **self.sandwich_kw)
        row.set_sandwich(result, key)

    # ---------------------------------------------------------------- segments
    def close(self, seg: _Seg) -> _Factor | None:
        """Norm bound of a linear segment with every diag folded into a layer where possible."""
        if not seg.ops:
            return None
        layers = seg.layers()
        consts, exact = 1.0, True
        for op in seg.ops:
            if op[0] == "pool":
                nv = pool_lipschitz(op[1].module, self.shapes[id(op[1])][0])
                consts *= nv.value
        if not layers:
            d = self._diag_product(seg.ops)
            v = _diag_norm(d) if d is not None else 1.0
            return _Factor("value", _mul_up(v, consts), True, {"diag_only": True})
        if len(layers) >= 2:
            dense = self._dense_segment(seg)
            if dense is not None:
                return _Factor("seg", dense, True, {"dense": True})
        value, info = 1.0, {}
        pending = None  # diag (vector over current channel axis) waiting for the next layer
        last_layer, out_scale = None, None
        flattened_after_layer = False
        for op in seg.ops:
            if op[0] == "diag":
                if last_layer is not None and not flattened_after_layer:
                    out_scale = op[1] if out_scale is None else out_scale * op[1]
                else:
                    pending = op[1] if pending is None else pending * op[1]
            elif op[0] == "flatten":
                if pending is not None:
                    pending = self._flatten_diag(pending, op[1])
                if last_layer is not None:
                    flattened_after_layer = True
            elif op[0] == "layer":
                if last_layer is not None:
                    nv = self.layer_norm(last_layer, info.pop("in_scale", None), out_scale)
                    value = _mul_up(value, nv.value)
                    exact = False
                last_layer, out_scale, flattened_after_layer = op[1], None, False
                info["in_scale"] = pending
                pending = None
        nv = self.layer_norm(last_layer, info.pop("in_scale", None), out_scale)
        value = _mul_up(value, nv.value)
        if pending is not None:  # a diag after a flatten that followed the last layer
            value = _mul_up(value, _diag_norm(pending))
            exact = False
        spec_info = {}
        if len(layers) == 1 and consts == 1.0 and not any(o[0] in ("pool", "flatten") for o in seg.ops):
            spec_info = self._single_layer_info(seg)
        # a pool of norm 1 beside a layer is not exact either (||W P|| < ||W|| unless P is a co-isometry)
        exact = exact and nv.guarantee is Guarantee.EXACT and not any(o[0] == "pool" for o in seg.ops)
        return _Factor("seg", _mul_up(value, consts), exact and len(layers) == 1, spec_info)

    def _single_layer_info(self, seg: _Seg) -> dict:
        in_scale = out_scale = None
        seen = False
        for op in seg.ops:
            if op[0] == "diag":
                if seen:
                    out_scale = op[1] if out_scale is None else out_scale * op[1]
                else:
                    in_scale = op[1] if in_scale is None else in_scale * op[1]
            elif op[0] == "layer":
                seen, node = True, op[1]
        return {"layer": node, "in_scale": in_scale, "out_scale": out_scale}

    def _diag_product(self, ops) -> torch.Tensor | None:
        d = None
        for op in ops:
            if op[0] == "diag":
                d = op[1] if d is None else d * op[1]
            elif op[0] == "flatten" and d is not None:
                d = self._flatten_diag(d, op[1])
        return d

    def _flatten_diag(self, d: torch.Tensor, node: G.Flatten) -> torch.Tensor:
        in_shape = self.shapes[id(node)][0]
        return d.repeat_interleave(math.prod(in_shape[1:])) if len(in_shape) > 1 else d

    def _dense_segment(self, seg: _Seg) -> float | None:
        """Exact norm of a segment of layers, diags and reshapes by dense SVD (None if too large or has pools)."""
        from lipschitz.liplt import dense_norm
        from spectral.operators import ChannelScale, LayerOperator, Reshape, compose

        if any(op[0] == "pool" for op in seg.ops):
            return None
        maps: list = []
        for op in seg.ops:
            if op[0] == "diag":
                maps.append(op[1].to(torch.float64))
                continue
            node = op[1]
            shape_in, shape_out = self.shapes[id(node)]
            if op[0] == "flatten":
                maps.append(Reshape(shape_in, shape_out, dtype=torch.float64))
                continue
            m = node.module
            w = m.weight.detach().to(torch.float64)
            maps.append(LayerOperator.linear(w, shape_in) if isinstance(m, nn.Linear) else
                        LayerOperator.conv(w, shape_in, m.stride, m.padding, m.dilation, m.groups, m.padding_mode))
        real = [m for m in maps if not isinstance(m, torch.Tensor)]
        n_in, n_out = math.prod(real[0].in_shape), math.prod(real[-1].out_shape)
        if n_in * n_out > self.dense_max_entries:
            return None
        out, prev_shape = [], None
        for i, mp in enumerate(maps):
            if isinstance(mp, torch.Tensor):
                nxt = next((m for m in maps[i + 1:] if not isinstance(m, torch.Tensor)), None)
                shape = tuple(nxt.in_shape) if nxt is not None else prev_shape
                out.append(ChannelScale(shape, mp))
            else:
                out.append(mp)
                prev_shape = tuple(mp.out_shape)
        return dense_norm(compose(*out), max_entries=self.dense_max_entries)

    # ---------------------------------------------------------------- composition
    def evaluate(self, node: G.Node, pending: torch.Tensor | None = None) -> tuple[float, bool, torch.Tensor | None]:
        """(bound, exact?, pending diag handed out) of ``node`` applied after diag(pending)."""
        if isinstance(node, G.Sequential):
            children = node.children
        else:
            children = [node]
        value, exact, out = self._sequence(children, pending)
        if isinstance(node, (G.Sequential, G.Residual)):
            self._record(node, value, exact, out, pending)
        return value, exact, out

    def _record(self, node: G.Node, value: float, exact: bool, out: torch.Tensor | None,
                pending: torch.Tensor | None) -> None:
        """Store the bound of ``node``'s own sub-map (see docs/network-bounds.md, "Node values").

        An evaluation that saw no preceding diag is the node's own bound (times the diag it hands out, which
        belongs to the node); one that folded a preceding channel scaling bounds ``node o D`` instead, so the
        node is evaluated once more on its own. The network value keeps the folded chain.
        """
        if not self.record_nodes:
            return
        if pending is None:
            self.node_values[id(node)] = (_mul_up(value, _diag_norm(out)) if out is not None else value,
                                          exact and out is None)
        elif id(node) not in self.node_values:
            self.evaluate(node)

    def _sequence(self, children: Sequence[G.Node], pending: torch.Tensor | None):
        factors, pending_out = self._factors(children, pending)
        return self._combine(factors) + (pending_out,)

    def _factors(self, children: Sequence[G.Node], pending: torch.Tensor | None):
        """The list of multiplicative factors of a child sequence, and the diag it hands out."""
        walk = _FactorWalk(self, pending)
        for child in children:
            walk.visit(child)
        return walk.factors, walk.finish()

    def _combine(self, factors: list[_Factor]) -> tuple[float, bool]:
        if self.method == "folded+liplt":
            factors = self._pair_liplt(factors)
        value = _mul_up(*(f.value for f in factors))
        # exact only for a single exact factor (besides identity activations): a nonlinear or norm-1 factor
        # next to a layer does not keep the product exact, x -> relu(Wx), maxpool(Wx) or W relu(d relu(x) + c)
        # can be less than ||W||-Lipschitz
        nontrivial = [f for f in factors
                      if not (f.kind == "act" and f.exact and f.value == 1.0 and f.info.get("kind") == "identity")]
        exact = len(nontrivial) <= 1 and all(f.exact for f in nontrivial)
        return value, exact

    def _pair_liplt(self, factors: list[_Factor]) -> list[_Factor]:
        out, i = [], 0
        while i < len(factors):
            if i + 2 < len(factors):
                lip = self._liplt(factors[i], factors[i + 1], factors[i + 2], None)
                if lip is not None and lip < factors[i].value * factors[i + 1].value * factors[i + 2].value:
                    out.append(_Factor("value", lip, False, {"liplt": True}))
                    i += 3
                    continue
            out.append(factors[i])
            i += 1
        return out

    def _liplt(self, f1: _Factor, act: _Factor, f2: _Factor, shortcut) -> float | None:
        if f1.kind != "seg" or act.kind != "act" or f2.kind != "seg":
            return None
        if "layer" not in f1.info or "layer" not in f2.info:
            return None
        split = absolute_value_split(act.info["kind"], act.info["params"])
        if split is None:
            return None
        n1, n2 = f1.info["layer"], f2.info["layer"]
        in_shape = self.shapes[id(n1)][0]
        try:
            s1 = conv_spec(n1.module, in_shape, f1.info["in_scale"], f1.info["out_scale"])
            s2 = conv_spec(n2.module, self.shapes[id(n2)][0], f2.info["in_scale"], f2.info["out_scale"])
            sc = shortcut
            if isinstance(shortcut, _Factor):
                n3 = shortcut.info["layer"]
                sc = conv_spec(n3.module, self.shapes[id(n3)][0], shortcut.info["in_scale"], shortcut.info["out_scale"])
            nv = liplt_bound(s1, s2, split, f1.value, f2.value, in_shape, sc, self.dense_max_entries,
                             cache=self.cache.setdefault("circular_norms", {}))
        except ValueError:
            return None
        return nv.value

    def _residual(self, node: G.Residual, pending: torch.Tensor | None) -> tuple[float, bool]:
        vb, exb, outb = self.evaluate(node.branch, pending)
        vb = _mul_up(vb, _diag_norm(outb)) if outb is not None else vb
        if node.shortcut is None:
            vs, exs = (_diag_norm(pending) if pending is not None else 1.0), True
        else:
            vs, exs, outs = self.evaluate(node.shortcut, pending)
            vs = _mul_up(vs, _diag_norm(outs)) if outs is not None else vs
        value = math.nextafter(vs + vb, math.inf)  # the float64 sum rounded up
        if self.method == "folded+liplt":
            merged = self._merged_residual(node, pending)
            if merged is not None and merged < value:
                return merged, False
        return value, False

    def _concat(self, node: G.Concat, pending: torch.Tensor | None) -> tuple[float, bool]:
        """cat(p_1(x), ..., p_k(x)): ||y - y'||^2 = sum_i ||p_i(x) - p_i(x')||^2, so L <= sqrt(sum L_i^2)."""
        total = 0.0
        for part in node.parts:
            v, _, out = self.evaluate(part, pending)
            v = _mul_up(v, _diag_norm(out)) if out is not None else v
            total = math.nextafter(total + _mul_up(v, v), math.inf)  # float64 sum of squares rounded up
        return math.nextafter(math.sqrt(total), math.inf), False

    def _merged_residual(self, node: G.Residual, pending) -> float | None:
        """||B + a A2 A1|| + b ||A2|| ||A1|| when the branch is exactly conv-act-conv and B sees the same input."""
        children = node.branch.children if isinstance(node.branch, G.Sequential) else [node.branch]
        saved, saved_record = self.method, self.record_nodes
        self.method, self.record_nodes = "folded", False  # collect the factors without pairing or recording
        try:
            factors, _ = self._factors(children, pending)
            if node.shortcut is None:
                if pending is not None:
                    return None
                sc = "identity"
            else:
                sc_children = node.shortcut.children if isinstance(node.shortcut, G.Sequential) else [node.shortcut]
                sc_factors, _ = self._factors(sc_children, pending)
                if len(sc_factors) != 1 or sc_factors[0].kind != "seg" or "layer" not in sc_factors[0].info:
                    return None
                sc = sc_factors[0]
        finally:
            self.method, self.record_nodes = saved, saved_record
        if len(factors) != 3:
            return None
        return self._liplt(factors[0], factors[1], factors[2], sc)


class _FactorWalk:
    """One pass of ``_Engine._factors`` over a child sequence: the factors found so far and the open linear
    segment (channel scalings, layers, linear pools, flattens) that folding may still merge."""

    def __init__(self, engine: _Engine, pending: torch.Tensor | None) -> None:
        self.eng = engine
        self.folding = engine.method != "product"
        self.factors: list[_Factor] = []
        self.seg = _Seg([("diag", pending)] if pending is not None else [])

    def flush(self) -> None:
        f = self.eng.close(self.seg)
        if f is not None:
            self.factors.append(f)
        self.seg = _Seg()

    def pure_diag(self) -> bool:
        return not self.seg.layers()

    def pool_factor(self, node: G.Pool) -> _Factor:
        return _Factor("value", pool_lipschitz(node.module, self.eng.shapes[id(node)][0]).value, True)

    def visit(self, child: G.Node) -> None:
        if isinstance(child, G.Layer):
            self.layer(child)
        elif isinstance(child, (G.BatchNorm, G.Normalize)):
            d = (batchnorm_scale(child.module) if isinstance(child, G.BatchNorm)
                 else normalize_scale(child.std)).to(torch.float64)
            if not self.folding:
                self.factors.append(_Factor("value", _diag_norm(d), True))
            else:
                self.seg.ops.append(("diag", d))
        elif isinstance(child, G.Activation):
            self.activation(child)
        elif isinstance(child, G.Pool):
            self.pool(child)
        elif isinstance(child, G.Flatten):
            if self.folding:
                self.seg.ops.append(("flatten", child))
        elif isinstance(child, G.Identity):
            return
        elif isinstance(child, G.Leaf):  # opaque: a registered constant, nothing folds through it
            self.flush()
            self.factors.append(_Factor("value", child.constant(self.eng.shapes[id(child)][0]), False))
        elif isinstance(child, (G.Sequential, G.Residual, G.Concat)):
            self.subgraph(child)
        else:
            raise ValueError(f"unsupported graph node {type(child).__name__} ({getattr(child, 'name', '')!r})")

    def layer(self, child: G.Layer) -> None:
        if not isinstance(child.module, _LAYER_TYPES):
            raise ValueError(f"Layer {child.name!r}: unsupported module {type(child.module).__name__}; "
                             "supported: Conv1d, Conv2d, Linear")
        if not self.folding:
            nv = self.eng.layer_norm(child)
            self.factors.append(_Factor("value", nv.value, nv.guarantee is Guarantee.EXACT))
        else:
            self.seg.ops.append(("layer", child))

    def activation(self, child: G.Activation) -> None:
        slope = activation_slope(child.kind, child.params)
        if self.folding and self.pure_diag():
            d = self.eng._diag_product(self.seg.ops)
            for op in self.seg.ops:
                if op[0] == "pool":
                    self.factors.append(self.pool_factor(op[1]))
            self.seg = _Seg([("diag", d.abs())] if d is not None else [])
        else:
            self.flush()
        self.factors.append(_Factor("act", slope.value, slope.guarantee is Guarantee.EXACT and slope.value == 1.0,
                                    {"kind": child.kind, "params": child.params}))

    def pool(self, child: G.Pool) -> None:
        if not self.folding:
            self.factors.append(self.pool_factor(child))
        elif pool_is_linear(child.module):
            self.seg.ops.append(("pool", child))
        else:  # max pool commutes with non-negative channel scalings only
            d = self.eng._diag_product(self.seg.ops) if self.pure_diag() else None
            if not (self.pure_diag() and (d is None or bool((d >= 0).all()))
                    and not any(o[0] == "pool" for o in self.seg.ops)):
                self.flush()
            self.factors.append(self.pool_factor(child))

    def pushable(self) -> bool:
        """Only channel scalings are open: they can be handed on to the next node (not through a pool/flatten)."""
        return self.folding and self.pure_diag() and not any(o[0] in ("pool", "flatten") for o in self.seg.ops)

    def subgraph(self, child: G.Node) -> None:
        push = None
        if self.pushable():
            push = self.eng._diag_product(self.seg.ops)
            self.seg = _Seg()
        else:
            self.flush()
        if isinstance(child, (G.Residual, G.Concat)):
            v, ex = self.eng._residual(child, push) if isinstance(child, G.Residual) else self.eng._concat(child, push)
            self.factors.append(_Factor("value", v, ex))
            self.eng._record(child, v, ex, None, push)
        else:
            v, ex, out = self.eng.evaluate(child, push)
            self.factors.append(_Factor("value", v, ex))
            if out is not None:
                self.seg = _Seg([("diag", out)])

    def finish(self) -> torch.Tensor | None:
        """The diag handed out of the sequence (None when the open segment was closed into a factor)."""
        if self.pushable() and self.seg.ops:
            return self.eng._diag_product(self.seg.ops)
        self.flush()
        return None


# ----------------------------------------------------------------------------------------- API

def _given_rows(layer_results: Any) -> dict[str, list[LayerRow]]:
    """{layer name: rows that may be reused} of a ``LayerTable`` or rows: the raw-layer rows computed in this process
    (a row with a ``key``; BN-folded and transposed rows are other operators and rows read from JSON cannot be
    checked); a repeated call ``name#2`` is filed under ``name``."""
    out: dict[str, list[LayerRow]] = {}
    for row in getattr(layer_results, "rows", layer_results):
        if not isinstance(row, LayerRow):
            raise TypeError(f"layer_results must be a spectral.analyze.LayerTable or LayerRows, got "
                            f"{type(row).__name__}")
        if row.key is not None and row.result is not None:
            out.setdefault(row.name.split("#")[0], []).append(row)
    return out


def _reusable(given: dict[str, list[LayerRow]], name: str, key: SandwichKey, cache: dict) -> LayerRow | None:
    """The given row of layer ``name`` computed for ``key``; None (and the name noted) when rows of that layer were
    computed for other weights, input shape, rtol or options: never reuse numbers of another operator or setting."""
    rows = given.get(name, [])
    for row in rows:
        if row.key == key:
            return row
    if rows:
        cache.setdefault("layer_results_recomputed", []).append(name)
    return None


def _lipsdp_pass(root, shapes, folded_nodes, folded_result, options, engine_args: tuple):
    """The "lipsdp" method: every node's folded+liplt value or its LipSDP chain bound, whichever is smaller.

    ``engine_args``: (rtol, dense_max_entries, sandwich kwargs, layer rows, cache) of the folded+liplt engine."""
    from lipschitz.sdp import SdpComposer

    def own(node):
        if id(node) in folded_nodes:
            return folded_nodes[id(node)]
        if node is root:
            return folded_result
        rtol, dense_max_entries, sw_kw, layer_rows, cache = engine_args
        eng = _Engine(shapes, "folded+liplt", rtol, dense_max_entries, sw_kw, layer_rows, cache)
        eng.record_nodes = False
        v, exact, out = eng.evaluate(node)
        return (_mul_up(v, _diag_norm(out)), False) if out is not None else (v, exact)

    comp = SdpComposer(shapes, own, options)
    values = {}
    for n in G.iter_nodes(root):
        if isinstance(n, (G.Sequential, G.Residual)) and (n.name or getattr(n, "role", None)) and n is not root:
            values[id(n)] = comp.best(n)
    return comp.best(root, top=True), values


def network_bound(model_or_graph: nn.Module | G.Node, input_shape: Sequence[int] | torch.Tensor,
                  method: str = "folded+liplt", *, compare: bool = True, rtol: float = 0.02,
                  dense_max_entries: int = 2**21, example_input: torch.Tensor | None = None, check_graph: bool = True,
                  sandwich_kwargs: dict | None = None, sdp_options: "SdpOptions | None" = None,
                  layer_results: Any = None) -> NetworkBound:
    """Certified l2 Lipschitz upper bound of an eval-mode network and of its layers, blocks and stages.

    ``model_or_graph``: any fx-traceable module (its graph from ``lipschitz.trace.graph_from_module``), or a
    ``lipschitz.graph`` tree built by hand.
    ``input_shape`` excludes the batch, e.g. (3, 32, 32) (as in ``spectral.analyze``); an example input tensor
    with the batch dimension is accepted too (it is then also the ``example_input``). ``method`` in METHODS;
    with ``compare=True`` every method is evaluated and reported in ``comparison``. The traced graph of a module
    is always checked against ``model(x)`` on a random input (``check_graph`` repeats that check on
    ``example_input``). ``sandwich_kwargs``: options of the per-layer ``spectral.sandwich`` (``options=`` a
    ``SandwichOptions`` or its fields). ``layer_results``: a ``spectral.analyze`` table (or its rows) of the same
    model: a raw layer whose row was computed for the same weights, input shape, ``rtol`` and sandwich options is not
    sandwiched again; rows computed otherwise are recomputed (and noted). Batch norms use their running statistics
    (eval mode); the model's modes are restored afterwards.
    References: Fazlyab et al. 2023 (LipLT); Gouk et al. 2021 (layer-wise product bounds).
    """
    from lipschitz.lower import eval_mode

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    if torch.is_tensor(input_shape):
        example_input = input_shape if example_input is None else example_input
        input_shape = tuple(input_shape.shape[1:])
    input_shape = tuple(int(s) for s in input_shape)
    model, root = _model_and_graph(model_or_graph, input_shape)
    check_graph = check_graph and model is not None
    modules = _modules_of(root)
    holder = nn.ModuleList(modules) if model is None else model
    with eval_mode(holder), torch.no_grad():
        for m in modules:
            m.eval()
        shapes = _run_graph(model, root, input_shape, modules, example_input, check_graph)
        layer_rows = _layer_rows(root, shapes)
        methods = METHODS if compare else (method,) if method != "lipsdp" else ("folded+liplt", "lipsdp")
        sw_kw = {"dense_max_entries": min(dense_max_entries, 2**18), **(sandwich_kwargs or {})}
        cache: dict = {} if layer_results is None else {"layer_results": _given_rows(layer_results)}
        results, node_values = _evaluate_methods(root, shapes, methods, (rtol, dense_max_entries, sw_kw, layer_rows,
                                                                        cache), sdp_options)
    nodes = _node_records(root, shapes, methods, node_values)
    v, exact = results[method]
    value = NormValue(v, Guarantee.EXACT if exact else Guarantee.UPPER, f"network_{method}",
                      seconds=time.perf_counter() - t0, details={"input_shape": list(input_shape)})
    notes = [n.note for n in G.iter_nodes(root) if getattr(n, "note", "")]
    if cache.get("layer_results_recomputed"):
        names = ", ".join(dict.fromkeys(cache["layer_results_recomputed"]))
        notes.append(f"layer_results of {names} were computed for other weights, input shape, rtol or sandwich "
                     "options: recomputed")
    return NetworkBound(value, method, input_shape, {k: r[0] for k, r in results.items()},
                        list(layer_rows.values()), nodes, time.perf_counter() - t0, notes)


def _model_and_graph(model_or_graph: nn.Module | G.Node, input_shape: tuple) -> tuple[nn.Module | None, G.Node]:
    if isinstance(model_or_graph, nn.Module):
        return model_or_graph, graph_from_module(model_or_graph, input_shape)
    if isinstance(model_or_graph, G.NODE_TYPES):
        return None, model_or_graph
    raise TypeError(f"expected an nn.Module or a lipschitz.graph node, got {type(model_or_graph).__name__}")


def _run_graph(model: nn.Module | None, root: G.Node, input_shape: tuple, modules: list[nn.Module],
               example_input: torch.Tensor | None, check_graph: bool) -> dict[int, tuple]:
    """Run the graph once (each node's input/output shape) and, for a module, check it against ``model(x)``."""
    params = [p for m in modules for p in m.parameters()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    x = example_input
    if x is None:  # a fixed draw: the global random state is neither used nor advanced
        x = torch.rand((2,) + input_shape, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
    if tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"example_input has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, input_shape))})")
    shapes: dict[int, tuple] = {}
    try:
        y = interpret(root, x, shapes)
    except RuntimeError as err:
        raise ValueError(f"the network graph cannot run on input shape {input_shape}: {err}") from err
    if check_graph:
        ref = model(x)
        if ref.shape != y.shape or not torch.allclose(ref, y, rtol=1e-4, atol=1e-5):
            diff = (ref - y).abs().max().item() if ref.shape == y.shape else "shape mismatch"
            raise ValueError(f"the traced graph does not reproduce the model's forward (max diff {diff}); the "
                             "forward depends on something fx cannot see (randomness, batch-dependent Python code)")
    return shapes


def _layer_rows(root: G.Node, shapes: dict[int, tuple]) -> dict[int, LayerRow]:
    return {id(n): LayerRow(n.name, type(n.module).__name__, list(n.module.weight.shape), list(shapes[id(n)][0]),
                            list(shapes[id(n)][1]))
            for n in G.iter_nodes(root) if isinstance(n, G.Layer)}


def _evaluate_methods(root: G.Node, shapes: dict, methods: Sequence[str], engine_args: tuple, sdp_options):
    """``(results, node_values)`` per method: (value, exact) of the root and of every recorded node.
    ``engine_args``: (rtol, dense_max_entries, sandwich kwargs, layer rows, cache), shared by the methods."""
    results, node_values = {}, {}
    for meth in methods:
        if meth == "lipsdp":
            results[meth], node_values[meth] = _lipsdp_pass(
                root, shapes, node_values["folded+liplt"], results["folded+liplt"], sdp_options, engine_args)
            continue
        eng = _Engine(shapes, meth, *engine_args)
        v, exact, out = eng.evaluate(root)
        if out is not None:
            v = _mul_up(v, _diag_norm(out))
            exact = False
        results[meth] = (v, exact)
        node_values[meth] = eng.node_values
    return results, node_values


def _node_records(root: G.Node, shapes: dict, methods: Sequence[str], node_values: dict) -> list[dict[str, Any]]:
    """One record per named block/stage: shapes, each method's value and its guarantee label."""
    nodes = []
    for n in G.iter_nodes(root):
        named = n.name or getattr(n, "role", None)
        if isinstance(n, (G.Sequential, G.Residual, G.Concat)) and named and n is not root:
            rec = {"name": n.name, "role": n.role, "in_shape": list(shapes[id(n)][0]),
                   "out_shape": list(shapes[id(n)][1])}
            labels = {}
            for meth in methods:
                if id(n) in node_values[meth]:
                    value_m, exact_m = node_values[meth][id(n)]
                    rec[meth] = value_m
                    labels[meth] = (Guarantee.EXACT if exact_m else Guarantee.UPPER).value
            rec["guarantee"] = labels
            nodes.append(rec)
    return nodes
