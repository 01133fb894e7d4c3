"""Theory: random-matrix predictions of layer norms, a symbolic WideResNet bound, and budgeted architecture search.

Import the submodules directly (``lipschitz.theory.random_matrix``, ``.symbolic``, ``.optimize``, ``.montecarlo``,
``.trained``);
the names below are re-exported lazily so that importing the package does not import sympy or scipy.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "gordon_expected_norm_bound": "random_matrix", "gaussian_tail_bound": "random_matrix",
    "gaussian_norm_high_probability": "random_matrix", "gaussian_norm_tracy_widom": "random_matrix",
    "conv_norm_prediction": "random_matrix", "conv_norm_leading_order": "random_matrix",
    "init_std": "random_matrix", "init_norm_constant": "random_matrix",
    "param_count": "symbolic", "param_count_expr": "symbolic", "macs": "symbolic", "macs_expr": "symbolic",
    "lipschitz_bound": "symbolic", "lipschitz_bound_expr": "symbolic", "wrn_symbols": "symbolic",
    "optimal_config": "optimize", "Configuration": "optimize", "ConfigSearch": "optimize",
    "reference_configs": "optimize", "ReferenceConfiguration": "optimize", "scale_to_budget": "optimize",
    "validate_conv_predictions": "montecarlo", "validate_tail_bound": "montecarlo",
    "composed_bound": "trained", "predicted_norms": "trained", "WRNNorms": "trained", "BlockNorms": "trained",
    "fit_trained_model": "trained", "predict_norms": "trained", "leave_one_out": "trained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lipschitz.theory.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lipschitz.theory' has no attribute {name!r}")
