"""Deterministic data order for resumable, shardable training on in-memory tensors.

Everything here is a pure function of (seed, epoch, batch index): the permutation of an epoch, the
validation split, the extra-data mix and the augmentation draws. A run interrupted at batch ``b`` of epoch
``e`` therefore resumes on exactly the batches it would have seen, and data-parallel ranks take contiguous
slices of the same global batch.
"""
from __future__ import annotations

import torch

_EPOCH_STRIDE = 1_000_003


def _generator(seed: int, stream: int, epoch: int = 0, batch: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 7919 + stream * 104_729 + epoch) * _EPOCH_STRIDE + batch)
    return g


def split_train_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a seeded random split of ``n`` training examples; val has ``val_size``."""
    if not 0 <= val_size < n:
        raise ValueError(f"data.val_size must be in [0, {n - 1}] for a training split of {n} examples, got {val_size}")
    perm = torch.randperm(n, generator=_generator(seed, 1))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def epoch_order(n: int, seed: int, epoch: int, stream: int = 2) -> torch.Tensor:
    """The permutation of ``n`` examples used in ``epoch``."""
    return torch.randperm(n, generator=_generator(seed, stream, epoch))


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped so every step has the same size)."""
    if n < batch_size:
        raise ValueError(f"run.batch_size ({batch_size}) exceeds the number of training examples ({n}); lower it")
    return n // batch_size


def global_batch(order: torch.Tensor, index: int, batch_size: int) -> torch.Tensor:
    return order[index * batch_size:(index + 1) * batch_size]


def extra_batch(n_extra: int, seed: int, epoch: int, index: int, k: int) -> torch.Tensor:
    """``k`` extra-data indices for batch ``index`` of ``epoch`` (consecutive chunks of a per-epoch permutation)."""
    order = epoch_order(n_extra, seed, epoch, stream=3)
    start = (index * k) % n_extra
    idx = torch.arange(start, start + k) % n_extra
    return order[idx]


def augmentation_params(n: int, pad: int, flip: bool, seed: int, epoch: int, index: int) -> tuple[torch.Tensor, ...]:
    """Per-example crop offsets in [0, 2*pad] (rows, cols) and flip flags for one global batch."""
    g = _generator(seed, 4, epoch, index)
    rows = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    cols = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return rows, cols, flips


def crop_flip(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop (zero padding ``pad``) and horizontal flip of a batch (N, C, H, W), vectorised."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dev = x.device
    r = rows.to(dev)[:, None] + torch.arange(h, device=dev)[None, :]
    col_range = torch.arange(w, device=dev)[None, :]
    col_range = torch.where(flips.to(dev)[:, None], w - 1 - col_range, col_range)
    q = cols.to(dev)[:, None] + col_range
    return xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              r[:, None, :, None], q[:, None, None, :]]


def default_augmentation(image_shape: tuple[int, ...]) -> tuple[int, bool]:
    """(pad, flip): 1-pixel shifts and no flips for 8x8 digits, 4-pixel crops + flips for natural images."""
    h = image_shape[-1]
    if h <= 16:
        return 1, False
    return 4, True
