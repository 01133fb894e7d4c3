"""Layers as exact linear operators at a given input shape.

A *linear map* is any object with ``in_shape``, ``out_shape`` (tuples, batch excluded),
``forward(x)`` on ``(B, *in_shape)`` and ``adjoint(y)`` on ``(B, *out_shape)``. ``LayerOperator``
wraps a conv1d/conv2d/linear weight (bias ignored: it never changes a norm); ``compose``,
``ChannelScale``, ``Reshape`` and ``sum_maps`` build further maps; ``dense_matrix`` unrolls any map
into its matrix (the ground truth in tests).

Every padded convolution is treated as ``conv_valid o pad``: the forward pads explicitly and runs
an unpadded convolution; the adjoint runs the exact transposed convolution and then the adjoint of
the padding (cropping for zeros, the vector-Jacobian product of ``F.pad`` for circular, reflect and
replicate padding, which folds the copied border values back onto their sources).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spectral.geometry import as_tuple, conv_output_size, padding_pairs  # noqa: F401  (padding_pairs re-exported)

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
DEFAULT_MAX_ENTRIES = 2**26  # 64M entries: 512 MiB in float64


def _check_batch(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape[1:]) != tuple(shape) or t.dim() != len(shape) + 1:
        raise ValueError(f"{what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{what} has dtype {t.dtype} but the operator is {dtype}; convert it explicitly")


class LinearMap:
    """Base class for linear maps: shape bookkeeping, dense unrolling, dtype/device."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def dense(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> torch.Tensor:
        """The matrix ``(prod(out_shape), prod(in_shape))`` of the map (row-major flattening)."""
        return dense_matrix(self, max_entries=max_entries)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)


def _map_dtype(m: Any) -> torch.dtype:
    dtype = getattr(m, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def _map_device(m: Any) -> torch.device:
    device = getattr(m, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def check_linear_map(m: Any) -> None:
    """Raise TypeError unless ``m`` follows the linear-map protocol."""
    missing = [a for a in ("in_shape", "out_shape", "forward", "adjoint") if not hasattr(m, a)]
    if missing:
        raise TypeError(
            f"{type(m).__name__} is not a linear map (missing {', '.join(missing)}); "
            "wrap layers with spectral.operators.LayerOperator"
        )


def dense_matrix(m: Any, max_entries: int = DEFAULT_MAX_ENTRIES, chunk: int = 1024) -> torch.Tensor:
    """Unroll any linear map into its dense matrix by applying it to the standard basis."""
    check_linear_map(m)
    n_in, n_out = math.prod(m.in_shape), math.prod(m.out_shape)
    if n_in * n_out > max_entries:
        raise ValueError(
            f"dense matrix would have {n_out}x{n_in}={n_in * n_out:,} entries > max_entries={max_entries:,}; "
            "use a smaller input shape or raise max_entries"
        )
    dtype, device = _map_dtype(m), _map_device(m)
    cols = []
    with torch.no_grad():
        for start in range(0, n_in, chunk):
            stop = min(n_in, start + chunk)
            basis = torch.zeros(stop - start, n_in, dtype=dtype, device=device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append(m.forward(basis.reshape(stop - start, *m.in_shape)).reshape(stop - start, n_out))
    return torch.cat(cols, 0).T.contiguous()


class LayerOperator(LinearMap):
    """A conv1d/conv2d/linear layer as a linear operator at a fixed input shape (bias ignored).

    Build with ``LayerOperator.conv``, ``LayerOperator.linear`` or ``LayerOperator.from_module``.
    Forward/adjoint run in the weight's dtype and device; inputs of another dtype are refused.
    """

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        stride: tuple[int, ...] = (),
        padding: tuple[tuple[int, int], ...] = (),
        dilation: tuple[int, ...] = (),
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        self.kind = kind
        self.weight = weight.detach()
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.dtype = weight.dtype
        self.device = weight.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def conv(
        cls,
        weight: torch.Tensor,
        input_shape: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "LayerOperator":
        """Conv1d (weight ``(C_out, C_in/g, k)``, input ``(C_in, L)``) or Conv2d (``(C_out, C_in/g, kh, kw)``,
        input ``(C_in, H, W)``). ``padding`` is an int, a per-dim tuple, ``"same"``/``"valid"``, or
        ``(before, after)`` pairs flattened per dimension for 2d."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() not in (3, 4):
            raise ValueError(f"conv weight must be 3-d (conv1d) or 4-d (conv2d), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"conv weight must be floating point, got {weight.dtype}")
        nd = weight.dim() - 2
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != nd + 1:
            raise ValueError(
                f"input_shape for a conv{nd}d must be (C_in, {'L' if nd == 1 else 'H, W'}) without batch, "
                f"got {input_shape}"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {padding_mode!r}; valid: {', '.join(PADDING_MODES)}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        c_out, c_in_g = weight.shape[:2]
        c_in = input_shape[0]
        if c_in != c_in_g * groups or c_out % groups:
            raise ValueError(
                f"weight {tuple(weight.shape)} with groups={groups} expects {c_in_g * groups} input channels "
                f"(and C_out divisible by groups), got input_shape {input_shape}"
            )
        kernel = tuple(weight.shape[2:])
        stride_t = as_tuple(stride, nd, "stride")
        dil_t = as_tuple(dilation, nd, "dilation")
        if any(s < 1 for s in stride_t) or any(d < 1 for d in dil_t):
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride!r}, dilation={dilation!r}")
        if isinstance(padding, str) and padding == "same" and any(s != 1 for s in stride_t):
            raise ValueError("padding='same' requires stride 1 (as in PyTorch)")
        pads = padding_pairs(padding, kernel, dil_t)
        spatial = input_shape[1:]
        out_spatial = []
        for n, (pl, pr), k, s, d in zip(spatial, pads, kernel, stride_t, dil_t):
            if padding_mode == "reflect" and (pl >= n or pr >= n):
                raise ValueError(f"reflect padding {max(pl, pr)} must be < input size {n}")
            if padding_mode == "circular" and (pl > n or pr > n):
                raise ValueError(f"circular padding {max(pl, pr)} must be <= input size {n}")
            out = conv_output_size(n, k, s, d, pl, pr)
            if out < 1:
                raise ValueError(
                    f"kernel (size {k}, dilation {d}) is larger than the padded input ({n}+{pl}+{pr}); "
                    "use a larger input_shape"
                )
            out_spatial.append(out)
        return cls(
            f"conv{nd}d", weight, input_shape, (c_out, *out_spatial), stride_t, pads, dil_t, groups, padding_mode
        )

    @classmethod
    def linear(cls, weight: torch.Tensor, input_shape: Sequence[int] | None = None) -> "LayerOperator":
        """Linear layer ``x @ W.T``; ``input_shape`` defaults to ``(in_features,)`` (leading dims allowed)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"linear weight must be 2-d (out_features, in_features), got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"linear weight must be floating point, got {weight.dtype}")
        in_shape = (weight.shape[1],) if input_shape is None else tuple(int(s) for s in input_shape)
        if len(in_shape) == 0 or in_shape[-1] != weight.shape[1]:
            raise ValueError(f"input_shape must end with in_features={weight.shape[1]}, got {in_shape}")
        return cls("linear", weight, in_shape, (*in_shape[:-1], weight.shape[0]))

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: Sequence[int]) -> "LayerOperator":
        """Wrap an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Linear`` at ``input_shape`` (batch excluded)."""
        if isinstance(module, nn.Linear):
            return cls.linear(module.weight, input_shape)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if getattr(module, "transposed", False):
                raise TypeError("transposed convolutions are not supported")
            return cls.conv(
                module.weight,
                input_shape,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                padding_mode=module.padding_mode,
            )
        raise TypeError(
            f"cannot build an operator from {type(module).__name__}; supported: nn.Conv1d, nn.Conv2d, nn.Linear"
        )

    # ------------------------------------------------------------------ application
    def _pad_args(self) -> list[int]:
        # F.pad takes pairs from the last dimension backwards
        out: list[int] = []
        for pl, pr in reversed(self.padding):
            out += [pl, pr]
        return out

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not any(p for pair in self.padding for p in pair):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad_args(), mode=mode)

    def _conv_valid(self, x: torch.Tensor) -> torch.Tensor:
        fn = F.conv1d if self.kind == "conv1d" else F.conv2d
        return fn(x, self.weight, None, self.stride, 0, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, self.in_shape, self.dtype, "input")
        if self.kind == "linear":
            return x @ self.weight.T
        return self._conv_valid(self._pad(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_batch(y, self.out_shape, self.dtype, "adjoint input")
        if self.kind == "linear":
            return y @ self.weight
        padded = [n + pl + pr for n, (pl, pr) in zip(self.in_shape[1:], self.padding)]
        out_pad = []
        for n_pad, m, k, s, d in zip(padded, self.out_shape[1:], self.weight.shape[2:], self.stride, self.dilation):
            out_pad.append(n_pad - ((m - 1) * s + d * (k - 1) + 1))
        fn = F.conv_transpose1d if self.kind == "conv1d" else F.conv_transpose2d
        z = fn(y, self.weight, None, self.stride, 0, tuple(out_pad), self.groups, self.dilation)
        return self._pad_adjoint(z)

    def _pad_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        if not any(p for pair in self.padding for p in pair):
            return z
        if self.padding_mode == "zeros":
            index = [slice(None), slice(None)]
            for (pl, pr), n in zip(self.padding, self.in_shape[1:]):
                index.append(slice(pl, pl + n))
            return z[tuple(index)]
        # adjoint of a copy-type padding = vjp of F.pad (linear, so any base point works)
        base = torch.zeros((z.shape[0], *self.in_shape), dtype=z.dtype, device=z.device, requires_grad=True)
        with torch.enable_grad():
            padded = F.pad(base, self._pad_args(), mode=self.padding_mode)
            (grad,) = torch.autograd.grad(padded, base, grad_outputs=z)
        return grad

    def with_weight(self, weight: torch.Tensor) -> "LayerOperator":
        """The same layer at the same shapes with another weight tensor (e.g. a float64 copy, a BN-folded kernel)."""
        return LayerOperator(self.kind, weight, self.in_shape, self.out_shape, self.stride, self.padding,
                             self.dilation, self.groups, self.padding_mode)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weight_shape": tuple(self.weight.shape),
            "in_shape": self.in_shape,
            "out_shape": self.out_shape,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    def __repr__(self) -> str:
        return f"LayerOperator({self.kind}, weight={tuple(self.weight.shape)}, {self.in_shape} -> {self.out_shape})"


class ComposedMap(LinearMap):
    """``maps[-1] o ... o maps[0]`` (first map applied first)."""

    def __init__(self, maps: Sequence[Any]) -> None:
        if not maps:
            raise ValueError("compose needs at least one map")
        for m in maps:
            check_linear_map(m)
        for i, (a, b) in enumerate(zip(maps[:-1], maps[1:])):
            if tuple(a.out_shape) != tuple(b.in_shape):
                raise ValueError(
                    f"cannot compose: map {i} outputs {tuple(a.out_shape)} but map {i + 1} expects {tuple(b.in_shape)}"
                )
        dtypes = {_map_dtype(m) for m in maps}
        if len(dtypes) > 1:
            raise TypeError(f"maps have different dtypes {sorted(map(str, dtypes))}; convert them explicitly")
        self.maps = list(maps)
        self.in_shape = tuple(maps[0].in_shape)
        self.out_shape = tuple(maps[-1].out_shape)
        self.dtype = _map_dtype(maps[0])
        self.device = _map_device(maps[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.maps:
            x = m.forward(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for m in reversed(self.maps):
            y = m.adjoint(y)
        return y


def compose(*maps: Any) -> ComposedMap:
    """Composition of linear maps, the first argument applied first."""
    return ComposedMap(maps)


class SumMap(LinearMap):
    """``sum_i maps[i]`` (e.g. a residual block ``shortcut + branch`` with linear parts)."""

    def __init__(self, maps: Sequence[Any]) -> None:
        if not maps:
            raise ValueError("sum_maps needs at least one map")
        for m in maps:
            check_linear_map(m)
        shapes = {(tuple(m.in_shape), tuple(m.out_shape)) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"cannot add maps with different (in_shape, out_shape): {sorted(shapes)}")
        dtypes = {_map_dtype(m) for m in maps}
        if len(dtypes) > 1:
            raise TypeError(f"maps have different dtypes {sorted(map(str, dtypes))}; convert them explicitly")
        self.maps = list(maps)
        self.in_shape = tuple(maps[0].in_shape)
        self.out_shape = tuple(maps[0].out_shape)
        self.dtype = _map_dtype(maps[0])
        self.device = _map_device(maps[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maps[0].forward(x)
        for m in self.maps[1:]:
            out = out + m.forward(x)
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        out = self.maps[0].adjoint(y)
        for m in self.maps[1:]:
            out = out + m.adjoint(y)
        return out


def sum_maps(*maps: Any) -> SumMap:
    """Sum of linear maps with equal shapes."""
    return SumMap(maps)


class ChannelScale(LinearMap):
    """Per-channel diagonal map ``x[:, c] * scale[c]`` on inputs of ``shape = (C, ...)`` (e.g. folded BN)."""

    def __init__(self, shape: Sequence[int], scale: torch.Tensor) -> None:
        shape = tuple(int(s) for s in shape)
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1:
            raise TypeError("scale must be a 1-d torch.Tensor with one entry per channel")
        if len(shape) == 0 or shape[0] != scale.numel():
            raise ValueError(f"shape {shape} must start with C={scale.numel()} (one scale per channel)")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be floating point, got {scale.dtype}")
        self.in_shape = shape
        self.out_shape = shape
        self.scale = scale.detach()
        self.dtype = scale.dtype
        self.device = scale.device
        self._view = (1, -1) + (1,) * (len(shape) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, self.in_shape, self.dtype, "input")
        return x * self.scale.view(self._view)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_batch(y, self.out_shape, self.dtype, "adjoint input")
        return y * self.scale.view(self._view)


class Reshape(LinearMap):
    """Reshape (e.g. flatten) between shapes with equal numbers of entries; an isometry."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], dtype: torch.dtype | None = None) -> None:
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"cannot reshape {self.in_shape} into {self.out_shape}")
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, self.in_shape, self.dtype, "input")
        return x.reshape(x.shape[0], *self.out_shape)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_batch(y, self.out_shape, self.dtype, "adjoint input")
        return y.reshape(y.shape[0], *self.in_shape)


__all__ = [
    "PADDING_MODES",
    "LinearMap",
    "LayerOperator",
    "ComposedMap",
    "SumMap",
    "ChannelScale",
    "Reshape",
    "compose",
    "sum_maps",
    "dense_matrix",
    "check_linear_map",
    "padding_pairs",
]
