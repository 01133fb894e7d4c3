"""Safe, strict checkpoint reading and writing.

Reads RobustBench files (``{'state_dict': ...}`` or a bare state_dict), the paper code's files
(``{'model_state_dict': ..., 'epoch': ...}``), ``module.``/``model.``/``_orig_mod.`` prefixes, safetensors,
and the classic TRADES WideResNet layout (``conv1``, ``block{1,2,3}``; TRADES' unused ``sub_block1`` is
dropped with a note). Pickles are read with ``torch.load(weights_only=True)`` only: a file that would run
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
from experiments.models.registry import RESNET_PRESETS, WRN_PRESETS

LOG = logging.getLogger("archlip.checkpoints")
FORMAT = "archlip-checkpoint"
FORMAT_VERSION = 1
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
    """``"robustwideresnet"``, ``"classic-wrn"``, ``"cifar-resnet"`` or ``"unknown"``."""
    if "stem_conv.weight" in state and any(k.startswith("blocks.") for k in state):
        return "robustwideresnet"
    if "conv1.weight" in state and any(_CLASSIC_BLOCK.match(k) for k in state):
        return "classic-wrn"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "cifar-resnet"
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
    return state, layout, notes


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


def _preset_name(config: dict[str, Any]) -> str | None:
    """The registry preset with exactly this depth/width/stride configuration, if any."""
    if config["family"] == "wideresnet":
        for name, preset in WRN_PRESETS.items():
            if (list(preset["depths"]) == config["depths"] and list(preset["widths"]) == config["widths"]
                    and config["strides"] == [1] + [2] * (len(config["depths"]) - 1)):
                return name
        return None
    for name, (cls, preset) in RESNET_PRESETS.items():
        if (cls.preact == (config["family"] == "preact-resnet") and list(preset["num_blocks"]) == config["num_blocks"]
                and list(preset["widths"]) == config["widths"]):
            return name
    return None


def infer_architecture(state_dict: Mapping[str, torch.Tensor], match_preset: bool = False) -> dict[str, Any]:
    """Recover the architecture (``model.arch_config()`` form) from keys and shapes alone.

    WideResNets in either layout give ``depths``, ``widths``, ``num_classes``, ``in_channels`` and ``strides``.
    Strides are not stored in weights: stage 1 and every stage without a shortcut conv get stride 1 (a
    shortcut-free block keeps its input size), the others the standard stride 2. CIFAR ResNet-18-style
    layouts give ``num_blocks`` and ``widths``. Activation, dropout and input normalisation have no weights
    and take their defaults. ``match_preset=True`` adds the registry ``name`` of an identical preset.
    """
    state = canonical_state_dict(state_dict)[0]
    layout = detect_layout(state)  # after mapping, a classic WRN reads as robustwideresnet
    try:
        if layout == "robustwideresnet":
            depths = _stage_depths(state, r"^blocks\.(\d+)\.layer\.(\d+)\.conv1\.weight$")
            stem = state["stem_conv.weight"]
            widths = [int(stem.shape[0])] + [int(state[f"blocks.{i}.layer.0.conv1.weight"].shape[0])
                                             for i in range(len(depths))]
            strides = [1 if i == 0 or f"blocks.{i}.layer.0.convShortcut.weight" not in state else 2
                       for i in range(len(depths))]
            config = {"family": "wideresnet", "depths": depths, "widths": widths, "strides": strides,
                      "num_classes": int(state["fc.weight"].shape[0]), "in_channels": int(stem.shape[1])}
        elif layout == "cifar-resnet":
            num_blocks = _stage_depths(state, r"^layer(\d+)\.(\d+)\.conv1\.weight$")
            if len(num_blocks) != 4:
                raise ValueError(f"expected 4 stages layer1..layer4, found {len(num_blocks)}")
            config = {
                "family": "preact-resnet" if "bn.weight" in state else "resnet",
                "num_blocks": num_blocks,
                "widths": [int(state[f"layer{k}.0.conv1.weight"].shape[0]) for k in range(1, 5)],
                "num_classes": int(state["linear.weight"].shape[0]),
                "in_channels": int(state["conv1.weight"].shape[1]),
            }
        else:
            raise ValueError(
                "keys match no known layout (RobustBench WideResNet stem_conv/blocks, classic WRN conv1/block1, "
                f"CIFAR ResNet conv1/layer1); first keys: {list(state)[:5]}"
            )
    except KeyError as exc:
        raise ValueError(f"cannot infer the architecture: {layout} state_dict lacks {exc.args[0]!r}") from None
    if match_preset:
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


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> LoadedCheckpoint:
    """Load a checkpoint strictly into ``model`` (or a model rebuilt from metadata / inferred from the keys).

    Returns a :class:`LoadedCheckpoint` (``model`` in eval mode, ``metadata``, ``source_format``, ``layout``,
    ``notes``); it also unpacks as ``model, metadata``.
    """
    path = Path(path).expanduser()
    raw, metadata, source_format = read_checkpoint(path)
    state, layout, notes = canonical_state_dict(raw)
    for note in notes:
        LOG.warning("%s: %s", path, note)
    check_finite(state, str(path))
    if model is None:
        if isinstance(metadata.get("arch"), dict):
            model = model_from_config(metadata["arch"])
        else:
            config = infer_architecture(state, match_preset=True)
            notes.append(f"architecture inferred from keys and shapes: {config}")
            model = model_from_config(config)
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

    from experiments.training.checkpointing import atomic_write

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
