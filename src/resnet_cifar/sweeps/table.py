"""How the sweep's reports write a number and a markdown table (the job, fold and trial tables)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The metric columns of the markdown tables, when present (the CSV files have every metric).
TABLE_METRICS = ("val/acc_best", "val/acc", "val/loss", "train/loss", "test/acc", "test/top5", "test/ece", "epochs")


def fmt(v: Any) -> str:
    """A whole float as an integer, others to 4 decimals (3 significant digits when tiny); None empty."""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return "" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
