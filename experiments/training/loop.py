"""The training loop: ``train(config, out_dir, resume=False)``.

One optimiser step = craft adversarial examples (method-dependent) -> outer loss -> backward -> gradient
clipping -> SGD step -> EMA update. Around it: deterministic data order, validation-split model selection,
JSONL metrics, atomic resume checkpoints every epoch and on SIGTERM/SIGINT, optional DDP under torchrun.

Run folder layout (``out_dir``): ``resolved_config.yaml``, ``metrics.jsonl``, ``resume.pt``,
``model_final.*`` and (with selection) ``model_best.*`` via ``experiments.checkpoints``, ``train_summary.json``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from experiments.config import (ConfigError, TrainConfig, check_eps, config_diff, config_from_dict, config_to_dict,
                                effective_attack_numbers, load_config, save_config)
from experiments.io import LOG, RUN_FILES, RunFolderLock, read_jsonl, write_json, write_text
import experiments.training.distributed as D
from experiments.training.adversary import craft
from experiments.training.checkpointing import (FORMAT_VERSION, RESUME_FILE, atomic_torch_save, capture_rng_states,
                                                load_resume_state, restore_rng_states)
from experiments.training.ema import ModelEMA
from experiments.training.history import history_due, history_settings, robustness_history
from experiments.training.losses import cross_entropy, mart_loss, trades_loss
from experiments.training.schedules import lr_from_config
from spectral.guarantee import json_safe

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = RUN_FILES["train_summary"][0]  # train_summary.json (summary.json in runs written before)
CONFIG_FILE = "resolved_config.yaml"


# ----------------------------------------------------------------------------------------------------------
# environment: device, determinism, speed switches


def run_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device of this process for ``run.device`` (auto/cpu/cuda; resolved by ``experiments.runtime``):
    cuda:LOCAL_RANK under torchrun."""
    from experiments.runtime import resolve_device

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is cuda but no CUDA device is available; use run.device: cpu")
    device = resolve_device(cfg.run.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def check_speed_switches(cfg: TrainConfig, device: torch.device, image_dims: int) -> None:
    """Reject speed switches the current device/data cannot honour (never silently drop them)."""
    sp = cfg.speed
    if sp.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("speed.amp bf16 is not supported by this GPU; set speed.amp: none")
    if sp.channels_last and image_dims != 4:
        raise ValueError(f"speed.channels_last needs image batches (N, C, H, W); this data has {image_dims} dims")
    if sp.compile:
        if not hasattr(torch, "compile"):
            raise ValueError("speed.compile needs torch.compile (torch >= 2.0); set speed.compile: false")
        if device.type == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("gcc") is None:
            raise ValueError("speed.compile on CPU needs a C++ compiler (c++/gcc) on PATH; set speed.compile: false")


def autocast_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if cfg.speed.amp == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def run_environment(cfg: TrainConfig, device: torch.device):
    """Determinism and thread settings for the duration of a run (restored afterwards)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    prev_bench = torch.backends.cudnn.benchmark
    try:
        if cfg.run.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if cfg.run.num_threads is not None:
            torch.set_num_threads(cfg.run.num_threads)
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.benchmark = prev_bench


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after every step and checkpoints before exiting."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def raised(self) -> bool:
        return self.signal is not None


# ----------------------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    x: torch.Tensor  # float32 in [0, 1] or uint8 (converted per batch by the loader)
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    x_extra: torch.Tensor | None = None
    y_extra: torch.Tensor | None = None
    n_original: int = 0  # size of the training split before the validation hold-out (and train_limit)


def _check_images(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"{what}: images must be float32 in [0, 1] or uint8, got {x.dtype}")
    if x.dtype == torch.float32 and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{what}: images must lie in [0, 1] (models normalise internally)")
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")


def load_training_data(cfg: TrainConfig) -> TrainData:
    """Training data minus a stratified validation hold-out (``data.val_size``); the test split is never read.

    digits: the ``trainval`` split of ``experiments.data.load_digits``; cifar10: the 50K training images.
    Extra data: the pseudo-labelled TinyImages pickle via ``experiments.data.load_pseudo_labeled``.
    """
    from experiments import data as datasets

    dc = cfg.data
    if dc.dataset == "digits":
        x, y = datasets.load_digits(split="trainval", seed=cfg.run.seed)
    elif dc.dataset == "cifar10":
        if not dc.root:
            raise ValueError("data.root must point to the CIFAR-10 folder for data.dataset: cifar10")
        x, y = datasets.load_cifar10(dc.root, split="train", dtype=torch.uint8)
    else:  # pragma: no cover - guarded by the schema
        raise ValueError(f"unknown dataset {dc.dataset!r}")
    _check_images(x, y, dc.dataset)
    if not 0 <= dc.val_size < x.shape[0]:
        raise ValueError(f"data.val_size must be < {x.shape[0]} (the training split of {dc.dataset}), got {dc.val_size}")
    (x_tr, y_tr), (x_va, y_va) = datasets.carve_validation(x, y, int(dc.val_size), seed=cfg.run.seed)
    if dc.train_limit is not None:
        x_tr, y_tr = x_tr[:dc.train_limit], y_tr[:dc.train_limit]
    if x_va.dtype == torch.uint8:
        x_va = x_va.float().div_(255.0)
    out = TrainData(x_tr.contiguous(), y_tr, x_va.contiguous(), y_va, int(y.max().item()) + 1,
                    n_original=int(x.shape[0]))
    if dc.extra_data:
        xe, ye = datasets.load_pseudo_labeled(dc.extra_data)
        _check_images(xe, ye, "data.extra_data")
        if xe.shape[1:] != x.shape[1:]:
            raise ValueError(f"extra data images {tuple(xe.shape[1:])} differ from training images {tuple(x.shape[1:])}")
        out.x_extra, out.y_extra = xe, ye
    return out


def augmentation_for(image_shape: tuple[int, ...]) -> tuple[int, bool]:
    """(crop padding, flip): 1-pixel shifts without flips for 8x8 digits, 4-pixel crops + flips otherwise."""
    return (1, False) if image_shape[-1] <= 16 else (4, True)


def batches_per_epoch(cfg: TrainConfig, n_train: int, n_original: int) -> int:
    """Optimiser steps per epoch: one pass over the training split (``n_train // batch``); with extra data
    ``ceil(epoch_size / batch)`` where ``epoch_size`` defaults to the split before the hold-out, as in the
    reference code (CIFAR-10 + 500K TinyImages at batch 256: ceil(50000 / 256) = 196).

    References: Carmon et al. 2019 (robust self-training sampler); Huang et al. 2021 (its use).
    """
    if not (cfg.data.extra_data and cfg.data.extra_fraction > 0):
        return n_train // cfg.run.batch_size
    return math.ceil((cfg.data.epoch_size or n_original) / cfg.run.batch_size)


def make_loaders(cfg: TrainConfig, data: TrainData) -> tuple[Any, Any, int]:
    """(loader, extra_loader or None, batches per epoch): global batches, identical on every rank.

    Without extra data an epoch is one pass of ``loader``. With extra data both loaders cycle endlessly (each
    reshuffles at the end of its own pass) and an epoch has :func:`batches_per_epoch` steps.
    """
    from experiments.data import InMemoryLoader

    k_extra = int(round(cfg.data.extra_fraction * cfg.run.batch_size)) if data.x_extra is not None else 0
    b_orig = cfg.run.batch_size - k_extra
    if data.x.shape[0] < b_orig:
        raise ValueError(f"run.batch_size ({b_orig} from the training set) exceeds its {data.x.shape[0]} examples; lower it")
    pad, flip = augmentation_for(tuple(data.x.shape[1:]))
    loader = InMemoryLoader(data.x, data.y, b_orig, shuffle=True, augment=cfg.data.augment, seed=cfg.run.seed,
                            crop_padding=pad, flip=flip, drop_last=True)
    extra = None
    if k_extra:
        extra = InMemoryLoader(data.x_extra, data.y_extra, k_extra, shuffle=True, augment=cfg.data.augment,
                               seed=cfg.run.seed + 1, crop_padding=pad, flip=flip, drop_last=True)
        return loader, extra, batches_per_epoch(cfg, data.x.shape[0], data.n_original or data.x.shape[0])
    return loader, extra, len(loader)


def _next_cycling(loader: Any, state: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Next batch of an endlessly cycling loader (its live iterator is kept in ``state[key]``)."""
    for _ in range(2):
        it = state.get(key)
        if it is None:
            it = state[key] = iter(loader)
        try:
            return next(it)
        except StopIteration:
            state[key] = None
    raise RuntimeError("a training loader yields no batches")  # pragma: no cover


def mixed_batches(loader: Any, extra: Any, state: dict, steps: int, seed: int,
                  first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of [original; extra] examples in a shuffled order, with a mask of the extra ones.

    The order is a permutation drawn from ``(seed, global step)``, identical on every rank, so each rank's
    contiguous shard mixes both sources (unshuffled, rank 0 would see only the original data and the last
    rank only the extra data); the reference code shuffles the composite batch for the same reason.
    """
    for k in range(steps):
        xo, yo = _next_cycling(loader, state, "train")
        xe, ye = _next_cycling(extra, state, "extra")
        from_extra = torch.cat([torch.zeros(yo.shape[0], dtype=torch.bool), torch.ones(ye.shape[0], dtype=torch.bool)])
        order = torch.randperm(from_extra.shape[0], generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + first_step + k) % (2**63 - 1)))
        yield torch.cat([xo, xe])[order], torch.cat([yo, ye])[order], from_extra[order]


# ----------------------------------------------------------------------------------------------------------
# model


def build_model(cfg: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    from experiments.models import create_model

    overrides = dict(cfg.model.overrides)
    if in_channels != 3:
        overrides.setdefault("in_channels", in_channels)
    return create_model(cfg.model.name, num_classes=num_classes, **overrides)


def model_skeleton(cfg: TrainConfig) -> nn.Module:
    """The recipe's model on the meta device (no memory, no init, no random numbers): checks the model name and
    ``model.overrides`` and counts parameters before any data is read or any folder is written."""
    from experiments.datasets import DATASETS
    from experiments.models.registry import on_meta_device

    info = DATASETS.get(cfg.data.dataset, DATASETS["cifar10"])
    with on_meta_device():
        return build_model(cfg, info["input_shape"][0], info["num_classes"])


def check_run_config(cfg: TrainConfig, check_data: bool = True) -> None:
    """Everything about a recipe that can be checked before a run folder is created: the model builds, the
    dataset's files are where the recipe says (``check_data=False``: not yet, e.g. before a download)."""
    try:
        model_skeleton(cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {cfg.model.name!r} with model.overrides {dict(cfg.model.overrides)}: "
                          f"{' '.join(str(exc).split())}") from None
    except (NotImplementedError, RuntimeError):  # a constructor that needs real tensors: checked when built
        pass
    check_eps(cfg.attack.eps, cfg.attack.norm, "attack.eps")  # (a warning, if any, is given when training starts)
    dc = cfg.data
    if not check_data:
        return
    if dc.dataset == "cifar10" and not dc.root:
        raise ConfigError("data.root must point to the CIFAR-10 folder for data.dataset: cifar10")
    if dc.root and dc.dataset != "digits" and not Path(dc.root).is_dir():
        raise ConfigError(f"data.root {dc.root!r} is not a folder; point it to the folder holding the dataset's files")
    if dc.extra_data and not Path(dc.extra_data).is_file():
        raise ConfigError(f"data.extra_data {dc.extra_data!r} does not exist; give the path of the pseudo-labelled pickle")


# ----------------------------------------------------------------------------------------------------------
# one step


def method_random_start(cfg: TrainConfig) -> str:
    if cfg.attack.random_start != "auto":
        return cfg.attack.random_start
    return "normal" if cfg.method.name in ("trades", "mart") else "uniform"


def training_step(
    cfg: TrainConfig,
    core: nn.Module,
    trainer: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    generator: torch.Generator | None,
    noise_slice: tuple[int, int, int] | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """One optimiser step of ``cfg.method``; returns per-batch sums (loss*n, correct counts, n)."""
    eps, step = effective_attack_numbers(cfg.attack)
    name = cfg.method.name
    start = method_random_start(cfg)
    common = dict(norm=cfg.attack.norm, random_start=start, init_std=cfg.attack.init_std, bn_mode=cfg.attack.bn_mode,
                  generator=generator, noise_slice=noise_slice, autocast=autocast)
    x_adv = None
    if name in ("pgd_at", "mart"):
        x_adv = craft(core, x, y, eps=eps, step_size=step, steps=cfg.attack.steps, objective="ce", **common)
    elif name == "trades":
        x_adv = craft(core, x, y, eps=eps, step_size=step, steps=cfg.attack.steps, objective="kl", **common)
    elif name == "fgsm_rs":
        x_adv = craft(core, x, y, eps=eps, step_size=cfg.method.fgsm_alpha * eps, steps=1, objective="ce", **common)
    trainer.train()
    optimizer.zero_grad(set_to_none=True)
    logits_clean = logits_adv = None
    with autocast():
        if name == "standard":
            logits_clean = trainer(x)
        elif name in ("pgd_at", "fgsm_rs"):
            logits_adv = trainer(x_adv)
        else:
            logits_clean = trainer(x)
            logits_adv = trainer(x_adv)
    ls = cfg.method.label_smoothing
    if name == "standard":
        loss = cross_entropy(logits_clean, y, ls)
    elif name in ("pgd_at", "fgsm_rs"):
        loss = cross_entropy(logits_adv, y, ls)
    elif name == "trades":
        loss = trades_loss(logits_clean, logits_adv, y, cfg.method.beta, ls)
    else:
        loss = mart_loss(logits_clean, logits_adv, y, cfg.method.beta)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}; lower optim.lr or enable optim.grad_clip")
    loss.backward()
    if cfg.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    n = float(y.shape[0])
    out = {"loss_sum": loss.item() * n, "n": n, "clean_correct": 0.0, "adv_correct": 0.0,
           "clean_n": 0.0, "adv_n": 0.0}
    if logits_clean is not None:
        out["clean_correct"] = float((logits_clean.argmax(1) == y).sum())
        out["clean_n"] = n
    if logits_adv is not None:
        out["adv_correct"] = float((logits_adv.argmax(1) == y).sum())
        out["adv_n"] = n
    return out


ACCUM_KEYS = ("loss_sum", "n", "clean_correct", "clean_n", "adv_correct", "adv_n")


# ----------------------------------------------------------------------------------------------------------
# validation


def evaluate_split(cfg: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   ctx: D.DistContext, epoch: int, with_pgd: bool) -> dict[str, float]:
    """Clean and PGD accuracy on the validation split (sharded over ranks, counts all-reduced)."""
    from experiments.attacks import pgd

    eps, step = effective_attack_numbers(cfg.attack)
    step = cfg.selection.pgd_step_size if cfg.selection.pgd_step_size is not None else step
    lo, hi = D.shard_bounds(x.shape[0], ctx.rank, ctx.world_size)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.run.seed * 1009 + epoch * 17 + ctx.rank + 12345)
    counts = torch.zeros(3, dtype=torch.float64)
    bs = cfg.selection.batch_size
    was_training = model.training
    model.eval()
    for i in range(lo, hi, bs):
        xb = x[i:min(i + bs, hi)].to(device)
        yb = y[i:min(i + bs, hi)].to(device)
        if cfg.speed.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            counts[0] += float((model(xb).argmax(1) == yb).sum())
        if with_pgd:
            xa = pgd(model, xb, yb, eps=eps, step_size=step, steps=cfg.selection.pgd_steps, norm=cfg.attack.norm,
                     random_start="uniform", bn_mode="eval", generator=gen)
            with torch.no_grad():
                counts[1] += float((model(xa).argmax(1) == yb).sum())
        counts[2] += yb.shape[0]
    model.train(was_training)
    counts = D.all_reduce_sum(counts, ctx)
    n = max(counts[2].item(), 1.0)
    out = {"val_clean_acc": counts[0].item() / n, "val_n": counts[2].item()}
    if with_pgd:
        out["val_pgd_acc"] = counts[1].item() / n
    return out


# ----------------------------------------------------------------------------------------------------------
# run folder I/O (rank 0)


def _save_model_file(path: Path, model: nn.Module, metadata: dict) -> str:
    from experiments.checkpoints import save_checkpoint

    result = save_checkpoint(path, model, metadata)
    return str(result if result is not None else path)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(row)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric rows of epochs not covered by the resume checkpoint (a crash between the two writes) and a
    torn last line (a crash during the append, dropped with a note): the file then ends where training resumes."""
    if not path.exists():
        return
    rows = read_jsonl(path)
    keep = [row for row in rows if row.get("epoch", 0) < epochs_done]
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(keep) != len(lines):
        write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _last_validation(path: Path) -> dict:
    """The ``val_*`` entries of the last epoch row in ``metrics.jsonl`` ({} if none): a resumed run that has no
    epoch left to train still reports (and stamps its final model with) the validation it ended with."""
    for row in reversed(read_jsonl(path)):
        val = {k: v for k, v in row.items() if k.startswith("val_")}
        if val:
            return val
    return {}


# ----------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class _Progress:
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    accum: dict = field(default_factory=lambda: {k: 0.0 for k in ACCUM_KEYS})
    best_value: float = -math.inf
    best_epoch: int = -1
    seconds: float = 0.0
    best_path: str = ""


def train(config: TrainConfig | Mapping | str | Path, out_dir: str | Path, resume: bool = False, *,
          on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``config`` into ``out_dir``; ``resume=True`` continues from ``out_dir/resume.pt``.

    ``config``: a TrainConfig, a mapping, a shipped recipe name or a YAML path. Returns the summary dict
    (also written to ``train_summary.json``); ``summary["status"]`` is "completed", or "interrupted" after a
    SIGTERM/SIGINT (a resume checkpoint was written at the last finished step). ``on_step(info)`` is called
    after every optimiser step (info: epoch, batch, global_step, loss, lr).
    Launch under ``torchrun --nproc_per_node N`` for DistributedDataParallel.

    References: Madry et al. 2018; Zhang et al. 2019; Wang et al. 2020; Wong et al. 2020; Huang et al. 2021.
    """
    cfg = config if isinstance(config, TrainConfig) else (
        config_from_dict(config) if isinstance(config, Mapping) else load_config(config))
    out_dir = Path(out_dir)
    check_run_config(cfg)  # before the folder exists: a typo in model.overrides must not leave a run folder
    warning = check_eps(cfg.attack.eps, cfg.attack.norm, "attack.eps")
    if warning:
        LOG.warning("warning: %s", warning)
    rank, world, local_rank = D.env_world()
    device = run_device(cfg, local_rank)
    # one writer per run folder (rank 0 writes for every rank); taken before the process group, so a second
    # writer fails at once
    with RunFolderLock(out_dir, "training") if rank == 0 else contextlib.nullcontext():
        ctx = D.setup(cfg.distributed.backend, device.type)
        try:
            with run_environment(cfg, device), StopFlag() as stop:
                summary = _train(cfg, out_dir, resume, on_step, device, ctx, stop)
            # every rank finishes its collectives and I/O before any rank tears the group down (gloo aborts a
            # process whose peer closed the connection while it was still shutting down)
            D.barrier(ctx)
            return summary
        finally:
            D.teardown(ctx)


class RunExistsError(FileExistsError):
    """The run folder already holds a run and resuming it was not asked for."""


#: Recipe keys a resumed run may change: they do not touch the training's numbers.
RESUME_MAY_CHANGE = ("run.progress", "description")
#: Schedules whose learning rate at an epoch does not depend on run.epochs (so a run can be extended exactly).
EXTENSIBLE_SCHEDULES = ("constant", "multistep")


def resume_config_changes(saved: TrainConfig, new: TrainConfig, epochs_done: int) -> list[str]:
    """Check a resumed run's recipe against the saved one; returns notes on accepted changes.

    The recipe must be the saved one, except ``RESUME_MAY_CHANGE`` and ``run.epochs``: that may change (to at
    least the epochs already trained) when the schedule does not depend on it (constant, multistep), so the
    continued run trains exactly as a run started with the new number would. Anything else: ``ConfigError``.
    """
    diff = [d for d in config_diff(saved, new) if d.split(":", 1)[0] not in RESUME_MAY_CHANGE]
    refused = [d for d in diff if not d.startswith("run.epochs:")]
    if refused:
        raise ConfigError("resume config differs from the saved run: " + "; ".join(refused)
                          + " (a resumed run keeps its recipe; only run.epochs may change)")
    if saved.run.epochs == new.run.epochs:
        return []
    change = f"run.epochs {saved.run.epochs} -> {new.run.epochs}"
    if new.schedule.name not in EXTENSIBLE_SCHEDULES:
        raise ConfigError(f"{change}: the {new.schedule.name} schedule spreads over run.epochs, so changing it would "
                          f"change the learning rate of the {epochs_done} epoch(s) already trained; start a new run "
                          f"with run.epochs={new.run.epochs} (constant and multistep schedules can be extended)")
    if new.run.epochs < epochs_done:
        raise ConfigError(f"{change}: this run has already trained {epochs_done} epochs; run.epochs must be >= "
                          f"{epochs_done}")
    return [f"{change}: the run continues to epoch {new.run.epochs} (the {new.schedule.name} schedule does not "
            f"depend on run.epochs, so it trains as a {new.run.epochs}-epoch run would)"]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: TrainConfig, out_dir: Path, resume: bool, on_step, device: torch.device, ctx: D.DistContext,
           stop: StopFlag) -> dict:
    return _Trainer(cfg, out_dir, resume, on_step, device, ctx, stop).run()


class _Trainer:
    """One training run inside its environment (device, process group, stop flag): :meth:`setup` (data, model,
    optimiser), :meth:`restore` (a resume checkpoint, or a fresh run folder), :meth:`train_epoch` (the optimiser
    steps of one epoch), :meth:`end_epoch` (metrics, validation, model selection, checkpoint), :meth:`finish`
    (final model and summary). The order of random draws is that of a plain loop, so a resumed run is bit-exact."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, resume: bool, on_step, device: torch.device,
                 ctx: D.DistContext, stop: StopFlag) -> None:
        self.cfg, self.out_dir, self.on_step, self.device, self.ctx, self.stop = cfg, out_dir, on_step, device, ctx, stop
        self.resume_path = out_dir / RESUME_FILE
        self.resume = self._prepare_folder(resume)
        self.prog = _Progress()
        self.resume_loaders = None
        self.status = "completed"
        self.lr: float | None = None

    def _prepare_folder(self, resume: bool) -> bool:
        """Whether there is a run to resume; the folder exists (and holds no other run) on return."""
        out_dir, ctx = self.out_dir, self.ctx
        if resume and not self.resume_path.is_file():  # killed before its first checkpoint: nothing to continue
            if ctx.is_main:
                LOG.warning("note: %s holds no resume checkpoint (%s) yet, so the run starts from the beginning",
                            out_dir, RESUME_FILE)
            resume = False
        if ctx.is_main:
            if not resume and self.resume_path.exists():
                raise RunExistsError(f"{out_dir} already holds a training run ({RESUME_FILE}); resume it (raising "
                                     f"run.epochs extends a finished run) or train into another folder")
            out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier(ctx)
        D.check_global_batch(self.cfg.run.batch_size, ctx.world_size)
        return resume

    def setup(self) -> None:
        """Data, model (identical initial weights on every rank), optimiser, EMA and the random streams."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        self.data = load_training_data(cfg)
        check_speed_switches(cfg, device, self.data.x.dim())
        self.autocast = autocast_factory(cfg, device)
        _seed_all(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.data.x.shape[1], self.data.num_classes).to(device)
        if cfg.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.core, self.trainer = D.wrap_model(model, ctx, device, cfg.distributed.sync_bn)
        self.attack_net: nn.Module = self.core
        if cfg.speed.compile:
            self.attack_net = torch.compile(self.core)
            self.trainer = torch.compile(self.trainer) if ctx.enabled else self.attack_net
        self.optimizer = torch.optim.SGD(self.core.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
        if cfg.optim.nesterov and cfg.optim.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        self.ema = ModelEMA(self.core, cfg.ema.decay, cfg.ema.warmup, cfg.ema.bn) if cfg.ema.enabled else None
        _seed_all(cfg.run.seed + 1 + ctx.rank)  # per-rank stream for dropout etc.
        self.noise_gen = torch.Generator(device=device)
        self.noise_gen.manual_seed(cfg.run.seed + 7)  # same on every rank: global-batch noise is sliced per rank

    def restore(self) -> None:
        """Continue from the resume checkpoint (recipe checked against the saved one), or start the run files."""
        cfg, ctx, out_dir = self.cfg, self.ctx, self.out_dir
        if not self.resume:
            if ctx.is_main:
                save_config(cfg, out_dir / CONFIG_FILE)
                (out_dir / METRICS_FILE).write_text("", encoding="utf-8")
            return
        state = load_resume_state(self.resume_path, map_location=self.device)
        notes = resume_config_changes(config_from_dict(state["config"]), cfg, int(state["progress"]["epoch"]))
        if ctx.is_main:
            for note in notes:
                LOG.warning("note: %s", note)
            if notes:
                save_config(cfg, out_dir / CONFIG_FILE)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        p = state["progress"]
        self.prog = _Progress(p["epoch"], p["batch"], p["global_step"], dict(p["accum"]), p["best_value"],
                              p["best_epoch"], p["seconds"])
        rngs = state["rng"]
        if len(rngs) != ctx.world_size:
            raise ValueError(f"checkpoint was written by {len(rngs)} processes, now running {ctx.world_size}")
        restore_rng_states(rngs[ctx.rank], {"noise": self.noise_gen})
        self.resume_loaders = state["loaders"]
        if ctx.is_main:
            _truncate_metrics(out_dir / METRICS_FILE, self.prog.epoch)

    def select_model(self) -> nn.Module:
        return self.ema.shadow if (self.ema is not None and self.cfg.selection.use_ema) else self.core

    def checkpoint(self) -> None:
        """Write the resume checkpoint (rank 0; every rank's random states gathered)."""
        prog, ctx = self.prog, self.ctx
        rng = D.gather_objects(capture_rng_states({"noise": self.noise_gen}), ctx)
        if ctx.is_main:
            state = {"format": "archlip-train-resume", "version": FORMAT_VERSION, "config": config_to_dict(self.cfg),
                     "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng,
                     "progress": {"epoch": prog.epoch, "batch": prog.batch, "global_step": prog.global_step,
                                  "accum": dict(prog.accum), "best_value": prog.best_value,
                                  "best_epoch": prog.best_epoch, "seconds": prog.seconds},
                     "loaders": {"train": self.loader.state_dict(),
                                 "extra": self.extra.state_dict() if self.extra is not None else None},
                     "torch_version": str(torch.__version__)}
            atomic_torch_save(state, self.resume_path)
        D.barrier(ctx)

    def run(self) -> dict:
        self.setup()
        self.restore()
        self.loader, self.extra, self.steps_per_epoch = make_loaders(self.cfg, self.data)
        self.stream_state: dict = {}  # live iterators of the cycling loaders (extra-data training)
        if not self.resume:
            self.checkpoint()  # a run folder always holds a resumable state, even if stopped before the first step
        self.last_val: dict = _last_validation(self.out_dir / METRICS_FILE) if self.resume else {}
        self.t_start = time.perf_counter() - self.prog.seconds
        while self.prog.epoch < self.cfg.run.epochs:
            t_epoch = time.perf_counter()
            self.train_epoch()
            self.prog.seconds = time.perf_counter() - self.t_start
            if self.prog.batch < self.steps_per_epoch:  # interrupted mid-epoch
                self.checkpoint()
                self.status = "interrupted"
                break
            self.end_epoch(t_epoch)
            if D.any_rank(self.stop.raised, self.ctx, self.device):
                self.status = "interrupted" if self.prog.epoch < self.cfg.run.epochs else "completed"
                break
        return self.finish()

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The epoch's global batches, continuing exactly where a resume checkpoint left the data order."""
        loader, extra = self.loader, self.extra
        if self.resume_loaders is not None:
            loader.load_state_dict(self.resume_loaders["train"])
            if extra is not None:
                extra.load_state_dict(self.resume_loaders["extra"])
            self.resume_loaders = None
        elif extra is None:  # with extra data both loaders cycle through their own passes
            loader.set_epoch(epoch)
        if extra is None:
            return ((xg, yg, None) for xg, yg in loader)
        return mixed_batches(loader, extra, self.stream_state, self.steps_per_epoch - self.prog.batch,
                             self.cfg.run.seed, self.prog.global_step)

    def train_epoch(self) -> None:
        """The optimiser steps of the current epoch (until its end or a stop signal seen by any rank)."""
        cfg, ctx, prog, device = self.cfg, self.ctx, self.prog, self.device
        epoch, total = prog.epoch, cfg.run.epochs
        batches = self._batches(epoch)
        bar = None
        if ctx.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=prog.batch, desc=f"epoch {epoch + 1}/{total}", leave=False)
        for xg, yg, from_extra in batches:
            b = prog.batch
            lo, hi = D.shard_bounds(xg.shape[0], ctx.rank, ctx.world_size)
            xb, yb = xg[lo:hi].to(device, non_blocking=True), yg[lo:hi].to(device, non_blocking=True)
            if cfg.speed.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            self.lr = lr = lr_from_config(cfg.schedule, cfg.optim.lr, epoch + b / self.steps_per_epoch, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            sums = training_step(cfg, self.attack_net, self.trainer, self.optimizer, xb, yb, generator=self.noise_gen,
                                 noise_slice=(lo, hi, xg.shape[0]) if ctx.enabled else None, autocast=self.autocast)
            if self.ema is not None:
                self.ema.update(self.core)
            for k in ACCUM_KEYS:
                prog.accum[k] += sums[k]
            prog.batch += 1
            prog.global_step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss_sum'] / sums['n']:.3f}", lr=f"{lr:.3g}")
            if self.on_step is not None:
                self.on_step({"epoch": epoch, "batch": b, "global_step": prog.global_step, "rank": ctx.rank,
                              "loss": sums["loss_sum"] / sums["n"], "lr": lr,
                              "extra_in_shard": None if from_extra is None else int(from_extra[lo:hi].sum()),
                              "shard_size": hi - lo})
            if D.any_rank(self.stop.raised, ctx, device):
                break
        if bar is not None:
            bar.close()

    def end_epoch(self, t_epoch: float) -> None:
        """End of a full epoch: training metrics, validation and model selection, history, checkpoint."""
        cfg, ctx, prog = self.cfg, self.ctx, self.prog
        epoch = prog.epoch
        tot = D.all_reduce_sum(torch.tensor([prog.accum[k] for k in ACCUM_KEYS], dtype=torch.float64), ctx)
        acc = dict(zip(ACCUM_KEYS, tot.tolist()))
        row = {"epoch": epoch, "global_step": prog.global_step, "lr": self.lr,
               "train_loss": acc["loss_sum"] / max(acc["n"], 1.0),
               "train_clean_acc": acc["clean_correct"] / acc["clean_n"] if acc["clean_n"] else None,
               "train_adv_acc": acc["adv_correct"] / acc["adv_n"] if acc["adv_n"] else None,
               "epoch_seconds": time.perf_counter() - t_epoch}
        row["images_per_sec"] = acc["n"] / max(row["epoch_seconds"], 1e-9)
        self.validate(epoch, row)
        if history_due(cfg, epoch):
            row.update(robustness_history(cfg, self.select_model(), self.data.x_val, self.data.y_val, self.device,
                                          ctx, epoch))
        if ctx.is_main:
            _append_jsonl(self.out_dir / METRICS_FILE, row)
        prog.epoch += 1
        prog.batch = 0
        prog.accum = {k: 0.0 for k in ACCUM_KEYS}
        prog.seconds = time.perf_counter() - self.t_start
        self.checkpoint()

    def validate(self, epoch: int, row: dict) -> None:
        """Validation when due (every ``selection.every`` epochs and at the last) and best-model selection."""
        cfg, prog, data = self.cfg, self.prog, self.data
        need_pgd = cfg.selection.metric == "pgd_acc"
        is_last = epoch + 1 == cfg.run.epochs
        if not (data.x_val.shape[0] and ((epoch + 1) % cfg.selection.every == 0 or is_last)):
            return
        self.last_val = evaluate_split(cfg, self.select_model(), data.x_val, data.y_val, self.device, self.ctx, epoch,
                                       with_pgd=need_pgd or is_last)
        row.update(self.last_val)
        if cfg.selection.metric == "last":
            return
        value = self.last_val["val_pgd_acc" if need_pgd else "val_clean_acc"]
        if value > prog.best_value:
            prog.best_value, prog.best_epoch = value, epoch
            row["best"] = True
            if self.ctx.is_main:
                prog.best_path = _save_model_file(self.out_dir / "model_best", self.select_model(),
                                                  _model_metadata(cfg, epoch, prog.global_step, self.last_val, "best"))

    def finish(self) -> dict:
        """The run's summary (written to train_summary.json with the final model by rank 0)."""
        cfg, ctx, prog, out_dir = self.cfg, self.ctx, self.prog, self.out_dir
        total = cfg.run.epochs
        summary = {"status": self.status, "name": cfg.name, "method": cfg.method.name, "model": cfg.model.name,
                   "epochs_completed": prog.epoch, "epochs": total, "global_step": prog.global_step,
                   "world_size": ctx.world_size, "seconds": prog.seconds, "out_dir": str(out_dir),
                   "steps_per_epoch": self.steps_per_epoch,
                   "selection": {"metric": cfg.selection.metric, "best_epoch": prog.best_epoch,
                                 "best_value": prog.best_value if prog.best_epoch >= 0 else None},
                   "final_val": self.last_val, "files": {"config": CONFIG_FILE, "metrics": METRICS_FILE,
                                                         "resume": RESUME_FILE}}
        if cfg.history.enabled:
            summary["history"] = history_settings(cfg)
        if self.stop.raised:
            summary["signal"] = int(self.stop.signal)
        if ctx.is_main:
            if self.status == "completed":
                summary["files"]["final_model"] = _save_model_file(
                    out_dir / "model_final", self.select_model(),
                    _model_metadata(cfg, total - 1, prog.global_step, self.last_val, "final"))
                if prog.best_epoch >= 0:
                    summary["files"]["best_model"] = str(out_dir / "model_best.safetensors")
            write_json(out_dir / SUMMARY_FILE, summary)
        D.barrier(ctx)
        return summary


def _model_metadata(cfg: TrainConfig, epoch: int, step: int, val: dict, kind: str) -> dict:
    return {"model_name": cfg.model.name, "model_overrides": dict(cfg.model.overrides), "recipe": cfg.name,
            "method": cfg.method.name, "epoch": epoch, "global_step": step, "kind": kind,
            "dataset": cfg.data.dataset, "validation": val, "attack": {
                "eps": effective_attack_numbers(cfg.attack)[0], "norm": cfg.attack.norm}}
