"""Closed forms (sympy) for a pre-activation WideResNet with per-stage depths D_i and widths W_i.

Architecture (RobustBench/TRADES layout): stem 3x3 conv C -> W_0; stage i has D_i pre-activation blocks
W_{i-1} -> W_i (the first with stride s_i and a 1x1 projection shortcut when W_{i-1} != W_i or s_i != 1);
head BN -> ReLU -> global average pool -> linear W_n -> K (with bias). Convs have no bias; BN has 2 parameters
per channel (buffers are not parameters).

Lipschitz bound (l2, eval mode) from the block rules: identity block 1 + L(branch), projection block
L(shortcut) + L(branch), BN = multiplication by a gain ``g`` (1 at initialisation), ReLU 1-Lipschitz, global
average pooling over h x w positions 1/sqrt(h w); each layer norm is the random-matrix leading-order law
``lipschitz.theory.random_matrix`` under a weight model (value labelled ESTIMATE: it is a certified-style
composition of *predicted* layer norms, not a certificate).
References: Zagoruyko & Komodakis 2016; Huang et al. 2021; Gordon 1985; Sedghi et al. 2019.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import sympy as sp

from spectral.guarantee import Guarantee, NormValue

WEIGHT_MODELS = ("kaiming_normal_fan_out", "kaiming_normal_fan_in", "pytorch_default", "fixed")
KERNEL = 3


@dataclass(frozen=True)
class WRNSymbols:
    """The sympy symbols of the closed forms (positive reals)."""

    depths: tuple[sp.Symbol, ...]
    widths: tuple[sp.Symbol, ...]  # W_0 (stem) .. W_n
    num_classes: sp.Symbol
    in_channels: sp.Symbol
    input_size: sp.Symbol
    std: sp.Symbol
    bn_gain: sp.Symbol
    projections: tuple[sp.Symbol, ...]  # 1 where stage i has a projection shortcut, else 0


def wrn_symbols(n_stages: int = 3) -> WRNSymbols:
    """Symbols D1..Dn, W0..Wn, K (classes), C (input channels), S (input side), sigma, g (BN gain), pi_i."""
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be a positive integer, got {n_stages!r}")
    pos = {"positive": True}
    return WRNSymbols(
        depths=tuple(sp.Symbol(f"D{i + 1}", **pos) for i in range(n_stages)),
        widths=tuple(sp.Symbol(f"W{i}", **pos) for i in range(n_stages + 1)),
        num_classes=sp.Symbol("K", **pos), in_channels=sp.Symbol("C", **pos), input_size=sp.Symbol("S", **pos),
        std=sp.Symbol("sigma", **pos), bn_gain=sp.Symbol("g", **pos),
        projections=tuple(sp.Symbol(f"pi{i + 1}", nonnegative=True) for i in range(n_stages)),
    )


def _check_config(depths: Sequence[int], widths: Sequence[int], strides: Sequence[int] | None) -> tuple:
    depths, widths = tuple(depths), tuple(widths)
    if len(widths) != len(depths) + 1:
        raise ValueError(f"widths needs the stem width plus one per stage ({len(depths) + 1}), got {list(widths)}")
    strides = tuple(strides) if strides is not None else default_strides(len(depths))
    if len(strides) != len(depths):
        raise ValueError(f"strides needs one entry per stage ({len(depths)}), got {list(strides)}")
    for name, vals in (("depths", depths), ("widths", widths), ("strides", strides)):
        if any(int(v) != v or v < 1 for v in vals):
            raise ValueError(f"{name} must be positive integers, got {list(vals)}")
    return tuple(int(d) for d in depths), tuple(int(w) for w in widths), tuple(int(s) for s in strides)


def default_strides(n_stages: int) -> tuple[int, ...]:
    """(1, 2, 2, ...): the first stage keeps the resolution, later ones halve it."""
    return (1,) + (2,) * (n_stages - 1)


def projection_flags(widths: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """1 for each stage whose first block has a 1x1 projection shortcut (width or resolution changes)."""
    return tuple(int(widths[i] != widths[i + 1] or strides[i] != 1) for i in range(len(strides)))


# ---------------------------------------------------------------- parameters and MACs
def param_count_expr(n_stages: int = 3, symbols: WRNSymbols | None = None, kernel_size: int = KERNEL) -> sp.Expr:
    """P(D, W): trainable parameters (conv weights, BN affine, fc weight and bias)."""
    s = symbols or wrn_symbols(n_stages)
    k2 = kernel_size ** 2
    D, W, pi = s.depths, s.widths, s.projections
    total = s.in_channels * W[0] * k2
    for i in range(len(D)):
        w_in, w = W[i], W[i + 1]
        first = 2 * w_in + k2 * w_in * w + 2 * w + k2 * w * w + pi[i] * w_in * w
        total += first + (D[i] - 1) * (4 * w + 2 * k2 * w * w)
    total += 2 * W[-1] + W[-1] * s.num_classes + s.num_classes
    return sp.expand(total)


def macs_expr(strides: Sequence[int] | None = None, n_stages: int = 3, symbols: WRNSymbols | None = None,
              kernel_size: int = KERNEL) -> sp.Expr:
    """Multiply-accumulates of the conv and linear layers for an S x S input (BN/ReLU/pooling not counted)."""
    s = symbols or wrn_symbols(n_stages)
    strides = tuple(strides) if strides is not None else default_strides(len(s.depths))
    k2 = kernel_size ** 2
    D, W, pi = s.depths, s.widths, s.projections
    side = s.input_size
    total = s.in_channels * W[0] * k2 * side ** 2
    reduction = 1
    for i in range(len(D)):
        reduction *= strides[i]
        area = (side / reduction) ** 2
        w_in, w = W[i], W[i + 1]
        total += area * (k2 * w_in * w + k2 * w * w + pi[i] * w_in * w) + (D[i] - 1) * area * 2 * k2 * w * w
    total += W[-1] * s.num_classes
    return sp.expand(total)


def _substitutions(s: WRNSymbols, depths, widths, strides, num_classes, in_channels, input_size=None) -> dict:
    subs = {sym: v for sym, v in zip(s.depths, depths)}
    subs.update({sym: v for sym, v in zip(s.widths, widths)})
    subs.update({sym: v for sym, v in zip(s.projections, projection_flags(widths, strides))})
    subs.update({s.num_classes: num_classes, s.in_channels: in_channels})
    if input_size is not None:
        subs[s.input_size] = input_size
    return subs


def param_count(depths: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                strides: Sequence[int] | None = None) -> int:
    """Exact parameter count of the WideResNet (integer evaluation of ``param_count_expr``)."""
    depths, widths, strides = _check_config(depths, widths, strides)
    s = wrn_symbols(len(depths))
    value = param_count_expr(symbols=s).subs(_substitutions(s, depths, widths, strides, num_classes, in_channels))
    return int(value)


def macs(depths: Sequence[int], widths: Sequence[int], input_size: int = 32, num_classes: int = 10,
         in_channels: int = 3, strides: Sequence[int] | None = None) -> int:
    """Multiply-accumulates (conv + linear) for one input_size x input_size image."""
    depths, widths, strides = _check_config(depths, widths, strides)
    if input_size % math.prod(strides):
        raise ValueError(f"input_size {input_size} must be divisible by the total stride {math.prod(strides)}")
    s = wrn_symbols(len(depths))
    expr = macs_expr(strides, symbols=s)
    return int(expr.subs(_substitutions(s, depths, widths, strides, num_classes, in_channels, input_size)))


# ---------------------------------------------------------------- Lipschitz bound
def conv_norm_expr(c_out, c_in, kernel_size: int, stride: int, weight_model: str, std=None) -> sp.Expr:
    """Leading-order norm of a conv with iid weights under ``weight_model`` (sympy).

    Stride 1: sigma k (sqrt(c_in) + sqrt(c_out)). Stride s > 1 with r = min(k, s): the iid-equivalent
    (sigma k / r)(sqrt(c_out) + r sqrt(c_in)) of the c_out x (s^2 c_in) polyphase symbol (numeric code uses the
    sharper generalised Marchenko-Pastur edge, see ``random_matrix.conv_norm_leading_order``).
    """
    k = sp.Integer(kernel_size)
    if weight_model == "kaiming_normal_fan_out":
        sigma = sp.sqrt(2 / (c_out * k ** 2))
    elif weight_model == "kaiming_normal_fan_in":
        sigma = sp.sqrt(2 / (c_in * k ** 2))
    elif weight_model == "pytorch_default":
        sigma = sp.sqrt(1 / (3 * c_in * k ** 2))
    elif weight_model == "fixed":
        if std is None:
            raise ValueError("weight_model='fixed' needs a std (number or sympy symbol)")
        sigma = std
    else:
        raise ValueError(f"unknown weight_model {weight_model!r}; valid: {', '.join(WEIGHT_MODELS)}")
    r = min(kernel_size, stride)
    return sigma * k / r * (sp.sqrt(c_out) + r * sp.sqrt(c_in))


def linear_norm_expr(c_out, c_in, weight_model: str, std=None) -> sp.Expr:
    """Leading-order norm sigma(sqrt(c_in)+sqrt(c_out)) of a c_out x c_in linear layer."""
    return conv_norm_expr(c_out, c_in, 1, 1, weight_model, std)


@dataclass(frozen=True)
class BoundExpressions:
    """Symbolic network bound and its parts (stem, one per stage, head) under one weight model."""

    network: sp.Expr
    stem: sp.Expr
    stages: tuple[sp.Expr, ...]
    head: sp.Expr
    symbols: WRNSymbols
    weight_model: str
    fc_model: str
    strides: tuple[int, ...]


def lipschitz_bound_expr(n_stages: int = 3, weight_model: str = "kaiming_normal_fan_out",
                         fc_model: str | None = None, strides: Sequence[int] | None = None,
                         symbols: WRNSymbols | None = None) -> BoundExpressions:
    """Product-of-blocks Lipschitz bound as a function of (D_i, W_i, S, g, sigma).

    ``fc_model`` defaults to "pytorch_default" for the Kaiming conv models (as PyTorch/our models initialise the
    linear head) and to ``weight_model`` otherwise. Projection flags pi_i are symbols (substitute 0/1).
    """
    if weight_model not in WEIGHT_MODELS:
        raise ValueError(f"unknown weight_model {weight_model!r}; valid: {', '.join(WEIGHT_MODELS)}")
    s = symbols or wrn_symbols(n_stages)
    strides = tuple(strides) if strides is not None else default_strides(len(s.depths))
    if fc_model is None:
        fc_model = "fixed" if weight_model == "fixed" else "pytorch_default"
    g, D, W, pi = s.bn_gain, s.depths, s.widths, s.projections
    k = KERNEL
    stem = conv_norm_expr(W[0], s.in_channels, k, 1, weight_model, s.std)
    stages = []
    for i in range(len(D)):
        w_in, w = W[i], W[i + 1]
        branch_first = conv_norm_expr(w, w_in, k, strides[i], weight_model, s.std) * g * \
            conv_norm_expr(w, w, k, 1, weight_model, s.std)
        shortcut = conv_norm_expr(w, w_in, 1, strides[i], weight_model, s.std)
        first = pi[i] * g * (shortcut + branch_first) + (1 - pi[i]) * (1 + g * branch_first)
        identity = 1 + g ** 2 * conv_norm_expr(w, w, k, 1, weight_model, s.std) ** 2
        stages.append(first * identity ** (D[i] - 1))
    side = s.input_size / math.prod(strides)
    head = g * (1 / side) * linear_norm_expr(s.num_classes, W[-1], fc_model, s.std)
    network = stem * sp.Mul(*stages) * head
    return BoundExpressions(network, stem, tuple(stages), head, s, weight_model, fc_model, strides)


def lipschitz_bound(depths: Sequence[int], widths: Sequence[int], *, weight_model: str = "kaiming_normal_fan_out",
                    fc_model: str | None = None, std: float | None = None, bn_gain: float = 1.0,
                    input_size: int = 32, num_classes: int = 10, in_channels: int = 3,
                    strides: Sequence[int] | None = None) -> NormValue:
    """Evaluate the symbolic bound for one configuration; per-stage factors in ``details`` (ESTIMATE)."""
    depths, widths, strides = _check_config(depths, widths, strides)
    if weight_model == "fixed" and std is None:
        raise ValueError("weight_model='fixed' needs std=<entry standard deviation>")
    if input_size % math.prod(strides):
        raise ValueError(f"input_size {input_size} must be divisible by the total stride {math.prod(strides)}")
    ex = lipschitz_bound_expr(len(depths), weight_model, fc_model, strides)
    s = ex.symbols
    subs = _substitutions(s, depths, widths, strides, num_classes, in_channels, input_size)
    subs.update({s.bn_gain: bn_gain, s.std: std if std is not None else 1.0})
    stem, head = float(ex.stem.evalf(subs=subs)), float(ex.head.evalf(subs=subs))
    stages = [float(e.evalf(subs=subs)) for e in ex.stages]
    value = stem * math.prod(stages) * head
    return NormValue(value, Guarantee.ESTIMATE, f"symbolic_product[{weight_model}]", details={
        "stem": stem, "stages": stages, "head": head,
        "weight_model": weight_model, "fc_model": ex.fc_model, "bn_gain": bn_gain, "std": std,
        "depths": list(depths), "widths": list(widths), "strides": list(strides), "input_size": input_size})
