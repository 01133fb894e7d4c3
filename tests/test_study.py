"""Multi-seed sweeps: seeds and groups in sweep files, every launcher (sequential, local workers, submitit's local
executor) writing the same records, and the study's statistics, claims, figures and report from known effects."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments import study, sweep
from experiments.sweep import DEPTHS_KEY, WIDTHS_KEY

REPO = Path(__file__).resolve().parents[1]


def _count(recipe, overrides):
    d = overrides.get(DEPTHS_KEY, [1, 1, 1])
    w = overrides.get(WIDTHS_KEY, [8, 16, 32, 64])
    total, prev = 9 * w[0], w[0]
    for depth, width in zip(d, w[1:]):
        total += 9 * prev * width + 9 * width * width * (2 * depth - 1)
        prev = width
    return total + 10 * w[-1]


def _raw(**extra):
    raw = {"recipe": "r", "seeds": [0, 1, 2],
           "groups": [{"name": "last", "grid": {DEPTHS_KEY: [[1, 1, 1]], WIDTHS_KEY: [[8, 16, 32, 64], [8, 16, 32, 32]]}},
                      {"name": "budget", "configs": [{DEPTHS_KEY: [1, 1, 1], WIDTHS_KEY: [8, 16, 32, 64]},
                                                     {DEPTHS_KEY: [1, 1, 2], WIDTHS_KEY: [8, 16, 32, 48]}],
                       "budget": {"params": _count("r", {}), "tolerance": 0.5}}]}
    raw.update(extra)
    return raw


def test_seeds_and_groups_expand_into_paired_runs():
    spec = sweep.sweep_from_dict(_raw(), count_params=_count)
    configs = list(dict.fromkeys(r.config for r in spec.runs))
    assert configs == ["d1-1-1_w8-16-32-64", "d1-1-1_w8-16-32-32", "d1-1-2_w8-16-32-48"]
    shared = [r for r in spec.runs if r.config == "d1-1-1_w8-16-32-64"]
    assert [r.run_id for r in shared] == ["d1-1-1_w8-16-32-64_s0", "d1-1-1_w8-16-32-64_s1", "d1-1-1_w8-16-32-64_s2"]
    assert shared[0].groups == ("last", "budget") and shared[1].overrides["run.seed"] == 1 and shared[2].seed == 2
    assert spec.budget_groups == ["budget"] and spec.groups == ["last", "budget"] and spec.seeds == [0, 1, 2]
    plain = sweep.sweep_from_dict({"recipe": "r", "configs": [{"id": "a"}]})
    assert plain.runs[0].run_id == "a" and plain.runs[0].config == "a" and plain.runs[0].seed is None


@pytest.mark.parametrize("change,message", [
    ({"seeds": [0, 0]}, "distinct"), ({"seeds": []}, "non-empty list"), ({"seeds": [0.5]}, "integers"),
    ({"set": {"run.seed": 3}}, "remove run.seed"), ({"grid": {"a": [1]}}, "inside each group"),
    ({"groups": [{"name": "x", "gird": {}}]}, "unknown key"), ({"workers": 0}, "workers"),
    ({"cluster": "pbs"}, "unknown cluster"), ({"slurmpartition": "x"}, "unknown sweep key"),
])
def test_bad_study_files_give_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message):
        sweep.sweep_from_dict(_raw(**change), count_params=_count)


def test_a_config_in_two_groups_with_different_overrides_is_refused():
    raw = _raw()
    raw["groups"][1]["configs"][0] = {"id": "d1-1-1_w8-16-32-64", WIDTHS_KEY: [8, 16, 32, 16]}
    raw["groups"][1].pop("budget")
    with pytest.raises(ValueError, match="different overrides"):
        sweep.sweep_from_dict(raw, count_params=_count)


def test_shipped_study_files_expand():
    digits = sweep.load_sweep("digits-study")
    assert len(digits.seeds) >= 5 and digits.workers == 2 and digits.budget_groups == ["budget"]
    assert len({r.config for r in digits.runs}) == 11 and len(digits.runs) == 55
    assert {g for r in digits.runs for g in r.groups} == {"last-stage", "budget"}
    assert any(a.startswith("aa") for a in digits.evaluate["attacks"]) and "pgd20" in digits.evaluate["attacks"]
    gpu = sweep.load_sweep("cifar10-study-gpu")
    assert gpu.launcher == "submitit" and gpu.slurm["slurm_partition"] == "gpu" and len(gpu.seeds) >= 5
    assert all(abs(r.params - 46.16e6) <= 0.02 * 46.16e6 for r in gpu.runs if "budget" in r.groups)


# ----------------------------------------------------------------------------------------------
# a fake runner with known effects (module level: worker processes and submitit jobs import it)
# ----------------------------------------------------------------------------------------------

EFFECT = {64: 0.0, 32: 0.06, 16: 0.0, 48: -0.01}  # last width 32 is 6 points more robust; 16 no different


def fake_runner(spec, run, run_dir, options):
    """A run record whose robust accuracy depends on the last width (EFFECT) plus seed noise shared by all configs."""
    w = run.overrides[WIDTHS_KEY]
    d = run.overrides[DEPTHS_KEY]
    seed = run.seed or 0
    rng = np.random.default_rng(1000 + seed)
    shared, own = rng.normal(0, 0.02), np.random.default_rng(hash((tuple(w), tuple(d), seed)) % 2**32).normal(0, 0.004)
    robust = 0.8 + EFFECT[w[-1]] + shared + own
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"name": run.run_id, "depths": d, "widths": w, "params": _count("r", run.overrides),
            "clean_acc": 0.97 + shared / 4, "robust_acc": robust,
            "robust_acc_per_attack": {"pgd20": robust + 0.01, "aa-custom:apgd-ce": robust},
            "eval_points": "first 359 points in order", "certified_lipschitz": 1000.0 * w[-1] * (1 + shared),
            "empirical_lipschitz": 10.0 + w[-1] / 10, "local_lipschitz": 80 - 100 * EFFECT[w[-1]] + 10 * own,
            "theory_prediction": 0.1 * w[-1], "worker_pid": __import__("os").getpid()}


def test_sequential_sweep_aggregates_a_study_with_detectable_and_undetectable_effects(tmp_path):
    spec = sweep.sweep_from_dict(_raw(seeds=[0, 1, 2, 3, 4, 5]), count_params=_count)
    result = sweep.run_sweep(spec, tmp_path, runner=fake_runner, progress=False)
    assert result["ran"] == 18 and result["done"] == 18
    results = json.loads((tmp_path / "results.json").read_text())
    rec = json.loads((tmp_path / "runs" / "d1-1-1_w8-16-32-32_s3" / "record.json").read_text())
    assert rec["config_id"] == "d1-1-1_w8-16-32-32" and rec["seed"] == 3 and rec["groups"] == ["last"]
    s = results["study"]
    assert s["n_configurations"] == 3 and s["seeds"] == [0, 1, 2, 3, 4, 5]
    narrow = next(c for c in s["configurations"] if c["config_id"] == "d1-1-1_w8-16-32-32")
    robust = narrow["metrics"]["robust_acc"]
    assert robust["n"] == 6 and robust["ci_low"] < robust["mean"] < robust["ci_high"]
    assert {b["attack"] for b in narrow["robust_binomial"]} == {"worst", "pgd20", "aa-custom:apgd-ce"}
    (claim,) = s["claims"]["last_stage"]
    assert claim["change"] == "last-stage width 64 -> 32 (depths 1-1-1)"
    diff = claim["differences"]["robust_acc"]
    assert diff["mean"] == pytest.approx(0.06, abs=0.01) and diff["detectable"] and diff["n"] == 6
    assert "raises robust_acc by +6" in claim["sentence"] and "(depths 1-1-1)" in claim["sentence"]
    budget = s["claims"]["budget"]["budget"]
    assert budget["best"] == "d1-1-1_w8-16-32-64" and len(budget["tests"]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "## The paper's claims as tests" in text and "**+6." in text  # the detectable effect is bold
    assert "## What this run can and cannot show" in text and "lowest first" not in text
    for png in ("study_last_stage.png", "study_differences.png", "study_lipschitz.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"]({png})" in text
    rows = (tmp_path / "configs.csv").read_text().splitlines()
    assert len(rows) == 4 and "robust_acc ci_low" in rows[0]
    # the report regenerates from the run folder alone
    (tmp_path / "report.md").unlink()
    sweep.run_sweep(spec, tmp_path, aggregate_only=True, progress=False)
    assert (tmp_path / "report.md").read_text().count("## The paper's claims as tests") == 1


def test_no_detectable_difference_is_written_as_such(tmp_path):
    raw = {"recipe": "r", "seeds": [0, 1, 2, 3, 4],
           "grid": {DEPTHS_KEY: [[1, 1, 1]], WIDTHS_KEY: [[8, 16, 32, 64], [8, 16, 32, 16]]}}
    spec = sweep.sweep_from_dict(raw, count_params=_count)
    sweep.run_sweep(spec, tmp_path, runner=fake_runner, progress=False)
    s = json.loads((tmp_path / "results.json").read_text())["study"]
    (claim,) = s["claims"]["last_stage"]
    assert not claim["differences"]["robust_acc"]["detectable"]
    assert "no detectable difference" in claim["sentence"]
    assert s["claims"]["budget"] == {}


def test_local_worker_pool_writes_the_same_records(tmp_path):
    spec = sweep.sweep_from_dict(_raw(seeds=[0, 1]), count_params=_count)
    seq = sweep.run_sweep(spec, tmp_path / "seq", runner=fake_runner, progress=False, report=False)
    par = sweep.run_sweep(spec, tmp_path / "par", runner=fake_runner, progress=False, report=False, workers=2)
    assert par["ran"] == seq["ran"] == 6
    key = "d1-1-2_w8-16-32-48_s1"
    a, b = (json.loads((tmp_path / d / "runs" / key / "record.json").read_text()) for d in ("seq", "par"))
    assert a["robust_acc"] == b["robust_acc"] and a["config_id"] == b["config_id"]
    pids = {json.loads(p.read_text())["worker_pid"] for p in (tmp_path / "par" / "runs").glob("*/record.json")}
    assert __import__("os").getpid() not in pids


def test_submitit_local_executor_runs_one_job_per_run_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from experiments import launch

    monkeypatch.chdir(REPO)  # the job processes import this test module (the runner) from the repository root
    raw = _raw(seeds=[0], launcher="submitit", cluster="local", slurm_partition="gpu", slurm_array_parallelism=2)
    spec = sweep.sweep_from_dict(raw, count_params=_count)
    assert spec.slurm == {"slurm_partition": "gpu", "slurm_array_parallelism": 2}
    executor = launch.make_executor(tmp_path / "submitit", "local", {**spec.slurm, "timeout_min": 10})
    only = ["d1-1-1_w8-16-32-64_s0", "d1-1-1_w8-16-32-32_s0"]
    result = sweep.run_sweep(spec, tmp_path, runner=fake_runner, executor=executor, only=only, progress=False, report=False)
    assert sorted(result["ran_ids"]) == sorted(only) and len(result["job_ids"]) == 2
    assert json.loads((tmp_path / "submitit" / "jobs.json").read_text()).keys() == set(only)
    assert result["done"] == 2 and (tmp_path / "results.json").is_file()
    # rerun: finished runs are skipped, only the missing one is submitted
    again = sweep.run_sweep(spec, tmp_path, runner=fake_runner, executor=executor, progress=False, report=False)
    assert again["skipped"] == 2 and again["ran_ids"] == ["d1-1-2_w8-16-32-48_s0"] and again["done"] == 3
    with pytest.raises(ValueError, match="unknown submitit cluster"):
        launch.make_executor(tmp_path, "pbs")


def test_last_stage_pairs_pair_each_smaller_setting_with_the_largest():
    configs = [{"config_id": f"d{d}w{w}", "depths": [1, 1, d], "widths": [8, 16, 32, w]} for d in (1, 2) for w in (16, 32, 64)]
    pairs = {(a["config_id"], b["config_id"], what) for a, b, what in study.last_stage_pairs(configs)}
    assert ("d1w64", "d1w32", "last-stage width 64 -> 32 (depths 1-1-1)") in pairs
    assert ("d1w64", "d1w16", "last-stage width 64 -> 16 (depths 1-1-1)") in pairs
    assert ("d2w32", "d1w32", "last-stage depth 2 -> 1 (widths 8-16-32-32)") in pairs
    assert len(pairs) == 4 + 3


def test_eval_points_and_metric_values():
    rec = {"eval_points": "first 359 points in order", "robust_acc": 0.8, "robust_acc_per_attack": {"pgd20": 0.81},
           "stage_bounds": {"stage1": {"value": 3.0}}, "clean_acc": float("nan")}
    assert study.eval_points(rec) == 359 and study.eval_points({}) is None
    values = study.metric_values(rec)
    assert values == {"robust_acc": 0.8, "robust_acc[pgd20]": 0.81, "stage_bound[stage1]": 3.0}
    assert not math.isnan(sum(values.values()))
