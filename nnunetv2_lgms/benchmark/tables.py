"""Markdown and CSV formatting shared by the benchmark commands."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, List, Sequence


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """``align``: one character per column, ``l`` or ``r`` (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, headers: Sequence[str], rows: Iterable[Sequence]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])


def ratio(value, reference) -> str:
    if value is None or reference in (None, 0):
        return "–"
    return f"{value / reference:.2f}x"


def fmt_list(items: List) -> str:
    return ", ".join(map(str, items)) if items else "none"
