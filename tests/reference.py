"""Independent references for tests: the checkpoint key layouts (tests/fixtures/reference, copies of
../shared/reference), and the hand-written Lipschitz graphs archlip's models carried before tracing."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lipschitz import graph as G

#: The key lists shipped with the tests (copies of ../shared/reference, so the tests never skip without it).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
#: The shared originals (CI clones shared/ beside the repo); tests check the copies still agree with them.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def parse_reference(text: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a key list (``key<TAB>d1,d2,...`` lines; ``#`` comments)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition("\t")
        out[key] = tuple(int(s) for s in shape.split(",")) if shape.strip() else ()
    return out


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the shipped reference key list ``name`` (tests/fixtures/reference)."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"reference key list {path} is missing from the test fixtures")
    return parse_reference(path.read_text())


def handwritten_graph(model: nn.Module) -> G.Node:
    """The hand-written graphs archlip's WideResNet, ResNet and PreActResNet exported before their graphs were
    traced (``lipschitz.graph_from_module``): the reference the traced graphs are compared with, and the
    baseline of ``benchmarks/trace_overhead.py``."""
    from experiments.models import WideResNet

    def act(name):
        return G.Activation(model.activation, name=name)

    def preact(name, bn1, inner, shortcut, on_preact=True):
        pre = [G.BatchNorm(bn1, name=f"{name}.bn1"), act(f"{name}.act1")]
        if shortcut is None or not on_preact:  # the shortcut (if any) reads the block's raw input
            short = None if shortcut is None else G.Layer(shortcut, name=f"{name}.shortcut")
            return G.Residual(G.Sequential(pre + inner, name=f"{name}.branch"), short, name=name, role="block")
        res = G.Residual(G.Sequential(inner, name=f"{name}.branch"), G.Layer(shortcut, name=f"{name}.shortcut"),
                         name=f"{name}.residual")
        return G.Sequential(pre + [res], name=name, role="block")

    children = []
    if model.normalize is not None:
        children.append(G.Normalize(model.normalize.mean.flatten(), model.normalize.std.flatten(), name="normalize"))
    if isinstance(model, WideResNet):
        children.append(G.Sequential([G.Layer(model.stem_conv, name="stem_conv")], name="stem", role="stem"))
        for i, stage in enumerate(model.blocks):
            blocks = []
            for j, b in enumerate(stage.layer):
                n = f"blocks.{i}.layer.{j}"
                inner = [G.Layer(b.conv1), G.BatchNorm(b.bn2), act(f"{n}.act2"), G.Layer(b.conv2)]
                blocks.append(preact(n, b.bn1, inner, b.convShortcut, b.shortcut_on_preact))
            children.append(G.Sequential(blocks, name=f"stage{i + 1}", role="stage"))
        head = [G.BatchNorm(model.bn1), act("act"), G.Pool(model.global_pooling), G.Flatten(), G.Layer(model.fc)]
    else:
        stem = [G.Layer(model.conv1)] + ([] if model.preact else [G.BatchNorm(model.bn1), act("act")])
        children.append(G.Sequential(stem, name="stem", role="stem"))
        for k, stage in enumerate(model.stages()):
            blocks = []
            for j, b in enumerate(stage):
                n = f"layer{k + 1}.{j}"
                if model.preact:
                    inner = [G.Layer(b.conv1), G.BatchNorm(b.bn2), act(f"{n}.act2"), G.Layer(b.conv2)]
                    blocks.append(preact(n, b.bn1, inner, None if b.shortcut is None else b.shortcut[0],
                                          b.shortcut_input == "preact"))
                    continue
                branch = G.Sequential([G.Layer(b.conv1), G.BatchNorm(b.bn1), act("a"), G.Layer(b.conv2),
                                       G.BatchNorm(b.bn2)], name=f"{n}.branch")
                short = None if len(b.shortcut) == 0 else G.Sequential(
                    [G.Layer(b.shortcut[0]), G.BatchNorm(b.shortcut[1])], name=f"{n}.shortcut")
                blocks.append(G.Sequential([G.Residual(branch, short, name=f"{n}.residual"), act(f"{n}.act2")],
                                           name=n, role="block"))
            children.append(G.Sequential(blocks, name=f"stage{k + 1}", role="stage"))
        head = ([G.BatchNorm(model.bn), act("act")] if model.preact else []) + [
            G.Pool(model.global_pooling), G.Flatten(), G.Layer(model.linear)]
    children.append(G.Sequential(head, name="head", role="head"))
    return G.Sequential(children, name="reference")
