"""Checkpoint families against independent reference implementations written here (not archlip's classes).

Each reference below is written the way the published code computes (its block semantics, padding and
normalisation), with that code's parameter names; a state dict saved from it must load strictly into
archlip (architecture inferred from the keys; variants named where the keys cannot tell them apart) and give
the same logits to 1e-6. Where archlip previously computed something else, the old variant is checked to
differ, so these tests can fail.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import checkpoints as ck
from experiments.models import create_model, model_config

ATOL = 1e-6


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics (so a wrong wiring shows); logits kept O(1)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(1.0 / fan_in)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data = 1 + 0.2 * torch.randn(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        elif isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) / m.in_features
            m.bias.data = 0.1 * torch.randn(m.out_features, generator=g)
    return module.eval()


def _save(tmp_path, module: nn.Module, name: str = "ref.pt") -> str:
    path = tmp_path / name
    torch.save({"state_dict": module.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------- RobustWideResNet


class RefRobustWRNBlock(nn.Module):
    """The paper's RobustWideResNet block: the shortcut conv exists when widths differ OR the stride is 2; when
    widths differ the input is replaced by its pre-activation first, otherwise the shortcut reads the raw x."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same = cin == cout
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (not self.same or stride == 2) else None

    def forward(self, x):
        if self.same:
            pre = F.relu(self.bn1(x))
            h = self.conv1(pre)
        else:
            x = F.relu(self.bn1(x))
            h = self.conv1(x)
        h = self.conv2(F.relu(self.bn2(h)))
        skip = x if self.convShortcut is None else self.convShortcut(x)
        return torch.add(skip, h)


class RefStage(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefRobustWRNBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                     for j in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefRobustWRN(nn.Module):
    def __init__(self, depths, widths, strides=(1, 2, 2), num_classes=10):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList(RefStage(d, widths[i], widths[i + 1], strides[i]) for i, d in enumerate(depths))
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = self.stem_conv(x)
        for stage in self.blocks:
            out = stage(out)
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).view(out.shape[0], -1))


# the affected width configurations of experiments/configs/sweeps/cifar10-budget-gpu.yaml (depths shortened)
EQUAL_WIDTH_CONFIGS = [((1, 2, 1), (16, 32, 64, 64)), ((1, 1, 1), (16, 240, 480, 480)),
                       ((1, 1, 1), (16, 256, 520, 520)), ((1, 1, 1), (16, 224, 456, 456))]


@pytest.mark.parametrize("depths,widths", EQUAL_WIDTH_CONFIGS)
def test_equal_width_strided_wrn_matches_robustwideresnet(tmp_path, depths, widths):
    ref = _randomise(RefRobustWRN(depths, widths), seed=1)
    loaded = ck.load_checkpoint(_save(tmp_path, ref))
    assert loaded.model.strides == (1, 2, 2) and list(loaded.model.widths) == list(widths)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=ATOL)
        old = create_model("wrn-tiny", depths=depths, widths=widths, equal_width_shortcut="preact").eval()
        old.load_state_dict(ref.state_dict())
        assert (old(x) - expected).abs().max() > 1e-3  # archlip's earlier semantics computed something else


def test_archlip_format_1_checkpoints_keep_the_semantics_they_were_trained_with(tmp_path):
    trained = _randomise(create_model("wrn-tiny-r", in_channels=1, equal_width_shortcut="preact"), seed=2)
    path = ck.save_checkpoint(tmp_path / "old", trained, {})
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format_version"] = 1
    del meta["arch"]["equal_width_shortcut"]  # format 1 did not record it
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded = ck.load_checkpoint(path)
    assert loaded.model.equal_width_shortcut == "preact" and any("format-1" in n for n in loaded.notes)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), trained(x), rtol=0, atol=0)
    fresh = ck.load_checkpoint(ck.save_checkpoint(tmp_path / "new", create_model("wrn-tiny-r", in_channels=1), {}))
    assert fresh.model.equal_width_shortcut == "input"


# ---------------------------------------------------------------------------------------------- PreActResNet-18


class RefPreActBlock(nn.Module):
    """Both published pre-activation blocks: ``on_input`` = shortcut(x) (fast_adversarial, RobustBench),
    else shortcut(relu(bn1(x))) (kuangliu, Rice et al.)."""

    def __init__(self, cin, cout, stride, on_input):
        super().__init__()
        self.on_input = on_input
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            sc = self.shortcut(x if self.on_input else out)
        else:
            sc = x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        out += sc
        return out


class RefPreActResNet(nn.Module):
    def __init__(self, num_blocks, widths, on_input, head_bn="bn", num_classes=10, normalise=None):
        super().__init__()
        self.head_bn = head_bn
        if normalise is not None:  # a model-zoo wrapper keeping its normalisation as buffers mu/sigma
            self.register_buffer("mu", torch.tensor(normalise[0]).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor(normalise[1]).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        cin = widths[0]
        for k, (n, w) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(RefPreActBlock(cin, w, (1 if k == 0 else 2) if j == 0 else 1, on_input))
                cin = w
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        setattr(self, head_bn, nn.BatchNorm2d(cin))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        if hasattr(self, "mu"):
            x = (x - self.mu) / self.sigma
        out = self.conv1(x)
        for k in range(1, 5):
            out = getattr(self, f"layer{k}")(out)
        out = F.relu(getattr(self, self.head_bn)(out))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.view(out.size(0), -1))


@pytest.mark.parametrize("on_input,name", [(False, "preact-resnet-tiny"), (True, "preact-resnet-tiny-input-shortcut"),
                                           (True, "preact-resnet-18-input-shortcut")])
@pytest.mark.parametrize("head_bn", ["bn", "bn_last"])
def test_preact_resnet_variants_match_their_reference(tmp_path, on_input, name, head_bn):
    num_blocks, widths = (1, 2, 1, 1), (8, 16, 24, 32)
    ref = _randomise(RefPreActResNet(num_blocks, widths, on_input, head_bn), seed=3)
    path = _save(tmp_path, ref)
    with pytest.raises(ck.AmbiguousArchitectureError, match="--model NAME"):
        ck.load_checkpoint(path)  # the keys cannot tell the variants apart: never a silent guess
    loaded = ck.load_checkpoint(path, model=name)
    assert loaded.layout == "cifar-preact-resnet" and loaded.model.num_blocks == num_blocks
    assert model_config(loaded.model)["shortcut"] == ("input" if on_input else "preact")
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), rtol=0, atol=ATOL)
        other = "preact-resnet-tiny" if on_input else "preact-resnet-tiny-input-shortcut"
        wrong = ck.load_checkpoint(path, model=other).model
        assert (wrong(x) - ref(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="is a dm-wideresnet but the checkpoint holds a preact-resnet"):
        ck.load_checkpoint(path, model="dm-wrn-tiny")
    with pytest.raises(ValueError, match="unknown model 'preact-18'"):
        ck.load_checkpoint(path, model="preact-18")


def test_plain_resnet_is_not_taken_for_preact(tmp_path):
    model = _randomise(create_model("resnet-tiny"), seed=4)
    loaded = ck.load_checkpoint(_save(tmp_path, model))
    assert loaded.layout == "cifar-resnet" and type(loaded.model).__name__ == "ResNet"


def test_model_zoo_normalisation_buffers_load_into_the_model(tmp_path):
    stats = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    ref = _randomise(RefPreActResNet((1, 1, 1, 1), (8, 16, 24, 32), True, normalise=stats), seed=5)
    path = _save(tmp_path, ref)
    loaded = ck.load_checkpoint(path, model="preact-resnet-tiny-input-shortcut")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), rtol=0, atol=ATOL)
    normalize = model_config(loaded.model)["normalize"]
    assert normalize[0] == pytest.approx(stats[0], abs=1e-6) and normalize[1] == pytest.approx(stats[1], abs=1e-6)
    bare = create_model("preact-resnet-tiny", shortcut="input")
    with pytest.raises(ck.CheckpointMismatchError, match="normalize=.mean, std."):
        ck.load_checkpoint(path, model=bare)  # a model without that normalisation would compute something else


# ---------------------------------------------------------------------------------------------- DeepMind-style


class RefSwish(torch.autograd.Function):
    """x * sigmoid(x) with a hand-written backward, as the published Swish is written."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class RefAct(nn.Module):
    def __init__(self, swish):
        super().__init__()
        self.swish = swish

    def forward(self, x):
        return RefSwish.apply(x) if self.swish else F.relu(x)


def _tf_same_pad(v, stride):
    return F.pad(v, (1, 1, 1, 1)) if stride == 1 else F.pad(v, (0, 1, 0, 1))


class RefDMBlock(nn.Module):
    def __init__(self, cin, cout, stride, swish):
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = RefAct(swish)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = RefAct(swish)
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x):
        act = self.relu_0(self.batchnorm_0(x))
        if self.shortcut is not None:
            x = act
        out = self.conv_0(_tf_same_pad(act, self.stride))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (x if self.shortcut is None else self.shortcut(x)) + out


class RefDMGroup(nn.Module):
    def __init__(self, n, cin, cout, stride, swish):
        super().__init__()
        self.block = nn.Sequential(*[RefDMBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, swish)
                                     for j in range(n)])

    def forward(self, x):
        return self.block(x)


class RefDMWideResNet(nn.Module):
    def __init__(self, depths, widths, swish, mean, std, buffers, num_classes=10):
        super().__init__()
        mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        if buffers:
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        else:  # the reference keeps them as plain attributes: not in the state dict
            self.mean, self.std = mean, std
        self.init_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*[RefDMGroup(d, widths[i], widths[i + 1], 1 if i == 0 else 2, swish)
                                     for i, d in enumerate(depths)])
        self.batchnorm = nn.BatchNorm2d(widths[-1])
        self.relu = RefAct(swish)
        self.logits = nn.Linear(widths[-1], num_classes)
        self.width = widths[-1]

    def forward(self, x):
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        out = F.avg_pool2d(out, 8)
        return self.logits(out.view(-1, self.width))


class RefDMPreActBlock(nn.Module):
    def __init__(self, cin, cout, stride, swish):
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = RefAct(swish)
        self.conv_2d_1 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = RefAct(swish)
        self.conv_2d_2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu_0(self.batchnorm_0(x))
        sc = self.shortcut(_tf_same_pad(x, self.stride)) if self.has_shortcut else x
        out = self.conv_2d_1(_tf_same_pad(out, self.stride))
        return self.conv_2d_2(self.relu_1(self.batchnorm_1(out))) + sc


class RefDMPreActResNet(nn.Module):
    def __init__(self, num_blocks, widths, swish, mean, std, num_classes=10):
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.conv_2d = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        cin = widths[0]
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            setattr(self, f"layer_{i}", nn.Sequential(*[RefDMPreActBlock(cin if j == 0 else w, w,
                                                                         (1 if i == 0 else 2) if j == 0 else 1, swish)
                                                        for j in range(n)]))
            cin = w
        self.batchnorm = nn.BatchNorm2d(cin)
        self.relu = RefAct(swish)
        self.logits = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv_2d((x - self.mean) / self.std)
        for i in range(4):
            out = getattr(self, f"layer_{i}")(out)
        out = F.avg_pool2d(self.relu(self.batchnorm(out)), 4)
        return self.logits(out.view(out.size(0), -1))


CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("buffers", [False, True])
def test_dm_wideresnet_matches_its_reference(tmp_path, swish, buffers):
    depths, widths = (2, 1, 2), (8, 12, 16, 24)  # any depth/width
    mean, std = CIFAR100 if buffers else ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    ref = _randomise(RefDMWideResNet(depths, widths, swish, mean, std, buffers, num_classes=7), seed=6)
    path = _save(tmp_path, ref)
    with pytest.raises(ck.AmbiguousArchitectureError, match="Swish/SiLU \\('dm-wrn-28-10-silu'"):
        ck.load_checkpoint(path)  # the activation has no weights: a name must say which
    loaded = ck.load_checkpoint(path, model="dm-wrn-tiny-silu" if swish else "dm-wrn-tiny")
    model = loaded.model
    assert (model.depths, model.widths, model.num_classes) == (depths, widths, 7) and loaded.layout == "dm-wideresnet"
    assert any("mean/std" in n for n in loaded.notes) != buffers  # missing buffers: the default, and a note
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)
        wrong = ck.load_checkpoint(path, model="dm-wrn-tiny" if swish else "dm-wrn-tiny-silu").model
        assert (wrong(x) - ref(x)).abs().max() > 1e-3
    # gradients agree too (the reference's hand-written Swish backward vs autograd through nn.SiLU)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(xa).sum().backward()
    ref(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("swish", [False, True])
def test_dm_preact_resnet_matches_its_reference(tmp_path, swish):
    num_blocks, widths = (1, 2, 1, 1), (8, 16, 16, 24)  # an equal-width strided stage: 3x3 shortcut on the input
    ref = _randomise(RefDMPreActResNet(num_blocks, widths, swish, *CIFAR100), seed=7)
    path = _save(tmp_path, ref)
    loaded = ck.load_checkpoint(path, model="dm-preact-resnet-tiny-silu" if swish else "dm-preact-resnet-tiny")
    model = loaded.model
    assert model.num_blocks == num_blocks and model.stage_widths == widths
    model.mean.copy_(ref.mean)  # the reference's statistics are plain attributes, not in the state dict
    model.std.copy_(ref.std)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)


def test_dm_models_round_trip_through_archlip_checkpoints(tmp_path):
    model = _randomise(create_model("dm-wrn-tiny-silu", num_classes=5, normalize=CIFAR100), seed=8)
    loaded = ck.load_checkpoint(ck.save_checkpoint(tmp_path / "dm", model, {}))
    assert model_config(loaded.model) == model_config(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dm-wrn-tiny-silu", "dm-preact-resnet-tiny", "preact-resnet-tiny-input-shortcut",
                                  "wrn-tiny-r"])
def test_new_forwards_are_fx_traceable(name):
    """The graph-extraction work traces forward with torch.fx: no data-dependent control flow."""
    model = create_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_export_of_variant_families_names_the_variant_and_states_what_the_zoo_class_differs_in(tmp_path):
    from experiments.export import export_robustbench

    for name, needle in (("preact-resnet-tiny", "reads the pre-activation"), ("dm-wrn-tiny-silu", None)):
        model = _randomise(create_model(name), seed=9)
        path = ck.save_checkpoint(tmp_path / name, model, {})
        paths = export_robustbench(path, tmp_path / "zoo", name=name)
        card = json.loads(paths["card"].read_text())
        variant = card["load_with"].split("model=")[1].strip("')")
        loaded = ck.load_checkpoint(paths["weights"], model=variant)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
        assert (needle is None and card["notes"] == []) or any(needle in n for n in card["notes"])
