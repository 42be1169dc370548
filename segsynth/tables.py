"""The paper's tables: per-class metric means per run, the main comparison table, mask adherence, fidelity.

Runs are listed in a frame (one row per trained segmenter, with the path of its metrics parquet),
so the workflow decides which runs exist and these functions only aggregate. Spread is the sample
standard deviation (ddof = 1) over seeds.

Scores are averaged per 3D volume (distances in mm) where an evaluation has volume rows (unit ``volume·mm``,
datasets that know their volumes and spacing) and per 2D image (distances in pixels) otherwise: the tables carry
that convention in a ``unit`` column and their captions say which one each dataset's columns use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data.canonical import SLICE_PX, VOLUME_MM
from .errors import InputDataError
from .io import write_parquet, write_text

BASELINE = "baseline"
RUN_KEYS = ["dataset", "segmenter", "method", "seed"]
#: Column label, metric, scale and decimals of the main table; DSC is reported in percent.
MAIN_COLUMNS = (("DSC (%)", "dice", 100.0, 1), ("IoU (%)", "iou", 100.0, 1), ("ASD", "asd", 1.0, 2),
                ("HD95", "hd95", 1.0, 2))


def main_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run, class and metric: nan-mean over the scored units (volumes where the evaluation has volume rows,
    else images; :func:`scored_rows`); plus class "mean", the mean over foreground classes.

    ``runs`` has columns dataset, segmenter, method, seed, path (a parquet written by
    ``evaluate_segmenter``). Returns long rows: dataset, segmenter, method, seed, class, metric, value, unit
    (``slice·px`` or ``volume·mm``). The runs of one dataset must share the unit (else an error names a file:
    evaluations of two segsynth versions are mixed; rerun them).
    """
    frames = [_run_means(pd.read_parquet(run.path)).assign(**{key: getattr(run, key) for key in RUN_KEYS})
              for run in runs.itertuples(index=False)]
    main = pd.concat(frames, ignore_index=True)[[*RUN_KEYS, "class", "metric", "value", "unit"]]
    _check_units(main, runs)
    return main


def scored_rows(metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows of an evaluation table the tables average, and their unit: the volume rows (``volume·mm``) where
    there are any, else the per-slice rows (``slice·px``; also every row of a table written before the ``unit``
    column existed)."""
    if "unit" not in metrics.columns:
        return metrics, SLICE_PX
    unit = VOLUME_MM if (metrics["unit"] == VOLUME_MM).any() else SLICE_PX
    return metrics[metrics["unit"] == unit], unit


def _run_means(metrics: pd.DataFrame) -> pd.DataFrame:
    """One run's means per class over its scored units (NaN ones skipped) and their mean over classes as
    class "mean", with the unit."""
    metrics, unit = scored_rows(metrics)
    per_class = (metrics.groupby(["class_index", "class_name", "metric"], sort=True)["value"]
                 .mean().reset_index().rename(columns={"class_name": "class"}))
    overall = per_class.groupby("metric", sort=False)["value"].mean().reset_index().assign(**{"class": "mean"})
    return pd.concat([per_class.drop(columns="class_index"), overall], ignore_index=True).assign(unit=unit)


def _check_units(table: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Refuse a dataset whose runs were scored in different units: their means would not be comparable."""
    units = table.groupby("dataset", sort=False)["unit"].unique()
    for dataset, found in units.items():
        if len(found) > 1:
            path = next(run.path for run in runs.itertuples(index=False) if run.dataset == dataset)
            raise InputDataError(path, f"the runs of dataset {dataset} were scored in different units "
                                 f"{sorted(found)}; rerun their evaluations with one segsynth version")


def dataset_units(table: pd.DataFrame) -> dict[str, str]:
    """Dataset → unit of a table with dataset and unit columns (``slice·px`` where the unit column is absent)."""
    if "unit" not in table.columns:
        return dict.fromkeys(table["dataset"], SLICE_PX)
    return dict(zip(table["dataset"], table["unit"]))


#: How each unit reads in a caption: the scored unit, and the unit of ASD and HD95.
UNIT_WORDS = {SLICE_PX: ("per 2D image", "in pixels"), VOLUME_MM: ("per 3D volume", "in mm")}


def units_phrase(units: dict[str, str], scores: str = "DSC and IoU in %", distances: bool = True) -> str:
    """A caption's statement of how each dataset was scored, e.g. "DSC and IoU in % (per 2D image), ASD and HD95
    in pixels", or per dataset where datasets differ ("… in %; acdc: per 3D volume, ASD and HD95 in mm; mni: per
    2D image, ASD and HD95 in pixels"). ``distances`` False leaves ASD and HD95 out."""
    by_unit: dict[str, list[str]] = {}
    for dataset, unit in units.items():
        by_unit.setdefault(unit, []).append(str(dataset))
    if len(by_unit) <= 1:
        per, length = UNIT_WORDS[next(iter(by_unit), SLICE_PX)]
        return f"{scores} ({per})" + (f", ASD and HD95 {length}" if distances else "")
    parts = [f"{', '.join(datasets)}: {UNIT_WORDS[unit][0]}" + (f", ASD and HD95 {UNIT_WORDS[unit][1]}"
                                                                 if distances else "")
             for unit, datasets in sorted(by_unit.items(), key=lambda item: item[0] != VOLUME_MM)]
    return f"{scores}; " + "; ".join(parts)


def main_summary(main: pd.DataFrame, fidelity: pd.DataFrame | None = None,
                 adherence: pd.DataFrame | None = None) -> pd.DataFrame:
    """The main table in the paper's layout: a row per method (Baseline first), a column block per
    (dataset, segmenter) with DSC (%), ASD and HD95 as mean ± std over seeds of the class-"mean" value; then,
    per dataset, what the synthetic sets are: FID, KID ×10³ and domain FID (``fidelity_table`` rows) and mask
    adherence DSC (%) (``adherence_table`` rows), mean ± std over the same seeds (a dash for the Baseline)."""
    means = main[main["class"] == "mean"]
    blocks = list(dict.fromkeys(zip(means["dataset"], means["segmenter"])))
    rows = []
    for method in method_order(means["method"]):
        row = {"Method": method_label(method)}
        # a metric no run has (evaluations written before IoU existed) gets no column
        columns = [c for c in MAIN_COLUMNS if (means["metric"] == c[1]).any()]
        for dataset, segmenter in blocks:
            run = means[(means["method"] == method) & (means["dataset"] == dataset) & (means["segmenter"] == segmenter)]
            for label, metric, scale, decimals in columns:
                row[f"{dataset} · {segmenter} {label}"] = mean_std(run.loc[run["metric"] == metric, "value"] * scale,
                                                                   decimals)
        for dataset in dict.fromkeys(means["dataset"]):
            if fidelity is not None:
                sets = fidelity[(fidelity["dataset"] == dataset) & (fidelity["method"] == method)]
                for label, metric, scale, decimals in FIDELITY_COLUMNS:
                    row[f"{dataset} {label}"] = mean_std(sets.loc[sets["metric"] == metric, "value"] * scale, decimals)
            if adherence is not None:
                sets = adherence[(adherence["dataset"] == dataset) & (adherence["method"] == method)]
                row[f"{dataset} adherence DSC (%)"] = mean_std(sets["dice"] * 100.0, 1)
                if has_judge(adherence):
                    row[f"{dataset} judge adherence DSC (%)"] = mean_std(sets["judge_dice"].dropna() * 100.0, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def main_markdown(main: pd.DataFrame, fidelity: pd.DataFrame | None = None,
                  adherence: pd.DataFrame | None = None) -> str:
    """``main_summary`` as a markdown table under a caption that states the number of seeds."""
    summary = main_summary(main, fidelity, adherence)
    lines = ["| " + " | ".join(summary.columns) + " |", "|" + "---|" * len(summary.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in summary.itertuples(index=False)]
    caption = _caption(main[main["class"] == "mean"])
    if fidelity is not None or adherence is not None:
        caption += (" FID, KID and domain FID: the synthetic sets against the real training images "
                    "(results/tables/fidelity.md says how); adherence: the real-only segmenter f_θ's DSC on the "
                    "synthetic images against their masks (results/tables/adherence.md)"
                    + ("; judge adherence: the same by a second real-only segmenter that guided no sampler."
                       if has_judge(adherence) else "."))
    return "\n".join([caption, "", *lines]) + "\n"


def adherence_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mask adherence per synthetic set: dataset, method, seed, dice (f_θ's), judge_dice (the adherence
    judge's; NaN where no judge scored the set), each the mean over samples of the per-sample foreground Dice
    from ``score_synthetic``. ``rows`` has columns dataset, method, seed, path."""
    records = []
    for row in rows.itertuples(index=False):
        scores = pd.read_parquet(row.path)
        if "scorer" not in scores:  # written before the judge existed: f_θ's alone
            scores = scores.assign(scorer="value_model")
        means = scores[scores["class"] == "mean"].groupby("scorer")["dice"].mean()
        records.append({"dataset": row.dataset, "method": row.method, "seed": row.seed,
                        "dice": means.get("value_model", float("nan")), "judge_dice": means.get("judge", float("nan"))})
    return pd.DataFrame(records, columns=["dataset", "method", "seed", "dice", "judge_dice"])


def has_judge(adherence: pd.DataFrame | None) -> bool:
    """Whether an adherence judge scored any set of the table."""
    return adherence is not None and "judge_dice" in adherence and adherence["judge_dice"].notna().any()


def adherence_markdown(adherence: pd.DataFrame, scorers: dict | None = None) -> str:
    """Adherence per dataset and method as "mean ± std" Dice (%) over seeds: f_θ's, and the judge's where one
    scored. ``scorers`` names the models ({"value_model": ..., "judge": ...}) in the header."""
    scorers = scorers or {}
    judge = has_judge(adherence)
    value_name = f"f_θ ({scorers['value_model']})" if scorers.get("value_model") else "f_θ"
    judge_name = f"judge ({scorers['judge']})" if scorers.get("judge") else "judge"
    header = ["Dataset", "Method", f"Mask adherence DSC (%) by {value_name}"] + (
        [f"Mask adherence DSC (%) by {judge_name}"] if judge else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in dict.fromkeys(adherence["dataset"]):
        rows = adherence[adherence["dataset"] == dataset]
        for method in method_order(rows["method"]):
            sets = rows[rows["method"] == method]
            cells = [dataset, method_label(method), mean_std(sets["dice"] * 100.0, 1)]
            if judge:
                cells.append(mean_std(sets["judge_dice"].dropna() * 100.0, 1))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Fidelity columns of the summary: label, metric (segsynth.fidelity.METRICS), scale, decimals.
FIDELITY_COLUMNS = (("FID", "fid", 1.0, 1), ("KID ×10³", "kid_mean", 1e3, 2), ("Domain FID", "domain_fid", 1.0, 3))


def fidelity_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Every synthetic set's fidelity rows (``score_fidelity``): dataset, generator, method, seed, metric (fid,
    kid_mean, kid_std, domain_fid), value, n_samples (synthetic), n_real. ``rows`` has columns dataset, method
    (the table label), seed, path; the label replaces the method name of the files."""
    frames = [pd.read_parquet(row.path).assign(method=row.method) for row in rows.itertuples(index=False)]
    columns = ["dataset", "generator", "method", "seed", "metric", "value", "n_samples", "n_real"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def fidelity_means(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, method and metric: mean and std (ddof = 1) over seeds, the number of seeds, and the sample
    counts the values rest on (n_samples, n_real: one number when equal over seeds, else "min–max"). Keyed by
    (dataset, method) like the main table's rows, so it can stand next to Dice."""
    return (fidelity.groupby(["dataset", "method", "metric"], sort=False)
            .agg(mean=("value", "mean"), std=("value", lambda v: v.std(ddof=1)), n_seeds=("seed", "nunique"),
                 n_samples=("n_samples", _count_range), n_real=("n_real", _count_range))
            .reset_index())


def _count_range(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}–{high}"


def fidelity_summary(fidelity: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method): FID, KID ×10³ and domain FID as "mean ± std" over seeds, and the numbers
    of real and synthetic images and seeds behind them."""
    rows = []
    for dataset in dict.fromkeys(fidelity["dataset"]):
        block = fidelity[fidelity["dataset"] == dataset]
        for method in method_order(block["method"]):
            run = block[block["method"] == method]
            row = {"Dataset": dataset, "Method": method_label(method)}
            for label, metric, scale, decimals in FIDELITY_COLUMNS:
                row[label] = mean_std(run.loc[run["metric"] == metric, "value"] * scale, decimals)
            row.update({"n real": _count_range(run["n_real"]), "n synthetic": _count_range(run["n_samples"]),
                        "Seeds": str(run["seed"].nunique())})
            rows.append(row)
    return pd.DataFrame(rows)


def fidelity_markdown(fidelity: pd.DataFrame) -> str:
    summary = fidelity_summary(fidelity)
    caption = ("Fidelity of the synthetic sets to the real training images, mean ± std over seeds (lower is closer). "
               "FID and KID on the TF-FID InceptionV3 (pool3, 2048 features; grey repeated to RGB, 8-bit, bilinear "
               "to 299²); KID: unbiased cubic-kernel MMD², per set the mean over 100 random subsets of "
               "min(1000, ⌊min(n real, n synthetic) / 2⌋) images of each side. Domain FID: Fréchet distance of the "
               "real-only segmenter f_θ's bottleneck features (global-average pooled). n real: training images; "
               "n synthetic: images per set.")
    lines = ["| " + " | ".join(summary.columns) + " |", "|" + "---|" * len(summary.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in summary.itertuples(index=False)]
    return "\n".join([caption, "", *lines]) + "\n"


def write_fidelity_tables(rows: pd.DataFrame, parquet_path, markdown_path) -> pd.DataFrame:
    fidelity = fidelity_table(rows)
    write_parquet(parquet_path, fidelity)
    write_text(markdown_path, fidelity_markdown(fidelity))
    return fidelity


def write_main_tables(runs: pd.DataFrame, parquet_path, markdown_path, tsv_path, fidelity_path=None,
                      adherence_path=None) -> pd.DataFrame:
    """The long parquet, the markdown table and the same summary as TSV (the report renders TSV tables); with
    the fidelity and adherence tables' parquets, their columns beside Dice."""
    main = main_table(runs)
    fidelity = pd.read_parquet(fidelity_path) if fidelity_path else None
    adherence = pd.read_parquet(adherence_path) if adherence_path else None
    write_parquet(parquet_path, main)
    write_text(markdown_path, main_markdown(main, fidelity, adherence))
    write_text(tsv_path, main_summary(main, fidelity, adherence).to_csv(sep="\t", index=False))
    return main


def write_adherence_tables(rows: pd.DataFrame, parquet_path, markdown_path, scorers: dict | None = None) -> pd.DataFrame:
    adherence = adherence_table(rows)
    write_parquet(parquet_path, adherence)
    write_text(markdown_path, adherence_markdown(adherence, scorers))
    return adherence


SYNTHETIC_ONLY_COLUMNS = ["dataset", "generator", "method", "seed", "segmenter", "metric", "value", "unit"]


def synthetic_only_table(runs: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """The LAW paper's test of a generator (its Table 2): a segmenter trained on one synthetic set alone,
    scored on the real test split, against the real-only Baseline of the same segmenter.

    ``runs``: dataset, generator, method, seed, segmenter, path (the synthetic-only model's evaluation parquet);
    ``baselines``: dataset, segmenter, path (the real-only model's). Long rows (``SYNTHETIC_ONLY_COLUMNS``) with
    the metrics ``dice`` (the class-"mean" DSC of the main table: means per class over volumes or images, then
    the mean over foreground classes), ``baseline_dice`` and ``dice_ratio`` = dice / baseline_dice, and the
    unit both were scored in (a run and its Baseline in different units are refused)."""
    baseline = {(row.dataset, row.segmenter): _mean_dice(row.path) for row in baselines.itertuples(index=False)}
    records = []
    for row in runs.itertuples(index=False):
        (dice, unit), (reference, reference_unit) = _mean_dice(row.path), baseline[(row.dataset, row.segmenter)]
        if unit != reference_unit:
            raise InputDataError(row.path, f"scored in {unit}, its Baseline in {reference_unit}; rerun the "
                                 "evaluations with one segsynth version")
        keys = {"dataset": row.dataset, "generator": row.generator, "method": row.method, "seed": row.seed,
                "segmenter": row.segmenter}
        records += [{**keys, "metric": "dice", "value": dice, "unit": unit},
                    {**keys, "metric": "baseline_dice", "value": reference, "unit": unit},
                    {**keys, "metric": "dice_ratio", "value": dice / reference, "unit": unit}]
    return pd.DataFrame(records, columns=SYNTHETIC_ONLY_COLUMNS)


def _mean_dice(path) -> tuple[float, str]:
    """The class-"mean" Dice of one evaluation parquet (as in the main table) and its unit."""
    means = _run_means(pd.read_parquet(path))
    dice = means.loc[(means["class"] == "mean") & (means["metric"] == "dice"), "value"].iloc[0]
    return float(dice), str(means["unit"].iloc[0])


def synthetic_only_markdown(table: pd.DataFrame) -> str:
    """Per (dataset, segmenter, generator, method): synthetic-only DSC and its ratio to the Baseline, mean ± std
    over seeds."""
    caption = ("A segmenter trained on one synthetic set alone (no real image), scored on the real test split; "
               "DSC in % (mean over foreground classes), mean ± std over synthesis seeds; ratio: synthetic-only "
               "DSC / real-only Baseline DSC of the same segmenter, in %. "
               f"{units_phrase(dataset_units(table), 'DSC', distances=False)}.")
    lines = ["| Dataset | Segmenter | Generator | Method | Synthetic-only DSC (%) | Baseline DSC (%) | Ratio (%) | Seeds |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ["dataset", "segmenter", "generator", "method"]
    for (dataset, segmenter, generator, method), block in table.groupby(keys, sort=False):
        values = {metric: block.loc[block["metric"] == metric, "value"] * 100.0
                  for metric in ("dice", "baseline_dice", "dice_ratio")}
        lines.append(f"| {dataset} | {segmenter} | {generator} | {method} | {mean_std(values['dice'], 1)} | "
                     f"{values['baseline_dice'].iloc[0]:.1f} | {mean_std(values['dice_ratio'], 1)} | "
                     f"{block['seed'].nunique()} |")
    return "\n".join([caption, "", *lines]) + "\n"


def write_synthetic_only_tables(runs: pd.DataFrame, baselines: pd.DataFrame, parquet_path,
                                markdown_path) -> pd.DataFrame:
    table = synthetic_only_table(runs, baselines)
    write_parquet(parquet_path, table)
    write_text(markdown_path, synthetic_only_markdown(table))
    return table


def method_order(methods: pd.Series) -> list[str]:
    """Baseline first, then the other methods in the order they first appear."""
    order = list(dict.fromkeys(methods))
    return sorted(order, key=lambda method: method != BASELINE)


def method_label(method: str) -> str:
    return "Baseline" if method == BASELINE else method


def mean_std(values: pd.Series, decimals: int) -> str:
    """"m ± s" over seeds; a single run has no spread, so only its value; no runs, a dash."""
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    return f"{values.mean():.{decimals}f} ± {values.std(ddof=1):.{decimals}f}"


def _caption(means: pd.DataFrame) -> str:
    """States the number of seeds behind each ± (of the non-baseline methods) and how Baseline was run."""
    seeds = (means[means["method"] != BASELINE]
             .groupby(["dataset", "segmenter", "method"])["seed"].nunique())
    counts = sorted(set(seeds.tolist())) or [1]
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    baseline_seeds = means.loc[means["method"] == BASELINE, "seed"].nunique()
    baseline = "a single real-only run" if baseline_seeds == 1 else f"real-only, {baseline_seeds} seeds"
    return (f"Mean ± std over n = {n} seeds of the mean over foreground classes (Baseline: {baseline}); "
            f"{units_phrase(dataset_units(means))}.")


# ---- paired tests ----------------------------------------------------------------------------------------------

def per_case_dice(path) -> pd.Series:
    """One evaluation file (``evaluate_segmenter``'s long frame) → Dice per scored unit (test image, or volume
    where the dataset has them), the mean over foreground classes, indexed by sample id."""
    frame, _ = scored_rows(pd.read_parquet(path))  # volumes where the dataset has them, as the main table
    dice = frame[frame["metric"] == "dice"]
    if dice.empty:
        raise InputDataError(path, "no Dice rows")
    return dice.groupby("sample_id")["value"].mean()


def paired_wilcoxon(candidate: dict, reference: dict) -> dict:
    """A Wilcoxon signed-rank test of a row's per-case Dice against the reference row's, seeds pooled.

    ``candidate`` and ``reference`` map seed → per-case Dice (``per_case_dice``). Seeds are paired with the same
    seed of the reference; a reference with a single run (the real-only Baseline) is paired with every seed.
    Pairs are (seed, case); cases with a NaN on either side are dropped. Returns n pairs, the median difference
    and the two-sided p-value (NaN when every difference is zero or there are no pairs)."""
    from scipy.stats import wilcoxon

    differences = []
    for seed, values in candidate.items():
        if len(reference) == 1:
            other = next(iter(reference.values()))
        elif seed in reference:
            other = reference[seed]
        else:
            continue
        joined = pd.concat([values.rename("a"), other.rename("b")], axis=1, join="inner").dropna()
        differences.append((joined["a"] - joined["b"]).to_numpy())
    diff = np.concatenate(differences) if differences else np.array([])
    if diff.size == 0 or not np.any(diff != 0):
        return {"n_pairs": int(diff.size), "median_difference": float(np.median(diff)) if diff.size else np.nan,
                "p_value": np.nan}
    result = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return {"n_pairs": int(diff.size), "median_difference": float(np.median(diff)), "p_value": float(result.pvalue)}


def significance_mark(p_value: float) -> str:
    """* p < 0.05, ** p < 0.01; nothing for a larger or missing p."""
    if p_value is None or not np.isfinite(p_value):
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def wilcoxon_columns(candidate: dict, reference: dict) -> dict:
    """:func:`paired_wilcoxon` of two rows given as seed → evaluation parquet, as a table's columns
    (``wilcoxon_n_pairs``, ``wilcoxon_median_difference``, ``wilcoxon_p_value``)."""
    test = paired_wilcoxon({seed: per_case_dice(path) for seed, path in candidate.items()},
                           {seed: per_case_dice(path) for seed, path in reference.items()})
    return {f"wilcoxon_{key}": value for key, value in test.items()}


def p_cell(p_value) -> str:
    """A markdown cell for a Wilcoxon p-value with its mark; a dash for the reference row or no test."""
    if p_value is None or not np.isfinite(p_value):
        return "–"
    return f"{p_value:.3g}{significance_mark(p_value)}"


def row_test(runs: pd.DataFrame | None, dataset: str, segmenter: str, label: str, reference: str) -> list[dict]:
    """A LAW / ViCTr row table's ``wilcoxon_p`` metric row: the row's per-case DSC (its runs in ``runs``, the main
    table's run list with eval paths, seeds pooled) against the reference row's, by :func:`wilcoxon_columns`;
    ``value`` the p-value (NaN for the reference row itself), ``n`` the pairs. No row without ``runs``."""
    if runs is None:
        return []

    def paths(method: str) -> dict:
        hit = runs[(runs["dataset"] == dataset) & (runs["segmenter"] == segmenter) & (runs["method"] == method)]
        return dict(zip(hit["seed"].astype(int), hit["path"]))

    candidate, base = paths(label), paths(reference)
    if label == reference or not candidate or not base:
        return [{"metric": "wilcoxon_p", "value": np.nan, "std": np.nan, "n": 0}]
    test = wilcoxon_columns(candidate, base)
    return [{"metric": "wilcoxon_p", "value": test["wilcoxon_p_value"], "std": np.nan,
             "n": test["wilcoxon_n_pairs"]}]


def row_test_phrase(reference: str) -> str:
    """The caption's sentence on a row table's p column."""
    return (f" p: two-sided Wilcoxon signed-rank test of the row's per-case DSC (seeds pooled) against the "
            f"{reference} row's; * p < 0.05, ** p < 0.01.")


def paired_test_phrase(table: pd.DataFrame) -> str:
    """The caption's sentence on a segmenter table's p column: the test and each dataset's reference row."""
    references = table.groupby("dataset", sort=False)["reference"].first()
    named = ", ".join(f"{d}: {r}" for d, r in references.items())
    return (f"p: two-sided Wilcoxon signed-rank test of the row's per-case DSC against its dataset's first row "
            f"({named}); * p < 0.05, ** p < 0.01.")


def segmenter_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, segmenter) real-only model, the shape of ORDER's Table 3.

    ``rows`` has columns dataset, segmenter, eval (the model's test metrics parquet), profile (the JSON of
    ``profile_segmenter``) and benchmark (the training job's benchmark file). Metrics are mean and std over
    the scored units (test volumes where the evaluation has volume rows, else test samples: :func:`scored_rows`)
    of each unit's mean over the foreground classes present (Dice, ASD, HD95); ``unit`` says which.
    """
    from .io import read_json

    records = []
    for row in rows.itertuples(index=False):
        profile = read_json(row.profile)
        metrics, unit = scored_rows(pd.read_parquet(row.eval))
        per_sample = metrics.groupby(["metric", "sample_id"])["value"].mean().groupby("metric")
        record = {"dataset": row.dataset, "segmenter": row.segmenter, "kind": profile["kind"],
                  "params": profile["params"], "macs": profile["macs"],
                  "train_s": float(pd.read_csv(row.benchmark, sep="\t")["s"].iloc[-1])}
        for metric, values in per_sample:
            record[f"{metric}_mean"], record[f"{metric}_std"] = values.mean(), values.std(ddof=1)
        records.append({**record, "unit": unit, "eval": str(row.eval)})
    table = pd.DataFrame(records)
    # ORDER's Table 3 compares segmenters on one test set: each row's per-case Dice against its dataset's first
    # row (run.segmenters' first entry), Wilcoxon signed-rank
    tests = []
    for record in records:
        reference = next(r for r in records if r["dataset"] == record["dataset"])
        tests.append({"reference": reference["segmenter"],
                      **({} if reference is record else wilcoxon_columns({0: record["eval"]}, {0: reference["eval"]}))})
    return pd.concat([table, pd.DataFrame(tests)], axis=1)


def segmenter_markdown(table: pd.DataFrame) -> str:
    units = dataset_units(table)
    if set(units.values()) <= {SLICE_PX}:
        metrics = ("metrics are mean ± std over test samples of the mean over foreground classes "
                   "(DSC and IoU in %, ASD and HD95 in pixels)")
    else:
        metrics = ("metrics are mean ± std over test volumes or images of the mean over foreground classes "
                   f"({units_phrase(units)})")
    lines = [f"Real-only models; {metrics}; MACs of one image at the dataset's resolution; training wall "
             f"time from the job's benchmark file. {paired_test_phrase(table)}", "",
             "| Dataset | Segmenter | Kind | Params | MACs (M) | Train s | DSC (%) | IoU (%) | ASD | HD95 | "
             "p (Wilcoxon, DSC) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        iou = value_cell(getattr(r, "iou_mean", float("nan")), getattr(r, "iou_std", float("nan")), 100.0, 1)
        lines.append(f"| {r.dataset} | {r.segmenter} | {r.kind} | {r.params:,} | {r.macs / 1e6:.1f} | {r.train_s:.0f} | "
                     f"{100 * r.dice_mean:.1f} ± {100 * r.dice_std:.1f} | {iou} | {r.asd_mean:.2f} ± {r.asd_std:.2f} | "
                     f"{r.hd95_mean:.2f} ± {r.hd95_std:.2f} | {p_cell(getattr(r, 'wilcoxon_p_value', None))} |")
    return "\n".join(lines) + "\n"


def write_segmenter_tables(rows: pd.DataFrame, parquet_path, markdown_path) -> pd.DataFrame:
    table = segmenter_table(rows)
    write_parquet(parquet_path, table)
    write_text(markdown_path, segmenter_markdown(table))
    return table


def cost_table(benchmark_files) -> pd.DataFrame:
    """Per stage: job count, summed and longest wall seconds, and the largest peak RSS (MiB) over its jobs,
    read from the Snakemake ``benchmark:`` files (s, max_rss columns) of this run's jobs — exactly the given
    files (``<benchmark dir>/{dataset}/{stage}/...``), never others left there by earlier configs."""
    from pathlib import Path

    rows = []
    for path in sorted(Path(f) for f in benchmark_files):
        bench = pd.read_csv(path, sep="\t")
        rows.append({"stage": _stage_of(Path(*path.parts[1:])), "seconds": float(bench["s"].iloc[-1]),
                     "max_rss_mib": float(pd.to_numeric(bench["max_rss"], errors="coerce").iloc[-1])})
    frame = pd.DataFrame(rows, columns=["stage", "seconds", "max_rss_mib"])
    return (frame.groupby("stage", sort=False)
            .agg(jobs=("seconds", "size"), total_s=("seconds", "sum"), longest_s=("seconds", "max"),
                 max_rss_mib=("max_rss_mib", "max"))
            .reset_index())


def _stage_of(relative) -> str:
    """benchmarks/{dataset}/{stage}/... → stage (splits.tsv → splits; segmenters/x/real.tsv → segmenters real)."""
    parts = relative.with_suffix("").parts[1:]
    if parts[0] == "segmenters":
        return "segmenters (real)" if parts[-1] == "real" else "segmenters (real + synthetic)"
    if parts[0] == "synthetic_only":  # synthetic_only/{segmenters,eval}/...
        return f"synthetic-only {parts[1]}"
    return parts[0]


def cost_markdown(costs: pd.DataFrame) -> str:
    lines = ["| Stage | Jobs | Total s | Longest job s | Peak RSS MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r.stage} | {r.jobs} | {r.total_s:.0f} | {r.longest_s:.0f} | {r.max_rss_mib:.0f} |"
              for r in costs.itertuples(index=False)]
    lines.append(f"| all | {costs['jobs'].sum()} | {costs['total_s'].sum():.0f} | "
                 f"{costs['longest_s'].max():.0f} | {costs['max_rss_mib'].max():.0f} |")
    return "\n".join(lines) + "\n"


def write_cost_tables(benchmark_files, parquet_path, markdown_path) -> pd.DataFrame:
    costs = cost_table(benchmark_files)
    write_parquet(parquet_path, costs)
    write_text(markdown_path, cost_markdown(costs))
    return costs


def mask_vae_table(datasets: list[str], mask_vae_dirs: list) -> pd.DataFrame:
    """The quality parquets the train_mask_vae jobs wrote (segsynth.mask_vae.mask_quality), one block per
    dataset."""
    frames = [pd.read_parquet(Path(d) / "quality.parquet").assign(dataset=name)
              for name, d in zip(datasets, mask_vae_dirs)]
    table = pd.concat(frames, ignore_index=True)
    return table[["dataset", *[c for c in table.columns if c != "dataset"]]]


def mask_vae_markdown(table: pd.DataFrame) -> str:
    lines = ["Samples of p_ω(m | c), one per training mask conditioned on its classes, against the training masks; "
             "presence and area in % of masks / of the image.", "",
             "| Dataset | Class | Presence train | Presence sampled | Area train | Area sampled | Area W₁ | "
             "Condition recall | Spurious |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        lines.append(f"| {row.dataset} | {row.class_name} | {100 * row.presence_train:.1f} | "
                     f"{100 * row.presence_sampled:.1f} | {100 * row.area_train:.2f} | {100 * row.area_sampled:.2f} | "
                     f"{100 * row.area_wasserstein:.2f} | {100 * row.condition_recall:.1f} | "
                     f"{100 * row.spurious_rate:.1f} |")
    return "\n".join(lines) + "\n"


def write_mask_vae_tables(datasets: list[str], mask_vae_dirs: list, parquet_path, markdown_path) -> pd.DataFrame:
    table = mask_vae_table(datasets, mask_vae_dirs)
    write_parquet(parquet_path, table)
    write_text(markdown_path, mask_vae_markdown(table))
    return table


# ------------------------------------------------------------------------------------------------------------
# LAW & ORDER (results/tables/law_*.md, order_ablation.md): views over the DAG's own tables, a row per
# generator (a weighting) or per segmenter (an attention placement) that the config's analyses name.
# ------------------------------------------------------------------------------------------------------------
def _set_label(generator: str, method: str, labelled: bool) -> str:
    """The method label the main, fidelity and adherence tables give a generator's sets (rules/common.smk)."""
    return f"{generator}:{method}" if labelled else method


def seed_summary(values: pd.Series) -> dict:
    """A row table's cell: mean, sample std and count of one metric over synthesis seeds (NaNs dropped)."""
    values = values.dropna()
    return {"value": values.mean() if len(values) else float("nan"),
            "std": values.std(ddof=1) if len(values) > 1 else float("nan"), "n": int(len(values))}


def training_stability(stats: dict) -> str:
    """The stability column of LAW's Table 4, read from a generator's ``train_stats.json`` ``weighting``
    summary: ``unstable`` (a non-finite loss), ``diverged`` (the last 50 steps' mean loss over twice the first
    50's), ``collapsed`` (over half the pixels pinned at w_min, i.e. the loss ignores most of the image) or
    ``stable``."""
    summary = stats.get("weighting") or {}
    if not summary:
        return "–"
    if not summary.get("losses_finite", True):
        return "unstable"
    first, last = summary.get("first_loss"), summary.get("last_loss")
    if first and last is not None and last > 2.0 * first:
        return "diverged"
    if summary.get("at_w_min", 0.0) > 0.5:
        return "collapsed"
    return "stable"


def law_tables(settings: dict, fidelity: pd.DataFrame, adherence: pd.DataFrame, main: pd.DataFrame,
               generator_stats: dict, runs: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """LAW's Tables 1, 2 and 4 in long form (one row per dataset, row label and metric; ``value`` the mean over
    synthesis seeds, ``std`` their standard deviation, ``n`` the seeds). ``settings``: method, segmenter,
    synthesis and ablation (label → generator), labelled; ``generator_stats``: generator → its train_stats.
    With ``runs`` (the main table's runs and their eval paths), Tables 2 and 4 carry a ``wilcoxon_p`` metric:
    each row's per-case DSC against Real only (Table 2) and against the ablation's first row (Table 4)."""
    method, segmenter, labelled = settings["method"], settings["segmenter"], settings["labelled"]
    summarise = seed_summary

    def fidelity_rows(dataset, label, generator):
        label = _set_label(generator, method, labelled)
        sets = fidelity[(fidelity["dataset"] == dataset) & (fidelity["generator"] == generator)
                        & (fidelity["method"] == label)]
        rows = [{"metric": metric, **summarise(sets.loc[sets["metric"] == metric, "value"])}
                for metric in ("fid", "kid_mean", "domain_fid")]
        sets = adherence[(adherence["dataset"] == dataset) & (adherence["method"] == label)]
        rows.append({"metric": "adherence_dice", **summarise(sets["dice"])})
        if "judge_dice" in sets:
            rows.append({"metric": "judge_adherence_dice", **summarise(sets["judge_dice"])})
        return rows

    def downstream_rows(dataset, generator):
        label = BASELINE if generator is None else _set_label(generator, method, labelled)
        runs = main[(main["dataset"] == dataset) & (main["segmenter"] == segmenter) & (main["method"] == label)
                    & (main["class"] == "mean")]
        return [{"metric": metric, **summarise(runs.loc[runs["metric"] == metric, "value"])}
                for metric in ("dice", "iou")]

    synthesis, downstream, ablation = [], [], []
    for dataset in dict.fromkeys(main["dataset"]):
        for label, generator in settings["synthesis"].items():
            base = {"dataset": dataset, "row": label, "generator": generator}
            synthesis += [{**base, **row} for row in fidelity_rows(dataset, label, generator)]
        downstream += [{"dataset": dataset, "row": "Real only", "generator": None, "segmenter": segmenter, **row}
                       for row in downstream_rows(dataset, None) + row_test(runs, dataset, segmenter, BASELINE,
                                                                               BASELINE)]
        for label, generator in settings["synthesis"].items():
            tested = row_test(runs, dataset, segmenter, _set_label(generator, method, labelled), BASELINE)
            downstream += [{"dataset": dataset, "row": f"+ {label}", "generator": generator, "segmenter": segmenter,
                            **row} for row in downstream_rows(dataset, generator) + tested]
        first = _set_label(next(iter(settings["ablation"].values())), method, labelled) if settings["ablation"] else None
        for label, generator in settings["ablation"].items():
            base = {"dataset": dataset, "row": label, "generator": generator,
                    "stability": training_stability(generator_stats.get(generator, {}))}
            ablation += [{**base, **row} for row in fidelity_rows(dataset, label, generator)
                         if row["metric"] in ("fid", "domain_fid")]
            tested = row_test(runs, dataset, segmenter, _set_label(generator, method, labelled), first)
            ablation += [{**base, **row, "segmenter": segmenter} for row in downstream_rows(dataset, generator) + tested
                         if row["metric"] in ("dice", "wilcoxon_p")]
    return {"law_synthesis": pd.DataFrame(synthesis), "law_downstream": pd.DataFrame(downstream),
            "law_ablation": pd.DataFrame(ablation)}


#: The LAW and ViCTr tables' columns, in this order: metric → (header, scale, decimals)
ROW_TABLE_COLUMNS = {"steps": ("Steps", 1.0, 0), "fid": ("FID", 1.0, 1), "kid_mean": ("KID ×10³", 1e3, 2),
                     "domain_fid": ("Domain FID", 1.0, 3), "seconds_per_image": ("s / image", 1.0, 3),
               "adherence_dice": ("Adherence DSC (%) by f_θ", 100.0, 1),
               "judge_adherence_dice": ("Adherence DSC (%) by the judge", 100.0, 1),
               "dice": ("mDice (%)", 100.0, 1), "iou": ("mIoU (%)", 100.0, 1), "hd95": ("mHD95 (px)", 1.0, 2),
               "wilcoxon_p": ("p (Wilcoxon, DSC)", 1.0, 3)}


def value_cell(value: float, std: float, scale: float, decimals: int) -> str:
    """"m ± s" of a mean and std already computed (a single run's std is NaN: only its value; no value, a dash)."""
    if pd.isna(value):
        return "–"
    if pd.isna(std):
        return f"{value * scale:.{decimals}f}"
    return f"{value * scale:.{decimals}f} ± {std * scale:.{decimals}f}"


def row_table_markdown(table: pd.DataFrame, caption: str, extra: tuple[str, ...] = ()) -> str:
    """A long LAW table as markdown: a row per (dataset, row label), a column per metric (mean ± std over
    seeds), then the ``extra`` columns as they are."""
    metrics = [m for m in ROW_TABLE_COLUMNS if m in set(table["metric"])]
    header = ["Dataset", "Row", *(ROW_TABLE_COLUMNS[m][0] for m in metrics), *(e.capitalize() for e in extra)]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, row), group in table.groupby(["dataset", "row"], sort=False):
        cells = [dataset, row]
        for metric in metrics:
            hit = group[group["metric"] == metric]
            if not len(hit):
                cells.append("–")
            elif metric == "wilcoxon_p":
                cells.append(p_cell(hit["value"].iloc[0]))
            else:
                cells.append(value_cell(hit["value"].iloc[0], hit["std"].iloc[0], *ROW_TABLE_COLUMNS[metric][1:]))
        cells += [str(group[e].iloc[0]) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LAW_CAPTIONS = {
    "law_synthesis": ("LAW Table 1: each weighting's generator, its sets sampled by {method}; mean ± std over "
                      "synthesis seeds. FID, KID and domain FID against the real training images "
                      "(results/tables/fidelity.md says how; CLIP-I needs a CLIP model this run does not have); "
                      "adherence: real-only segmenters' DSC on the samples against their masks."),
    "law_downstream": ("LAW Table 2: the {segmenter} segmenter trained on real + each weighting's {method} set "
                       "(Real only: the Baseline, one run); test mDice and mIoU, mean ± std over synthesis seeds."),
    "law_ablation": ("LAW Table 4: the ablation's generators; FID and domain FID of their {method} sets, the "
                     "{segmenter} segmenter's test mDice on real + each set; stability measured from each "
                     "generator's training (train_stats.json: non-finite loss = unstable, last 50 steps' loss "
                     "over twice the first 50's = diverged, most pixels at w_min = collapsed)."),
}


def write_law_tables(settings: dict, fidelity_path, adherence_path, main_path, generator_dirs: dict,
                     out_dir, runs: list[dict] | None = None) -> dict[str, pd.DataFrame]:
    """The three LAW tables as ``<out_dir>/<name>.parquet`` and ``.md``; ``generator_dirs``: generator →
    its trained directory (its ``train_stats.json`` has the training's weighting summary); ``runs``: the main
    table's runs (dataset, segmenter, method, seed, path), for the paired tests."""
    from .io import read_json

    stats = {g: read_json(Path(d) / "train_stats.json") for g, d in generator_dirs.items()}
    tables = law_tables(settings, pd.read_parquet(fidelity_path), pd.read_parquet(adherence_path),
                        pd.read_parquet(main_path), stats, pd.DataFrame(runs) if runs else None)
    references = {"law_downstream": "Real only", "law_ablation": next(iter(settings["ablation"]), None)}
    for name, table in tables.items():
        write_parquet(Path(out_dir) / f"{name}.parquet", table)
        caption = LAW_CAPTIONS[name].format(**settings)
        if runs and references.get(name):
            caption += row_test_phrase(references[name])
        write_text(Path(out_dir) / f"{name}.md",
                   row_table_markdown(table, caption, ("stability",) if name == "law_ablation" else ()))
    return tables


def victr_tables(settings: dict, fidelity: pd.DataFrame, main: pd.DataFrame, seconds: dict,
                 runs: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """ViCTr's Tables 2, 3 and 4 in long form, a row per (dataset, row label) as the LAW tables. ``settings``:
    segmenter, synthesis and ablation (label → {generator, method}), steps (method → sampling steps),
    labelled; ``seconds``: "<dataset>/<generator>/<method>/seed<k>" → the synthesis job's wall seconds (its
    benchmark file), divided by the set's size for the seconds per image. With ``runs`` (the main table's runs
    and their eval paths), Tables 3 and 4 carry a ``wilcoxon_p`` metric: each row's per-case DSC against its
    table's first row."""
    segmenter, labelled = settings["segmenter"], settings["labelled"]

    def set_rows(dataset, row):
        label = _set_label(row["generator"], row["method"], labelled)
        sets = fidelity[(fidelity["dataset"] == dataset) & (fidelity["generator"] == row["generator"])
                        & (fidelity["method"] == label)]
        rows = [{"metric": "steps", "value": float(settings["steps"][row["method"]]), "std": float("nan"), "n": 1}]
        rows += [{"metric": metric, **seed_summary(sets.loc[sets["metric"] == metric, "value"])}
                 for metric in ("fid", "domain_fid")]
        per_image = pd.Series([seconds[f"{dataset}/{row['generator']}/{row['method']}/seed{s}"] / n
                               for s, n in sets.groupby("seed")["n_samples"].first().items()
                               if f"{dataset}/{row['generator']}/{row['method']}/seed{s}" in seconds], dtype=float)
        rows.append({"metric": "seconds_per_image", **seed_summary(per_image)})
        return rows

    def downstream_rows(dataset, row, metrics):
        label = _set_label(row["generator"], row["method"], labelled)
        runs = main[(main["dataset"] == dataset) & (main["segmenter"] == segmenter) & (main["method"] == label)
                    & (main["class"] == "mean")]
        return [{"metric": metric, "segmenter": segmenter, **seed_summary(runs.loc[runs["metric"] == metric, "value"])}
                for metric in metrics]

    def tested(dataset, row, first):
        return [{"segmenter": segmenter, **r} for r in row_test(
            runs, dataset, segmenter, _set_label(row["generator"], row["method"], labelled),
            _set_label(first["generator"], first["method"], labelled))]

    synthesis, downstream, ablation = [], [], []
    ablation_rows = settings.get("ablation") or {}
    first, first_ablation = next(iter(settings["synthesis"].values())), next(iter(ablation_rows.values()), None)
    for dataset in dict.fromkeys(main["dataset"]):
        for label, row in settings["synthesis"].items():
            base = {"dataset": dataset, "row": label, **row}
            synthesis += [{**base, **r} for r in set_rows(dataset, row)]
            downstream += [{**base, **r} for r in downstream_rows(dataset, row, ("dice", "hd95"))
                           + tested(dataset, row, first)]
        for label, row in ablation_rows.items():
            base = {"dataset": dataset, "row": label, **row}
            ablation += [{**base, **r} for r in set_rows(dataset, row) if r["metric"] in ("fid", "domain_fid")]
            ablation += [{**base, **r} for r in downstream_rows(dataset, row, ("dice",))
                         + tested(dataset, row, first_ablation)]
    return {"victr_synthesis": pd.DataFrame(synthesis), "victr_downstream": pd.DataFrame(downstream),
            "victr_ablation": pd.DataFrame(ablation)}


VICTR_CAPTIONS = {
    "victr_synthesis": ("ViCTr Table 2: each row's generator sampled by its method; FID and domain FID against "
                        "the real training images (results/tables/fidelity.md says how) and the synthesis job's wall "
                        "seconds per image, mean ± std over synthesis seeds; steps: the method's sampling steps."),
    "victr_downstream": ("ViCTr Table 3: the {segmenter} segmenter trained on real + each row's set; test mDice (%) "
                         "and mHD95 (px), mean ± std over synthesis seeds."),
    "victr_ablation": ("ViCTr Table 4: the ablation's generators (Tweedie's correction, each loss term, the LoRA "
                       "rank, Stage 1); FID and domain FID of their sets and the {segmenter} segmenter's test mDice "
                       "on real + each set, mean ± std over synthesis seeds."),
}


def write_victr_tables(settings: dict, fidelity_path, main_path, benchmark_files: dict, out_dir,
                       runs: list[dict] | None = None) -> dict:
    """The ViCTr tables as ``<out_dir>/<name>.parquet`` and ``.md``; ``benchmark_files``: set key → the
    synthesis job's benchmark file (Snakemake's, column ``s``: wall seconds); ``runs``: the main table's runs
    (dataset, segmenter, method, seed, path), for the paired tests."""
    seconds = {key: float(pd.read_csv(path, sep="\t")["s"].iloc[-1]) for key, path in benchmark_files.items()}
    tables = victr_tables(settings, pd.read_parquet(fidelity_path), pd.read_parquet(main_path), seconds,
                          pd.DataFrame(runs) if runs else None)
    references = {"victr_downstream": next(iter(settings["synthesis"])),
                  "victr_ablation": next(iter(settings.get("ablation") or {}), None)}
    for name, table in tables.items():
        if table.empty:  # no ablation rows configured
            continue
        write_parquet(Path(out_dir) / f"{name}.parquet", table)
        caption = VICTR_CAPTIONS[name].format(**settings)
        if runs and references.get(name):
            caption += row_test_phrase(references[name])
        write_text(Path(out_dir) / f"{name}.md", row_table_markdown(table, caption))
    return tables


def segmenter_rows_table(segmenters: pd.DataFrame, rows: dict, analysis: str) -> pd.DataFrame:
    """An ablation over segmenter entries (ORDER's Tables 5–6, LEAF's Tables 2–3): per dataset and row label
    (→ a segmenter of the segmenter table), its params and real-only test mDice and mIoU (mean ± std over test
    units, as the segmenter table has them) and a Wilcoxon signed-rank test of its per-case Dice against the
    first row's, the ablation's baseline (LEAF: "we establish the baseline as ... the first row in Table 2").
    ``analysis`` names the config key in errors."""
    records = []
    for dataset in dict.fromkeys(segmenters["dataset"]):
        first = None
        for label, name in rows.items():
            hit = segmenters[(segmenters["dataset"] == dataset) & (segmenters["segmenter"] == name)]
            if hit.empty:
                raise InputDataError("results/tables/segmenters.parquet", f"no row for segmenter {name!r} of "
                                     f"dataset {dataset!r} ({analysis} row {label!r})")
            r = hit.iloc[0]
            first = r if first is None else first
            test = {} if r is first else wilcoxon_columns({0: r["eval"]}, {0: first["eval"]})
            records.append({"dataset": dataset, "row": label, "segmenter": name, "params": int(r["params"]),
                            "dice_mean": r["dice_mean"], "dice_std": r["dice_std"],
                            "iou_mean": r.get("iou_mean", float("nan")), "iou_std": r.get("iou_std", float("nan")),
                            "reference": first["segmenter"], **test})
    return pd.DataFrame(records)


def segmenter_rows_markdown(table: pd.DataFrame, caption: str) -> str:
    lines = [f"{caption} {paired_test_phrase(table)}", "",
             "| Dataset | Configuration | Segmenter | Params | mDice (%) | mIoU (%) | p (Wilcoxon, DSC) |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.row} | {r.segmenter} | {r.params:,} | "
                     f"{value_cell(r.dice_mean, r.dice_std, 100.0, 1)} | {value_cell(r.iou_mean, r.iou_std, 100.0, 1)} | "
                     f"{p_cell(getattr(r, 'wilcoxon_p_value', None))} |")
    return "\n".join(lines) + "\n"


ORDER_CAPTION = ("ORDER Tables 5–6: where the bidirectional skip attention sits (stages numbered from the "
                 "full-resolution end); real-only models, test mDice and mIoU in %, mean ± std over test samples.")


def write_order_ablation_tables(segmenters_path, rows: dict, parquet_path, markdown_path) -> pd.DataFrame:
    table = segmenter_rows_table(pd.read_parquet(segmenters_path), rows, "analyses.order")
    write_parquet(parquet_path, table)
    write_text(markdown_path, segmenter_rows_markdown(table, ORDER_CAPTION))
    return table


LEAF_CAPTIONS = {
    "leaf_parameterisation": "LEAF Table 2: what the UNet predicts (ε, v or the mask latent x0) with and without "
                             "feature alignment; real-only models, one reverse step, test mDice and mIoU in %, "
                             "mean ± std over test samples.",
    "leaf_lambda": "LEAF Table 3: the feature-alignment weight λ; real-only models, test mDice and mIoU in %, "
                   "mean ± std over test samples.",
}


def leaf_stability_table(files: dict, labels: dict) -> pd.DataFrame:
    """LEAF Table 4: per dataset and row label, the spread over inference seeds of the test mDice (and mIoU).
    ``files`` maps "dataset/segmenter" to the per-seed frame ``inference_seed_stability`` wrote; ``labels`` maps
    row label → segmenter."""
    records = []
    for label, segmenter in labels.items():
        for key, path in files.items():
            dataset, name = key.split("/", 1)
            if name != segmenter:
                continue
            per_seed = pd.read_parquet(path)
            records.append({"dataset": dataset, "row": label, "segmenter": segmenter, "n_seeds": len(per_seed),
                            "dice_mean": per_seed["dice"].mean(), "dice_std": per_seed["dice"].std(ddof=1),
                            "iou_mean": per_seed["iou"].mean(), "iou_std": per_seed["iou"].std(ddof=1)})
    return pd.DataFrame(records).sort_values("dataset", kind="stable").reset_index(drop=True)


def leaf_stability_markdown(table: pd.DataFrame) -> str:
    n = sorted(set(table["n_seeds"]))
    lines = [f"LEAF Table 4: stability over {', '.join(map(str, n))} inference seeds (the single step's z_T); "
             "real-only models, test mDice and mIoU in %: the mean over seeds and the standard deviation over seeds "
             "of the test-set mean.", "",
             "| Dataset | Configuration | Segmenter | Seeds | mDice (%) | Dice std over seeds (%) | mIoU (%) | "
             "IoU std over seeds (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.row} | {r.segmenter} | {r.n_seeds} | {100 * r.dice_mean:.2f} | "
                     f"{100 * r.dice_std:.3f} | {100 * r.iou_mean:.2f} | {100 * r.iou_std:.3f} |")
    return "\n".join(lines) + "\n"


def write_leaf_tables(segmenters_path, settings: dict, stability_files: dict, out_dir) -> dict:
    """LEAF's Tables 2–4 as ``out_dir/leaf_*.parquet`` and ``.md`` (those ``settings`` — analyses.leaf — names)."""
    segmenters = pd.read_parquet(segmenters_path)
    tables = {}
    for name, key in (("leaf_parameterisation", "parameterisation"), ("leaf_lambda", "lambda")):
        if settings.get(key):
            tables[name] = segmenter_rows_table(segmenters, settings[key], f"analyses.leaf.{key}")
            write_text(Path(out_dir) / f"{name}.md", segmenter_rows_markdown(tables[name], LEAF_CAPTIONS[name]))
    if settings.get("stability"):
        tables["leaf_stability"] = leaf_stability_table(stability_files, settings["stability"])
        write_text(Path(out_dir) / "leaf_stability.md", leaf_stability_markdown(tables["leaf_stability"]))
    for name, table in tables.items():
        write_parquet(Path(out_dir) / f"{name}.parquet", table)
    return tables
