"""Export a trained model for a model zoo: ``export_robustbench(run_or_checkpoint, out_dir)``.

Writes ``NAME.pt`` (a bare ``torch.save`` state dict in the zoo's key layout: archlip's WideResNet keys are
RobustBench's ``RobustWideResNet`` ones, its ResNets use the CIFAR layout, the DM family its own) and
``NAME.json``, a model card in the spirit of RobustBench's model-info files (name, architecture, dataset,
threat model, eps, extra data, clean / AutoAttack accuracy when an ``archlip eval`` summary is given, its
``eval_summary.json`` or its folder) plus what
is needed to rebuild the model (archlip's architecture record and the loader call). Anything the zoo's stock
class would compute differently (input normalisation outside the state dict, the pre-activation shortcut
variant) is stated in the card's ``notes``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from experiments.io import RUN_FILES, run_file, write_json

FORMATS = ("robustbench",)
ZOO_CLASSES = {"wideresnet": "RobustWideResNet", "preact-resnet": "PreActResNet", "resnet": "ResNet",
               "dm-wideresnet": "DMWideResNet", "dm-preact-resnet": "DMPreActResNet"}


def _model_file(target: Path, which: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(weights file, training summary or {}, which checkpoint it is) for a run folder or a checkpoint file."""
    from experiments.sweep import measured_checkpoint

    if target.is_dir():
        summary_path = run_file(target, "train_summary")
        if not summary_path.is_file():
            raise FileNotFoundError(f"{target} holds no {summary_path.name}; pass a training run folder (archlip train "
                                    "--out) or a checkpoint file")
        summary = json.loads(summary_path.read_text())
        path, measured = measured_checkpoint(target, summary, which)
        return path, summary, measured
    if not target.is_file():
        raise FileNotFoundError(f"{target} not found; pass a training run folder or a checkpoint file")
    return target, {}, {"kind": "given file", "file": str(target), "description": f"the file {target.name}"}


def eval_summary_file(path: str | Path) -> Path:
    """An ``archlip eval`` summary given as its file or its folder; a summary named the other way (``summary.json``
    before the run files were named by what they hold, ``eval_summary.json`` now) in the same folder is found too."""
    path = Path(path)
    if path.is_dir():
        path = run_file(path, "eval_summary")
    elif not path.exists() and path.name in RUN_FILES["eval_summary"]:
        path = run_file(path.parent, "eval_summary")
    if not path.is_file():
        raise FileNotFoundError(f"no archlip eval summary at {path}; pass the {RUN_FILES['eval_summary'][0]} (or the "
                                "folder) that archlip eval --out DIR wrote")
    return path


def _accuracies(eval_summary: Path | None) -> dict[str, Any]:
    if eval_summary is None:
        return {"clean_acc": None, "autoattack_acc": None, "evaluation": "not given: run archlip eval CKPT --attacks aa "
                                                                          "--out DIR and pass --eval DIR/eval_summary.json"}
    eval_summary = eval_summary_file(eval_summary)
    data = json.loads(eval_summary.read_text())
    robust = data.get("robust_accuracy") or {}
    aa = next((v for k, v in robust.items() if k == "aa" or k.startswith("aa-")), None)
    percent = (lambda v: None if v is None else round(100 * float(v), 2))  # noqa: E731 - the zoo reports percent
    return {"clean_acc": percent(data.get("clean_accuracy")), "autoattack_acc": percent(aa),
            "evaluation": {"file": str(eval_summary), "n": data.get("n"), "eps": data.get("eps"),
                           "attacks": sorted(robust), "points": (data.get("points") or {}).get("description")}}


def _variant_name(arch: dict[str, Any]) -> str | None:
    """A registry preset that settles what the keys cannot (pre-act shortcut, DM activation); None if not needed."""
    from experiments.models.registry import PRESETS, family_of

    if arch["family"] not in ("preact-resnet", "dm-wideresnet", "dm-preact-resnet"):
        return None
    want = {"shortcut": arch.get("shortcut", "preact")} if arch["family"] == "preact-resnet" else \
        {"activation": arch.get("activation", "relu")}
    for name, (cls, preset) in PRESETS.items():
        if family_of(cls) == arch["family"] and all(preset.get(k, "preact" if k == "shortcut" else "relu") == v
                                                    for k, v in want.items()):
            return name
    raise ValueError(f"no registry preset of family {arch['family']} with {want}; the zoo layout cannot record it")


def _extra_data(target: Path) -> bool | None:
    """Whether the run trained with extra (pseudo-labelled) data; None when not known (a bare checkpoint)."""
    config = target / "resolved_config.yaml"
    if not config.is_file():
        return None
    from experiments.config import load_config

    return bool(load_config(config).data.extra_data)


def _notes(arch: dict[str, Any]) -> list[str]:
    notes = []
    if arch.get("family") in ("wideresnet", "resnet", "preact-resnet") and arch.get("normalize"):
        notes.append(f"the model normalises its inputs inside (mean {arch['normalize'][0]}, std {arch['normalize'][1]}); "
                     "the zoo's stock class does not: wrap it with that normalisation")
    if arch.get("family") == "preact-resnet" and arch.get("shortcut", "preact") == "preact":
        notes.append("the shortcut conv reads the pre-activation (Rice et al./kuangliu); RobustBench's stock PreActBlock "
                     "applies it to the raw block input: use a block with the former")
    if arch.get("family") == "wideresnet" and arch.get("equal_width_shortcut") == "preact":
        notes.append("equal-width strided blocks apply the shortcut to the pre-activation (archlip format 1), unlike "
                     "RobustWideResNet")
    if arch.get("activation", "relu") != "relu" and arch.get("family") in ("wideresnet", "resnet", "preact-resnet"):
        notes.append(f"activation {arch['activation']}: the zoo's stock class uses ReLU")
    return notes


def export_robustbench(target: str | Path, out_dir: str | Path, *, name: str | None = None, which: str = "best",
                       eval_summary: str | Path | None = None, model: str | None = None) -> dict[str, Path]:
    """Write ``NAME.pt`` (state dict) and ``NAME.json`` (model card) into ``out_dir``; returns their paths.

    ``target``: a training run folder (its selected model, ``which="best"``, or the final one) or a checkpoint
    file. ``model``: a registry name for checkpoints whose keys cannot settle the variant.
    """
    from experiments.checkpoints import load_checkpoint
    from experiments.models import model_config

    target, out_dir = Path(target), Path(out_dir)
    path, summary, measured = _model_file(target, which)
    loaded = load_checkpoint(path, model=model)
    arch = model_config(loaded.model)
    name = name or (target.name if target.is_dir() else path.stem)
    meta = loaded.metadata
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}, weights)
    variant = _variant_name(arch)
    reloaded = load_checkpoint(weights, model=variant)  # the file alone (plus the variant name) rebuilds the model
    x = torch.rand(2, arch.get("in_channels", 3), 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(reloaded.model(x), loaded.model(x)):
            raise RuntimeError(f"the exported {weights} does not reproduce the model (architecture not recoverable "
                               "from its keys); export it in archlip's own format instead")
    attack = meta.get("attack") or {}
    card = {
        "name": name, "format": "robustbench", "state_dict": weights.name,
        "architecture": f"{ZOO_CLASSES.get(arch['family'], arch['family'])} ({arch.get('name') or 'custom'})",
        "zoo_class": ZOO_CLASSES.get(arch["family"]), "arch": arch,
        "dataset": meta.get("dataset"), "threat_model": {"linf": "Linf", "l2": "L2"}.get(attack.get("norm"), attack.get("norm")),
        "eps": attack.get("eps"), "additional_data": bool((summary.get("config") or {}).get("extra_data"))
        if summary else None, "number_forward_passes": 1,
        **_accuracies(Path(eval_summary) if eval_summary else None),
        "training": {"recipe": meta.get("recipe"), "method": meta.get("method"), "epoch": meta.get("epoch"),
                     "checkpoint": measured.get("description")},
        "load_with": f"experiments.checkpoints.load_checkpoint({weights.name!r}"
                     + (f", model={variant!r})" if variant else ")"),
        "notes": _notes(arch),
    }
    card_path = out_dir / f"{name}.json"
    write_json(card_path, card)
    return {"weights": weights, "card": card_path}
