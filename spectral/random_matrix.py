"""Random-matrix baseline for one layer: how large would the norm be if the weights were random?

For a matrix ``W`` (``m x n``) with i.i.d. centred entries of standard deviation ``s`` the largest singular
value concentrates at ``s * (sqrt(m) + sqrt(n))`` (Gordon's inequality for Gaussian matrices, sharp
non-asymptotic versions by Bandeira & van Handel). A stride-1 convolution is block-diagonalised by the DFT
(Sedghi et al. 2019): each frequency block is ``c_out x c_in/groups`` with entries that are sums of
``K = prod(kernel)`` taps, i.e. of standard deviation ``s * sqrt(K)``; hence the per-layer prediction
``s * sqrt(K) * (sqrt(c_in/groups) + sqrt(c_out/groups))`` (``s * k * (...)`` for a ``k x k`` kernel).
With stride ``t`` (per spatial dim) the polyphase blocks are ``c_out x (c_in t^d)`` with entry variance
``s^2 K / t^d``, giving ``s * sqrt(K) * (sqrt(c_in/groups) + sqrt(c_out/groups) / t^(d/2))``.

The value is labelled ``ESTIMATE``: it is a typical value for random weights, not a bound on the given layer.
Comparing a trained layer's certified norm with it shows how far training moved the layer from a random one.

References: Gordon (1985), "Some inequalities for Gaussian processes and applications";
Bandeira & van Handel (2016), "Sharp nonasymptotic bounds on the norm of random matrices with independent
entries"; Sedghi, Gupta & Long (2019), "The singular values of convolutional layers".
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from spectral.geometry import as_tuple
from spectral.guarantee import Guarantee, NormValue

__all__ = ["random_conv_norm_prediction", "random_linear_norm_prediction", "random_norm_ratio"]


def _entry_std(weight: torch.Tensor) -> float:
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not torch.is_floating_point(weight):
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; the random-matrix baseline needs finite weights")
    if weight.numel() < 2:
        raise ValueError("weight needs at least 2 entries to estimate an entry standard deviation")
    return float(weight.detach().double().std(correction=0))


def random_linear_norm_prediction(weight: torch.Tensor) -> NormValue:
    """Random-matrix prediction ``s * (sqrt(m) + sqrt(n))`` for a linear layer's ``m x n`` weight (ESTIMATE).

    References: Gordon (1985); Bandeira & van Handel (2016).
    """
    start = time.perf_counter()
    if not torch.is_tensor(weight) or weight.dim() != 2:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"a linear weight must be a 2-D tensor (out_features, in_features), got {shape}")
    s = _entry_std(weight)
    m, n = weight.shape
    value = s * (math.sqrt(m) + math.sqrt(n))
    return NormValue(
        value, Guarantee.ESTIMATE, "random_matrix_sqrt_law", None, time.perf_counter() - start,
        {"entry_std": s, "rows": int(m), "cols": int(n), "law": "s*(sqrt(m)+sqrt(n))"},
    )


def random_conv_norm_prediction(
    weight: torch.Tensor,
    input_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] = 1,
    groups: int = 1,
) -> NormValue:
    """Random-matrix prediction of a conv layer's operator norm from its kernel (ESTIMATE).

    ``weight`` is ``(c_out, c_in/groups, *kernel)`` (Conv1d/Conv2d/Conv3d) or a 2-D linear weight.
    ``s * sqrt(K) * (sqrt(c_in/groups) + sqrt(c_out/groups) / stride^(d/2))`` with ``s`` the empirical
    standard deviation of the kernel entries and ``K`` the number of kernel taps. ``input_size`` is
    recorded; when a spatial size is smaller than the kernel, only the taps that can touch the input count.

    References: Gordon (1985); Bandeira & van Handel (2016); Sedghi, Gupta & Long (2019).
    """
    if torch.is_tensor(weight) and weight.dim() == 2:
        return random_linear_norm_prediction(weight)
    start = time.perf_counter()
    if not torch.is_tensor(weight) or weight.dim() < 3:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"a conv weight must be (c_out, c_in/groups, *kernel) with >= 3 dims, got {shape}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing c_out={weight.shape[0]}, got {groups!r}")
    ndim = weight.dim() - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    strides = as_tuple(stride, ndim, "stride")
    if any(t < 1 for t in strides):
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    sizes = None
    if input_size is not None:
        sizes = as_tuple(input_size, ndim, "input_size")
        if any(n < 1 for n in sizes):
            raise ValueError(f"input_size must be >= 1, got {input_size!r}")
        taps = math.prod(min(k, n) for k, n in zip(kernel, sizes))
    else:
        taps = math.prod(kernel)
    s = _entry_std(weight)
    c_out = weight.shape[0] // groups
    c_in = weight.shape[1]
    stride_factor = math.prod(strides)
    value = s * math.sqrt(taps) * (math.sqrt(c_in) + math.sqrt(c_out) / math.sqrt(stride_factor))
    return NormValue(
        value, Guarantee.ESTIMATE, "random_matrix_sqrt_law", None, time.perf_counter() - start,
        {
            "entry_std": s, "kernel": list(kernel), "taps": int(taps), "c_in_per_group": int(c_in),
            "c_out_per_group": int(c_out), "groups": int(groups), "stride": list(strides),
            "input_size": list(sizes) if sizes is not None else None,
            "law": "s*sqrt(taps)*(sqrt(c_in/g)+sqrt(c_out/g)/sqrt(prod(stride)))",
        },
    )


def random_norm_ratio(norm: float, prediction: NormValue) -> float:
    """``norm / prediction``: how far a layer's norm sits from the random-weight baseline (1 = random-like)."""
    if prediction.value <= 0:
        return math.inf if norm > 0 else 1.0
    return float(norm) / prediction.value
