"""What a command analyses: a checkpoint file (or a folder holding one) or a model preset, resolved to an
eval-mode model on a device together with its input shape, dataset and provenance (:func:`load_target`)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from experiments.datasets import DATASETS, dataset_info
from experiments.errors import UserError

_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".tar")


def build_user_model(spec: str, kwargs_json: str | None = None):
    """``package.module:Class`` (importable, or from the working directory) or ``path/to/file.py:Class``, built
    with the keyword arguments of the JSON object ``kwargs_json``."""
    import importlib
    import importlib.util

    from torch import nn

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--model must look like package.module:Class or path/to/file.py:Class, got {spec!r}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"--model-kwargs is not valid JSON ({exc}); e.g. --model-kwargs '{{\"depth\": 28}}'") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--model-kwargs must be a JSON object of keyword arguments, got {kwargs_json}")
    if module_name.endswith(".py"):
        file = Path(module_name).expanduser()
        if not file.is_file():
            raise UserError(f"--model file {file} not found")
        module_spec = importlib.util.spec_from_file_location(f"archlip_user_model_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UserError(f"--model: cannot import {module_name!r} ({exc}); run from the folder that holds it, "
                            f"set PYTHONPATH, or pass path/to/file.py:{attr}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--model: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    try:
        model = obj(**kwargs)
    except TypeError as exc:
        raise UserError(f"--model: cannot build {spec} with --model-kwargs {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model: {spec}(...) returned a {type(model).__name__}, not an nn.Module")
    return model


def load_target(target: str, *, data: str | None, device, seed: int = 0, input_shape: tuple[int, ...] | None = None,
                model: str | None = None, model_kwargs: str | None = None):
    """Resolve ``CKPT|PRESET`` to an eval-mode model on ``device``; ``model`` is either a registry name for the
    architecture a checkpoint's keys cannot settle (a pre-activation ResNet's shortcut, a DM model's activation)
    or a user class ``package.module:Class`` (built with ``model_kwargs``, JSON).

    Returns ``(model, info)`` with ``info`` holding ``source`` ("checkpoint"/"preset"), ``name``, ``dataset``
    and ``input_shape``. ``data=None`` means the checkpoint's recorded dataset, else cifar10. A preset is
    built with random weights drawn under ``seed``. A ``model`` of the form ``package.module:Class``: build that
    class with ``model_kwargs`` (JSON) and load the checkpoint strictly into it, as it is.
    """
    import torch

    from experiments import models as model_zoo

    if data is not None:
        dataset_info(data)
    model_spec = model if model is not None and ":" in model else None
    model_name = model if model is not None and ":" not in model else None
    if model_name is not None and model_name not in model_zoo.list_models():
        raise UserError(f"--model {model_name!r} is neither an archlip architecture (archlip list presets) nor a "
                        "class given as package.module:Class or path/to/file.py:Class")
    if model_kwargs is not None and model_spec is None:
        raise UserError("--model-kwargs needs --model package.module:Class")
    path = Path(target)
    if model_spec is not None and not path.exists():
        raise FileNotFoundError(f"checkpoint {target!r} not found; --model loads a checkpoint file into your class")
    if path.exists():
        if path.is_dir():
            path = _checkpoint_in_dir(path)
        from experiments.checkpoints import load_checkpoint, load_checkpoint_into

        _check_checkpoint_format(path)
        if model_spec is None:
            loaded = load_checkpoint(path, model=model_name)
        else:
            loaded = load_checkpoint_into(path, build_user_model(model_spec, model_kwargs))
        model, metadata = loaded.model, dict(loaded.metadata or {})
        recorded = metadata.get("dataset") if metadata.get("dataset") in DATASETS else None
        if data is not None and recorded is not None and data != recorded:
            raise UserError(f"{path} was trained on {recorded} but --data {data} was given; drop --data or pass --data {recorded}")
        data = data or recorded or "cifar10"
        shape = input_shape or _metadata_input_shape(metadata) or DATASETS[data]["input_shape"]
        result = {"source": "checkpoint", "name": str(path), "dataset": data, "input_shape": tuple(shape),
                  "metadata": metadata, "weights": "trained (checkpoint)"}
        if model_spec is not None:
            result["model_class"] = model_spec
    else:
        presets = list(model_zoo.list_models())
        if target not in presets:
            _zoo_hint(target)
            if target.endswith(_CKPT_SUFFIXES) or os.sep in target:
                raise FileNotFoundError(f"checkpoint {target!r} not found; check the path (or name a preset: {', '.join(presets)})")
            raise UserError(f"{target!r} is neither a checkpoint file nor a model preset; presets: {', '.join(presets)} "
                            f"(archlip list presets)")
        if model_name is not None:
            raise UserError(f"--model names the architecture of a checkpoint file; {target!r} is already a preset: drop --model")
        data = data or "cifar10"
        torch.manual_seed(seed)
        shape = tuple(input_shape or DATASETS[data]["input_shape"])
        model = model_zoo.create_model(target, num_classes=DATASETS[data]["num_classes"], in_channels=shape[0])
        result = {"source": "preset", "name": target, "dataset": data, "input_shape": shape, "metadata": {},
                  "seed": seed, "weights": f"random (preset, seed {seed}; not a trained model)"}
    model = model.to(device).eval()
    _check_input_shape(model, result["input_shape"], device)
    return model, result


#: RobustBench model-zoo names: AuthorYearKeyword[_variant], e.g. Huang2021Exploring_WRN-34-R, Carmon2019Unlabeled.
_ZOO_NAME = re.compile(r"^(?:[A-Z][A-Za-z]+(?:19|20)[0-9]{2}[A-Z][A-Za-z0-9]*(?:_[A-Za-z0-9.-]+)*|Standard(?:_R50)?)$")


def _zoo_hint(target: str) -> None:
    """A model-zoo name given where a checkpoint file is expected: say how to get the file."""
    name = Path(target).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in _CKPT_SUFFIXES else name
    if _ZOO_NAME.match(stem):
        raise FileNotFoundError(
            f"{target!r} is not a file here; it looks like the RobustBench model {stem!r}: archlip reads its checkpoint "
            f"file, so download it first (from the RobustBench model zoo, github.com/RobustBench/robustbench, or with "
            f"robustbench's load_model(model_name={stem!r}, model_dir='models')) and pass the path, e.g. "
            f"models/cifar10/Linf/{stem}.pt --data cifar10")


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
