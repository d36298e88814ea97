"""Cross-validation comparison of trainers from nnU-Net's own per-fold ``validation/summary.json`` files.

For each trainer, ``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/fold_F/validation/summary.json`` gives, per
fold, the mean Dice/IoU of every label (or region) over that fold's validation cases and its ``foreground_mean``;
those per-fold values are aggregated as mean ± sample std over the folds present. Missing folds are listed, never
dropped silently. Per case, the foreground-mean Dice (mean over labels/regions) is matched by reference file name
across folds and each trainer is tested against the first with a paired Wilcoxon signed-rank test.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunetv2_lgms.benchmark.models import BenchmarkError, results_folder
from nnunetv2_lgms.benchmark.stats import (FoldAggregate, PairedTest, aggregate_folds, fmt_mean_std, fmt_p,
                                           paired_wilcoxon, per_case_foreground_mean)
from nnunetv2_lgms.benchmark.tables import fmt_list, markdown_table, write_csv

METRICS = ("Dice", "IoU")
FOREGROUND = "foreground_mean"


@dataclass
class TrainerFolds:
    trainer: str
    folder: Path
    summaries: Dict[int, dict] = field(default_factory=dict)  # fold -> parsed summary.json
    missing: List[int] = field(default_factory=list)

    def fold_value(self, fold: int, key: str, metric: str) -> Optional[float]:
        s = self.summaries.get(fold)
        if s is None:
            return None
        entry = s[FOREGROUND] if key == FOREGROUND else s["mean"].get(key)
        return None if entry is None else entry.get(metric)

    def aggregate(self, key: str, metric: str, folds: Sequence[int]) -> FoldAggregate:
        return aggregate_folds({f: self.fold_value(f, key, metric) for f in self.summaries}, folds)

    def per_case(self, metric: str = "Dice") -> Dict[str, float]:
        """Case (reference file name) -> foreground-mean ``metric``, over all folds present."""
        out = {}
        for fold in sorted(self.summaries):
            for case in self.summaries[fold]["metric_per_case"]:
                out[Path(case["reference_file"]).name] = per_case_foreground_mean(case["metrics"], metric)
        return out

    def cases_of_fold(self, fold: int) -> set:
        return {Path(c["reference_file"]).name for c in self.summaries[fold]["metric_per_case"]}


def summary_path(folder: Path, fold: int) -> Path:
    return folder / f"fold_{fold}" / "validation" / "summary.json"


def load_trainer_folds(dataset: str, trainer: str, plans_identifier: str, configuration: str,
                       folds: Sequence[int], results_root: Optional[Path] = None) -> TrainerFolds:
    folder = results_folder(dataset, trainer, plans_identifier, configuration, results_root)
    tf = TrainerFolds(trainer, folder)
    for fold in folds:
        path = summary_path(folder, fold)
        if path.is_file():
            tf.summaries[fold] = json.loads(path.read_text())
        else:
            tf.missing.append(fold)
    if not tf.summaries:
        why = (f"{folder} does not exist" if not folder.is_dir() else
               f"{folder} has no fold_F/validation/summary.json for F in {fmt_list(list(folds))}")
        plans = "" if plans_identifier == "nnUNetPlans" else f" -p {plans_identifier}"
        raise BenchmarkError(f"{trainer}: no validation results: {why} "
                             f"(train with nnUNetv2_train {dataset} {configuration} FOLD -tr {trainer}{plans})")
    return tf


def class_names(dataset_json: Optional[dict]) -> Dict[str, str]:
    """summary.json key ('1', '(1, 2)') -> label name from dataset.json."""
    names = {}
    if not dataset_json:
        return names
    for name, value in dataset_json.get("labels", {}).items():
        if name in ("background", "ignore"):
            continue
        if isinstance(value, (list, tuple)):
            names[str(tuple(int(v) for v in value))] = name
            if len(value) == 1:
                names[str(int(value[0]))] = name
        else:
            names[str(int(value))] = name
    return names


@dataclass
class Comparison:
    dataset: str
    configuration: str
    plans_identifier: str
    folds: List[int]
    trainers: List[TrainerFolds]
    keys: List[str]            # label/region keys, in order
    names: Dict[str, str]
    tests: Dict[str, PairedTest]  # trainer -> test against trainers[0]
    notes: List[str]

    def label(self, key: str) -> str:
        if key == FOREGROUND:
            return "foreground mean"
        return f"{self.names[key]} ({key})" if key in self.names else key

    def rows(self):
        """One row per trainer x (label/region, foreground mean), as dicts (used by Markdown and CSV)."""
        out = []
        for tf in self.trainers:
            for key in self.keys + [FOREGROUND]:
                aggs = {m: tf.aggregate(key, m, self.folds) for m in METRICS}
                row = {"trainer": tf.trainer, "class": self.label(key), "key": key}
                for m, agg in aggs.items():
                    row[f"{m.lower()}_mean"], row[f"{m.lower()}_std"] = agg.mean, agg.std
                row["n_folds"] = aggs["Dice"].n
                row["folds"] = " ".join(map(str, aggs["Dice"].folds))
                row["missing_folds"] = " ".join(map(str, aggs["Dice"].missing))
                for f in self.folds:
                    row[f"dice_fold_{f}"] = tf.fold_value(f, key, "Dice")
                out.append((row, aggs))
        return out


def compare(dataset: str, configuration: str, trainers: Sequence[str], plans_identifier: str = "nnUNetPlans",
            folds: Sequence[int] = (0, 1, 2, 3, 4), results_root: Optional[Path] = None) -> Comparison:
    folds = list(folds)
    loaded = [load_trainer_folds(dataset, t, plans_identifier, configuration, folds, results_root) for t in trainers]
    keys: List[str] = []
    for tf in loaded:
        for s in tf.summaries.values():
            keys += [k for k in s["mean"] if k not in keys and k != "0"]
    dataset_json = None
    for tf in loaded:
        if (tf.folder / "dataset.json").is_file():
            dataset_json = json.loads((tf.folder / "dataset.json").read_text())
            break
    ref = loaded[0]
    notes = []
    for tf in loaded:
        if tf.missing:
            notes.append(f"{tf.trainer}: fold(s) {fmt_list(tf.missing)} missing (no fold_F/validation/summary.json);"
                         f" its mean ± std uses fold(s) {fmt_list(sorted(tf.summaries))} only")
    for tf in loaded[1:]:
        for fold in sorted(set(tf.summaries) & set(ref.summaries)):
            if tf.cases_of_fold(fold) != ref.cases_of_fold(fold):
                notes.append(f"fold {fold}: {tf.trainer} was validated on other cases than {ref.trainer} "
                             f"(different splits_final.json?); fold means are not comparable")
    ref_cases = ref.per_case("Dice")
    tests = {tf.trainer: paired_wilcoxon(ref_cases, tf.per_case("Dice")) for tf in loaded[1:]}
    return Comparison(dataset, configuration, plans_identifier, folds, loaded, keys, class_names(dataset_json),
                      tests, notes)


def render_markdown(c: Comparison) -> str:
    ref = c.trainers[0].trainer
    out = [f"# {c.dataset} · {c.configuration} · {c.plans_identifier} · folds {fmt_list(c.folds)}", ""]
    out.append("Dice and IoU: mean ± sample std (ddof=1) over the folds present, from each fold's "
               "validation/summary.json (nnU-Net's metrics; per fold the mean over its validation cases).")
    out.append("")
    rows = []
    for row, aggs in c.rows():
        rows.append([row["trainer"], row["class"], fmt_mean_std(aggs["Dice"]), fmt_mean_std(aggs["IoU"]),
                     f"{row['n_folds']}/{len(c.folds)}", row["missing_folds"] or "–"])
    out.append(markdown_table(["trainer", "class", "Dice", "IoU", "folds", "missing folds"], rows, "llrrrl"))
    out += ["", "Foreground-mean Dice per fold (– = missing):", ""]
    fold_rows = []
    for tf in c.trainers:
        vals = [tf.fold_value(f, FOREGROUND, "Dice") for f in c.folds]
        fold_rows.append([tf.trainer] + ["–" if v is None else f"{v:.4f}" for v in vals])
    out.append(markdown_table(["trainer"] + [f"fold {f}" for f in c.folds], fold_rows))
    if c.tests:
        out += ["", f"Paired Wilcoxon signed-rank test (two-sided) of per-case foreground-mean Dice against {ref}, "
                    "cases matched by reference file name across folds:", ""]
        trows = []
        for trainer, t in c.tests.items():
            diff = "–" if t.mean_diff is None else f"{t.mean_diff:+.4f}"
            trows.append([trainer, t.n, diff, fmt_p(t.p), t.note or "–"])
        out.append(markdown_table(["trainer", "n pairs", f"mean Δ Dice vs {ref}", "p", "note"], trows, "lrrrl"))
    if c.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


def write_outputs(c: Comparison, out_dir: Path) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "compare.md", "csv": out_dir / "compare.csv",
             "wilcoxon_csv": out_dir / "compare_wilcoxon.csv", "boxplot": out_dir / "compare_boxplot.png"}
    paths["markdown"].write_text(render_markdown(c))
    rows = [r for r, _ in c.rows()]
    headers = list(rows[0].keys())
    write_csv(paths["csv"], headers, [[r[h] for h in headers] for r in rows])
    ref = c.trainers[0].trainer
    write_csv(paths["wilcoxon_csv"], ["trainer", "reference", "n_pairs", "mean_diff_dice", "statistic", "p", "note"],
              [[t, ref, r.n, r.mean_diff, r.statistic, r.p, r.note] for t, r in c.tests.items()])
    boxplot(c, paths["boxplot"])
    return paths


def boxplot(c: Comparison, path: Path) -> None:
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, labels = [], []
    for tf in c.trainers:
        vals = [v for v in tf.per_case("Dice").values() if not math.isnan(v)]
        data.append(vals)
        folds = ", ".join(str(f) for f in sorted(tf.summaries)) or "none"
        labels.append(f"{tf.trainer}\n(folds {folds}; n={len(vals)})")
    fig, ax = plt.subplots(figsize=(max(4.0, 2.2 * len(data)), 4.5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=12, ha="right")
    ax.set_ylabel("per-case foreground-mean Dice")
    ax.set_title(f"{c.dataset} {c.configuration} (folds requested: {fmt_list(c.folds)})", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
