"""The paper's figures: a grid of real vs. synthetic samples for the same masks, and Dice per method.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so no GUI backend or
global figure state is involved (the Agg canvas renders the PNG); each PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .errors import InputDataError
from .io import atomic_path
from .synthetic_set import SyntheticSet, load_synthetic_set
from .tables import method_label, method_order

PANEL_INCHES = 1.6


def sample_grid(data_dir, synthetic_dirs: dict[str, Path], out_png, n: int = 6, split: str = "train") -> None:
    """Columns: ``n`` conditioning masks of ``split``, evenly spread over the dataset's order (for slices of a
    volume: across the anatomy); rows: the real image, its mask, then one synthetic image per method generated
    from that same mask (``records.parquet`` column ``source_sample_id``).

    RGB images are shown in colour, others by their first channel in grey; masks use a categorical colormap
    (background black).
    """
    from .data.canonical import load_split, read_meta

    class_names = read_meta(data_dir)["class_names"]
    real = load_split(data_dir, split)
    sets = {label: load_synthetic_set(directory) for label, directory in synthetic_dirs.items()}
    shared = _shared_sources(real.index["sample_id"], sets, synthetic_dirs)
    sources = [shared[i] for i in np.unique(np.linspace(0, len(shared) - 1, min(n, len(shared))).round().astype(int))]
    if not sources:
        raise InputDataError(data_dir, f"no {split} sample conditioned every synthetic set {list(synthetic_dirs)}")
    real_row = {sample_id: row for row, sample_id in enumerate(real.index["sample_id"])}

    rows = ["real image", "mask", *sets]
    fig = Figure(figsize=(PANEL_INCHES * len(sources), PANEL_INCHES * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(sources), squeeze=False)
    cmap = _mask_colormap(len(class_names))
    for col, source in enumerate(sources):
        _show_image(axes[0, col], real.images[real_row[source]])
        axes[0, col].set_title(_column_title(source), fontsize="small")
        axes[1, col].imshow(real.masks[real_row[source]], cmap=cmap, vmin=0, vmax=len(class_names) - 1,
                            interpolation="nearest")
        for row, synthetic in enumerate(sets.values(), start=2):
            first = int(np.flatnonzero(synthetic.records["source_sample_id"].to_numpy() == source)[0])
            _show_image(axes[row, col], synthetic.images[first])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(rows):
        axes[row, 0].set_ylabel(label)
    _save_png(fig, out_png)


def metric_plot(main: pd.DataFrame, out_png) -> None:
    """Dice (%) of the class-"mean" per method: bars at the mean over seeds with ± std, a dot per seed;
    one panel per (dataset, segmenter)."""
    dice = main[(main["class"] == "mean") & (main["metric"] == "dice")].assign(
        dice=lambda frame: frame["value"] * 100.0, label=lambda frame: frame["method"].map(method_label))
    order = [method_label(method) for method in method_order(dice["method"])]
    panels = list(dict.fromkeys(zip(dice["dataset"], dice["segmenter"])))
    fig = Figure(figsize=(max(3.0, 0.7 * len(order)) * len(panels), 3.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (dataset, segmenter) in zip(axes, panels):
        panel = dice[(dice["dataset"] == dataset) & (dice["segmenter"] == segmenter)]
        sns.barplot(data=panel, x="label", y="dice", order=order, errorbar="sd", capsize=0.2,
                    color="#9ecae1", ax=ax)
        sns.stripplot(data=panel, x="label", y="dice", order=order, color="black", size=4, ax=ax)
        ax.set_title(f"{dataset} · {segmenter}")
        ax.set_xlabel("")
        ax.set_ylabel("DSC (%)")
        ax.tick_params(axis="x", labelrotation=45)
    _save_png(fig, out_png)


def budget_plot(table: pd.DataFrame, out_png) -> None:
    """ΔDSC (points) against the synthesis budget, a line per swept method (± std over seeds), a panel per
    (dataset, segmenter); ``table`` is :func:`segsynth.analyses.budget_table`'s."""
    data = table.assign(delta=lambda frame: frame["delta_dice"] * 100.0)
    panels = list(dict.fromkeys(zip(data["dataset"], data["segmenter"])))
    fig = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (dataset, segmenter) in zip(axes, panels):
        panel = data[(data["dataset"] == dataset) & (data["segmenter"] == segmenter)]
        sns.lineplot(data=panel, x="budget", y="delta", hue="method", marker="o", errorbar="sd", ax=ax)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(sorted(panel["budget"].unique()))
        ax.set_title(f"{dataset} · {segmenter}")
        ax.set_xlabel("budget b (N_s = b × |train|)")
        ax.set_ylabel("ΔDSC over Baseline (points)")
    _save_png(fig, out_png)


def value_distribution(synthetic_dirs: dict[str, Path], out_png) -> None:
    """Per-sample value score V under f_θ (and its CE and margin terms) of every synthetic set, one violin per
    method over all its seeds — the paper's value distributions (VGD Fig. 1 and 5a)."""
    frames = []
    for (method, seed), directory in synthetic_dirs.items():
        records = pd.read_parquet(Path(directory) / "records.parquet")
        missing = {"value", "ce", "margin"} - set(records.columns)
        if missing:
            raise InputDataError(Path(directory) / "records.parquet", f"lacks value columns {sorted(missing)}")
        frames.append(records[["value", "ce", "margin"]].assign(method=method_label(method), seed=seed))
    values = pd.concat(frames, ignore_index=True).melt(id_vars=["method", "seed"], var_name="term",
                                                                   value_name="score")
    order = list(dict.fromkeys(values["method"]))
    fig = Figure(figsize=(max(4.0, 0.9 * len(order)) * 3, 3.5), layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    titles = {"value": "value V = ζ(CE) + λ·M_s", "ce": "normalised CE", "margin": "margin uncertainty M_s"}
    for ax, term in zip(axes, ("value", "ce", "margin")):
        sns.violinplot(data=values[values["term"] == term], x="method", y="score", order=order, cut=0,
                       inner="quartile", color="#c6dbef", ax=ax)
        ax.set_title(titles[term])
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", labelrotation=45)
    _save_png(fig, out_png)


def rounds_figure(values: pd.DataFrame, table: pd.DataFrame, out_png) -> None:
    """VGD Fig. 5 as this project can draw it: (a) each round's per-sample value V under its own f_θ, min–max
    normalised over all rounds of a dataset (the paper's "normalised value scores"), (b) the Dice of the model
    trained on real + the round's set against the real-only Baseline (final test Dice per round; the paper plots it
    over epochs, which the DAG does not keep). ``values``: ``segsynth.analyses.round_values``; ``table``: its
    ``rounds_table``."""
    values = values.copy()
    span = values.groupby("dataset")["value"].agg(["min", "max"])
    low, high = span.loc[values["dataset"], "min"].to_numpy(), span.loc[values["dataset"], "max"].to_numpy()
    values["normalised"] = (values["value"] - low) / np.where(high > low, high - low, 1.0)
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    sns.violinplot(data=values, x="round", y="normalised", hue="dataset", cut=0, inner="quartile", ax=left)
    left.set_title("(a) normalised value V per sample")
    left.set_xlabel("round")
    left.set_ylabel("V (min–max over rounds)")
    dice = table.assign(dsc=table["dice"] * 100.0)
    sns.lineplot(data=dice, x="round", y="dsc", hue="dataset", marker="o", errorbar="sd", ax=right)
    for dataset, base in dice.groupby("dataset")["baseline_dice"].first().items():
        right.axhline(base * 100.0, linestyle="--", color="grey", linewidth=0.8)
    right.set_xticks(sorted(dice["round"].unique()))
    right.set_title("(b) DSC with the round's data (dashed: Baseline)")
    right.set_xlabel("round")
    right.set_ylabel("DSC (%)")
    _save_png(fig, out_png)


def _shared_sources(real_ids: pd.Series, sets: dict[str, SyntheticSet], directories: dict) -> list[str]:
    """Real sample ids (in dataset order) whose mask conditioned at least one sample of every set."""
    shared = set(real_ids)
    for label, synthetic in sets.items():
        if "source_sample_id" not in synthetic.records:
            raise InputDataError(Path(directories[label]) / "records.parquet", "lacks column source_sample_id")
        shared &= set(synthetic.records["source_sample_id"])
    return [sample_id for sample_id in real_ids if sample_id in shared]


def _mask_colormap(num_classes: int) -> ListedColormap:
    """Black background, then one distinct colour per foreground class."""
    return ListedColormap([(0.0, 0.0, 0.0), *sns.color_palette("tab10", max(num_classes - 1, 1))][:num_classes])


def _column_title(sample_id, width: int = 14) -> str:
    """A sample id short enough for a panel's title: Kvasir-SEG's 25-character ids overlap their neighbours'."""
    text = str(sample_id)
    return text if len(text) <= width else text[:width - 1] + "…"


def _show_image(ax: Axes, image: np.ndarray) -> None:
    """A (C, H, W) image in [0, 1]: RGB as it is, any other channel count by its first channel in grey."""
    if image.shape[0] == 3:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0.0, 1.0), interpolation="nearest")
    else:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")


def _save_png(fig: Figure, out_png) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def law_weight_figure(maps: dict, class_names: list[str], out_png) -> None:
    """LAW's weights over a few training masks (the paper's Figs. 4 and 8) from ``segsynth.law.law_maps``:
    rows the real image, its mask, the ratio prior (mean-normalised), the learned δ ∈ [0, 1] and the final
    clamped weights, at one timestep. (The maps come from a trained generator in the PyTorch env; drawing them
    needs no PyTorch.)"""
    rows = ["real image", "mask", "ratio prior w/mean", "learned δ", "final weight"]
    columns = len(maps["sample_ids"])
    fig = Figure(figsize=(PANEL_INCHES * columns + 1.0, PANEL_INCHES * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    cmap = _mask_colormap(len(class_names))
    for col in range(columns):
        _show_image(axes[0, col], maps["images"][col])
        axes[0, col].set_title(_column_title(maps["sample_ids"][col]), fontsize="small")
        axes[1, col].imshow(maps["masks"][col], cmap=cmap, vmin=0, vmax=len(class_names) - 1,
                            interpolation="nearest")
    # one colour scale per map row, shared across its columns
    for row, key, cmap_name, (low, high) in ((2, "prior", "magma", (0.0, float(maps["prior"].max()))),
                                             (3, "delta", "viridis", (0.0, 1.0)),
                                             (4, "weights", "magma", (0.0, float(maps["weights"].max())))):
        for col in range(columns):
            shown = axes[row, col].imshow(maps[key][col], cmap=cmap_name, vmin=low, vmax=high,
                                          interpolation="nearest")
        fig.colorbar(shown, ax=list(axes[row, :]), shrink=0.9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(rows):
        axes[row, 0].set_ylabel(label)
    fig.suptitle(f"LAW weights at t = {maps['timestep']}")
    _save_png(fig, out_png)
