"""The symbolic WideResNet bound evaluated on trained weights, and a trained-weight model fitted across a sweep.

The closed form of ``lipschitz.theory.symbolic`` composes one norm per layer with the block rules (pre-activation
identity block ``1 + g1 c1 g2 c2``, projection block ``g1 (sc + c1 g2 c2)``, stem, head ``g pool fc``). Here the
same composition takes *per-layer* values:

- ``composed_bound(WRNNorms)``: the rule with any per-layer numbers. With each trained layer's certified norm and
  each batch norm's exact gain it is a certified upper bound of the trained network ("the theory with measured
  layer norms"), so the composition rule itself can be set against the certified and data bounds of the same
  model; with the random-matrix laws (``predicted_norms``) it reproduces ``symbolic.lipschitz_bound`` exactly.
- ``fit_trained_model(facts)``: per (stage, kind) a log-linear law ``log value = a + b log width + c depth`` for the
  layer norms, batch-norm gains and entry scales of trained layers across a sweep; ``predict_norms`` turns it into
  a ``WRNNorms`` for a new configuration, and ``leave_one_out`` measures how well it predicts configurations it
  did not see (the error on each).

References: Zagoruyko & Komodakis 2016 (WRN); Huang et al. 2021 (per-stage width/depth and robustness).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from spectral.guarantee import Guarantee, NormValue

KINDS = ("conv", "shortcut", "bn", "fc")


@dataclass(frozen=True)
class BlockNorms:
    """One pre-activation block: BN gains g1, g2, conv norms c1, c2 and the projection's norm (None: identity)."""

    bn1: float
    conv1: float
    bn2: float
    conv2: float
    shortcut: float | None = None

    @property
    def factor(self) -> float:
        """The block rule: identity ``1 + g1 c1 g2 c2``; projection ``g1 (sc + c1 g2 c2)``."""
        branch = self.conv1 * self.bn2 * self.conv2
        if self.shortcut is None:
            return 1.0 + self.bn1 * branch
        return self.bn1 * (self.shortcut + branch)


@dataclass(frozen=True)
class WRNNorms:
    """Per-layer values of a pre-activation WideResNet, in the order the symbolic bound composes them."""

    stem: float
    stages: tuple[tuple[BlockNorms, ...], ...]
    head_bn: float
    pool: float
    fc: float
    input_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def composed_bound(norms: WRNNorms, guarantee: Guarantee = Guarantee.ESTIMATE, method: str = "symbolic_rule") -> NormValue:
    """``input_scale * stem * prod_stages prod_blocks factor * head_bn * pool * fc`` with the stage factors in details.

    The label is the caller's: ``certified_upper`` when every input is a certified upper bound (layer norms) or
    exact (batch-norm gains, pooling), ``estimate`` for predicted norms.
    """
    stages = [math.prod(b.factor for b in stage) for stage in norms.stages]
    value = norms.input_scale * norms.stem * math.prod(stages) * norms.head_bn * norms.pool * norms.fc
    return NormValue(float(value), guarantee, method, details={
        "stem": norms.stem * norms.input_scale, "stages": stages, "head": norms.head_bn * norms.pool * norms.fc})


def predicted_norms(depths: Sequence[int], widths: Sequence[int], *, weight_model: str = "kaiming_normal_fan_out",
                    std: float | None = None, bn_gain: float = 1.0, input_size: int = 32, num_classes: int = 10,
                    in_channels: int = 3, strides: Sequence[int] | None = None) -> WRNNorms:
    """The leading-order random-matrix norm of every layer (as ``symbolic.lipschitz_bound`` uses them)."""
    from lipschitz.theory import symbolic

    depths, widths, strides = symbolic._check_config(depths, widths, strides)
    fc_model = "fixed" if weight_model == "fixed" else "pytorch_default"

    def conv(c_out: int, c_in: int, k: int, stride: int, model: str = weight_model) -> float:
        return float(symbolic.conv_norm_expr(c_out, c_in, k, stride, model, std))

    flags = symbolic.projection_flags(widths, strides)
    stages = []
    for i, depth in enumerate(depths):
        w_in, w = widths[i], widths[i + 1]
        first = BlockNorms(bn_gain, conv(w, w_in, 3, strides[i]), bn_gain, conv(w, w, 3, 1),
                           conv(w, w_in, 1, strides[i]) if flags[i] else None)
        rest = BlockNorms(bn_gain, conv(w, w, 3, 1), bn_gain, conv(w, w, 3, 1))
        stages.append((first,) + (rest,) * (depth - 1))
    side = input_size / math.prod(strides)
    return WRNNorms(conv(widths[0], in_channels, 3, 1), tuple(stages), bn_gain, 1.0 / side,
                    conv(num_classes, widths[-1], 1, 1, fc_model))


# ----------------------------------------------------------------------------------------------
# a trained-weight model fitted across configurations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFact:
    """One measured quantity of a trained layer: ``value`` (norm or BN gain) and the layer's entry std.

    ``stage``: "stem", "stage1".., "head"; ``kind``: conv, shortcut, bn or fc; ``width``/``depth``: of the stage the
    layer belongs to (stem: the stem width and depth 0; head: the last stage's width and depth).
    """

    stage: str
    kind: str
    width: int
    depth: int
    value: float
    entry_std: float | None = None


@dataclass(frozen=True)
class LogLinearLaw:
    """``log y = a + b log(width) + c depth`` (least squares, minimum-norm when a feature does not vary)."""

    a: float
    b: float
    c: float
    n: int
    residual_std: float

    def __call__(self, width: float, depth: float) -> float:
        return math.exp(self.a + self.b * math.log(width) + self.c * depth)


@dataclass
class TrainedWeightModel:
    """Fitted laws per (stage, kind) for the value (norm / BN gain) and the entry std of trained layers."""

    value: dict[tuple[str, str], LogLinearLaw] = field(default_factory=dict)
    entry_std: dict[tuple[str, str], LogLinearLaw] = field(default_factory=dict)

    def law(self, stage: str, kind: str) -> LogLinearLaw:
        if (stage, kind) not in self.value:
            raise ValueError(f"no fitted law for {kind} layers of {stage}; the sweep has none to fit it from")
        return self.value[(stage, kind)]

    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for key, law in sorted(self.value.items()):
            std = self.entry_std.get(key)
            rows.append({"stage": key[0], "kind": key[1], "n": law.n, "value_a": law.a, "value_width_exponent": law.b,
                         "value_depth_slope": law.c, "value_residual_std": law.residual_std,
                         "std_width_exponent": None if std is None else std.b,
                         "std_depth_slope": None if std is None else std.c,
                         "std_residual_std": None if std is None else std.residual_std})
        return rows


def fit_log_linear(points: Sequence[tuple[float, float, float]]) -> LogLinearLaw:
    """Fit ``log y = a + b log w + c d`` to ``(w, d, y)`` points (y > 0) by least squares (``numpy.linalg.lstsq``)."""
    pts = [(w, d, y) for w, d, y in points if w > 0 and y > 0 and math.isfinite(y)]
    if not pts:
        raise ValueError("no positive finite points to fit")
    X = np.array([[1.0, math.log(w), float(d)] for w, d, _ in pts])
    y = np.log([p[2] for p in pts])
    # centre the features so a constant feature gets slope 0 and the intercept its mean (minimum-norm solution)
    mean = X[:, 1:].mean(axis=0)
    Xc = np.column_stack([X[:, 0], X[:, 1:] - mean])
    coef, *_ = np.linalg.lstsq(Xc, y, rcond=None)
    a = coef[0] - float(coef[1:] @ mean)
    resid = y - Xc @ coef
    dof = max(1, len(pts) - int(np.linalg.matrix_rank(Xc)))
    return LogLinearLaw(float(a), float(coef[1]), float(coef[2]), len(pts), float(math.sqrt(resid @ resid / dof)))


def fit_trained_model(facts: Iterable[LayerFact]) -> TrainedWeightModel:
    """Per (stage, kind): the log-linear law of the values and of the entry stds of ``facts``."""
    groups: dict[tuple[str, str], list[LayerFact]] = {}
    for fact in facts:
        if fact.kind not in KINDS:
            raise ValueError(f"unknown layer kind {fact.kind!r}; valid: {', '.join(KINDS)}")
        groups.setdefault((fact.stage, fact.kind), []).append(fact)
    model = TrainedWeightModel()
    for key, members in groups.items():
        model.value[key] = fit_log_linear([(f.width, f.depth, f.value) for f in members])
        stds = [(f.width, f.depth, f.entry_std) for f in members if f.entry_std]
        if stds:
            model.entry_std[key] = fit_log_linear(stds)
    return model


def predict_norms(model: TrainedWeightModel, depths: Sequence[int], widths: Sequence[int], *, input_size: int,
                  strides: Sequence[int] | None = None, input_scale: float = 1.0) -> WRNNorms:
    """``WRNNorms`` of a configuration from the fitted laws (each layer gets its (stage, kind) law)."""
    from lipschitz.theory import symbolic

    depths, widths, strides = symbolic._check_config(depths, widths, strides)
    flags = symbolic.projection_flags(widths, strides)
    stages = []
    for i, depth in enumerate(depths):
        stage, w = f"stage{i + 1}", widths[i + 1]
        conv, bn = model.law(stage, "conv")(w, depth), model.law(stage, "bn")(w, depth)
        shortcut = model.law(stage, "shortcut")(w, depth) if flags[i] else None
        stages.append((BlockNorms(bn, conv, bn, conv, shortcut),) + (BlockNorms(bn, conv, bn, conv),) * (depth - 1))
    last_w, last_d = widths[-1], depths[-1]
    return WRNNorms(model.law("stem", "conv")(widths[0], 0), tuple(stages), model.law("head", "bn")(last_w, last_d),
                    math.prod(strides) / input_size, model.law("head", "fc")(last_w, last_d), input_scale)


@dataclass(frozen=True)
class HeldOut:
    """Prediction of one configuration from a model fitted on all the others."""

    config: str
    predicted: float
    measured: float
    rel_error: float
    stage_predicted: list[float]
    stage_measured: list[float]


def leave_one_out(facts_by_config: Mapping[str, Sequence[LayerFact]], measured: Mapping[str, float],
                  structure: Mapping[str, Mapping[str, Any]], stage_measured: Mapping[str, Sequence[float]] | None = None
                  ) -> list[HeldOut]:
    """For each configuration: fit on the others, predict its composed bound, compare with ``measured``.

    ``structure[config]``: ``depths``, ``widths``, ``input_size`` (and optional ``strides``, ``input_scale``).
    A configuration whose (stage, kind) laws cannot be fitted from the others is skipped.
    """
    out = []
    for config, value in measured.items():
        others = [f for c, facts in facts_by_config.items() if c != config for f in facts]
        if not others:
            continue
        model = fit_trained_model(others)
        s = structure[config]
        try:
            norms = predict_norms(model, s["depths"], s["widths"], input_size=int(s["input_size"]),
                                  strides=s.get("strides"), input_scale=float(s.get("input_scale", 1.0)))
        except ValueError:
            continue
        pred = composed_bound(norms)
        out.append(HeldOut(config, pred.value, float(value), pred.value / float(value) - 1.0,
                           list(pred.details["stages"]), list((stage_measured or {}).get(config, []))))
    return out
