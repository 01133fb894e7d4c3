"""Checkpoints: reference layouts, classic TRADES mapping, safe refusal, strict diffs, inference, round trips."""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments import checkpoints as ck
from experiments.models import create_model, list_models, model_config
from tests.reference import read_reference


def reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Meta tensors with exactly the keys and shapes of a reference key list."""
    return {key: torch.empty(shape, dtype=torch.int64 if key.endswith("num_batches_tracked") else torch.float32,
                             device="meta")
            for key, shape in read_reference(name).items()}


def meta_model(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kw)


def tiny(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("wrn-tiny", in_channels=1, **kw)
    for m in model.modules():  # non-trivial BN statistics so that a wrong mapping shows in the outputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def to_classic(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> classic TRADES keys, plus TRADES' unused sub_block1 (a copy of block1)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.", key)
        out[key.replace("stem_conv.", "conv1.")] = value
    out.update({k.replace("block1.", "sub_block1.", 1): v.clone() for k, v in out.items() if k.startswith("block1.")})
    return out


X = torch.rand(5, 1, 8, 8)


# ------------------------------------------------------------------------------------------------ reference layouts


def test_reference_robustwideresnet_keys_load_strictly_and_infer_wrn_34_r():
    state = reference_state_dict("wrn-34-r_robustwideresnet_keys.tsv")
    assert ck.detect_layout(state) == "robustwideresnet"
    assert ck.state_dict_diff(meta_model("wrn-34-r"), state) is None
    config = ck.infer_architecture(state, match_preset=True)
    assert config["name"] == "wrn-34-r"
    assert (config["depths"], config["widths"], config["strides"]) == ([5, 5, 5], [16, 320, 640, 512], [1, 2, 2])


def test_reference_classic_layout_maps_onto_wrn_34_10(caplog):
    state = reference_state_dict("wrn-34-10_classic_keys.tsv")
    state.update({k.replace("block1.", "sub_block1.", 1): v for k, v in state.items() if k.startswith("block1.")})
    mapped, layout, notes = ck.canonical_state_dict(state)
    assert layout == "classic-wrn" and any("sub_block1" in n for n in notes)
    assert not any(k.startswith(("sub_block1", "block1", "conv1")) for k in mapped)
    assert ck.state_dict_diff(meta_model("wrn-34-10"), mapped) is None
    assert ck.infer_architecture(state, match_preset=True)["name"] == "wrn-34-10"


def test_classic_checkpoint_gives_the_same_function(tmp_path, caplog):
    model = tiny()
    path = tmp_path / "trades.pt"
    torch.save({"model_state_dict": to_classic(model.state_dict()), "epoch": 76, "optimizer": "sgd"}, path)
    with caplog.at_level(logging.WARNING, logger="archlip.checkpoints"):
        loaded = ck.load_checkpoint(path)
    assert "sub_block1" in caplog.text
    assert loaded.layout == "classic-wrn" and loaded.source_format == "torch-model_state_dict"
    assert loaded.metadata == {"epoch": 76, "optimizer": "sgd"}
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ architecture inference


AMBIGUOUS = ("preact-resnet", "dm-wideresnet", "dm-preact-resnet")  # variants only a name can settle


@pytest.mark.parametrize("name", list_models())
def test_inferred_architecture_equals_the_true_one(name):
    model = meta_model(name, num_classes=7)
    truth = model_config(model)
    if truth["family"] in AMBIGUOUS:
        with pytest.raises(ck.AmbiguousArchitectureError, match="choose one: load_checkpoint.path, model=NAME. or --model"):
            ck.infer_architecture(model.state_dict())
        inferred = ck.infer_architecture(model.state_dict(), match_preset=True, model=name)
    else:
        inferred = ck.infer_architecture(model.state_dict(), match_preset=True)
    for key, value in inferred.items():
        assert truth[key] == value, key
    assert set(truth) - set(inferred) <= {"activation", "normalize", "dropout", "equal_width_shortcut", "input_padding",
                                               "shortcut"}
    if truth["family"] == "wideresnet":  # also from the classic layout
        classic = ck.infer_architecture(to_classic(model.state_dict()))
        assert {k: classic[k] for k in ("depths", "widths", "strides", "num_classes")} == \
               {k: truth[k] for k in ("depths", "widths", "strides", "num_classes")}


def test_inference_of_custom_configurations():
    model = meta_model("wrn-tiny", depths=(3, 1, 2, 1), widths=(4, 4, 8, 8, 16), strides=(1, 2, 1, 2), in_channels=1)
    inferred = ck.infer_architecture(model.state_dict())
    assert inferred["depths"] == [3, 1, 2, 1] and inferred["widths"] == [4, 4, 8, 8, 16]
    assert inferred["strides"] == [1, 2, 1, 2] and inferred["in_channels"] == 1
    with pytest.raises(ValueError, match="no known layout"):
        ck.infer_architecture({"encoder.weight": torch.zeros(2, 2)})
    broken = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match="not contiguous"):
        ck.infer_architecture(broken)


# ------------------------------------------------------------------------------------------------ formats and prefixes


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "module.model."])
def test_torch_formats_and_prefixes(tmp_path, wrap, prefix):
    model = tiny()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    obj = state if wrap == "bare" else {wrap: state, "epoch": 3, "optimizer_state_dict": {"state": {}, "lr": [0.1]}}
    torch.save(obj, tmp_path / "ckpt.pth")
    model_out, metadata = ck.load_checkpoint(tmp_path / "ckpt.pth")
    torch.testing.assert_close(model_out(X), model(X), rtol=0, atol=0)
    assert metadata == ({} if wrap == "bare" else {"epoch": 3})


def test_load_into_a_given_model(tmp_path):
    model = tiny(seed=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    target = create_model("wrn-tiny", in_channels=1, activation="silu")
    loaded = ck.load_checkpoint(tmp_path / "w.pt", model=target)
    assert loaded.model is target
    assert torch.equal(target.fc.weight, model.fc.weight)


def test_archlip_format_round_trip(tmp_path):
    model = tiny(activation="silu", normalize=((0.5,), (0.25,)), depths=(2, 1, 1))
    path = ck.save_checkpoint(tmp_path / "run" / "model_final", model, {"config": {"lr": 0.1}, "metrics": {"acc": 0.9}})
    assert path == tmp_path / "run" / "model_final.safetensors" and path.is_file()
    meta = json.loads((tmp_path / "run" / "model_final.json").read_text())
    assert meta["format"] == ck.FORMAT and meta["arch"]["activation"] == "silu" and meta["metrics"] == {"acc": 0.9}
    loaded = ck.load_checkpoint(path)
    assert loaded.source_format == ck.FORMAT and loaded.metadata["config"] == {"lr": 0.1}
    assert model_config(loaded.model) == model_config(model)
    torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)
    # without the sidecar the weights still load; architecture inferred (activation falls back to relu)
    (tmp_path / "run" / "model_final.json").unlink()
    bare = ck.load_checkpoint(path)
    assert bare.source_format == "safetensors" and bare.model.depths == (2, 1, 1)
    assert any("inferred" in n for n in bare.notes)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ck.save_checkpoint(tmp_path / "x", model, {"metrics": {"acc": float("nan")}})
    with pytest.raises(ValueError, match="written by save_checkpoint"):
        ck.save_checkpoint(tmp_path / "x", model, {"arch": "mine"})


def test_save_unwraps_data_parallel(tmp_path):
    model = tiny()
    path = ck.save_checkpoint(tmp_path / "m.safetensors", nn.DataParallel(model), {})
    assert ck.load_checkpoint(path).model.fc.weight.shape == model.fc.weight.shape


def test_resnet_checkpoints_load(tmp_path):
    for name in ("resnet-tiny", "preact-resnet-tiny", "preact-resnet-tiny-input-shortcut"):
        model = create_model(name).eval()
        torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / f"{name}.pt")
        if name.startswith("preact"):  # the keys cannot tell the shortcut variants apart: a name must choose
            with pytest.raises(ck.AmbiguousArchitectureError, match="input-shortcut"):
                ck.load_checkpoint(tmp_path / f"{name}.pt")
        loaded = ck.load_checkpoint(tmp_path / f"{name}.pt", model=name if name.startswith("preact") else None)
        x = torch.rand(2, 3, 8, 8)
        assert type(loaded.model) is type(model) and loaded.model.model_name == name
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ refusals and errors


class CreatesFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny().state_dict(), "hook": CreatesFile(target)}, evil)
    with pytest.raises(ValueError, match="refusing to unpickle.*could run code") as info:
        ck.load_checkpoint(evil)
    assert "\n" not in str(info.value)
    assert not target.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(CreatesFile(target), protocol=2))
    with pytest.raises(ValueError, match=r"refusing to unpickle.*\(io\.open\)"):
        ck.load_checkpoint(raw)
    assert not target.exists()


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(tiny().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    for path in (truncated, text):
        with pytest.raises(ValueError, match="not a readable checkpoint") as info:
            ck.load_checkpoint(path)
        assert "\n" not in str(info.value)
    saved = ck.save_checkpoint(tmp_path / "s", tiny(), {})
    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ck.load_checkpoint(saved)
    with pytest.raises(FileNotFoundError, match="check the path"):
        ck.load_checkpoint(tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        ck.load_checkpoint(tmp_path / "list.pt")
    torch.save({"epoch": 1, "acc": 0.5}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="no state_dict found"):
        ck.load_checkpoint(tmp_path / "nostate.pt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(tmp_path, bad):
    state = tiny().state_dict()
    state["blocks.1.layer.0.conv2.weight"][0, 0, 0, 0] = bad
    torch.save(state, tmp_path / "bad.pt")
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"'blocks\.1\.layer\.0\.conv2\.weight' contains {kind} \(1 of 9216"):
        ck.load_checkpoint(tmp_path / "bad.pt")


def test_mismatch_gives_one_readable_diff(tmp_path):
    state = tiny().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["blocks.0.layer.0.conv1.weight"] = torch.zeros(16, 4, 3, 3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.load_checkpoint(tmp_path / "wrong.pt", model=tiny())
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 wrong-shape keys" in message
    assert "missing:     fc.bias" in message and "unexpected:  extra.weight" in message
    assert "wrong shape: blocks.0.layer.0.conv1.weight checkpoint (16, 4, 3, 3) vs model (16, 8, 3, 3)" in message
    assert len(message.splitlines()) == 4
    # an inferred architecture that the checkpoint contradicts (wrong num_classes for the given model)
    torch.save(tiny().state_dict(), tmp_path / "ok.pt")
    with pytest.raises(ck.CheckpointMismatchError, match="fc.weight checkpoint"):
        ck.load_checkpoint(tmp_path / "ok.pt", model=create_model("wrn-tiny", in_channels=1, num_classes=3))


def test_safetensors_recognised_by_content(tmp_path):
    model = tiny()
    path = ck.save_checkpoint(tmp_path / "w", model, {})
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(path.read_bytes())
    loaded = ck.load_checkpoint(renamed)
    assert loaded.source_format == "safetensors"
    torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)


def test_shipped_reference_key_lists_match_the_shared_originals():
    """tests/fixtures/reference are copies of ../shared/reference: where the originals are present, they agree."""
    from tests.reference import FIXTURES, REFERENCE, parse_reference

    names = sorted(p.name for p in FIXTURES.glob("*.tsv"))
    assert names == ["wrn-34-10_classic_keys.tsv", "wrn-34-r_robustwideresnet_keys.tsv"]
    for name in names:
        keys = read_reference(name)
        assert len(keys) > 100 and all(isinstance(s, tuple) for s in keys.values())
        if (REFERENCE / name).exists():
            assert parse_reference((REFERENCE / name).read_text()) == keys
