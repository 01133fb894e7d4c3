"""Models: reference key layouts, parameter counts, graph == forward, registry, describe."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.models import (
    PreActResNet,
    ResNet,
    WideResNet,
    create_model,
    describe,
    list_models,
    model_config,
    model_from_config,
)
from lipschitz import graph
from lipschitz.trace import graph_from_module
from tests.reference import read_reference

TINY = ["wrn-tiny", "wrn-tiny-r", "resnet-tiny", "preact-resnet-tiny"]


def meta_model(name: str, **kw) -> nn.Module:
    """Full-size models on the meta device: shapes and structure without memory or init time."""
    with torch.device("meta"):
        return create_model(name, **kw)


def layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- graph interpreter (independent of lipschitz/)
ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "softplus": F.softplus, "identity": lambda t: t}


def run_graph(node: graph.Node, x: torch.Tensor) -> torch.Tensor:
    if isinstance(node, (graph.Layer, graph.BatchNorm, graph.Pool)):
        return node.module(x)
    if isinstance(node, graph.Activation):
        return ACT[node.kind](x)
    if isinstance(node, graph.Flatten):
        return torch.flatten(x, 1)
    if isinstance(node, graph.Identity):
        return x
    if isinstance(node, graph.Normalize):
        return (x - node.mean.view(1, -1, 1, 1)) / node.std.view(1, -1, 1, 1)
    if isinstance(node, graph.Sequential):
        for child in node.children:
            x = run_graph(child, x)
        return x
    if isinstance(node, graph.Residual):
        return run_graph(node.branch, x) + (x if node.shortcut is None else run_graph(node.shortcut, x))
    raise TypeError(f"unknown node {node!r}")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# ---------------------------------------------------------------- reference layouts and counts
def test_wrn_34_r_matches_robustbench_keys_and_shapes():
    ref = read_reference("wrn-34-r_robustwideresnet_keys.tsv")
    assert layout(meta_model("wrn-34-r")) == ref


def test_wrn_34_10_matches_classic_layout_after_renaming():
    ref = read_reference("wrn-34-10_classic_keys.tsv")
    renamed = {}
    for key, shape in ref.items():
        key = re.sub(r"^block(\d+)\.", lambda m: f"blocks.{int(m.group(1)) - 1}.", key)
        renamed[re.sub(r"^conv1\.", "stem_conv.", key)] = shape
    assert layout(meta_model("wrn-34-10")) == renamed


@pytest.mark.parametrize(
    "name,millions",
    [("wrn-34-10", 46.16), ("wrn-34-r", 68.12), ("wrn-34-12", 66.46), ("wrn-28-10", 36.48)],
)
def test_parameter_counts(name, millions):
    count = sum(p.numel() for p in meta_model(name).parameters())
    assert round(count / 1e6, 2) == millions


def test_cifar_resnet_layouts():
    resnet = layout(meta_model("resnet-18"))
    assert resnet["conv1.weight"] == (64, 3, 3, 3) and "bn1.weight" in resnet
    assert resnet["layer2.0.shortcut.0.weight"] == (128, 64, 1, 1) and "layer2.0.shortcut.1.running_var" in resnet
    assert "layer1.0.shortcut.0.weight" not in resnet
    assert resnet["linear.weight"] == (10, 512)
    assert sum(p.numel() for p in meta_model("resnet-18").parameters()) == 11_173_962
    preact = layout(meta_model("preact-resnet-18"))
    assert preact["layer1.0.bn1.weight"] == (64,) and preact["bn.weight"] == (512,)
    assert preact["layer3.0.shortcut.0.weight"] == (256, 128, 1, 1) and "layer3.0.shortcut.1.weight" not in preact
    assert "bn1.weight" not in preact


# ---------------------------------------------------------------- semantics
def trades_block(block, x):
    """RobustBench/TRADES BasicBlock.forward transcribed with its equalInOut logic."""
    equal_in_out = block.bn1.num_features == block.conv1.out_channels
    if not equal_in_out:
        x = F.relu(block.bn1(x))
        out = x
    else:
        out = F.relu(block.bn1(x))
    out = F.relu(block.bn2(block.conv1(out)))
    out = block.conv2(out)
    return (x if equal_in_out else block.convShortcut(x)) + out


def test_wrn_forward_follows_trades_semantics():
    model = randomize_bn(WideResNet(depths=(2, 1, 2), widths=(4, 8, 16, 16), strides=(1, 2, 1), num_classes=5))
    x = torch.rand(3, 3, 16, 16)
    out = model.stem_conv(x)
    for stage in model.blocks:
        for block in stage.layer:
            out = trades_block(block, out)
    expected = model.fc(F.relu(model.bn1(out)).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_equal_width_strided_stage_gets_a_shortcut():
    model = WideResNet(depths=(1, 1), widths=(4, 4, 4), strides=(2, 2))
    assert model.blocks[0].layer[0].convShortcut is not None
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


GRAPH_CASES = [
    ("wrn-tiny", {}),
    ("wrn-tiny-r", {"activation": "silu"}),
    ("wrn-tiny", {"activation": "gelu", "normalize": ((0.5,), (0.25,)), "dropout": 0.3}),
    ("wrn-tiny", {"activation": "softplus", "depths": (2, 1, 2), "widths": (4, 4, 8, 8), "strides": (1, 1, 2)}),
    ("resnet-tiny", {}),
    ("preact-resnet-tiny", {"activation": "silu", "normalize": ((0.4,), (0.2,))}),
    ("preact-resnet-tiny-input-shortcut", {}),
    ("wrn-tiny-r", {"equal_width_shortcut": "preact"}),
]


@pytest.mark.parametrize("name,overrides", GRAPH_CASES)
def test_traced_graph_reproduces_forward(name, overrides):
    model = randomize_bn(create_model(name, num_classes=7, in_channels=1, **overrides))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(graph_from_module(model, (1, 8, 8)), x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TINY + ["wrn-34-r"])
def test_graph_roles_and_coverage(name):
    model = meta_model(name)
    root = graph_from_module(model, (3, 32, 32))
    roles = [c.role for c in root.children]
    assert roles[0] == "stem" and roles[-1] == "head" and set(roles[1:-1]) == {"stage"}
    for stage in root.children[1:-1]:
        assert stage.children and all(b.role == "block" for b in stage.children)
    modules = [n.module for n in graph.iter_nodes(root) if hasattr(n, "module")]
    assert len({id(m) for m in modules}) == len(modules)
    covered = {id(p) for m in modules for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}
    names = dict(model.named_modules())
    for n in graph.iter_nodes(root):
        if isinstance(n, (graph.Layer, graph.BatchNorm)):
            assert names[n.name] is n.module  # node names are the state_dict prefixes


# ---------------------------------------------------------------- registry
def test_registry_lists_every_preset():
    expected = {"wrn-16-1", "wrn-16-4", "wrn-28-4", "wrn-28-10", "wrn-34-10", "wrn-34-12", "wrn-34-20",
                "wrn-34-r", "wrn-70-16", "preact-resnet-18", "resnet-18", "wrn-tiny", "wrn-tiny-r"}
    assert expected <= set(list_models())


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'wrn-99'.*wrn-34-r"):
        create_model("wrn-99")
    with pytest.raises(TypeError, match="unknown argument.*'depth'.*depths"):
        create_model("wrn-tiny", depth=3)
    with pytest.raises(ValueError, match="activation 'tanhh'.*relu"):
        create_model("wrn-tiny", activation="tanhh")
    with pytest.raises(ValueError, match="widths needs one entry"):
        WideResNet(depths=(1, 1), widths=(4, 8))
    with pytest.raises(ValueError, match="strides needs one entry"):
        WideResNet(depths=(1, 1), widths=(4, 8, 8), strides=(1,))
    with pytest.raises(ValueError, match="positive"):
        WideResNet(depths=(0, 1), widths=(4, 8, 8), strides=(1, 2))
    with pytest.raises(ValueError, match="3 channels.*in_channels=1"):
        create_model("wrn-tiny", in_channels=1, normalize=((0.1, 0.2, 0.3), (1, 1, 1)))


def test_overrides_and_config_round_trip():
    model = create_model("wrn-tiny", num_classes=3, in_channels=1, depths=[2, 1, 1], activation="silu",
                         normalize=((0.5,), (0.2,)))
    cfg = model_config(model)
    assert cfg["name"] == "wrn-tiny" and cfg["depths"] == [2, 1, 1] and cfg["num_classes"] == 3
    rebuilt = model_from_config(cfg)
    assert layout(rebuilt) == layout(model) and model_config(rebuilt) == cfg
    for name in TINY:
        m = create_model(name)
        assert layout(model_from_config(model_config(m))) == layout(m)
    with pytest.raises(ValueError, match="unknown model family"):
        model_from_config({"family": "vit"})


def test_normalization_is_not_in_state_dict():
    model = create_model("wrn-tiny", normalize=((0.1, 0.2, 0.3), (0.2, 0.2, 0.2)))
    assert not any(k.startswith("normalize") for k in model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    plain = create_model("wrn-tiny")
    plain.load_state_dict(model.state_dict())
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), 0.2
    torch.testing.assert_close(model.eval()(x), plain.eval()((x - mean) / std))


def test_tiny_model_trains_on_cpu():
    model = create_model("wrn-tiny", in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- describe
def test_describe_counts_params_and_macs():
    model = create_model("wrn-tiny", in_channels=1)
    d = describe(model, (1, 8, 8))
    assert [p.name for p in d.parts] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert d.total_params == sum(p.numel() for p in model.parameters())
    assert d.parts[0].macs == 8 * 8 * 8 * 1 * 9  # stem: H*W*C_out*C_in*k*k
    assert d.parts[-1].macs == 64 * 10 and d.parts[-1].output_shape == [10]
    # stage 2: conv1 (16->32, stride 2, 4x4 out) + conv2 (32->32) + 1x1 shortcut
    assert d.parts[2].macs == 16 * (32 * 16 * 9 + 32 * 32 * 9 + 32 * 16)
    assert d.parts[2].output_shape == [32, 4, 4]
    assert "total" in d.table() and d.to_dict()["total_macs"] == d.total_macs


def test_describe_wrn_34_r_stage_params():
    d = describe(meta_model("wrn-34-r"), (3, 32, 32))
    assert d.total_params == 68_116_698
    assert [p.output_shape for p in d.parts[1:4]] == [[320, 32, 32], [640, 16, 16], [512, 8, 8]]


def test_resnet_classes_exported():
    assert isinstance(create_model("resnet-tiny"), ResNet)
    assert isinstance(create_model("preact-resnet-tiny"), PreActResNet)
