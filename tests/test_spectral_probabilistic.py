"""probabilistic_upper on float32 input: products in float64, a round-off margin on the Ritz value, and
theta + beta when the Krylov space is invariant (it returned the float32 Ritz value, below the norm for
96 of 200 seeds)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spectral.operators import ChannelScale, LayerOperator, compose
from spectral.probabilistic import probabilistic_upper


def _dense_norm(op) -> float:
    """||op|| of the float64 operator with the same (float32) parameters, by dense SVD."""
    from spectral.operators import dense_matrix

    if isinstance(op, LayerOperator):
        op = _as_float64_layer(op)
    else:  # compose(ChannelScale, LayerOperator)
        scale, conv = op.maps
        op = compose(ChannelScale(scale.in_shape, scale.scale.double()), _as_float64_layer(conv))
    return float(torch.linalg.matrix_norm(dense_matrix(op), ord=2))


def _as_float64_layer(conv):
    return LayerOperator(conv.kind, conv.weight.double(), conv.in_shape, conv.out_shape, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.padding_mode)


def test_float32_linear_operator_invariant_krylov_space_is_never_below_the_norm():
    below = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(5, 4, generator=g)
        r = probabilistic_upper(LayerOperator.linear(w), delta=1e-3, seed=seed)
        below += r.value < float(torch.linalg.matrix_norm(w.double(), ord=2))
    assert below == 0


def test_float32_matrix_is_accepted_and_bounded():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    r = probabilistic_upper(w, delta=1e-3, seed=0)
    assert r.value >= float(torch.linalg.matrix_norm(w.double(), ord=2))
    assert r.details["ritz_value"] <= float(torch.linalg.matrix_norm(w.double(), ord=2)) * (1 + 1e-12)


def test_float32_composed_map_is_converted_and_unknown_float32_maps_are_refused():
    g = torch.Generator().manual_seed(1)
    conv = LayerOperator.conv(torch.randn(3, 2, 3, 3, generator=g), (2, 4, 4), padding=1)
    op = compose(ChannelScale((2, 4, 4), torch.rand(2, generator=g) + 0.5), conv)
    r = probabilistic_upper(op, delta=1e-3, rtol=1e-9, max_iter=32, seed=0)
    assert r.value >= _dense_norm(op)

    class Float32Map:
        in_shape, out_shape, dtype = (3,), (3,), torch.float32

        def forward(self, x):
            return 2 * x

        def adjoint(self, y):
            return 2 * y

    with pytest.raises(TypeError, match="float64"):
        probabilistic_upper(Float32Map())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), kind=st.sampled_from(["linear", "conv"]), rows=st.integers(1, 6),
       cols=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_property_float32_layers_run_to_invariance_are_certified(seed, kind, rows, cols, scale):
    """Run to an invariant Krylov space (rtol tiny, max_iter = n): the value must be >= the float64 norm."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        op = LayerOperator.linear(torch.randn(rows, cols, generator=g) * scale)
    else:
        op = LayerOperator.conv(torch.randn(rows, 2, 2, 2, generator=g) * scale, (2, cols, 3), padding=1)
    n = op.in_features
    r = probabilistic_upper(op, delta=1e-3, rtol=1e-12, max_iter=n, seed=seed)
    exact = _dense_norm(op)
    assert r.value >= exact
    assert r.value <= exact * (1 + 1e-6) or r.details["relative_eps"] > 0
