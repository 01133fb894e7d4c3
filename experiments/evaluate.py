"""Robustness evaluation: clean accuracy, gradient attacks and AutoAttack on exactly the points claimed.

``evaluate(model, x, y, attacks, eps=..., out_dir=...)`` runs named attack presets
(``experiments.attacks.get_attack_preset``) on the first ``n`` points (RobustBench convention) or a seeded
subset, checks every adversarial example (eps-ball, [0, 1], finite logits), and writes

- ``eval_summary.json``: clean accuracy, robust accuracy per attack, the worst case over the attacks run (per example
  AND over attacks), eps, norm, n, which points, seed, versions, and beside each PGD/CW run its stable accuracy
  and the paper code's local Lipschitz ratio at the attack's examples;
- ``per_example.jsonl``: one line per point (index, label, clean correct and margin, robust and margin per attack);
- ``eval_state.json`` (+ ``autoattack-NAME.adv.safetensors`` and pyautoattack's per-attack state files): progress
  per attack and per batch, so an interrupted evaluation picks up where it stopped.

AutoAttack runs through ``pyautoattack`` (the upstream code by Croce and Hein) with its own settings, one attack
at a time on the points still robust, which is exactly its own loop (every attack reseeds), so its numbers equal
a direct call on the same points and seed; by default with ``experiments.autoattack_engine``'s exact inner loops
(same flags, fewer model calls). Before the attacks, a duration estimate (``experiments.eval_estimate``).
See docs/evaluation.md.

References: Croce & Hein 2020 (AutoAttack); Croce et al. 2021 (RobustBench: first n test points);
Yang et al. 2020 and Huang et al. 2021 (stable accuracy and local Lipschitz ratio logged beside PGD).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from experiments.attacks import (
    AUTOATTACK_ATTACKS,
    AttackPreset,
    BallViolationError,
    check_in_ball,
    get_attack_preset,
    logit_margin,
    model_mode,
)
from experiments.io import RUN_FILES, atomic_write, locks_folder, write_json, write_text
from experiments.autoattack_engine import (
    PROBE_POINTS,
    EngineInfo,
    Work,
    accelerate,
    attack_work,
    engine_stats,
    frozen_parameters,
    set_iteration_hook,
)
from experiments.eval_estimate import DurationEstimate, PlannedAttack, estimate_duration, measure_unit_costs

POINT_SELECTIONS = ("first", "random")
EVAL_NORMS = {"linf": "Linf", "l2": "L2"}
DOCS_POINTER = "docs/evaluation.md#fewer-than-10-classes"
STATE_NAME = "eval_state.json"
SUMMARY_NAME = RUN_FILES["eval_summary"][0]  # eval_summary.json (summary.json in folders written before)
PER_EXAMPLE_NAME = "per_example.jsonl"
TARGETED_AA = ("apgd-t", "fab-t")
STANDARD_TARGET_CLASSES = 9
AA_ENGINES = ("exact", "upstream")


class LogitsError(ValueError):
    """The model's outputs are not usable logits (wrong shape/dtype, NaN/Inf, or probabilities)."""


# ----------------------------------------------------------------------------------------------------------
# small pure helpers


def select_points(n_total: int, n: int | None = None, selection: str = "first", seed: int = 0) -> torch.Tensor:
    """Indices of the points to evaluate: the first ``n`` in order, or ``n`` drawn without replacement by ``seed``
    (returned sorted). ``n=None`` takes all points."""
    if selection not in POINT_SELECTIONS:
        raise ValueError(f"unknown point selection {selection!r}; valid: {', '.join(POINT_SELECTIONS)}")
    if n is None:
        n = n_total
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > n_total:
        raise ValueError(f"n must be an int in [1, {n_total}] (the number of available points), got {n!r}")
    if selection == "first":
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def check_logits(logits: Any, where: str = "model output") -> torch.Tensor:
    """Raise ``LogitsError`` unless ``logits`` is a finite 2-D float (N, C>=2) tensor that is not a softmax."""
    if not isinstance(logits, torch.Tensor):
        raise LogitsError(f"{where} must be a tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise LogitsError(f"{where} must be logits of shape (N, classes>=2), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise LogitsError(f"{where} must be floating-point logits, got dtype {logits.dtype}")
    if not torch.isfinite(logits).all():
        raise LogitsError(f"{where} contains NaN/Inf logits; check the model weights and inputs")
    if (logits >= 0).all() and torch.allclose(logits.sum(dim=1), torch.ones(1, dtype=logits.dtype), atol=1e-5):
        raise LogitsError(
            f"{where} looks like probabilities (non-negative rows summing to 1); attacks need logits: "
            "remove the final softmax"
        )
    return logits


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("archlip", "pyautoattack"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:16]


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _batch_generator(seed: int, attack: str, batch: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{attack}/{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


def _paper_local_lipschitz(clean_logits: torch.Tensor, adv_logits: torch.Tensor, x: torch.Tensor,
                           x_adv: torch.Tensor) -> torch.Tensor:
    """Per-example ``||f(x) - f(x_adv)||_1 / ||x - x_adv||_inf`` (NaN where x_adv == x), as the paper code logs."""
    top = (clean_logits - adv_logits).abs().sum(dim=1)
    bottom = (x - x_adv).flatten(1).abs().amax(dim=1)
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-30), torch.full_like(top, float("nan")))


def _resolve_attacks(attacks: Iterable[str | AttackPreset] | str) -> list[AttackPreset]:
    if isinstance(attacks, (str, AttackPreset)):
        attacks = [attacks]
    presets = [a if isinstance(a, AttackPreset) else get_attack_preset(a) for a in attacks]
    if not presets:
        raise ValueError("attacks is empty; name at least one preset, e.g. ['pgd20', 'aa']")
    names = [p.name for p in presets]
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique, got {names}")
    return presets


# ----------------------------------------------------------------------------------------------------------
# state


def _load_state(path: Path, fingerprint: dict[str, Any], resume: bool) -> dict[str, Any]:
    if not path.exists():
        return {"fingerprint": fingerprint, "attacks": {}}
    if not resume:
        raise FileExistsError(
            f"{path} exists from an earlier evaluation; pass resume=True to continue it or use a new out_dir"
        )
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"state file {path} is not valid JSON ({err}); delete it to start over") from None
    old = state.get("fingerprint", {})
    differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if differ:
        raise ValueError(
            f"{path.parent} holds a different evaluation (differs in: {', '.join(differ)}); evaluate into "
            f"another folder, or delete {path} to start over"
        )
    return state


def _save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        write_json(path, state, indent=None)


# ----------------------------------------------------------------------------------------------------------
# runners


def _gradient_attack(model: nn.Module, preset: AttackPreset, x: torch.Tensor, y: torch.Tensor,
                     clean_logits: torch.Tensor, eps: float, norm: str, batch_size: int, seed: int,
                     entry: dict[str, Any], save: Any, progress: bool, device: torch.device) -> None:
    from tqdm.auto import tqdm

    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    for key in ("robust", "margin", "stable", "lipschitz_ratio"):
        entry.setdefault(key, [])
    start_batch = entry.get("done_batches", 0)
    t0 = time.perf_counter()
    for b in tqdm(range(start_batch, n_batches), desc=preset.name, disable=not progress, leave=False,
                  initial=start_batch, total=n_batches):
        sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
        xb, yb = x[sl].to(device), y[sl].to(device)
        x_adv = preset.run(model, xb, yb, eps=eps, bn_mode="eval", generator=_batch_generator(seed, preset.name, b))
        check_in_ball(x_adv, xb, eps, norm)
        with torch.no_grad():
            adv_logits = check_logits(model(x_adv), f"model output on {preset.name} examples").cpu()
        clean_b = clean_logits[sl]
        pred_adv = adv_logits.argmax(dim=1)
        clean_ok = clean_b.argmax(dim=1) == y[sl]
        entry["robust"] += (clean_ok & (pred_adv == y[sl])).tolist()
        entry["margin"] += logit_margin(adv_logits, y[sl]).tolist()
        entry["stable"] += (pred_adv == clean_b.argmax(dim=1)).tolist()
        ratio = _paper_local_lipschitz(clean_b, adv_logits, xb.cpu(), x_adv.cpu())
        entry["lipschitz_ratio"] += [None if math.isnan(v) else v for v in ratio.tolist()]
        entry["done_batches"] = b + 1
        entry["seconds"] = entry.get("seconds", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        save()
    entry["done"] = True
    save()


class _AALogCapture(logging.Handler):
    """Collects pyautoattack's warnings (randomised/dynamic defence checks, ...) for the summary."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.warnings:
            self.warnings.append(msg)


AA_COMPONENTS = {"apgd": "apgd", "apgd_targeted": "apgd_targeted", "fab": "fab", "square": "square"}


def _apply_autoattack_overrides(adversary: Any, overrides: dict[str, dict[str, Any]]) -> None:
    """Set attributes of pyautoattack's sub-attacks, e.g. ``{"apgd": {"n_iter": 20}}`` (cheap smoke runs only)."""
    for component, attrs in overrides.items():
        if component not in AA_COMPONENTS:
            raise ValueError(f"unknown AutoAttack component {component!r}; valid: {', '.join(AA_COMPONENTS)}")
        target = getattr(adversary, AA_COMPONENTS[component])
        for attr, value in attrs.items():
            if not hasattr(target, attr):
                raise ValueError(f"pyautoattack's {component} has no setting {attr!r}")
            setattr(target, attr, value)


def build_autoattack(model: nn.Module, preset: AttackPreset, *, eps: float, norm: str, seed: int,
                     n_classes: int, device: torch.device | str = "cpu") -> tuple[Any, dict[str, Any]]:
    """A ``pyautoattack.AutoAttack`` for ``preset`` with upstream settings; with fewer than 10 classes the
    targeted attacks' target count is lowered to ``n_classes - 1`` (with a warning; upstream would fail)."""
    from pyautoattack import AutoAttack

    if preset.kind != "autoattack":
        raise ValueError(f"preset {preset.name!r} is not an AutoAttack preset")
    kwargs: dict[str, Any] = {"norm": EVAL_NORMS[norm], "eps": eps, "seed": seed, "version": preset.version,
                              "device": device}
    if preset.version == "custom":
        kwargs["attacks"] = list(preset.attacks)
    adversary = AutoAttack(model, **kwargs)
    settings = {"version": preset.version, "attacks": list(adversary.attacks_to_run), "seed": seed,
                "norm": kwargs["norm"], "eps": eps,
                "apgd_targeted_n_target_classes": adversary.apgd_targeted.n_target_classes,
                "fab_n_target_classes": adversary.fab.n_target_classes}
    overrides = preset.extra.get("autoattack_overrides", {})
    if overrides:
        _apply_autoattack_overrides(adversary, overrides)
        settings["overrides"] = overrides
        settings["non_standard"] = f"upstream settings overridden: {overrides}"
    targeted = [a for a in adversary.attacks_to_run if a in TARGETED_AA]
    if targeted and n_classes - 1 < max(adversary.apgd_targeted.n_target_classes, adversary.fab.n_target_classes):
        warnings.warn(
            f"{preset.name}: the model has {n_classes} classes but {', '.join(targeted)} use "
            f"{STANDARD_TARGET_CLASSES} target classes; lowering them to {n_classes - 1}, so the result is not "
            f"the standard AutoAttack number (see {DOCS_POINTER})",
            UserWarning,
            stacklevel=3,
        )
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_classes - 1)
        settings["apgd_targeted_n_target_classes"] = adversary.apgd_targeted.n_target_classes
        settings["fab_n_target_classes"] = adversary.fab.n_target_classes
        settings["non_standard"] = f"target classes lowered to {n_classes - 1} ({n_classes} classes)"
    return adversary, settings


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _load_adv_store(path: Path | None) -> dict[int, torch.Tensor]:
    if path is None or not path.exists():
        return {}
    from safetensors.torch import load_file

    data = load_file(str(path))
    return {int(i): t for i, t in zip(data["index"].tolist(), data["x_adv"])}


def _save_adv_store(path: Path | None, store: dict[int, torch.Tensor]) -> None:
    if path is None or not store:
        return
    from safetensors.torch import save

    keys = sorted(store)
    blob = save({"index": torch.tensor(keys, dtype=torch.int64), "x_adv": torch.stack([store[k] for k in keys]).contiguous()})
    atomic_write(path, lambda fh: fh.write(blob))


def _forward_batched(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                     where: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([check_logits(model(x[i:i + batch_size].to(device)), where).cpu()
                          for i in range(0, x.shape[0], batch_size)])


def _read_upstream_flags(path: Path) -> torch.Tensor | None:
    """Robust flags from a pyautoattack state file (read directly: pyautoattack 0.2.0 writes the attack set as a
    Python repr string, so its own ``from_disk`` resume always refuses the file). None if missing/unreadable."""
    try:
        flags = json.loads(path.read_text()).get("_robust_flags")
    except (OSError, json.JSONDecodeError):
        return None
    return torch.tensor(flags, dtype=torch.bool) if isinstance(flags, list) else None


def _absorb_interrupted_state(path: Path, entry: dict[str, Any], attack: str, save: Any) -> None:
    """Per-batch resume inside one attack: pyautoattack saved its robust flags after every batch of the
    interrupted call (over the points robust at that call's start); mark the points it had broken (their
    examples were never returned: counted, listed as unverified), then start the attack afresh on the rest."""
    if not path.exists():
        return
    flags = _read_upstream_flags(path)
    robust = torch.tensor(entry["robust"], dtype=torch.bool)
    idx = robust.nonzero().flatten()
    if flags is not None and flags.shape == idx.shape:
        broken = idx[~flags].tolist()
        robust[broken] = False
        entry["robust"] = robust.tolist()
        entry["unverified"] = sorted(set(entry["unverified"]) | set(broken))
        entry.setdefault("resumed_within", {})[attack] = len(broken)
    elif flags is not None:
        warnings.warn(f"ignoring {path}: it does not match this evaluation's points", UserWarning, stacklevel=4)
    save()  # record the absorbed flags before the upstream file goes
    path.unlink()


def _autoattack(model: nn.Module, preset: AttackPreset, x: torch.Tensor, y: torch.Tensor,
                clean_logits: torch.Tensor, eps: float, norm: str, batch_size: int, seed: int, n_classes: int,
                entry: dict[str, Any], save: Any, out_dir: Path | None, device: torch.device,
                progress: bool = False, engine: str = "exact") -> None:
    """Run pyautoattack one attack at a time on the points still robust (exactly what its own loop does, and
    every attack reseeds), keeping each broken point's example: every example is checked, and an interrupted
    run resumes after the last finished attack (within an attack, from pyautoattack's per-batch state file).
    ``engine="exact"`` swaps in ``experiments.autoattack_engine``'s loops (same flags, fewer model calls) when
    the model passes its batch-invariance check."""
    adversary, settings = build_autoattack(model, preset, eps=eps, norm=norm, seed=seed, n_classes=n_classes,
                                           device=device)
    info = (accelerate(adversary, model, x[:PROBE_POINTS].to(device)) if engine == "exact"
            else EngineInfo("upstream", "requested (pyautoattack's own loops)"))
    attacks = list(adversary.attacks_to_run)
    slug = _slug(preset.name)
    adv_path = out_dir / f"autoattack-{slug}.adv.safetensors" if out_dir is not None else None
    entry["settings"] = {**settings, "engine": info.to_dict()}
    entry.setdefault("robust", (clean_logits.argmax(dim=1) == y).tolist())
    for key, empty in (("completed", []), ("cumulative_robust_accuracy", {}), ("upstream_warnings", []),
                       ("unverified", []), ("state_files", {}), ("attack_seconds", {})):
        entry.setdefault(key, empty)  # unverified: broken before an interruption inside an attack
    store = _load_adv_store(adv_path)
    capture = _AALogCapture()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(capture)
    rng_state = torch.get_rng_state()  # pyautoattack reseeds the global RNG; put it back afterwards
    try:
        with frozen_parameters(model) if info.engine == "exact" else contextlib.nullcontext():
            for attack in attacks:
                if attack in entry["completed"]:
                    continue
                state_path = None
                if out_dir is not None:
                    state_path = (out_dir / f"autoattack-{slug}-{attack}.state.json").resolve()
                    entry["state_files"][attack] = str(state_path)
                    _absorb_interrupted_state(state_path, entry, attack, save)
                t0 = time.perf_counter()
                _one_aa_attack(adversary, attack, preset, x, y, entry, store, state_path, eps, norm, batch_size,
                               device, progress, info.engine == "exact", n_classes)
                _save_adv_store(adv_path, store)
                entry["completed"].append(attack)
                entry["cumulative_robust_accuracy"][attack] = _fraction(torch.tensor(entry["robust"], dtype=torch.bool))
                spent = time.perf_counter() - t0
                entry["attack_seconds"][attack] = entry["attack_seconds"].get(attack, 0.0) + spent
                entry["seconds"] = entry.get("seconds", 0.0) + spent
                entry["model_rows"] = engine_stats(adversary)
                save()
    finally:
        torch.set_rng_state(rng_state)
        aa_logger.removeHandler(capture)
        entry["upstream_warnings"] = list(dict.fromkeys(entry["upstream_warnings"] + capture.warnings))
    _square_check(entry, attacks)
    # final guard over everything kept (also what was loaded from disk) and per-example margins
    x_final = x.clone()
    for k, t in store.items():
        x_final[k] = t
    check_in_ball(x_final, x, eps, norm)
    margins = logit_margin(_forward_batched(model, x_final, batch_size, device,
                                            f"model output on {preset.name} examples"), y)
    unverified_set = set(entry["unverified"])
    entry["margin"] = [None if i in unverified_set else float(m) for i, m in enumerate(margins.tolist())]
    entry["examples_checked"] = len(store)
    entry["done"] = True
    save()


def _one_aa_attack(adversary: Any, attack: str, preset: AttackPreset, x: torch.Tensor, y: torch.Tensor,
                   entry: dict[str, Any], store: dict[int, torch.Tensor], state_path: Path | None, eps: float,
                   norm: str, batch_size: int, device: torch.device, progress: bool, exact: bool,
                   n_classes: int) -> None:
    """One pyautoattack attack on the points still robust, with a progress bar; checks and keeps its examples."""
    from tqdm.auto import tqdm

    robust = torch.tensor(entry["robust"], dtype=torch.bool)
    idx = robust.nonzero().flatten()
    if idx.numel() == 0:
        return
    adversary.attacks_to_run = [attack]
    x_sub, y_sub = x[idx], y[idx]
    work = attack_work(adversary, attack, n_classes, tuple(x.shape[1:]), exact)
    total = math.ceil(idx.numel() / batch_size) * work.iterations
    with tqdm(total=total, desc=f"{preset.name} {attack}", unit="it", disable=not progress, leave=False) as bar:
        bar.set_postfix_str(f"{idx.numel()} points still robust")  # shown from the start

        def tick(points_left: int) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{points_left} points in this batch still robust", refresh=False)

        set_iteration_hook(adversary, tick if progress else None)
        try:
            x_adv, _ = adversary.run_standard_evaluation(x_sub, y_sub, batch_size=batch_size, state_path=state_path)
        finally:
            set_iteration_hook(adversary, None)
        bar.update(total - bar.n)
    x_adv = x_adv.detach().cpu()
    check_in_ball(x_adv, x_sub, eps, norm)
    fooled = _forward_batched(adversary.model, x_adv, batch_size, device,
                              f"model output on {preset.name}/{attack} examples").argmax(dim=1) != y_sub
    upstream_robust = _read_upstream_flags(state_path) if state_path is not None else None
    if upstream_robust is None or upstream_robust.shape != fooled.shape:
        upstream_robust = ~(x_adv != x_sub).flatten(1).any(dim=1)  # upstream replaces broken points only
    disagree = upstream_robust == fooled
    if disagree.any():
        if preset.version != "rand":
            raise BallViolationError(
                f"{preset.name}/{attack}: pyautoattack's robust flags disagree with its returned examples "
                f"at points {idx[disagree].tolist()[:10]} (is the model deterministic in eval mode?)"
            )
        # a randomised model may classify the same example differently on a second draw
        entry["rand_disagreements"] = entry.get("rand_disagreements", 0) + int(disagree.sum())
    broken = ~upstream_robust
    for pos in broken.nonzero().flatten().tolist():
        store[int(idx[pos])] = x_adv[pos].clone()
    robust[idx[broken]] = False
    entry["robust"] = robust.tolist()


def _square_check(entry: dict[str, Any], attacks: list[str], alpha: float = 0.002) -> None:
    """pyautoattack's sanity check: Square (black-box) should not break points the white-box attacks missed."""
    cum = entry["cumulative_robust_accuracy"]
    if "square" not in cum or attacks.index("square") == 0:
        return
    before = cum[attacks[attacks.index("square") - 1]]
    if cum["square"] < before - alpha:
        msg = (f"Square Attack lowered the robust accuracy by {before - cum['square']:.2%} after the gradient-based "
               "attacks: the evaluation may be unreliable (gradient masking?); see docs/evaluation.md")
        warnings.warn(msg, UserWarning, stacklevel=4)
        entry["upstream_warnings"].append(msg)


# ----------------------------------------------------------------------------------------------------------
# main entry


@locks_folder("out_dir", "evaluation")  # one writer per evaluation folder
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str | AttackPreset] | str = ("pgd20",),
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = None,
    points: str = "first",
    seed: int = 0,
    batch_size: int = 250,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    lipschitz_metric: bool = True,
    aa_engine: str = "exact",
    on_estimate: Callable[[DurationEstimate], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``n`` points of ``(x, y)`` under the named ``attacks`` at radius ``eps`` (required).

    ``points``: "first" (the first n, RobustBench) or "random" (n drawn with ``seed``). The model is put in
    eval mode for the whole evaluation (its flags are restored afterwards). An example counts as robust under
    an attack iff it is classified correctly at x and at the attack's example. Returns the summary dict (also
    written to ``out_dir/eval_summary.json`` with ``per_example.jsonl`` when ``out_dir`` is given).
    ``lipschitz_metric=True`` adds ``lipschitz.lower.local_lipschitz_metric`` (Yang et al. 2020: its own PGD
    maximising the ratio, with its stable accuracy) on the points (linf, eps > 0).
    AutoAttack presets may carry ``extra={"autoattack_overrides": {"apgd": {"n_iter": 20}, ...}}`` for cheap
    smoke runs; the summary then marks the number "non_standard". ``aa_engine``: "exact" (default: pyautoattack
    with ``experiments.autoattack_engine``'s loops, same robust flags, fewer model calls, when the model passes
    its batch-invariance check) or "upstream" (pyautoattack's own loops). Before the attacks start, a duration
    estimate (``experiments.eval_estimate``) goes to ``on_estimate``, or to stderr when ``progress``; it is
    also stored in the summary beside the measured seconds.
    """
    presets = _check_inputs(model, x, y, attacks, eps, norm, batch_size, aa_engine)
    device = _evaluation_device(model, device)
    idx = select_points(x.shape[0], n, points, seed)
    xs, ys = x[idx].detach().cpu(), y[idx].detach().cpu()
    if torch.isnan(xs).any() or xs.min() < 0 or xs.max() > 1:
        raise ValueError("inputs must lie in [0, 1] without NaN; models take unnormalised images "
                         "(put normalisation inside the model)")
    fingerprint = {
        "eps": float(eps), "norm": norm, "n": xs.shape[0], "points": points, "seed": seed, "batch_size": batch_size,
        "attacks": [p.to_dict() for p in presets], "indices": _tensor_digest(idx), "data": _tensor_digest(xs),
        "labels": _tensor_digest(ys), "model": _model_digest(model),
    }
    out_path, state_path, state = _open_state(out_dir, fingerprint, resume)

    def save() -> None:
        _save_state(state_path, state)

    t_start = time.perf_counter()
    with model_mode(model, "eval"):
        clean_logits, n_classes = _clean_pass(model, xs, ys, batch_size, device)
        clean_correct = clean_logits.argmax(dim=1) == ys
        state["clean"] = {"accuracy": _fraction(clean_correct)}
        plan = _plan(model, presets, state, eps, norm, seed, n_classes, batch_size, device, tuple(xs.shape[1:]),
                     lipschitz_metric, aa_engine)
        _announce_estimate(model, xs, clean_correct, plan, state, batch_size, device, on_estimate, progress)
        save()
        for preset in presets:
            entry = state["attacks"].setdefault(preset.name, {})
            if entry.get("done"):
                continue
            if preset.kind == "autoattack":
                _autoattack(model, preset, xs, ys, clean_logits, eps, norm, batch_size, seed, n_classes, entry,
                            save, out_path, device, progress, aa_engine)
            else:
                _gradient_attack(model, preset, xs, ys, clean_logits, eps, norm, batch_size, seed, entry, save,
                                 progress, device)
        lip = (_lipschitz_metric(model, xs, ys, eps, norm, batch_size, seed, device) if lipschitz_metric
               else {"available": False, "reason": "not requested (lipschitz_metric=False)"})

    summary = _summary(presets, state, clean_correct, clean_logits, ys, idx, eps, norm, points, seed, batch_size,
                       n_classes, lip, time.perf_counter() - t_start)
    if out_path is not None:
        _write_outputs(out_path, summary, presets, state, idx, ys, clean_correct, clean_logits)
    return summary


def _open_state(out_dir: str | os.PathLike | None, fingerprint: dict[str, Any],
                resume: bool) -> tuple[Path | None, Path | None, dict[str, Any]]:
    """(out folder, state file, state): the saved state of an earlier run of the same evaluation when resuming,
    else a fresh one; without ``out_dir`` nothing is saved."""
    if out_dir is None:
        return None, None, {"fingerprint": fingerprint, "attacks": {}}
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    return out_path, out_path / STATE_NAME, _load_state(out_path / STATE_NAME, fingerprint, resume)


def _check_inputs(model: nn.Module, x: Any, y: Any, attacks: Any, eps: Any, norm: str, batch_size: Any,
                  aa_engine: str) -> list[AttackPreset]:
    """The arguments of :func:`evaluate`, checked before any work; returns the resolved attack presets."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (e.g. 8/255 for linf on CIFAR), got {eps!r}")
    if norm not in EVAL_NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(EVAL_NORMS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if aa_engine not in AA_ENGINES:
        raise ValueError(f"unknown aa_engine {aa_engine!r}; valid: {', '.join(AA_ENGINES)}")
    presets = _resolve_attacks(attacks)
    for p in presets:
        if p.kind != "autoattack" and p.norm != norm:
            raise ValueError(f"attack {p.name!r} is an {p.norm} attack but the evaluation norm is {norm!r}; "
                             f"pass norm={p.norm!r} or choose {norm} attacks")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors")
    if y.dtype != torch.int64 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise TypeError(f"y must be int64 labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be float images in [0, 1], got dtype {x.dtype}")
    param_dtypes = {p.dtype for p in model.parameters()}
    if param_dtypes and x.dtype not in param_dtypes:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {sorted(map(str, param_dtypes))}; "
                        "convert one of them explicitly")
    return presets


def _evaluation_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, else the device of the model's parameters (cpu for a model without any)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return torch.device(device)


def _clean_pass(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch_size: int,
                device: torch.device) -> tuple[torch.Tensor, int]:
    """Clean logits (on the CPU) of every point, and the number of classes (labels checked against it)."""
    with torch.no_grad():
        clean_logits = torch.cat([
            check_logits(model(xs[i:i + batch_size].to(device)), "model output on clean inputs").cpu()
            for i in range(0, xs.shape[0], batch_size)
        ])
    n_classes = clean_logits.shape[1]
    if int(ys.max()) >= n_classes or int(ys.min()) < 0:
        raise ValueError(f"labels must be in [0, {n_classes - 1}] for a model with {n_classes} outputs")
    return clean_logits, n_classes


def _announce_estimate(model: nn.Module, xs: torch.Tensor, clean_correct: torch.Tensor, plan: list[PlannedAttack],
                       state: dict[str, Any], batch_size: int, device: torch.device,
                       on_estimate: Callable[[DurationEstimate], None] | None, progress: bool) -> None:
    """The duration estimate of the work still planned: stored in ``state``, given to ``on_estimate`` (else
    written to stderr when ``progress``)."""
    if not plan:
        return
    estimate = estimate_duration(measure_unit_costs(model, xs, batch_size, device), plan, xs.shape[0],
                                 _fraction(clean_correct), device.type)
    state["estimate"] = estimate.to_dict()
    if on_estimate is not None:
        on_estimate(estimate)
    elif progress:
        from tqdm.auto import tqdm

        tqdm.write(estimate.describe(), file=sys.stderr)


def _plan(model: nn.Module, presets: list[AttackPreset], state: dict[str, Any], eps: float, norm: str, seed: int,
          n_classes: int, batch_size: int, device: torch.device, input_shape: tuple[int, ...],
          lipschitz_metric: bool, aa_engine: str) -> list[PlannedAttack]:
    """The work still to do, attack by attack (AutoAttack split into its attacks, with its settings)."""
    plan: list[PlannedAttack] = []
    for p in presets:
        entry = state["attacks"].get(p.name, {})
        if entry.get("done"):
            continue
        if p.kind != "autoattack":
            steps = max(p.steps, 1) * p.restarts
            plan.append(PlannedAttack(p.name, Work(1, steps, steps), "all", batch_size))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # build_autoattack warns again when the attack starts
            adversary, _ = build_autoattack(model, p, eps=eps, norm=norm, seed=seed, n_classes=n_classes,
                                            device=device)
        exact = aa_engine == "exact"
        for a in adversary.attacks_to_run:
            if a not in entry.get("completed", []):
                plan.append(PlannedAttack(f"{p.name} {a}", attack_work(adversary, a, n_classes, input_shape, exact),
                                          "correct", batch_size))
    if lipschitz_metric and norm == "linf" and eps > 0:
        plan.append(PlannedAttack("local Lipschitz metric", Work(2, 10, 10), "all", batch_size))
    return plan


def _lipschitz_metric(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, eps: float, norm: str,
                      batch_size: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Yang et al. (2020) local Lipschitz metric from ``lipschitz.lower`` (linf ball, eps > 0)."""
    if norm != "linf" or eps <= 0:
        return {"available": False, "reason": "defined for a linf ball with eps > 0"}
    try:
        from lipschitz.lower import local_lipschitz_metric
    except ImportError as err:
        return {"available": False, "reason": f"lipschitz.lower.local_lipschitz_metric unavailable ({err})"}
    result = local_lipschitz_metric(model, xs.to(device), eps, y=ys.to(device), batch_size=batch_size, seed=seed)
    out = result.to_dict()
    out.pop("per_sample", None)
    return {"available": True, **out}


def _fraction(flags: torch.Tensor) -> float:
    """Exact fraction of True flags (count / n in double precision, not a float32 mean)."""
    return int(flags.sum()) / int(flags.numel())


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _summary(presets: list[AttackPreset], state: dict[str, Any], clean_correct: torch.Tensor,
             clean_logits: torch.Tensor, ys: torch.Tensor, idx: torch.Tensor, eps: float, norm: str, points: str,
             seed: int, batch_size: int, n_classes: int, lip: dict[str, Any] | None,
             seconds: float) -> dict[str, Any]:
    n = int(ys.shape[0])
    worst = clean_correct.clone()
    per_attack: dict[str, Any] = {}
    for p in presets:
        entry = state["attacks"][p.name]
        robust = torch.tensor(entry["robust"], dtype=torch.bool)
        worst &= robust
        info: dict[str, Any] = {"robust_accuracy": _fraction(robust), "kind": p.kind,
                                "settings": p.to_dict(), "seconds": entry.get("seconds")}
        if p.kind == "autoattack":
            info.update({k: entry.get(k) for k in ("state_files", "cumulative_robust_accuracy",
                                                    "upstream_warnings", "examples_checked")})
            info["unverified_after_interruption"] = len(entry.get("unverified", []))
            if "rand_disagreements" in entry:
                info["rand_disagreements"] = entry["rand_disagreements"]
            info["settings"] = {**p.to_dict(), **entry.get("settings", {})}
        else:
            info["step_size"] = p.step_fraction * eps
            info["stable_accuracy"] = _mean([float(s) for s in entry["stable"]])
            info["local_lipschitz_at_attack"] = {
                "value": _mean(entry["lipschitz_ratio"]), "guarantee": "estimate",
                "method": "mean over points of ||f(x)-f(x_adv)||_1 / ||x-x_adv||_inf at this attack's examples "
                          "(Huang et al. 2021 evaluation code)",
                "points_used": sum(v is not None for v in entry["lipschitz_ratio"]),
            }
            if lip is not None and lip.get("available"):
                info["local_lipschitz_yang2020"] = lip["value"]["value"]
                info["stable_accuracy_yang2020"] = lip["stable_accuracy"]
        per_attack[p.name] = info
    accs = {name: info["robust_accuracy"] for name, info in per_attack.items()}
    summary = {
        "clean_accuracy": _fraction(clean_correct),
        "robust_accuracy": accs,
        "worst_case": {
            "robust_accuracy": _fraction(worst),
            "definition": "per example: correct on x and under every attack run",
            "min_over_attacks": min(accs.values()),
            "attacks": list(accs),
        },
        "attacks": per_attack,
        "eps": float(eps),
        "norm": norm,
        "n": n,
        "n_classes": n_classes,
        "points": {"selection": points, "seed": seed if points == "random" else None,
                   "description": (f"first {n} points in order" if points == "first"
                                   else f"{n} points drawn without replacement with seed {seed}"),
                   "indices_sha256": _tensor_digest(idx)},
        "seed": seed,
        "batch_size": batch_size,
        "local_lipschitz_metric": lip,
        "versions": _versions(),
        "seconds": seconds,
    }
    if "estimate" in state:
        summary["estimate"] = state["estimate"]
    for p in presets:  # AutoAttack: seconds and model rows per attack beside the engine's settings
        if p.kind == "autoattack":
            entry = state["attacks"][p.name]
            summary["attacks"][p.name].update(attack_seconds=entry.get("attack_seconds"),
                                              model_rows=entry.get("model_rows"))
    return summary


def _write_outputs(out_path: Path, summary: dict[str, Any], presets: list[AttackPreset], state: dict[str, Any],
                   idx: torch.Tensor, ys: torch.Tensor, clean_correct: torch.Tensor,
                   clean_logits: torch.Tensor) -> None:
    margins = logit_margin(clean_logits, ys).tolist()
    lines = []
    for i in range(ys.shape[0]):
        row: dict[str, Any] = {"index": int(idx[i]), "label": int(ys[i]), "clean_correct": bool(clean_correct[i]),
                               "clean_margin": margins[i], "robust": {}, "margin": {}}
        worst = bool(clean_correct[i])
        for p in presets:
            entry = state["attacks"][p.name]
            row["robust"][p.name] = bool(entry["robust"][i])
            row["margin"][p.name] = entry["margin"][i]
            worst = worst and bool(entry["robust"][i])
        row["robust_worst_case"] = worst
        lines.append(json.dumps(row))
    write_text(out_path / PER_EXAMPLE_NAME, "\n".join(lines) + "\n")
    write_json(out_path / SUMMARY_NAME, summary)


__all__ = [
    "evaluate", "select_points", "check_logits", "build_autoattack", "LogitsError", "POINT_SELECTIONS",
    "AUTOATTACK_ATTACKS",
]
