"""Per-layer spectral norms of conv and linear layers: exact values, certified bounds, lower bounds.

Pure functions on one layer's weights and input size; no knowledge of networks.

Public API (``sandwich``/``analyze`` are bound at import; the others load on first use):

- ``sandwich(layer_or_weight, input_shape, rtol=0.02, ...) -> Sandwich``: exact values where they exist, else
  certified lower/upper bounds from a cost-ordered ladder of certificates (``spectral.ladder``); says why when
  ``rtol`` is not reached; its cost knobs are the fields of ``SandwichOptions``.
- ``analyze(model, input_shape_or_example, ...) -> LayerTable``: every conv/linear of a model, BN folded.
- ``LayerOperator``, ``compose``, ``ChannelScale``: layers as linear maps.
- ``conv_singular_values_circular``, ``conv_operator_norm_circular``, ``operator_norm_dense``: exact values.
- ``conv_operator_norm_upper``, ``linear_operator_norm_upper``, ``UPPER_METHODS``: certified upper bounds.
- ``banded_certificate``: boundary-aware upper bounds of zero-padded convs (block-banded Cholesky).
- ``operator_norm_lower``: certified lower bounds (power iteration, Lanczos).
- ``probabilistic_upper``: upper bound holding with probability ``1 - delta``.
- ``random_conv_norm_prediction``, ``random_linear_norm_prediction``: random-matrix baselines.
"""
from __future__ import annotations

import importlib
from typing import Any

from spectral.guarantee import Guarantee, NormValue

# ``sandwich`` and ``analyze`` share their submodules' names: bind the functions eagerly, after the
# submodule import (Python sets ``spectral.<submodule>`` only when the submodule is first loaded, so
# later ``import spectral.analyze`` no longer shadows the function).
from spectral.sandwich import (Sandwich, SandwichOptions, fourier_certificate,  # noqa: E402  (after the submodule)
                               sandwich)
from spectral.analyze import LayerTable, analyze  # noqa: E402

_EAGER = ["sandwich", "Sandwich", "SandwichOptions", "fourier_certificate", "analyze", "LayerTable"]

_LAZY = {
    "LayerOperator": "spectral.operators",
    "compose": "spectral.operators",
    "ChannelScale": "spectral.operators",
    "conv_singular_values_circular": "spectral.exact",
    "conv_operator_norm_circular": "spectral.exact",
    "operator_norm_dense": "spectral.exact",
    "conv_operator_norm_upper": "spectral.upper",
    "linear_operator_norm_upper": "spectral.upper",
    "UPPER_METHODS": "spectral.upper",
    "banded_certificate": "spectral.toeplitz",
    "operator_norm_lower": "spectral.lower",
    "probabilistic_upper": "spectral.probabilistic",
    "random_conv_norm_prediction": "spectral.random_matrix",
    "random_linear_norm_prediction": "spectral.random_matrix",
}

__all__ = ["Guarantee", "NormValue", *_EAGER, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spectral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
