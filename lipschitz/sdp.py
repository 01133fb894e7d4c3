"""LipSDP-Neuron for any dense program (feed-forward or residual), solved by chain elimination.

For a ``lipschitz.dense.Program`` (input x, activations y_k = sigma(z_k), slopes in [alpha, beta]) and
multipliers lambda_k > 0 (one per neuron), a quadratic "storage" Q on the live variables is carried
forward from Q = I on x:

- activation k, pre-activation z = A s of the live state s:
  ``R = [[Q + A^T diag(p l) A, -A^T diag(m l)], [-diag(m l) A, diag(l)]]``, p = alpha beta, m = (alpha+beta)/2;
  ``s^T Q s - sum_i l_i (y_i - alpha_i z_i)(beta_i z_i - y_i) = [s; y]^T R [s; y]`` (an identity of forms).
- variables no longer read are eliminated by the Schur complement (the minimum over them).

So ``|dx|^2 >= [ds; dy]^T Q_final [ds; dy]`` for every pair of inputs, and with the output f = F s,
``L^2 = lambda_max(F Q_final^-1 F^T)`` (rows of F give per-logit-difference constants). Given the
multipliers this is the exact LipSDP-Neuron value; it is convex in the multipliers, which are initialised
by the ECLipsE-Fast rule (one scalar per layer, lambda = 1 / (2 m^2 lambda_max(A Q^-1 A^T))) and then
improved by Adam on their logarithms. The reported value comes from a separate verification pass: each
step's matrix inequality is checked by a floating-point Cholesky factorisation with Demmel's backward
error bound and the matrices' own error bounds (docs/network-bounds.md, "LipSDP by chain elimination").

References: Fazlyab et al. 2019 (LipSDP); Xu & Sivaranjani 2024 (ECLipsE); Rump 2006 (verified positive
definiteness by Cholesky).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lipschitz.dense import EPS, Mat, Program, gamma

SHRINK = 1e-7  # relative slack left in each verified step (see verify_psd)


@dataclass
class ChainResult:
    value: float  # certified Lipschitz bound of the program's output (l2 -> l2)
    rows: torch.Tensor | None  # certified bounds of individual output functionals (when requested)
    verified: bool
    estimate: float  # the unverified float64 value of the optimised chain
    greedy: float  # the ECLipsE-Fast-rule value before optimisation (unverified)
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    lams: list = field(default_factory=list, repr=False)  # the multipliers of the certificate


def _state_matrix(step_pre: dict[int, Mat], state: list[int], sizes: list[int]) -> torch.Tensor:
    n = len(next(iter(step_pre.values())).m) if step_pre else 0
    cols = [step_pre[v].m if v in step_pre else torch.zeros(n, sizes[v], dtype=torch.float64) for v in state]
    return torch.cat(cols, 1)


def _step_matrix(Q: torch.Tensor, A: torch.Tensor, lam: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    p, m = alpha * beta, (alpha + beta) / 2
    top = Q + A.T @ ((p * lam)[:, None] * A)
    off = -(A.T * (m * lam)[None, :])
    return torch.cat([torch.cat([top, off], 1), torch.cat([off.T, torch.diag(lam)], 1)], 0)


def _schur(R: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor):
    """R_kk - R_kd R_dd^-1 R_dk (None if R_dd is not positive definite)."""
    if len(drop) == 0:
        return R[keep][:, keep]
    Rdd = R[drop][:, drop]
    L, info = torch.linalg.cholesky_ex(Rdd)
    if int(info) != 0:
        return None
    X = torch.linalg.solve_triangular(L, R[drop][:, keep], upper=False)
    S = R[keep][:, keep] - X.T @ X
    return (S + S.T) / 2


class _Chain:
    """The elimination order of a program: per step the state before it, what is kept and what dropped."""

    def __init__(self, prog: Program):
        self.prog = prog
        last = prog.last_use()
        state, self.plan = [0], []
        for k, st in enumerate(prog.steps):
            ext = state + [st.var]
            offs, o = {}, 0
            for v in ext:
                offs[v] = (o, o + prog.sizes[v])
                o += prog.sizes[v]
            new_state = [v for v in state if last[v] > k] + [st.var]
            keep = torch.cat([torch.arange(*offs[v]) for v in new_state])
            drop_vars = [v for v in state if last[v] <= k]
            drop = torch.cat([torch.arange(*offs[v]) for v in drop_vars]) if drop_vars else torch.zeros(0, dtype=torch.long)
            A = _state_matrix(st.pre, state, prog.sizes)
            A_err = math.sqrt(sum(st.pre[v].err ** 2 for v in st.pre)) if st.pre else 0.0
            self.plan.append((A, A_err, keep, drop, new_state))
            state = new_state
        self.final_state = state
        out = prog.output
        n_out = len(next(iter(out.values())).m)
        self.F = torch.cat([out[v].m if v in out else torch.zeros(n_out, prog.sizes[v], dtype=torch.float64)
                            for v in state], 1)
        self.F_err = math.sqrt(sum(out[v].err ** 2 for v in out if v in state))

    def work(self) -> float:
        """Arithmetic of one pass of the elimination, in units of cubed state sizes (its factorisations)."""
        return sum(float(len(keep) + len(drop)) ** 3 for _, _, keep, drop, _ in self.plan)

    @staticmethod
    def greedy_lam(Q: torch.Tensor, A: torch.Tensor, st, keep, drop):
        """ECLipsE-Fast rule: lambda = 1 / (2 m^2 lambda_max(A Q^-1 A^T)), halved until the step stays definite."""
        m = float(((st.alpha + st.beta) / 2).abs().max())
        L, info = torch.linalg.cholesky_ex(Q)
        if int(info) != 0:
            raise _Infeasible("state matrix lost positive definiteness")
        Y = torch.linalg.solve_triangular(L, A.T, upper=False)
        gram = Y.T @ Y if Y.shape[1] <= Y.shape[0] else Y @ Y.T
        mu = float(torch.linalg.eigvalsh(gram)[-1])
        scale = 1.0 / (2 * m * m * mu) if m > 0 and mu > 0 else 1.0
        for _ in range(40):
            lam = torch.full((len(st.alpha),), scale, dtype=torch.float64)
            Qn = _schur(_step_matrix(Q, A, lam, st.alpha, st.beta), keep, drop)
            if Qn is not None and int(torch.linalg.cholesky_ex(Qn)[1]) == 0:
                return lam
            scale /= 2
        raise _Infeasible("no multiplier keeps the chain positive definite")

    def greedy_lams(self) -> list[torch.Tensor]:
        Q, lams = torch.eye(self.prog.sizes[0], dtype=torch.float64), []
        for (A, _, keep, drop, _), st in zip(self.plan, self.prog.steps):
            lams.append(self.greedy_lam(Q, A, st, keep, drop))
            Q = _schur(_step_matrix(Q, A, lams[-1], st.alpha, st.beta), keep, drop)
        return lams

    def run(self, lams: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """rho^2 = lambda_max(F Q^-1 F^T) (or the per-row values F_i Q^-1 F_i^T); inf if infeasible. Differentiable."""
        Q = torch.eye(self.prog.sizes[0], dtype=torch.float64)
        for (A, _, keep, drop, _), st, lam in zip(self.plan, self.prog.steps, lams):
            Q = _schur(_step_matrix(Q, A, lam, st.alpha, st.beta), keep, drop)
            if Q is None:
                return torch.tensor(math.inf, dtype=torch.float64)
        L, info = torch.linalg.cholesky_ex(Q)
        if int(info) != 0:
            return torch.tensor(math.inf, dtype=torch.float64)
        F = self.F if rows is None else rows
        Y = torch.linalg.solve_triangular(L, F.T, upper=False)
        G = Y.T @ Y
        return torch.diagonal(G) if rows is not None else torch.linalg.eigvalsh((G + G.T) / 2)[-1]


class _Infeasible(RuntimeError):
    pass


def verify_psd(S: torch.Tensor, extra: float) -> bool:
    """True only if S + E is positive semidefinite for every symmetric E with ||E||_2 <= ``extra``.

    A floating-point Cholesky factorisation of T = fl(S - c I) that runs to completion gives
    R^T R = T + dT with ||dT||_2 <= ||dT||_F <= gamma_{n+1} / (1 - gamma_{n+1}) tr(T) (Demmel 1989; Higham,
    Thm 10.5 with Cauchy-Schwarz), so T >= -that and S >= (c - that - rounding of the shift) I >= extra I.
    """
    n = S.shape[0]
    d = torch.diagonal(S)
    if n == 0:
        return True
    if bool((d < 0).any()) or not bool(torch.isfinite(S).all()):
        return False
    g = 2 * gamma(n + 1)
    c = (extra + g * float(d.sum()) + 2 * EPS * float(d.max())) * 1.01 + 1e-300
    T = S - c * torch.eye(n, dtype=S.dtype)
    return int(torch.linalg.cholesky_ex(T)[1]) == 0


def _fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x)) if x.numel() else 0.0


def _step_extra(Q, A, A_err, lam, st, R, Qn) -> float:
    """Bound on ||R_exact - embed(Qn) - fl(R - embed(Qn))||_2: forming round-off plus the error of A."""
    p, m = (st.alpha * st.beta).abs(), ((st.alpha + st.beta) / 2).abs()
    pl, ml = float((p * lam).max()), float((m * lam).max())
    fa = _fro(A)
    forming = gamma(A.shape[0] + 4) * (_fro(Q) + 2 * fa * fa * pl + 2 * ml * fa + _fro(lam) + _fro(Qn))
    model = ml * A_err + pl * (2 * fa * A_err + A_err * A_err)
    return forming + model


def _verified_chain(ch: _Chain, lams: list[torch.Tensor] | None, states: list | None = None):
    """Re-run the chain leaving slack and verify every step; returns (Q_final or None, details).

    ``lams=None``: the ECLipsE-Fast rule at each step (the list is filled in ``details["lams"]``).
    ``states`` (optional list) receives the verified state matrix before each step."""
    Q = torch.eye(ch.prog.sizes[0], dtype=torch.float64)
    worst, used = 0.0, []
    for k, ((A, A_err, keep, drop, _), st) in enumerate(zip(ch.plan, ch.prog.steps)):
        if states is not None:
            states.append(Q)
        try:
            lam = ch.greedy_lam(Q, A, st, keep, drop) if lams is None else lams[k]
        except _Infeasible as err:
            return None, {"failed": str(err)}
        used.append(lam)
        R = _step_matrix(Q, A, lam, st.alpha, st.beta)
        Qs = _schur(R, keep, drop)
        if Qs is None:
            return None, {"failed": "elimination"}
        ok = False
        for shrink in (SHRINK, 1e-5, 1e-3):
            delta = shrink * float(torch.diagonal(Qs).abs().max())
            Qn = Qs - delta * torch.eye(len(keep), dtype=torch.float64)
            S = R.clone()
            S[keep.unsqueeze(1), keep.unsqueeze(0)] -= Qn
            if verify_psd((S + S.T) / 2, _step_extra(Q, A, A_err, lam, st, R, Qn)):
                ok, worst = True, max(worst, shrink)
                break
        if not ok:
            return None, {"failed": "step verification"}
        Q = Qn
    return Q, {"shrink": worst, "lams": used}


def _certify_rows(Q: torch.Tensor, F: torch.Tensor, F_err: float, estimates: torch.Tensor) -> torch.Tensor | None:
    """Certified rho_i with Q >= F_i^T F_i / rho_i^2 for each row (i.e. |F_i ds| <= rho_i |dx|)."""
    out = []
    for i in range(F.shape[0]):
        f = F[i:i + 1]
        fn = _fro(f)
        est = math.sqrt(max(float(estimates[i]), 0.0))
        if est == 0.0 and fn == 0.0 and F_err == 0.0:
            out.append(0.0)
            continue
        rho = max(est, 1e-300)
        for factor in (1 + 1e-6, 1 + 1e-4, 1.01, 1.1, 2.0):
            r = rho * factor + 1e-300
            g = f / r
            S = Q - g.T @ g
            extra = (2 * fn * F_err + F_err * F_err) / (r * r) + gamma(4) * (_fro(Q) + (fn / r) ** 2)
            if verify_psd((S + S.T) / 2, extra):
                out.append(r)
                break
        else:
            return None
    return torch.tensor(out, dtype=torch.float64)


def _optimise(ch: _Chain, lams: list[torch.Tensor], best_val: float, iters: int, lr: float,
              time_limit: float | None):
    thetas = [torch.zeros_like(l, requires_grad=True) for l in lams]
    best = [l.clone() for l in lams]
    if iters <= 0 or not math.isfinite(best_val):
        return best, best_val
    opt = torch.optim.Adam(thetas, lr=lr)
    t0 = time.perf_counter()
    with torch.enable_grad():
        return _adam(ch, lams, thetas, opt, best, best_val, iters, time_limit, t0)


def _adam(ch, lams, thetas, opt, best, best_val, iters, time_limit, t0):
    for _ in range(iters):
        cur = [l * torch.exp(t) for l, t in zip(lams, thetas)]
        val = ch.run(cur)
        if not torch.isfinite(val):
            with torch.no_grad():
                for t, b, l in zip(thetas, best, lams):
                    t.copy_(torch.log(b / l))
            for group in opt.param_groups:
                group["lr"] /= 2
            continue
        if float(val.detach()) < best_val:
            best_val, best = float(val.detach()), [c.detach().clone() for c in cur]
        opt.zero_grad()
        torch.log(val).backward()
        opt.step()
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
    return best, best_val


def chain_bound(prog: Program, *, iters: int = 60, lr: float = 0.1, time_limit: float | None = None,
                max_work: float | None = None, rows: torch.Tensor | None = None,
                lams: list[torch.Tensor] | None = None) -> ChainResult:
    """Certified l2 Lipschitz bound of a dense program by LipSDP-Neuron chain elimination (see module doc).

    ``rows``: optional (r, n_out) matrix; then ``result.rows[i]`` certifies the Lipschitz constant of
    x -> rows[i] @ f(x) as well. ``iters``: Adam steps on the log-multipliers (0: the ECLipsE-Fast rule).
    ``max_work``: optional cap on the Adam steps, ``floor(max_work / work of one step)`` with the work of a step
    the sum of the cubed state sizes of the elimination (deterministic). ``time_limit``: optional wall-clock
    seconds for the Adam steps (the result then depends on the machine's speed; None, the default, does not). Raises ``ValueError`` if no certificate could be verified
    (callers fall back to other rules).
    """
    t0 = time.perf_counter()
    ch = _Chain(prog)
    if max_work is not None:
        iters = min(iters, int(max_work // max(ch.work(), 1.0)))
    greedy = est = None
    if prog.steps and iters > 0:
        with torch.no_grad():
            try:
                lams = ch.greedy_lams() if lams is None else lams
            except _Infeasible as err:
                raise ValueError(f"LipSDP chain: {err}") from None
            greedy = float(ch.run(lams))
        lams, est = _optimise(ch, lams, greedy, iters, lr, time_limit)
    with torch.no_grad():
        Q, info = _verified_chain(ch, lams if prog.steps else [])
        if Q is None:
            raise ValueError(f"LipSDP chain could not be verified ({info['failed']})")
        best = info.pop("lams")
        L, _ = torch.linalg.cholesky_ex(Q)
        Y = torch.linalg.solve_triangular(L, ch.F.T, upper=False)
        G = Y.T @ Y
        lam_max = float(torch.linalg.eigvalsh((G + G.T) / 2)[-1])
        greedy = lam_max if greedy is None else greedy
        est = lam_max if est is None else est
        F_err = ch.F_err if rows is None else ch.F_err * (1 + float(torch.linalg.matrix_norm(rows, ord=2)))
        # the whole map: Q >= F^T F / rho^2 checked as a matrix inequality (rank <= n_out)
        value = _certify_matrix(Q, ch.F, ch.F_err, lam_max)
        if value is None:
            raise ValueError("LipSDP chain: final inequality could not be verified")
        row_vals = None
        if rows is not None:
            Yr = torch.linalg.solve_triangular(L, (rows @ ch.F).T, upper=False)
            row_vals = _certify_rows(Q, rows @ ch.F, F_err, (Yr * Yr).sum(0))
            if row_vals is None:
                raise ValueError("LipSDP chain: a row inequality could not be verified")
    sizes = [prog.sizes[st.var] for st in prog.steps]
    return ChainResult(value, row_vals, True, math.sqrt(max(est, 0.0)), math.sqrt(max(greedy, 0.0)),
                       time.perf_counter() - t0,
                       {"steps": len(prog.steps), "neurons": sizes, "max_state": prog.max_state(), **info}, best)


def _certify_matrix(Q: torch.Tensor, F: torch.Tensor, F_err: float, lam_max: float) -> float | None:
    fn = _fro(F)
    rho = math.sqrt(max(lam_max, 0.0))
    if rho == 0.0 and fn == 0.0 and F_err == 0.0:
        return 0.0
    for factor in (1 + 1e-6, 1 + 1e-4, 1.01, 1.1, 2.0):
        r = max(rho, 1e-300) * factor
        g = F / r
        S = Q - g.T @ g
        extra = (2 * fn * F_err + F_err * F_err) / (r * r) + gamma(F.shape[0] + 4) * (_fro(Q) + (fn / r) ** 2)
        if verify_psd((S + S.T) / 2, extra):
            return r
    return None


# ------------------------------------------------------------------------- graph windows

@dataclass
class SdpOptions:
    """Limits of the LipSDP chain inside ``network_bound``: state size, dense entries, optimiser budget."""

    max_state: int = 3072
    max_entries: int = 2**23
    iters: int = 20  # Adam steps for the network's own windows (named sub-nodes use the ECLipsE-Fast rule)
    node_iters: int = 0
    lr: float = 0.2
    # seconds of Adam per window (checked after each step); None: no clock, so the same weights always give the
    # same bound (a wall-clock limit makes the value depend on the machine's load)
    time_limit: float | None = None
    # Adam steps per window at most max_work / (sum over elimination steps of the cubed state size): a budget in
    # arithmetic, not in seconds, so the bound is reproducible; 1e11 is ~5 s of one core of the development machine
    max_work: float | None = 1e11


class SdpComposer:
    """Bounds graph nodes by the LipSDP chain where they fit, by windows of consecutive children otherwise.

    ``own(node)`` gives the fallback certified bound of a node's own map (the folded+liplt value). A node's
    value is the minimum of its fallback and its chain bound (if the node fits), or, for a sequence that
    does not fit, the rounded-up product over greedy maximal windows of consecutive children that fit
    (children that fit in no window contribute their own best value). ``records`` keeps per-window details.
    """

    def __init__(self, shapes: dict, own, options: SdpOptions | None = None):
        self.shapes, self.own, self.opt = shapes, own, options or SdpOptions()
        self._progs: dict = {}
        self._values: dict = {}
        self.records: list[dict] = []

    def program(self, nodes: list):
        import lipschitz.graph as G
        from lipschitz.dense import NotDense, lower

        key = tuple(id(n) for n in nodes)
        if key not in self._progs:
            node = nodes[0] if len(nodes) == 1 else G.Sequential(list(nodes))
            try:
                prog = lower(node, self.shapes, max_entries=self.opt.max_entries,
                             in_shape=self.shapes[id(nodes[0])][0])
                self._progs[key] = prog if prog.max_state() <= self.opt.max_state else None
            except NotDense:
                self._progs[key] = None
        return self._progs[key]

    def chain(self, nodes: list, top: bool = False) -> float | None:
        import lipschitz.graph as G

        while len(nodes) == 1 and isinstance(nodes[0], G.Sequential) and len(nodes[0].children) == 1:
            nodes = list(nodes[0].children)  # a stage of one block is that block
        key = tuple(id(n) for n in nodes)
        if key not in self._values:
            prog, value = self.program(nodes), None
            if prog is not None:
                try:
                    r = chain_bound(prog, iters=self.opt.iters if top else self.opt.node_iters, lr=self.opt.lr,
                                    time_limit=self.opt.time_limit, max_work=self.opt.max_work)
                    value = r.value
                    self.records.append({"nodes": [getattr(n, "name", "") for n in nodes], "value": r.value,
                                         "greedy": r.greedy, "seconds": r.seconds, **r.details})
                except ValueError as err:
                    self.records.append({"nodes": [getattr(n, "name", "") for n in nodes], "failed": str(err)})
            self._values[key] = value
        return self._values[key]

    def best(self, node, top: bool = False) -> tuple[float, bool]:
        """(certified bound of ``node``'s own map, exact?); ``top``: optimise the multipliers (the network)."""
        import lipschitz.graph as G

        value, exact = self.own(node)
        c = self.chain([node], top)
        if c is not None and c < value:
            return c, False
        if c is None and isinstance(node, G.Sequential) and len(node.children) > 1:
            w = self.windows(node.children, top)
            if w < value:
                return w, False
        return value, exact

    def windows(self, children: list, top: bool = False) -> float:
        total, i, n = 1.0, 0, len(children)
        while i < n:
            j = i
            while j < n and self.program(children[i:j + 1]) is not None:
                j += 1
            if j == i:
                factor = self.best(children[i], top)[0]
                i += 1
            else:
                factor = self.chain(children[i:j], top)
                if factor is None:  # could not be verified: children one by one
                    factor = 1.0
                    for c in children[i:j]:
                        factor = math.nextafter(factor * self.best(c)[0], math.inf)
                i = j
            total = math.nextafter(total * factor, math.inf) if factor != 1.0 else total
        return total
