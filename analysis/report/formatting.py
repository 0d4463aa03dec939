"""Numbers as the report prints them: one cell format shared by the sections and every writer."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pandas as pd


def fmt_number(value: object) -> str:
    """A cell as every writer prints it: integers whole, other numbers to 4 significant digits, '–' if missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    if isinstance(value, pd.Timestamp | datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def fmt_estimate(value: object, stderr: object) -> str:
    """``value ± stderr`` (just the value when the stderr is missing)."""
    se = pd.to_numeric(pd.Series([stderr]), errors="coerce").iloc[0]
    return fmt_number(value) + (f" ± {fmt_number(float(se))}" if pd.notna(se) else "")
