"""The per-model measurement pipeline: one trained model -> one flat *model record*.

``measure_model`` runs the steps (accuracy, per-layer certified sandwiches, network/stage/block bounds, data
lower bounds, the theory's prediction, the theory's rule on the trained weights, full spectra) and returns the
record that ``experiments/report.py`` renders; ``measure_trained_run`` does it for a finished training run (the
demo's models and every sweep run). The headline helpers (``bound_summary``, ``data_lower_bounds``,
``theory_prediction``) are also what ``archlip bound`` and ``archlip theory predict`` print.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from experiments.records import GUARANTEES, ModelRecord


# ----------------------------------------------------------------------------------------------
# one model -> one record
# ----------------------------------------------------------------------------------------------


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


def architecture(model: nn.Module) -> dict[str, Any]:
    """depths/widths/strides/params of a model (from ``arch_config()`` when the model has one)."""
    info: dict[str, Any] = {"params": int(sum(p.numel() for p in model.parameters()))}
    if hasattr(model, "arch_config"):
        config = model.arch_config()
        for key in ("family", "depths", "widths", "strides", "activation"):
            if key in config:
                info[key] = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
    info["model"] = getattr(model, "model_name", type(model).__name__)
    return info


def spectral_analyze():
    """``spectral.analyze`` (the function), also when the submodule of the same name shadows it on the package."""
    from spectral import analyze

    return getattr(analyze, "analyze", analyze)


def record_sandwich_kwargs() -> dict[str, Any]:
    """The per-layer sandwich options of a model record: every ``SandwichOptions`` field at its default (what
    ``spectral.analyze`` uses), given to ``network_bound`` too, so that its raw layers are the analysis's rows
    (each layer sandwiched once; ``network_bound`` on its own caps dense solves lower)."""
    from dataclasses import fields

    from spectral.sandwich import SandwichOptions

    defaults = SandwichOptions()
    return {f.name: getattr(defaults, f.name) for f in fields(defaults)}


def layer_analysis(model: nn.Module, input_shape: Sequence[int], rtol: float = 0.02, progress: bool = False):
    """``spectral.analyze`` of ``model`` at its real input size (a ``LayerTable`` of ``LayerRow``s)."""
    device = next(model.parameters()).device
    example = torch.zeros((1, *input_shape), device=device)
    return spectral_analyze()(model, example, rtol=rtol, progress=progress)


def layer_table(model: nn.Module, input_shape: Sequence[int], rtol: float = 0.02, progress: bool = False) -> list[dict]:
    """Per-layer certified sandwich rows from ``spectral.analyze`` at the model's real input size (JSON rows)."""
    return [row.to_dict() for row in layer_analysis(model, input_shape, rtol=rtol, progress=progress).rows]


def bound_summary(model: nn.Module, input_shape: Sequence[int], rtol: float = 0.02, *, layer_results: Any = None,
                  sandwich_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Certified l2 bounds of the network, its stages and blocks (``lipschitz.bounds.network_bound``).

    Returns ``certified_lipschitz`` (the tightest certified network bound: every method evaluated is a certified
    upper bound), ``certified_lipschitz_product`` (plain layer product), ``certified_methods`` {method: value},
    ``stage_bounds`` and ``block_bounds`` {name: tightest value} and the full ``bound`` dict. ``layer_results`` (a
    ``spectral.analyze`` table of the model) and ``sandwich_kwargs`` go to ``network_bound``.
    """
    from lipschitz.bounds import network_bound

    bound = network_bound(model, tuple(input_shape), rtol=rtol, layer_results=layer_results,
                          sandwich_kwargs=sandwich_kwargs)
    methods = bound.certified_methods()
    return {"certified_lipschitz": bound.tightest, "certified_lipschitz_product": methods.get("product"),
            "certified_methods": methods, "stage_bounds": bound.stage_bounds(), "block_bounds": bound.block_bounds(),
            "bound": bound.to_dict()}


def data_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float, seed: int = 0,
                      n_iter: int = 50, attack_steps: int = 20, search_steps: int = 0) -> dict[str, Any]:
    """Lower bounds of the l2 Lipschitz constant from data, plus the paper code's local Lipschitz metric.

    ``empirical_lipschitz``: max per-sample Jacobian spectral norm (LOWER; exact Jacobians for a classifier's
    logits); ``attack_lipschitz``: max observed ||f(x1)-f(x2)||_2/||x1-x2||_2 in l2 balls of radius ``eps``
    (LOWER); ``local_lipschitz`` and ``stable_acc``: Yang et al. 2020 (ESTIMATE, linf ball of radius ``eps``).
    With ``search_steps > 0`` also ``searched_lipschitz``: ``lipschitz.search.lower_bound_search`` over the
    input box [0, 1] (LOWER), and how it was found.
    """
    from lipschitz.lower import attack_ratio_lower, jacobian_norm_lower, local_lipschitz_metric

    jac = jacobian_norm_lower(model, x, n_iter=n_iter, seed=seed)
    ratio = attack_ratio_lower(model, x, eps=eps, norm="l2", steps=attack_steps, seed=seed)
    local = local_lipschitz_metric(model, x, eps, y=y, seed=seed)
    out = {
        "empirical_lipschitz": jac.value,
        "attack_lipschitz": ratio.value,
        "local_lipschitz": local.value.value,
        "stable_acc": local.stable_accuracy,
        "lower_points": int(x.shape[0]),
        "lower_methods": {"empirical_lipschitz": jac.method, "attack_lipschitz": ratio.method,
                          "local_lipschitz": local.value.method},
    }
    if search_steps > 0:
        from lipschitz.search import lower_bound_search

        search = lower_bound_search(model, x, seed=seed, jacobian={"steps": search_steps})
        out["searched_lipschitz"] = search.value
        out["searched_found_by"] = f"{search.best.value.method}: {search.best.found_by} (from {search.best.start})"
        out["lower_methods"]["searched_lipschitz"] = search.best.value.method
    return out


def node_lower_summary(model: nn.Module, x: torch.Tensor, names: Sequence[str], *, seed: int = 0,
                       **search: Any) -> dict[str, Any]:
    """``node_lower``: {node name: LOWER bound of that node's own Lipschitz constant} from
    ``lipschitz.search.node_lower_bounds`` (Jacobian ascent from the inputs that reach the node on ``x``;
    ``search``: its options, e.g. ``steps``)."""
    from lipschitz.search import node_lower_bounds

    found = node_lower_bounds(model, x, names=list(names), seed=seed, **search)
    return {"node_lower": {name: res.value.value for name, res in found.items()}}


#: Weight model of the headline theory prediction: iid weights of a fixed standard deviation (the regime in
#: which shrinking the last stage lowers the bound; the default objective of ``archlip theory optimal-config``).
THEORY_WEIGHT_MODEL = {"weight_model": "fixed", "std": 0.05}


def theory_prediction(depths: Sequence[int], widths: Sequence[int], *, num_classes: int = 10,
                      in_channels: int = 3, input_size: int = 32) -> dict[str, Any]:
    """The theory's parameter count and predicted network Lipschitz bound for a per-stage configuration.

    ``theory_prediction``: ``lipschitz.theory.lipschitz_bound`` under fixed-variance iid weights (std 0.05),
    an a-priori ESTIMATE for random weights that ignores training; ``theory_prediction_kaiming``: the same at the
    model's Kaiming (fan-out) initialisation, where the per-layer constants do not depend on width. Neither sees
    the trained weights: ``trained_theory`` (``theory_measured_norms``) evaluates the same rule on them.
    """
    from lipschitz.theory import lipschitz_bound, param_count

    common = {"input_size": int(input_size), "num_classes": int(num_classes), "in_channels": int(in_channels)}
    fixed = lipschitz_bound(list(depths), list(widths), **THEORY_WEIGHT_MODEL, **common)
    kaiming = lipschitz_bound(list(depths), list(widths), weight_model="kaiming_normal_fan_out", **common)
    return {
        "theory_prediction": fixed.value,
        "theory_prediction_kaiming": kaiming.value,
        "theory_params": int(param_count(list(depths), list(widths), num_classes=int(num_classes), in_channels=int(in_channels))),
        "theory_stage_factors": fixed.details.get("stages"),
        "theory_method": f"{fixed.method} std={THEORY_WEIGHT_MODEL['std']} ({fixed.guarantee.value})",
        "theory_prediction_basis": THEORY_BASIS["theory_prediction"],
    }


#: What each theory number is computed from (shown beside it in reports).
THEORY_BASIS: dict[str, str] = {
    "theory_prediction": f"a priori: iid random weights, std {THEORY_WEIGHT_MODEL['std']} (no training)",
    "theory_prediction_kaiming": "a priori: the model's Kaiming initialisation (no training)",
    "theory_measured_norms": "the same composition rule with the trained layers' certified norms and BN gains",
}


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attacks: Sequence[str], eps: float,
                   n: int | None, seed: int, out_dir: Path | None, progress: bool,
                   lipschitz_metric: bool = True) -> dict[str, Any]:
    """Clean and adversarial accuracy through ``experiments.evaluate`` (first ``n`` test points);
    ``lipschitz_metric``: also the evaluation's local Lipschitz metric (off when the record measures it)."""
    from experiments.evaluate import evaluate

    summary = evaluate(model, x, y, list(attacks), eps=eps, n=n, seed=seed, out_dir=out_dir, progress=progress,
                       lipschitz_metric=lipschitz_metric)
    robust = summary["robust_accuracy"]
    main_attack = list(attacks)[0]
    return {
        "clean_acc": summary["clean_accuracy"],
        "robust_acc": summary["worst_case"]["robust_accuracy"] if len(robust) > 1 else robust[main_attack],
        "robust_attack": "+".join(attacks),
        "robust_acc_per_attack": robust,
        "eps": summary["eps"],
        "eval_points": summary.get("points", {}).get("description"),
    }


def _step(record: ModelRecord, name: str, fn: Callable[[], dict[str, Any]], verbose: bool) -> None:
    """Run one measurement step; a component that is not installed is recorded (and reported), never hidden."""
    start = time.time()
    try:
        record.update(fn())
    except ImportError as exc:
        if record.unavailable is None:
            record.update({"unavailable": {}})
        record.unavailable[name] = str(exc)
        _say(verbose, f"    {name}: unavailable ({exc})")
        return
    if record.seconds is None:
        record.update({"seconds": {}})
    record.seconds[name] = round(time.time() - start, 3)


def measure_model(model: nn.Module, *, name: str, input_shape: Sequence[int], x_test: torch.Tensor,
                  y_test: torch.Tensor, eps: float, attacks: Sequence[str] = ("pgd20",), eval_n: int | None = None,
                  rtol: float = 0.02, lower_points: int = 256, lower_iters: int = 50, attack_ratio_steps: int = 20,
                  search_steps: int = 0, node_lower_points: int = 0, node_lower: Mapping[str, Any] | None = None,
                  num_classes: int = 10, seed: int = 0, out_dir: Path | None = None, verbose: bool = True,
                  steps: Sequence[str] = ("eval", "spectral", "bound", "lower", "theory", "theory_trained"),
                  initial: nn.Module | None = None) -> ModelRecord:
    """Everything archlip measures about one trained model, as a ``ModelRecord`` (see experiments/records.py).

    Steps: eval, spectral, bound, lower, theory (a priori), theory_trained (the theory's rule with the trained
    layer norms), spectra (full spectra vs the random-matrix law, for the trained and the ``initial`` weights).
    """
    model.eval()
    record = ModelRecord().update({"name": name, **architecture(model), "input_shape": list(input_shape)})
    device = next(model.parameters()).device
    if "eval" in steps:
        _say(verbose, f"  [{name}] clean and adversarial accuracy ({', '.join(attacks)}, eps={eps:.4g})")
        # the local Lipschitz metric is measured once: by the lower step when it runs, else by the evaluation
        _step(record, "eval", lambda: evaluate_model(model, x_test, y_test, attacks=attacks, eps=eps, n=eval_n, seed=seed,
                                                     out_dir=None if out_dir is None else out_dir / "eval", progress=verbose,
                                                     lipschitz_metric="lower" not in steps), verbose)
    analysis: list = []  # the spectral step's LayerTable: the bound step reuses its raw-layer sandwiches
    if "spectral" in steps:
        _say(verbose, f"  [{name}] per-layer certified spectral norms (rtol {rtol})")

        def spectral_step() -> dict[str, Any]:
            analysis.append(layer_analysis(model, input_shape, rtol=rtol, progress=verbose))
            return {"layers": [row.to_dict() for row in analysis[0].rows]}

        _step(record, "spectral", spectral_step, verbose)
    if "bound" in steps:
        _say(verbose, f"  [{name}] certified network, stage and block bounds")
        _step(record, "bound", lambda: bound_summary(model, input_shape, rtol=rtol,
                                                     sandwich_kwargs=record_sandwich_kwargs(),
                                                     layer_results=analysis[0] if analysis else None), verbose)
    if "lower" in steps:
        _say(verbose, f"  [{name}] data lower bounds on {min(lower_points, x_test.shape[0])} test points")
        xs, ys = x_test[:lower_points].to(device), y_test[:lower_points].to(device)
        _step(record, "lower", lambda: data_lower_bounds(model, xs, ys, eps=eps, seed=seed, n_iter=lower_iters,
                                                         attack_steps=attack_ratio_steps, search_steps=search_steps),
              verbose)
        names = [*(record.stage_bounds or {}), *(record.block_bounds or {})]
        if node_lower_points > 0 and names:
            _say(verbose, f"  [{name}] per-block lower bounds (own Jacobians, searched) on {node_lower_points} points")
            _step(record, "node_lower", lambda: node_lower_summary(model, x_test[:node_lower_points].to(device), names,
                                                                   seed=seed, **(node_lower or {})), verbose)
    if "theory" in steps and record.depths and record.widths:
        _say(verbose, f"  [{name}] the theory's prediction")
        _step(record, "theory", lambda: theory_prediction(record.depths, record.widths, num_classes=num_classes,
                                                          in_channels=int(input_shape[0]), input_size=int(input_shape[-1])), verbose)
    if "theory_trained" in steps:
        from experiments.theory_validation import trained_theory

        _say(verbose, f"  [{name}] the theory's composition rule with the trained layer norms")
        _step(record, "theory_trained", lambda: trained_theory(model, tuple(input_shape), record.layers,
                                                               min(rtol, 0.01)), verbose)
    if "spectra" in steps:
        from experiments.theory_validation import spectra_record

        _say(verbose, f"  [{name}] full spectra vs the random-matrix law (trained{' and initial' if initial is not None else ''} weights)")
        _step(record, "spectra", lambda: spectra_record(model, tuple(input_shape), initial, seed=seed), verbose)
    return record.update({"guarantees": dict(GUARANTEES)})


# ----------------------------------------------------------------------------------------------
# trained runs (the demo's and every sweep run's)
# ----------------------------------------------------------------------------------------------

def find_trained_model(train_dir: Path, train_summary: Mapping[str, Any] | None = None) -> Path:
    """The final model file a finished training run wrote (``summary["files"]["final_model"]``)."""
    train_dir = Path(train_dir)
    summary = dict(train_summary or {})
    if summary.get("status") not in (None, "completed"):
        raise RuntimeError(f"training in {train_dir} is {summary.get('status')}; rerun the same command to resume it")
    named = (summary.get("files") or {}).get("final_model")
    candidates = [Path(named)] if named else []
    candidates += sorted(train_dir.glob("model_final*"))
    for path in candidates:
        path = path if path.is_absolute() or path.exists() else train_dir / path
        if path.is_file() and path.suffix != ".json":
            return path
    raise FileNotFoundError(f"no final model in {train_dir}; the training run did not finish (rerun to resume it)")


def train_facts(train_summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scalar facts of a training summary, with the final validation metrics and selection flattened."""
    summary = dict(train_summary or {})
    facts = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k != "out_dir"}
    facts.update({k: v for k, v in (summary.get("final_val") or {}).items() if isinstance(v, (int, float))})
    selection = summary.get("selection") or {}
    if selection.get("metric"):
        facts["selection_metric"] = selection["metric"]
        facts["selected_epoch"] = selection.get("best_epoch")
    return facts


def load_trained_model(train_dir: Path, train_summary: Mapping[str, Any] | None, device: str,
                       model_file: Path | None = None) -> nn.Module:
    from experiments.checkpoints import load_checkpoint

    path = model_file if model_file is not None else find_trained_model(train_dir, train_summary)
    model = load_checkpoint(path).model
    return model.to(device).eval()


def initial_model(config, in_channels: int, num_classes: int, device: str = "cpu") -> nn.Module:
    """The weights a training run of ``config`` starts from (the trainer seeds torch with ``run.seed`` right before
    building the model); the global RNG state is left as it was."""
    from experiments.training.loop import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = build_model(config, in_channels, num_classes)
    return model.to(device).eval()


def load_test_split(config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of a recipe's dataset."""
    from experiments.datasets import load_eval_data

    dataset = config.data.dataset
    return load_eval_data(dataset, root=getattr(config.data, "root", None), n=None, seed=seed)


def measure_trained_run(config, train_dir: Path, train_summary: Mapping[str, Any] | None, *, name: str,
                        evaluate_options: Mapping[str, Any] | None = None, analysis_options: Mapping[str, Any] | None = None,
                        device: str = "cpu", seed: int = 0, verbose: bool = False,
                        model_file: Path | None = None) -> ModelRecord:
    """Load a finished training run and measure it (used by sweeps); ``model_file``: which saved model
    (default: the final one)."""
    from experiments.datasets import DATASETS
    from experiments.parsing import parse_fraction

    evaluate_options = dict(evaluate_options or {})
    analysis_options = dict(analysis_options or {})
    model = load_trained_model(train_dir, train_summary, device, model_file)
    x_test, y_test = load_test_split(config, seed=0)
    info = DATASETS.get(config.data.dataset, {"input_shape": tuple(x_test.shape[1:]), "num_classes": int(y_test.max()) + 1})
    steps = [s for s, flag in (("eval", True), ("spectral", analysis_options.get("spectral", True)),
                                ("bound", analysis_options.get("bound", True)), ("lower", analysis_options.get("lower", True)),
                                ("theory", analysis_options.get("theory", True)),
                                ("theory_trained", analysis_options.get("theory", True)),
                                ("spectra", analysis_options.get("spectra", False))) if flag]
    initial = (initial_model(config, int(info["input_shape"][0]), int(info["num_classes"]), device)
               if "spectra" in steps else None)
    record = measure_model(
        model, name=name, input_shape=info["input_shape"], x_test=x_test, y_test=y_test,
        eps=parse_fraction(evaluate_options.get("eps", config.attack.eps)),
        attacks=evaluate_options.get("attacks", ["pgd20"]), eval_n=evaluate_options.get("n"),
        rtol=float(analysis_options.get("rtol", 0.02)), lower_points=int(analysis_options.get("lower_points", 128)),
        lower_iters=int(analysis_options.get("lower_iters", 50)), attack_ratio_steps=int(analysis_options.get("attack_ratio_steps", 20)),
        num_classes=info["num_classes"], seed=seed, out_dir=Path(train_dir).parent, verbose=verbose, steps=steps,
        initial=initial,
    )
    return record.update({"train": train_facts(train_summary)})
