"""Choose per-stage depths and widths that minimise the predicted Lipschitz bound under a parameter budget.

Two steps: (1) continuous relaxation -- the Lagrangian f(D, W) + lambda (P(D, W) - budget) is built in sympy and
its gradients drive SLSQP over real-valued depths/widths (the multiplier is reported from the KKT stationarity
condition); (2) exact integer search -- every integer depth and width-grid point in a box around the relaxed
optimum is evaluated with the exact P and objective, and feasible configurations are ranked.

Feasibility: ``min_fraction * budget <= P <= budget``. Without the lower end the bound is minimised by the smallest
network, which says nothing about how to *allocate* a budget; ``min_fraction=0`` restores plain ``P <= budget``.
Design space (defaults chosen to contain the architectures researchers train): 2..10 blocks per stage, stage widths
16..1024 on a grid of 16, non-decreasing from stage to stage (``monotone_widths=False`` lifts that, e.g. to reach
WRN-34-R's reduced last stage). ``reference_configs`` evaluates named architectures (as published and with their
widths scaled to the budget) with the same objective, for comparison.
References: Huang et al. 2021 (architecture under a parameter budget); Nocedal & Wright 2006 (KKT, SLSQP).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import sympy as sp

from lipschitz.theory import symbolic

Objective = Callable[[tuple[int, ...], tuple[int, ...]], float]


@dataclass(frozen=True)
class Configuration:
    """One candidate architecture with its exact parameter count and objective value."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]  # stem width first
    params: int
    objective: float
    bound: float | None = None  # the predicted network bound when the objective is the default log-bound

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReferenceConfiguration:
    """A named architecture evaluated with the search's objective; ``in_space``: whether the search could pick it."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    params: int
    objective: float
    bound: float | None
    in_space: bool
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConfigSearch:
    """Ranked configurations (best first) plus what the continuous relaxation found."""

    ranked: list[Configuration]
    relaxation: dict = field(default_factory=dict)
    evaluated: int = 0
    space: dict = field(default_factory=dict)
    objective: str = ""

    def __iter__(self):
        return iter(self.ranked)

    def __len__(self) -> int:
        return len(self.ranked)

    def __getitem__(self, i: int) -> Configuration:
        return self.ranked[i]

    def to_dict(self) -> dict:
        return {"ranked": [c.to_dict() for c in self.ranked], "relaxation": self.relaxation,
                "evaluated": self.evaluated, "space": self.space, "objective": self.objective}


def _objective_functions(objective, n_stages: int, weight_model: str, std: float | None, bn_gain: float,
                         input_size: int, num_classes: int, in_channels: int, strides: tuple[int, ...]):
    """(sympy objective in D, W, pi with the fixed quantities substituted, or None for a callable;
    whether it is the default log-bound; the symbols)."""
    s = symbolic.wrn_symbols(n_stages)
    fixed = {s.num_classes: num_classes, s.in_channels: in_channels, s.input_size: input_size,
             s.bn_gain: bn_gain, s.std: std if std is not None else 1.0}
    if objective is None:
        ex = symbolic.lipschitz_bound_expr(n_stages, weight_model, None, strides, symbols=s)
        expr = sp.expand_log(sp.log(ex.network), force=True).subs(fixed)
        is_default = True
    elif isinstance(objective, sp.Expr):
        names = {sym.name: sym for sym in (*s.depths, *s.widths, *s.projections)}
        expr = objective.subs({sym: names.get(sym.name, sym) for sym in objective.free_symbols}).subs(fixed)
        extra = {sym.name for sym in expr.free_symbols} - set(names)
        if extra:
            raise ValueError(f"objective has unknown symbols {sorted(extra)}; use D1.., W0.., pi1.. only")
        is_default = False
    elif callable(objective):
        return None, False, s
    else:
        raise TypeError(f"objective must be None, a sympy expression or a callable(depths, widths), got {objective!r}")
    return expr, is_default, s


def optimal_config(budget: int, objective: sp.Expr | Objective | None = None, *, n_stages: int = 3,
                   weight_model: str = "fixed", std: float | None = 0.05, bn_gain: float = 1.0,
                   stem_width: int = 16, strides: Sequence[int] | None = None, num_classes: int = 10,
                   in_channels: int = 3, input_size: int = 32, min_fraction: float = 0.9,
                   depth_range: tuple[int, int] = (2, 10), width_range: tuple[int, int] = (16, 1024),
                   width_step: int = 16, monotone_widths: bool = True, max_width_ratio: float | None = 4.0,
                   depth_radius: int = 2,
                   width_radius: float = 0.5, top_k: int = 10, n_starts: int = 8, seed: int = 0) -> ConfigSearch:
    """Minimise an objective (default: log of the symbolic Lipschitz bound) over integer depths/widths with P <= budget.

    ``objective``: None, a sympy expression in the symbols D1.., W0.., pi1.. of ``symbolic.wrn_symbols``, or a
    callable ``f(depths, widths) -> float`` (it is also called with float tuples during the relaxation; if that
    fails the integer search is centred on the starting points). Widths are multiples of ``width_step`` in
    ``width_range``; depths in ``depth_range``; ``monotone_widths``: stage widths non-decreasing;
    ``max_width_ratio``: each stage at most that many times wider than the one before (None: no limit). The bound is
    multimodal (the budget can go to any one stage), so the relaxation is solved from ``n_starts`` starting points
    (uniform, the budget in one stage or in a suffix of stages, seeded random) and the integer search runs around
    every local optimum. Returns the ``top_k`` feasible configurations, best first, with the design space and the
    objective in words (``space``, ``objective``).
    """
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer number of parameters, got {budget!r}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction!r}")
    if depth_range[0] < 1 or depth_range[0] > depth_range[1]:
        raise ValueError(f"depth_range must be (lo, hi) with 1 <= lo <= hi, got {depth_range!r}")
    if width_step < 1 or width_range[0] < 1 or width_range[0] > width_range[1]:
        raise ValueError(f"width_range/width_step invalid: {width_range!r}, {width_step!r}")
    strides = tuple(strides) if strides is not None else symbolic.default_strides(n_stages)
    if len(strides) != n_stages:
        raise ValueError(f"strides needs {n_stages} entries, got {list(strides)}")
    if weight_model == "fixed" and std is None:
        raise ValueError("weight_model='fixed' needs std=<entry standard deviation>")

    expr, is_default, s = _objective_functions(objective, n_stages, weight_model, std, bn_gain, input_size,
                                                  num_classes, in_channels, strides)
    p_expr = symbolic.param_count_expr(symbols=s).subs({s.num_classes: num_classes, s.in_channels: in_channels})
    args = (*s.depths, *s.widths, *s.projections)
    p_fn = sp.lambdify(args, p_expr, "numpy")
    if expr is not None:
        f_fn = sp.lambdify(args, expr, "numpy")

        def evaluate(depths, widths, flags):
            return f_fn(*depths, *widths, *flags)
    else:
        def evaluate(depths, widths, flags):
            return np.array([float(objective(tuple(int(v) for v in d), tuple(int(v) for v in w)))
                             for d, w in zip(zip(*depths), zip(*widths))], dtype=float)

    if max_width_ratio is not None and not max_width_ratio >= 1:
        raise ValueError(f"max_width_ratio must be >= 1 or None, got {max_width_ratio!r}")
    shape = {"monotone": monotone_widths, "ratio": max_width_ratio}
    starts = _starting_points(p_expr, s, budget, stem_width, depth_range, width_range, n_starts, seed,
                              monotone_widths)
    local = [_relax(expr, objective, p_expr, s, budget, min_fraction, stem_width, x0, depth_range, width_range,
                    shape) for x0 in starts]
    local.sort(key=lambda r: (not r["success"], r.get("objective", math.inf)))
    merged: dict[tuple, Configuration] = {}
    evaluated = 0
    for rel in local:  # exact integer search around every distinct local optimum of the relaxation
        ranked, count = _integer_search(rel["depths"], rel["widths"], budget, min_fraction, stem_width, strides,
                                        depth_range, width_range, width_step, depth_radius, width_radius, p_fn,
                                        evaluate, top_k, is_default, shape)
        evaluated += count
        for c in ranked:
            merged.setdefault((c.depths, c.widths), c)
    ranked = sorted(merged.values(), key=lambda c: (c.objective, c.params))[:top_k]
    relaxation = dict(local[0])
    relaxation["local_optima"] = [{k: r.get(k) for k in ("depths", "widths", "objective", "success", "params")}
                                  for r in local]
    space = {"stages": n_stages, "depth_range": list(depth_range), "width_range": list(width_range),
             "width_step": width_step, "monotone_widths": monotone_widths, "max_width_ratio": max_width_ratio,
             "stem_width": stem_width,
             "params": [math.ceil(min_fraction * budget), budget], "strides": list(strides)}
    return ConfigSearch(ranked, relaxation, evaluated, space,
                        describe_objective(objective, weight_model, std, bn_gain))


def describe_objective(objective, weight_model: str, std: float | None, bn_gain: float) -> str:
    """The objective in words (what is minimised, under which weight model)."""
    if objective is not None:
        return "a user objective" + (f" ({objective})" if isinstance(objective, sp.Expr) else "")
    weights = (f"iid N(0, {std:g}^2) entries in every conv/linear layer ('fixed' weight model)"
               if weight_model == "fixed" else f"the {weight_model} initialisation")
    return (f"log of the predicted Lipschitz bound of the network (product over layers of random-matrix "
            f"spectral-norm predictions, residual blocks 1 + branch, BN gain {bn_gain:g}) with weights drawn as "
            f"{weights}; an a-priori estimate, not a measured or certified robustness")


def _monotone(widths: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(widths[1:], widths[2:]))


def _ratio_ok(widths: Sequence[float], ratio: float | None) -> bool:
    return ratio is None or all(b <= ratio * a for a, b in zip(widths[1:], widths[2:]))


def scale_to_budget(depths: Sequence[int], widths: Sequence[int], budget: int, *, width_step: int = 16,
                    num_classes: int = 10, in_channels: int = 3, strides: Sequence[int] | None = None
                    ) -> tuple[tuple[int, ...], float]:
    """The stage widths times one common factor (rounded to ``width_step``; stem kept) with the most parameters
    that still fit ``budget``; returns the widths and the factor."""
    def widths_at(c: float) -> tuple[int, ...]:
        return (widths[0], *(max(width_step, int(round(c * w / width_step)) * width_step) for w in widths[1:]))

    def params(c: float) -> int:
        return symbolic.param_count(depths, widths_at(c), num_classes, in_channels, strides)

    lo, hi = 0.0, 1.0
    while params(hi) <= budget and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid)
    return widths_at(lo), lo


def reference_configs(references: dict[str, tuple[Sequence[int], Sequence[int]]], search: ConfigSearch,
                      budget: int, *, weight_model: str = "fixed", std: float | None = 0.05, bn_gain: float = 1.0,
                      num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                      strides: Sequence[int] | None = None, min_fraction: float = 0.9) -> list[ReferenceConfiguration]:
    """Each named architecture as published and with its widths scaled to ``budget``, with the default objective
    (log of the predicted bound) under the same weight model, and whether ``search``'s design space contains it."""
    space = search.space
    rows = []
    for name, (depths, widths) in references.items():
        variants = [(name, tuple(widths), "as published")]
        scaled, factor = scale_to_budget(depths, widths, budget, width_step=space.get("width_step", 16),
                                         num_classes=num_classes, in_channels=in_channels, strides=strides)
        if tuple(scaled) != tuple(widths):
            variants.append((f"{name} x{factor:.2f}", scaled, "widths scaled to the budget"))
        for label, w, how in variants:
            p = symbolic.param_count(depths, w, num_classes, in_channels, strides)
            bound = symbolic.lipschitz_bound(depths, w, weight_model=weight_model, std=std, bn_gain=bn_gain,
                                             input_size=input_size, num_classes=num_classes, in_channels=in_channels,
                                             strides=strides).value
            misses = _outside(space, depths, w, p)
            note = how + ("" if not misses else "; outside the design space: " + ", ".join(misses))
            rows.append(ReferenceConfiguration(label, tuple(depths), tuple(w), p, math.log(bound), bound,
                                               not misses, note))
    return rows


def _outside(space: dict, depths: Sequence[int], widths: Sequence[int], params: int) -> list[str]:
    misses = []
    lo, hi = space.get("params", [0, math.inf])
    if params > hi:
        misses.append(f"{params - hi:,} parameters over budget")
    elif params < lo:
        misses.append(f"below the {lo:,}-parameter floor")
    d_lo, d_hi = space.get("depth_range", [1, math.inf])
    if not all(d_lo <= d <= d_hi for d in depths):
        misses.append(f"depths outside {d_lo}..{d_hi}")
    w_lo, w_hi = space.get("width_range", [1, math.inf])
    if not all(w_lo <= w <= w_hi for w in widths[1:]):
        misses.append(f"widths outside {w_lo}..{w_hi}")
    if space.get("monotone_widths") and not _monotone(widths):
        misses.append("widths not non-decreasing")
    if not _ratio_ok(widths, space.get("max_width_ratio")):
        misses.append(f"a stage more than {space['max_width_ratio']:g}x wider than the one before")
    return misses


def _starting_points(p_expr, s, budget, stem_width, depth_range, width_range, n_starts, seed,
                     monotone: bool = False) -> list:
    """Uniform allocation, the budget concentrated in each single stage (with monotone widths: in each suffix of
    stages), then seeded random allocations."""
    n = len(s.depths)
    p_rel = p_expr.subs({s.widths[0]: stem_width, **{pi: 1 for pi in s.projections}})
    d0 = float(min(max(5, depth_range[0]), depth_range[1]))
    w_uniform = _fill_width(p_rel, s, budget, [d0] * n, [None] * n, width_range)
    starts = [np.array([d0] * n + [w_uniform] * n)]
    lo_d = float(depth_range[0])
    for i in range(n):
        widths = [float(width_range[0])] * n
        for j in range(i, n if monotone else i + 1):
            widths[j] = None
        w_i = _fill_width(p_rel, s, budget, [lo_d] * n, widths, width_range)
        starts.append(np.array([lo_d] * n + [w_i if w is None else w for w in widths]))
    rng = np.random.default_rng(seed)
    while len(starts) < max(n_starts, n + 1):
        depths = list(rng.uniform(depth_range[0], depth_range[1], n))
        shares = rng.dirichlet(np.ones(n))
        widths = [float(np.clip(math.sqrt(sh * budget / (18 * d)), *width_range)) for sh, d in zip(shares, depths)]
        starts.append(np.array(depths + (sorted(widths) if monotone else widths)))
    return starts


def _fill_width(p_rel, s, budget, depths, widths, width_range) -> float:
    """Width w for the stages marked None in ``widths`` that makes P = budget (clipped to width_range)."""
    w = sp.Symbol("w", positive=True)
    subs = {d: v for d, v in zip(s.depths, depths)}
    subs.update({wi: (w if v is None else v) for wi, v in zip(s.widths[1:], widths)})
    roots = [float(r) for r in sp.solve(p_rel.subs(subs) - budget, w) if r.is_real and r > 0]
    w0 = max(roots) if roots else float(width_range[0])
    return float(min(max(w0, width_range[0]), width_range[1]))


def _relax(expr, objective, p_expr, s, budget, min_fraction, stem_width, x0, depth_range, width_range,
           shape: dict | None = None) -> dict:
    """Continuous relaxation: SLSQP on the sympy Lagrangian's gradients (all projection flags 1); ``shape``
    adds the linear constraints W_(i+1) >= W_i (monotone) and W_(i+1) <= ratio W_i."""
    from scipy.optimize import minimize

    n = len(s.depths)
    variables = (*s.depths, *s.widths[1:])
    fixed = {s.widths[0]: stem_width}
    fixed.update({pi: 1 for pi in s.projections})
    p_rel = p_expr.subs(fixed)
    lam = sp.Symbol("lambda")
    scale = np.array([1.0] * n + [max(float(np.mean(x0[n:])), 1.0)] * n)  # optimise in scaled units
    bounds = [(depth_range[0], depth_range[1])] * n + [(width_range[0], width_range[1])] * n
    info: dict = {"method": "slsqp_on_sympy_lagrangian", "success": False}
    if expr is not None:
        f_rel = expr.subs(fixed)
        lagrangian = f_rel + lam * (p_rel - budget)
        grad_f = sp.lambdify(variables, [sp.diff(f_rel, v) for v in variables], "numpy")
        grad_p = sp.lambdify(variables, [sp.diff(p_rel, v) for v in variables], "numpy")
        f_num = sp.lambdify(variables, f_rel, "numpy")
        info["lagrangian"] = str(lagrangian)
        fun = lambda z: float(f_num(*(z * scale)))  # noqa: E731
        jac = lambda z: np.asarray(grad_f(*(z * scale)), dtype=float) * scale  # noqa: E731
    else:
        grad_p = sp.lambdify(variables, [sp.diff(p_rel, v) for v in variables], "numpy")

        def fun(z):
            x = z * scale
            return float(objective(tuple(x[:n]), (float(stem_width), *x[n:])))
        jac = None
    p_num = sp.lambdify(variables, p_rel, "numpy")
    cons = [
        {"type": "ineq", "fun": lambda z: (budget - float(p_num(*(z * scale)))) / budget,
         "jac": lambda z: -np.asarray(grad_p(*(z * scale)), dtype=float) * scale / budget},
        {"type": "ineq", "fun": lambda z: (float(p_num(*(z * scale))) - min_fraction * budget) / budget,
         "jac": lambda z: np.asarray(grad_p(*(z * scale)), dtype=float) * scale / budget},
    ]
    shape = shape or {}
    for i in range(n - 1):
        rows = []
        if shape.get("monotone"):
            rows.append((-1.0, 1.0))
        if shape.get("ratio") is not None:
            rows.append((float(shape["ratio"]), -1.0))
        for a, b in rows:
            row = np.zeros(2 * n)
            row[n + i], row[n + i + 1] = a * scale[n + i], b * scale[n + i + 1]
            cons.append({"type": "ineq", "fun": lambda z, r=row: float(r @ z), "jac": lambda z, r=row: r})
    try:
        res = minimize(fun, x0 / scale, jac=jac, method="SLSQP", constraints=cons,
                       bounds=[(lo / sc, hi / sc) for (lo, hi), sc in zip(bounds, scale)],
                       options={"maxiter": 300, "ftol": 1e-10})
        x = res.x * scale
        info.update(success=bool(res.success), message=str(res.message), objective=float(res.fun))
        if jac is not None:
            gf, gp = np.asarray(grad_f(*x), dtype=float), np.asarray(grad_p(*x), dtype=float)
            lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
            free = (x > lo + 1e-6 * scale) & (x < hi - 1e-6 * scale)  # box-active variables have own multipliers
            if free.any() and gp[free] @ gp[free] > 0:
                # least-squares multiplier of the budget constraint: grad f + lambda grad P = 0 on free variables
                mult = -float(gf[free] @ gp[free] / (gp[free] @ gp[free]))
                info.update(multiplier=mult, kkt_residual=float(np.linalg.norm(gf[free] + mult * gp[free])),
                            free_variables=[str(v) for v, f in zip(variables, free) if f])
    except (ValueError, TypeError, ArithmeticError) as err:  # a user callable that needs integers
        x = x0
        info.update(message=f"relaxation skipped: {err}")
    info.update(depths=[float(v) for v in x[:n]], widths=[float(stem_width)] + [float(v) for v in x[n:]],
                params=float(p_num(*x)))
    return info


def _integer_search(depths_rel, widths_rel, budget, min_fraction, stem_width, strides, depth_range, width_range,
                    width_step, depth_radius, width_radius, p_fn, evaluate, top_k, is_default, shape=None):
    n = len(depths_rel)
    depth_sets = []
    for d in depths_rel:
        lo = max(depth_range[0], int(math.floor(d)) - depth_radius)
        hi = min(depth_range[1], int(math.ceil(d)) + depth_radius)
        depth_sets.append(list(range(lo, hi + 1)))
    grid_lo = -(-width_range[0] // width_step) * width_step
    grid = np.arange(grid_lo, width_range[1] + 1, width_step)
    width_sets = []
    for w in widths_rel[1:]:
        lo, hi = w / (1 + width_radius), w * (1 + width_radius)
        near = grid[(grid >= lo - width_step) & (grid <= hi + width_step)]
        if near.size == 0:
            near = grid[[int(np.argmin(np.abs(grid - w)))]]
        width_sets.append([int(v) for v in near])
    combos = np.array(list(itertools.product(*depth_sets, *width_sets)), dtype=np.int64)
    shape = shape or {}
    if shape.get("monotone") and combos.size:
        combos = combos[np.all(np.diff(combos[:, n:], axis=1) >= 0, axis=1)]
    if shape.get("ratio") is not None and combos.size:
        combos = combos[np.all(combos[:, n + 1:] <= shape["ratio"] * combos[:, n:-1], axis=1)]
    if combos.size == 0:
        return [], 0
    D = [combos[:, i] for i in range(n)]
    W = [np.full(len(combos), stem_width, dtype=np.int64)] + [combos[:, n + i] for i in range(n)]
    flags = [((W[i] != W[i + 1]) | (strides[i] != 1)).astype(np.int64) for i in range(n)]
    params = np.asarray(p_fn(*D, *W, *flags), dtype=np.float64)
    feasible = (params <= budget) & (params >= min_fraction * budget)
    idx = np.nonzero(feasible)[0]
    if idx.size == 0:
        return [], len(combos)
    values = np.broadcast_to(np.asarray(evaluate([d[idx] for d in D], [w[idx] for w in W],
                                                 [f[idx] for f in flags]), dtype=float), idx.shape)
    order = np.lexsort((params[idx], values))[:top_k]
    ranked = []
    for j in order:
        k = idx[j]
        value = float(values[j])
        ranked.append(Configuration(tuple(int(d[k]) for d in D), tuple(int(w[k]) for w in W), int(params[k]),
                                    value, math.exp(value) if is_default else None))
    return ranked, len(combos)

