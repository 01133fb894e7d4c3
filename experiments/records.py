"""A *model record* (one trained model's measurements, written by ``experiments.measure`` and read by
``experiments.report``, ``experiments.study`` and the sweep's aggregation): ``ModelRecord``, and the one map from
a scalar's key to its guarantee label (see ``spectral/guarantee.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

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


@dataclass
class ModelRecord:
    """One trained model's measurements (``experiments.measure.measure_model``), as ``record.json`` and the
    ``models`` of ``results.json`` hold them; read back with ``from_dict``.

    Every key is a typed field (``None``: not measured); keys this class does not know (a runner's own, a newer
    record's) are kept in ``extra``. ``to_dict`` writes the keys in the order they were measured or read, a key
    that was present with the value ``None`` included, then any other field that has a value: a record read back is
    written out unchanged. ``get(key)``: a value by name, for tables whose columns are key names.
    """

    name: str | None = None
    # architecture (measure.architecture)
    params: int | None = None
    family: str | None = None
    depths: list[int] | None = None
    widths: list[int] | None = None
    strides: list[int] | None = None
    activation: str | None = None
    model: str | None = None
    input_shape: list[int] | None = None
    # step "eval"
    clean_acc: float | None = None
    robust_acc: float | None = None
    robust_attack: str | None = None
    robust_acc_per_attack: dict[str, float] | None = None
    eps: float | None = None
    eval_points: str | None = None
    seconds: dict[str, float] | None = None  # per step
    unavailable: dict[str, str] | None = None  # step -> why it could not run
    # step "spectral": spectral.analyze rows (LayerRow.to_dict)
    layers: list[dict[str, Any]] | None = None
    # step "bound" (measure.bound_summary)
    certified_lipschitz: float | None = None
    certified_lipschitz_product: float | None = None
    certified_methods: dict[str, float] | None = None
    stage_bounds: dict[str, float | None] | None = None
    block_bounds: dict[str, float | None] | None = None
    bound: dict[str, Any] | None = None  # NetworkBound.to_dict()
    # step "lower" (measure.data_lower_bounds), "node_lower"
    empirical_lipschitz: float | None = None
    attack_lipschitz: float | None = None
    local_lipschitz: float | None = None
    stable_acc: float | None = None
    lower_points: int | None = None
    lower_methods: dict[str, str] | None = None
    searched_lipschitz: float | None = None
    searched_found_by: str | None = None
    node_lower: dict[str, float] | None = None
    # steps "theory", "theory_trained", "spectra"
    theory_prediction: float | None = None
    theory_prediction_kaiming: float | None = None
    theory_params: int | None = None
    theory_stage_factors: list[float] | None = None
    theory_method: str | None = None
    theory_prediction_basis: str | None = None
    theory_measured_norms: float | None = None
    theory_measured_stage_factors: list[float] | None = None
    theory_measured_method: str | None = None
    theory_facts: list[dict[str, Any]] | None = None
    theory_structure: dict[str, Any] | None = None
    spectra: dict[str, list[dict[str, Any]]] | None = None
    guarantees: dict[str, str] | None = None
    # the demo's and the sweep's own keys
    recipe: str | None = None
    train_seconds: float | None = None
    train: dict[str, Any] | None = None  # measure.train_facts
    overrides: dict[str, Any] | None = None
    measured_checkpoint: dict[str, Any] | None = None
    config_id: str | None = None
    seed: int | None = None
    groups: list[str] | None = None
    run_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    present: list[str] = field(default_factory=list, repr=False, compare=False)  # keys present, in order

    def update(self, values: Mapping[str, Any]) -> "ModelRecord":
        """Set keys (a measurement step's output): fields by name, other keys into ``extra``; each becomes present."""
        for key, value in values.items():
            if key in _FIELDS:
                setattr(self, key, value)
            else:
                self.extra[key] = value
            if key not in self.present:
                self.present.append(key)
        return self

    def has(self, key: str) -> bool:
        """Whether the record holds ``key`` (present, or a field with a value)."""
        return key in self.present or (getattr(self, key) is not None if key in _FIELDS else key in self.extra)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a field or an extra key); ``default`` when the record does not have it."""
        if key in _FIELDS:
            value = getattr(self, key)
            return value if value is not None or key in self.present else default
        return self.extra.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The record as ``record.json`` holds it (see the class docstring for the order)."""
        out = {key: self.get(key) for key in self.present}
        out.update({f: getattr(self, f) for f in _FIELDS if f not in out and getattr(self, f) is not None})
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelRecord":
        """A record from its JSON form (today's ``record.json``, ``runs/<id>/summary.json`` of older sweeps, a
        ``results.json`` model, or a partial record such as a single-model analysis)."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a model record is a JSON object, got {type(values).__name__}")
        return cls().update(values)


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelRecord) if f.name not in ("extra", "present"))


def as_record(record: "ModelRecord | Mapping[str, Any]") -> ModelRecord:
    """``record`` itself, or the ``ModelRecord`` of its dict form."""
    return record if isinstance(record, ModelRecord) else ModelRecord.from_dict(record)


def as_records(records: Iterable["ModelRecord | Mapping[str, Any]"]) -> list[ModelRecord]:
    return [as_record(r) for r in records]
