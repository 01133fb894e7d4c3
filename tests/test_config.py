"""Recipe schema: loading by name/path, overrides with YAML types, clear errors, resolved-config round trip."""
from __future__ import annotations

import math

import pytest
import yaml

from experiments.config import (ConfigError, TrainConfig, apply_overrides, config_diff, config_to_dict,
                                effective_attack_numbers, list_recipes, load_config, parse_number, save_config)

PAPER = [f"cifar10-{m}-{a}" for m in ("sat", "trades", "mart") for a in ("wrn-34-12", "wrn-34-r")]


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.attack.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_match_the_published_settings(name):
    cfg = load_config(name)
    assert cfg.run.epochs == 100 and cfg.run.batch_size == 128
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.1, 0.9, 2e-4, 5.0)
    assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [75, 90] and cfg.schedule.gamma == 0.1
    assert cfg.attack.eps == 8 / 255 and cfg.attack.step_size == 2 / 255 and cfg.attack.steps == 10
    assert cfg.model.name == name.split("-", 2)[2]
    assert cfg.method.name == {"sat": "pgd_at", "trades": "trades", "mart": "mart"}[name.split("-")[1]]
    if cfg.method.name != "pgd_at":
        assert cfg.method.beta == 6.0
    assert cfg.selection.metric == "pgd_acc" and cfg.data.val_size > 0


def test_extra_data_recipe():
    cfg = load_config("cifar10-trades-extra-wrn-34-r")
    assert cfg.run.epochs == 400 and cfg.run.batch_size == 256 and cfg.data.extra_fraction == 0.5
    assert cfg.schedule.name == "cosine" and cfg.optim.weight_decay == 5e-4 and cfg.ema.enabled


def test_every_shipped_recipe_loads_and_by_path(tmp_path):
    names = list_recipes()
    assert {"digits-pgdat-tiny", "digits-pgdat-tiny-r", *PAPER} <= set(names)
    for name in names:
        load_config(name)
    p = tmp_path / "r.yaml"
    p.write_text("run:\n  epochs: 3\nattack:\n  eps: 16/255\n")
    cfg = load_config(str(p))
    assert cfg.run.epochs == 3 and cfg.attack.eps == 16 / 255


def test_overrides_use_yaml_types():
    cfg = load_config("digits-pgdat-tiny", ["optim.lr=0.05", "optim.nesterov=true", "schedule.milestones=[2, 4]",
                                            "attack.eps=4/255", "optim.grad_clip=null", "model.overrides.widths=[4,8,8,8]"])
    assert cfg.optim.lr == 0.05 and cfg.optim.nesterov is True and cfg.schedule.milestones == [2, 4]
    assert cfg.attack.eps == 4 / 255 and cfg.optim.grad_clip is None
    assert cfg.model.overrides["widths"] == [4, 8, 8, 8]


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=0.1"], "did you mean 'lr'"),
    (["optimizer.lr=0.1"], "did you mean 'optim'"),
    (["optim.lr=-1"], "out of range"),
    (["optim.momentum=1.5"], "out of range"),
    (["run.epochs=2.5"], "integer"),
    (["run.epochs=0"], "out of range"),
    (["attack.norm=l3"], "choose one of"),
    (["method.name=adv"], "choose one of"),
    (["optim.nesterov=yes please"], "true or false"),
    (["attack.eps=eight"], "fraction"),
    (["schedule.milestones=[90, 75]"], "increasing"),
    (["optim.lr.x=1"], "not a section"),
    (["no_equals_sign"], "section.key=value"),
    (["selection.metric=pgd_acc", "data.val_size=0"], "val_size"),
])
def test_bad_configs_are_rejected_with_a_readable_error(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("digits-pgdat-tiny", override)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate.*valid keys here: name, lr"):
        load_config(p)


def test_missing_recipe_suggests_a_name():
    with pytest.raises(FileNotFoundError, match="did you mean 'digits-pgdat-tiny'"):
        load_config("digits-pgdat-tiyn")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("cifar10-trades-wrn-34-r", ["run.epochs=7"])
    path = save_config(cfg, tmp_path / "resolved_config.yaml")
    again = load_config(path)
    assert again == cfg and config_diff(cfg, again) == []
    assert yaml.safe_load(path.read_text())["run"]["epochs"] == 7
    other = load_config("cifar10-trades-wrn-34-r")
    assert config_diff(cfg, other) == ["run.epochs: 7 -> 100"]


def test_eps_conventions():
    cfg = load_config(None, ["attack.eps=8/255", "attack.step_size=2/255"])
    assert effective_attack_numbers(cfg.attack) == (8 / 255, 2 / 255)
    cfg = load_config(None, ["attack.eps=8/255", "attack.step_size=2/255", "attack.eps_convention='0.031'"])
    assert effective_attack_numbers(cfg.attack) == (0.031, 0.007)


def test_parse_number_and_apply_overrides_are_pure():
    assert parse_number("8/255", "x") == 8 / 255 and parse_number(3, "x") == 3.0
    with pytest.raises(ConfigError):
        parse_number(True, "x")
    base = {"run": {"epochs": 1}}
    out = apply_overrides(base, ["run.epochs=2"])
    assert base == {"run": {"epochs": 1}} and out == {"run": {"epochs": 2}}
    assert math.isclose(config_to_dict(load_config(out))["attack"]["eps"], 8 / 255)


# ------------------------------------------------------------------------------------------ nonsense rejected (issue 19)


@pytest.mark.parametrize("eps", ["300", "1.5", "-0.1", ".inf"])
def test_linf_eps_outside_the_input_range_is_rejected(eps):
    with pytest.raises(ConfigError, match="attack.eps"):
        load_config("digits-pgdat-tiny", [f"attack.eps={eps}"])


def test_check_eps_ranges_and_warning():
    from experiments.config import check_eps

    assert check_eps(8 / 255) is None and check_eps(1.0, "l2") is None and check_eps(3.0, "l2") is None
    assert "near chance" in check_eps(0.6)
    assert check_eps(1.0) is not None
    for bad in (1.01, 300, -1, float("nan"), True):
        with pytest.raises(ConfigError, match="<= 1|>= 0"):
            check_eps(bad)


def test_empty_recipe_is_rejected_and_a_nameless_one_takes_its_file_name(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty recipe.*digits-pgdat-tiny.yaml"):
        load_config(empty)
    nameless = tmp_path / "my-run.yaml"
    nameless.write_text("run: {epochs: 2}\n")
    assert load_config(nameless).name == "my-run"


def test_resolved_config_is_written_atomically_with_the_umask_mode(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        path = save_config(load_config("digits-pgdat-tiny"), tmp_path / "resolved_config.yaml")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640 and [p.name for p in tmp_path.iterdir()] == ["resolved_config.yaml"]


def test_retired_keys_of_old_saved_configs_are_read_and_dropped():
    """Configs saved before data.synthetic_size and run.eval_batch_size were removed still load (resume)."""
    from experiments.config import ConfigError, config_from_dict, config_to_dict

    cfg = config_from_dict({"data": {"dataset": "digits", "synthetic_size": 512}, "run": {"eval_batch_size": 256}})
    saved = config_to_dict(cfg)
    assert "synthetic_size" not in saved["data"] and "eval_batch_size" not in saved["run"]
    with pytest.raises(ConfigError, match="synthetic"):
        config_from_dict({"data": {"dataset": "synthetic"}})
