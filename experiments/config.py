"""Training recipes: a dataclass schema with defaults, YAML loading, ``--set a.b=value`` overrides, validation.

A recipe is a YAML mapping whose top-level keys are the sections of :class:`TrainConfig` (``model``,
``data``, ``method``, ``attack``, ``optim``, ``schedule``, ``ema``, ``selection``, ``history``, ``speed``,
``distributed``, ``run``) plus ``name`` and ``description``. Every key not given takes its default.
An unknown key is an error that names it, suggests the closest valid key and lists the valid ones; a value
of the wrong type or out of range is an error that says what is allowed.

Recipes shipped with archlip live in ``experiments/configs/*.yaml`` (package data) and load by name
(``load_config("digits-pgdat-tiny")``) or by path. Float fields accept fractions written as text
(``eps: 8/255``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from experiments.datasets import TRAINABLE
from experiments.io import write_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema (unknown key, wrong type, value out of range)."""


def _meta(*, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, help: str = "") -> dict:
    return {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help}


def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=_meta(**meta))
    return field(default=default, metadata=_meta(**meta))


# ----------------------------------------------------------------------------------------------------------
# schema

METHODS = ("standard", "pgd_at", "trades", "mart", "fgsm_rs")
#: Datasets a recipe may train on (experiments.datasets.TRAINABLE: the registry is the one home of dataset names).
DATASETS = TRAINABLE


@dataclass
class ModelConfig:
    name: str = _f("wrn-tiny", help="a name from experiments.models.list_models()")
    overrides: dict = _f({}, help="keyword overrides passed to create_model (depths, widths, activation, ...)")


@dataclass
class DataConfig:
    dataset: str = _f("digits", choices=DATASETS)
    root: Optional[str] = _f(None, help="dataset folder (cifar10)")
    val_size: int = _f(0, lo=0, help="examples held out of the training split for model selection")
    train_limit: Optional[int] = _f(None, lo=1, help="use only the first N training examples (after the split)")
    augment: bool = _f(False, help="random crop (+flip for natural images) on training batches")
    extra_data: Optional[str] = _f(None, help="pseudo-labelled extra data (ti_500K_pseudo_labeled.pickle)")
    extra_fraction: float = _f(0.0, lo=0.0, hi=1.0, help="fraction of each batch drawn from extra_data")
    epoch_size: Optional[int] = _f(None, lo=1, help="with extra_data: an epoch is ceil(epoch_size / run.batch_size) "
                                                    "steps; null = the dataset's training split before the "
                                                    "validation hold-out (CIFAR-10: 50000), as the reference code")


@dataclass
class MethodConfig:
    name: str = _f("pgd_at", choices=METHODS)
    beta: float = _f(6.0, lo=0.0, help="TRADES/MART regulariser weight")
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0)
    fgsm_alpha: float = _f(1.25, lo=0.0, lo_open=True, help="FGSM-RS step as a multiple of eps")


@dataclass
class AttackConfig:
    """Inner maximisation used while training (eps and step in input units, images in [0, 1])."""

    eps: float = _f(8 / 255, lo=0.0)
    step_size: float = _f(2 / 255, lo=0.0)
    steps: int = _f(10, lo=0)
    norm: str = _f("linf", choices=("linf", "l2"))
    random_start: str = _f("auto", choices=("auto", "uniform", "normal", "none"),
                           help="auto: normal (0.001 randn) for trades/mart, uniform otherwise")
    init_std: float = _f(0.001, lo=0.0, help="std of the 'normal' start")
    bn_mode: str = _f("eval", choices=("eval", "train"), help="batch-norm mode while crafting")
    eps_convention: str = _f("exact", choices=("exact", "0.031"),
                             help="0.031: eps and step truncated to 3 decimals (8/255 -> 0.031, 2/255 -> 0.007)")


@dataclass
class OptimConfig:
    name: str = _f("sgd", choices=("sgd",))
    lr: float = _f(0.1, lo=0.0, lo_open=True)
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    nesterov: bool = _f(False)
    weight_decay: float = _f(2e-4, lo=0.0)
    grad_clip: Optional[float] = _f(None, lo=0.0, lo_open=True, help="max global gradient 2-norm; null = off")


@dataclass
class ScheduleConfig:
    name: str = _f("multistep", choices=("constant", "multistep", "cosine", "cyclic"))
    milestones: list = _f([], help="epochs (may be fractional) at which multistep multiplies lr by gamma")
    gamma: float = _f(0.1, lo=0.0, lo_open=True)
    warmup_epochs: float = _f(0.0, lo=0.0, help="linear warm-up from 0 over this many epochs (cyclic: the peak)")
    min_lr: float = _f(0.0, lo=0.0, help="cosine floor")


@dataclass
class EMAConfig:
    enabled: bool = _f(False)
    decay: float = _f(0.999, lo=0.0, hi=1.0)
    warmup: bool = _f(True, help="effective decay min(decay, (1+n)/(10+n)) after n updates")
    bn: str = _f("ema", choices=("ema", "copy"), help="batch-norm running statistics: averaged or copied")


@dataclass
class SelectionConfig:
    """Model selection on the validation split (never the test set)."""

    metric: str = _f("last", choices=("pgd_acc", "clean_acc", "last"),
                    help="pgd_acc or clean_acc on the validation split; last = keep the final weights")
    every: int = _f(1, lo=1, help="evaluate every N epochs (and after the last)")
    pgd_steps: int = _f(10, lo=1)
    pgd_step_size: Optional[float] = _f(None, lo=0.0, help="default: attack.step_size")
    use_ema: bool = _f(True, help="select and save the EMA model when ema.enabled")
    batch_size: int = _f(256, lo=1)


@dataclass
class HistoryConfig:
    """Per-epoch robustness history on the validation split, as the paper's code logs each epoch (PGD accuracy,
    stable accuracy, local Lipschitz ratio at the PGD examples); written to metrics.jsonl."""

    enabled: bool = _f(False)
    every: int = _f(1, lo=1, help="every N epochs (and after the last)")
    start_epoch: int = _f(0, lo=0, help="first epoch (0-based) to measure; the paper's code starts at half the run")
    n: Optional[int] = _f(None, lo=1, help="validation examples used (null = all)")
    pgd_steps: int = _f(20, lo=1)
    pgd_step_fraction: float = _f(0.1, lo=0.0, lo_open=True, help="PGD step as a fraction of eps (0.8/255 at 8/255)")
    yang_lipschitz: bool = _f(False, help="also Yang et al.'s local Lipschitz metric (its own ascent)")
    yang_variant: str = _f("eps/4", choices=("eps/4", "step-0.003", "yang2020-code"),
                           help="its step rule: eps/4 ascent, 0.003 ascent, or the published loop literally")
    batch_size: int = _f(256, lo=1)


@dataclass
class SpeedConfig:
    amp: str = _f("none", choices=("none", "bf16"), help="bf16 autocast for forward passes")
    channels_last: bool = _f(False)
    compile: bool = _f(False, help="torch.compile the model (needs a C compiler on CPU)")


@dataclass
class DistributedConfig:
    backend: str = _f("auto", choices=("auto", "gloo", "nccl"), help="auto: nccl on CUDA, gloo on CPU")
    sync_bn: bool = _f(False, help="convert BatchNorm to SyncBatchNorm when world size > 1")


@dataclass
class RunConfig:
    epochs: int = _f(1, lo=1)
    batch_size: int = _f(128, lo=1, help="global batch size (split across processes)")
    seed: int = _f(0, lo=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    deterministic: bool = _f(True, help="torch.use_deterministic_algorithms (needed for bit-exact resume)")
    num_threads: Optional[int] = _f(None, lo=1, help="torch intra-op threads for this run; null = leave as is")
    progress: bool = _f(True, help="tqdm progress bars (rank 0)")


@dataclass
class TrainConfig:
    name: str = _f("unnamed")
    description: str = _f("")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------------
# conversion and validation (pure functions)


def parse_number(value: Any, where: str) -> float:
    """A float from a number or a fraction written as text ("8/255"); bools and other text are errors."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip().replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{where}: expected a number or a fraction like 8/255, got {value!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here; give a value")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        out = parse_number(value, where)
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # pragma: no cover


def _check_range(value: Any, meta: Mapping, where: str) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{where}: {value!r} is out of range; must be {op} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is out of range; must be <= {hi}")


def _unknown_key(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    full = f"{where}.{key}" if where else key
    return ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(valid)}")


def _build(cls: type, data: Mapping, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(str(key), fields, where)
        path = f"{where}.{key}" if where else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
            _check_range(kwargs[key], fields[key].metadata, path)
    return cls(**kwargs)


def _cross_checks(cfg: TrainConfig) -> None:
    """Constraints that involve more than one key."""
    for i, m in enumerate(cfg.schedule.milestones):
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0:
            raise ConfigError(f"schedule.milestones[{i}]: expected an epoch number >= 0, got {m!r}")
    if list(cfg.schedule.milestones) != sorted(cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones must be increasing, got {cfg.schedule.milestones}")
    if cfg.schedule.warmup_epochs > cfg.run.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({cfg.schedule.warmup_epochs}) exceeds run.epochs ({cfg.run.epochs})")
    if cfg.data.extra_fraction > 0 and not cfg.data.extra_data:
        raise ConfigError("data.extra_fraction > 0 needs data.extra_data (path to the pseudo-labelled pickle)")
    if cfg.data.epoch_size is not None and not cfg.data.extra_data:
        raise ConfigError("data.epoch_size sets the epoch length of extra-data training; without data.extra_data an "
                          "epoch is one pass over the training split (remove data.epoch_size)")
    if cfg.history.enabled and cfg.data.val_size == 0:
        raise ConfigError("history.enabled needs data.val_size > 0 (the history is measured on the validation split)")
    if cfg.history.yang_lipschitz and cfg.attack.norm != "linf":
        raise ConfigError("history.yang_lipschitz is defined for linf balls; set attack.norm: linf or turn it off")
    if cfg.data.extra_fraction >= 1.0:
        raise ConfigError("data.extra_fraction must be < 1 (each batch needs some original data)")
    if cfg.method.name in ("pgd_at", "trades", "mart") and cfg.attack.steps < 1:
        raise ConfigError(f"method {cfg.method.name} needs attack.steps >= 1")
    if cfg.selection.metric == "pgd_acc" and cfg.data.val_size == 0:
        # allowed: falls back to no selection would be silent, so be explicit instead
        raise ConfigError("selection.metric pgd_acc needs data.val_size > 0 (or set selection.metric: last)")
    if cfg.selection.metric == "clean_acc" and cfg.data.val_size == 0:
        raise ConfigError("selection.metric clean_acc needs data.val_size > 0 (or set selection.metric: last)")
    check_eps(cfg.attack.eps, cfg.attack.norm, "attack.eps")


#: A linf radius above this is accepted with a warning: most of the [0, 1] input range is reachable.
LINF_EPS_WARN = 0.5


def check_eps(eps: float, norm: str = "linf", where: str = "eps") -> str | None:
    """Validate a perturbation radius for inputs in [0, 1]; returns a warning text or None.

    linf: 0 <= eps <= 1 (a radius of 1 reaches every image), with a warning above ``LINF_EPS_WARN``;
    l2: eps >= 0 and finite. Raises :class:`ConfigError` (one line, with the sensible range) otherwise.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"{where}: {eps!r} is not a radius; give a finite number >= 0, e.g. 8/255")
    if norm == "linf" and eps > 1:
        raise ConfigError(f"{where}: {eps:g} is out of range for a linf ball on [0, 1] inputs (must be <= 1: at 1 every "
                          f"image is reachable); typical values are 8/255 on CIFAR-10 and 0.1 on digits")
    if norm == "linf" and eps > LINF_EPS_WARN:
        return (f"{where}: a linf radius of {eps:g} covers most of the [0, 1] input range; robust accuracy will be "
                f"near chance (typical: 8/255 on CIFAR-10, 0.1 on digits)")
    return None


def effective_attack_numbers(attack: AttackConfig) -> tuple[float, float]:
    """(eps, step_size) after the eps convention: "0.031" truncates both to 3 decimals as TRADES/MART do."""
    if attack.eps_convention == "0.031":
        return math.floor(attack.eps * 1000 + 1e-9) / 1000, math.floor(attack.step_size * 1000 + 1e-9) / 1000
    return attack.eps, attack.step_size


#: Keys earlier versions wrote into saved configs that no longer do anything: read (and dropped) so that runs
#: made before their removal still resume and report.
RETIRED_KEYS: dict[str, tuple[str, ...]] = {"data": ("synthetic_size",), "run": ("eval_batch_size",)}


def _without_retired(data: Mapping) -> dict:
    out = dict(data)
    for section, keys in RETIRED_KEYS.items():
        if isinstance(out.get(section), Mapping) and any(k in out[section] for k in keys):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def config_from_dict(data: Mapping) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping (missing keys take defaults; the
    ``RETIRED_KEYS`` of older saved configs are dropped)."""
    cfg = _build(TrainConfig, _without_retired(data or {}), "")
    _cross_checks(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (YAML/JSON safe) of a config."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed with YAML types: 0.1, true, null, [75, 90], 8/255)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of the nested mapping ``data`` with ``a.b=value`` overrides applied (keys checked)."""
    out = _deep_copy(data)
    for text in overrides or ():
        path, value = parse_override(text)
        _check_path(path)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _check_path(path: list[str]) -> None:
    cls: Any = TrainConfig
    where = ""
    for i, part in enumerate(path):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            if cls is dict:  # free-form mapping (model.overrides): anything below is allowed
                return
            raise ConfigError(f"override key {'.'.join(path)!r}: {where!r} is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(part, names, where)
        cls = _unwrap_optional(typing.get_type_hints(cls)[part])[0]
        where = f"{where}.{part}" if where else part


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def list_recipes() -> list[str]:
    """Names of the recipes shipped in experiments/configs (without .yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name ("digits-pgdat-tiny") or a path to a YAML file -> existing path."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") and (p.parent != Path(".") or p.exists()):
        raise FileNotFoundError(f"recipe file {str(p)!r} does not exist")
    candidate = CONFIG_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if candidate.is_file():
        return candidate
    names = list_recipes()
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FileNotFoundError(
        f"no recipe file or shipped recipe named {str(name_or_path)!r}{hint}; shipped: {', '.join(names)}"
    )


def load_config(path_or_name: str | Path | Mapping | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load a recipe (shipped name, YAML path, mapping, or None for defaults), apply overrides, validate."""
    if path_or_name is None:
        data: dict = {}
    elif isinstance(path_or_name, Mapping):
        data = _deep_copy(dict(path_or_name))
    else:
        path = resolve_recipe_path(path_or_name)
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not data:
            raise ConfigError(f"{path} is an empty recipe; start from a shipped one (e.g. "
                              f"{CONFIG_DIR / 'digits-pgdat-tiny.yaml'}) and change what you need")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        data.setdefault("name", path.stem)  # a recipe without a name is named after its file, not "unnamed"
    data = apply_overrides(data, overrides)
    return config_from_dict(data)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (every key, defaults included); loads back to an equal config."""
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Human-readable differences ``key: a -> b`` between two configs (empty when equal)."""
    out: list[str] = []

    def walk(x: Any, y: Any, where: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{where}.{k}" if where else str(k))
        elif x != y:
            out.append(f"{where}: {x!r} -> {y!r}")

    walk(config_to_dict(a), config_to_dict(b), "")
    return out
