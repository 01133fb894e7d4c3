"""Faster inner loops for pyautoattack's APGD, FAB and Square that keep every surviving point's iterates.

``accelerate(adversary, model, x_probe)`` swaps pyautoattack's attack objects for subclasses whose
``attack_single_run`` does the same arithmetic on the same batches with the same random draws, and skips only
model calls whose answer is already known:

- APGD (CE, DLR, targeted DLR; Linf and L2): a point leaves the batch once it is misclassified (upstream keeps
  iterating it, but its flag can no longer change); a point whose iterate did not move reuses its last
  forward/backward pass.
- FAB (targeted and untargeted; Linf, L2, L1): a point leaves the batch once an adversarial example within eps
  is found (upstream goes on shrinking its norm; the flag cannot change); the clean forward pass is shared
  between the label check and the target choice.
- Square (Linf, margin loss): a query that leaves a point's input unchanged, or repeats a query already
  evaluated at the same best point, is not sent to the model again (the model would return the same margin,
  which upstream then rejects as "not better").
- all: the model's parameters are frozen during the attack, so no weight gradients are computed (upstream's
  FAB calls ``.backward()``, which computes them and accumulates them into the model's ``.grad``).

Exactness rests on one property of the model, checked on the data before anything is swapped
(``batch_invariance``): from some batch size on (found by the check; oneDNN switches kernels for few rows), each
point's logits and input gradient are bitwise the same whatever other points share its batch. Smaller sub-batches
are padded with copies of a row up to that size, never beyond the batch upstream itself sends, so every model
call sees the kernels upstream's call would. Then every point that stays robust follows exactly upstream's
iterates, every broken point is broken by both, and the robust flags are identical. When the check fails (some GPU kernels, models that mix points),
or the installed pyautoattack is not the version these loops were checked against, the upstream loops run
unchanged and the reason is recorded. The adversarial example returned for a broken point may differ: it is
the first one found (APGD, Square) or the first within eps (FAB), not the last or smallest.

References: Croce & Hein 2020 (AutoAttack, APGD); Croce & Hein 2020 (FAB); Andriushchenko et al. 2020 (Square).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

CHECKED_PYAUTOATTACK = ("0.2.0",)
PROBE_POINTS = 64


@dataclass
class EngineStats:
    """Rows sent to the model and rows whose model call was skipped, per attack family (for benchmarks)."""

    forward_rows: int = 0
    backward_rows: int = 0
    reused_rows: int = 0
    dropped_row_iterations: int = 0
    calls: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class EngineInfo:
    """What ``accelerate`` did: the engine in use and why."""

    engine: str
    reason: str
    attacks: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "reason": self.reason, "attacks": dict(self.attacks)}


# ----------------------------------------------------------------------------------------------------------
# preconditions


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter inside the block (restored after): input gradients only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _input_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        logits = model(xr)
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), [xr])
    return logits.detach(), grad


PAD_CANDIDATES = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Invariance:
    """Smallest batch sizes from which each point's logits (``forward``) and logits + input gradient
    (``backward``) no longer depend on the batch; ``None`` when no candidate passed (``reason`` says why)."""

    forward: int | None
    backward: int | None
    points: int
    reason: str = ""


def _smallest_invariant_size(x: torch.Tensor, full: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> int | None:
    m = x.shape[0]
    for size in PAD_CANDIDATES:
        sizes = sorted({size, size + 1, size + 3, min(2 * size + 1, m - 1), m - 1})
        if size + 3 >= m:
            return None
        ok = True
        for k in sizes:
            for lo in (0, m - k):
                got = fn(x[lo:lo + k])
                if not all(torch.equal(a, b[lo:lo + k]) for a, b in zip(got, full)):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return size
    return None


def batch_invariance(model: nn.Module, x: torch.Tensor) -> Invariance:
    """From which batch size on each point's logits and input gradient are bitwise the same whatever other
    points share its batch (checked on sub-batches of ``x``; also no_grad vs grad mode, frozen vs trainable
    parameters). oneDNN on CPU, for instance, switches kernels below 16 rows for some layers' gradients."""
    m = x.shape[0]
    if m < 8:
        return Invariance(None, None, m, f"too few points to check ({m} < 8)")
    with torch.no_grad():
        logits = model(x)
    grads = _input_grads(model, x)
    with frozen_parameters(model):
        frozen = _input_grads(model, x)
        if not (torch.equal(frozen[0], logits) and torch.equal(frozen[1], grads[1])):
            return Invariance(None, None, m, "frozen parameters or grad mode change the logits or input gradients")

        def forward(xs: torch.Tensor) -> tuple[torch.Tensor]:
            with torch.no_grad():
                return (model(xs),)

        fwd = _smallest_invariant_size(x, (logits,), forward)
        bwd = _smallest_invariant_size(x, frozen, lambda xs: _input_grads(model, xs))
    if fwd is None or bwd is None:
        return Invariance(fwd, bwd, m, f"a point's {'logits' if fwd is None else 'input gradient'} changes with "
                                       f"the batch at every size up to {PAD_CANDIDATES[-1]} checked on {m} points")
    return Invariance(fwd, bwd, m)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:  # pragma: no cover - the caller imported it
        return "unknown"


def _model_rows(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``model(x)`` on at least ``min_rows`` rows (copies of the first row fill up; their outputs are dropped),
    so that the kernels are those of the batch upstream would have sent."""
    k = x.shape[0]
    if k >= min_rows:
        return model(x)
    filler = x[:1].detach().expand(min_rows - k, *x.shape[1:])
    return model(torch.cat([x, filler]))[:k]


# ----------------------------------------------------------------------------------------------------------
# APGD


class _ExactAPGDLoop:
    """``attack_single_run`` of pyautoattack 0.2.0's APGD (Linf/L2, one EOT sample) with early exit and reuse."""

    stats: EngineStats
    on_iteration: Callable[[int], None] | None = None
    min_rows_forward: int = 1 << 30  # set by accelerate from the batch-invariance check
    min_rows_backward: int = 1 << 30

    def attack_single_run(self, x, y, x_init=None):
        if self.norm not in ("Linf", "L2") or self.eot_iter != 1 or self.is_tf_model or x_init is not None:
            return super().attack_single_run(x, y, x_init)  # type: ignore[misc]
        n = x.shape[0]
        rows = min(n, self.min_rows_backward)  # upstream sends all n rows every time
        if self.norm == "Linf":
            t = 2 * torch.rand(x.shape).to(self.device).detach() - 1
        else:
            t = torch.randn(x.shape).to(self.device).detach()
        x_adv = (x + self.eps * torch.ones_like(x).detach() * self.normalize(t)).clamp(0., 1.)
        targets = self.y_target if self.loss in ("dlr-targeted", "ce-targeted") else None
        logits, loss_indiv, grad = self._grad_rows(x_adv, y, targets, rows)
        if self.loss in ("dlr", "dlr-targeted"):
            from pyautoattack.checks import check_zero_gradients

            check_zero_gradients(grad, logger=self.logger)
        st = {"x": x, "y": y, "x_adv": x_adv, "x_best": x_adv.clone(), "x_best_adv": x_adv.clone(),
              "acc": logits.max(1)[1] == y, "loss_best": loss_indiv.clone(), "grad": grad, "grad_best": grad.clone(),
              "step": 2. * self.eps * torch.ones([n, *[1] * self.ndims]).to(self.device).detach(),
              "x_old": x_adv.clone(), "eval_x": x_adv.clone(), "eval_logits": logits, "eval_loss": loss_indiv,
              "eval_grad": grad, "pos": torch.arange(n, device=x.device)}
        st["last_best"], st["reduced"] = st["loss_best"].clone(), torch.ones_like(st["loss_best"])
        if targets is not None:
            st["targets"] = targets
        loss_steps = torch.zeros([self.n_iter, n]).to(self.device)
        out = {k: st[k].clone() for k in ("x_best", "acc", "loss_best", "x_best_adv")}
        k, counter3 = self.n_iter_2 + 0, 0
        for i in range(self.n_iter):
            if not bool(st["acc"].all()):
                loss_steps = self._drop_broken(st, out, loss_steps)
            if st["pos"].numel() == 0:
                break
            self.stats.dropped_row_iterations += n - int(st["pos"].numel())
            self._step(st, i)
            self._gradient_with_reuse(st, rows)
            loss_steps[i] = self._record(st)
            counter3 += 1
            if counter3 == k:
                self._checkpoint(st, loss_steps, i, k)
                k, counter3 = max(k - self.size_decr, self.n_iter_min), 0
            if self.on_iteration is not None:
                self.on_iteration(int(st["pos"].numel()))
        for key in out:
            out[key][st["pos"]] = st[key]
        return out["x_best"], out["acc"], out["loss_best"], out["x_best_adv"]

    def _criterion(self, targets: torch.Tensor | None):
        import torch.nn.functional as F

        if self.loss == "ce":
            return nn.CrossEntropyLoss(reduction="none")
        if self.loss == "ce-targeted-cfts":
            return lambda z, t: -1. * F.cross_entropy(z, t, reduction="none")
        if self.loss == "dlr":
            return self.dlr_loss
        if self.loss in ("dlr-targeted", "ce-targeted"):
            fn = self.dlr_loss_targeted if self.loss == "dlr-targeted" else self.ce_loss_targeted

            def targeted(z, labels):
                saved, self.y_target = self.y_target, targets
                try:
                    return fn(z, labels)
                finally:
                    self.y_target = saved
            return targeted
        raise ValueError(f"unknown loss {self.loss!r}")

    def _grad_rows(self, x_rows, y_rows, targets, min_rows):
        """Logits, per-point loss and input gradient at ``x_rows`` (upstream's arithmetic, one EOT sample)."""
        xr = x_rows.clone().requires_grad_()
        with torch.enable_grad():
            logits = _model_rows(self.model, xr, min_rows)
            loss_indiv = self._criterion(targets)(logits, y_rows)
            loss = loss_indiv.sum()
        grad = torch.zeros_like(x_rows)
        grad += torch.autograd.grad(loss, [xr])[0].detach()
        grad /= float(self.eot_iter)
        self.stats.forward_rows += xr.shape[0]
        self.stats.backward_rows += xr.shape[0]
        self.stats.calls += 1
        return logits.detach(), loss_indiv.detach(), grad

    def _drop_broken(self, st, out, loss_steps):
        broken = ~st["acc"]
        rows = st["pos"][broken]
        out["acc"][rows] = False
        for key in ("x_best", "loss_best", "x_best_adv"):
            out[key][rows] = st[key][broken]
        keep = ~broken
        for key, value in st.items():
            st[key] = value[keep]
        return loss_steps[:, keep]

    def _step(self, st, i):
        x, eps = st["x"], self.eps
        x_adv = st["x_adv"].detach()
        grad2 = x_adv - st["x_old"]
        st["x_old"] = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        if self.norm == "Linf":
            x1 = x_adv + st["step"] * torch.sign(st["grad"])
            x1 = torch.clamp(torch.min(torch.max(x1, x - eps), x + eps), 0.0, 1.0)
            x1 = torch.clamp(torch.min(torch.max(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps),
                             0.0, 1.0)
        else:
            from pyautoattack.other_utils import L2_norm

            x1 = x_adv + st["step"] * self.normalize(st["grad"])
            x1 = torch.clamp(x + self.normalize(x1 - x) * torch.min(eps * torch.ones_like(x).detach(),
                                                                    L2_norm(x1 - x, keepdim=True)), 0.0, 1.0)
            x1 = x_adv + (x1 - x_adv) * a + grad2 * (1 - a)
            x1 = torch.clamp(x + self.normalize(x1 - x) * torch.min(eps * torch.ones_like(x).detach(),
                                                                    L2_norm(x1 - x, keepdim=True)), 0.0, 1.0)
        st["x_adv"] = x1 + 0.

    def _gradient_with_reuse(self, st, min_rows):
        moved = ~(st["x_adv"] == st["eval_x"]).flatten(1).all(1)
        n_moved = int(moved.sum())
        self.stats.reused_rows += int(moved.numel()) - n_moved
        if n_moved:
            targets = st["targets"][moved] if "targets" in st else None
            logits, loss, grad = self._grad_rows(st["x_adv"][moved], st["y"][moved], targets, min_rows)
            st["eval_logits"][moved], st["eval_loss"][moved], st["eval_grad"][moved] = logits, loss, grad
            st["eval_x"] = st["x_adv"].clone()
        st["grad"] = st["eval_grad"].clone()

    def _record(self, st) -> torch.Tensor:
        pred = st["eval_logits"].max(1)[1] == st["y"]
        st["acc"] = torch.min(st["acc"], pred)
        st["x_best_adv"][~pred] = st["x_adv"][~pred] + 0.
        y1 = st["eval_loss"].clone()
        better = y1 > st["loss_best"]
        st["x_best"][better] = st["x_adv"][better].clone()
        st["grad_best"][better] = st["grad"][better].clone()
        st["loss_best"][better] = y1[better] + 0
        return y1 + 0

    def _checkpoint(self, st, loss_steps, i, k):
        fl_osc = self.check_oscillation(loss_steps, i, k, st["loss_best"], k3=self.thr_decr)
        fl_no_impr = (1. - st["reduced"]) * (st["last_best"] >= st["loss_best"]).float()
        fl_osc = torch.max(fl_osc, fl_no_impr)
        st["reduced"], st["last_best"] = fl_osc.clone(), st["loss_best"].clone()
        osc = fl_osc > 0
        if bool(osc.any()):
            st["step"][osc] /= 2.0
            st["x_adv"][osc] = st["x_best"][osc].clone()
            st["grad"][osc] = st["grad_best"][osc].clone()


# ----------------------------------------------------------------------------------------------------------
# FAB


class _ExactFABLoop:
    """``attack_single_run`` of pyautoattack 0.2.0's FAB with early exit once within eps."""

    stats: EngineStats
    on_iteration: Callable[[int], None] | None = None
    min_rows_forward: int = 1 << 30  # set by accelerate from the batch-invariance check
    min_rows_backward: int = 1 << 30

    def attack_single_run(self, x, y=None, use_rand_start=False, is_targeted=False):
        if self.device is None:
            self.device = x.device
        self.orig_dim, self.ndims = list(x.shape[1:]), len(x.shape[1:])
        x = x.detach().clone().float().to(self.device)
        with torch.no_grad():
            output = self._predict_fn(x)  # one pass for the label check and the target choice
        self.stats.forward_rows += x.shape[0]
        y_pred = torch.max(output, dim=1)[1]
        y = y_pred.detach().clone().long() if y is None else y.detach().clone().long().to(self.device)
        pred = y_pred == y
        if pred.sum() == 0:
            return x
        pred = self.check_shape(pred.nonzero().squeeze())
        im2, la2 = x[pred].detach().clone(), y[pred].detach().clone()
        if len(im2.shape) == self.ndims:
            im2 = im2.unsqueeze(0)
        la_t2 = output.sort(dim=-1)[1][:, -self.target_class][pred].detach().clone() if is_targeted else la2
        bs = im2.shape[0]
        st = {"x1": self._start(im2, use_rand_start, bs), "im2": im2, "x0": im2.clone().reshape([bs, -1]),
              "la2": la2, "la_t2": la_t2, "pos": torch.arange(bs, device=im2.device)}
        adv, res2 = im2.clone(), 1e10 * torch.ones([bs]).to(self.device)
        rows = (min(bs, self.min_rows_backward), min(bs, self.min_rows_forward))  # upstream always sends bs rows
        for _ in range(self.n_iter):
            self.stats.dropped_row_iterations += bs - int(st["pos"].numel())
            self._iteration(st, adv, res2, rows, is_targeted)
            done = res2[st["pos"]] <= self.eps
            if bool(done.any()):
                for key, value in st.items():
                    st[key] = value[~done]
            if self.on_iteration is not None:
                self.on_iteration(int(st["pos"].numel()))
            if st["pos"].numel() == 0:
                break
        adv_c = x.clone()
        ind_succ = self.check_shape((res2 < 1e10).nonzero().squeeze())
        adv_c[pred[ind_succ]] = adv[ind_succ].clone()
        return adv_c

    def _start(self, im2, use_rand_start, bs):
        x1 = im2.clone()
        if not use_rand_start:
            return x1
        radius = torch.min(1e10 * torch.ones([bs]).to(self.device),
                           self.eps * torch.ones([bs]).to(self.device)).reshape([-1, *[1] * self.ndims])
        if self.norm == "Linf":
            t = 2 * torch.rand(x1.shape).to(self.device) - 1
            scale = t.reshape([t.shape[0], -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, *[1] * self.ndims])
            x1 = im2 + radius * t / scale * .5
        elif self.norm == "L2":
            t = torch.randn(x1.shape).to(self.device)
            x1 = im2 + radius * t / ((t ** 2).view(t.shape[0], -1).sum(dim=-1).sqrt()
                                     .view(t.shape[0], *[1] * self.ndims)) * .5
        else:
            t = torch.randn(x1.shape).to(self.device)
            x1 = im2 + radius * t / (t.abs().view(t.shape[0], -1).sum(dim=-1).view(t.shape[0], *[1] * self.ndims)) / 2
        return x1.clamp(0.0, 1.0)

    def _diff_grads(self, x1, la, la_t, min_rows, is_targeted):
        """``df``, ``dg`` of upstream's ``get_diff_logits_grads_batch[_targeted]`` for these rows."""
        n, u = x1.shape[0], torch.arange(x1.shape[0])
        im = x1.clone().requires_grad_()
        with torch.enable_grad():
            logits = _model_rows(self.predict, im, min_rows)
            if is_targeted:
                diffy = -(logits[u, la] - logits[u, la_t])
                (g,) = torch.autograd.grad(diffy.sum(), [im])
        self.stats.forward_rows += n
        self.stats.calls += 1
        if is_targeted:
            self.stats.backward_rows += n
            return diffy.detach().unsqueeze(1), g.unsqueeze(1)
        g2 = torch.zeros([logits.shape[-1], *im.size()]).to(self.device)
        mask = torch.zeros_like(logits)
        for c in range(logits.shape[-1]):
            mask[:, c] = 1.0
            (g,) = torch.autograd.grad(logits, [im], grad_outputs=mask, retain_graph=True)
            mask[:, c] = 0.0
            g2[c] = g if c == 0 else torch.zeros_like(g) + g  # upstream re-zeroes .grad, then accumulates
        self.stats.backward_rows += n * logits.shape[-1]
        g2 = torch.transpose(g2, 0, 1).detach()
        y2 = logits.detach()
        df = y2 - y2[u, la].unsqueeze(1)
        dg = g2 - g2[u, la].unsqueeze(1)
        df[u, la] = 1e10
        return df, dg

    def _iteration(self, st, adv, res2, rows, is_targeted):
        from pyautoattack.fab_projections import projection_l1, projection_l2, projection_linf

        x1, im2, x0, la2, pos = st["x1"], st["im2"], st["x0"], st["la2"], st["pos"]
        bs, nd = x1.shape[0], [1] * self.ndims
        with torch.no_grad():
            df, dg = self._diff_grads(x1, la2, st["la_t2"], rows[0], is_targeted)
            flat = dg.reshape(dg.shape[0], dg.shape[1], -1)
            if self.norm == "Linf":
                dist1 = df.abs() / (1e-12 + flat.abs().sum(dim=-1))
            elif self.norm == "L2":
                dist1 = df.abs() / (1e-12 + (dg ** 2).reshape(dg.shape[0], dg.shape[1], -1).sum(dim=-1).sqrt())
            else:
                dist1 = df.abs() / (1e-12 + dg.abs().reshape([df.shape[0], df.shape[1], -1]).max(dim=2)[0])
            u1 = torch.arange(bs)
            ind = dist1.min(dim=1)[1]
            dg2 = dg[u1, ind]
            b = (- df[u1, ind] + (dg2 * x1).reshape(x1.shape[0], -1).sum(dim=-1))
            w = dg2.reshape([bs, -1])
            project = {"Linf": projection_linf, "L2": projection_l2, "L1": projection_l1}[self.norm]
            d3 = project(torch.cat((x1.reshape([bs, -1]), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1, d2 = torch.reshape(d3[:bs], x1.shape), torch.reshape(d3[-bs:], x1.shape)
            a0 = self._norm_rows(d3, keepdim=True).view(-1, *nd)
            a0 = torch.max(a0, 1e-8 * torch.ones(a0.shape).to(self.device))
            a1, a2 = a0[:bs], a0[-bs:]
            alpha = torch.min(torch.max(a1 / (a1 + a2), torch.zeros(a1.shape).to(self.device)),
                              self.alpha_max * torch.ones(a1.shape).to(self.device))
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (im2 + d2 * self.eta) * alpha).clamp(0.0, 1.0)
            is_adv = torch.max(_model_rows(self._predict_fn, x1, rows[1]), dim=1)[1] != la2
            self.stats.forward_rows += bs
            if is_adv.sum() > 0:
                ia = self.check_shape(is_adv.nonzero().squeeze())
                t = self._norm_rows((x1[ia] - im2[ia]).reshape([ia.shape[0], -1]), keepdim=False)
                hit = pos[ia]
                adv[hit] = x1[ia] * (t < res2[hit]).float().reshape([-1, *nd]) \
                    + adv[hit] * (t >= res2[hit]).float().reshape([-1, *nd])
                res2[hit] = t * (t < res2[hit]).float() + res2[hit] * (t >= res2[hit]).float()
                x1[ia] = im2[ia] + (x1[ia] - im2[ia]) * self.beta
        st["x1"] = x1

    def _norm_rows(self, d: torch.Tensor, keepdim: bool) -> torch.Tensor:
        if self.norm == "Linf":
            return d.abs().max(dim=1, keepdim=keepdim)[0]
        if self.norm == "L2":
            return (d ** 2).sum(dim=1, keepdim=keepdim).sqrt()
        return d.abs().sum(dim=1, keepdim=keepdim)


# ----------------------------------------------------------------------------------------------------------
# Square


MEMO_MAX_ROWS = 20_000_000  # (query, point) pairs remembered per batch at most (12 bytes each)


class _Draws:
    """Square's per-query random draws (``random_int`` twice, then ``random_choice([c, 1, 1])``), taken from the
    global generator in one call: torch's CPU generator yields the same sequence whether drawn one value or many
    at a time. ``leave_generator_after(k)`` then puts the generator where k queries of upstream would leave it."""

    def __init__(self, n_queries: int, c: int) -> None:
        self.c, self.state = c, torch.get_rng_state()
        self.values = torch.rand(n_queries * (2 + c)).tolist()
        self.pos = 0

    def query(self, h_range: int, w_range: int) -> tuple[int, int, tuple[float, ...]]:
        v, p, c = self.values, self.pos, self.c
        self.pos += 2 + c
        vh = int(np.float32(0) + np.float32(h_range) * np.float32(v[p]))  # low + (high - low) * u, in float32
        vw = int(np.float32(0) + np.float32(w_range) * np.float32(v[p + 1]))
        return vh, vw, tuple(1.0 if u > 0.5 else (0.0 if u == 0.5 else -1.0) for u in v[p + 2:p + 2 + c])

    def leave_generator_after(self, queries: int) -> None:
        torch.set_rng_state(self.state)
        if queries:
            torch.rand(queries * (2 + self.c))


class _ExactSquareLoop:
    """``attack_single_run`` of pyautoattack 0.2.0's Square (Linf, margin loss) without repeated queries.

    A point's margin at its best example equals its ``margin_min`` (both start there and change together), so a
    query whose result is known (unchanged input, or the same query at the same best example as before) cannot
    be accepted and leaves the point as it is; only the other points are sent to the model and updated."""

    stats: EngineStats
    on_iteration: Callable[[int], None] | None = None
    min_rows_forward: int = 1 << 30  # set by accelerate from the batch-invariance check
    min_rows_backward: int = 1 << 30

    def attack_single_run(self, x, y):
        if self.norm != "Linf" or self.loss != "margin" or self.targeted:
            return super().attack_single_run(x, y)  # type: ignore[misc]
        with torch.no_grad():
            c, h, w = x.shape[1:]
            n, n_features = x.shape[0], c * h * w
            x_best = torch.clamp(x + self.eps * self.random_choice([n, c, 1, w]), 0., 1.)
            margin_min, loss_min = self.margin_and_loss(x_best, y)
            self.stats.forward_rows += n
            if (margin_min < 0.0).all():
                return torch.ones(n).to(self.device), x_best
            st = {"x": x, "y": y, "x_best": x_best, "margin_min": margin_min, "loss_min": loss_min,
                  "version": torch.zeros(n, dtype=torch.int64, device=x.device), "memo": {}, "improvements": 0,
                  "queries": torch.where(margin_min > 0.0, -1.0, 1.0)}  # -1: still queried
            draws = _Draws(self.n_queries, c)  # upstream's per-query random draws, taken in one call
            idx, ran = (margin_min > 0.0).nonzero().flatten(), 0
            for i_iter in range(self.n_queries):
                if idx.numel() == 0:  # upstream would query an empty batch, then stop
                    break
                s = min(max(int(round(math.sqrt(self.p_selection(i_iter) * n_features / c))), 1), min(h, w))
                key, ran = (s, *draws.query(h - s, w - s)), ran + 1
                memo = st["memo"] if max(h - s, 1) * max(w - s, 1) * 2 ** c <= min(
                    self.n_queries, MEMO_MAX_ROWS // n) else None
                few = idx.numel() < self.min_rows_forward  # upstream's few-row kernels: query exactly as upstream
                if self._query(st, idx, key, None if few else memo, 0 if few else self.min_rows_forward):
                    active = st["margin_min"] > 0.0
                    st["queries"][(~active) & (st["queries"] < 0)] = 1.0 + ran
                    idx = active.nonzero().flatten()
                if self.on_iteration is not None:
                    self.on_iteration(int(idx.numel()))
                if idx.numel() == 0:
                    break
            draws.leave_generator_after(ran)
            st["queries"][st["queries"] < 0] = 1.0 + ran  # upstream: one query per point and iteration it took part in
        return st["queries"], st["x_best"]

    def _query(self, st, idx, key, memo, min_rows) -> bool:
        """One query for the points ``idx``: points whose answer is known (same query at the same best example,
        or an input the query leaves unchanged) are left as they are, as upstream would leave them; the rest go
        to the model and are updated with upstream's arithmetic. True if any point's best example changed."""
        version = st["version"]
        entry = memo.get(key) if memo is not None else None
        if entry is not None and entry[3] == st["improvements"]:  # nothing improved since: every answer known
            self.stats.reused_rows += int(idx.numel())
            return False
        rows = idx if entry is None else idx[entry[0][idx] != version[idx]]
        if rows.numel():
            s, vh, vw, signs = key
            c, h, w = st["x"].shape[1:]
            new_deltas = torch.zeros([c, h, w]).to(self.device)
            new_deltas[:, vh:vh + s, vw:vw + s] = 2. * self.eps * torch.tensor(signs).view(c, 1, 1).to(self.device)
            x_curr, x_best_curr = st["x"][rows], st["x_best"][rows]
            x_new = torch.clamp(torch.min(torch.max(x_best_curr + new_deltas, x_curr - self.eps),
                                          x_curr + self.eps), 0., 1.)
            if min_rows:  # an unchanged input gets its stored margin back from the model and is rejected
                changed = ~(x_new == x_best_curr).flatten(1).all(1)
                if memo is not None:
                    entry = entry if entry is not None else self._memo_entry(memo, key, st)
                    same = rows[~changed]
                    entry[0][same], entry[1][same], entry[2][same] = (version[same], st["margin_min"][same],
                                                                      st["loss_min"][same])
                rows, x_new, x_best_curr = rows[changed], x_new[changed], x_best_curr[changed]
        self.stats.reused_rows += int(idx.numel() - rows.numel())
        improved = self._update(st, rows, x_new, x_best_curr, min_rows, memo, key) if rows.numel() else 0
        if memo is not None and key in memo:
            memo[key][3] = st["improvements"] if improved == 0 else None
        return improved > 0

    @staticmethod
    def _memo_entry(memo, key, st) -> list:
        version = st["version"]
        entry = memo[key] = [torch.full_like(version, -1), torch.empty_like(st["margin_min"]),
                             torch.empty_like(st["loss_min"]), None]
        return entry

    def _update(self, st, rows, x_new, x_best_curr, min_rows, memo, key) -> int:
        """Upstream's acceptance step for the queried points; returns how many changed their best example."""
        version = st["version"]
        margin, loss = self._margin_rows(x_new, st["y"][rows], min_rows)
        if memo is not None:
            entry = memo[key] if key in memo else self._memo_entry(memo, key, st)
            entry[0][rows], entry[1][rows], entry[2][rows] = version[rows], margin, loss
        margin_min_curr, loss_min_curr = st["margin_min"][rows], st["loss_min"][rows]
        idx_improved = (loss < loss_min_curr).float()
        st["loss_min"][rows] = idx_improved * loss + (1. - idx_improved) * loss_min_curr
        idx_miscl = (margin <= 0.).float()
        idx_improved = torch.max(idx_improved, idx_miscl)
        st["margin_min"][rows] = idx_improved * margin + (1. - idx_improved) * margin_min_curr
        changed = rows[idx_improved > 0]
        version[changed] += 1
        st["improvements"] += int(changed.numel())
        idx_improved = idx_improved.reshape([-1, *[1] * (x_new.dim() - 1)])
        st["x_best"][rows] = idx_improved * x_new + (1. - idx_improved) * x_best_curr
        return int(changed.numel())

    def _margin_rows(self, x_rows, y_rows, min_rows):
        k = x_rows.shape[0]
        self.stats.forward_rows += k
        self.stats.calls += 1
        if k >= min_rows:
            return self.margin_and_loss(x_rows, y_rows)
        margin, loss = self.margin_and_loss(torch.cat([x_rows, x_rows[:1].expand(min_rows - k, *x_rows.shape[1:])]),
                                            torch.cat([y_rows, y_rows[:1].expand(min_rows - k)]))
        return margin[:k], loss[:k]


# ----------------------------------------------------------------------------------------------------------
# wiring


def _exact_classes() -> dict[str, type]:
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    return {
        "apgd": type("ExactAPGD", (_ExactAPGDLoop, APGDAttack), {}),
        "apgd_targeted": type("ExactAPGDTargeted", (_ExactAPGDLoop, APGDAttack_targeted), {}),
        "fab": type("ExactFAB", (_ExactFABLoop, FABAttack_PT), {}),
        "square": type("ExactSquare", (_ExactSquareLoop, SquareAttack), {}),
    }


def _upgrade(obj: Any, cls: type) -> Any:
    new = cls.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.stats = EngineStats()
    return new


def _coverage(adversary: Any) -> dict[str, str]:
    """Per attack in the run: which loop runs it, and what the exact loop skips."""
    apgd_ok = adversary.norm in ("Linf", "L2")
    notes = {
        "apgd-ce": ("exact: misclassified points leave the batch, unmoved iterates reuse their gradient"
                    if apgd_ok and adversary.apgd.eot_iter == 1 else "upstream loop (EOT or L1 schedule)"),
        "apgd-t": ("exact: misclassified points leave the batch, unmoved iterates reuse their gradient"
                   if apgd_ok and adversary.apgd_targeted.eot_iter == 1 else "upstream loop (EOT or L1 schedule)"),
        "fab": "exact: points leave the batch once an adversarial example within eps is found",
        "square": ("exact: unchanged inputs and repeated queries at the same best point are not re-sent"
                   if adversary.norm == "Linf" else "upstream loop (Square is exact-accelerated for Linf only)"),
    }
    notes["apgd-dlr"], notes["fab-t"] = notes["apgd-ce"], notes["fab"]
    return {a: notes[a] for a in adversary.attacks_to_run}


def accelerate(adversary: Any, model: nn.Module, x_probe: torch.Tensor) -> EngineInfo:
    """Swap ``adversary``'s APGD, FAB and Square objects for the exact faster loops when the installed
    pyautoattack is a checked version and ``model`` is batch-invariant on ``x_probe`` (a few inputs on the
    model's device); otherwise leave it unchanged. Returns what was done and why."""
    version = _version()
    if version not in CHECKED_PYAUTOATTACK:
        return EngineInfo("upstream", f"pyautoattack {version}: the exact loops are checked against "
                                      f"{', '.join(CHECKED_PYAUTOATTACK)} only")
    inv = batch_invariance(model, x_probe[:PROBE_POINTS])
    if inv.forward is None or inv.backward is None:
        return EngineInfo("upstream", f"not batch-invariant: {inv.reason}; pyautoattack's own loops run unchanged")
    for name, cls in _exact_classes().items():
        obj = _upgrade(getattr(adversary, name), cls)
        obj.min_rows_forward, obj.min_rows_backward = inv.forward, inv.backward
        setattr(adversary, name, obj)
    return EngineInfo("exact", f"per-point logits and input gradients batch-invariant from {inv.forward} and "
                               f"{inv.backward} rows on (checked on {inv.points} points)", _coverage(adversary))


def engine_stats(adversary: Any) -> dict[str, dict[str, int]]:
    """Model rows evaluated and skipped so far by each exact attack object (empty for upstream objects)."""
    return {name: getattr(adversary, name).stats.to_dict() for name in ("apgd", "apgd_targeted", "fab", "square")
            if isinstance(getattr(getattr(adversary, name), "stats", None), EngineStats)}


def set_iteration_hook(adversary: Any, hook: Callable[[int], None] | None) -> None:
    """Call ``hook(points_still_attacked)`` after every iteration of the exact loops (progress bars)."""
    for name in ("apgd", "apgd_targeted", "fab", "square"):
        obj = getattr(adversary, name)
        if isinstance(getattr(obj, "stats", None), EngineStats):
            obj.on_iteration = hook


# ----------------------------------------------------------------------------------------------------------
# work model (duration estimates, progress bars)


@dataclass(frozen=True)
class Work:
    """One attack's model calls per point that stays robust (its worst case) and its loop iterations per batch."""

    forward: float
    forward_backward: float
    iterations: int


def _distinct(keys: int, draws: int) -> float:
    """Expected number of distinct values among ``draws`` uniform draws from ``keys`` values."""
    return keys * (1.0 - (1.0 - 1.0 / keys) ** draws) if keys > 1 else min(1.0, draws)


def square_forwards(input_shape: tuple[int, ...], n_queries: int, p_init: float, exact: bool) -> float:
    """Forward passes per point that stays robust in Square (Linf). The exact loop sends only new queries: about
    twice the distinct (window, sign) queries of each phase of the schedule (a point's best example changes now
    and then, which makes old answers stale), at most one per query."""
    if not exact:
        return float(n_queries)
    c, h, w = input_shape
    bounds = [0, 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000, 10 ** 9]
    total, seen = 0.0, {}
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k] + (1 if k else 0), min(bounds[k + 1], n_queries - 1)
        if hi < lo:
            break
        s = min(max(int(round(math.sqrt(p_init / 2 ** k * c * h * w / c))), 1), min(h, w))
        seen[s] = seen.get(s, 0) + hi - lo + 1
    for s, draws in seen.items():
        keys = max(h - s, 1) * max(w - s, 1) * 2 ** c
        total += min(float(draws), 2.0 * _distinct(keys, draws))
    return total


def attack_work(adversary: Any, attack: str, n_classes: int, input_shape: tuple[int, ...], exact: bool) -> Work:
    """Work of one pyautoattack attack as configured on ``adversary`` (after its version's settings)."""
    if attack in ("apgd-ce", "apgd-dlr"):
        a = adversary.apgd
        steps = a.n_restarts * (a.n_iter + 1) * a.eot_iter
        return Work(1, steps, a.n_restarts * a.n_iter)
    if attack == "apgd-t":
        a = adversary.apgd_targeted
        runs = a.n_target_classes * a.n_restarts
        return Work(1 + runs, runs * (a.n_iter + 1), runs * a.n_iter)
    if attack in ("fab", "fab-t"):
        f = adversary.fab
        runs = f.n_target_classes if attack == "fab-t" else f.n_restarts
        backward = 1 if attack == "fab-t" else n_classes
        return Work(runs * (f.n_iter + 3), runs * f.n_iter * backward, runs * f.n_iter)
    if attack == "square":
        sq = adversary.square
        forwards = square_forwards(input_shape, sq.n_queries, sq.p_init, exact and adversary.norm == "Linf")
        return Work(sq.n_restarts * (forwards + 2), 0, sq.n_restarts * sq.n_queries)
    raise ValueError(f"unknown AutoAttack attack {attack!r}")
