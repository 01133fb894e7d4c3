"""CLI additions: ``archlip spectral --spectrum`` and the sweep launcher options."""
from __future__ import annotations

import json

from experiments.cli import main


def test_spectral_spectrum_writes_spectra_of_trained_and_fresh_weights(tmp_path, capsys):
    assert main(["spectral", "wrn-tiny", "--data", "digits", "--spectrum", "--out", str(tmp_path), "--json",
                 "--threads", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    trained, init = payload["spectra"]["trained"], payload["spectra"]["init"]
    assert len(trained) == len(init) == 11
    stem = trained[0]
    assert stem["name"] == "stem_conv" and stem["method"] == "dense_svd" and len(stem["values"]) == stem["n_values"] == 64
    assert stem["comparison"]["bulk_edge"] > 0 and "alpha" in stem["comparison"]
    for name in ("spectrum.json", "spectrum.csv", "spectrum.png"):
        assert (tmp_path / name).stat().st_size > 500
    assert "n_outliers" in (tmp_path / "spectrum.csv").read_text().splitlines()[0]


def test_spectrum_options_are_checked(capsys):
    assert main(["spectral", "wrn-tiny", "--data", "digits", "--spectrum", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err


def test_sweep_dry_run_of_the_digits_study_lists_55_runs(tmp_path, capsys):
    assert main(["sweep", "digits-study", "--dry-run", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == 55 and len(result["commands"]) == 55
    assert any("run.seed=4" in c for c in result["commands"])
    assert not (tmp_path / "sweep.json").exists()  # a dry run writes nothing
    from experiments.sweep import load_sweep

    spec = load_sweep("digits-study")
    assert spec.seeds == [0, 1, 2, 3, 4] and spec.groups == ["last-stage", "budget"]


def test_sweep_rejects_bad_launcher_options(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "digits-study", "--launcher", "slurm"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["sweep", "digits-study", "--workers", "0", "--dry-run"]) == 2
    assert "--workers must be a positive integer" in capsys.readouterr().err
