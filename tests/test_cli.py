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
                               "nv": NormValue(1.0, Guarantee.LOWER, "power"), "p": Path("/x")})
    assert json.loads(json.dumps(payload)) == {"t": [1.0, 2.0], "g": "certified_upper", "nan": None,
                                               "nv": payload["nv"], "p": "/x"}
    assert payload["nv"]["guarantee"] == "lower"


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
    code, _, err = run_cli(capsys, "spectral", "wrn-tiny", "--input-shape", "3x")
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
    summary = json.loads((out / "summary.json").read_text())
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
    assert (tmp_path / "summary.json").is_file()
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
    import experiments.demo

    def never(*args, **kwargs):
        pytest.fail("the analysis ran although --out is a file")

    monkeypatch.setattr(experiments.demo, "spectral_analyze", never)
    monkeypatch.setattr(experiments.demo, "bound_summary", never)
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
