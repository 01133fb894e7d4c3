"""Name-keyed model registry (timm style): typed entrypoints, ``create_model``, ``list_models``.

Every preset is an entrypoint function ``f(num_classes=10, **overrides) -> nn.Module``; overrides are the
model constructor's keyword arguments (e.g. ``depths``, ``widths``, ``activation``, ``in_channels``).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

from experiments.models.dm import DMPreActResNet, DMWideResNet
from experiments.models.resnet import PreActResNet, ResNet
from experiments.models.wideresnet import WideResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

FAMILIES: dict[str, type[nn.Module]] = {
    "wideresnet": WideResNet,
    "resnet": ResNet,
    "preact-resnet": PreActResNet,
    "dm-wideresnet": DMWideResNet,
    "dm-preact-resnet": DMPreActResNet,
}

# name -> (family, preset constructor arguments)
WRN_PRESETS: dict[str, dict[str, Any]] = {
    "wrn-16-1": {"depths": (2, 2, 2), "widths": (16, 16, 32, 64)},
    "wrn-16-4": {"depths": (2, 2, 2), "widths": (16, 64, 128, 256)},
    "wrn-28-4": {"depths": (4, 4, 4), "widths": (16, 64, 128, 256)},
    "wrn-28-10": {"depths": (4, 4, 4), "widths": (16, 160, 320, 640)},
    "wrn-34-10": {"depths": (5, 5, 5), "widths": (16, 160, 320, 640)},
    "wrn-34-12": {"depths": (5, 5, 5), "widths": (16, 192, 384, 768)},
    "wrn-34-20": {"depths": (5, 5, 5), "widths": (16, 320, 640, 1280)},
    "wrn-34-r": {"depths": (5, 5, 5), "widths": (16, 320, 640, 512)},
    "wrn-70-16": {"depths": (11, 11, 11), "widths": (16, 256, 512, 1024)},
    # CPU-sized presets (train in seconds on 1x8x8 digits with in_channels=1); "-r" reduces the last stage
    "wrn-tiny": {"depths": (1, 1, 1), "widths": (8, 16, 32, 64)},
    "wrn-tiny-r": {"depths": (1, 1, 1), "widths": (8, 16, 32, 32)},
}
RESNET_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "resnet-18": (ResNet, {"num_blocks": (2, 2, 2, 2), "widths": (64, 128, 256, 512)}),
    "preact-resnet-18": (PreActResNet, {"num_blocks": (2, 2, 2, 2), "widths": (64, 128, 256, 512)}),
    "resnet-tiny": (ResNet, {"num_blocks": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}),
    "preact-resnet-tiny": (PreActResNet, {"num_blocks": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}),
    # the same keys with the shortcut conv on the raw block input (fast_adversarial, RobustBench's PreActBlock)
    "preact-resnet-18-input-shortcut": (PreActResNet, {"num_blocks": (2, 2, 2, 2), "widths": (64, 128, 256, 512),
                                                       "shortcut": "input"}),
    "preact-resnet-tiny-input-shortcut": (PreActResNet, {"num_blocks": (1, 1, 1, 1), "widths": (8, 16, 32, 64),
                                                         "shortcut": "input"}),
}
# DeepMind-style families (Gowal et al. 2020, Rebuffi et al. 2021): each with ReLU and with a "-silu" twin
_DM_SIZES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "dm-wrn-28-10": (DMWideResNet, {"depths": (4, 4, 4), "widths": (16, 160, 320, 640)}),
    "dm-wrn-34-10": (DMWideResNet, {"depths": (5, 5, 5), "widths": (16, 160, 320, 640)}),
    "dm-wrn-34-20": (DMWideResNet, {"depths": (5, 5, 5), "widths": (16, 320, 640, 1280)}),
    "dm-wrn-70-16": (DMWideResNet, {"depths": (11, 11, 11), "widths": (16, 256, 512, 1024)}),
    "dm-wrn-106-16": (DMWideResNet, {"depths": (17, 17, 17), "widths": (16, 256, 512, 1024)}),
    "dm-wrn-tiny": (DMWideResNet, {"depths": (1, 1, 1), "widths": (8, 16, 32, 64)}),
    "dm-preact-resnet-18": (DMPreActResNet, {"num_blocks": (2, 2, 2, 2), "widths": (64, 128, 256, 512)}),
    "dm-preact-resnet-34": (DMPreActResNet, {"num_blocks": (3, 4, 6, 3), "widths": (64, 128, 256, 512)}),
    "dm-preact-resnet-tiny": (DMPreActResNet, {"num_blocks": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}),
}
DM_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    name + suffix: (cls, {**sizes, "activation": act})
    for name, (cls, sizes) in _DM_SIZES.items() for suffix, act in (("", "relu"), ("-silu", "silu"))
}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding an entrypoint under ``name``; a duplicate name is an error."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _check_overrides(cls: type[nn.Module], overrides: dict[str, Any], name: str) -> None:
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"model {name!r} got unknown argument(s) {unknown}; valid arguments: {', '.join(valid)}")


def _preset_entrypoint(name: str, cls: type[nn.Module], preset: dict[str, Any]) -> Callable[..., nn.Module]:
    def entrypoint(num_classes: int = 10, **overrides: Any) -> nn.Module:
        _check_overrides(cls, overrides, name)
        model = cls(**{**preset, "num_classes": num_classes, **overrides})
        model.model_name = name
        return model

    entrypoint.__name__ = name.replace("-", "_")
    entrypoint.__doc__ = f"{name}: {cls.__name__}({', '.join(f'{k}={v}' for k, v in preset.items())})."
    return entrypoint


PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{name: (WideResNet, preset) for name, preset in WRN_PRESETS.items()}, **RESNET_PRESETS, **DM_PRESETS}
for _name, (_cls, _preset) in PRESETS.items():
    register_model(_name)(_preset_entrypoint(_name, _cls, _preset))


def family_of(cls: type[nn.Module]) -> str | None:
    """The ``FAMILIES`` key of a model class (None for classes outside the families)."""
    return next((family for family, c in FAMILIES.items() if c is cls), None)


def preset_spec(name: str) -> tuple[str, dict[str, Any]] | None:
    """``(family, constructor arguments)`` of a built-in preset; None for other registered names."""
    if name not in PRESETS:
        return None
    cls, preset = PRESETS[name]
    return family_of(cls), dict(preset)


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("wrn-34-r")`` or
    ``create_model("wrn-tiny", in_channels=1, activation="silu")``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **overrides)


@contextlib.contextmanager
def on_meta_device() -> Iterator[None]:
    """Models built inside the block live on torch's meta device and skip ``torch.nn.init``: the constructor's
    argument checks and the parameter shapes only, in milliseconds, with no memory and no random numbers drawn."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def describe_presets(num_classes: int = 10, in_channels: int = 3) -> list[dict[str, Any]]:
    """One row per registered model: name, family, per-stage depths (blocks) and widths, parameter count
    (for ``num_classes`` outputs and ``in_channels`` inputs). Built on the meta device: no memory, no init."""
    rows = []
    for name in list_models():
        with on_meta_device():
            model = create_model(name, num_classes=num_classes, in_channels=in_channels)
        config = model.arch_config() if hasattr(model, "arch_config") else {}
        depths = config.get("depths", config.get("num_blocks"))
        rows.append({"name": name, "family": config.get("family", type(model).__name__),
                     "depths": list(depths) if depths is not None else None,
                     "widths": list(config["widths"]) if config.get("widths") is not None else None,
                     "params": int(sum(p.numel() for p in model.parameters()))})
    return rows


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``model.arch_config()`` (as stored in checkpoint metadata)."""
    config = dict(config)
    family = config.pop("family", None)
    name = config.pop("name", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in config; expected one of: {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    _check_overrides(cls, config, family)
    model = cls(**config)
    model.model_name = name or family
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """``arch_config()`` plus the registry name, the architecture record stored with checkpoints."""
    if not hasattr(model, "arch_config"):
        raise TypeError(f"{type(model).__name__} has no arch_config(); only archlip models can be described")
    return {"name": getattr(model, "model_name", None), **model.arch_config()}
