"""Local Lipschitz certificates on an input ball and certified robust radii per example.

``local_bound(model, x, eps, norm)`` certifies an upper bound of the l2 Lipschitz constant of the network on
the ball B(x, eps) (l2 or linf, intersected with the input domain, [0, 1] by default), and of each logit
difference f_c - f_j. Pre-activation intervals over the ball come from interval bound propagation,
intersected with a Lipschitz enclosure |z_i(x') - z_i(x)| <= L_i |x' - x| from the LipSDP chain of the
layers before (both rigorous, refined over ``passes``); a ReLU/LeakyReLU whose interval excludes 0 has an
exact slope (0, s or 1) and is substituted instead of relaxed; the others keep the slope bounds [s, 1].
The LipSDP chain (lipschitz.sdp) on the remaining neurons gives the certificate.

``certified_radius(model, x, label, norm)``: with margins m_j = f_c(x) - f_j(x) > 0 and L_j the local
constant of f_c - f_j on B(x, r): for x' in the ball, f_c(x') - f_j(x') >= m_j - L_j |x' - x| > 0 whenever
r * L_j(r) < m_j for every j (pairwise rule; the whole-output rule m_j > sqrt(2) L(r) r follows from
|e_c - e_j| = sqrt(2)). A radius is reported only if the constant was certified on a ball at least that
large; the largest such r is found by bisection. For linf, |x' - x|_2 <= the l2 norm of the per-coordinate
reach of the box, so the l2 constant on the linf ball times that norm bounds the change.
Proofs: docs/network-bounds.md, "Local certificates".
References: Fazlyab et al. 2019 (LipSDP); Gowal et al. 2018 (IBP); Hein & Andriushchenko 2017 (margin /
local Lipschitz radii); Weng et al. 2018 (local Lipschitz certificates).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import lipschitz.graph as G
from lipschitz.dense import EPS, NotDense, gamma, lower
from lipschitz.sdp import _Chain, chain_bound, verify_psd

NORMS = ("l2", "linf")
WIDEN = 1e-9  # relative widening of every interval for float64 round-off (errors are ~1e-15 relative)


@dataclass
class LocalBound:
    """Certified local l2 Lipschitz bounds on B(x, eps) (l2 or linf ball, intersected with the domain)."""

    value: float  # whole output map, l2 -> l2
    rows: list[float] | None  # per requested output functional (e.g. logit differences)
    eps: float
    norm: str
    unstable: int  # neurons relaxed by slope bounds
    neurons: int  # all activation neurons
    reach_l2: float  # max |x' - x|_2 over the (clipped) ball
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class RadiusResult:
    """A certified robust radius of one example (0 when misclassified or nothing could be certified)."""

    index: int
    label: int
    predicted: int
    margin: float
    norm: str
    certified_radius: float
    checked_eps: float  # the ball on which the certifying local constant was computed
    local_lipschitz: float | None  # max_j L_j on that ball (pairwise constants)
    global_radius: float  # from the network's global certificate alone (0 if not given)
    unstable_fraction: float | None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------ intervals

def _widen(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return r + WIDEN * (c.abs() + r) + 1e-300


def _interval(node, c: torch.Tensor, r: torch.Tensor, acts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, radius) enclosure of the node's output for inputs in [c - r, c + r]; records activation inputs."""
    from lipschitz.rules import activation_slope, batchnorm_scale, pool_is_linear

    if isinstance(node, G.Sequential):
        for child in node.children:
            c, r = _interval(child, c, r, acts)
        return c, r
    if isinstance(node, G.Residual):
        cb, rb = _interval(node.branch, c, r, acts)
        cs, rs = (c, r) if node.shortcut is None else _interval(node.shortcut, c, r, acts)
        return cb + cs, _widen(cb + cs, rb + rs)
    if isinstance(node, G.Layer):
        m = node.module
        w = m.weight.abs()
        rr = r + WIDEN * c.abs()  # the dot products' round-off is relative to |W| |c|, not to |W c|
        if isinstance(m, nn.Linear):
            return m(c), _widen(m(c), F.linear(rr, w))
        conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
        if m.padding_mode != "zeros":
            raise NotDense(f"local intervals support zero padding only, got {m.padding_mode!r}")
        return m(c), _widen(m(c), conv(rr, w, None, m.stride, m.padding, m.dilation, m.groups))
    if isinstance(node, G.BatchNorm):
        d = batchnorm_scale(node.module).abs().view((1, -1) + (1,) * (c.dim() - 2))
        return node.module(c), _widen(node.module(c), r * d)
    if isinstance(node, G.Normalize):
        view = (1, -1) + (1,) * (c.dim() - 2)
        std = torch.as_tensor(node.std, dtype=c.dtype).view(view)
        return (c - torch.as_tensor(node.mean, dtype=c.dtype).view(view)) / std, _widen(c, r / std)
    if isinstance(node, G.Pool):
        if pool_is_linear(node.module):
            return node.module(c), _widen(node.module(c), node.module(r + WIDEN * c.abs()))
        lo, hi = node.module(c - r), node.module(c + r)
        return (lo + hi) / 2, _widen(lo + hi, (hi - lo) / 2)
    if isinstance(node, G.Flatten):
        return c.flatten(1), r.flatten(1)
    if isinstance(node, G.Identity):
        return c, r
    if isinstance(node, G.Activation):
        acts[id(node)] = (c, r)
        if node.kind in ("relu", "leaky_relu", "tanh", "softplus", "identity") and \
                not (node.kind == "leaky_relu" and node.params.get("negative_slope", 0.01) < 0):
            lo, hi = G.activation_fn(node.kind, node.params, c - r), G.activation_fn(node.kind, node.params, c + r)
            return (lo + hi) / 2, _widen(lo + hi, (hi - lo) / 2)
        ca = G.activation_fn(node.kind, node.params, c)
        return ca, _widen(ca, r * activation_slope(node.kind, node.params).value)
    raise NotDense(f"local intervals: unsupported node {type(node).__name__}")


def _slopes(acts: dict, at_x: dict, root, refined: dict) -> dict:
    """Per-neuron exact slopes where a piecewise-linear activation's interval excludes its kink.

    The range of a pre-activation over the ball is the intersection of the IBP interval ``acts`` and
    z(x) +- (refined radius + the round-off allowance of z(x) itself, ``at_x`` from a zero-width IBP pass)."""
    out = {}
    for node in G.iter_nodes(root):
        if not isinstance(node, G.Activation) or id(node) not in acts:
            continue
        c, r = acts[id(node)]
        c, r = c.flatten(), r.flatten()
        lo, hi = c - r, c + r
        if id(node) in refined and id(node) in at_x:
            z, slack = at_x[id(node)]
            rho = refined[id(node)] + slack.flatten()
            lo, hi = torch.maximum(lo, z.flatten() - rho), torch.minimum(hi, z.flatten() + rho)
        if node.kind == "relu":
            s_neg, s_pos = 0.0, 1.0
        elif node.kind == "leaky_relu" and 0 <= node.params.get("negative_slope", 0.01) <= 1:
            s_neg, s_pos = float(node.params.get("negative_slope", 0.01)), 1.0
        else:
            continue
        alpha = torch.full_like(c, s_neg)
        beta = torch.full_like(c, s_pos)
        alpha[lo > 0] = s_pos
        beta[hi < 0] = s_neg
        out[id(node)] = (alpha, beta)
    return out


# ------------------------------------------------------------------------- refinement

def _lambda_min_lower(Q: torch.Tensor, L: torch.Tensor) -> float:
    """A verified lower bound of lambda_min(Q): half of 1 / tr(Q^-1), checked by verify_psd."""
    Linv = torch.linalg.solve_triangular(L, torch.eye(len(Q), dtype=Q.dtype), upper=False)
    mu = 0.5 / float((Linv * Linv).sum())
    return mu if verify_psd(Q - mu * torch.eye(len(Q), dtype=Q.dtype), 0.0) else 0.0


def _enclosure(Q: torch.Tensor, A: torch.Tensor, A_err: float) -> torch.Tensor | None:
    """Certified L_i with |A_i ds| <= L_i |dx| for states with ds^T Q ds <= |dx|^2 (Q verified).

    For v = Q^-1 a (numerical) and r = a - Q v: a^T ds = v^T Q ds + r^T ds, |v^T Q ds| <= sqrt(v^T Q v)|dx|,
    |r^T ds| <= |r| |ds| <= |r| |dx| / sqrt(lambda_min(Q)); floating-point errors of Qv, v^T Q v bounded by
    gamma_n |Q|_F |v|; the error of A itself adds A_err / sqrt(lambda_min).
    """
    L, info = torch.linalg.cholesky_ex(Q)
    if int(info) != 0:
        return None
    mu = _lambda_min_lower(Q, L)
    if mu <= 0:
        return None
    V = torch.cholesky_solve(A.T.contiguous(), L)
    QV = Q @ V
    n, qf = len(Q), float(torch.linalg.matrix_norm(Q))
    vn = torch.linalg.vector_norm(V, dim=0)
    quad = (V * QV).sum(0) + gamma(n + 2) * qf * vn * vn
    res = torch.linalg.vector_norm(A.T - QV, dim=0) + gamma(n + 2) * qf * vn + A_err
    return (torch.sqrt(quad.clamp_min(0)) + res / math.sqrt(mu)) * (1 + 8 * EPS)


def _refine(prog, lams, refined: dict, reach: float) -> None:
    """Tighter radii of each unstable pre-activation from the verified chain states (in place)."""
    from lipschitz.sdp import _verified_chain

    ch = _Chain(prog)
    states = []
    _verified_chain(ch, lams, states)
    for (A, A_err, *_), st, Q in zip(ch.plan, prog.steps, states):
        if st.node is None:
            continue
        lip = _enclosure(Q, A, A_err)
        if lip is None:
            continue
        full = refined[id(st.node)]
        rows = st.rows if st.rows is not None else torch.arange(len(lip))
        full[rows] = torch.minimum(full[rows], lip * reach * (1 + 1e-12))


# ----------------------------------------------------------------------------- API

def _prepare(model_or_graph, input_shape):
    from lipschitz.trace import graph_from_module

    root = (model_or_graph if not isinstance(model_or_graph, nn.Module)
            else graph_from_module(model_or_graph, tuple(input_shape)))
    root = copy.deepcopy(root)
    for n in G.iter_nodes(root):
        if isinstance(n, (G.Layer, G.BatchNorm, G.Pool)):
            n.module.double().eval()
    return root


@dataclass
class LocalContext:
    """A float64 copy of the graph with, per activation, certified global Lipschitz constants of each
    pre-activation neuron (from the verified global LipSDP chain), reused for every ball."""

    root: Any
    neuron_lipschitz: dict  # id(activation node) -> (n,) tensor, |z_i(x1) - z_i(x2)| <= L_i |x1 - x2|_2


def prepare_local(model_or_graph, input_shape, max_state: int = 4096) -> LocalContext:
    """Build the ``LocalContext`` of a network (one global chain; falls back to no enclosure if too large)."""
    from lipschitz.graph import interpret

    root = _prepare(model_or_graph, tuple(input_shape))
    shapes: dict = {}
    with torch.no_grad():
        interpret(root, torch.zeros((1,) + tuple(input_shape), dtype=torch.float64), shapes)
    radii = {id(n): torch.full((math.prod(shapes[id(n)][0]),), math.inf, dtype=torch.float64)
             for n in G.iter_nodes(root) if isinstance(n, G.Activation)}
    try:
        prog = lower(root, shapes)
        if prog.max_state() <= max_state and prog.steps:
            _refine(prog, chain_bound(prog, iters=0).lams, radii, 1.0)
    except (NotDense, ValueError):
        pass
    return LocalContext(root, radii)


def _ball(x: torch.Tensor, eps: float, norm: str, domain):
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = lo.clamp(min=domain[0]), hi.clamp(max=domain[1])
    c, r = (lo + hi) / 2, (hi - lo) / 2
    if norm == "l2":
        reach = eps
    else:
        reach = float(torch.linalg.vector_norm(torch.maximum(x - lo, hi - x)))
    return c, r, reach


def local_bound(model_or_graph, x: torch.Tensor, eps: float, norm: str = "l2", *, rows: torch.Tensor | None = None,
                domain: tuple[float, float] | None = (0.0, 1.0), passes: int = 2, iters: int = 0,
                max_state: int = 4096, context: LocalContext | None = None) -> LocalBound:
    """Certified l2 Lipschitz constant of the network on B(x, eps) (see module docstring).

    ``x``: one input without batch dimension. ``rows``: optional (r, n_out) functionals (e.g. e_c - e_j)
    whose own local constants are certified too. ``passes``: interval refinement rounds.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    t0 = time.perf_counter()
    context = context if context is not None else prepare_local(model_or_graph, tuple(x.shape), max_state)
    root = context.root
    from lipschitz.graph import interpret

    x64 = x.detach().to(torch.float64)[None]
    shapes: dict = {}
    with torch.no_grad():
        interpret(root, x64, shapes)
        c, r, reach = _ball(x64, eps, norm, domain)
        acts: dict = {}
        _interval(root, c, r, acts)
        at_x: dict = {}
        _interval(root, x64, torch.zeros_like(x64), at_x)  # z(x) with its own round-off allowance
    refined = {}
    for k in acts:
        lip = context.neuron_lipschitz[k]
        refined[k] = torch.where(torch.isfinite(lip), lip * reach, torch.full_like(lip, math.inf))
    result = None
    for p in range(max(1, passes)):
        slopes = _slopes(acts, at_x, root, refined)
        prog = lower(root, shapes, slopes=slopes)
        if prog.max_state() > max_state:
            raise NotDense(f"local program state {prog.max_state()} exceeds max_state={max_state}")
        result = chain_bound(prog, iters=iters, rows=rows)
        if p + 1 < passes and prog.steps:
            _refine(prog, result.lams, refined, reach)
    unstable = sum(len(st.alpha) for st in prog.steps)
    neurons = sum(math.prod(shapes[id(n)][0]) for n in G.iter_nodes(root) if isinstance(n, G.Activation)
                  and n.kind != "identity")
    return LocalBound(result.value, None if result.rows is None else result.rows.tolist(), eps, norm, unstable,
                      neurons, reach, time.perf_counter() - t0, {"passes": passes, "chain": result.details})


def _pair_rows(n_out: int, label: int) -> torch.Tensor:
    rows = [torch.nn.functional.one_hot(torch.tensor(label), n_out).double() -
            torch.nn.functional.one_hot(torch.tensor(j), n_out).double() for j in range(n_out) if j != label]
    return torch.stack(rows)


def _certified_at(ctx, x, margins, rows, r, norm, domain, passes, max_state) -> tuple[bool, float | None, LocalBound | None]:
    try:
        lb = local_bound(None, x, r, norm, rows=rows, domain=domain, passes=passes, max_state=max_state, context=ctx)
    except (ValueError, NotDense):
        return False, None, None
    lips = torch.tensor(lb.rows, dtype=torch.float64)
    return bool((lips * lb.reach_l2 < margins).all()), float(lips.max()), lb


def certified_radius(model_or_graph, x: torch.Tensor, label: int, norm: str = "l2", *, eps_max: float = 1.0,
                     steps: int = 6, global_bound: float | None = None, domain=(0.0, 1.0), passes: int = 2,
                     max_state: int = 4096, index: int = 0, probe: tuple[float, ...] = (),
                     context: LocalContext | None = None) -> RadiusResult:
    """Largest r (bisection on [r_global, eps_max], ``steps`` halvings) with a pairwise-margin certificate on B(x, r).

    ``global_bound``: a certified global l2 constant of the whole output; then r_global = min_j m_j /
    (sqrt(2) L) (l2) is certified without local work. ``probe``: radii checked first (e.g. 0.1, 0.25), so
    that "certified at r" is decided exactly there. Margins are computed in float64 and reduced by 1e-9
    relative for round-off. Misclassified inputs get radius 0.
    """
    t0 = time.perf_counter()
    ctx = context if context is not None else prepare_local(model_or_graph, tuple(x.shape), max_state)
    root = ctx.root
    from lipschitz.graph import interpret

    with torch.no_grad():
        logits = interpret(root, x.detach().to(torch.float64)[None])[0]
    pred = int(logits.argmax())
    n_out = logits.numel()
    if pred != label:
        return RadiusResult(index, label, pred, 0.0, norm, 0.0, 0.0, None, 0.0, None, time.perf_counter() - t0)
    rows = _pair_rows(n_out, label)
    margins = rows @ logits
    margins = margins - 1e-9 * float(logits.abs().max()) - 1e-300
    m = float(margins.min())
    r_glob = 0.0
    if global_bound is not None and global_bound > 0:
        r_glob = m / (math.sqrt(2) * global_bound)
        if norm == "linf":
            r_glob /= math.sqrt(x.numel())
    lo, lo_lip, lo_unstable = r_glob, None, None
    hi = eps_max
    for r in sorted(probe):
        if r <= lo or r > hi:
            continue
        ok, lip, lb = _certified_at(ctx, x, margins, rows, r, norm, domain, passes, max_state)
        if ok:
            lo, lo_lip, lo_unstable = r, lip, lb.unstable / max(lb.neurons, 1)
        else:
            hi = r
            break
    for _ in range(steps):
        if hi - lo <= 1e-3 * hi:
            break
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        ok, lip, lb = _certified_at(ctx, x, margins, rows, mid, norm, domain, passes, max_state)
        if ok:
            lo, lo_lip, lo_unstable = mid, lip, lb.unstable / max(lb.neurons, 1)
        else:
            hi = mid
    return RadiusResult(index, label, pred, m, norm, lo, lo, lo_lip, r_glob, lo_unstable, time.perf_counter() - t0)


def certify_examples(model_or_graph, x: torch.Tensor, y: torch.Tensor, norm: str = "l2", *, eps_max: float = 1.0,
                     steps: int = 6, global_bound: float | None = None, probe: tuple[float, ...] = (),
                     progress: bool = True, **kw) -> list[RadiusResult]:
    """``certified_radius`` for each example of a batch (with a tqdm progress bar)."""
    from tqdm.auto import tqdm

    out = []
    ctx = kw.pop("context", None) or prepare_local(model_or_graph, tuple(x.shape[1:]), kw.get("max_state", 4096))
    for i in tqdm(range(len(x)), desc=f"certified radii ({norm})", disable=not progress):
        out.append(certified_radius(None, x[i], int(y[i]), norm, eps_max=eps_max, steps=steps, context=ctx,
                                    global_bound=global_bound, probe=probe, index=i, **kw))
    return out
