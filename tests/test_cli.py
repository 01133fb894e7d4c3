"""The archlip CLI end to end on tiny inputs: each subcommand, --json parses, bad inputs give one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([*argv, "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ parsers


def test_parse_count_fraction_shape_attacks():
    assert cli.parse_count("68M") == 68_000_000
    assert cli.parse_count("1.5k") == 1500
    assert cli.parse_count("46160474") == 46160474
    assert cli.parse_fraction("8/255") == pytest.approx(8 / 255)
    assert cli.parse_fraction("0.031") == 0.031
    assert cli.parse_shape("3x32x32") == (3, 32, 32)
    assert cli.parse_shape("1,8,8") == (1, 8, 8)
    assert cli.parse_int_list("5, 5,5") == (5, 5, 5)
    assert cli.parse_attacks("pgd20,cw20, aa") == ["pgd20", "cw20", "aa"]
    for bad, fn in (("68Q", cli.parse_count), ("-3M", cli.parse_count), ("8/0", cli.parse_fraction),
                    ("axb", cli.parse_shape), ("", cli.parse_attacks), ("5,x", cli.parse_int_list)):
        with pytest.raises(ValueError):
            fn(bad)


def test_format_table_and_jsonable():
    text = cli.format_table([{"a": 1.234567, "b": [3, 4]}, {"a": None, "b": "x"}], ["a", "b"])
    assert text.splitlines()[0].split() == ["a", "b"] and "1.235" in text and "3x4" in text
    import torch

    from spectral.guarantee import Guarantee, NormValue

    payload = cli.to_jsonable({"t": torch.tensor([1.0, 2.0]), "g": Guarantee.UPPER, "nan": float("nan"),
                               "inf": float("-inf"), "nv": NormValue(1.0, Guarantee.LOWER, "power"), "p": Path("/x")})
    assert json.loads(json.dumps(payload)) == {
        "t": [1.0, 2.0], "g": "certified_upper", "nan": None, "inf": "-inf", "p": "/x",
        "nv": {"value": 1.0, "guarantee": "lower", "method": "power", "iterations": None, "seconds": 0.0, "details": {}}}


def test_norm_value_repr_is_short_in_a_notebook():
    import torch

    from spectral.guarantee import Guarantee, NormValue

    value = NormValue(3.14159265, Guarantee.UPPER, "fft", iterations=12,
                      details={"u": torch.randn(128), "v": list(range(128)), "blocks": 4})
    text = repr(value)
    assert text.startswith("NormValue(3.14159, certified_upper, method='fft', iterations=12")
    assert "details: u, v, blocks" in text and len(text) < 120


# ------------------------------------------------------------------------------------------ user errors


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_unknown_preset_lists_presets(capsys):
    code, _, err = run_cli(capsys, "spectral", "wrn-99-99", "--data", "digits")
    assert_one_line_error(code, err, "neither a checkpoint file nor a model preset", "wrn-34-r", "wrn-tiny")


def test_missing_checkpoint_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bound", str(tmp_path / "nope.pt"))
    assert_one_line_error(code, err, "not found")


def test_cuda_requested_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "spectral", "wrn-tiny", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available", "--device cpu")


def test_wrong_input_shape_and_negative_n(capsys, tmp_path):
    code, _, err = run_cli(capsys, "spectral", "wrn-tiny", "--input-shape", "3")
    assert_one_line_error(code, err, "cannot take inputs of shape 3", "--input-shape")
    code, _, err = run_cli(capsys, "bound", "wrn-tiny", "--data", "digits", "--n", "-3")
    assert_one_line_error(code, err, "--n must be >= 0")
    (tmp_path / "f.txt").write_text("x")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "f.txt"))
    assert_one_line_error(code, err, "is a file")


def test_missing_dataset_says_where_and_how(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "wrn-tiny", "--data", "cifar10")
    assert_one_line_error(code, err, "--data-root", "--download")
    code, _, err = run_cli(capsys, "eval", "wrn-tiny", "--data", "cifar10", "--data-root", str(tmp_path))
    assert_one_line_error(code, err, "cifar-10", "download")


def test_bad_recipe_override_and_unknown_recipe(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "digits-pgdat-tiny", "--set", "optim.lrr=0.1", "--out", str(tmp_path))
    assert_one_line_error(code, err, "optim.lrr", "lr")
    code, _, err = run_cli(capsys, "train", "no-such-recipe", "--out", str(tmp_path))
    assert_one_line_error(code, err, "digits-pgdat-tiny")


def test_bad_budget_and_unknown_sweep(capsys):
    code, _, err = run_cli(capsys, "theory", "optimal-config", "--budget", "lots")
    assert_one_line_error(code, err, "68M")
    code, _, err = run_cli(capsys, "sweep", "no-such-sweep")
    assert_one_line_error(code, err, "digits-cpu")


def test_report_on_empty_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert_one_line_error(code, err, "results.json")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "not found")


def test_console_script_exit_code_and_no_traceback():
    """The installed entry point returns 2 with one stderr line (a real subprocess)."""
    exe = Path(sys.executable).with_name("archlip")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "experiments.cli"]
    proc = subprocess.run(command + ["spectral", "not-a-model"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "ARCHLIP_TRACEBACK": "0"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "presets:" in proc.stderr


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A tiny digits model trained through `archlip train` (one short epoch)."""
    out = tmp_path_factory.mktemp("train")
    code = cli.main(["train", "digits-pgdat-tiny", "--out", str(out), "--json",
                     "--set", "run.epochs=1", "--set", "data.train_limit=128", "--set", "data.val_size=0",
                     "--set", "selection.metric=last", "--set", "attack.steps=2", "--threads", "1"])
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "completed"
    return Path(summary["files"]["final_model"])


def test_train_json_and_resolved_config(trained_ckpt, capsys):
    run_dir = trained_ckpt.parent
    assert (run_dir / "resolved_config.yaml").is_file()
    capsys.readouterr()


def test_spectral_on_checkpoint_json(trained_ckpt, capsys, tmp_path):
    code, out, err = run_cli(capsys, "spectral", str(trained_ckpt), "--json", "--rtol", "0.1", "--out", str(tmp_path))
    assert code == 0, err
    payload = json.loads(out)
    assert payload["input_shape"] == [1, 8, 8]  # read from the checkpoint's metadata (digits)
    layers = payload["layers"]
    assert len(layers) >= 8
    for row in layers:
        lower, upper = _num(row["lower"]), _num(row["upper"])
        assert 0 < lower <= upper * (1 + 1e-6)
    assert (tmp_path / "spectral.json").is_file() and (tmp_path / "spectral.csv").is_file()


def test_spectral_preset_text_table(capsys):
    code, out, err = run_cli(capsys, "spectral", "wrn-tiny", "--data", "digits", "--rtol", "0.1")
    assert code == 0, err
    assert "stem_conv" in out and "fc" in out


def test_bound_on_checkpoint_json(trained_ckpt, capsys, tmp_path):
    code, out, err = run_cli(capsys, "bound", str(trained_ckpt), "--n", "8", "--json", "--out", str(tmp_path))
    assert code == 0, err
    payload = json.loads(out)
    upper = payload["certified_lipschitz"]
    assert upper > 0 and payload["stage_bounds"]
    lower = payload["lower"]
    assert 0 < lower["empirical_lipschitz"] <= upper
    assert 0 < lower["attack_lipschitz"] <= upper
    assert json.loads((tmp_path / "bound.json").read_text())["certified_lipschitz"] == pytest.approx(upper)
    # the report generator reads archlip bound/spectral outputs too
    code, out, err = run_cli(capsys, "report", str(tmp_path), "--json")
    assert code == 0, err
    assert Path(json.loads(out)["report"]).is_file()


def test_bound_local_writes_certified_radii_beside_attack_radii(trained_ckpt, capsys, tmp_path):
    code, out, err = run_cli(capsys, "bound", str(trained_ckpt), "--n", "0", "--local", "--local-n", "3",
                             "--local-eps-max", "0.5", "--json", "--out", str(tmp_path))
    assert code == 0, err
    local = json.loads(out)["local"]
    assert local["n"] == 3 and (tmp_path / "local.csv").is_file()
    for row in local["rows"]:
        assert row["certified_radius"] <= row["checked_eps"] + 1e-12
        assert row["certified_radius"] <= row["attack_radius"]  # an attack cannot break a certified ball
        if row["predicted"] != row["label"]:
            assert row["certified_radius"] == 0.0


def test_eval_on_checkpoint_json(trained_ckpt, capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", str(trained_ckpt), "--attacks", "pgd10,fgsm", "--n", "32", "--json",
                             "--out", str(tmp_path))
    assert code == 0, err
    payload = json.loads(out)
    assert payload["n"] == 32 and payload["eps"] == pytest.approx(0.1)  # the checkpoint's training eps
    assert set(payload["robust_accuracy"]) == {"pgd10", "fgsm"}
    assert payload["worst_case"]["robust_accuracy"] <= payload["clean_accuracy"]
    assert (tmp_path / "eval_summary.json").is_file()
    code, _, err = run_cli(capsys, "eval", str(trained_ckpt), "--attacks", "pgd-nope", "--n", "4", "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "pgd20")


def test_theory_predict_and_optimal_config_json(capsys):
    code, out, err = run_cli(capsys, "theory", "predict", "--depths", "5,5,5", "--widths", "16,320,640,512", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["theory_prediction"] > 0
    if "theory_params" in payload:
        assert payload["theory_params"] == pytest.approx(68.12e6, rel=1e-3)
    code, out, err = run_cli(capsys, "theory", "optimal-config", "--budget", "2M", "--top", "3", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["budget"] == 2_000_000 and 1 <= len(payload["configs"]) <= 3


def test_sweep_dry_run_json(capsys, tmp_path):
    code, out, err = run_cli(capsys, "sweep", "digits-cpu", "--dry-run", "--json", "--out", str(tmp_path))
    assert code == 0, err
    payload = json.loads(out)
    assert payload["total"] == 6 and len(payload["commands"]) == 6


def _num(v):
    return v["value"] if isinstance(v, dict) else float(v)


def test_demo_subcommand_wiring(capsys, tmp_path, monkeypatch):
    """`archlip demo` passes its flags to run_demo and prints the report path (the pipeline itself is in test_demo)."""
    import experiments.demo as demo

    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs, out=out)
        return {"report": out / "report.md", "results": out / "results.json"}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    code = cli.main(["demo", "--quick", "--out", str(tmp_path / "d"), "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["report"].endswith("report.md")
    assert seen["quick"] is True and seen["seed"] == 3 and seen["threads"] == 1 and seen["device"] == "cpu"
    assert seen["out"] == tmp_path / "d" and seen["verbose"] is False


# ------------------------------------------------------------------------------------------ review regressions


def test_text_file_as_checkpoint_says_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("# my notes, not weights\n")
    code, _, err = run_cli(capsys, "spectral", str(tmp_path / "notes.pt"))
    assert_one_line_error(code, err, "is not a checkpoint", "preset")
    assert "unpickle" not in err


def test_out_is_a_file_fails_before_the_analysis(capsys, tmp_path, monkeypatch):
    import experiments.measure

    def never(*args, **kwargs):
        pytest.fail("the analysis ran although --out is a file")

    monkeypatch.setattr(experiments.measure, "spectral_analyze", never)
    monkeypatch.setattr(experiments.measure, "bound_summary", never)
    (tmp_path / "afile").write_text("x")
    for command in ("spectral", "bound"):
        code, _, err = run_cli(capsys, command, "wrn-tiny", "--data", "digits", "--out", str(tmp_path / "afile"))
        assert_one_line_error(code, err, "is a file")


def test_download_failure_is_one_line(capsys, tmp_path, monkeypatch):
    import experiments.data

    def offline(root, name="cifar10", **kwargs):
        raise OSError(f"could not download {name} (offline); fetch it by hand into {root}")

    monkeypatch.setattr(experiments.data, "download_cifar", offline)
    code, _, err = run_cli(capsys, "eval", "wrn-tiny", "--data", "cifar10", "--data-root", str(tmp_path / "c"),
                           "--download", "--n", "2")
    assert_one_line_error(code, err, "could not download")
    # the missing-data message tells `archlip train` users to pass --download: train must accept it
    code, _, err = run_cli(capsys, "train", "cifar10-sat-wrn-34-r", "--set", f"data.root={tmp_path / 'c'}",
                           "--download", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "could not download")


def test_report_out_is_a_file(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "run"), "--out", str(tmp_path / "afile"))
    assert_one_line_error(code, err, "--out", "is a file", "give a directory")


def test_export_robustbench_writes_a_loadable_state_dict_and_a_card(capsys, tmp_path, trained_ckpt):
    import torch

    from experiments.checkpoints import load_checkpoint

    run_dir = trained_ckpt.parent
    code, out, err = run_cli(capsys, "export", str(run_dir), "--format", "robustbench", "--out", str(tmp_path / "zoo"),
                             "--name", "tiny", "--json")
    assert code == 0, err
    paths = json.loads(out)
    state = torch.load(paths["weights"], weights_only=True)
    assert "stem_conv.weight" in state and any(k.startswith("blocks.0.layer.0.") for k in state)  # RobustWideResNet keys
    card = json.loads(Path(paths["card"]).read_text())
    assert card["zoo_class"] == "RobustWideResNet" and card["dataset"] == "digits" and card["threat_model"] == "Linf"
    assert card["clean_acc"] is None and "archlip eval" in card["evaluation"]
    assert card["training"]["checkpoint"].startswith(("best", "final"))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        original = load_checkpoint(trained_ckpt).model(x)
        torch.testing.assert_close(load_checkpoint(paths["weights"]).model(x), original, rtol=0, atol=0)


def test_model_flag_settles_a_preact_checkpoint(capsys, tmp_path):
    import torch

    from experiments.models import create_model

    torch.save(create_model("preact-resnet-tiny-input-shortcut").state_dict(), tmp_path / "p.pt")
    code, _, err = run_cli(capsys, "spectral", str(tmp_path / "p.pt"), "--input-shape", "3x16x16")
    assert code == 2 and "--model NAME" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "spectral", str(tmp_path / "p.pt"), "--input-shape", "3x16x16",
                             "--model", "preact-resnet-tiny-input-shortcut", "--json")
    assert code == 0, err
# ------------------------------------------------------------------------------------------ run folders and first steps (issue 19)

TINY_TRAIN = ["--set", "run.epochs=2", "--set", "data.train_limit=64", "--set", "data.val_size=0",
              "--set", "selection.metric=last", "--set", "attack.steps=2", "--set", "model.overrides.widths=[4,8,8,8]",
              "--threads", "1"]


def _archlip(*argv: str) -> list[str]:
    exe = Path(sys.executable).with_name("archlip")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "experiments.cli"], list(argv)


def test_two_concurrent_trainings_second_exits_2_first_is_unharmed(tmp_path, capsys):
    """A second `archlip train` into a folder a live run holds exits 2 naming the holder; the first run then
    finishes exactly as a lone run does (no interleaved metrics, no lost model)."""
    import signal
    import time

    from safetensors.torch import load_file

    assert cli.main(["train", "digits-pgdat-tiny", "--out", str(tmp_path / "lone"), "--json", *TINY_TRAIN]) == 0
    capsys.readouterr()
    exe, _ = _archlip()
    env = {**os.environ, "ARCHLIP_TRACEBACK": "0", "PYTHONPATH": str(REPO)}
    run = tmp_path / "shared"
    first = subprocess.Popen(exe + ["train", "digits-pgdat-tiny", "--out", str(run), "--json", *TINY_TRAIN],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lock = run / ".archlip.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-training while the second one tries
    try:
        second = subprocess.run(exe + ["train", "digits-pgdat-tiny", "--out", str(run), "--resume", *TINY_TRAIN],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"in use by pid {first.pid} on host" in second.stderr and "archlip train" in second.stderr
    a, b = load_file(str(tmp_path / "lone" / "model_final.safetensors")), load_file(str(run / "model_final.safetensors"))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    lone = [json.loads(r) for r in (tmp_path / "lone" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and [r["train_loss"] for r in rows] == [r["train_loss"] for r in lone]
    assert not lock.exists()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _no_work(monkeypatch) -> None:
    """Make every expensive step fail the test if it is reached."""
    import experiments.demo
    import experiments.evaluate
    import experiments.measure
    import experiments.sweep
    import experiments.training

    def never(*args, **kwargs):
        pytest.fail("work started although an argument was invalid")

    for module, name in ((experiments.training, "train"), (experiments.evaluate, "evaluate"),
                         (experiments.measure, "bound_summary"), (experiments.measure, "spectral_analyze"),
                         (experiments.demo, "run_demo"), (experiments.sweep, "train_run"),
                         (experiments.measure, "data_lower_bounds")):
        monkeypatch.setattr(module, name, never)


BAD_SWEEPS = {
    "attack": {"recipe": "digits-pgdat-tiny", "evaluate": {"attacks": ["pgd20", "pgd-nope"]}},
    "typo": {"recipe": "digits-pgdat-tiny", "set": {"model.overrides.widht": [8, 16, 32, 32]}},
    "eps": {"recipe": "digits-pgdat-tiny", "evaluate": {"eps": 300}},
}

REJECTED = [
    (["eval", "wrn-tiny", "--data", "digits", "--eps", "300"], "<= 1"),
    (["eval", "wrn-tiny", "--data", "digits", "--eps", "-0.1"], ">= 0"),
    (["eval", "wrn-tiny", "--data", "digits", "--attacks", "pgd20,pgd-nope"], "pgd-nope"),
    (["eval", "wrn-tiny", "--data", "digits", "--n", "0"], "--n"),
    (["eval", "wrn-tiny", "--data", "digits", "--batch-size", "0"], "--batch-size"),
    (["bound", "wrn-tiny", "--data", "digits", "--eps", "300"], "<= 1"),
    (["bound", "wrn-tiny", "--data", "digits", "--n", "-5"], "--n must be >= 0"),
    (["bound", "wrn-tiny", "--data", "digits", "--rtol", "inf"], "--rtol"),
    (["spectral", "wrn-tiny", "--data", "digits", "--rtol", "0"], "--rtol"),
    (["spectral", "wrn-tiny", "--input-shape="], "input shape"),
    (["spectral", "wrn-tiny", "--input-shape", "1x8x8x"], "input shape"),
    (["bound", "wrn-tiny", "--data", "digits", "--out", "/proc/archlip-test/out"], "not writable"),
    (["bound", "wrn-tiny", "--data", "digits", "--out="], "--out is empty"),
    (["train", "EMPTY", "--out", "OUT"], "empty recipe"),
    (["train", "digits-pgdat-tiny", "--set", "model.overrides.widht=[8,16,32,32]", "--out", "OUT"], "widht"),
    (["train", "digits-pgdat-tiny", "--set", "attack.eps=300", "--out", "OUT"], "attack.eps"),
    (["sweep", "SWEEP:attack", "--out", "OUT"], "pgd-nope"),
    (["sweep", "SWEEP:attack", "--out", "OUT", "--dry-run"], "pgd-nope"),
    (["sweep", "SWEEP:typo", "--out", "OUT"], "widht"),
    (["sweep", "SWEEP:typo", "--out", "OUT", "--dry-run"], "widht"),
    (["sweep", "SWEEP:eps", "--out", "OUT"], "evaluate.eps"),
    (["sweep", "digits-cpu", "--seed", "3", "--out", "OUT"], "run.seed"),
    (["theory", "optimal-config", "--budget", "1M", "--top", "0"], "--top"),
]


@pytest.mark.parametrize("argv,needle", REJECTED, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_rejected_values_exit_2_before_any_work(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    (tmp_path / "empty.yaml").write_text("# a recipe someone meant to fill in\n")
    argv = [str(tmp_path / "empty.yaml") if a == "EMPTY" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    for i, a in enumerate(argv):
        if a.startswith("SWEEP:"):
            import yaml

            (tmp_path / "s.yaml").write_text(yaml.safe_dump(BAD_SWEEPS[a.split(":")[1]]))
            argv[i] = str(tmp_path / "s.yaml")
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists(), "a folder was created"


def test_large_linf_eps_is_accepted_with_a_warning(capsys):
    assert cli.parse_eps("0.6") == 0.6
    assert "near chance" in capsys.readouterr().err


def test_eval_defaults_to_one_folder_per_checkpoint_and_setting(trained_ckpt, capsys, tmp_path, monkeypatch):
    """The quickstart's evals in a row, without --out, all succeed (they used to share runs/eval)."""
    monkeypatch.chdir(tmp_path)
    code, first, err = run_cli(capsys, "eval", str(trained_ckpt), "--attacks", "fgsm", "--n", "16")
    assert code == 0, err
    code, second, err = run_cli(capsys, "eval", str(trained_ckpt), "--attacks", "fgsm,pgd10", "--n", "16",
                                "--batch-size", "8")
    assert code == 0, err
    folders = sorted(p.parent for p in (tmp_path / "runs" / "eval").glob("*/*/eval_summary.json"))
    assert len(folders) == 2 and folders[0].parent == folders[1].parent
    assert {f.name for f in folders} == {"fgsm_n16", "fgsm+pgd10_n16"}
    assert "upper bound (attack-based)" in second and "Clopper-Pearson" in second
    assert "out_dir" not in err + second and "resume=True" not in err + second
    # the same evaluation again resumes (finished: nothing to redo) instead of failing
    code, again, err = run_cli(capsys, "eval", str(trained_ckpt), "--attacks", "fgsm", "--n", "16", "--json")
    assert code == 0, err
    payload = json.loads(again)
    low, high = payload["intervals"]["robust_accuracy"]["fgsm"]
    assert low <= payload["robust_accuracy"]["fgsm"] <= high


def test_training_folder_messages_speak_cli(trained_ckpt, capsys, tmp_path):
    run_dir = trained_ckpt.parent
    code, _, err = run_cli(capsys, "train", "digits-pgdat-tiny", "--out", str(run_dir), "--set", "run.epochs=1",
                           "--set", "data.train_limit=128", "--set", "data.val_size=0", "--set", "selection.metric=last",
                           "--set", "attack.steps=2")
    assert_one_line_error(code, err, "already holds a training run", "--resume", "run.epochs")
    assert "resume=True" not in err


def test_resume_of_a_run_without_checkpoint_starts_with_a_note(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "digits-pgdat-tiny", "--out", str(tmp_path / "r"), "--resume",
                             "--set", "run.epochs=1", "--set", "data.train_limit=64", "--set", "data.val_size=0",
                             "--set", "selection.metric=last", "--set", "attack.steps=1", "--set", "run.progress=false")
    assert code == 0, err
    assert "archlip: note:" in err and "starts from the beginning" in err and "completed" in out


def test_report_on_a_training_folder(trained_ckpt, capsys, tmp_path):
    code, out, err = run_cli(capsys, "report", str(trained_ckpt.parent), "--out", str(tmp_path))
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "training_curves.png" in text and (tmp_path / "training_curves.png").stat().st_size > 1000
    assert "## Training" in text


def test_run_folders_written_before_the_rename_are_still_exported_and_reported(trained_ckpt, capsys, tmp_path):
    """A training folder with summary.json (now train_summary.json) and an eval folder with summary.json (now
    eval_summary.json): export, export --eval (the file, its new name, or the folder) and report still read them."""
    import shutil

    run_dir = tmp_path / "old-run"
    shutil.copytree(trained_ckpt.parent, run_dir)
    (run_dir / "train_summary.json").rename(run_dir / "summary.json")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"clean_accuracy": 0.5, "robust_accuracy": {"aa": 0.25},
                                                               "n": 8, "eps": 0.1}))
    for given in ("summary.json", "eval_summary.json", ""):
        code, out, err = run_cli(capsys, "export", str(run_dir), "--out", str(tmp_path / "zoo"), "--json",
                                 "--eval", str(tmp_path / "eval" / given))
        assert code == 0, err
        card = json.loads(Path(json.loads(out)["card"]).read_text())
        assert card["autoattack_acc"] == 25.0 and card["training"]["checkpoint"].startswith("final")
    code, _, err = run_cli(capsys, "report", str(run_dir), "--out", str(tmp_path / "report"))
    assert code == 0, err
    assert "Status completed" in (tmp_path / "report" / "report.md").read_text()


def test_version_lists_and_help_examples(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("archlip ")
    for what, needles in (("presets", ("wrn-34-r", "68116698")), ("recipes", ("digits-pgdat-tiny", "cifar10")),
                          ("attacks", ("pgd20", "aa")), ("sweeps", ("digits-cpu",)), ("datasets", ("digits",))):
        code, out, err = run_cli(capsys, "list", what)
        assert code == 0, err
        assert all(n in out for n in needles), out
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    for name, sub in commands.items():
        text = sub.format_help()
        if name != "theory":
            assert "example" in text, name
        for action in sub._positionals._group_actions:  # noqa: SLF001
            assert action.help, f"{name}: positional {action.dest} has no help"


def test_preset_output_says_the_weights_are_random(capsys):
    code, out, err = run_cli(capsys, "spectral", "wrn-tiny", "--data", "digits", "--rtol", "0.5")
    assert code == 0, err
    assert "random weights" in out and "not a trained model" in out


def test_model_zoo_names_get_a_hint(capsys):
    for target in ("Huang2021Exploring_WRN-34-R", "Huang2021Exploring_WRN-34-R.pt", "Carmon2019Unlabeled"):
        code, _, err = run_cli(capsys, "bound", target, "--n", "0")
        assert_one_line_error(code, err, "RobustBench", "download")


def test_cli_sets_a_passive_omp_wait_policy_before_torch(monkeypatch, capsys):
    proc = subprocess.run([sys.executable, "-c", "import sys, experiments.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.strip() == "False", "importing the CLI must not start torch (its OpenMP pool reads the policy)"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert run_cli(capsys, "list", "datasets")[0] == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_cli(capsys, "list", "datasets")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE", "a user's own setting wins"


# ------------------------------------------------------------------------------------------ the quickstart, in order

QUICK_TRAIN = ["--set", "run.epochs=1", "--set", "data.train_limit=128", "--set", "attack.steps=1",
               "--set", "data.val_size=0", "--set", "selection.metric=last", "--set", "run.progress=false"]


def _quickstart_commands() -> list[str]:
    """Every command in docs/quickstart.md's bash blocks, in order (``make demo`` as the Makefile runs it)."""
    import re

    make_demo = next(line.strip() for line in (REPO / "Makefile").read_text().splitlines()
                     if "archlip demo" in line).replace("$(VENV)/bin/", "")
    text = (REPO / "docs" / "quickstart.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("make demo"):
                commands.append(make_demo)
            elif re.match(r"(\.venv/bin/)?archlip\b", line):
                commands.append(line.replace(".venv/bin/", "", 1))
    return commands


def _scaled(argv: list[str]) -> list[str]:
    """The same command at test scale: small presets, few points, one short epoch, a small budget."""
    argv = list(argv)
    command = argv[0]
    if command == "demo" and "--quick" not in argv:
        argv.append("--quick")
    if command in ("spectral", "bound", "eval") and len(argv) > 1 and not argv[1].startswith("-"):
        if "/" not in argv[1] and not argv[1].endswith(".pt") and argv[1] not in ("wrn-tiny", "wrn-tiny-r"):
            argv[1] = "wrn-tiny"  # a large preset's sandwich takes minutes on a CPU
        argv += ["--rtol", "0.5"] if command != "eval" else []
    if command in ("bound", "eval"):
        if "--n" in argv:
            argv[argv.index("--n") + 1] = "8"
        else:
            argv += ["--n", "8"]
    if command == "theory" and "--budget" in argv:
        argv[argv.index("--budget") + 1] = "2M"
    if command == "train":
        argv += QUICK_TRAIN + ["--set", "history.enabled=false"]  # the history needs a validation split
    return argv


@pytest.mark.slow
def test_quickstart_commands_run_in_order(capsys, tmp_path, monkeypatch):
    """docs/quickstart.md from top to bottom, scaled down: each command works after the ones before it (or, for
    CIFAR-10 data or a RobustBench file that are not here, stops with a one-line error that says what to do)."""
    import shlex

    import experiments.demo

    monkeypatch.chdir(tmp_path)
    quick = dict(experiments.demo.DEMO_SETTINGS["quick"])  # the suite's reduced demo, smaller still
    quick.update(overrides=[*quick["overrides"], "run.epochs=1", "data.train_limit=256"], eval_n=32, lower_points=8)
    monkeypatch.setitem(experiments.demo.DEMO_SETTINGS, "quick", quick)
    commands = _quickstart_commands()
    assert len(commands) >= 12, commands
    seen: set[tuple[str, ...]] = set()
    ran = 0
    for line in commands:
        argv = shlex.split(line, comments=True)[1:]
        redirect = None
        if ">" in argv:
            redirect = tmp_path / argv[argv.index(">") + 1]
            argv = argv[:argv.index(">")]
        argv = _scaled(argv)
        key = tuple(a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out"))
        if key in seen:  # the same work into another folder (demo --quick twice): parsing it is enough
            cli.build_parser().parse_args(argv)
            continue
        seen.add(key)
        if argv in (["--version"],) or "--help" in argv:
            with pytest.raises(SystemExit) as info:
                cli.main(argv)
            assert info.value.code == 0, line
            capsys.readouterr()
            continue
        code = cli.main([*argv, "--threads", "1"])
        out, err = capsys.readouterr()
        if "cifar10" in line or "Huang2021" in line:
            assert_one_line_error(code, err, "download")  # how to get the data or the file
            continue
        assert code == 0, f"{line}\n-> {' '.join(argv)}\n{err}"
        if redirect is not None:
            redirect.write_text(out)
        ran += 1
    assert ran >= 8
    assert json.loads((tmp_path / "layers.json").read_text())["layers"]
    assert (tmp_path / "runs" / "bound-r" / "report.md").is_file() and (tmp_path / "runs" / "w16" / "train_summary.json").is_file()


def test_sweep_report_shows_every_run_and_labels_csv_headers(capsys, tmp_path, monkeypatch):
    """layer_norms.png of a 6-run sweep has 6 panels (it silently showed 4); table.csv headers carry guarantees."""
    import experiments.report as report

    layers = [{"name": n, "upper": 2.0 + i, "lower": 1.9 + i, "random_baseline": 1.0}
              for i, n in enumerate(["stem_conv", "blocks.0.0.conv1", "blocks.1.0.conv1", "blocks.2.0.conv1", "fc"])]
    models = [{"name": f"run{i}", "depths": [1, 1, 1], "widths": [8, 16, 32, 8 * (i + 1)], "params": 1000 * (i + 1),
               "clean_acc": 0.9, "robust_acc": 0.5, "certified_lipschitz": 10.0 + i, "empirical_lipschitz": 1.0,
               "layers": layers} for i in range(6)]
    (tmp_path / "results.json").write_text(json.dumps({"kind": "sweep", "name": "six", "models": models}))
    panels = {}
    real_save = report._save

    def spy(fig, plt, path):
        panels[Path(path).name] = sum(ax.get_visible() for ax in fig.axes)
        return real_save(fig, plt, path)

    monkeypatch.setattr(report, "_save", spy)
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 0, err
    assert panels["layer_norms.png"] == 6
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert "robust_acc [attack_upper_bound]" in header and "certified_lipschitz [certified_upper]" in header
    assert "empirical_lipschitz [lower]" in header and "name" in header


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), KeyError("stage_bounds")])
def test_an_internal_bug_is_not_reported_as_a_user_error(bug, capsys, monkeypatch):
    """Only ValueError (UserError, ConfigError, ...) and OSError are user errors (exit 2); a TypeError or KeyError
    raised inside a command is a bug and propagates with its traceback."""
    import experiments.measure

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(experiments.measure, "bound_summary", broken)
    assert not issubclass(type(bug), cli.USER_ERRORS)
    with pytest.raises(type(bug)):
        cli.main(["bound", "wrn-tiny", "--data", "digits", "--n", "0", "--threads", "1"])
    assert "error:" not in capsys.readouterr().err


def test_deliberate_user_errors_are_value_or_os_errors():
    from experiments.config import ConfigError
    from experiments.io import RunFolderLockedError, WriteFailedError
    from experiments.training.loop import RunExistsError

    for cls in (cli.UserError, ConfigError, WriteFailedError, RunFolderLockedError, RunExistsError):
        assert issubclass(cls, cli.USER_ERRORS), cls
