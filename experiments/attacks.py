"""White-box evasion attacks for evaluation and adversarial training: FGSM, PGD (linf / l2), CW-inf, GAMA-PGD.

Functional core: ``pgd`` does the work; ``fgsm`` and ``cw_inf`` are PGD with fixed settings; ``gama_pgd`` is
the guided margin attack (its own loss and step schedule).
Every attack returns a detached ``x_adv`` inside the eps-ball around ``x`` and inside [0, 1], restores
the model's train/eval flags (per module) and never writes gradients into the model's parameters.

Named presets (``get_attack_preset``) hold the settings that published numbers use, with the step size
stored as a fraction of eps so one preset serves every eps.

References: Goodfellow et al. 2015 (FGSM); Madry et al. 2018 (PGD); Carlini & Wagner 2017 (margin loss,
used as PGD on the CW loss as in the TRADES/MART/RobustWRN evaluation code); Wong et al. 2020 (FGSM with
random start); Zhang et al. 2019 (TRADES: Gaussian start 0.001 * randn); Sriramanan et al. 2020 (GAMA).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

from lipschitz.ball import NORMS, ascent_step, project, random_in_ball  # noqa: F401  (project re-exported)

RANDOM_STARTS = ("uniform", "normal", "none")
LOSSES = ("ce", "margin")
BN_MODES = ("eval", "train", "keep")

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Union[str, LossFn]


class BallViolationError(ValueError):
    """An adversarial example left its eps-ball or the [0, 1] box (or contains NaN)."""


# ----------------------------------------------------------------------------------------------------------
# validation helpers


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor of images in [0, 1], got dtype {x.dtype}")
    if y.dtype != torch.int64 or y.dim() != 1:
        raise TypeError(f"y must be a 1-D int64 tensor of labels, got dtype {y.dtype} shape {tuple(y.shape)}")
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (shape {tuple(x.shape)}) and y (shape {tuple(y.shape)}) need the same batch size")
    if x.numel() and (torch.isnan(x).any() or x.min() < 0 or x.max() > 1):
        raise ValueError(
            "x must lie in [0, 1] without NaN (models take unnormalised images; put normalisation inside the model)"
        )


def _check_eps(eps: float, norm: str) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_choice("norm", norm, NORMS)


# ----------------------------------------------------------------------------------------------------------
# model mode handling


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


@contextlib.contextmanager
def model_mode(model: nn.Module, bn_mode: str) -> Iterator[nn.Module]:
    """Put ``model`` in eval ("eval"), train ("train") or its current ("keep") mode; restore every module after.

    "train" lets batch norm use (and update) batch statistics while crafting, as some training codes do.
    """
    _check_choice("bn_mode", bn_mode, BN_MODES)
    saved = _module_modes(model)
    try:
        if bn_mode == "eval":
            model.eval()
        elif bn_mode == "train":
            model.train()
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


# ----------------------------------------------------------------------------------------------------------
# losses (per-sample; the attack maximises them)


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``z_y - max_{j != y} z_j``: positive iff the example is classified correctly (no ties)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {tuple(logits.shape)}")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def cw_loss(logits: torch.Tensor, y: torch.Tensor, confidence: float = 0.0) -> torch.Tensor:
    """Carlini-Wagner margin loss ``-relu(z_y - max_{j != y} z_j + confidence)`` per sample.

    References: Carlini & Wagner 2017 (kappa = confidence).
    """
    return -F.relu(logit_margin(logits, y) + confidence)


def _per_sample_loss(loss: Loss, model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     confidence: float) -> torch.Tensor:
    if callable(loss):
        value = loss(model, x_adv, x, y)
        if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"a callable loss must return one value per example, shape ({x.shape[0]},), got {shape}"
            )
        return value
    logits = model(x_adv)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return cw_loss(logits, y, confidence)


# ----------------------------------------------------------------------------------------------------------
# the eps-ball: random starts, projection and ascent steps live in lipschitz.ball


def _random_start(x: torch.Tensor, eps: float, norm: str, random_start: str, init_std: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    if random_start == "none" or eps == 0:
        return x.clone()
    if random_start == "normal":
        noise = init_std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        noise = random_in_ball(x.shape, eps, norm, generator=generator, dtype=x.dtype, device=x.device)
    return project(x + noise, x, eps, norm)


# ----------------------------------------------------------------------------------------------------------
# attacks


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: str = "uniform",
    loss: Loss = "ce",
    restarts: int = 1,
    bn_mode: str = "eval",
    init_std: float = 0.001,
    confidence: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on a per-sample loss inside the ``norm`` eps-ball and [0, 1].

    ``loss``: "ce" (cross-entropy), "margin" (CW loss ``-relu(z_y - max_{j!=y} z_j + confidence)``) or a
    callable ``loss(model, x_adv, x, y) -> (N,)`` (e.g. TRADES' KL to the clean prediction).
    ``random_start``: "uniform" in the ball, "normal" (``init_std * randn``, TRADES) or "none".
    ``restarts > 1`` keeps, per example, a misclassifying restart if any, else the highest final loss.
    ``bn_mode``: "eval" (default), "train" (batch statistics; running stats get updated) or "keep".
    ``generator`` makes the random starts reproducible without touching the global RNG.

    References: Madry et al. 2018; Zhang et al. 2019 (normal start); Carlini & Wagner 2017 (margin loss).
    """
    _check_inputs(x, y)
    _check_eps(eps, norm)
    _check_choice("random_start", random_start, RANDOM_STARTS)
    if not callable(loss):
        _check_choice("loss", loss, LOSSES)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if not math.isfinite(step_size) or step_size < 0:
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    x = x.detach()
    best: torch.Tensor | None = None
    best_fooled = best_loss = None
    with model_mode(model, bn_mode), torch.enable_grad():
        for _ in range(restarts):
            x_adv = _random_start(x, eps, norm, random_start, init_std, generator)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                values = _per_sample_loss(loss, model, x_adv, x, y, confidence)
                if not torch.isfinite(values).all():
                    raise ValueError("the attack loss is NaN/Inf; check the model's logits for NaN/Inf")
                (grad,) = torch.autograd.grad(values.sum(), x_adv)
                x_adv = project(ascent_step(x_adv.detach(), grad, step_size, norm), x, eps, norm)
            x_adv = x_adv.detach()
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                fooled = logits.argmax(dim=1) != y
                final = (_per_sample_loss(loss, model, x_adv, x, y, confidence) if callable(loss)
                         else (F.cross_entropy(logits, y, reduction="none") if loss == "ce"
                               else cw_loss(logits, y, confidence)))
            if best is None:
                best, best_fooled, best_loss = x_adv, fooled, final
                continue
            take = (fooled & ~best_fooled) | ((fooled == best_fooled) & (final > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_fooled = best_fooled | fooled
            best_loss = torch.where(take, final, best_loss)
    assert best is not None
    return best


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: str = "none",
    loss: Loss = "ce",
    bn_mode: str = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One gradient(-sign) step of size ``step_size`` (default eps), projected to the ball and [0, 1].

    With ``random_start="uniform"`` and ``step_size=1.25 * eps`` this is FGSM-RS (Wong et al. 2020).
    References: Goodfellow et al. 2015; Wong et al. 2020.
    """
    return pgd(model, x, y, eps=eps, step_size=eps if step_size is None else step_size, steps=1, norm=norm,
               random_start=random_start, loss=loss, bn_mode=bn_mode, generator=generator)


def cw_inf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    confidence: float = 0.0,
    random_start: str = "uniform",
    restarts: int = 1,
    bn_mode: str = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CW-inf: linf PGD on the margin loss ``-relu(z_y - max_{j!=y} z_j + confidence)``.

    ``confidence=0`` (default) is the plain CW margin as in the RobustWRN evaluation code (which applies the
    relu to the batch sum; here it is per example); ``confidence=50`` is the MART/TRADES-repo variant that
    keeps the gradient alive past the decision boundary.
    References: Carlini & Wagner 2017; Huang et al. 2021 (evaluation code).
    """
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm="linf", random_start=random_start,
               loss="margin", confidence=confidence, restarts=restarts, bn_mode=bn_mode, generator=generator)


def _probability_margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max_{j != y} p_j - p_y`` on softmax outputs: positive iff misclassified (no ties)."""
    return -logit_margin(probs, y)


def gama_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    step_size: float | None = None,
    milestones: tuple[int, ...] | None = None,
    decay: float = 10.0,
    relax_weight: float = 50.0,
    relax_steps: int | None = None,
    anchor: str = "start",
    keep_best: bool = True,
    bn_mode: str = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GAMA-PGD (linf): signed ascent on the margin of the softmax outputs, guided early on by a relaxation term.

    Maximises ``max_{j != y} p_j(x') - p_y(x') + lambda_t ||p(x') - p(a)||_2^2`` where ``p`` is the softmax,
    ``lambda_t = relax_weight * (1 - t / relax_steps)`` for steps ``t <= relax_steps`` and 0 afterwards, and the
    anchor ``a`` is the random start (``anchor="start"``, as the released GAMA-PGD evaluation code) or the
    clean input (``"clean"``). The start is ``x + eps * s`` with independent random signs ``s`` (drawn as
    ``sign(2u - 1)``, ``u = torch.rand(x.shape, generator)``). The step (default ``2 * eps``) is divided by
    ``decay`` at each of ``milestones`` (default 60% and 85% of ``steps``: 60 and 85 for 100 steps);
    ``relax_steps`` defaults to a quarter of ``steps``. Every iterate is projected to the eps-ball and [0, 1].
    ``keep_best`` returns, per example, the iterate with the largest probability margin seen (so any iterate
    that fooled the model counts), else the last iterate.

    References: Sriramanan et al., "Guided Adversarial Attack for Evaluating and Enhancing Adversarial
    Defenses", NeurIPS 2020.
    """
    _check_inputs(x, y)
    _check_eps(eps, "linf")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    _check_choice("anchor", anchor, ("start", "clean"))
    step = 2.0 * eps if step_size is None else float(step_size)
    marks = set(milestones if milestones is not None else (round(0.6 * steps), round(0.85 * steps)))
    relax = max(round(0.25 * steps), 1) if relax_steps is None else int(relax_steps)
    x = x.detach()
    signs = torch.sign(torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1)
    x_adv = project(x + eps * signs, x, eps, "linf")
    with model_mode(model, bn_mode), torch.enable_grad():
        with torch.no_grad():
            p_anchor = F.softmax(model(x_adv if anchor == "start" else x), dim=1)
        best, best_margin = x_adv.clone(), torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
        for t in range(steps):
            if t in marks:
                step /= decay
            x_adv.requires_grad_(True)
            probs = F.softmax(model(x_adv), dim=1)
            margin = _probability_margin(probs, y)
            weight = relax_weight * max(0.0, 1.0 - t / relax)
            loss = margin + weight * (probs - p_anchor).pow(2).sum(dim=1)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            with torch.no_grad():
                better = margin > best_margin
                best[better], best_margin[better] = x_adv[better], margin[better]
            x_adv = project(x_adv.detach() + step * grad.sign(), x, eps, "linf")
        with torch.no_grad():
            margin = _probability_margin(F.softmax(model(x_adv), dim=1), y)
            better = margin > best_margin
            best[better] = x_adv[better]
    return (best if keep_best else x_adv).detach()


def check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf",
                  atol: float = 1e-6) -> float:
    """Raise ``BallViolationError`` unless every ``x_adv`` is finite, in [0, 1] and within eps (+atol) of ``x``.

    Returns the largest perturbation norm found.
    """
    _check_eps(eps, norm)
    if x_adv.shape != x.shape:
        raise BallViolationError(f"x_adv has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if x_adv.numel() == 0:
        return 0.0
    if torch.isnan(x_adv).any():
        bad = torch.isnan(x_adv).flatten(1).any(1).nonzero().flatten().tolist()
        raise BallViolationError(f"x_adv contains NaN at examples {bad[:10]}")
    outside = (x_adv < -atol) | (x_adv > 1 + atol)
    if outside.any():
        bad = outside.flatten(1).any(1).nonzero().flatten().tolist()
        raise BallViolationError(
            f"x_adv leaves [0, 1] at examples {bad[:10]} (min {x_adv.min().item():.6g}, max {x_adv.max().item():.6g})"
        )
    delta = (x_adv - x).flatten(1).double()
    dist = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    violating = dist > eps + atol
    if violating.any():
        bad = violating.nonzero().flatten().tolist()
        raise BallViolationError(
            f"{len(bad)} adversarial example(s) outside the {norm} ball of radius {eps:.6g} (+atol {atol:g}): "
            f"examples {bad[:10]}, largest distance {dist.max().item():.6g}"
        )
    return float(dist.max().item())


# ----------------------------------------------------------------------------------------------------------
# presets

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


@dataclass(frozen=True)
class AttackPreset:
    """A named attack setting. ``step_fraction`` is the step size as a fraction of eps.

    ``kind``: "pgd", "fgsm", "cw", "gama" (run by ``run``; GAMA reads ``relax_weight``, ``relax_fraction``,
    ``milestone_fractions`` and ``decay`` from ``extra``) or "autoattack" (run by ``experiments.evaluate``).
    """

    name: str
    kind: str
    norm: str = "linf"
    steps: int = 0
    step_fraction: float = 0.0
    restarts: int = 1
    random_start: str = "uniform"
    loss: str = "ce"
    confidence: float = 0.0
    version: str | None = None  # autoattack only
    attacks: tuple[str, ...] = ()  # autoattack version="custom" only
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> "AttackPreset":
        """A copy with some fields changed (unknown field -> ValueError listing the fields)."""
        valid = set(self.__dataclass_fields__)
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; valid: {', '.join(sorted(valid))}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["attacks"] = list(self.attacks)
        return d

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, bn_mode: str = "eval",
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Run a gradient attack preset at ``eps``; AutoAttack presets go through ``experiments.evaluate``."""
        step = self.step_fraction * eps
        if self.kind == "pgd":
            return pgd(model, x, y, eps=eps, step_size=step, steps=self.steps, norm=self.norm,
                       random_start=self.random_start, loss=self.loss, restarts=self.restarts,
                       confidence=self.confidence, bn_mode=bn_mode, generator=generator)
        if self.kind == "fgsm":
            return fgsm(model, x, y, eps=eps, step_size=step, norm=self.norm, random_start=self.random_start,
                        bn_mode=bn_mode, generator=generator)
        if self.kind == "cw":
            return cw_inf(model, x, y, eps=eps, step_size=step, steps=self.steps, confidence=self.confidence,
                          random_start=self.random_start, restarts=self.restarts, bn_mode=bn_mode,
                          generator=generator)
        if self.kind == "gama":
            e = self.extra
            return gama_pgd(model, x, y, eps=eps, steps=self.steps, step_size=step,
                            milestones=tuple(round(f * self.steps) for f in e.get("milestone_fractions", (0.6, 0.85))),
                            decay=e.get("decay", 10.0), relax_weight=e.get("relax_weight", 50.0),
                            relax_steps=max(round(e.get("relax_fraction", 0.25) * self.steps), 1),
                            anchor=e.get("anchor", "start"), bn_mode=bn_mode, generator=generator)
        raise ValueError(f"preset {self.name!r} is an AutoAttack preset; run it with experiments.evaluate.evaluate")


_PRESETS: dict[str, AttackPreset] = {
    p.name: p
    for p in (
        AttackPreset("fgsm", "fgsm", steps=1, step_fraction=1.0, random_start="none",
                     description="FGSM, one signed step of size eps"),
        AttackPreset("fgsm-rs", "fgsm", steps=1, step_fraction=1.25, random_start="uniform",
                     description="FGSM with uniform random start, step 1.25 eps (Wong et al. 2020)"),
        AttackPreset("pgd10", "pgd", steps=10, step_fraction=0.25,
                     description="PGD-10, step eps/4 (2/255 at 8/255), uniform start, CE"),
        AttackPreset("pgd20", "pgd", steps=20, step_fraction=0.1,
                     description="PGD-20, step eps/10 (0.8/255 at 8/255) as in the paper's evaluation code"),
        AttackPreset("pgd50-restarts", "pgd", steps=50, step_fraction=0.25, restarts=10,
                     description="PGD-50 with 10 restarts, step eps/4, CE"),
        AttackPreset("pgd-l2", "pgd", norm="l2", steps=20, step_fraction=0.125,
                     description="l2 PGD-20, step 2.5 eps/20 (Madry et al.), uniform start in the l2 ball"),
        AttackPreset("cw20", "cw", steps=20, step_fraction=0.1, loss="margin",
                     description="CW-inf: PGD-20 on -relu(z_y - max_{j!=y} z_j), step eps/10, as in the paper code"),
        AttackPreset("gama-pgd100", "gama", steps=100, step_fraction=2.0, random_start="signs", loss="gama",
                     description="GAMA-PGD-100: probability margin + decaying relaxation term (weight 50 over 25 "
                                 "steps), step 2 eps divided by 10 at steps 60 and 85, random-sign start "
                                 "(Sriramanan et al. 2020)",
                     extra={"relax_weight": 50.0, "relax_fraction": 0.25, "milestone_fractions": (0.6, 0.85),
                            "decay": 10.0, "anchor": "start"}),
        AttackPreset("aa", "autoattack", version="standard",
                     description="AutoAttack standard: apgd-ce, apgd-t, fab-t, square (Croce & Hein 2020)"),
        AttackPreset("aa-plus", "autoattack", version="plus",
                     description="AutoAttack plus: apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t with restarts"),
        AttackPreset("aa-rand", "autoattack", version="rand",
                     description="AutoAttack rand (randomised defenses): apgd-ce, apgd-dlr with EOT 20"),
    )
}


def list_attack_presets() -> list[str]:
    """Names accepted by ``get_attack_preset`` (plus "aa-custom:ATTACK+ATTACK...")."""
    return sorted(_PRESETS)


def get_attack_preset(name: str) -> AttackPreset:
    """The preset called ``name``; "aa-custom:apgd-ce+apgd-t" builds an AutoAttack custom list.

    Raises ValueError listing the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"attack preset name must be a string, got {type(name).__name__}")
    if name.startswith("aa-custom:"):
        attacks = tuple(a for a in name.split(":", 1)[1].split("+") if a)
        return autoattack_custom(attacks)
    if name not in _PRESETS:
        raise ValueError(
            f"unknown attack preset {name!r}; valid: {', '.join(list_attack_presets())}, aa-custom:ATTACK+ATTACK "
            f"(attacks: {', '.join(AUTOATTACK_ATTACKS)})"
        )
    return _PRESETS[name]


def autoattack_custom(attacks: tuple[str, ...] | list[str], name: str | None = None) -> AttackPreset:
    """An AutoAttack preset with version="custom" and the given attack list (upstream settings otherwise)."""
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError(f"an AutoAttack custom list needs at least one attack from: {', '.join(AUTOATTACK_ATTACKS)}")
    unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
    if unknown:
        raise ValueError(f"unknown AutoAttack attack(s) {unknown}; valid: {', '.join(AUTOATTACK_ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"AutoAttack custom list has duplicates: {list(attacks)}")
    return AttackPreset(name or "aa-custom:" + "+".join(attacks), "autoattack", version="custom", attacks=attacks,
                        description="AutoAttack custom list: " + ", ".join(attacks))
