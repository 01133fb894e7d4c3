"""analyze(): hooks, real input shapes, conv->BN folding checked against dense Jacobians, exports."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from spectral.analyze import analyze, fold_batchnorm, fold_scale, record_layers


def _randomize_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    ).double()
    _randomize_bn(net[1], 1)
    return net.eval()


def _jacobian_norm(fn, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(fn, x).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(jac, ord=2).item()


def test_analyze_rows_shapes_and_folded_bn_against_dense_jacobian():
    net = _small_net()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    table = analyze(net, x, progress=False)
    assert [r["name"] for r in table] == ["0", "3", "6"]
    first, second, last = table.rows
    assert first["input_shape"] == [2, 6, 6] and second["input_shape"] == [4, 6, 6]
    assert second["stride"] == [2, 2] and second["padding_mode"] == "circular"
    assert last["input_shape"] == [54] and last["kind"] == "Linear"
    assert first["folded_batchnorm"] == "1" and second["folded_batchnorm"] is None
    # ground truth: the Jacobian of x -> BN(conv(x)) (affine, so exact), computed from the real modules
    conv_bn = _jacobian_norm(lambda z: net[1](net[0](z.reshape(1, 2, 6, 6))), x.reshape(-1))
    assert first["lower"] <= conv_bn * (1 + 1e-9) <= first["upper"] * (1 + 2e-9)
    assert first["exact"] == pytest.approx(conv_bn, rel=1e-9)  # tiny layer: dense SVD
    conv2 = _jacobian_norm(lambda z: net[3](z.reshape(1, 4, 6, 6)), torch.zeros(4 * 36, dtype=torch.float64))
    assert second["exact"] == pytest.approx(conv2, rel=1e-9)
    lin = torch.linalg.matrix_norm(net[6].weight.detach(), ord=2).item()
    assert last["exact"] == pytest.approx(lin, rel=1e-12)
    for row in table:
        assert row["lower_guarantee"] in ("exact", "lower") and row["upper_guarantee"] in ("exact", "certified_upper")
        assert row["random_baseline_guarantee"] == "estimate"
        assert row["ratio_to_random"] == pytest.approx(row["upper"] / row["random_baseline"])


def test_analyze_bounds_path_on_folded_layer():
    net = _small_net()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    table = analyze(net, x, progress=False, dense_max_entries=0, fft_svd_max_flops=0)
    conv_bn = _jacobian_norm(lambda z: net[1](net[0](z.reshape(1, 2, 6, 6))), x.reshape(-1))
    row = table["0"]
    assert row["upper_method"] in ("fft_cholesky", "axis_cholesky", "banded_cholesky")
    assert row["lower"] <= conv_bn * (1 + 1e-9) <= row["upper"] * (1 + 2e-9)


def test_training_mode_model_is_analysed_in_eval_mode_and_left_unchanged():
    """A model in training mode: BN running statistics, modes and everything else stay as they were, and the
    rows are those of the eval-mode model (BN folded with its running statistics)."""
    net = _small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    table = analyze(net, x, progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert table.meta["model_was_training"] and table.meta["evaluated_in_eval_mode"]
    ref = analyze(_small_net().eval(), x, progress=False)
    assert [r["upper"] for r in table] == [r["upper"] for r in ref] and table["0"]["folded_batchnorm"] == "1"


def test_spectral_norm_parametrization_buffers_are_not_advanced():
    """spectral_norm's forward in training mode runs a power-iteration step that rewrites _u/_v: the analysis
    of a training-mode model did that (an analysis must not change the model it reads)."""
    from torch.nn.utils import parametrizations, spectral_norm

    torch.manual_seed(3)
    net = nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Dropout(0.5),
                        spectral_norm(nn.Linear(5, 3))).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(k.endswith("_u") for k in before)
    table = analyze(net, torch.rand(3, 4, dtype=torch.float64), progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    assert len(table) == 2 and table.meta["not_analyzed"] == []
    assert net.training and net[2].training
    with torch.no_grad():
        w0 = net[0].eval().weight.detach()  # W / sigma(W) at the current _u, _v (eval: no power step)
    assert table["0"]["exact"] == pytest.approx(float(torch.linalg.matrix_norm(w0, ord=2)), rel=1e-12)


def test_linear_with_a_single_weight_gets_a_row():
    lin = nn.Linear(1, 1).double()
    table = analyze(nn.Sequential(lin), torch.rand(1, 1, dtype=torch.float64), progress=False)
    row = table.rows[0]
    assert row["exact"] == pytest.approx(abs(float(lin.weight.detach())), rel=1e-15)
    assert row["random_baseline"] is None and "baseline" in row["notes"][0]


@pytest.mark.parametrize("dims,stride,padding,out_pad,dilation,groups", [
    (2, 1, 0, 0, 1, 1), (2, 2, 1, 1, 1, 1), (2, (2, 1), (1, 0), (1, 0), 1, 2), (2, 2, 0, 0, 2, 1),
    (1, 3, 1, 2, 1, 1), (1, 1, 2, 0, 2, 2),
])
def test_conv_transpose_rows_are_certified_against_dense_jacobians(dims, stride, padding, out_pad, dilation, groups):
    torch.manual_seed(4)
    cls = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d
    conv = cls(4, 6, 3, stride=stride, padding=padding, output_padding=out_pad, dilation=dilation,
               groups=groups).double()
    bn = nn.BatchNorm2d(6) if dims == 2 else nn.BatchNorm1d(6)
    _randomize_bn(bn.double(), 5)
    for model, fn in ((nn.Sequential(conv), conv), (nn.Sequential(conv, bn).eval(), lambda z: bn(conv(z)))):
        shape = (1, 4, 5, 4) if dims == 2 else (1, 4, 6)
        x = torch.rand(shape, dtype=torch.float64)
        jac = _jacobian_norm(lambda z: fn(z.reshape(shape)) - fn(torch.zeros(shape, dtype=torch.float64)),
                             x.reshape(-1))
        row = analyze(model, x, progress=False).rows[0]
        assert row["kind"] == cls.__name__ and row["input_shape"] == list(shape[1:])
        assert row["exact"] == pytest.approx(jac, rel=1e-9)
        assert "adjoint" in row["notes"][-1] and row["random_baseline"] > 0
        forced = analyze(model, x, progress=False, dense_max_entries=0, fft_svd_max_flops=0).rows[0]
        assert forced["lower"] <= jac * (1 + 1e-9) and jac <= forced["upper"] * (1 + 1e-9)


def test_modules_with_weights_but_no_row_are_listed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.conv3 = nn.Conv3d(1, 1, 1)
            self.unused = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, idx):
            h = self.emb(idx).mean(1)
            h = h + nn.functional.linear(h, self.unused.weight)  # used through its weight, not as a module
            return self.fc(h)

    with pytest.warns(UserWarning, match="no row"):
        table = analyze(Odd(), torch.tensor([[0, 3, 4]]), progress=False)
    assert [r["name"] for r in table] == ["fc"]
    skipped = {s["name"]: s["reason"] for s in table.meta["not_analyzed"]}
    assert set(skipped) == {"emb", "conv3", "unused"}
    assert "unsupported" in skipped["conv3"] and "not called" in skipped["unused"]


def test_float32_bn_folding_is_kept_in_float64():
    """A float32 conv with its BN folded: the folded weight stays float64 (rounding it to float32 would
    certify another operator, ~1e-7 away)."""
    torch.manual_seed(6)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
    _randomize_bn(bn, 7)
    model = nn.Sequential(conv, bn).eval()
    row = analyze(model, torch.rand(1, 2, 4, 4), progress=False).rows[0]
    assert row["dtype"] == "torch.float64" and row["folded_batchnorm"] == "1"
    ref = nn.Sequential(conv, bn).double().eval()
    jac = _jacobian_norm(lambda z: ref(z.reshape(1, 2, 4, 4)), torch.zeros(32, dtype=torch.float64))
    assert row["exact"] == pytest.approx(jac, rel=1e-12)


def test_preactivation_and_inplace_relu_are_not_folded():
    torch.manual_seed(1)
    pre = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)).eval()
    recs = record_layers(pre, torch.rand(1, 3, 5, 5))
    assert len(recs) == 1 and recs[0].folded_batchnorm is None
    inplace = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(3)).eval()
    recs = record_layers(inplace, torch.rand(1, 3, 5, 5))
    assert recs[0].folded_batchnorm is None and "in place" in recs[0].notes[0]


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.pool = nn.AvgPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(self.conv(x)))


def test_shared_module_is_recorded_per_call_with_its_input_shape():
    recs = record_layers(_Shared(), torch.rand(1, 2, 8))
    assert [r.name for r in recs] == ["conv", "conv#2"]
    assert [r.input_shape for r in recs] == [(2, 8), (2, 4)]


def test_fold_batchnorm_matches_module_composition():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    bn = nn.BatchNorm2d(4).double().eval()
    _randomize_bn(bn, 3)
    folded = fold_batchnorm(conv.weight, fold_scale(bn))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = bn(conv(x)) - bn(torch.zeros_like(conv(x)))  # drop the affine offset
    out = nn.functional.conv2d(x, folded)
    assert torch.allclose(out, ref, atol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        fold_batchnorm(conv.weight, torch.ones(3, dtype=torch.float64))


def test_exports_json_and_csv(tmp_path):
    table = analyze(_small_net(), torch.rand(1, 2, 6, 6, dtype=torch.float64), progress=False)
    j = json.loads(table.to_json(tmp_path / "t.json").read_text())
    assert len(j["rows"]) == 3 and j["meta"]["layers"] == 3
    with table.to_csv(tmp_path / "t.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["weight_shape"] == "4x2x3x3" and float(rows[0]["upper"]) == pytest.approx(table.rows[0]["upper"])
    assert rows[2]["stride"] == ""
    with pytest.raises(KeyError, match="no layer named"):
        table["nope"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        analyze(lambda x: x, torch.rand(1, 3))
    with pytest.raises(TypeError, match="tensor"):
        analyze(nn.Linear(3, 2), [[1.0, 2.0, 3.0]])


def test_analyze_tiny_wideresnet():
    import experiments.models as models
    model = models.create_model("wrn-tiny", in_channels=1).eval()
    table = analyze(model, torch.rand(1, 1, 8, 8), progress=False, rtol=0.05)
    convs = [r for r in table if r["kind"] == "Conv2d"]
    assert len(convs) >= 7 and table.rows[-1]["kind"] == "Linear"
    for r in table:
        assert r["lower"] <= r["upper"] * (1 + 1e-9)
        assert r["gap"] <= 0.05 or r["upper_method"] == "fft_cholesky"


def test_batchnorm1d_after_a_linear_on_3d_input_is_not_folded():
    """Linear on (B, L, F) then BatchNorm1d(L == F): BN scales the L axis, not the features; folding it into
    the weight's output features reported an 'exact' norm below the composition's (3.33 < 3.61 here)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4, bias=False).double()
    bn = nn.BatchNorm1d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([5.0, 0.1, 0.1, 0.1], dtype=torch.float64))
    model = nn.Sequential(lin, bn).eval()
    table = analyze(model, torch.randn(1, 4, 4, dtype=torch.float64), progress=False, random_baseline=False)
    row = table.rows[0]
    assert row["folded_batchnorm"] is None and any("not folded" in n for n in row["notes"])
    assert row["upper"] >= float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2)) * (1 - 1e-12)


def test_rows_say_whether_rtol_was_reached_in_json_csv_and_cli(tmp_path, capsys, monkeypatch):
    import csv as csv_mod

    from experiments import cli

    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.mul_(0.1).add_(0.05)  # low-pass: the circulant embedding is loose at 4x4
    x = torch.zeros(1, 8, 4, 4)
    table = analyze(net, x, progress=False, rtol=0.01, dense_max_entries=0, budget_seconds=1e-6)
    row = table["0"]
    assert row["converged"] is False and row["reason"] and "budget_seconds" in row["suggestion"]
    assert table["1"]["converged"] is True and table["1"]["upper_method"] == "pointwise"
    assert table.meta["not_converged"] == 1
    table.to_csv(tmp_path / "t.csv")
    rows = list(csv_mod.DictReader((tmp_path / "t.csv").open()))
    assert rows[0]["converged"] == "False" and rows[0]["suggestion"]
    code = cli.main(["spectral", "wrn-tiny", "--data", "digits", "--rtol", "0.01", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "0 of 11 rows above rtol=0.01" in out
    import experiments.measure as demo

    starved = lambda: (lambda *a, **k: analyze(*a, **k, dense_max_entries=0, budget_seconds=1e-6))  # noqa: E731
    monkeypatch.setattr(demo, "spectral_analyze", starved)
    code = cli.main(["spectral", "wrn-tiny", "--data", "digits", "--rtol", "1e-4", "--threads", "1"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "rows above rtol" in ln]
    assert code == 0 and line and int(line[0].split()[0]) > 0 and "to reach rtol:" in out


def test_input_shape_without_batch_gives_the_rows_of_an_example_input():
    net = _small_net().double()
    by_shape = analyze(net, (2, 6, 6), progress=False, random_baseline=False)
    by_tensor = analyze(net, torch.rand(1, 2, 6, 6, dtype=torch.float64), progress=False, random_baseline=False)
    keep = ("name", "input_shape", "output_shape", "lower", "upper", "exact", "upper_method")
    assert [{k: r[k] for k in keep} for r in by_shape] == [{k: r[k] for k in keep} for r in by_tensor]
    assert by_shape.meta["input_shape"] == [2, 6, 6] and by_shape.meta["example_input_shape"] == [1, 2, 6, 6]
    with pytest.raises(TypeError, match="input shape without the batch"):
        analyze(net, "2x6x6", progress=False)


def test_sandwich_options_object_and_keywords_give_the_same_rows():
    from spectral.sandwich import SandwichOptions

    net = _small_net().double()
    opts = SandwichOptions(lower_iters=6, strategy="circulant")
    a = analyze(net, (2, 6, 6), progress=False, random_baseline=False, options=opts)
    b = analyze(net, (2, 6, 6), progress=False, random_baseline=False, lower_iters=6, strategy="circulant")
    assert [(r["lower"], r["upper"]) for r in a] == [(r["lower"], r["upper"]) for r in b]
    assert a.meta["sandwich_kwargs"]["lower_iters"] == 6 and a.meta["sandwich_kwargs"]["strategy"] == "circulant"
    json.dumps(a.meta["sandwich_kwargs"])
