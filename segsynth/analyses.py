"""The papers' analyses beyond the main table: the Miner paper's synthesis-budget sweep and adversariality
subsets, and VGD's synthesize–train rounds.

- Budget sweep: the same method at N_s = b × |train| for b in a list (the paper's "gains keep growing with
  budget" for the Miner, saturating for RD). A sweep entry is an ordinary synthesis method whose ``budget`` is
  b (the workflow derives ``<method>_x<b>`` entries); b = the method's own budget (``synthesis.budget``
  unless its entry sets one) is the main run itself.
- Adversariality subsets: the samples of one synthetic set whose adversariality under f_θ exceeds τ, read on the
  paper code's scale 1 − exp(−class-balanced CE) (records column ``adversariality``; the paper's subset
  table: count, share, ΔDSC, per-sample gain ΔDSC (points)/|U|). τ = 0 is the whole set, i.e. the main run.

- Synthesize–train rounds (VGD Fig. 5): round 1 is the guided method's main run; round r ≥ 2 samples the same
  method guided by f_θ = the segmenter trained on real + round r − 1's set (same seed), so the value model
  follows the data it is trained on. The table has, per round, the set's mean value under its own f_θ and the
  Dice of the model trained on real + that set.

Every table reads the per-run metrics the evaluation stage wrote; nothing is typed in.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import InputDataError
from .io import atomic_dir, save_array, write_json, write_parquet, write_text
from .synthetic_set import load_synthetic_set
from .tables import (dataset_units, main_table, mean_std, p_cell, significance_mark, units_phrase,
                     wilcoxon_columns)

SUBSET_META = "meta.json"


def adversarial_subset(synthetic_dir, threshold: float, out_dir) -> dict:
    """Write the samples of ``synthetic_dir`` with adversariality > ``threshold`` as a synthetic set (possibly
    empty)."""
    source = load_synthetic_set(synthetic_dir)
    if "adversariality" not in source.records:
        raise InputDataError(f"{synthetic_dir}/records.parquet",
                             "has no adversariality column (1 − exp(−class-balanced CE) under f_θ)")
    keep = (source.records["adversariality"] > threshold).to_numpy()
    meta = {"source": str(synthetic_dir), "threshold": float(threshold), "n_source": int(len(keep)),
            "n": int(keep.sum()), "share": float(keep.mean()) if len(keep) else 0.0}
    with atomic_dir(out_dir) as tmp:
        save_array(tmp / "images.npy", source.images[keep])
        save_array(tmp / "masks.npy", source.masks[keep])
        write_parquet(tmp / "records.parquet", source.records[keep].reset_index(drop=True))
        write_json(tmp / SUBSET_META, meta)
    return meta


def subset_size(synthetic_dir) -> tuple[int, float]:
    """(count, share of the source set) of a synthetic set: a subset's meta.json, or a whole set (share 1)."""
    import json

    meta = json.loads((Path(synthetic_dir) / SUBSET_META).read_text())
    n = int(meta["n"])
    if "threshold" not in meta:  # a whole synthetic set (τ = 0)
        return n, 1.0
    return n, n / meta["n_source"] if meta["n_source"] else 0.0


def budget_prefix(source_dir, data_dir, method: str, params: dict, seed: int, out_dir) -> dict:
    """Write the budget-``params["budget"]`` synthetic set of ``method`` as the prefix of a larger set of the
    same method family (``source_dir``, see ``segsynth.config.budget_sources``): the same files a synthesis job
    writes (images.npy, masks.npy, records.parquet, meta.json), atomically.

    The first round(budget × |train|) samples of a larger budget's set are the set a direct synthesis at that
    budget draws: the same conditioning masks (whole seeded permutations cut to length), the same per-sample
    noise seeds ``noise_seed(seed, i)``, so the same images (bit for bit where the kernels are batch-invariant,
    as on a CPU; a GPU may round the last partial batch differently, as any batch-size change does — the batch
    size is a runtime setting). Sample ids and the method column are renamed to ``method``, as a direct
    synthesis names them. Refused when the source is not the same method at a larger budget, seed and |train|.
    """
    import numpy as np

    from .config import science
    from .data.canonical import INDEX_FILE, read_meta
    from .io import read_json

    source_dir, data_dir = Path(source_dir), Path(data_dir)
    source_meta = read_json(source_dir / "meta.json")
    read_meta(data_dir)  # a canonical dataset of this segsynth's format
    index = pd.read_parquet(data_dir / INDEX_FILE, columns=["split"])
    n_train = int((index["split"] == "train").sum())
    n = int(round(float(params["budget"]) * n_train))
    n_source = int(round(float(source_meta["params"]["budget"]) * n_train))

    def without_budget(p):
        return {k: v for k, v in science("synthesis", p).items() if k != "budget"}

    if without_budget(source_meta["params"]) != without_budget(params):
        raise InputDataError(source_dir / "meta.json", f"was synthesised with other settings than {method!r} "
                             f"(budget aside): {without_budget(source_meta['params'])} vs {without_budget(params)}")
    if int(source_meta["seed"]) != int(seed):
        raise InputDataError(source_dir / "meta.json", f"seed {source_meta['seed']}, {method!r} needs seed {seed}")
    if int(source_meta["n"]) != n_source or n > n_source:
        raise InputDataError(source_dir / "meta.json", f"holds {source_meta['n']} samples; |train| = {n_train} "
                             f"at budget {source_meta['params']['budget']} is {n_source}, and {method!r} needs "
                             f"the first {n}")

    images = np.load(source_dir / "images.npy", mmap_mode="r")  # a budget-6 set of 256² RGB images is GBs
    masks = np.load(source_dir / "masks.npy", mmap_mode="r")
    records = pd.read_parquet(source_dir / "records.parquet").iloc[:n].reset_index(drop=True)
    if len(images) != n_source or len(masks) != n_source:
        raise InputDataError(source_dir, f"{len(images)} images and {len(masks)} masks, meta.json says {n_source}")
    records["sample_id"] = [f"{method}_seed{seed}_{i:05d}" for i in range(n)]
    records["method"] = method
    seconds_per_image = float(source_meta.get("seconds_per_image", 0.0))
    meta = {"method": method, "params": params, "seed": int(seed), "n": n,
            # the sampling time of these samples, spent inside the source's synthesis job
            "seconds": round(seconds_per_image * n, 2), "seconds_per_image": seconds_per_image,
            "prefix_of": {"dir": str(source_dir), "method": source_meta["method"], "n": n_source}}
    with atomic_dir(out_dir) as tmp:
        save_array(tmp / "images.npy", np.ascontiguousarray(images[:n]))
        save_array(tmp / "masks.npy", np.ascontiguousarray(masks[:n]))
        write_parquet(tmp / "records.parquet", records)
        write_json(tmp / "meta.json", meta)
    return meta


def _dice_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the mean over foreground classes of the per-volume or per-image mean Dice (``main_table``'s class
    "mean"), and its unit."""
    main = main_table(runs)
    dice = main[(main["class"] == "mean") & (main["metric"] == "dice")]
    return dice.drop(columns=["class", "metric"]).rename(columns={"value": "dice"})


def _baseline_dice(baseline: pd.DataFrame, dice: pd.DataFrame) -> pd.DataFrame:
    """``dice`` (rows of :func:`_dice_means` with dataset, segmenter, unit) joined with the mean real-only Baseline
    Dice of its dataset and segmenter; a run scored in another unit than its Baseline is refused."""
    base = (_dice_means(baseline).groupby(["dataset", "segmenter"])
            .agg(baseline_dice=("dice", "mean"), baseline_unit=("unit", "first")))
    dice = dice.join(base, on=["dataset", "segmenter"])
    mixed = dice["baseline_unit"].notna() & (dice["unit"] != dice["baseline_unit"])
    if mixed.any():
        row = dice[mixed].iloc[0]
        raise InputDataError(baseline["path"].iloc[0], f"the Baseline of {row['dataset']} · {row['segmenter']} "
                             f"was scored in {row['baseline_unit']}, its runs in {row['unit']}; rerun the evaluations")
    return dice.drop(columns="baseline_unit")


def _tests_against_baseline(runs: pd.DataFrame, baseline: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group of ``runs`` (``keys``; its seeds pooled): a Wilcoxon signed-rank test of the per-case Dice against
    the real-only Baseline of its dataset and segmenter (``segsynth.tables.wilcoxon_columns``)."""
    records = []
    for group, frame in runs.groupby(keys, sort=False):
        key = dict(zip(keys, group))
        base = baseline[(baseline["dataset"] == key["dataset"]) & (baseline["segmenter"] == key["segmenter"])]
        records.append({**key, **wilcoxon_columns(dict(zip(frame["seed"].astype(int), frame["path"])),
                                                  dict(zip(base["seed"].astype(int), base["path"])))})
    return pd.DataFrame(records)


BASELINE_TEST = ("two-sided Wilcoxon signed-rank test of the per-case DSC (seeds pooled) against the Baseline's: "
                 "* p < 0.05, ** p < 0.01")


def budget_table(runs: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows: dataset, segmenter, method, budget, seed, dice, delta_dice (vs. the real-only Baseline), unit (of
    the Dice: ``volume·mm`` per 3D volume or ``slice·px`` per 2D image, as in ``main_table``).

    ``runs``: dataset, segmenter, method (the swept method), budget, seed, path; ``baseline``: the same
    columns but budget for the real-only runs."""
    keyed = runs.rename(columns={"method": "swept"}).assign(method=lambda f: f["swept"] + "@" + f["budget"].astype(str))
    dice = _dice_means(keyed[["dataset", "segmenter", "method", "seed", "path"]])
    dice = dice.merge(keyed[["dataset", "segmenter", "method", "seed", "swept", "budget"]],
                      on=["dataset", "segmenter", "method", "seed"])
    dice = _baseline_dice(baseline, dice)
    dice["delta_dice"] = dice["dice"] - dice["baseline_dice"]
    keys = ["dataset", "segmenter", "method", "budget"]
    tests = _tests_against_baseline(runs, baseline, keys)
    return (dice.drop(columns=["method", "baseline_dice"]).rename(columns={"swept": "method"})
            [["dataset", "segmenter", "method", "budget", "seed", "dice", "delta_dice", "unit"]]
            .merge(tests, on=keys, how="left")
            .sort_values(["dataset", "segmenter", "method", "budget", "seed"]).reset_index(drop=True))


def budget_markdown(table: pd.DataFrame) -> str:
    """ΔDSC (points) per method (rows) and budget (columns), mean ± std over seeds."""
    budgets = sorted(table["budget"].unique())
    lines = [f"ΔDSC (points) over the real-only Baseline by synthesis budget N_s = b × |train|; mean ± std over "
             f"n = {_seed_count(table)} seeds; {units_phrase(dataset_units(table), 'DSC', distances=False)}; "
             f"{BASELINE_TEST}.", "",
             "| Dataset · segmenter | Method | " + " | ".join(f"{b:g}×" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for (dataset, segmenter, method), rows in table.groupby(["dataset", "segmenter", "method"], sort=False):
        cells = [mean_std(rows.loc[rows["budget"] == b, "delta_dice"] * 100.0, 1)
                 + significance_mark(rows.loc[rows["budget"] == b, "wilcoxon_p_value"].max()) for b in budgets]
        lines.append(f"| {dataset} · {segmenter} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def subset_table(runs: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows: dataset, segmenter, method, threshold, seed, count, share, dice, delta_dice, per_sample_gain, unit
    (of the Dice, as in ``main_table``).

    ``runs``: dataset, segmenter, method (the source method), threshold, seed, path (metrics parquet) and
    synthetic (the set's directory: a subset, or the whole set for τ = 0), whose meta.json gives the count."""
    sizes = [subset_size(d) for d in runs["synthetic"]]
    keyed = runs.assign(run=lambda f: f["method"] + "@" + f["threshold"].astype(str),
                        count=[n for n, _ in sizes], share=[share for _, share in sizes])
    dice = _dice_means(keyed.rename(columns={"method": "source", "run": "method"})
                       [["dataset", "segmenter", "method", "seed", "path"]])
    dice = dice.rename(columns={"method": "run"}).merge(
        keyed[["dataset", "segmenter", "run", "seed", "method", "threshold", "count", "share"]],
        on=["dataset", "segmenter", "run", "seed"])
    dice = _baseline_dice(baseline, dice)
    dice["delta_dice"] = dice["dice"] - dice["baseline_dice"]
    # the paper's unit: ΔDSC in points per sample (its Table: +5.05 over 1,128 samples = 4.48×10⁻³)
    dice["per_sample_gain"] = dice["delta_dice"] * 100.0 / dice["count"].where(dice["count"] > 0)
    keys = ["dataset", "segmenter", "method", "threshold"]
    return (dice[["dataset", "segmenter", "method", "threshold", "seed", "count", "share", "dice", "delta_dice",
                  "per_sample_gain", "unit"]]
            .merge(_tests_against_baseline(runs, baseline, keys), on=keys, how="left")
            .sort_values(["dataset", "segmenter", "method", "threshold", "seed"]).reset_index(drop=True))


def subset_markdown(table: pd.DataFrame, baseline: pd.DataFrame) -> str:
    """The paper's subset table: Baseline row, then one row per τ (count, share, DSC (Δ), per-sample gain)."""
    base = _dice_means(baseline)
    lines = [f"Training on the samples whose adversariality 1 − exp(−class-balanced CE) under f_θ exceeds τ; mean "
             f"± std over n = {_seed_count(table)} seeds (count and share: mean over seeds). Per-sample gain = "
             f"ΔDSC (points) / count. {units_phrase(dataset_units(table), 'DSC', distances=False)}. p: "
             f"{BASELINE_TEST}.", "",
             "| Dataset · segmenter | Subset | Count | Share | DSC (%) (Δ) | Per-sample gain (×10⁻³) | "
             "p (Wilcoxon, DSC vs Baseline) |",
             "|---|---|---|---|---|---|---|"]
    for (dataset, segmenter), rows in table.groupby(["dataset", "segmenter"], sort=False):
        b = base.loc[(base["dataset"] == dataset) & (base["segmenter"] == segmenter), "dice"] * 100.0
        lines.append(f"| {dataset} · {segmenter} | Baseline (real only) | – | – | "
                     f"{mean_std(b, 1)} | – | – |")
        for (method, threshold), run in rows.groupby(["method", "threshold"], sort=True):
            label = f"{method}, τ = {threshold:g}" + (" (full set)" if threshold == 0 else "")
            lines.append(f"| {dataset} · {segmenter} | {label} | {run['count'].mean():.0f} | "
                         f"{100 * run['share'].mean():.1f}% | {mean_std(run['dice'] * 100.0, 1)} "
                         f"({_signed(run['delta_dice'].mean() * 100.0)}) | "
                         f"{mean_std(run['per_sample_gain'] * 1000.0, 2)} | {p_cell(run['wilcoxon_p_value'].iloc[0])} |")
    return "\n".join(lines) + "\n"


def write_budget_tables(runs: pd.DataFrame, baseline: pd.DataFrame, parquet_path, markdown_path) -> pd.DataFrame:
    table = budget_table(runs, baseline)
    write_parquet(parquet_path, table)
    write_text(markdown_path, budget_markdown(table))
    return table


def write_subset_tables(runs: pd.DataFrame, baseline: pd.DataFrame, parquet_path, markdown_path) -> pd.DataFrame:
    table = subset_table(runs, baseline)
    write_parquet(parquet_path, table)
    write_text(markdown_path, subset_markdown(table, baseline))
    return table


def _seed_count(table: pd.DataFrame) -> str:
    counts = sorted(set(table.groupby(["dataset", "segmenter", "method"])["seed"].nunique()))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def round_values(runs: pd.DataFrame) -> pd.DataFrame:
    """Every sample's value V under its round's f_θ: dataset, round, method, seed, value (one read of each set's
    records, for the table and the figure)."""
    frames = []
    for run in runs.itertuples(index=False):
        records = Path(run.set) / "records.parquet"
        frame = pd.read_parquet(records)
        if "value" not in frame.columns:
            raise InputDataError(records, "has no value column (V under f_θ)")
        frames.append(pd.DataFrame({"dataset": run.dataset, "round": run.round, "method": run.method,
                                    "seed": run.seed, "value": frame["value"].to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def rounds_table(runs: pd.DataFrame, values: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows: dataset, generator, segmenter, round, method, seed, mean_value (the round's set under its own f_θ),
    n_samples, dice (real + the round's set), delta_dice (vs. the real-only Baseline), unit.

    ``runs``: dataset, generator, segmenter, round, method, seed, set (the synthetic set's directory), path (the
    evaluation of the model trained on real + that set); ``values``: :func:`round_values` of ``runs``;
    ``baseline``: dataset, segmenter, method, seed, path."""
    means = (values.groupby(["dataset", "round", "method", "seed"])["value"]
             .agg(mean_value="mean", n_samples="size").reset_index())
    dice = _baseline_dice(baseline, _dice_means(runs[["dataset", "segmenter", "method", "seed", "path"]]))
    table = runs.drop(columns=["set", "path"]).merge(means, on=["dataset", "round", "method", "seed"])
    table = table.merge(dice, on=["dataset", "segmenter", "method", "seed"])
    table["delta_dice"] = table["dice"] - table["baseline_dice"]
    return (table[["dataset", "generator", "segmenter", "round", "method", "seed", "mean_value", "n_samples", "dice",
                   "delta_dice", "baseline_dice", "unit"]]
            .sort_values(["dataset", "generator", "round", "seed"]).reset_index(drop=True))


def rounds_markdown(table: pd.DataFrame) -> str:
    lines = [f"Synthesize–train rounds (VGD Fig. 5): round 1 is guided by the real-only f_θ, round r ≥ 2 by the "
             f"model trained on real + round r − 1's set; mean value V of the round's samples under its own f_θ, "
             f"and DSC (%) of the model trained on real + the round's set, mean ± std over n = {_seed_count(table)} "
             f"seeds; {units_phrase(dataset_units(table), 'DSC', distances=False)}.", "",
             "| Dataset · generator · segmenter | Round | Method | Mean V | DSC (%) | ΔDSC (points) |",
             "|---|---|---|---|---|---|"]
    for (dataset, generator, segmenter, r, method), rows in table.groupby(
            ["dataset", "generator", "segmenter", "round", "method"], sort=True):
        lines.append(f"| {dataset} · {generator} · {segmenter} | {r} | {method} | {mean_std(rows['mean_value'], 4)} | "
                     f"{mean_std(rows['dice'] * 100.0, 1)} | {mean_std(rows['delta_dice'] * 100.0, 1)} |")
    return "\n".join(lines) + "\n"


def write_rounds(runs: pd.DataFrame, baseline: pd.DataFrame, parquet_path, markdown_path, figure_path) -> pd.DataFrame:
    from .figures import rounds_figure

    values = round_values(runs)
    table = rounds_table(runs, values, baseline)
    write_parquet(parquet_path, table)
    write_text(markdown_path, rounds_markdown(table))
    rounds_figure(values, table, figure_path)
    return table
