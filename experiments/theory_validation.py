"""Validate the random-matrix theory on WideResNets at initialisation (predicted vs measured norms and bounds).

Recipe (regenerates the results and figures of docs/theory.md, a few minutes on 2 CPU cores):

    .venv/bin/python -m experiments.theory_validation --out docs/figures

For each per-stage width multiplier (m1, m2, m3) of a base WRN (depths (2,2,2), widths (16, 16, 32, 64), 16x16
inputs with 3 channels) and two weight regimes -- "init" (the model's own Kaiming fan-out initialisation) and "fixed"
(every conv/linear weight redrawn iid N(0, 0.05^2)) -- it records:
- per layer: the predicted norm (``lipschitz.theory.random_matrix``, with the empirical weight std plugged in)
  and the measured exact norm of the circular-padded layer at its real input size (``spectral.exact``);
- per stage and for the network: the product-rule bound (residual 1 + L(branch), projection L(sc) + L(branch))
  composed from the predicted and from the measured layer norms; the closed-form symbolic bound
  (``lipschitz.theory.symbolic``); and, for the last-stage line (1, 1, m3), the certified bound of
  ``lipschitz.bounds.network_bound`` (zero padding);
- Spearman rank correlations of the predicted vs the measured network bounds over the grid.
Outputs: theory_validation.json, theory_summary.json, theory_layers.csv, theory_networks.csv and theory_*.png
under ``out_dir``; the full run also writes the iid-kernel Monte Carlo (theory_conv_predictions.*) and the
Gaussian tail-bound check (theory_tail_bound.*).

Trained weights (used by ``experiments.measure.measure_model`` for every demo model and sweep run):
``trained_theory`` evaluates the symbolic composition rule with a trained WRN's certified layer norms and
batch-norm gains (``lipschitz.theory.trained``) and records the per-layer facts a trained-weight model is fitted
on; ``spectra_record`` / ``spectrum_rows`` / ``compact_spectrum`` give the full spectra of the trained and initial
weights against the random-matrix law (``spectral.spectrum``).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lipschitz import graph as G
from lipschitz.trace import graph_from_module
from experiments.io import write_json
from experiments.report import spearman

BASE_DEPTHS = (2, 2, 2)
BASE_WIDTHS = (16, 16, 32, 64)
MULTIPLIERS = (0.5, 1.0, 2.0)
FIXED_STD = 0.05


def _layer_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Input shape (no batch) of every module, from forward hooks on one zero input."""
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod: nn.Module, inp: tuple, out: Any) -> None:
        if inp and isinstance(inp[0], torch.Tensor):
            shapes.setdefault(id(mod), tuple(inp[0].shape[1:]))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def compose_bound(node: G.Node, layer_norm: Callable[[nn.Module], float], shapes: dict[int, tuple],
                  record: dict[str, float]) -> float:
    """Product-rule bound of a graph from per-layer values; named stage/stem/head values land in ``record``."""
    from lipschitz.rules import activation_slope

    if isinstance(node, G.Layer):
        value = layer_norm(node.module)
    elif isinstance(node, G.BatchNorm):
        bn = node.module
        value = float((bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).max())
    elif isinstance(node, G.Activation):
        value = activation_slope(node.kind, node.params).value
    elif isinstance(node, G.Pool):
        if not isinstance(node.module, nn.AdaptiveAvgPool2d) or node.module.output_size not in (1, (1, 1)):
            raise ValueError(f"compose_bound handles global average pooling only, got {node.module}")
        h, w = shapes[id(node.module)][-2:]
        value = 1.0 / math.sqrt(h * w)
    elif isinstance(node, (G.Flatten, G.Identity)):
        value = 1.0
    elif isinstance(node, G.Normalize):
        value = float(1.0 / node.std.abs().min())
    elif isinstance(node, G.Sequential):
        value = math.prod(compose_bound(c, layer_norm, shapes, record) for c in node.children)
    elif isinstance(node, G.Residual):
        short = 1.0 if node.shortcut is None else compose_bound(node.shortcut, layer_norm, shapes, record)
        value = short + compose_bound(node.branch, layer_norm, shapes, record)
    else:
        raise TypeError(f"unsupported graph node {type(node).__name__}")
    role = getattr(node, "role", None)
    if role in ("stem", "stage", "head"):
        record[node.name] = value
    return value


def _layer_rows(model: nn.Module, shapes: dict[int, tuple]) -> dict[int, dict[str, Any]]:
    """Predicted and measured norm of every conv/linear layer."""
    from spectral.exact import conv_operator_norm_circular, operator_norm_dense
    from spectral.operators import LayerOperator

    from lipschitz.theory import random_matrix as rm

    rows: dict[int, dict[str, Any]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d):
            c_out, c_in, k, _ = w.shape
            n, stride = shapes[id(m)][-1], m.stride[0]
            std = float(w.detach().std())
            pred = rm.conv_norm_prediction(c_out, c_in, k, std, n, stride)
            meas = conv_operator_norm_circular(w.detach(), n, stride=stride)
        elif isinstance(m, nn.Linear):
            c_out, c_in = w.shape
            k, n, stride = 1, 1, 1
            std = float(w.detach().std())
            pred = rm.gaussian_norm_tracy_widom(c_out, c_in, std)
            meas = operator_norm_dense(LayerOperator.linear(w.detach()))
        else:
            continue
        rows[id(m)] = {"layer": name, "kind": type(m).__name__, "c_out": int(c_out), "c_in": int(c_in),
                       "kernel_size": int(k), "input_size": int(n), "stride": int(stride), "std": std,
                       "predicted": pred.value, "predicted_guarantee": pred.guarantee.value,
                       "measured": meas.value, "measured_guarantee": f"{meas.guarantee.value} ({meas.method})",
                       "rel_err": pred.value / meas.value - 1}
    return rows


def _redraw_fixed(model: nn.Module, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)


def evaluate_config(multipliers: tuple[float, ...], regime: str, *, input_size: int, seed: int,
                    certified: bool = True) -> dict[str, Any]:
    """All predictions and measurements for one width-multiplier configuration and weight regime."""
    from experiments.models import WideResNet
    from lipschitz.theory import symbolic

    widths = (BASE_WIDTHS[0],) + tuple(max(1, int(round(w * m))) for w, m in zip(BASE_WIDTHS[1:], multipliers))
    torch.manual_seed(seed)
    model = WideResNet(depths=BASE_DEPTHS, widths=widths, strides=(1, 2, 2), num_classes=10, in_channels=3).eval()
    if regime == "fixed":
        _redraw_fixed(model, FIXED_STD, torch.Generator().manual_seed(seed))
    elif regime != "init":
        raise ValueError(f"unknown regime {regime!r}; valid: init, fixed")
    input_shape = (3, input_size, input_size)
    shapes = _layer_input_shapes(model, input_shape)
    layers = _layer_rows(model, shapes)
    root = graph_from_module(model, input_shape)
    pred_parts: dict[str, float] = {}
    meas_parts: dict[str, float] = {}
    predicted = compose_bound(root, lambda m: layers[id(m)]["predicted"], shapes, pred_parts)
    measured = compose_bound(root, lambda m: layers[id(m)]["measured"], shapes, meas_parts)
    sym_kwargs = {"weight_model": "fixed", "std": FIXED_STD} if regime == "fixed" else \
        {"weight_model": "kaiming_normal_fan_out"}
    bn_gain = 1.0 / math.sqrt(1.0 + model.bn1.eps)  # eval-mode BN at init: running_var = 1, gamma = 1
    sym = symbolic.lipschitz_bound(BASE_DEPTHS, widths, input_size=input_size, bn_gain=bn_gain, **sym_kwargs)
    out: dict[str, Any] = {
        "multipliers": list(multipliers), "regime": regime, "depths": list(BASE_DEPTHS), "widths": list(widths),
        "params": symbolic.param_count(BASE_DEPTHS, widths), "input_size": input_size,
        "network_predicted": predicted, "network_measured": measured, "network_symbolic": sym.value,
        "stages_predicted": [pred_parts[f"stage{i + 1}"] for i in range(3)],
        "stages_measured": [meas_parts[f"stage{i + 1}"] for i in range(3)],
        "stages_symbolic": sym.details["stages"],
        "guarantees": {"network_predicted": "estimate", "network_symbolic": sym.guarantee.value,
                       "network_measured": "product of exact circular layer norms (upper bound of the "
                                           "circular-padded network)"},
        "layers": [dict(r) for r in layers.values()],
    }
    if certified:
        from lipschitz.bounds import network_bound

        nb = network_bound(model, input_shape, method="product", compare=False)
        out["network_certified_product"] = nb.value.value
        out["guarantees"]["network_certified_product"] = nb.value.guarantee.value
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (``experiments.report.spearman``); NaN where it is undefined (< 3 pairs, constant)."""
    rho = spearman(a, b)["rho"]
    return float("nan") if rho is None else rho


def run_validation(out_dir: str | Path, quick: bool = False, *, seed: int = 0, progress: bool = True,
                   certified: bool | None = None) -> dict[str, Any]:
    """Run the grid, write JSON/CSV/PNG under ``out_dir`` and return the summary dict.

    ``quick``: 8x8 inputs, 5 configurations, "init" and "fixed" regimes, no certified bound (seconds);
    otherwise 16x16 inputs and the full 3^3 grid of multipliers in both regimes, the certified bound of
    ``lipschitz.bounds`` on the (1, 1, m3) line, and the iid-kernel Monte Carlo (a few CPU minutes).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    input_size = 8 if quick else 16
    grid = list(itertools.product(MULTIPLIERS, repeat=3))
    if quick:
        grid = [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (2.0, 2.0, 2.0), (1.0, 1.0, 0.5), (1.0, 1.0, 2.0)]
    certified = (not quick) if certified is None else certified
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    configs = []
    jobs = [(m, r) for r in ("init", "fixed") for m in grid]
    for mult, regime in tqdm(jobs, desc="theory validation", disable=not progress):
        # the certified bound (slowest part) on the last-stage line of the grid only: multipliers (1, 1, m3)
        cert = certified and tuple(mult[:2]) == (1.0, 1.0)
        configs.append(evaluate_config(mult, regime, input_size=input_size, seed=seed, certified=cert))
    summary: dict[str, Any] = {"quick": quick, "input_size": input_size, "base_depths": list(BASE_DEPTHS),
                               "base_widths": list(BASE_WIDTHS), "fixed_std": FIXED_STD, "regimes": {}}
    for regime in ("init", "fixed"):
        rows = [c for c in configs if c["regime"] == regime]
        layer_errs = [abs(l["rel_err"]) for c in rows for l in c["layers"]]
        conv_errs = [abs(l["rel_err"]) for c in rows for l in c["layers"] if l["kind"] == "Conv2d"]
        net_err = [c["network_predicted"] / c["network_measured"] - 1 for c in rows]
        reg = {
            "configs": len(rows),
            "layer_rel_err_median": _median(layer_errs), "layer_rel_err_max": max(layer_errs),
            "conv_rel_err_max": max(conv_errs),
            "network_rel_err_max": max(abs(e) for e in net_err),
            "spearman_predicted_vs_measured": _spearman([c["network_predicted"] for c in rows],
                                                        [c["network_measured"] for c in rows]),
            "spearman_symbolic_vs_measured": _spearman([c["network_symbolic"] for c in rows],
                                                       [c["network_measured"] for c in rows]),
        }
        cert_rows = [c for c in rows if "network_certified_product" in c]
        if cert_rows:
            reg["certified_over_measured"] = [c["network_certified_product"] / c["network_measured"]
                                              for c in cert_rows]
        summary["regimes"][regime] = reg
    summary["cpu_seconds"] = time.process_time() - t_cpu
    summary["wall_seconds"] = time.perf_counter() - t_wall
    summary["torch"] = torch.__version__
    write_json(out / "theory_validation.json", {"summary": summary, "configs": configs})
    _write_csv(out / "theory_layers.csv", [{"regime": c["regime"], "multipliers": "x".join(map(str, c["multipliers"])),
                                           **l} for c in configs for l in c["layers"]])
    _write_csv(out / "theory_networks.csv", [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                             for k, v in c.items() if k != "layers"} for c in configs])
    summary["figures"] = [str(p) for p in plot_validation(configs, out)]
    if not quick:  # the random-matrix laws on their own: iid kernels over a grid of shapes, and the tail bound
        from lipschitz.theory.montecarlo import validate_conv_predictions, validate_tail_bound, write_rows

        conv = validate_conv_predictions(n_samples=5, seed=seed, out_dir=out, progress=progress)
        tail = validate_tail_bound(64, 32, n_samples=4000, seed=seed)
        write_rows(tail, out, "theory_tail_bound")
        summary["conv_rel_err_max"] = {"leading": max(abs(r["rel_err_leading"]) for r in conv),
                                       "tracy_widom": max(abs(r["rel_err_tracy_widom"]) for r in conv)}
        summary["tail_bound_holds"] = all(r["violation_rate"] <= r["bound"] for r in tail)
        summary["figures"].append(str(out / "theory_conv_predictions.png"))
    summary["cpu_seconds"] = time.process_time() - t_cpu
    summary["wall_seconds"] = time.perf_counter() - t_wall
    write_json(out / "theory_summary.json", summary)
    return summary


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def plot_validation(configs: list[dict], out: Path) -> list[Path]:
    """theory_layers.png (per-layer), theory_networks.png (network bounds), theory_last_stage.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = {"init": "tab:blue", "fixed": "tab:orange"}
    fig, ax = plt.subplots(figsize=(5, 4))
    for regime, color in colors.items():
        ls = [l for c in configs if c["regime"] == regime for l in c["layers"]]
        ax.scatter([l["measured"] for l in ls], [l["predicted"] for l in ls], s=8, color=color, label=regime)
    lims = [min(l["measured"] for c in configs for l in c["layers"]) * 0.8,
            max(l["measured"] for c in configs for l in c["layers"]) * 1.2]
    ax.plot(lims, lims, "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured exact layer norm (circular)")
    ax.set_ylabel("random-matrix prediction")
    ax.set_title("per-layer norms at initialisation")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "theory_layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, regime in zip(axes, colors):
        rows = [c for c in configs if c["regime"] == regime]
        meas = [c["network_measured"] for c in rows]
        ax.scatter(meas, [c["network_predicted"] for c in rows], label="per-layer RMT, composed")
        ax.scatter(meas, [c["network_symbolic"] for c in rows], marker="x", label="symbolic closed form")
        cert = [c for c in rows if "network_certified_product" in c]
        if cert:
            ax.scatter([c["network_measured"] for c in cert], [c["network_certified_product"] for c in cert],
                       marker="+", s=80, label="certified product (zero padding)")
        lo, hi = min(meas) * 0.7, max(meas) * 1.4
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        rho = _spearman([c["network_predicted"] for c in rows], meas)
        ax.set_title(f"{regime}: network bound (Spearman {rho:.3f})")
        ax.set_xlabel("measured (product of exact layer norms)")
        ax.set_ylabel("predicted")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "theory_networks.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, regime in zip(axes, colors):
        rows = [c for c in configs if c["regime"] == regime and c["multipliers"][:2] == [1.0, 1.0]]
        rows.sort(key=lambda c: c["multipliers"][2])
        m3 = [c["multipliers"][2] for c in rows]
        ax.plot(m3, [c["network_measured"] for c in rows], "o-", label="measured")
        ax.plot(m3, [c["network_predicted"] for c in rows], "x--", label="predicted (RMT)")
        ax.plot(m3, [c["network_symbolic"] for c in rows], "s:", label="symbolic")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("last-stage width multiplier")
        ax.set_ylabel("network bound")
        ax.set_title(f"{regime}: shrinking the last stage")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "theory_last_stage.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# trained weights: the symbolic composition with measured layer norms, and the facts a fitted model needs
# ----------------------------------------------------------------------------------------------


def _bn_gain(bn: nn.Module) -> float:
    from lipschitz.rules import batchnorm_scale

    return float(batchnorm_scale(bn).abs().max())


def _block_parts(block: G.Node) -> tuple[list[nn.Module], list[nn.Module]] | None:
    """(batch norms, conv layers) of a pre-activation block in forward order (shortcut last), or None."""
    bns = [n.module for n in G.iter_nodes(block) if isinstance(n, G.BatchNorm)]
    layers = [n.module for n in G.iter_nodes(block) if isinstance(n, G.Layer)]
    return (bns, layers) if len(bns) == 2 and len(layers) in (2, 3) else None


def wrn_values(model: nn.Module, input_shape: tuple[int, ...], layer_norm: Callable[[nn.Module], float]):
    """``(WRNNorms, [LayerFact])`` of a pre-activation WideResNet from per-layer norms, or None for other models.

    Batch-norm values are exact gains max|gamma / sqrt(var + eps)|; the pooling factor is 1/sqrt(h w) at the
    real input size; an input normalisation contributes 1/min(std).
    """
    from lipschitz.theory.trained import BlockNorms, LayerFact, WRNNorms

    from lipschitz import graph_from_module

    if not hasattr(model, "arch_config"):
        return None
    arch = model.arch_config()
    depths, widths = list(arch.get("depths") or []), list(arch.get("widths") or [])
    graph = graph_from_module(model, tuple(input_shape))
    parts = {getattr(n, "role", None) and n.name: n for n in graph.children
             if getattr(n, "role", None) in ("stem", "stage", "head")}
    normalize = [n for n in graph.children if isinstance(n, G.Normalize)]
    stem_layers = [n.module for n in G.iter_nodes(parts.get("stem")) if isinstance(n, G.Layer)] if "stem" in parts else []
    head = parts.get("head")
    if len(stem_layers) != 1 or head is None or len(widths) != len(depths) + 1:
        return None
    std = lambda m: float(m.weight.detach().double().std(correction=0))  # noqa: E731
    facts = [LayerFact("stem", "conv", widths[0], 0, layer_norm(stem_layers[0]), std(stem_layers[0]))]
    stages = []
    for i, depth in enumerate(depths):
        stage = parts.get(f"stage{i + 1}")
        blocks = [_block_parts(b) for b in (stage.children if stage is not None else [])]
        if stage is None or not blocks or any(b is None for b in blocks):
            return None
        name, w, norms = f"stage{i + 1}", widths[i + 1], []
        for (bn1, bn2), layers in blocks:
            values = [layer_norm(m) for m in layers]
            norms.append(BlockNorms(_bn_gain(bn1), values[0], _bn_gain(bn2), values[1], values[2] if len(values) == 3 else None))
            facts += [LayerFact(name, "bn", w, depth, _bn_gain(bn)) for bn in (bn1, bn2)]
            facts += [LayerFact(name, "conv" if j < 2 else "shortcut", w, depth, v, std(m))
                      for j, (m, v) in enumerate(zip(layers, values))]
        stages.append(tuple(norms))
    head_bns = [n.module for n in G.iter_nodes(head) if isinstance(n, G.BatchNorm)]
    head_fc = [n.module for n in G.iter_nodes(head) if isinstance(n, G.Layer)]
    pools = [n.module for n in G.iter_nodes(head) if isinstance(n, G.Pool)]
    if len(head_bns) != 1 or len(head_fc) != 1 or len(pools) != 1:
        return None
    h, w_ = _layer_input_shapes(model, input_shape)[id(pools[0])][-2:]
    fc = layer_norm(head_fc[0])
    facts += [LayerFact("head", "bn", widths[-1], depths[-1], _bn_gain(head_bns[0])),
              LayerFact("head", "fc", widths[-1], depths[-1], fc, std(head_fc[0]))]
    scale = float(1.0 / normalize[0].std.abs().min()) if normalize else 1.0
    return WRNNorms(layer_norm(stem_layers[0]), tuple(stages), _bn_gain(head_bns[0]), 1.0 / math.sqrt(h * w_), fc,
                    scale), facts


def trained_theory(model: nn.Module, input_shape: tuple[int, ...], layer_rows: list[dict] | None = None,
                   rtol: float = 0.01) -> dict[str, Any]:
    """The symbolic bound with each trained layer's certified norm (``theory_measured_norms``, certified_upper),
    its stage factors, and the per-layer facts (``theory_facts``) a trained-weight model is fitted on.

    ``layer_rows``: rows of ``spectral.analyze``; a row's ``upper`` is used when its gap is at most ``rtol`` and no
    batch norm was folded into it (the rule multiplies the batch-norm gains itself), other layers are sandwiched here
    to ``rtol`` (the rule multiplies every layer's slack, so loose uppers would inflate it). Models that are not
    pre-activation WideResNets give ``{}``.
    """
    from dataclasses import asdict

    from lipschitz.theory.trained import composed_bound
    from spectral.guarantee import Guarantee

    model = model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    def value(v: Any) -> Any:
        return v.get("value") if isinstance(v, dict) else v

    uppers = {str(r.get("name")): value(r.get("upper")) for r in layer_rows or [] if not r.get("folded_batchnorm")
              and isinstance(value(r.get("gap")), (int, float)) and value(r.get("gap")) <= rtol}
    missing: dict[int, float] = {}

    def layer_norm(m: nn.Module) -> float:
        value = uppers.get(names.get(id(m), ""))
        if isinstance(value, (int, float)):
            return float(value)
        if id(m) not in missing:
            missing[id(m)] = _certified_layer_norm(model, m, input_shape, rtol)
        return missing[id(m)]

    found = wrn_values(model, tuple(input_shape), layer_norm)
    if found is None:
        return {}
    norms, facts = found
    bound = composed_bound(norms, Guarantee.UPPER, "symbolic_rule[certified layer norms]")
    arch = model.arch_config()
    return {"theory_measured_norms": bound.value, "theory_measured_stage_factors": bound.details["stages"],
            "theory_measured_method": bound.method, "theory_facts": [asdict(f) for f in facts],
            "theory_structure": {"depths": list(arch["depths"]), "widths": list(arch["widths"]),
                                 "strides": list(arch.get("strides") or []) or None, "input_size": int(input_shape[-1]),
                                 "input_scale": norms.input_scale}}


def _certified_layer_norm(model: nn.Module, module: nn.Module, input_shape: tuple[int, ...], rtol: float) -> float:
    from spectral.sandwich import sandwich

    shape = _layer_input_shapes(model, tuple(input_shape))[id(module)]
    if isinstance(module, nn.Linear):
        return sandwich(module.weight.detach(), (shape[-1],), rtol=rtol).upper.value
    return sandwich(module.weight.detach(), shape, stride=module.stride, padding=module.padding,
                    padding_mode=module.padding_mode, dilation=module.dilation, groups=module.groups,
                    rtol=rtol).upper.value


def spectra_record(model: nn.Module, input_shape: tuple[int, ...], initial: nn.Module | None = None, *,
                   seed: int = 0, top_k: int = 32) -> dict[str, Any]:
    """Full spectra of every conv/linear layer of the trained model (and of its initial weights), compared with
    the random-matrix law of the same entry std (``spectral.spectrum``), compacted for a sweep record.

    Returns ``{"spectra": {"trained": [rows], "init": [rows]}}`` with rows of ``compact_spectrum``.
    """
    out = {}
    for label, net in (("trained", model), ("init", initial)):
        if net is not None:
            out[label] = [compact_spectrum(r) for r in spectrum_rows(net, input_shape, seed=seed, top_k=top_k)]
    return {"spectra": out}


def spectrum_rows(model: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0, top_k: int = 32,
                  progress: bool = False) -> list[dict[str, Any]]:
    """``spectral.spectrum.model_spectra`` rows (all singular values kept) at the model's input size."""
    from spectral.spectrum import model_spectra

    device = next(model.parameters()).device
    return model_spectra(model.eval(), torch.zeros((1, *input_shape), device=device), top_k=top_k, seed=seed,
                         progress=progress)


def compact_spectrum(row: dict[str, Any]) -> dict[str, Any]:
    """A ``model_spectra`` row without its values: stage, method, guarantee, top, bulk edge, outlier threshold and
    count (and the random draw's), alpha (and the random draw's) and a rank profile scaled by the bulk edge."""
    from experiments.report import stage_of

    c = row["comparison"]
    return {"name": row["name"], "stage": stage_of(row["name"]), "kind": row["kind"], "weight_shape": row["weight_shape"],
            "method": row["method"], "guarantee": row["guarantee"], "n_values": row["n_values"],
            "complete": row["complete"], "entry_std": c["entry_std"], "top": c["top"], "bulk_edge": c["bulk_edge"],
            "threshold": c["threshold"], "n_outliers": c["n_outliers"], "random_top": c.get("random_top"),
            "random_n_outliers": c.get("random_n_outliers"), "alpha": c["alpha"]["alpha"],
            "alpha_n_tail": c["alpha"]["n_tail"], "random_alpha": (c.get("random_alpha") or {}).get("alpha"),
            "profile": row["profile"]}

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/figures", help="output folder (default docs/figures)")
    parser.add_argument("--quick", action="store_true", help="8x8 inputs and 5 configurations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_validation(args.out, quick=args.quick, seed=args.seed)
    for regime, reg in summary["regimes"].items():
        print(f"{regime}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in reg.items()))
    print(f"theory validation: {len(summary['regimes'])} regimes, cpu {summary['cpu_seconds']:.1f}s, "
          f"wall {summary['wall_seconds']:.1f}s, results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
