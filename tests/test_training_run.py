"""End-to-end training runs on digits: robustness gain, run folder, resume bit-exactness, DDP equivalence."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.attacks import pgd
from experiments.checkpoints import load_checkpoint
from experiments.config import ConfigError, load_config
from experiments.data import load_digits
from experiments.models import create_model
from experiments.training import train
from experiments.training.checkpointing import load_resume_state
from experiments.training.loop import RunExistsError, batches_per_epoch, check_speed_switches

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# a few seconds per epoch on one thread: 512 images, batch 64, PGD-2
SMALL = ["model.overrides.widths=[4,8,8,8]", "data.train_limit=512", "data.val_size=100", "attack.steps=2",
         "attack.step_size=0.06", "selection.pgd_steps=3", "run.progress=false", "run.num_threads=1"]


def _pgd_acc(model, x, y, eps=0.1):
    model.eval()
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def test_tiny_digits_run_improves_pgd_accuracy(tmp_path):
    cfg = load_config("digits-pgdat-tiny", ["run.epochs=2", "selection.pgd_steps=5", "run.progress=false"])
    t0 = time.process_time()
    summary = train(cfg, tmp_path)
    cpu = time.process_time() - t0
    assert summary["status"] == "completed" and cpu < 60
    x, y = load_digits("test")
    trained, meta = load_checkpoint(summary["files"]["final_model"])
    torch.manual_seed(0)
    untrained = create_model("wrn-tiny", num_classes=10, in_channels=1)
    before, after = _pgd_acc(untrained, x, y), _pgd_acc(trained, x, y)
    assert after > before + 0.3, (before, after)
    assert meta["method"] == "pgd_at" and meta["kind"] == "final"
    # run folder: resolved config, one metrics row per epoch, summary, best model chosen on validation
    assert load_config(tmp_path / "resolved_config.yaml") == cfg
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("val_pgd_acc" in r for r in rows)
    best = max(rows, key=lambda r: r["val_pgd_acc"])
    assert summary["selection"]["best_value"] == best["val_pgd_acc"]
    assert json.loads((tmp_path / "train_summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "model_best.safetensors").is_file()


@pytest.mark.parametrize("method", ["trades", "mart", "fgsm_rs", "standard"])
def test_every_method_trains_one_epoch(tmp_path, method):
    extra = ["ema.enabled=true", "optim.nesterov=true", "method.label_smoothing=0.1"] if method == "trades" else []
    cfg = load_config("digits-pgdat-tiny", SMALL + [f"method.name={method}", "run.epochs=1", "data.train_limit=128",
                                                    "selection.metric=clean_acc"] + extra)
    summary = train(cfg, tmp_path)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["status"] == "completed" and row["train_loss"] > 0 and row["val_clean_acc"] >= 0
    if method in ("trades", "mart", "standard"):
        assert row["train_clean_acc"] is not None


def test_run_folder_guards(tmp_path, caplog):
    cfg = load_config("digits-pgdat-tiny", SMALL + ["run.epochs=1", "data.train_limit=64", "selection.metric=last"])
    # resume of a run killed before its first checkpoint (or never started): starts from scratch, with a note
    assert train(cfg, tmp_path / "new", resume=True)["status"] == "completed"
    assert "holds no resume checkpoint" in caplog.text
    train(cfg, tmp_path / "run")
    with pytest.raises(RunExistsError, match="already holds a training run"):
        train(cfg, tmp_path / "run")
    changed = load_config("digits-pgdat-tiny", SMALL + ["run.epochs=1", "data.train_limit=64", "selection.metric=last",
                                                        "optim.lr=0.5"])
    with pytest.raises(ValueError, match="optim.lr: 0.1 -> 0.5"):
        train(changed, tmp_path / "run", resume=True)
    assert not (tmp_path / "run" / ".archlip.lock").exists(), "the lock file goes with its holder"


def test_a_bad_model_override_creates_no_run_folder(tmp_path):
    cfg = load_config("digits-pgdat-tiny", SMALL + ["model.overrides.widht=[4,8,8,8]"])
    with pytest.raises(ConfigError, match="widht"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_speed_switches_are_wired_and_rejected_clearly(tmp_path, monkeypatch):
    cfg = load_config("digits-pgdat-tiny", SMALL + ["run.epochs=1", "data.train_limit=64", "selection.metric=last",
                                                    "speed.amp=bf16", "speed.channels_last=true", "data.augment=true"])
    assert train(cfg, tmp_path / "bf16")["status"] == "completed"
    with pytest.raises(ConfigError, match="choose one of none, bf16"):
        load_config(None, ["speed.amp=fp8"])
    with pytest.raises(ValueError, match="channels_last needs image batches"):
        check_speed_switches(cfg, torch.device("cpu"), image_dims=2)
    compiled = load_config(None, ["speed.compile=true"])
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        check_speed_switches(compiled, torch.device("cpu"), image_dims=4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(load_config("digits-pgdat-tiny", SMALL + ["run.device=cuda"]), tmp_path / "cuda")


DRIVER = textwrap.dedent("""
    import sys, time
    from experiments.config import load_config
    from experiments.training import train
    cfg = load_config(sys.argv[1], sys.argv[3:])
    def on_step(info):
        print("step", info["global_step"], flush=True)
        if info["global_step"] >= 3:
            time.sleep(0.5)
    summary = train(cfg, sys.argv[2], on_step=on_step)
    print("status", summary["status"], flush=True)
""")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path):
    overrides = SMALL + ["run.epochs=2", "data.train_limit=256", "ema.enabled=true", "data.augment=true",
                         "selection.metric=pgd_acc"]
    cfg = load_config("digits-pgdat-tiny", overrides)
    train(cfg, tmp_path / "straight")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PY, str(driver), "digits-pgdat-tiny", str(tmp_path / "killed"), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        if line.strip() == "step 3":
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "status interrupted" in out
    state = load_resume_state(tmp_path / "killed" / "resume.pt")
    assert state["progress"]["epoch"] == 0 and 0 < state["progress"]["batch"] < 4  # mid-epoch (4 steps/epoch)
    summary = train(cfg, tmp_path / "killed", resume=True)
    assert summary["status"] == "completed" and summary["global_step"] == 8
    a, b = _weights(tmp_path / "straight" / "model_final.safetensors"), _weights(tmp_path / "killed" / "model_final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = load_resume_state(tmp_path / "straight" / "resume.pt")
    rb = load_resume_state(tmp_path / "killed" / "resume.pt")
    for k in ra["model"]:
        assert torch.equal(ra["model"][k], rb["model"][k]), k
    for k in ra["ema"]["shadow"]:
        assert torch.equal(ra["ema"]["shadow"][k], rb["ema"]["shadow"][k]), k
    rows_a = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]
    assert [r["val_pgd_acc"] for r in rows_a] == [r["val_pgd_acc"] for r in rows_b]


NO_BN_MODEL = textwrap.dedent("""
    from torch import nn
    from experiments.models.registry import list_models, register_model

    class NoBNConvNet(nn.Sequential):
        \"\"\"conv-relu-conv-relu-linear without batch norm: DDP shards then see exactly the global batch's math\"\"\"

        def __init__(self, num_classes=10, in_channels=1, width=6):
            super().__init__(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(width * 16, num_classes))
            self.cfg = {"family": "test-nobn", "num_classes": num_classes, "in_channels": in_channels, "width": width}

        def arch_config(self):
            return dict(self.cfg)

    if "test-nobn-convnet" not in list_models():
        register_model("test-nobn-convnet")(NoBNConvNet)
""")

DDP_DRIVER = NO_BN_MODEL + textwrap.dedent("""
    import sys
    from experiments.config import load_config
    from experiments.training import train
    train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two(tmp_path: Path, driver_text: str, overrides: list[str]) -> None:
    """Run ``driver_text`` under torchrun with 2 CPU processes (gloo) training into ``tmp_path/ddp``."""
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(driver_text)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          str(driver), "digits-pgdat-tiny", str(tmp_path / "ddp"), *overrides],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    exec(NO_BN_MODEL, {})  # register the BN-free model in this process too
    overrides = ["model.name=test-nobn-convnet", "model.overrides={}", "data.train_limit=256", "data.val_size=64",
                 "attack.steps=2", "attack.step_size=0.06", "run.progress=false", "run.num_threads=1",
                 "run.epochs=1", "selection.metric=last", "distributed.backend=gloo", "data.augment=true"]
    cfg = load_config("digits-pgdat-tiny", overrides)
    single = train(cfg, tmp_path / "single")
    _torchrun_two(tmp_path, DDP_DRIVER, overrides)
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == single["global_step"]
    a, b = _weights(tmp_path / "single" / "model_final.safetensors"), _weights(tmp_path / "ddp" / "model_final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    moved = sum((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved < 1e-3
    row_a = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])
    row_b = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert row_a["train_adv_acc"] == row_b["train_adv_acc"]
    assert row_a["val_clean_acc"] == pytest.approx(row_b["val_clean_acc"])
    assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-5)


def test_resuming_a_completed_run_keeps_its_validation_summary(tmp_path):
    cfg = load_config("digits-pgdat-tiny", SMALL + ["run.epochs=1", "data.train_limit=128", "data.val_size=32"])
    first = train(cfg, tmp_path)
    assert first["final_val"], "a completed run reports its last validation"
    again = train(cfg, tmp_path, resume=True)  # nothing left to train
    assert again["status"] == "completed" and again["global_step"] == first["global_step"]
    assert again["final_val"] == first["final_val"]
    assert json.loads((tmp_path / "train_summary.json").read_text())["final_val"] == first["final_val"]


# ---------------------------------------------------------------------------------------------- extra data

FAKE_EXTRA = textwrap.dedent("""
    import torch
    from experiments.data import load_digits
    from experiments.training import loop

    def fake_training_data(cfg):
        \"\"\"digits as the original set (300 train, 60 validation) and 400 mirrored digits as the extra set\"\"\"
        x, y = load_digits("trainval")
        return loop.TrainData(x[:300].contiguous(), y[:300], x[300:360].contiguous(), y[300:360], 10,
                              x_extra=x[400:800].flip(-1).contiguous(), y_extra=y[400:800], n_original=360)

    loop.load_training_data = fake_training_data
""")


def extra_overrides(tmp_path: Path) -> list[str]:
    """Extra-data settings; the pickle is a placeholder (FAKE_EXTRA's loader never reads it, the config check
    only wants it to exist)."""
    placeholder = tmp_path / "unused.pickle"
    placeholder.write_bytes(b"")
    return SMALL + [f"data.extra_data={placeholder}", "data.extra_fraction=0.5", "data.epoch_size=200",
                    "selection.metric=last", "run.epochs=2"]


def test_extra_data_epoch_length_follows_the_reference():
    recipe = load_config("cifar10-trades-extra-wrn-34-r")
    steps = batches_per_epoch(recipe, n_train=49_000, n_original=50_000)
    assert steps == math.ceil(50_000 / 256) == 196 and steps * recipe.run.epochs == 78_400
    assert recipe.optim.grad_clip is None  # the reference does not clip (-1)
    assert batches_per_epoch(load_config("cifar10-trades-wrn-34-r"), 49_000, 50_000) == 49_000 // 128
    with pytest.raises(ConfigError, match="epoch_size"):
        load_config("digits-pgdat-tiny", ["data.epoch_size=100"])


def test_extra_data_run_mixes_both_sources_and_resumes_bit_exactly(tmp_path, monkeypatch):
    namespace: dict = {}
    exec(FAKE_EXTRA, namespace)  # patches experiments.training.loop.load_training_data
    cfg = load_config("digits-pgdat-tiny", extra_overrides(tmp_path))
    seen = []
    straight = train(cfg, tmp_path / "straight", on_step=seen.append)
    assert straight["steps_per_epoch"] == math.ceil(200 / 64) == 4 and straight["global_step"] == 8
    assert all(0 < s["extra_in_shard"] < s["shard_size"] == 64 for s in seen)

    def stop_after_three(info):  # SIGINT to ourselves: the loop checkpoints mid-epoch and returns "interrupted"
        if info["global_step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(cfg, tmp_path / "killed", on_step=stop_after_three)
    assert first["status"] == "interrupted" and first["global_step"] == 3
    resumed = train(cfg, tmp_path / "killed", resume=True)
    assert resumed["status"] == "completed" and resumed["global_step"] == 8
    a = _weights(tmp_path / "straight" / "model_final.safetensors")
    b = _weights(tmp_path / "killed" / "model_final.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


EXTRA_DDP_DRIVER = FAKE_EXTRA + textwrap.dedent("""
    import json, os, sys
    from experiments.config import load_config
    from experiments.training import train
    rank = os.environ["RANK"]
    with open(os.path.join(sys.argv[2] + "-steps", f"rank{rank}.jsonl"), "a") as log:
        train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2],
              on_step=lambda info: log.write(json.dumps(info) + "\\n"))
""")


@pytest.mark.slow
def test_ddp_extra_data_every_rank_sees_both_sources(tmp_path):
    (tmp_path / "ddp-steps").mkdir()
    _torchrun_two(tmp_path, EXTRA_DDP_DRIVER, extra_overrides(tmp_path) + ["run.epochs=1", "distributed.backend=gloo"])
    for rank in (0, 1):
        steps = [json.loads(line) for line in (tmp_path / "ddp-steps" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(steps) == 4 and all(s["rank"] == rank and s["shard_size"] == 32 for s in steps)
        assert all(0 < s["extra_in_shard"] < 32 for s in steps), [s["extra_in_shard"] for s in steps]


def test_the_saved_model_is_the_ema_shadow(tmp_path):
    """With decay 1 and no warm-up the weight average never moves: the saved model is the initial one."""
    from experiments.training.loop import build_model

    cfg = load_config("digits-pgdat-tiny", SMALL + ["run.epochs=1", "data.train_limit=128", "ema.enabled=true",
                                                    "ema.decay=1.0", "ema.warmup=false", "selection.metric=last"])
    summary = train(cfg, tmp_path)
    saved = _weights(Path(summary["files"]["final_model"]))
    torch.manual_seed(cfg.run.seed)
    initial = build_model(cfg, in_channels=1, num_classes=10).state_dict()
    moved = 0
    for k, v in initial.items():
        if v.is_floating_point():
            assert torch.equal(saved[k], v), k
        else:
            moved += int(saved[k].item() != v.item())  # num_batches_tracked is copied from the live model
    assert moved > 0


# ------------------------------------------------------------------------------------------ run folders (issue 19)

# 2 steps per epoch, a schedule that does not depend on run.epochs (so a finished run can be extended)
EXT = SMALL + ["data.train_limit=128", "schedule.name=multistep", "schedule.milestones=[1.5]", "ema.enabled=true"]


@pytest.fixture(scope="module")
def straight_two_epochs(tmp_path_factory):
    """A lone 2-epoch run, written under umask 022."""
    out = tmp_path_factory.mktemp("straight")
    previous = os.umask(0o022)
    try:
        summary = train(load_config("digits-pgdat-tiny", EXT + ["run.epochs=2"]), out)
    finally:
        os.umask(previous)
    assert summary["status"] == "completed"
    return out


def _stop_at(step: int):
    def on_step(info):
        if info["global_step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints and returns "interrupted"
    return on_step


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a / "model_final.safetensors"), _weights(b / "model_final.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows_a = [json.loads(r) for r in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]
    assert [r["val_pgd_acc"] for r in rows_a] == [r["val_pgd_acc"] for r in rows_b]


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}


def test_files_follow_the_umask(straight_two_epochs):
    modes = _modes(straight_two_epochs)
    assert {"resume.pt", "train_summary.json", "model_final.safetensors", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_torn_metrics_line_and_stale_temps_then_resume_is_bit_identical(tmp_path, straight_two_epochs, caplog):
    cfg = load_config("digits-pgdat-tiny", EXT + ["run.epochs=2"])
    run = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        assert train(cfg, run, on_step=_stop_at(3))["status"] == "interrupted"  # epoch 1, batch 1
        # a power loss during the next append, and two writers killed mid-write
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write('{"epoch": 1, "global_step": 4, "lr": 0.1, "train_lo')
        for name in (".resume.pt.k3j_9x2a.tmp", ".model_best.safetensors.abcdefgh.tmp", "summary.json.tmp"):
            (run / name).write_bytes(b"partial")
        (run / "notes.tmp").write_text("not ours")
        summary = train(cfg, run, resume=True)
    finally:
        os.umask(previous)
    assert summary["status"] == "completed"
    assert "torn last line" in caplog.text and "removed 3 temporary file(s)" in caplog.text
    assert sorted(p.name for p in run.glob("*.tmp")) == ["notes.tmp"]
    _assert_same_run(straight_two_epochs, run)
    modes = _modes(run)
    modes.pop("notes.tmp")
    assert set(modes.values()) == {0o640}, modes


def test_a_finished_run_can_be_extended_when_the_schedule_allows(tmp_path, straight_two_epochs, caplog):
    run = tmp_path / "run"
    assert train(load_config("digits-pgdat-tiny", EXT + ["run.epochs=1"]), run)["epochs_completed"] == 1
    longer = load_config("digits-pgdat-tiny", EXT + ["run.epochs=2"])
    summary = train(longer, run, resume=True)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert "run.epochs 1 -> 2" in caplog.text
    assert load_config(run / "resolved_config.yaml") == longer
    _assert_same_run(straight_two_epochs, run)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        train(load_config("digits-pgdat-tiny", EXT + ["run.epochs=1"]), run, resume=True)
    cosine = SMALL + ["data.train_limit=64", "selection.metric=last", "run.epochs=1"]
    train(load_config("digits-pgdat-tiny", cosine), tmp_path / "cosine")
    with pytest.raises(ConfigError, match="cosine schedule spreads over run.epochs"):
        train(load_config("digits-pgdat-tiny", cosine[:-1] + ["run.epochs=2"]), tmp_path / "cosine", resume=True)
