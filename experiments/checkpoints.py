"""Safe, strict checkpoint reading and writing.

Reads RobustBench files (``{'state_dict': ...}`` or a bare state_dict), the paper code's files
(``{'model_state_dict': ..., 'epoch': ...}``), ``module.``/``model.``/``_orig_mod.`` prefixes, safetensors,
and the classic TRADES WideResNet layout (``conv1``, ``block{1,2,3}``; TRADES' unused ``sub_block1`` is
dropped with a note), CIFAR ResNet-18 and pre-activation ResNet-18 (``bn`` or ``bn_last``), the DeepMind-style
WideResNet / PreActResNet, and model-zoo ``mu``/``sigma`` normalisation buffers. Where the keys cannot tell a
family's variants apart, a registry name must choose (never a silent guess). Pickles are read with ``torch.load(weights_only=True)`` only: a file that would run
code is refused. Loading is strict: any mismatch raises one readable diff; NaN/Inf weights name the tensor.

Our own format: ``NAME.safetensors`` (weights) + ``NAME.json`` (metadata: ``arch``, plus the caller's
config, metrics, ...), written atomically.
"""
from __future__ import annotations

import datetime
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from experiments.models import model_config, model_from_config

LOG = logging.getLogger("archlip.checkpoints")
FORMAT = "archlip-checkpoint"
FORMAT_VERSION = 2  # 2: equal-width strided WRN shortcuts read the raw input (paper code)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema")
PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes differ from the model's (message: the diff)."""


@dataclass
class LoadedCheckpoint:
    """A loaded model (eval mode) with its metadata; unpacks as ``model, metadata = load_checkpoint(...)``."""

    model: nn.Module
    metadata: dict[str, Any]
    source_format: str
    layout: str
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.metadata))


# ------------------------------------------------------------------------------------------------ reading


def metadata_path(weights_path: str | Path) -> Path:
    """The JSON sidecar of a weights file: ``x.safetensors`` -> ``x.json``."""
    return Path(weights_path).with_suffix(".json")


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{sidecar}: metadata is not valid JSON ({exc}); fix or delete the sidecar file") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar}: metadata must be a JSON object")
    return meta


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand [^\s]+", str(exc))
            detail = f" ({found.group(1) or found.group(0)})" if found else ""
            raise ValueError(
                f"{path}: refusing to unpickle: the file references objects beyond tensors and containers{detail}, "
                "so loading it could run code; re-save its state_dict (torch.save(model.state_dict(), ...)) "
                "from a trusted environment"
            ) from None
        raise ValueError(f"{path}: not a readable checkpoint (corrupted pickle: {_first_line(exc)})") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/IndexError/... for foreign or cut files
        raise ValueError(
            f"{path}: not a readable checkpoint (truncated, or not a PyTorch/safetensors file): {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _json_scalars(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Raw ``(state_dict, metadata, source_format)`` of a checkpoint file, without any key changes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; check the path")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {_first_line(exc)}") from None
        meta = _read_sidecar(path)
        return state, meta, FORMAT if meta.get("format") == FORMAT else "safetensors"
    obj = _torch_load(path)
    if _is_state_dict(obj):
        return dict(obj), {}, "torch-bare"
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key]), _json_scalars(obj), f"torch-{key}"
        raise ValueError(
            f"{path}: no state_dict found; expected a dict of tensors or one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}, found keys {sorted(map(str, obj))[:10]}"
        )
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")


# ------------------------------------------------------------------------------------------------ key layouts

_CLASSIC_BLOCK = re.compile(r"^block(\d+)\.")
LAYOUTS = ("robustwideresnet", "classic-wrn", "cifar-resnet", "cifar-preact-resnet", "dm-wideresnet",
           "dm-preact-resnet", "unknown")
# input-normalisation buffers that model-zoo wrappers keep in their state dicts (outside the DM layouts)
NORM_BUFFER_NAMES = (("mu", "sigma"), ("mean", "std"))


class AmbiguousArchitectureError(ValueError):
    """The keys cannot tell two variants of a family apart; the message says how to name one."""


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) shared by every key."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """One of ``LAYOUTS``: RobustBench/paper WRN, classic TRADES WRN, CIFAR ResNet (plain: stem ``bn1``; pre-act:
    none, ``bn``/``bn_last`` before ``linear``), the DeepMind-style WRN / PreActResNet, or ``"unknown"``."""
    if "stem_conv.weight" in state and any(k.startswith("blocks.") for k in state):
        return "robustwideresnet"
    if "init_conv.weight" in state and any(k.startswith("layer.") for k in state):
        return "dm-wideresnet"
    if "conv_2d.weight" in state and any(k.startswith("layer_") for k in state):
        return "dm-preact-resnet"
    if "conv1.weight" in state and any(_CLASSIC_BLOCK.match(k) for k in state):
        return "classic-wrn"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "cifar-resnet" if "bn1.weight" in state else "cifar-preact-resnet"
    return "unknown"


def classic_to_robustwideresnet(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map the classic TRADES WideResNet keys onto ours; TRADES' unused ``sub_block1`` is dropped."""
    out, notes, dropped = {}, [], []
    for key, value in state.items():
        if key.startswith("sub_block1."):
            dropped.append(key)
            continue
        key = _CLASSIC_BLOCK.sub(lambda m: f"blocks.{int(m.group(1)) - 1}.", key)
        out["stem_conv." + key[len("conv1."):] if key.startswith("conv1.") else key] = value
    if dropped:
        notes.append(f"dropped TRADES' unused sub_block1 ({len(dropped)} tensors; it is never called in forward)")
    return out, notes


def canonical_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Strip prefixes and map known layouts onto archlip's names: ``(state_dict, layout, notes)``."""
    state = strip_prefixes(state)
    layout = detect_layout(state)
    notes: list[str] = []
    if layout == "classic-wrn":
        state, notes = classic_to_robustwideresnet(state)
    if layout == "cifar-preact-resnet" and any(k.startswith("bn_last.") for k in state):
        state = {("bn." + k[len("bn_last."):] if k.startswith("bn_last.") else k): v for k, v in state.items()}
        notes.append("renamed the final batch norm bn_last -> bn")
    return state, layout, notes


def split_normalization(state: Mapping[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list | None]:
    """Take model-zoo input-normalisation buffers (``mu``/``sigma`` or ``mean``/``std``) out of a non-DM state dict.

    Returns ``(state without them, [mean, std] lists or None)``; the DM layouts keep theirs (they are model keys).
    """
    state = dict(state)
    if layout.startswith("dm-"):
        return state, None
    for mean_key, std_key in NORM_BUFFER_NAMES:
        if mean_key in state and std_key in state:
            mean, std = state.pop(mean_key).flatten(), state.pop(std_key).flatten()
            if mean.numel() != std.numel() or not bool((std > 0).all()):
                raise ValueError(f"normalisation buffers {mean_key!r}/{std_key!r} have shapes {tuple(mean.shape)}, "
                                 f"{tuple(std.shape)} or a non-positive std; the checkpoint is not a known layout")
            return state, [mean.double().tolist(), std.double().tolist()]
    return state, None


def check_finite(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN or Inf."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                kinds = " and ".join(k for k, m in (("NaN", torch.isnan(value)), ("Inf", torch.isinf(value))) if m.any())
                raise ValueError(
                    f"{source}: tensor {key!r} contains {kinds} ({int(bad.sum())} of {value.numel()} entries); "
                    "the weights are corrupted or training diverged"
                )


# ------------------------------------------------------------------------------------------------ architecture


def _stage_depths(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Number of blocks ``j`` per stage ``i`` from keys matching ``pattern`` (groups i, j)."""
    found: dict[int, set[int]] = {}
    for key in state:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(found)
    if not stages or stages != list(range(stages[0], stages[0] + len(stages))):
        raise ValueError(f"cannot infer the architecture: stages {stages} are missing or not contiguous")
    for i in stages:
        if sorted(found[i]) != list(range(len(found[i]))):
            raise ValueError(f"cannot infer the architecture: stage {i} has non-contiguous blocks {sorted(found[i])}")
    return [len(found[i]) for i in stages]


def _out(state: Mapping[str, torch.Tensor], key: str) -> int:
    return int(state[key].shape[0])


def _wrn_structure(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    depths = _stage_depths(state, r"^blocks\.(\d+)\.layer\.(\d+)\.conv1\.weight$")
    widths = [_out(state, "stem_conv.weight")] + [_out(state, f"blocks.{i}.layer.0.conv1.weight") for i in range(len(depths))]
    # a shortcut conv means stride 2 unless the width changes in the first stage (the only stride-1 place it occurs)
    strides = [2 if f"blocks.{i}.layer.0.convShortcut.weight" in state and (i > 0 or widths[0] == widths[1]) else 1
               for i in range(len(depths))]
    return {"family": "wideresnet", "depths": depths, "widths": widths, "strides": strides,
            "num_classes": _out(state, "fc.weight"), "in_channels": int(state["stem_conv.weight"].shape[1])}


def _cifar_resnet_structure(state: Mapping[str, torch.Tensor], preact: bool) -> dict[str, Any]:
    num_blocks = _stage_depths(state, r"^layer(\d+)\.(\d+)\.conv1\.weight$")
    if len(num_blocks) != 4:
        raise ValueError(f"expected 4 stages layer1..layer4, found {len(num_blocks)}")
    return {"family": "preact-resnet" if preact else "resnet", "num_blocks": num_blocks,
            "widths": [_out(state, f"layer{k}.0.conv1.weight") for k in range(1, 5)],
            "num_classes": _out(state, "linear.weight"), "in_channels": int(state["conv1.weight"].shape[1])}


def _dm_structure(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, Any]:
    if layout == "dm-wideresnet":
        depths = _stage_depths(state, r"^layer\.(\d+)\.block\.(\d+)\.conv_0\.weight$")
        stem = "init_conv.weight"
        sizes = {"depths": depths, "widths": [_out(state, stem)] + [_out(state, f"layer.{i}.block.0.conv_0.weight")
                                                                    for i in range(len(depths))]}
    else:
        depths = _stage_depths(state, r"^layer_(\d+)\.(\d+)\.conv_2d_1\.weight$")
        stem = "conv_2d.weight"
        sizes = {"num_blocks": depths, "widths": [_out(state, f"layer_{i}.0.conv_2d_1.weight") for i in range(len(depths))]}
    config = {"family": layout, **sizes, "strides": [1] + [2] * (len(depths) - 1),
              "num_classes": _out(state, "logits.weight"), "in_channels": int(state[stem].shape[1])}
    if "mean" in state and "std" in state and not state["mean"].is_meta:
        config["normalize"] = [state["mean"].flatten().double().tolist(), state["std"].flatten().double().tolist()]
    return config


def _structure(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """Family and sizes from the keys and shapes of a canonical state dict."""
    try:
        if layout in ("robustwideresnet", "classic-wrn"):
            return _wrn_structure(state)
        if layout in ("cifar-resnet", "cifar-preact-resnet"):
            return _cifar_resnet_structure(state, preact=layout == "cifar-preact-resnet")
        if layout.startswith("dm-"):
            return _dm_structure(state, layout)
    except KeyError as exc:
        raise ValueError(f"cannot infer the architecture: {layout} state_dict lacks {exc.args[0]!r}") from None
    raise ValueError(
        "keys match no known layout (RobustBench WideResNet stem_conv/blocks, classic WRN conv1/block1, CIFAR ResNet "
        f"conv1/layer1, DeepMind-style init_conv/layer or conv_2d/layer_0); first keys: {list(state)[:5]}"
    )


_STRUCTURAL = ("depths", "widths", "strides", "num_blocks", "num_classes", "in_channels")


def _preset_name(config: dict[str, Any]) -> str | None:
    """The registry preset whose every argument equals ``config`` (a missing variant counts as its default)."""
    import inspect

    from experiments.models.registry import PRESETS, family_of

    n = len(config.get("depths") or config.get("num_blocks") or [])
    if config.get("strides", [1] + [2] * (n - 1)) != [1] + [2] * (n - 1):
        return None
    for name, (cls, preset) in PRESETS.items():
        if family_of(cls) != config["family"]:
            continue
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        if all((list(v) if isinstance(v, tuple) else v) == config.get(k, defaults.get(k)) for k, v in preset.items()):
            return name
    return None


def _ambiguity(config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> str | None:
    """Why the keys cannot settle the variant of this family (None when they can)."""
    family = config["family"]
    if family == "preact-resnet" and any(".shortcut." in k for k in state):
        base = "preact-resnet-18" if config["widths"] == [64, 128, 256, 512] else "preact-resnet-tiny"
        return (f"pre-activation ResNet keys do not tell whether the shortcut conv reads the pre-activation "
                f"(Rice et al., kuangliu: e.g. {base!r}) or the raw block input (fast_adversarial, RobustBench: "
                f"{base + '-input-shortcut'!r})")
    if family.startswith("dm-"):
        base = _preset_name({**config, "activation": "relu"}) or ("dm-wrn-28-10" if family == "dm-wideresnet"
                                                                  else "dm-preact-resnet-18")
        return (f"DeepMind-style {family} checkpoints do not store their activation: ReLU (e.g. {base!r}) or "
                f"Swish/SiLU ({base + '-silu'!r})")
    return None


def _apply_model_name(config: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """The preset ``name`` supplies the variants the keys cannot (activation, shortcut); sizes stay the keys'."""
    from experiments.models.registry import list_models, preset_spec

    spec = preset_spec(name)
    if spec is None:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; name a built-in preset: {known}")
    family, preset = spec
    if family != config["family"]:
        raise ValueError(f"model {name!r} is a {family} but the checkpoint holds a {config['family']}; "
                         "name a preset of that family")
    merged = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.items()}, **config}
    notes = []
    differing = [k for k in preset if k in _STRUCTURAL and list(preset[k]) != config.get(k)]
    if differing:
        notes.append(f"sizes ({', '.join(differing)}) taken from the checkpoint, variant from {name!r}")
    merged["name"] = name
    return merged, notes


def infer_architecture(state_dict: Mapping[str, torch.Tensor], match_preset: bool = False,
                       model: str | None = None) -> dict[str, Any]:
    """Recover the architecture (``model.arch_config()`` form) from keys and shapes alone.

    WideResNets in either layout give ``depths``, ``widths``, ``num_classes``, ``in_channels`` and ``strides``.
    Strides are not stored in weights: a stage whose first block has a shortcut conv gets stride 2 (stride 1 in
    a first stage that changes width), the others stride 1. CIFAR ResNet-18-style and DeepMind-style layouts
    give ``num_blocks``/``depths`` and ``widths`` (DM: strides 1, 2, 2, ... as in the reference). Input
    normalisation comes from ``mu``/``sigma`` or ``mean``/``std`` buffers when present. Activation and dropout
    have no weights: WideResNet/ResNet layouts take the defaults (ReLU); where the keys cannot tell a
    family's variants apart (a pre-activation ResNet's shortcut input, a DM model's activation) the registry
    name ``model`` must say which, else :class:`AmbiguousArchitectureError`. ``match_preset=True`` adds the
    registry ``name`` of an identical preset (or ``model``).
    """
    state, layout, _ = canonical_state_dict(state_dict)
    state, normalize = split_normalization(state, layout)
    config = _inferred_config(state, layout, normalize, model, [])
    if not match_preset:
        config.pop("name", None)
    return config


def _inferred_config(state: Mapping[str, torch.Tensor], layout: str, normalize: list | None, model: str | None,
                     notes: list[str]) -> dict[str, Any]:
    """Sizes from the keys, normalisation from the buffers, variants from the name ``model`` (else refused when
    the keys cannot settle them); ``name`` is ``model`` or an identical preset."""
    config = _structure(state, layout)
    if normalize is not None:
        config["normalize"] = normalize
    if model is not None:
        config, extra = _apply_model_name(config, model)
        notes += extra
        return config
    why = _ambiguity(config, state)
    if why:
        raise AmbiguousArchitectureError(f"{why}; choose one: load_checkpoint(path, model=NAME) or --model NAME")
    config["name"] = _preset_name(config)
    return config


# ------------------------------------------------------------------------------------------------ strict loading


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def state_dict_diff(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """A readable diff (missing, unexpected, wrong-shape keys) or ``None`` when they match exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    lines = [f"checkpoint does not match {type(model).__name__}: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(shapes)} wrong-shape keys"]
    if missing:
        lines.append(f"  missing:     {_short(missing)}")
    if unexpected:
        lines.append(f"  unexpected:  {_short(unexpected)}")
    if shapes:
        lines.append(f"  wrong shape: {_short(shapes, 4)}")
    return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; any key or shape mismatch raises :class:`CheckpointMismatchError`."""
    diff = state_dict_diff(model, state)
    if diff is not None:
        raise CheckpointMismatchError(diff)
    model.load_state_dict(state, strict=True)


def _model_normalization(model: nn.Module) -> list | None:
    norm = getattr(model, "normalize", None)
    if norm is None or not hasattr(norm, "mean"):
        return None
    return [norm.mean.flatten().double().tolist(), norm.std.flatten().double().tolist()]


def _check_normalization(model: nn.Module, normalize: list | None, path: Path) -> None:
    """The buffers a model-zoo state dict carries must be the model's own input normalisation."""
    if normalize is None:
        return
    own = _model_normalization(model)
    if own is None or len(own[0]) != len(normalize[0]) or any(
            abs(a - b) > 1e-6 for pair in zip(own, normalize) for a, b in zip(*pair)):
        raise CheckpointMismatchError(
            f"{path}: the checkpoint normalises its inputs with mean {normalize[0]} and std {normalize[1]}, but the "
            f"given {type(model).__name__} normalises with {own}; build it with normalize=(mean, std) "
            "(or load without a model to build it from the checkpoint)")


def _legacy_arch(metadata: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Architecture of an archlip checkpoint of format 1: equal-width strided WRN blocks then applied their
    shortcut conv to the pre-activation (format 2 follows the paper's code: the raw input)."""
    arch = dict(metadata["arch"])
    if (metadata.get("format_version", FORMAT_VERSION) < 2 and arch.get("family") == "wideresnet"
            and "equal_width_shortcut" not in arch):
        widths, strides = arch.get("widths", []), arch.get("strides", [])
        if any(widths[i] == widths[i + 1] and strides[i] != 1 for i in range(len(strides))):
            arch["equal_width_shortcut"] = "preact"
            notes.append("archlip format-1 checkpoint: its equal-width strided blocks apply the shortcut to the "
                         "pre-activation, as they were trained (equal_width_shortcut='preact')")
    return arch


def _build_model(state: dict[str, torch.Tensor], layout: str, normalize: list | None, metadata: dict[str, Any],
                 model: str | None, notes: list[str]) -> nn.Module:
    from experiments.models import create_model
    from experiments.models.registry import preset_spec

    if model is None and isinstance(metadata.get("arch"), dict):
        return model_from_config(_legacy_arch(metadata, notes))
    if model is not None and preset_spec(model) is None:  # a user-registered model: built as named
        from experiments.models.registry import list_models

        if model not in list_models():
            raise ValueError(f"unknown model {model!r}; name one of: {', '.join(list_models())}")
        return create_model(model)
    config = _inferred_config(state, layout, normalize, model, notes)
    notes.append(f"architecture inferred from keys and shapes: {config}")
    return model_from_config(config)


def _fill_dm_normalization(model: nn.Module, state: dict[str, torch.Tensor], layout: str, notes: list[str]) -> None:
    """A DM-layout state dict without ``mean``/``std`` (the reference keeps them as plain attributes) takes the
    model's own normalisation, and says so."""
    if layout.startswith("dm-") and "mean" not in state and "std" not in state and hasattr(model, "mean"):
        state["mean"], state["std"] = model.mean.detach().clone(), model.std.detach().clone()
        notes.append(f"the checkpoint has no mean/std buffers: using the model's input normalisation mean "
                     f"{model.mean.flatten().tolist()}, std {model.std.flatten().tolist()} (the reference's CIFAR-10 "
                     "default); for other data load into a model built with normalize=(mean, std)")


def load_checkpoint(path: str | Path, model: nn.Module | str | None = None) -> LoadedCheckpoint:
    """Load a checkpoint strictly into ``model`` (or a model rebuilt from metadata / inferred from the keys).

    ``model`` may be a module, or a registry name that settles what the keys cannot (e.g.
    ``"preact-resnet-18-input-shortcut"`` or ``"dm-wrn-28-10-silu"``; sizes still come from the keys).
    Returns a :class:`LoadedCheckpoint` (``model`` in eval mode, ``metadata``, ``source_format``, ``layout``,
    ``notes``); it also unpacks as ``model, metadata``.
    """
    path = Path(path).expanduser()
    raw, metadata, source_format = read_checkpoint(path)
    state, layout, notes = canonical_state_dict(raw)
    state, normalize = split_normalization(state, layout)
    check_finite(state, str(path))
    try:
        if not isinstance(model, nn.Module):
            model = _build_model(state, layout, normalize, metadata, model, notes)
        _check_normalization(model, normalize, path)
        _fill_dm_normalization(model, state, layout, notes)
    except AmbiguousArchitectureError as exc:
        raise AmbiguousArchitectureError(f"{path}: {exc}") from None
    for note in notes:
        LOG.warning("%s: %s", path, note)
    try:
        load_state_dict_strict(model, state)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{path}: {exc}") from None
    return LoadedCheckpoint(model.eval(), metadata, source_format, layout, notes)


def load_checkpoint_into(path: str | Path, model: nn.Module) -> LoadedCheckpoint:
    """Load a checkpoint strictly into a model the caller built (e.g. ``archlip ... --model pkg.mod:Class``).

    No layout mapping and no architecture inference: the keys must match the model's as saved, or after
    removing a wrapper prefix (``module.``, ``model.``, ``_orig_mod.``) shared by every key.
    """
    path = Path(path).expanduser()
    raw, metadata, source_format = read_checkpoint(path)
    check_finite(raw, str(path))
    notes: list[str] = []
    for state in (raw, strip_prefixes(raw)):
        if state_dict_diff(model, state) is None:
            if state is not raw:
                notes.append("removed a wrapper prefix shared by every key")
            model.load_state_dict(state, strict=True)
            return LoadedCheckpoint(model.eval(), metadata, source_format, "user-model", notes)
    raise CheckpointMismatchError(f"{path}: {state_dict_diff(model, strip_prefixes(raw))}")


# ------------------------------------------------------------------------------------------------ writing


def save_checkpoint(path: str | Path, model: nn.Module, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` (weights) and ``PATH.json`` (``arch`` + ``metadata``); returns the weights path.

    ``path`` may omit the ``.safetensors`` suffix. ``metadata`` must be JSON-serialisable (config, metrics, ...).
    """
    from safetensors.torch import save as safetensors_bytes

    from experiments.io import atomic_write

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    arch = model_config(model)
    metadata = dict(metadata or {})
    if "arch" in metadata and metadata["arch"] != arch:
        raise ValueError("metadata['arch'] is written by save_checkpoint from the model; remove it from metadata")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
              "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch_version": torch.__version__, **{k: v for k, v in metadata.items() if k != "arch"}}
    try:
        text = json.dumps(record, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable without NaN/Inf: {exc}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(state, f"model being saved to {path}")
    blob = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write(path, lambda fh: fh.write(blob))
    atomic_write(metadata_path(path), lambda fh: fh.write(text), mode="w")
    return path
