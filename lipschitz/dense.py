"""A network graph lowered to dense float64 matrices between its activations (small networks only).

``lower(node, shapes)`` walks a ``lipschitz.graph`` tree and returns a ``Program``: variable 0 is the
input, every activation adds a variable ``y_k = sigma(z_k)`` whose pre-activation ``z_k`` is a linear map
of earlier variables (``Step.pre``), and ``Program.output`` is the network's output as a linear map of
the variables. Biases are dropped (differences of two inputs are what Lipschitz bounds see); batch norms,
input normalisation, average pooling, flattening and residual sums are exact linear maps. Every matrix
carries ``err``, a bound on the Frobenius distance between the float64 matrix and the exact map of the
stored parameters (standard dot-product error bounds, see docs/network-bounds.md "Floating point").

Each step records per-neuron slope bounds ``alpha <= (sigma(a) - sigma(b)) / (a - b) <= beta``. Neurons
whose slope is known exactly (a ReLU that is stably active or inactive on a local region) are not
variables: ``y = s z`` is substituted, which is how local certificates drop stable ReLUs.
Unsupported pieces (max pooling, unknown nodes) and maps above the size limits raise ``NotDense``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import lipschitz.graph as G

EPS = 2.0**-53  # unit round-off of float64
DIAG_RELATIVE_ERROR = 2.0**-49  # float64 batch-norm scale gamma / sqrt(var + eps), as in lipschitz.bounds


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): relative error bound of a length-k float64 dot product."""
    return k * EPS / (1.0 - k * EPS)


class NotDense(ValueError):
    """The graph (or a piece of it) cannot be lowered to dense matrices within the limits."""


@dataclass
class Mat:
    """A float64 matrix and a bound on the Frobenius norm of its difference to the exact linear map."""

    m: torch.Tensor
    err: float = 0.0

    def fro(self) -> float:
        return float(torch.linalg.matrix_norm(self.m))

    def norm2(self) -> float:
        """An upper bound of the spectral norm: sqrt(||M||_1 ||M||_inf) (Schur / Hoelder), rounded up."""
        a = self.m.abs()
        return math.sqrt(float(a.sum(0).max()) * float(a.sum(1).max())) * (1 + 1e-12) if a.numel() else 0.0


@dataclass
class Step:
    """``y_var = sigma(z)`` with ``z = sum_v pre[v] @ y_v``; slopes of sigma within [alpha, beta] per neuron."""

    var: int
    pre: dict[int, Mat]
    alpha: torch.Tensor
    beta: torch.Tensor
    node: G.Activation | None = None
    rows: torch.Tensor | None = None  # indices of the pre-activation's unstable neurons (None: all)


@dataclass
class Program:
    sizes: list[int]
    steps: list[Step] = field(default_factory=list)
    output: dict[int, Mat] = field(default_factory=dict)

    def last_use(self) -> dict[int, int]:
        """For each variable, the index of the last step that reads it (len(steps) if the output does)."""
        last = {v: -1 for v in range(len(self.sizes))}
        for k, st in enumerate(self.steps):
            for v in st.pre:
                last[v] = k
        for v in self.output:
            last[v] = len(self.steps)
        return last

    def max_state(self) -> int:
        """Largest number of live variables' entries the chain elimination holds at once."""
        last, state, best = self.last_use(), {0}, self.sizes[0]
        for k, st in enumerate(self.steps):
            best = max(best, sum(self.sizes[v] for v in state) + self.sizes[st.var])
            state = {v for v in state if last[v] > k} | {st.var}
        return best


Expr = dict  # var -> Mat


class _Lowering:
    def __init__(self, shapes: dict, slopes: dict | None, max_entries: int, global_slopes):
        self.shapes, self.slopes, self.max_entries = shapes, slopes or {}, max_entries
        self.global_slopes = global_slopes
        self.prog: Program | None = None

    # ------------------------------------------------------------------ expression algebra
    def _check(self, rows: int, cols: int) -> None:
        if rows * cols > self.max_entries:
            raise NotDense(f"a dense map of {rows}x{cols} entries exceeds max_entries={self.max_entries}")

    def diag(self, expr: Expr, d: torch.Tensor, rel: float) -> Expr:
        out, dmax = {}, float(d.abs().max()) if d.numel() else 0.0
        for v, x in expr.items():
            y = d[:, None] * x.m
            out[v] = Mat(y, 2 * EPS * float(torch.linalg.matrix_norm(y)) + dmax * x.err + rel * dmax * x.fro())
        return out

    def dense(self, expr: Expr, a: Mat) -> Expr:
        """a @ x per variable; error gamma_k || |a| |x| ||_F (dot products) + ||a||_2 e_x + e_a ||x||_2 + e_a e_x."""
        out, na, abs_a = {}, a.norm2(), a.m.abs()
        for v, x in expr.items():
            self._check(a.m.shape[0], x.m.shape[1])
            round_off = gamma(a.m.shape[1] + 1) * float(torch.linalg.matrix_norm(abs_a @ x.m.abs()))
            out[v] = Mat(a.m @ x.m, round_off * 1.01 + na * x.err + a.err * x.norm2() + a.err * x.err)
        return out

    @staticmethod
    def add(e1: Expr, e2: Expr) -> Expr:
        out = dict(e1)
        for v, x in e2.items():
            if v in out:
                s = out[v].m + x.m
                out[v] = Mat(s, out[v].err + x.err + EPS * float(torch.linalg.matrix_norm(s)))
            else:
                out[v] = x
        return out

    # ------------------------------------------------------------------ leaves
    def layer_matrix(self, node: G.Layer) -> Mat:
        from spectral.operators import LayerOperator, dense_matrix

        m, (in_shape, out_shape) = node.module, self.shapes[id(node)]
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        self._check(n_out, n_in)
        w = m.weight.detach().to(torch.float64)
        if isinstance(m, nn.Linear) and len(in_shape) == 1:
            return Mat(w.clone(), 0.0)  # float32 -> float64 is exact
        if isinstance(m, nn.Linear):
            op = LayerOperator.linear(w, in_shape)
            k = w.shape[1]
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            op = LayerOperator.conv(w, in_shape, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
            k = math.prod(w.shape[1:])
        else:
            raise NotDense(f"layer {type(m).__name__} has no dense rule")
        mat = dense_matrix(op, max_entries=self.max_entries)
        # basis inputs: each entry is a dot product of length k (a single non-zero term in practice)
        return Mat(mat, gamma(k) * float(torch.linalg.matrix_norm(mat)))

    def pool_matrix(self, node: G.Pool) -> Mat:
        from lipschitz.rules import pool_is_linear

        if not pool_is_linear(node.module):
            raise NotDense("max pooling is not an elementwise slope-restricted map")
        in_shape, out_shape = self.shapes[id(node)]
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        self._check(n_out, n_in)
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
        with torch.no_grad():
            mat = node.module(eye).reshape(n_in, n_out).T.contiguous()
        return Mat(mat, gamma(n_in) * float(torch.linalg.matrix_norm(mat)))

    def channel_diag(self, node, scale: torch.Tensor) -> torch.Tensor:
        in_shape = self.shapes[id(node)][0]
        return scale.to(torch.float64).repeat_interleave(math.prod(in_shape[1:]) if len(in_shape) > 1 else 1)

    # ------------------------------------------------------------------ activation steps
    def activation(self, node: G.Activation, expr: Expr) -> Expr:
        if node.kind == "identity":
            return expr
        n = math.prod(self.shapes[id(node)][0])
        lo, hi = self.global_slopes(node)
        alpha = torch.full((n,), lo, dtype=torch.float64)
        beta = torch.full((n,), hi, dtype=torch.float64)
        if id(node) in self.slopes:
            a_loc, b_loc = self.slopes[id(node)]
            alpha, beta = torch.maximum(alpha, a_loc.to(torch.float64)), torch.minimum(beta, b_loc.to(torch.float64))
        stable = alpha == beta
        keep = torch.where(stable, alpha, torch.zeros_like(alpha))
        out = self.diag(expr, keep, EPS) if bool((keep != 0).any()) else {}
        rows = torch.nonzero(~stable).flatten()
        if len(rows) == 0:
            return out
        prog = self.prog
        var = len(prog.sizes)
        prog.sizes.append(len(rows))
        pre = {v: Mat(x.m[rows], x.err) for v, x in expr.items()}
        prog.steps.append(Step(var, pre, alpha[rows], beta[rows], node, rows))
        sel = torch.zeros(n, len(rows), dtype=torch.float64)
        sel[rows, torch.arange(len(rows))] = 1.0
        self._check(n, len(rows))
        return self.add(out, {var: Mat(sel, 0.0)})

    # ------------------------------------------------------------------ walk
    def walk(self, node, expr: Expr) -> Expr:
        from lipschitz.rules import batchnorm_scale, normalize_scale

        if isinstance(node, G.Sequential):
            for child in node.children:
                expr = self.walk(child, expr)
            return expr
        if isinstance(node, G.Residual):
            branch = self.walk(node.branch, expr)
            short = expr if node.shortcut is None else self.walk(node.shortcut, expr)
            return self.add(branch, short)
        if isinstance(node, G.Layer):
            return self.dense(expr, self.layer_matrix(node))
        if isinstance(node, G.BatchNorm):
            return self.diag(expr, self.channel_diag(node, batchnorm_scale(node.module)), DIAG_RELATIVE_ERROR)
        if isinstance(node, G.Normalize):
            return self.diag(expr, self.channel_diag(node, normalize_scale(node.std)), 2 * EPS)
        if isinstance(node, G.Pool):
            return self.dense(expr, self.pool_matrix(node))
        if isinstance(node, (G.Flatten, G.Identity)):
            return expr
        if isinstance(node, G.Activation):
            return self.activation(node, expr)
        raise NotDense(f"graph node {type(node).__name__} has no dense rule")


def lower(node: G.Node, shapes: dict, *, slopes: dict | None = None, max_entries: int = 2**23,
          global_slopes=None, in_shape: tuple | None = None) -> Program:
    """The dense program of ``node`` (input shape ``shapes[id(node)][0]``); raises ``NotDense``.

    ``slopes``: optional per-activation-node (id -> (alpha, beta) per neuron of its input) local slope
    bounds, intersected with the activation's global slope range.
    """
    from lipschitz.rules import activation_slope_range

    if global_slopes is None:
        def global_slopes(act: G.Activation):
            return activation_slope_range(act.kind, act.params)
    low = _Lowering(shapes, slopes, max_entries, global_slopes)
    n0 = math.prod(shapes[id(node)][0] if in_shape is None else in_shape)
    low.prog = Program([n0])
    low._check(n0, n0)
    out = low.walk(node, {0: Mat(torch.eye(n0, dtype=torch.float64), 0.0)})
    low.prog.output = out
    return low.prog
