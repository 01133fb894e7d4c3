"""The vocabulary of a *model record* (one trained model's measurements, written by ``experiments.measure`` and
read by ``experiments.report`` and ``experiments.study``): the one map from a scalar's key to its guarantee label
(see ``spectral/guarantee.py``)."""
from __future__ import annotations

#: Guarantee label of each scalar of a model record. Robust accuracy under an attack is an upper bound of the
#: true robust accuracy on the evaluated points (an attack that fails proves nothing).
GUARANTEES: dict[str, str] = {
    "robust_acc": "attack_upper_bound",
    "certified_lipschitz": "certified_upper",
    "certified_lipschitz_product": "certified_upper",
    "empirical_lipschitz": "lower",
    "attack_lipschitz": "lower",
    "searched_lipschitz": "lower",
    "node_lower": "lower",
    "local_lipschitz": "estimate",
    "theory_prediction": "estimate",
    "theory_prediction_kaiming": "estimate",
    "theory_measured_norms": "certified_upper",
}

#: Columns of the aggregate table, in order.
TABLE_COLUMNS: tuple[str, ...] = (
    "name", "depths", "widths", "params", "clean_acc", "robust_acc", "robust_attack",
    "certified_lipschitz", "certified_lipschitz_product", "empirical_lipschitz", "attack_lipschitz",
    "searched_lipschitz", "local_lipschitz", "stable_acc", "theory_prediction", "theory_measured_norms",
)
