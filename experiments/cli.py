"""The ``archlip`` command line: one entry point, one subcommand per task.

Every subcommand accepts the same common flags (``--json``, ``--device``, ``--seed``, ``--out``).
User errors (bad flags, unknown presets, missing files or datasets) print ONE line that says what was
wrong and what to do, and exit with status 2; ``--traceback`` (or ``ARCHLIP_TRACEBACK=1``) shows the
full Python traceback instead.

Subcommands::

    archlip spectral CKPT|PRESET        per-layer certified sandwich table
    archlip bound CKPT|PRESET           network / stage / block bounds and data lower bounds
    archlip theory predict|optimal-config|validate
    archlip train RECIPE.yaml [--set key=value ...]
    archlip eval CKPT --attacks pgd20,cw20,aa
    archlip sweep SWEEP.yaml
    archlip report RUN_DIR
    archlip export RUN_DIR|CKPT --format robustbench
    archlip demo [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.datasets import DATASETS, dataset_info, load_eval_data  # noqa: F401  (re-exported)
from experiments.io import to_jsonable, write_json  # noqa: F401  (re-exported)
from experiments.parsing import (  # noqa: F401  (parse_fraction re-exported: the readers live in experiments.parsing)
    UserError, check_positive, parse_attacks, parse_count, parse_eps, parse_fraction, parse_int_list, parse_range,
    parse_rtol, parse_shape,
)
from experiments.runtime import resolve_device, torch_threads  # noqa: F401  (re-exported)
from experiments.targets import load_target

EXIT_OK = 0
EXIT_USER_ERROR = 2

#: Exceptions that mean "the user asked for something impossible": one line, exit 2. ValueError is the library's
#: bad-input error (every ``UserError``, ``ConfigError``, checkpoint mismatch ... is one); OSError covers missing,
#: unreadable or unwritable files, a full disk and a locked run folder. A TypeError or KeyError is a bug, not a
#: user error: it ends with a traceback (and exit status 1), so it cannot hide as "exit 2".
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table of ``rows`` restricted to ``columns``."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "x".join(str(x) for x in v)
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_mapping(payload: dict[str, Any]) -> str:
    """``key  value`` lines with floats to 6 significant digits and lists joined by commas."""
    def text(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (list, tuple)):
            return ", ".join(text(x) for x in v)
        return str(v)

    width = max((len(k) for k in payload), default=0)
    return "\n".join(f"{k.ljust(width)}  {text(v)}" for k, v in payload.items())


def _out_dir(args: argparse.Namespace, default: str | None = None) -> Path | None:
    """``--out`` (else ``default``), checked before any work: not a file, and writable (or creatable); the
    folder itself is created by whoever writes into it, so a rejected command leaves none behind."""
    from experiments.io import check_writable_folder

    if args.out is not None and not str(args.out).strip():
        raise UserError("--out is empty; give a directory, e.g. --out runs/x")
    out = args.out or default
    if out is None:
        return None
    path = Path(out)
    check_writable_folder(path, "--out" if args.out else "the output folder")
    return path


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(to_jsonable(payload), indent=2))
    else:
        print(text)


def _eps(given: float | None, info: dict[str, Any]) -> float:
    """``--eps`` (already parsed), else the eps the checkpoint was trained with, else 8/255."""
    if given is not None:
        return given
    recorded = (info.get("metadata") or {}).get("attack") or {}
    return float(recorded["eps"]) if isinstance(recorded.get("eps"), (int, float)) else 8 / 255


def _described(info: dict[str, Any]) -> str:
    """The target's name, and for a preset that its weights are random (not a trained model)."""
    if info.get("source") == "preset":
        return f"{info['name']} (preset with random weights, seed {info.get('seed', 0)}: not a trained model)"
    return str(info["name"])


def cmd_spectral(args: argparse.Namespace) -> int:
    import torch

    from experiments.measure import spectral_analyze

    rtol = parse_rtol(args.rtol)
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    out = _out_dir(args)  # a bad --out fails now, not after the analysis
    device = resolve_device(args.device)
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed, input_shape=shape,
                              model=args.model, model_kwargs=args.model_kwargs)
    if args.spectrum:
        return _spectrum(args, model, info, out)
    example = torch.zeros((1, *info["input_shape"]), device=device)
    table = spectral_analyze()(model, example, rtol=rtol, progress=not args.json)
    rows = to_jsonable(table.rows)
    payload = {"target": info["name"], "source": info["source"], "weights": info["weights"],
               "input_shape": info["input_shape"], "layers": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_json(out / "spectral.json")
        table.to_csv(out / "spectral.csv")
    columns = [c for c in ("name", "weight_shape", "stride", "input_size", "lower", "upper", "gap", "upper_method",
                           "converged", "ratio_to_random") if rows and c in rows[0]]
    text = (f"per-layer l2 operator norms of {_described(info)} at input {'x'.join(map(str, info['input_shape']))} "
            f"(lower: certified lower bound, upper: certified upper bound, gap = upper/lower - 1, "
            f"ratio_to_random: upper / random-matrix baseline of the same kernel std):\n")
    text += format_table(rows, columns or (list(rows[0]) if rows else []))
    missed = [r for r in rows if not r.get("converged", True)]
    payload["rows_above_rtol"] = len(missed)
    text += f"\n{len(missed)} of {len(rows)} rows above rtol={args.rtol:g}"
    for r in missed:
        text += f"\n  {r['name']}: gap {100 * r['gap']:.2f}%: {r.get('reason')}; to reach rtol: {r.get('suggestion')}"
    if out is not None:
        text += f"\nwrote {out / 'spectral.json'} and {out / 'spectral.csv'}"
    _emit(args, payload, text)
    return EXIT_OK


def _fresh_initialisation(model, seed: int):
    """The same architecture with newly initialised weights (drawn under ``seed``), or None if it cannot be rebuilt."""
    import torch

    if not hasattr(model, "arch_config"):
        return None
    from experiments.models import model_from_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = model_from_config(model.arch_config())
    return fresh.to(next(model.parameters()).device).eval()


def _spectrum(args: argparse.Namespace, model, info: dict[str, Any], out: Path | None) -> int:
    """``archlip spectral --spectrum``: full spectra vs the random-matrix law; trained and a fresh initialisation."""
    from experiments.theory_validation import compact_spectrum, spectrum_rows

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    shape = tuple(info["input_shape"])
    rows = {"trained": spectrum_rows(model, shape, seed=args.seed, top_k=args.top_k, progress=not args.json)}
    fresh = _fresh_initialisation(model, args.seed)
    if fresh is not None:
        rows["init"] = spectrum_rows(fresh, shape, seed=args.seed, top_k=args.top_k)
    compact = {label: [compact_spectrum(r) for r in rs] for label, rs in rows.items()}
    payload = {"target": info["name"], "input_shape": list(shape), "spectra": rows,
               "init_note": f"'init': a fresh initialisation of the same architecture under seed {args.seed}, "
                            "not necessarily the weights this model was trained from"}
    columns = ["name", "method", "guarantee", "n_values", "top", "bulk_edge", "n_outliers", "random_n_outliers",
               "alpha", "random_alpha"]
    table = [{c: r.get(c) for c in columns} for r in compact["trained"]]
    text = (f"singular-value spectra of {info['name']} at input {'x'.join(map(str, shape))} (bulk_edge: random-matrix "
            "law for iid weights of the same entry std; n_outliers: values above max(edge, top of a Gaussian draw through "
            "the same operator); alpha: power-law exponent of s^2; random_*: the Gaussian draw's):\n" + format_table(table, columns))
    if out is not None:
        from experiments.render import write_csv
        from experiments.study_report import plot_spectra

        write_json(out / "spectrum.json", payload)
        write_csv([{k: v for k, v in r.items() if k != "profile"} for r in compact["trained"]], out / "spectrum.csv")
        plot_spectra([{"name": info["name"], "spectra": compact}], out / "spectrum.png")
        text += f"\nwrote {out / 'spectrum.json'}, {out / 'spectrum.csv'} and {out / 'spectrum.png'}"
    _emit(args, payload, text)
    return EXIT_OK


def cmd_bound(args: argparse.Namespace) -> int:
    from experiments.measure import bound_summary, data_lower_bounds

    check_positive(args.n, "--n", allow_zero=True)  # 0 skips the data lower bounds
    if args.local:
        check_positive(args.local_n, "--local-n")
        if not 0 < args.local_eps_max <= 1e3:
            raise UserError(f"--local-eps-max must be a positive radius, got {args.local_eps_max}")
    rtol = parse_rtol(args.rtol)
    eps_given = parse_eps(args.eps) if args.eps is not None else None
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    out = _out_dir(args)  # a bad --out fails now, not after the analysis
    device = resolve_device(args.device)
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed, input_shape=shape,
                              model=args.model, model_kwargs=args.model_kwargs)
    eps = _eps(eps_given, info)
    x = y = None
    if args.n > 0:  # the data is found (or not) before the bound is computed
        x, y = load_eval_data(info["dataset"], root=args.data_root, n=args.n, seed=args.seed, download=args.download)
    summary = bound_summary(model, info["input_shape"], rtol=rtol)
    payload: dict[str, Any] = {"target": info["name"], "weights": info["weights"], "input_shape": info["input_shape"],
                               **summary}
    if x is not None:
        payload["lower"] = data_lower_bounds(model, x.to(device), y.to(device), eps=eps, seed=args.seed)
    if args.local:
        payload["local"] = _local_certificates(args, model, info, payload.get("certified_lipschitz"), out)
    if out is not None:
        write_json(out / "bound.json", payload)
    lines = [f"l2 Lipschitz constant of the logits of {_described(info)} at input "
             f"{'x'.join(map(str, info['input_shape']))}:"]
    methods = payload.get("certified_methods") or {}
    best = min(methods, key=methods.get) if methods else "?"
    rows = [(f"certified upper bound (tightest: {best})", payload.get("certified_lipschitz"), "certified_upper"),
            ("certified upper bound (layer product)", payload.get("certified_lipschitz_product"), "certified_upper")]
    rows += [(f"  {stage}", value, "certified_upper") for stage, value in (payload.get("stage_bounds") or {}).items()]
    lower = payload.get("lower") or {}
    if lower:
        rows += [(f"max Jacobian norm on {lower.get('lower_points')} points", lower.get("empirical_lipschitz"), "lower"),
                 (f"attack ratio (l2 balls, eps={eps:.4g})", lower.get("attack_lipschitz"), "lower"),
                 (f"local Lipschitz metric (linf, eps={eps:.4g})", lower.get("local_lipschitz"), "estimate"),
                 ("stable accuracy under that attack", lower.get("stable_acc"), "")]
    for label, value, guarantee in rows:
        if value is not None:
            lines.append(f"  {label:44s} {value:12.6g}  {guarantee}")
    if args.local:
        loc = payload["local"]
        lines.append(f"  certified {loc['norm']} radii on {loc['n']} points: median {loc['median_certified']:.4g}, "
                     f"median attack radius {loc['median_attack']:.4g}")
    if out is not None:
        lines.append(f"wrote {out / 'bound.json'}" + (f" and {out / 'local.csv'}" if args.local else ""))
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _local_certificates(args: argparse.Namespace, model, info, global_bound, out) -> dict[str, Any]:
    """Certified radius per example (lipschitz.local) beside the smallest PGD radius on a grid that breaks it."""
    import csv

    import torch

    from experiments.attacks import pgd
    from lipschitz.local import certify_examples

    if args.local_n < 1:
        raise UserError(f"--local-n must be >= 1, got {args.local_n}")
    x, y = load_eval_data(info["dataset"], root=args.data_root, n=args.local_n, seed=args.seed, download=args.download)
    res = certify_examples(model.cpu(), x, y, args.local_norm, eps_max=args.local_eps_max, global_bound=global_bound)
    grid = [args.local_eps_max * k / 20 for k in range(1, 21)]
    attack = torch.full((len(x),), float("inf"))
    for r in grid:
        open_ = torch.isinf(attack)
        if not bool(open_.any()):
            break
        adv = pgd(model, x[open_], y[open_], eps=r, norm=args.local_norm, steps=20, step_size=r / 4,
                  generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            broken = model(adv).argmax(1) != y[open_]
        idx = torch.nonzero(open_).flatten()[broken]
        attack[idx] = r
    rows = [{**r.to_dict(), "attack_radius": float(attack[r.index])} for r in res]
    if out is not None:
        with open(out / "local.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    cert = sorted(r["certified_radius"] for r in rows)
    att = sorted(r["attack_radius"] for r in rows)
    return {"norm": args.local_norm, "n": len(rows), "eps_max": args.local_eps_max, "rows": rows,
            "median_certified": cert[len(cert) // 2], "median_attack": att[len(att) // 2],
            "guarantee": "certified radius (lower bound of the true robust radius); attack radius: upper bound "
                         "on a grid of eps_max/20 steps (inf: no attack succeeded up to eps_max)"}


def cmd_theory(args: argparse.Namespace) -> int:
    from lipschitz import theory

    if args.theory_command == "optimal-config":
        check_positive(args.top, "--top")
        check_positive(args.num_stages, "--num-stages")
    out = _out_dir(args, default="runs/theory-validation" if args.theory_command == "validate" else None)
    if args.theory_command == "optimal-config":
        payload, text = _optimal_config_report(theory, args)
    elif args.theory_command == "predict":
        depths = parse_int_list(args.depths)
        widths = parse_int_list(args.widths)
        payload = _theory_prediction(theory, depths, widths, args)
        text = format_mapping(payload)
    elif args.theory_command == "validate":
        from experiments.theory_validation import run_validation

        out.mkdir(parents=True, exist_ok=True)
        payload = run_validation(out, quick=args.quick)
        text = f"wrote theory validation results to {out}"
    else:  # pragma: no cover - argparse enforces the choice
        raise UserError("choose one of: predict, optimal-config, validate")
    if out is not None and args.theory_command != "validate":
        write_json(out / f"theory-{args.theory_command}.json", payload)
    _emit(args, payload, text)
    return EXIT_OK


REFERENCE_ARCHITECTURES = ("wrn-34-10", "wrn-34-r")


def _optimal_config_report(theory, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Ranked configurations, the objective and design space in words, and WRN-34-10 / WRN-34-R beside them."""
    from experiments.models.registry import WRN_PRESETS

    info = dataset_info(args.data)
    budget = parse_count(args.budget)
    kw = dict(weight_model=args.weight_model, std=args.std, num_classes=info["num_classes"],
              in_channels=info["input_shape"][0], input_size=info["input_shape"][-1])
    search = theory.optimal_config(
        budget, n_stages=args.num_stages, top_k=args.top, depth_range=parse_range(args.depth_range, "depth"),
        width_range=parse_range(args.width_range, "width"), width_step=args.width_step,
        monotone_widths=not args.any_width_order, min_fraction=args.min_fraction,
        max_width_ratio=args.max_width_ratio if args.max_width_ratio > 0 else None, **kw)
    refs = {name.upper(): (WRN_PRESETS[name]["depths"], WRN_PRESETS[name]["widths"])
            for name in REFERENCE_ARCHITECTURES if len(WRN_PRESETS[name]["depths"]) == args.num_stages}
    references = theory.reference_configs(refs, search, budget, min_fraction=args.min_fraction, **kw)
    rows = [{"rank": i + 1, **to_jsonable(c)} for i, c in enumerate(search)]
    ref_rows = [to_jsonable(r) for r in references]
    sp = search.space
    shape = ("non-decreasing" if sp["monotone_widths"] else "in any order") + (
        f", each stage at most {sp['max_width_ratio']:g}x the previous" if sp["max_width_ratio"] else "")
    text = "\n".join([
        f"minimises: {search.objective}",
        f"design space: {sp['stages']} stages, {sp['depth_range'][0]}-{sp['depth_range'][1]} blocks each, stage widths "
        f"{sp['width_range'][0]}-{sp['width_range'][1]} in steps of {sp['width_step']}, {shape}; stem {sp['stem_width']}; "
        f"{sp['params'][0]:,} <= parameters <= {sp['params'][1]:,} (--depth-range, --width-range, --any-width-order, "
        f"--max-width-ratio, --min-fraction change it)",
        "best configurations:" if rows else "no configuration of the design space fits the budget",
        format_table(rows, ["rank", "depths", "widths", "params", "bound", "objective"]) if rows else "",
        "references (same objective and weight model):",
        format_table(ref_rows, ["name", "depths", "widths", "params", "bound", "objective", "note"]),
        "the predicted bound grows with every block and with width, so it keeps depth at the low end of the range and "
        "spends the budget on width; it ranks architectures by a bound at random weights, not by robustness "
        "(docs/theory.md, section 5)",
    ])
    payload = {"budget": budget, "objective": search.objective, "space": sp, "configs": rows,
               "references": ref_rows, "relaxation": to_jsonable(search.relaxation)}
    return payload, text


def _theory_prediction(theory, depths, widths, args: argparse.Namespace) -> dict[str, Any]:
    from experiments.measure import theory_prediction

    info = dataset_info(args.data)
    if len(widths) != len(depths) + 1:
        raise UserError(f"--widths needs the stem width then one width per stage ({len(depths) + 1} values), got {len(widths)}")
    return {"depths": list(depths), "widths": list(widths), "dataset": args.data,
            **theory_prediction(depths, widths, num_classes=info["num_classes"], in_channels=info["input_shape"][0],
                                input_size=info["input_shape"][-1])}


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from experiments.io import WriteFailedError
    from experiments.training import train
    from experiments.training.loop import RunExistsError, check_run_config

    overrides = list(args.set or [])
    if args.seed_given:
        overrides.append(f"run.seed={args.seed}")
    if args.device:
        device = resolve_device(args.device)
        if device.index not in (None, 0) and "LOCAL_RANK" not in os.environ:
            raise UserError("archlip train picks the GPU itself (cuda:LOCAL_RANK under torchrun); use --device cuda "
                            "and CUDA_VISIBLE_DEVICES to choose one")
        overrides.append(f"run.device={device.type}")
    if args.json:
        overrides.append("run.progress=false")
    config = load_config(args.recipe, overrides=overrides)
    root = config.data.root
    downloading = args.download and config.data.dataset == "cifar10"  # the one trainable dataset to download
    if downloading and not root:
        raise UserError("--download needs a dataset folder: add --set data.root=DIR")
    if not downloading and config.data.dataset != "digits" and root and not Path(root).is_dir():
        raise UserError(f"data.root {root} is not a folder; point it to the folder holding the {config.data.dataset} "
                        f"files (e.g. cifar-10-batches-py/), or add --download to fetch them there")
    check_run_config(config, check_data=not downloading)  # the model and data paths, before any download or folder
    out = _out_dir(args, default=str(Path("runs") / config.name))
    if downloading:
        from experiments.data import load_cifar

        load_cifar(config.data.dataset, config.data.root, "test", download=True)  # downloads only if missing
    words = [a for a in getattr(args, "argv", None) or ["train", args.recipe, "--out", str(out)] if a != "--resume"]
    again = shlex.join(["archlip", *words, "--resume"])  # the same command, overrides included
    try:
        summary = train(config, out, resume=args.resume)
    except RunExistsError:
        raise UserError(f"{out} already holds a training run; continue it with --resume (a finished run is extended by "
                        f"--resume --set run.epochs=N), or train into another --out") from None
    except WriteFailedError as exc:
        raise WriteFailedError(exc.what, f"free some space, then continue with: {again}") from None
    status = summary.get("status", "completed")
    text = f"training {config.name}: {status}; run folder {out}"
    final_model = (summary.get("files") or {}).get("final_model")
    if final_model:
        text += f"\nmodel: {final_model} (next: archlip eval {final_model} / archlip bound {final_model})"
    if status != "completed":
        text += f" (continue with: {again})"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        _emit(args, summary, text)
    return EXIT_OK if status == "completed" else 1


def default_eval_dir(info: dict[str, Any], attacks: Sequence[str], args: argparse.Namespace,
                     eps_given: float | None) -> Path:
    """``runs/eval/<checkpoint or preset>/<attacks>[_n<N>][_eps<E>][...]``: one folder per evaluation setting,
    so evaluations of different checkpoints, attack sets or point counts never collide."""
    if info["source"] == "preset":
        target = f"{info['name']}-{info['dataset']}-seed{args.seed}"
    else:
        path = Path(info["name"]).resolve()
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd().resolve())
        parts = [p for p in path.with_suffix("").parts[-3:] if p not in (os.sep, "runs")]
        target = "_".join(parts)
    parts = ["+".join(attacks)]
    if args.n is not None:
        parts.append(f"n{args.n}")
    if args.subset != "first":
        parts.append(f"{args.subset}-seed{args.seed}")
    elif args.seed and info["source"] != "preset":
        parts.append(f"seed{args.seed}")
    if eps_given is not None:
        parts.append(f"eps{eps_given:.4g}")
    slug = lambda text: re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text).strip("-") or "model"  # noqa: E731
    return Path("runs") / "eval" / slug(target) / slug("_".join(parts))


def _interval(accuracy: float, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of an accuracy measured on n points (``experiments.stats``)."""
    from experiments.stats import accuracy_interval

    ci = accuracy_interval(accuracy, n)
    return ci.low, ci.high


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.attacks import get_attack_preset
    from experiments.evaluate import evaluate

    attacks = parse_attacks(args.attacks)
    for name in attacks:
        get_attack_preset(name)  # an unknown name fails before the model and the data are loaded
    eps_given = parse_eps(args.eps) if args.eps is not None else None
    check_positive(args.n, "--n")
    check_positive(args.batch_size, "--batch-size")
    if args.out is not None:
        _out_dir(args)
    device = resolve_device(args.device)
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed, model=args.model,
                              model_kwargs=args.model_kwargs)
    eps = _eps(eps_given, info)
    out = _out_dir(args, default=str(default_eval_dir(info, attacks, args, eps_given)))
    x, y = load_eval_data(info["dataset"], root=args.data_root, seed=args.seed, download=args.download)
    options = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    summary = evaluate(model, x, y, attacks, eps=eps, n=args.n, points=args.subset, seed=args.seed, out_dir=out,
                       device=device, progress=not args.json,
                       on_estimate=lambda e: print(e.describe(n_flag="--n"), file=sys.stderr, flush=True), **options)
    payload = to_jsonable(summary)
    n = int(payload["n"])
    clean_ci = _interval(payload["clean_accuracy"], n)
    robust = payload.get("robust_accuracy") or {}
    intervals = {name: _interval(value, n) for name, value in robust.items()}
    payload["weights"] = info["weights"]
    payload["intervals"] = {"method": "95% Clopper-Pearson interval over the evaluated points (binomial)",
                            "clean_accuracy": list(clean_ci), "robust_accuracy": {k: list(v) for k, v in intervals.items()}}
    payload["guarantees"] = {"robust_accuracy": "upper bound (attack-based): a stronger attack can only lower it"}
    points = (payload.get("points") or {}).get("description", f"{n} points")
    lines = [f"{_described(info)} on {info['dataset']} test data ({points}), {payload.get('norm', 'linf')} eps={eps:.4g}:",
             f"  {'clean accuracy':28s} {payload['clean_accuracy']:.4f}  [{clean_ci[0]:.3f}, {clean_ci[1]:.3f}]"]
    for name, value in robust.items():
        low, high = intervals[name]
        lines.append(f"  {'robust accuracy ' + name:28s} {value:.4f}  [{low:.3f}, {high:.3f}]  upper bound (attack-based)")
    if len(robust) > 1:
        worst = payload["worst_case"]["robust_accuracy"]
        low, high = _interval(worst, n)
        lines.append(f"  {'worst case over attacks':28s} {worst:.4f}  [{low:.3f}, {high:.3f}]  upper bound (attack-based)")
    lines.append(f"[a, b]: 95% Clopper-Pearson interval for the test distribution from {n} points; robust accuracy "
                 f"is an upper bound: an attack that finds no adversarial example does not prove there is none")
    lines.append(f"wrote {out}")
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments import sweep

    if args.seed_given:
        raise UserError("archlip sweep does not take --seed: each run's seed is run.seed of its recipe; set it under "
                        "'set:' in the sweep file, or vary it in the grid (run.seed: [0, 1, 2])")
    check_positive(args.max_runs, "--max-runs", allow_zero=True)
    check_positive(args.nproc_per_node, "--nproc-per-node")
    spec = sweep.load_sweep(args.sweep_file)
    out = _out_dir(args, default=str(Path("runs") / "sweeps" / spec.name))
    device = resolve_device(args.device)  # auto: cuda when available, for training and the measurements
    result = sweep.run_sweep(
        spec,
        out,
        max_runs=args.max_runs,
        launcher=args.launcher,
        nproc_per_node=args.nproc_per_node,
        dry_run=args.dry_run,
        only=args.run,
        aggregate_only=args.aggregate_only,
        device=str(device),
        workers=args.workers,
        wait=False if args.no_wait else None,
        threads=args.threads,
        progress=not args.json,
    )
    lines = [f"sweep {spec.name}: {result['done']} of {result['total']} runs finished "
             f"({result['ran']} ran now, {result['skipped']} skipped as already done)"]
    if result.get("commands"):
        lines += ["would run (every run's recipe and model checked):"] + [f"  {c}" for c in result["commands"]]
    if result.get("job_ids"):
        lines.append(f"submitted {len(result['job_ids'])} submitit job(s); logs in {Path(out) / 'submitit'}")
    if result.get("table"):
        lines.append(f"table: {result['table']}")
    if result.get("configs"):
        lines.append(f"per-configuration statistics: {result['configs']}")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    _emit(args, result, "\n".join(lines))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from experiments.report import write_report

    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file; pass the --out directory of a demo, sweep, training or analysis")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found; pass the --out directory of a demo, sweep, "
                                f"training or analysis")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give a directory for report.md and its figures")
    _out_dir(args)
    regenerate = f"archlip report {run_dir}" + (f" --out {args.out}" if args.out else "")
    path = write_report(run_dir, out_dir=Path(args.out) if args.out else None, regenerate=regenerate)
    _emit(args, {"report": str(path)}, f"report: {path}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from experiments.export import export_robustbench

    out = _out_dir(args, default=str(Path("runs") / "export"))
    paths = export_robustbench(args.run, out, name=args.name, which=args.checkpoint, eval_summary=args.eval,
                               model=args.model)
    _emit(args, {k: str(v) for k, v in paths.items()}, f"wrote {paths['weights']} and its card {paths['card']}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    out = _out_dir(args, default="runs/demo")
    device = resolve_device(args.device or "cpu")
    result = run_demo(out, quick=args.quick, seed=args.seed, device=str(device), verbose=not args.json, threads=args.threads)
    _emit(args, {"report": str(result["report"]), "results": str(result["results"])}, f"report: {result['report']}")
    return EXIT_OK


LISTS = ("presets", "recipes", "attacks", "sweeps", "datasets")


def cmd_list(args: argparse.Namespace) -> int:
    """What archlip knows by name: model presets, training recipes, attack presets, sweeps, datasets."""
    if args.what == "presets":
        from experiments.models.registry import describe_presets

        rows = describe_presets()
        head = ("model presets (archlip spectral/bound/eval PRESET builds one with random weights; for 10 classes "
                "and 3 input channels; depths are blocks per stage, widths the stem then each stage):")
        columns = ["name", "family", "depths", "widths", "params"]
    elif args.what == "recipes":
        from experiments.config import list_recipes, load_config

        rows = []
        for name in list_recipes():
            cfg = load_config(name)
            rows.append({"name": name, "dataset": cfg.data.dataset, "model": cfg.model.name, "method": cfg.method.name,
                         "epochs": cfg.run.epochs, "eps": round(cfg.attack.eps, 4)})
        head = "training recipes (archlip train NAME; override any key with --set section.key=value):"
        columns = ["name", "dataset", "model", "method", "epochs", "eps"]
    elif args.what == "attacks":
        from experiments.attacks import get_attack_preset, list_attack_presets

        rows = [{"name": n, "kind": get_attack_preset(n).kind, "description": get_attack_preset(n).description}
                for n in list_attack_presets()]
        head = "attack presets (archlip eval CKPT --attacks a,b,c):"
        columns = ["name", "kind", "description"]
    elif args.what == "sweeps":
        import yaml

        from experiments.sweep import list_sweeps, resolve_sweep_path

        rows = []
        for name in list_sweeps():
            raw = yaml.safe_load(resolve_sweep_path(name).read_text()) or {}
            rows.append({"name": name, "recipe": raw.get("recipe"), "launcher": raw.get("launcher", "sequential"),
                         "budget": (raw.get("budget") or {}).get("params", "-")})
        head = "shipped sweeps (archlip sweep NAME; archlip sweep NAME --dry-run lists its runs):"
        columns = ["name", "recipe", "launcher", "budget"]
    else:
        rows = [{"name": k, "input_shape": v["input_shape"], "classes": v["num_classes"]} for k, v in DATASETS.items()]
        head = "datasets (--data NAME; digits is bundled, the others read --data-root):"
        columns = ["name", "input_shape", "classes"]
    _emit(args, {args.what: rows}, head + "\n" + format_table(rows, columns))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit status 2, and help epilogs printed as written (examples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Threads for torch's CPU work unless --threads says otherwise: one. Measured (benchmarks/cli_threads.py, T1 in
#: docs/benchmarks.md, a shared 2-core machine): with OMP_WAIT_POLICY=PASSIVE (set by main), one thread was
#: 1.1-1.6x faster than torch's default on the digits-sized models the CLI runs on a CPU; only larger layers
#: (wrn-16-4 at 32x32) gained from a second thread (1.35x). Without PASSIVE, spinning threads were 7-24x slower.
DEFAULT_THREADS = 1


def _common(parser: argparse.ArgumentParser, out_help: str = "directory for results") -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto, i.e. cuda when available; "
                                                      "the demo: cpu)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--out", default=None, help=out_help)
    group.add_argument("--threads", type=int, default=None,
                       help=f"CPU threads for torch during this command (default {DEFAULT_THREADS} when it runs on the "
                            f"CPU: the small models run on a CPU gain little from more, and one thread avoids the large "
                            f"slowdown of a shared, oversubscribed CPU; raise it for large models on an idle many-core "
                            f"machine. On a GPU: torch's default)")
    group.add_argument("--traceback", action="store_true", help="show the full traceback on errors")


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME|PKG.MODULE:CLASS",
                        help="the architecture of CKPT: a registry name its keys cannot settle (e.g. "
                             "preact-resnet-18-input-shortcut, dm-wrn-28-10-silu; sizes still come from the keys), or "
                             "your own class (package.module:Class or path/to/file.py:Class), built and loaded strictly")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='keyword arguments for --model PKG.MODULE:CLASS as a JSON object, e.g. \'{"depth": 28}\'')


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, choices=tuple(DATASETS),
                        help="dataset (default: the checkpoint's own, else cifar10)")
    parser.add_argument("--data-root", default=None, help="directory with the dataset's standard files")
    parser.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")


TARGET_HELP = ("a checkpoint file (archlip's .safetensors, RobustBench or paper-code .pt, TRADES state dicts) or a "
               "model preset name (random weights; see archlip list presets)")
CKPT = "runs/demo/digits-pgdat-tiny/train/model_best.safetensors"
EXAMPLES = {
    "spectral": f"examples:\n  archlip spectral wrn-16-4 --input-shape 3x32x32\n  archlip spectral {CKPT} --json > layers.json",
    "bound": f"examples:\n  archlip bound {CKPT} --n 128 --out runs/bound\n  archlip bound wrn-tiny --data digits --n 0",
    "predict": "example:\n  archlip theory predict --depths 5,5,5 --widths 16,320,640,512",
    "optimal-config": "example:\n  archlip theory optimal-config --budget 68M --top 5",
    "validate": "example:\n  archlip theory validate --quick --out runs/theory",
    "train": ("examples:\n  archlip train digits-pgdat-tiny --set run.epochs=4 --out runs/tiny\n"
              "  archlip train digits-pgdat-tiny --set run.epochs=4 --out runs/tiny --resume   # after an interruption\n"
              "  archlip train digits-pgdat-tiny --set run.epochs=6 --out runs/tiny --resume   # extend a finished run"),
    "eval": (f"examples:\n  archlip eval {CKPT} --attacks pgd20,cw20 --n 200\n"
             "  archlip eval model.pt --data cifar10 --data-root data/cifar10 --attacks aa --eps 8/255 --n 1000"),
    "sweep": "examples:\n  archlip sweep digits-cpu --dry-run\n  archlip sweep digits-cpu --out runs/sweep",
    "report": "examples:\n  archlip report runs/sweep\n  archlip report runs/tiny          # a training run folder",
    "demo": "examples:\n  archlip demo --out runs/demo\n  archlip demo --quick --out runs/quick",
    "list": "examples:\n  archlip list presets\n  archlip list recipes\n  archlip list attacks",
    "export": ("examples:\n  archlip export runs/tiny --format robustbench --out runs/export\n"
               "  archlip export runs/tiny --checkpoint final --eval runs/eval/tiny/eval_summary.json"),
}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("archlip")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="archlip", description="Certified spectral norms, Lipschitz bounds and robust training of WideResNets "
                                                 "with any per-stage depth and width.",
                     epilog="first steps:\n  archlip demo --out runs/demo\n  archlip list presets\n"
                            "  archlip COMMAND --help        (each command's options and examples)")
    parser.add_argument("--version", action="version", version=f"archlip {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("spectral", help="per-layer certified spectral-norm sandwich of a checkpoint or preset",
                       epilog=EXAMPLES["spectral"])
    p.add_argument("target", metavar="CKPT|PRESET", help=TARGET_HELP)
    _data_args(p)
    p.add_argument("--input-shape", default=None, help="override the input shape, e.g. 3x32x32")
    p.add_argument("--rtol", type=float, default=0.02, help="target relative gap upper/lower - 1, in (0, 1] (default 0.02)")
    p.add_argument("--spectrum", action="store_true",
                   help="full singular-value spectra (FFT / dense / Lanczos top-k) against the random-matrix law, "
                        "trained vs a fresh initialisation")
    _model_arg(p)
    p.add_argument("--top-k", type=int, default=64, help="with --spectrum: values kept for layers too large for a dense SVD")
    _common(p, "directory for spectral.json and spectral.csv (with --spectrum: spectrum.json, .csv, .png)")
    p.set_defaults(func=cmd_spectral)

    p = sub.add_parser("bound", help="certified network/stage/block Lipschitz bounds and data lower bounds",
                       epilog=EXAMPLES["bound"])
    p.add_argument("target", metavar="CKPT|PRESET", help=TARGET_HELP)
    _data_args(p)
    p.add_argument("--input-shape", default=None, help="override the input shape, e.g. 3x32x32")
    p.add_argument("--n", type=int, default=128, help="data points for the lower bounds (0 to skip; default 128)")
    p.add_argument("--eps", default=None, help="radius of the attack-based lower bounds, at most 1 (default: the "
                                               "checkpoint's training eps, else 8/255)")
    p.add_argument("--rtol", type=float, default=0.02, help="per-layer sandwich tolerance, in (0, 1] (default 0.02)")
    _model_arg(p)
    p.add_argument("--local", action="store_true", help="certified robust radius per example (local Lipschitz "
                   "certificates), beside the PGD attack radius; writes local.csv")
    p.add_argument("--local-n", type=int, default=32, help="examples for --local (default 32)")
    p.add_argument("--local-norm", choices=("l2", "linf"), default="l2", help="ball of --local (default l2)")
    p.add_argument("--local-eps-max", type=float, default=1.0, help="largest radius searched by --local (default 1)")
    _common(p, "directory for bound.json")
    p.set_defaults(func=cmd_bound)

    p = sub.add_parser("theory", help="random-matrix predictions and parameter-budget optimal configurations")
    tsub = p.add_subparsers(dest="theory_command", metavar="THEORY_COMMAND", parser_class=_Parser,
                            help="predict, optimal-config or validate (each has --help with an example)")
    tsub.required = True
    tp = tsub.add_parser("predict", help="parameter count and predicted Lipschitz bound of a per-stage config",
                         epilog=EXAMPLES["predict"])
    tp.add_argument("--depths", default="5,5,5", help="blocks per stage (default 5,5,5)")
    tp.add_argument("--widths", default="16,320,640,512", help="stem width then stage widths (default WRN-34-R)")
    tp.add_argument("--data", default="cifar10", choices=tuple(DATASETS), help="dataset for input channels/classes")
    _common(tp)
    tp = tsub.add_parser("optimal-config", help="per-stage depths/widths minimising the predicted bound under a budget",
                         epilog=EXAMPLES["optimal-config"])
    tp.add_argument("--budget", required=True, help="parameter budget, e.g. 68M")
    tp.add_argument("--top", type=int, default=10, help="how many ranked configurations to show (default 10)")
    tp.add_argument("--num-stages", type=int, default=3, help="number of stages (default 3)")
    tp.add_argument("--data", default="cifar10", choices=tuple(DATASETS), help="dataset for input size/channels/classes")
    tp.add_argument("--depth-range", default="2-10", help="blocks per stage, low-high (default 2-10)")
    tp.add_argument("--width-range", default="16-1024", help="stage widths, low-high (default 16-1024)")
    tp.add_argument("--width-step", type=int, default=16, help="width grid step (default 16)")
    tp.add_argument("--any-width-order", action="store_true",
                    help="allow a stage narrower than the one before (default: non-decreasing widths)")
    tp.add_argument("--max-width-ratio", type=float, default=4.0,
                    help="each stage at most this many times wider than the previous (default 4; 0: no limit)")
    tp.add_argument("--min-fraction", type=float, default=0.9,
                    help="use at least this fraction of the budget (default 0.9)")
    tp.add_argument("--weight-model", default="fixed",
                    help="random weights the bound is predicted for: fixed (iid N(0, std^2), default), "
                         "kaiming_normal_fan_out, kaiming_normal_fan_in, pytorch_default")
    tp.add_argument("--std", type=float, default=0.05, help="entry std of the 'fixed' weight model (default 0.05)")
    _common(tp)
    tp = tsub.add_parser("validate", help="predicted vs measured norms at initialisation (plots, Spearman)",
                         epilog=EXAMPLES["validate"])
    tp.add_argument("--quick", action="store_true", help="a smaller grid")
    _common(tp, "directory for the plots and JSON (default runs/theory-validation)")
    p.set_defaults(func=cmd_theory)

    p = sub.add_parser("train", help="train a recipe (YAML), resumable", epilog=EXAMPLES["train"])
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a recipe file or the name of a shipped recipe (archlip list recipes)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (starts "
                                                         "afresh if it has none yet); with a larger run.epochs, extend it")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into data.root first if missing")
    _common(p, "run directory (default runs/RECIPE)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="clean and adversarial accuracy of a checkpoint", epilog=EXAMPLES["eval"])
    p.add_argument("target", metavar="CKPT|PRESET", help=TARGET_HELP)
    p.add_argument("--attacks", default="pgd20", help="comma-separated attack presets (default pgd20), e.g. pgd20,cw20,aa "
                                                      "(archlip list attacks)")
    p.add_argument("--eps", default=None, help="perturbation radius, e.g. 8/255; linf at most 1 (default: the "
                                               "checkpoint's training eps, else 8/255)")
    p.add_argument("--n", type=int, default=None, help="number of test points (default all)")
    p.add_argument("--subset", default="first", choices=("first", "random"), help="first n points in order (default) or a seeded subset")
    p.add_argument("--batch-size", type=int, default=None, help="points per attack batch (default 250)")
    _data_args(p)
    _model_arg(p)
    _common(p, "directory for eval_summary.json and per-example JSONL (default runs/eval/CHECKPOINT/ATTACKS[_nN], "
               "one folder per evaluation setting)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="run a grid of configurations (resumable) and aggregate them", epilog=EXAMPLES["sweep"])
    p.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep path or shipped sweep name (archlip list sweeps)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--launcher", choices=("sequential", "torchrun", "submitit"), default=None, help="override the sweep's launcher")
    p.add_argument("--workers", type=int, default=None, help="sequential launcher: runs in parallel processes on this machine")
    p.add_argument("--no-wait", action="store_true", help="submitit: submit the jobs and return (collect with --aggregate-only)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per torchrun job")
    p.add_argument("--run", action="append", default=None, metavar="RUN_ID", help="run only these run ids (e.g. one per cluster job)")
    p.add_argument("--dry-run", action="store_true", help="check every run's recipe and model and list the commands, "
                                                          "without running them")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table, plots and report")
    _common(p, "sweep directory (default runs/sweeps/NAME)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="markdown report with PNG plots from a run directory's JSON results",
                       epilog=EXAMPLES["report"])
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a demo, sweep, training run, or "
                                                      "spectral/bound analysis")
    _common(p, "where to write report.md (default RUN_DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="a trained model as a model-zoo state dict (.pt) plus a JSON card",
                       epilog=EXAMPLES["export"])
    p.add_argument("run", metavar="RUN_DIR|CKPT", help="a training run folder (its selected model) or a checkpoint")
    p.add_argument("--format", default="robustbench", choices=("robustbench",), help="target layout (default robustbench)")
    p.add_argument("--checkpoint", default="best", choices=("best", "final"),
                   help="of a run folder: the model selected on validation (default) or the final one")
    p.add_argument("--eval", default=None, metavar="EVAL_SUMMARY.json", help="an archlip eval summary (or its folder) for "
                                                                            "the card's accuracies")
    p.add_argument("--name", default=None, help="file name stem (default: the run folder's name)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="registry architecture for a checkpoint whose keys cannot settle it (e.g. "
                        "preact-resnet-18-input-shortcut)")
    _common(p, "directory for NAME.pt and NAME.json (default runs/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train a small WRN and its reduced-last-stage twin on digits, bound and report",
                       epilog=EXAMPLES["demo"])
    p.add_argument("--quick", action="store_true", help="a reduced setting (used by the test suite)")
    _common(p, "output directory (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("list", help="what archlip knows by name: presets, recipes, attacks, sweeps, datasets",
                       epilog=EXAMPLES["list"])
    p.add_argument("what", choices=LISTS, metavar="|".join(LISTS), help="which list to show")
    _common(p)
    p.set_defaults(func=cmd_list)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


def _default_threads(args: argparse.Namespace) -> int | None:
    """``DEFAULT_THREADS`` for work on the CPU; None (torch's own choice) when the command will use a GPU."""
    device = getattr(args, "device", None) or ("cpu" if args.command == "demo" else "auto")
    if device.startswith("cuda"):
        return None
    if device == "auto" and args.command in ("spectral", "bound", "train", "eval", "sweep"):
        import torch

        return None if torch.cuda.is_available() else DEFAULT_THREADS
    return DEFAULT_THREADS


class _NoteHandler(logging.Handler):
    """Notes and warnings of the ``archlip`` logger as ``archlip: note: ...`` lines on (the current) stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"archlip: {record.getMessage()}", file=sys.stderr)


def _show_notes() -> None:
    logger = logging.getLogger("archlip")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler(level=logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 user error)."""
    # idle OpenMP threads sleep instead of spinning (a spinning pool is many times slower on a shared CPU); set
    # before torch starts its thread pool: this module imports torch only inside the commands
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _show_notes()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.seed_given = any(a == "--seed" or a.startswith("--seed=") for a in argv)
    args.argv = argv
    show_traceback = args.traceback or os.environ.get("ARCHLIP_TRACEBACK") == "1"
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.threads is None:
            args.threads = _default_threads(args)
        with torch_threads(args.threads):
            return handler(args)
    except BrokenPipeError:  # e.g. `archlip ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except USER_ERRORS as exc:
        if show_traceback:
            raise
        command = args.command if args.command != "theory" else f"theory {args.theory_command}"
        print(f"archlip {command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("archlip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
