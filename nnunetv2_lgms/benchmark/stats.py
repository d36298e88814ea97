"""Aggregation over folds and the paired per-case Wilcoxon signed-rank test."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

#: Below this many pairs the two-sided exact Wilcoxon p-value cannot fall below 0.05 (n = 5 gives at least 0.0625),
#: so no p-value is reported.
MIN_PAIRS = 6


@dataclass
class FoldAggregate:
    mean: Optional[float]
    std: Optional[float]  # sample standard deviation (ddof=1) over folds; None with fewer than 2 folds
    folds: list           # folds that contributed a finite value
    missing: list         # requested folds without a value

    @property
    def n(self) -> int:
        return len(self.folds)


def aggregate_folds(values: Mapping[int, Optional[float]], requested: Sequence[int]) -> FoldAggregate:
    """Mean and sample std (ddof=1) of per-fold values; folds missing or NaN are listed in ``missing``."""
    present = [f for f in requested if f in values and values[f] is not None and not _isnan(values[f])]
    missing = [f for f in requested if f not in present]
    x = np.array([values[f] for f in present], dtype=float)
    mean = float(x.mean()) if len(x) else None
    std = float(x.std(ddof=1)) if len(x) >= 2 else None
    return FoldAggregate(mean, std, present, missing)


@dataclass
class PairedTest:
    n: int                    # number of matched cases with finite values on both sides
    statistic: Optional[float]
    p: Optional[float]
    mean_diff: Optional[float]  # mean of (other - reference) over the pairs
    note: str = ""


def paired_wilcoxon(reference: Mapping[str, float], other: Mapping[str, float],
                    min_pairs: int = MIN_PAIRS) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of ``other`` vs ``reference`` on the cases both contain (keys), ignoring
    NaN values (scipy defaults: ``zero_method='wilcox'``, exact distribution for small n without ties)."""
    from scipy.stats import wilcoxon

    keys = sorted(k for k in set(reference) & set(other)
                  if not _isnan(reference[k]) and not _isnan(other[k]))
    n = len(keys)
    if n == 0:
        return PairedTest(0, None, None, None, "no matched cases")
    a = np.array([reference[k] for k in keys], dtype=float)
    b = np.array([other[k] for k in keys], dtype=float)
    diff = float(np.mean(b - a))
    if n < min_pairs:
        return PairedTest(n, None, None, diff, f"too few pairs (n={n} < {min_pairs}), no p-value")
    if np.all(a == b):
        return PairedTest(n, None, None, diff, "all pairs equal, no p-value")
    res = wilcoxon(b, a)
    return PairedTest(n, float(res.statistic), float(res.pvalue), diff)


def per_case_foreground_mean(metrics: Mapping[str, Mapping[str, float]], metric: str = "Dice") -> float:
    """Mean of ``metric`` over the foreground labels/regions of one case (NaN entries, i.e. absent from reference
    and prediction, are skipped; NaN if all are)."""
    vals = [v[metric] for k, v in metrics.items() if str(k) != "0" and not _isnan(v.get(metric))]
    return float(np.mean(vals)) if vals else float("nan")


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_mean_std(agg: FoldAggregate, digits: int = 4) -> str:
    if agg.mean is None:
        return "–"
    if agg.std is None:
        return f"{agg.mean:.{digits}f}"
    return f"{agg.mean:.{digits}f} ± {agg.std:.{digits}f}"


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"

