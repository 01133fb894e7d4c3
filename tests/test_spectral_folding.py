"""spectral.folding against the composed modules; the dense norm's two routes against each other."""
import pytest
import torch
from torch import nn

from spectral.exact import operator_norm_dense
from spectral.folding import fold_channel_scales
from spectral.operators import ChannelScale, LayerOperator, compose, dense_matrix


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_channel_scales_equals_scale_conv_scale(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=False).double()
    s_in = torch.rand(4, dtype=torch.float64) + 0.5
    s_out = torch.rand(6, dtype=torch.float64) + 0.5
    folded = fold_channel_scales(conv.weight, s_out, s_in, groups=groups)
    op = LayerOperator.from_module(conv, (4, 5, 5))
    ref = compose(ChannelScale((4, 5, 5), s_in), op, ChannelScale((6, 5, 5), s_out))
    got = LayerOperator.conv(folded, (4, 5, 5), padding=1, groups=groups)
    assert torch.allclose(dense_matrix(got), dense_matrix(ref), atol=1e-13)


def test_fold_channel_scales_transposed_output_channels():
    torch.manual_seed(1)
    tconv = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False).double()
    s_out = torch.rand(6, dtype=torch.float64) + 0.5
    folded = fold_channel_scales(tconv.weight, s_out, groups=2, transposed=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ref = tconv(x) * s_out.view(1, -1, 1, 1)
    out = nn.functional.conv_transpose2d(x, folded, groups=2)
    assert torch.allclose(out, ref, atol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        fold_channel_scales(tconv.weight, torch.ones(5, dtype=torch.float64), groups=2, transposed=True)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
def test_operator_norm_dense_gram_route_matches_svd(shape):
    torch.manual_seed(2)
    op = LayerOperator.linear(torch.randn(*shape, dtype=torch.float64))
    svd = operator_norm_dense(op)
    gram = operator_norm_dense(op, via="gram")
    assert gram.method == "dense_gram_eig" and svd.method == "dense_svd"
    assert abs(gram.value - svd.value) <= 1e-12 * svd.value
    assert abs(svd.value - float(torch.linalg.svdvals(op.weight)[0])) <= 1e-13 * svd.value
    with pytest.raises(ValueError, match="unknown via"):
        operator_norm_dense(op, via="qr")
