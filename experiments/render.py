"""Formatting and figure helpers shared by the reports (``experiments.report``, ``experiments.study_report``) and the
tables they write: number formatting, guarantee-labelled CSV, the matplotlib Agg backend, stage colours."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from experiments.io import write_text
from experiments.records import GUARANTEES, TABLE_COLUMNS


def csv_header(column: str) -> str:
    """A CSV column name with its guarantee label: ``certified_lipschitz [certified_upper]``."""
    return f"{column} [{GUARANTEES[column]}]" if column in GUARANTEES else column


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows to CSV atomically (lists joined with '-', e.g. depths 5-5-5); headers carry guarantee labels."""
    import csv
    import io as textio

    columns = list(rows[0]) if rows else list(TABLE_COLUMNS)
    buffer = textio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_header(c) for c in columns])
    for row in rows:
        writer.writerow(["-".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in
                         (row.get(c) for c in columns)])
    return write_text(path, buffer.getvalue())


def finite(v: Any) -> bool:
    """Whether ``v`` is a finite real number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any) -> str:
    """A table cell: "-" for None, thousands separators from 10,000, floats to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v)
    return str(v)


def value(v: Any) -> float | None:
    """The finite number of ``v`` (a number or a ``{"value": ...}`` dict), else None."""
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if finite(v) else None


#: Colour of each stage in per-layer figures.
STAGE_COLOURS = {"stem": "#555555", "stage1": "#1f77b4", "stage2": "#ff7f0e", "stage3": "#2ca02c",
                 "stage4": "#9467bd", "head": "#d62728", "other": "#8c564b"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, plt, path: str | Path) -> Path:
    """Save ``fig`` as a PNG (120 dpi) at ``path`` and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
