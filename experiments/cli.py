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
    archlip demo [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2

#: Input shape (C, H, W) and number of classes per dataset name.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"input_shape": (1, 8, 8), "num_classes": 10},
    "cifar10": {"input_shape": (3, 32, 32), "num_classes": 10},
    "cifar100": {"input_shape": (3, 32, 32), "num_classes": 100},
    "svhn": {"input_shape": (3, 32, 32), "num_classes": 10},
}

#: Exceptions that mean "the user asked for something impossible": one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class UserError(ValueError):
    """A bad input detected by the CLI itself."""


# ----------------------------------------------------------------------------------------------
# small pure parsers (unit-tested)
# ----------------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9, "b": 10**9, "B": 10**9}


def parse_count(text: str | int | float) -> int:
    """``"68M"`` -> 68_000_000, ``"1.5k"`` -> 1500, ``"46160000"`` -> 46160000."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"count must be positive, got {text}")
        return int(round(text))
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise UserError(f"cannot read {text!r} as a count; write e.g. 68M, 1.5k or 46160000")
    value = float(match.group(1)) * _SUFFIX[match.group(2)]
    if value <= 0:
        raise UserError(f"count must be positive, got {text!r}")
    return int(round(value))


def parse_fraction(text: str | float) -> float:
    """``"8/255"`` -> 0.03137..., ``"0.031"`` -> 0.031."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read {text!r} as a number; write e.g. 8/255 or 0.031") from None


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"5,5,5"`` -> (5, 5, 5)."""
    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v != "")
    except ValueError:
        raise UserError(f"cannot read {text!r} as integers; write e.g. 5,5,5") from None
    if not values:
        raise UserError(f"empty list {text!r}; write e.g. 5,5,5")
    return values


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` or ``"3,32,32"`` -> (3, 32, 32)."""
    parts = re.split(r"[x,*]", str(text).strip().lower())
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise UserError(f"cannot read {text!r} as an input shape; write e.g. 3x32x32 (no batch dimension)") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"input shape {text!r} must be positive integers, e.g. 3x32x32")
    return shape


def parse_attacks(text: str) -> list[str]:
    """``"pgd20,cw20,aa"`` -> ["pgd20", "cw20", "aa"]."""
    names = [a.strip() for a in str(text).split(",") if a.strip()]
    if not names:
        raise UserError("--attacks is empty; write e.g. --attacks pgd20,cw20,aa")
    return names


def resolve_device(name: str | None):
    """Validate ``--device`` and return a ``torch.device`` (never silently falls back to CPU)."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use ``n`` torch CPU threads inside the block and restore the previous count after (None: unchanged)."""
    if n is None:
        yield
        return
    if n < 1:
        raise UserError(f"--threads must be >= 1, got {n}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def to_jsonable(obj: Any) -> Any:
    """Recursively convert tensors, numpy values, enums, dataclasses and paths to JSON values."""
    import dataclasses
    import enum

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else (None if math.isnan(obj) else str(obj))
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


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


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically (temporary file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# models and data through the experiments API
# ----------------------------------------------------------------------------------------------

_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".tar")


def dataset_info(name: str) -> dict[str, Any]:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_target(target: str, *, data: str | None, device, seed: int = 0, input_shape: tuple[int, ...] | None = None):
    """Resolve ``CKPT|PRESET`` to an eval-mode model on ``device``.

    Returns ``(model, info)`` with ``info`` holding ``source`` ("checkpoint"/"preset"), ``name``, ``dataset``
    and ``input_shape``. ``data=None`` means the checkpoint's recorded dataset, else cifar10. A preset is
    built with random weights drawn under ``seed``.
    """
    import torch

    from experiments import models as model_zoo

    if data is not None:
        dataset_info(data)
    path = Path(target)
    if path.exists():
        if path.is_dir():
            path = _checkpoint_in_dir(path)
        from experiments.checkpoints import load_checkpoint

        _check_checkpoint_format(path)
        loaded = load_checkpoint(path)
        model, metadata = _unpack_loaded_checkpoint(loaded)
        recorded = metadata.get("dataset") if metadata.get("dataset") in DATASETS else None
        if data is not None and recorded is not None and data != recorded:
            raise UserError(f"{path} was trained on {recorded} but --data {data} was given; drop --data or pass --data {recorded}")
        data = data or recorded or "cifar10"
        shape = input_shape or _metadata_input_shape(metadata) or DATASETS[data]["input_shape"]
        result = {"source": "checkpoint", "name": str(path), "dataset": data, "input_shape": tuple(shape), "metadata": metadata}
    else:
        presets = list(model_zoo.list_models())
        if target not in presets:
            if target.endswith(_CKPT_SUFFIXES) or os.sep in target:
                raise FileNotFoundError(f"checkpoint {target!r} not found; check the path (or name a preset: {', '.join(presets)})")
            raise UserError(f"{target!r} is neither a checkpoint file nor a model preset; presets: {', '.join(presets)}")
        data = data or "cifar10"
        torch.manual_seed(seed)
        shape = tuple(input_shape or DATASETS[data]["input_shape"])
        model = model_zoo.create_model(target, num_classes=DATASETS[data]["num_classes"], in_channels=shape[0])
        result = {"source": "preset", "name": target, "dataset": data, "input_shape": shape, "metadata": {}}
    model = model.to(device).eval()
    _check_input_shape(model, result["input_shape"], device)
    return model, result


def _check_input_shape(model, input_shape: tuple[int, ...], device) -> None:
    """One forward pass on zeros, so a wrong --input-shape is a one-line error instead of a deep traceback."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model cannot take inputs of shape {'x'.join(map(str, input_shape))} ({first}); "
                        f"pass --input-shape C x H x W matching the model (e.g. 3x32x32) or the right --data") from None


def _check_checkpoint_format(path: Path) -> None:
    """Reject files that are none of the checkpoint formats (torch zip/pickle/tar, safetensors) by their first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head or path.suffix == ".safetensors":
        return  # the loader reports empty or corrupted files itself
    if head.startswith(b"PK") or head[:1] == b"\x80" or head[8:9] == b"{" or head[257:262] == b"ustar":
        return
    raise UserError(f"{path} is not a checkpoint (neither a torch.save .pt/.pth file nor safetensors); "
                    f"pass a checkpoint file or a preset name")


def _checkpoint_in_dir(directory: Path) -> Path:
    candidates = [p for p in sorted(directory.iterdir()) if p.suffix in _CKPT_SUFFIXES]
    preferred = [p for p in candidates if p.stem in ("best", "final", "model")]
    if preferred:
        return preferred[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint file ({', '.join(_CKPT_SUFFIXES)}) in directory {directory}; pass the file itself")
    raise UserError(f"several checkpoints in {directory} ({', '.join(p.name for p in candidates)}); pass one of them")


def _unpack_loaded_checkpoint(loaded: Any):
    """``load_checkpoint`` may return a model, (model, metadata) or an object with .model/.metadata."""
    from torch import nn

    if isinstance(loaded, nn.Module):
        return loaded, {}
    if isinstance(loaded, tuple) and loaded and isinstance(loaded[0], nn.Module):
        return loaded[0], (loaded[1] if len(loaded) > 1 and isinstance(loaded[1], dict) else {})
    model = getattr(loaded, "model", None)
    if isinstance(model, nn.Module):
        return model, dict(getattr(loaded, "metadata", {}) or {})
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), nn.Module):
        return loaded["model"], dict(loaded.get("metadata") or {})
    raise TypeError("the checkpoint loader returned no model; pass a checkpoint written by archlip or a WideResNet state_dict")


def _metadata_input_shape(metadata: dict) -> tuple[int, ...] | None:
    """Input shape recorded with a checkpoint: ``input_shape``, or the shape of its ``dataset``."""
    if metadata.get("input_shape"):
        return tuple(int(v) for v in metadata["input_shape"])
    dataset = metadata.get("dataset")
    if dataset is None and isinstance(metadata.get("config"), dict):
        dataset = (metadata["config"].get("data") or {}).get("dataset")
    if isinstance(dataset, str) and dataset in DATASETS:
        return DATASETS[dataset]["input_shape"]
    return None


def load_eval_data(name: str, *, root: str | None, n: int | None = None, split: str = "test", seed: int = 0,
                   subset: str = "first", download: bool = False):
    """Return ``(x, y)`` of a dataset split (all points, the first ``n``, or a seeded subset of ``n``)."""
    import torch

    from experiments.data import load_dataset

    dataset_info(name)
    if name != "digits" and root is None:
        raise UserError(
            f"dataset {name} needs --data-root DIR (the folder holding its standard files, e.g. cifar-10-batches-py/ "
            f"or cifar-10-python.tar.gz); add --download to fetch CIFAR there, see docs/models-and-data.md"
        )
    x, y = load_dataset(name, root, split, seed=seed, download=download)
    if n is not None:
        if n <= 0:
            raise UserError(f"--n must be positive, got {n}")
        if subset == "first":
            x, y = x[:n], y[:n]
        elif subset == "random":
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(x.shape[0], generator=generator)[:n]
            x, y = x[index], y[index]
        else:
            raise UserError(f"unknown subset {subset!r}; valid: first, random")
    return x, y


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------


def _out_dir(args: argparse.Namespace, default: str | None = None) -> Path | None:
    out = args.out or default
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(to_jsonable(payload), indent=2))
    else:
        print(text)


def _eps(args: argparse.Namespace, info: dict[str, Any]) -> float:
    """``--eps``, else the eps the checkpoint was trained with, else 8/255."""
    if args.eps is not None:
        return parse_fraction(args.eps)
    recorded = (info.get("metadata") or {}).get("attack") or {}
    return float(recorded["eps"]) if isinstance(recorded.get("eps"), (int, float)) else 8 / 255


def cmd_spectral(args: argparse.Namespace) -> int:
    import torch

    from experiments.demo import spectral_analyze

    device = resolve_device(args.device)
    out = _out_dir(args)  # a bad --out fails now, not after the analysis
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed, input_shape=shape)
    example = torch.zeros((1, *info["input_shape"]), device=device)
    table = spectral_analyze()(model, example, rtol=args.rtol, progress=not args.json)
    rows = to_jsonable(table.rows)
    payload = {"target": info["name"], "source": info["source"], "input_shape": info["input_shape"], "layers": rows}
    if out is not None:
        table.to_json(out / "spectral.json")
        table.to_csv(out / "spectral.csv")
    columns = [c for c in ("name", "weight_shape", "stride", "input_size", "lower", "upper", "gap", "upper_method",
                           "ratio_to_random") if rows and c in rows[0]]
    text = (f"per-layer l2 operator norms of {info['name']} at input {'x'.join(map(str, info['input_shape']))} "
            f"(lower: certified lower bound, upper: certified upper bound, gap = upper/lower - 1, "
            f"ratio_to_random: upper / random-matrix baseline of the same kernel std):\n")
    text += format_table(rows, columns or (list(rows[0]) if rows else []))
    if out is not None:
        text += f"\nwrote {out / 'spectral.json'} and {out / 'spectral.csv'}"
    _emit(args, payload, text)
    return EXIT_OK


def cmd_bound(args: argparse.Namespace) -> int:
    from experiments.demo import bound_summary, data_lower_bounds

    device = resolve_device(args.device)
    out = _out_dir(args)  # a bad --out fails now, not after the analysis
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed, input_shape=shape)
    summary = bound_summary(model, info["input_shape"], rtol=args.rtol)
    payload: dict[str, Any] = {"target": info["name"], "input_shape": info["input_shape"], **summary}
    if args.n < 0:
        raise UserError(f"--n must be >= 0 (0 skips the data lower bounds), got {args.n}")
    if args.n > 0:
        x, y = load_eval_data(info["dataset"], root=args.data_root, n=args.n, seed=args.seed, download=args.download)
        payload["lower"] = data_lower_bounds(model, x.to(device), y.to(device), eps=_eps(args, info), seed=args.seed)
    if out is not None:
        write_json(out / "bound.json", payload)
    lines = [f"l2 Lipschitz constant of the logits of {info['name']} at input {'x'.join(map(str, info['input_shape']))}:"]
    methods = payload.get("certified_methods") or {}
    best = min(methods, key=methods.get) if methods else "?"
    rows = [(f"certified upper bound (tightest: {best})", payload.get("certified_lipschitz"), "certified_upper"),
            ("certified upper bound (layer product)", payload.get("certified_lipschitz_product"), "certified_upper")]
    rows += [(f"  {stage}", value, "certified_upper") for stage, value in (payload.get("stage_bounds") or {}).items()]
    lower = payload.get("lower") or {}
    if lower:
        eps = _eps(args, info)
        rows += [(f"max Jacobian norm on {lower.get('lower_points')} points", lower.get("empirical_lipschitz"), "lower"),
                 (f"attack ratio (l2 balls, eps={eps:.4g})", lower.get("attack_lipschitz"), "lower"),
                 (f"local Lipschitz metric (linf, eps={eps:.4g})", lower.get("local_lipschitz"), "estimate"),
                 ("stable accuracy under that attack", lower.get("stable_acc"), "")]
    for label, value, guarantee in rows:
        if value is not None:
            lines.append(f"  {label:44s} {value:12.6g}  {guarantee}")
    if out is not None:
        lines.append(f"wrote {out / 'bound.json'}")
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def cmd_theory(args: argparse.Namespace) -> int:
    from lipschitz import theory

    if args.theory_command == "optimal-config":
        payload, text = _optimal_config_report(theory, args)
    elif args.theory_command == "predict":
        depths = parse_int_list(args.depths)
        widths = parse_int_list(args.widths)
        payload = _theory_prediction(theory, depths, widths, args)
        text = format_mapping(payload)
    elif args.theory_command == "validate":
        from experiments.theory_validation import run_validation

        out = _out_dir(args, default="runs/theory-validation")
        payload = run_validation(out, quick=args.quick)
        text = f"wrote theory validation results to {out}"
    else:  # pragma: no cover - argparse enforces the choice
        raise UserError("choose one of: predict, optimal-config, validate")
    out = _out_dir(args)
    if out is not None and args.theory_command != "validate":
        write_json(out / f"theory-{args.theory_command}.json", payload)
    _emit(args, payload, text)
    return EXIT_OK


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``"2-10"`` -> (2, 10); ``"5"`` -> (5, 5)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2) or match.group(1)) < int(match.group(1)):
        raise UserError(f"cannot read {text!r} as a {what} range; write e.g. 2-10 (low-high, low >= 1)")
    return int(match.group(1)), int(match.group(2) or match.group(1))


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
    from experiments.demo import theory_prediction

    info = dataset_info(args.data)
    if len(widths) != len(depths) + 1:
        raise UserError(f"--widths needs the stem width then one width per stage ({len(depths) + 1} values), got {len(widths)}")
    return {"depths": list(depths), "widths": list(widths), "dataset": args.data,
            **theory_prediction(depths, widths, num_classes=info["num_classes"], in_channels=info["input_shape"][0],
                                input_size=info["input_shape"][-1])}


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from experiments.training import train

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
    if args.download and config.data.dataset in ("cifar10", "cifar100"):
        if not config.data.root:
            raise UserError("--download needs a dataset folder: add --set data.root=DIR")
        from experiments.data import load_cifar

        load_cifar(config.data.dataset, config.data.root, "test", download=True)  # downloads only if missing
    out = _out_dir(args, default=str(Path("runs") / config.name))
    summary = train(config, out, resume=args.resume)
    status = summary.get("status", "completed")
    text = f"training {config.name}: {status}; run folder {out}"
    final_model = (summary.get("files") or {}).get("final_model")
    if final_model:
        text += f"\nmodel: {final_model} (next: archlip eval {final_model} / archlip bound {final_model})"
    if status != "completed":
        text += f" (continue with: archlip train {args.recipe} --out {out} --resume)"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        _emit(args, summary, text)
    return EXIT_OK if status == "completed" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.evaluate import evaluate

    device = resolve_device(args.device)
    attacks = parse_attacks(args.attacks)
    model, info = load_target(args.target, data=args.data, device=device, seed=args.seed)
    eps = _eps(args, info)
    x, y = load_eval_data(info["dataset"], root=args.data_root, seed=args.seed, download=args.download)
    out = _out_dir(args, default="runs/eval")
    summary = evaluate(model, x, y, attacks, eps=eps, n=args.n, points=args.subset, seed=args.seed, out_dir=out,
                       device=device, progress=not args.json,
                       on_estimate=lambda e: print(e.describe(n_flag="--n"), file=sys.stderr, flush=True))
    payload = to_jsonable(summary)
    points = (payload.get("points") or {}).get("description", f"{payload.get('n')} points")
    lines = [f"{info['name']} on {info['dataset']} test data ({points}), {payload.get('norm', 'linf')} eps={eps:.4g}:",
             f"  {'clean accuracy':28s} {payload['clean_accuracy']:.4f}"]
    for name, value in (payload.get("robust_accuracy") or {}).items():
        lines.append(f"  {'robust accuracy ' + name:28s} {value:.4f}")
    if len(payload.get("robust_accuracy") or {}) > 1:
        lines.append(f"  {'worst case over attacks':28s} {payload['worst_case']['robust_accuracy']:.4f}")
    lines.append(f"wrote {out}")
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments import sweep

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
    )
    lines = [f"sweep {spec.name}: {result['done']} of {result['total']} runs finished "
             f"({result['ran']} ran now, {result['skipped']} skipped as already done)"]
    if result.get("commands"):
        lines += ["would run:"] + [f"  {c}" for c in result["commands"]]
    if result.get("table"):
        lines.append(f"table: {result['table']}")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    _emit(args, result, "\n".join(lines))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from experiments.report import write_report

    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file; pass the --out directory of a demo, sweep or run")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found; pass the --out directory of a demo, sweep or run")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give a directory for report.md and its figures")
    regenerate = f"archlip report {run_dir}" + (f" --out {args.out}" if args.out else "")
    path = write_report(run_dir, out_dir=Path(args.out) if args.out else None, regenerate=regenerate)
    _emit(args, {"report": str(path)}, f"report: {path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    device = resolve_device(args.device or "cpu")
    out = _out_dir(args, default="runs/demo")
    result = run_demo(out, quick=args.quick, seed=args.seed, device=str(device), verbose=not args.json, threads=args.threads)
    _emit(args, {"report": str(result["report"]), "results": str(result["results"])}, f"report: {result['report']}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, out_help: str = "directory for results", threads: int | None = None) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto, i.e. cuda when available; "
                                                      "the demo: cpu)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--out", default=None, help=out_help)
    group.add_argument("--threads", type=int, default=threads,
                       help="CPU threads for torch during this command (default: "
                            + ("torch's choice)" if threads is None else f"{threads}: tiny models gain little from more threads, "
                               "and one thread avoids the slowdown of an oversubscribed CPU)"))
    group.add_argument("--traceback", action="store_true", help="show the full traceback on errors")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, choices=tuple(DATASETS),
                        help="dataset (default: the checkpoint's own, else cifar10)")
    parser.add_argument("--data-root", default=None, help="directory with the dataset's standard files")
    parser.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="archlip", description="Certified spectral norms, Lipschitz bounds and robust training of WideResNets "
                                                 "with any per-stage depth and width.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("spectral", help="per-layer certified spectral-norm sandwich of a checkpoint or preset")
    p.add_argument("target", metavar="CKPT|PRESET")
    _data_args(p)
    p.add_argument("--input-shape", default=None, help="override the input shape, e.g. 3x32x32")
    p.add_argument("--rtol", type=float, default=0.02, help="target relative gap upper/lower - 1 (default 0.02)")
    _common(p, "directory for spectral.json and spectral.csv")
    p.set_defaults(func=cmd_spectral)

    p = sub.add_parser("bound", help="certified network/stage/block Lipschitz bounds and data lower bounds")
    p.add_argument("target", metavar="CKPT|PRESET")
    _data_args(p)
    p.add_argument("--input-shape", default=None, help="override the input shape, e.g. 3x32x32")
    p.add_argument("--n", type=int, default=128, help="data points for the lower bounds (0 to skip; default 128)")
    p.add_argument("--eps", default=None, help="radius of the attack-based lower bounds (default: the checkpoint's training eps, else 8/255)")
    p.add_argument("--rtol", type=float, default=0.02, help="per-layer sandwich tolerance (default 0.02)")
    _common(p, "directory for bound.json")
    p.set_defaults(func=cmd_bound)

    p = sub.add_parser("theory", help="random-matrix predictions and parameter-budget optimal configurations")
    tsub = p.add_subparsers(dest="theory_command", metavar="THEORY_COMMAND", parser_class=_Parser)
    tsub.required = True
    tp = tsub.add_parser("predict", help="parameter count and predicted Lipschitz bound of a per-stage config")
    tp.add_argument("--depths", default="5,5,5", help="blocks per stage (default 5,5,5)")
    tp.add_argument("--widths", default="16,320,640,512", help="stem width then stage widths (default WRN-34-R)")
    tp.add_argument("--data", default="cifar10", help=f"dataset for input channels/classes: {', '.join(DATASETS)}")
    _common(tp)
    tp = tsub.add_parser("optimal-config", help="per-stage depths/widths minimising the predicted bound under a budget")
    tp.add_argument("--budget", required=True, help="parameter budget, e.g. 68M")
    tp.add_argument("--top", type=int, default=10, help="how many ranked configurations to show (default 10)")
    tp.add_argument("--num-stages", type=int, default=3, help="number of stages (default 3)")
    tp.add_argument("--data", default="cifar10", help=f"dataset for input size/channels/classes: {', '.join(DATASETS)}")
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
    tp = tsub.add_parser("validate", help="predicted vs measured norms at initialisation (plots, Spearman)")
    tp.add_argument("--quick", action="store_true", help="a smaller grid")
    _common(tp)
    p.set_defaults(func=cmd_theory)

    p = sub.add_parser("train", help="train a recipe (YAML), resumable")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="recipe path or packaged recipe name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--download", action="store_true", help="download CIFAR-10/100 into data.root first if missing")
    _common(p, "run directory (default runs/RECIPE)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="clean and adversarial accuracy of a checkpoint")
    p.add_argument("target", metavar="CKPT|PRESET")
    p.add_argument("--attacks", default="pgd20", help="comma-separated attack presets (default pgd20), e.g. pgd20,cw20,aa")
    p.add_argument("--eps", default=None, help="perturbation radius, e.g. 8/255 (default: the checkpoint's training eps, else 8/255)")
    p.add_argument("--n", type=int, default=None, help="number of test points (default all)")
    p.add_argument("--subset", default="first", choices=("first", "random"), help="first n points in order (default) or a seeded subset")
    _data_args(p)
    _common(p, "directory for the summary JSON and per-example JSONL (default runs/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="run a grid of configurations (resumable) and aggregate them")
    p.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep path or packaged sweep name (e.g. digits-cpu)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--launcher", choices=("sequential", "torchrun"), default=None, help="override the sweep's launcher")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per torchrun job")
    p.add_argument("--run", action="append", default=None, metavar="RUN_ID", help="run only these run ids (e.g. one per cluster job)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and commands without running them")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table, plots and report")
    _common(p, "sweep directory (default runs/sweeps/NAME)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="markdown report with PNG plots from a run directory's JSON results")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _common(p, "where to write report.md (default RUN_DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="train a small WRN and its reduced-last-stage twin on digits, bound and report")
    p.add_argument("--quick", action="store_true", help="a reduced setting (used by the test suite)")
    _common(p, "output directory (default runs/demo)", threads=1)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.seed_given = any(a == "--seed" or a.startswith("--seed=") for a in argv)
    show_traceback = args.traceback or os.environ.get("ARCHLIP_TRACEBACK") == "1"
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        with torch_threads(args.threads):
            return handler(args)
    except BrokenPipeError:  # e.g. `archlip ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (*USER_ERRORS, OSError) as exc:  # OSError: e.g. --download without network, a full disk
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
