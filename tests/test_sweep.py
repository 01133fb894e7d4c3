"""Sweep engine: grid expansion, budget filtering/fitting, resume after interruption, aggregation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments import sweep
from experiments.sweep import RunSpec, SweepSpec

REPO = Path(__file__).resolve().parents[1]


def test_expand_grid_is_the_cartesian_product_in_key_order():
    points = sweep.expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6
    assert points[0] == {"a": 1, "b": "x"} and points[-1] == {"a": 2, "b": "z"}
    assert sweep.expand_grid({}) == [{}]
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.expand_grid({"a": []})


def test_run_ids_are_readable_and_distinct():
    a = sweep.run_id_for({sweep.DEPTHS_KEY: [1, 1, 2], sweep.WIDTHS_KEY: [8, 16, 32, 32]})
    assert a == "d1-1-2_w8-16-32-32"
    assert sweep.run_id_for({"id": "custom"}) == "custom"
    b = sweep.run_id_for({"optim.lr": 0.05})
    c = sweep.run_id_for({"optim.lr": 0.1})
    assert b != c and "/" not in b


def test_override_strings_round_trip_through_yaml():
    texts = sweep.to_override_strings({"run.epochs": 3, sweep.WIDTHS_KEY: [8, 16, 32, 32], "attack.eps": "8/255",
                                       "ema.enabled": True})
    assert texts[0] == "run.epochs=3"
    parsed = {t.split("=", 1)[0]: yaml.safe_load(t.split("=", 1)[1]) for t in texts}
    assert parsed[sweep.WIDTHS_KEY] == [8, 16, 32, 32]
    assert parsed["attack.eps"] == "8/255" and parsed["ema.enabled"] is True


def test_bad_sweep_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown sweep key"):
        sweep.sweep_from_dict({"recipe": "r", "gird": {}})
    with pytest.raises(ValueError, match="needs 'recipe'"):
        sweep.sweep_from_dict({"grid": {"a": [1]}})
    with pytest.raises(ValueError, match="unknown launcher"):
        sweep.sweep_from_dict({"recipe": "r", "launcher": "slurm"})
    with pytest.raises(ValueError, match="duplicate run ids"):
        sweep.sweep_from_dict({"recipe": "r", "configs": [{"id": "a"}, {"id": "a"}]})
    with pytest.raises(FileNotFoundError, match="shipped sweep"):
        sweep.load_sweep(tmp_path / "nope.yaml")


def _fake_count(recipe, overrides):
    """A stand-in parameter count: quadratic in widths, linear in depths (like a WRN)."""
    d = overrides.get(sweep.DEPTHS_KEY, [1, 1, 1])
    w = overrides.get(sweep.WIDTHS_KEY, [8, 16, 32, 64])
    total = 9 * w[0] * 3
    prev = w[0]
    for depth, width in zip(d, w[1:]):
        total += 9 * prev * width + 9 * width * width * (2 * depth - 1)
        prev = width
    return total + 10 * w[-1]


def test_budget_filter_keeps_only_configs_near_the_budget():
    raw = {"recipe": "r", "grid": {sweep.WIDTHS_KEY: [[8, 16, 32, 64], [8, 16, 32, 32], [8, 64, 128, 256]]},
           "budget": {"params": _fake_count("r", {sweep.WIDTHS_KEY: [8, 16, 32, 64]}), "tolerance": 0.01}}
    spec = sweep.sweep_from_dict(raw, count_params=_fake_count)
    assert [r.run_id for r in spec.runs] == ["w8-16-32-64"]
    raw["budget"]["tolerance"] = 0.001
    raw["grid"] = {sweep.WIDTHS_KEY: [[8, 64, 128, 256]]}
    with pytest.raises(ValueError, match="no configuration lies within"):
        sweep.sweep_from_dict(raw, count_params=_fake_count)


@pytest.mark.parametrize("fit", ["stage_widths", "last_width"])
def test_budget_fit_rescales_widths_to_meet_the_budget(fit):
    target = 1_000_000
    raw = {"recipe": "r", "grid": {sweep.DEPTHS_KEY: [[1, 1, 1], [2, 2, 1], [1, 1, 3]]},
           "set": {sweep.WIDTHS_KEY: [16, 64, 128, 256]},
           "budget": {"params": target, "tolerance": 0.03, "fit": fit, "multiple_of": 4}}
    spec = sweep.sweep_from_dict(raw, count_params=_fake_count)
    assert len(spec.runs) == 3
    for run in spec.runs:
        widths = run.overrides[sweep.WIDTHS_KEY]
        assert widths[0] == 16 and all(w % 4 == 0 for w in widths)
        if fit == "last_width":
            assert widths[1:3] == [64, 128]
        assert abs(run.params - target) <= 0.03 * target
        assert run.params == _fake_count("r", run.overrides)


def _fake_runner(calls):
    def runner(spec, run, run_dir, options):
        calls.append(run.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        d = run.overrides[sweep.DEPTHS_KEY]
        w = run.overrides[sweep.WIDTHS_KEY]
        params = _fake_count("r", run.overrides)
        return {"name": run.run_id, "depths": d, "widths": w, "params": params,
                "clean_acc": 0.9, "robust_acc": 0.5 - 0.001 * w[-1], "certified_lipschitz": 10.0 * w[-1],
                "empirical_lipschitz": 1.0 + w[-1] / 100, "theory_prediction": float(w[-1])}
    return runner


def _spec():
    return sweep.sweep_from_dict({
        "name": "fake", "recipe": "r",
        "grid": {sweep.DEPTHS_KEY: [[1, 1, 1], [1, 1, 2]], sweep.WIDTHS_KEY: [[8, 16, 32, 64], [8, 16, 32, 32]]},
    })


def test_sweep_resumes_after_interruption_and_skips_finished_runs(tmp_path):
    spec = _spec()
    calls: list[str] = []
    first = sweep.run_sweep(spec, tmp_path, max_runs=2, runner=_fake_runner(calls), progress=False, report=False)
    assert first["ran"] == 2 and first["done"] == 2 and first["total"] == 4
    assert len(calls) == 2
    # a run interrupted mid-way leaves no summary (or a torn one) and must be redone
    torn = tmp_path / "runs" / spec.runs[2].run_id
    torn.mkdir(parents=True)
    (torn / "record.json").write_text('{"name": "trunc')
    second = sweep.run_sweep(spec, tmp_path, runner=_fake_runner(calls), progress=False, report=False)
    assert second["skipped"] == 2 and second["ran"] == 2 and second["done"] == 4
    assert calls[2:] == [r.run_id for r in spec.runs[2:]]
    assert len(set(calls)) == 4
    third = sweep.run_sweep(spec, tmp_path, runner=_fake_runner(calls), progress=False, report=False)
    assert third["ran"] == 0 and third["skipped"] == 4 and len(calls) == 4


def test_aggregation_writes_table_plots_report_and_spearman(tmp_path):
    spec = _spec()
    result = sweep.run_sweep(spec, tmp_path, runner=_fake_runner([]), progress=False)
    table = (tmp_path / "table.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("name,depths,widths,params")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kind"] == "sweep" and len(results["models"]) == 4
    rho = results["correlations"]["theory_prediction~robust_acc"]
    assert rho["n"] == 4 and rho["rho"] == pytest.approx(-1.0)  # robust acc falls exactly as prediction rises (ties share ranks)
    report = Path(result["report"]).read_text()
    for png in ("robustness_vs_params.png", "robustness_vs_last_width.png", "robustness_vs_certified.png",
                "robustness_vs_empirical.png"):
        assert (tmp_path / png).is_file() and (tmp_path / png).stat().st_size > 1000
        assert png in report
    assert "Spearman" in report and "archlip sweep" in report


def test_only_and_dry_run(tmp_path):
    spec = _spec()
    calls: list[str] = []
    target = spec.runs[1].run_id
    result = sweep.run_sweep(spec, tmp_path, only=[target], runner=_fake_runner(calls), progress=False, report=False)
    assert calls == [target] and result["done"] == 1
    with pytest.raises(ValueError, match="unknown run id"):
        sweep.run_sweep(spec, tmp_path, only=["nope"], runner=_fake_runner(calls), progress=False)
    dry = sweep.run_sweep(spec, tmp_path, dry_run=True, launcher="torchrun", nproc_per_node=8, runner=_fake_runner(calls))
    assert len(dry["commands"]) == 3 and len(calls) == 1
    assert all("torch.distributed.run --nproc_per_node 8" in c and " train " in c for c in dry["commands"])


def test_torchrun_command_carries_overrides_and_resume():
    spec = SweepSpec(name="s", recipe="cifar10-pgdat-wrn-34-r", runs=[], base={"run.epochs": 100},
                     torchrun_args=["--nnodes", "2"])
    run = RunSpec("a", {sweep.WIDTHS_KEY: [16, 320, 640, 512]})
    cmd = sweep.torchrun_command(spec, run, Path("out/train"), 4, resume=True)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert "--nnodes" in cmd and cmd[-1] == "--resume"
    assert "model.overrides.widths=[16, 320, 640, 512]" in cmd and "run.epochs=100" in cmd


def test_shipped_sweeps_parse():
    names = sweep.list_sweeps()
    assert {"digits-cpu", "cifar10-budget-gpu"} <= set(names)
    cpu = sweep.load_sweep("digits-cpu")
    assert len(cpu.runs) >= 4 and cpu.launcher == "sequential"
    ids = [r.run_id for r in cpu.runs]
    assert len(set(ids)) == len(ids)


@pytest.mark.slow
def test_real_sweep_trains_measures_and_resumes(tmp_path):
    """Two tiny digits runs through the real runner (train -> evaluate -> bounds -> theory), interrupted
    after the first by --max-runs, then resumed: the finished run is not retrained."""
    from experiments.runtime import torch_threads

    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "tiny", "recipe": "digits-pgdat-tiny",
        "set": {"run.epochs": 1, "data.train_limit": 64, "data.val_size": 0, "selection.metric": "last",
                "attack.steps": 1, "run.progress": False},
        "grid": {sweep.WIDTHS_KEY: [[8, 16, 32, 64], [8, 16, 32, 16]]},
        "evaluate": {"attacks": ["fgsm"], "n": 32},
        "analysis": {"spectral": False, "lower_points": 8, "lower_iters": 5, "attack_ratio_steps": 2},
    }))
    spec = sweep.load_sweep(spec_file)
    out = tmp_path / "out"
    with torch_threads(1):
        first = sweep.run_sweep(spec, out, max_runs=1, progress=False, report=False)
        assert first["ran"] == 1 and first["done"] == 1
        done_id = first["ran_ids"][0]
        metrics = out / "runs" / done_id / "train" / "metrics.jsonl"
        stamp = metrics.stat().st_mtime_ns
        second = sweep.run_sweep(spec, out, progress=False, report=False)
    assert second["skipped_ids"] == [done_id] and second["ran"] == 1 and second["done"] == 2
    assert metrics.stat().st_mtime_ns == stamp
    rows = (out / "table.csv").read_text().splitlines()
    assert len(rows) == 3
    record = json.loads((out / "runs" / second["ran_ids"][0] / "record.json").read_text())
    assert record["widths"] == [8, 16, 32, 16] and record["params"] < 76450
    assert 0 < record["empirical_lipschitz"] <= record["certified_lipschitz"]
    assert record["theory_prediction"] > 0 and 0 <= record["robust_acc"] <= record["clean_acc"]
    assert record["measured_checkpoint"]["kind"] == "final" and "no selected model" in record["train"]["measured_checkpoint"]


def test_sweeps_measure_the_selected_checkpoint_and_say_which(tmp_path):
    from experiments.checkpoints import save_checkpoint
    from experiments.models import create_model

    model = create_model("wrn-tiny", in_channels=1)
    save_checkpoint(tmp_path / "model_final", model, {})
    save_checkpoint(tmp_path / "model_best", model, {})
    summary = {"status": "completed", "epochs_completed": 10, "files": {"final_model": str(tmp_path / "model_final.safetensors")},
               "selection": {"metric": "pgd_acc", "best_epoch": 6, "best_value": 0.41}}
    path, info = sweep.measured_checkpoint(tmp_path, summary)
    assert path.name == "model_best.safetensors" and info["kind"] == "best" and info["epoch"] == 6
    assert "epoch 6" in info["description"] and "pgd_acc" in info["description"]
    path, info = sweep.measured_checkpoint(tmp_path, summary, which="final")
    assert path.name == "model_final.safetensors" and info == {**info, "kind": "final", "epoch": 9}
    with pytest.raises(ValueError, match="choose best or final"):
        sweep.sweep_from_dict({"recipe": "digits-pgdat-tiny", "evaluate": {"checkpoint": "last"}})


@pytest.mark.slow
def test_gpu_sweep_is_at_the_wrn_34_10_budget():
    """Every configuration of the shipped CIFAR-10 sweep has WRN-34-10's parameter count (+-2%), counted on
    the real models (meta device), and WRN-34-10 itself is one of them."""
    spec = sweep.load_sweep("cifar10-budget-gpu")
    assert spec.launcher == "torchrun" and len(spec.runs) == 12
    for run in spec.runs:
        assert abs(run.params - 46_160_474) <= 0.02 * 46_160_474, run
        widths = run.overrides[sweep.WIDTHS_KEY]
        assert widths[0] == 16 and all(w % 8 == 0 for w in widths)
    wrn_34_10 = next(r for r in spec.runs if r.run_id == "d5-5-5_w16-160-320-640")
    assert wrn_34_10.params == 46_160_474
    from experiments.models import create_model
    import torch

    with torch.device("meta"):
        model = create_model("wrn-34-r", depths=(7, 5, 3), widths=spec.runs[3].overrides[sweep.WIDTHS_KEY])
    assert sum(p.numel() for p in model.parameters()) == spec.runs[3].params


def test_a_sweep_written_before_the_rename_is_resumed_and_aggregated(tmp_path):
    """Old layout: runs/<id>/summary.json (the record) and train/summary.json: still finished, read and reported."""
    from experiments.report import load_results

    spec = _spec()
    old = spec.runs[0]
    folder = tmp_path / "runs" / old.run_id
    (folder / "train").mkdir(parents=True)
    record = {**_fake_runner([])(spec, old, folder, {}), "config_id": old.config, "seed": None, "groups": []}
    (folder / "summary.json").write_text(json.dumps(record))
    (folder / "train" / "summary.json").write_text(json.dumps({"status": "completed", "epochs": 1}))
    assert sweep._finished_training(folder / "train") == {"status": "completed", "epochs": 1}
    calls: list[str] = []
    result = sweep.run_sweep(spec, tmp_path, runner=_fake_runner(calls), progress=False, report=False)
    assert result["skipped_ids"] == [old.run_id] and old.run_id not in calls and result["done"] == 4
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    assert models[0] == record
    assert all((tmp_path / "runs" / r.run_id / "record.json").is_file() for r in spec.runs[1:])
    (tmp_path / "results.json").unlink()  # a sweep in progress: the report reads the per-run records
    assert [m.name for m in load_results(tmp_path)["models"]] == sorted(r.run_id for r in spec.runs)
