"""Per-channel scales folded into a layer's weight: eval-mode BatchNorm and any diagonal channel scaling.

One home for folding: ``spectral.analyze`` folds a BatchNorm that follows a conv/linear layer, and
``lipschitz`` (``rules.batchnorm_scale``, ``liplt.fold_weight``) folds the channel scalings of a network
graph with the same functions. Everything is computed in float64: rounding a folded weight back to float32
would change the operator by ~1e-7 relative, and a certificate would be for that other operator.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold_scale", "fold_batchnorm", "fold_channel_scales"]


def fold_scale(bn: _BatchNorm) -> torch.Tensor:
    """Per-channel factor ``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (float64)."""
    var = bn.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.affine and bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return scale


def fold_channel_scales(weight: torch.Tensor, out_scale: torch.Tensor | None = None,
                        in_scale: torch.Tensor | None = None, *, groups: int = 1,
                        transposed: bool = False) -> torch.Tensor:
    """``diag(out_scale) W diag(in_scale)`` as a float64 weight in the layer's own layout.

    ``weight``: conv or linear ``(C_out, C_in / groups, ...)``, or with ``transposed=True`` a ConvTranspose
    weight ``(C_in, C_out / groups, ...)`` (``in_scale`` is not supported there). Either scale may be None.
    """
    w = weight.detach().double()
    if out_scale is not None:
        w = _scale_outputs(w, out_scale.detach().double(), groups, transposed)
    if in_scale is not None:
        if transposed:
            raise ValueError("input-channel scales of a transposed convolution are not supported")
        w = _scale_inputs(w, in_scale.detach().double(), groups)
    return w


def _scale_outputs(w: torch.Tensor, scale: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    if not transposed:
        if scale.shape[0] != w.shape[0]:
            raise ValueError(f"the scale has {scale.shape[0]} channels but the layer has {w.shape[0]} outputs")
        return w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    c_in, c_out_g = w.shape[:2]
    if scale.shape[0] != c_out_g * groups:
        raise ValueError(f"the scale has {scale.shape[0]} channels but the layer has {c_out_g * groups} outputs")
    group_of_row = torch.arange(c_in) // (c_in // groups)
    index = group_of_row[:, None] * c_out_g + torch.arange(c_out_g)[None, :]  # output channel of w[i, j]
    return w * scale[index].reshape(c_in, c_out_g, *([1] * (w.dim() - 2)))


def _scale_inputs(w: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return w * s.view(1, -1, *([1] * (w.dim() - 2)))
    c_in_g = w.shape[1]
    co = w.shape[0] // groups
    idx = torch.arange(w.shape[0]) // co * c_in_g  # first input channel of each output's group
    s = torch.stack([s[i:i + c_in_g] for i in idx.tolist()])  # (c_out, c_in_g)
    return w * s.view(w.shape[0], c_in_g, *([1] * (w.dim() - 2)))


def fold_batchnorm(weight: torch.Tensor, scale: torch.Tensor, transposed: bool = False,
                   groups: int = 1) -> torch.Tensor:
    """``weight`` (float64) with output channel ``o`` multiplied by ``scale[o]`` (a BatchNorm's ``fold_scale``):
    conv or linear weights ``(C_out, ...)``, or with ``transposed=True`` a ConvTranspose weight
    ``(C_in, C_out / groups, ...)``."""
    try:
        return fold_channel_scales(weight, scale, groups=groups, transposed=transposed)
    except ValueError as err:
        raise ValueError(f"BatchNorm does not fit the layer: {err}") from None
