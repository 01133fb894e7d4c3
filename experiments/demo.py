"""The one-command demo (orchestration; the measurements live in ``experiments.measure``).

``archlip demo --out runs/demo`` trains, with PGD-AT on the bundled digits data, a small WideResNet and
its twin with the last stage reduced (same recipe, same seed), then for each model measures clean and PGD
accuracy, per-layer certified sandwiches, per-stage and network Lipschitz bounds, data lower bounds and
the theory's prediction, and writes ``report.md`` with PNG plots and ``results.json``.

Each model is measured by ``experiments.measure.measure_model`` (the same pipeline a sweep runs on every run).
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from experiments.measure import _say, initial_model, load_test_split, load_trained_model, measure_model, train_facts

#: The demo's two recipes (the tiny digits recipes in experiments/configs): the small WRN and its reduced twin.
DEMO_RECIPES: tuple[str, ...] = ("digits-pgdat-tiny", "digits-pgdat-tiny-r")

#: Settings of the full demo and of ``--quick`` (the test suite's reduced setting).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "eval_n": None, "attacks": ["pgd20"], "rtol": 0.02, "lower_points": 256,
             "lower_iters": 50, "attack_ratio_steps": 20, "search_steps": 60, "node_lower_points": 32,
             "node_lower": {"steps": 10}, "spectra": True},
    "quick": {"overrides": ["run.epochs=2", "data.train_limit=512", "attack.steps=3", "selection.pgd_steps=3",
                            "run.progress=false"], "eval_n": 64,
              "attacks": ["pgd10"], "rtol": 0.1, "lower_points": 16, "lower_iters": 10, "attack_ratio_steps": 3,
              "search_steps": 3, "node_lower_points": 4,
              "node_lower": {"steps": 1, "n_random": 2, "attack_points": 1, "attack_steps": 2, "per_source": 1}, "spectra": False},
}


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


def _machine() -> str:
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0, device: str = "cpu",
             verbose: bool = True, recipes: Sequence[str] = DEMO_RECIPES, threads: int | None = 1) -> dict[str, Any]:
    """Train the two demo models, measure them, write results.json, report.md and plots; returns paths.

    ``threads``: torch CPU threads during the demo (restored afterwards; None leaves torch's setting).
    """
    from experiments.io import RunFolderLock
    from experiments.runtime import torch_threads

    with torch_threads(threads), RunFolderLock(out_dir, "demo"):  # one demo per folder at a time
        return _run_demo(Path(out_dir), quick=quick, seed=seed, device=device, verbose=verbose, recipes=recipes,
                         threads=threads)


def _run_demo(out_dir: Path, *, quick: bool, seed: int, device: str, verbose: bool, recipes: Sequence[str],
              threads: int | None) -> dict[str, Any]:
    from experiments.config import load_config, save_config
    from experiments.io import RUN_FILES, remove_stale_temps, write_json
    from experiments.report import write_report
    from experiments.training import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    start = time.time()
    models = []
    for index, recipe in enumerate(recipes, start=1):
        overrides = [*settings["overrides"], f"run.seed={seed}", f"run.device={torch.device(device).type}"]
        config = load_config(recipe, overrides=overrides)
        model_dir = out_dir / config.name
        remove_stale_temps(model_dir)  # the demo's lock covers the model folder's own files
        save_config(config, model_dir / "resolved_config.yaml")
        _say(verbose, f"[{index}/{len(recipes)}] training {config.name} ({config.model.name}, {config.method.name}, "
                      f"{config.run.epochs} epoch{'s' if config.run.epochs != 1 else ''}) -> {model_dir / 'train'}")
        train_dir = model_dir / "train"
        resume = train_dir.is_dir() and any(train_dir.iterdir())
        train_start = time.time()
        train_summary = train(config, train_dir, resume=resume)
        train_seconds = time.time() - train_start
        _say(verbose, f"[{index}/{len(recipes)}] measuring {config.name}")
        model = load_trained_model(train_dir, train_summary, device)
        x_test, y_test = load_test_split(config)
        steps = ("eval", "spectral", "bound", "lower", "theory", "theory_trained") + (("spectra",) if settings["spectra"] else ())
        initial = initial_model(config, int(x_test.shape[1]), 10, device) if settings["spectra"] else None
        record = measure_model(
            model, name=config.model.name, input_shape=tuple(x_test.shape[1:]), x_test=x_test, y_test=y_test,
            eps=float(config.attack.eps), attacks=settings["attacks"], eval_n=settings["eval_n"], rtol=settings["rtol"],
            lower_points=settings["lower_points"], lower_iters=settings["lower_iters"],
            attack_ratio_steps=settings["attack_ratio_steps"], search_steps=settings["search_steps"],
            node_lower_points=settings["node_lower_points"], node_lower=settings["node_lower"],
            seed=seed, out_dir=model_dir, verbose=verbose, steps=steps, initial=initial,
        )
        record.update({"recipe": recipe, "train_seconds": round(train_seconds, 2), "train": train_facts(train_summary)})
        write_json(model_dir / RUN_FILES["record"][0], record.to_dict())
        models.append(record)

    from experiments.report import correlations

    results = {
        "kind": "demo",
        "name": "demo" + (" (quick)" if quick else ""),
        "description": (
            "A small pre-activation WideResNet and its twin with the last stage reduced, trained with the same "
            "PGD-AT recipe and seed on scikit-learn's digits (1x8x8). The paper's finding (Huang et al. 2021) is "
            "that reducing the last stage's capacity lowers the Lipschitz constant and can improve robustness; "
            "this report shows both measured and certified values next to the theory's prediction."
        ),
        "models": [m.to_dict() for m in models],
        "settings": {"mode": "quick" if quick else "full", "recipes": list(recipes), **settings},
        "correlations": correlations(models) if len(models) >= 3 else None,
        "provenance": {
            "command": "archlip demo" + (" --quick" if quick else "") + f" --out {out_dir} --seed {seed}",
            "recipes": ", ".join(recipes), "seed": seed, "device": device, "torch": torch.__version__,
            "python": sys.version.split()[0], "machine": _machine(), "torch_threads": torch.get_num_threads(),
            "seconds": round(time.time() - start, 1),
        },
    }
    results_path = write_json(out_dir / "results.json", results)
    report = write_report(out_dir, regenerate=f"archlip report {out_dir}")
    _say(verbose, f"done in {time.time() - start:.0f} s; report: {report}")
    return {"report": report, "results": results_path, "models": models}
