"""The one dataset registry: names, input shapes, classes, splits, loading by name and evaluation subsets.

``DATASETS`` is what every part of archlip knows about a dataset by name (the CLI's ``--data`` choices,
``archlip list datasets``, the shapes of presets and checkpoints, the sweep's and trainer's model skeletons).
The file readers themselves live in :mod:`experiments.data`; :func:`load_dataset` dispatches to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.errors import UserError

if TYPE_CHECKING:
    import torch

#: Datasets a training recipe may name (``data.dataset``); the others are read for evaluation and analysis.
TRAINABLE: tuple[str, ...] = ("digits", "cifar10")

# the readers' own split names (experiments.data.DIGITS_SPLITS / SVHN_SPLITS; tests/test_data.py checks they agree)
_DIGITS_SPLITS = ("train", "val", "test", "trainval")
_SVHN_SPLITS = ("train", "test", "extra")

#: Input shape (C, H, W), number of classes and splits per dataset name.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"input_shape": (1, 8, 8), "num_classes": 10, "splits": _DIGITS_SPLITS},
    "cifar10": {"input_shape": (3, 32, 32), "num_classes": 10, "splits": ("train", "test")},
    "cifar100": {"input_shape": (3, 32, 32), "num_classes": 100, "splits": ("train", "test")},
    "svhn": {"input_shape": (3, 32, 32), "num_classes": 10, "splits": _SVHN_SPLITS},
}


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", *, seed: int = 0,
                 download: bool = False, dtype: "torch.dtype | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """Load dataset ``name`` (one of ``DATASETS``) as ``(x, y)`` with x in [0, 1] shaped (N, C, H, W); ``root`` is
    required for all but digits; ``dtype`` defaults to float32 (CIFAR and SVHN can also be read as uint8)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    from experiments import data

    kw = {} if dtype is None else {"dtype": dtype}
    if name == "digits":
        return data.load_digits(split, seed=seed, **kw)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder holding its standard files)")
    if name == "svhn":
        return data.load_svhn(root, split, **kw)
    return data.load_cifar(name, root, split, download=download, **kw)


def dataset_info(name: str) -> dict[str, Any]:
    """The registry entry of ``name`` (input_shape, num_classes, splits); a UserError for an unknown name."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_eval_data(name: str, *, root: str | None, n: int | None = None, split: str = "test", seed: int = 0,
                   subset: str = "first", download: bool = False):
    """Return ``(x, y)`` of a dataset split (all points, the first ``n``, or a seeded subset of ``n``)."""
    import torch

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
