"""Guarantee labels and the JSON form of labelled numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from spectral.guarantee import Guarantee, NormValue, json_safe


def test_norm_value_to_dict_is_json_and_leaves_out_warm_start_vectors():
    nv = NormValue(2.5, Guarantee.LOWER, "power", iterations=7,
                   details={"vector": torch.ones(100), "residual": torch.tensor(1e-3), "gap": math.inf})
    d = json.loads(json.dumps(nv.to_dict()))
    assert d["value"] == 2.5 and d["guarantee"] == "lower" and d["iterations"] == 7
    assert "vector" not in d["details"]
    assert d["details"]["residual"] == pytest.approx(1e-3) and d["details"]["gap"] == "inf"


def test_json_safe_nonfinite_modes_and_tensors_in_lists():
    value = {"a": [float("nan"), torch.zeros(100), torch.arange(3)], "g": Guarantee.UPPER}
    assert json_safe(value) == {"a": [None, "tensor(100,)", [0, 1, 2]], "g": "certified_upper"}
    assert json_safe([float("inf"), -float("inf"), float("nan")]) == ["inf", "-inf", None]  # experiments.io's rule
    assert json_safe(value, nonfinite="str")["a"][0] == "nan"
    assert json_safe(value, nonfinite="null")["a"][0] is None
    with pytest.raises(ValueError, match="nonfinite"):
        json_safe(1.0, nonfinite="zero")


def test_nan_value_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        NormValue(float("nan"), Guarantee.UPPER, "gram")


def test_one_rule_for_non_finite_numbers_across_writers():
    from experiments.io import to_jsonable

    value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "x": 1.5}
    assert json_safe(value) == to_jsonable(value) == {"nan": None, "inf": "inf", "-inf": "-inf", "x": 1.5}
