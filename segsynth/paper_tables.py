"""The papers' tables and figures (``segsynth.papers`` has the registry and says what each kind is): the methods
tables with their paired Wilcoxon tests, the views, the copied figures, the empty items, and the index."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path, write_json, write_parquet, write_text
from .papers import PAPERS, item_file
from .tables import main_table, paired_wilcoxon, per_case_dice, significance_mark, value_cell


# ---- methods tables ------------------------------------------------------------------------------------------

def methods_table(rows: dict, reference: str, runs: list[dict], fidelity: pd.DataFrame | None,
                  absent: dict) -> pd.DataFrame:
    """A paper table whose rows are methods: per row label and (dataset, segmenter) block, Dice and HD95 over the
    row's seeds, the sets' FID and domain FID, and the Wilcoxon test against ``reference``'s row. ``runs`` are
    evaluated models (dataset, segmenter, method, seed, path of the per-case evaluation), averaged as the main
    table averages them (``segsynth.tables.main_table``); ``absent`` maps a method the run does not have to the
    reason its row is empty."""
    per_case: dict[tuple, dict] = {}
    for run in runs:
        key = (run["dataset"], run["segmenter"], run["method"])
        per_case.setdefault(key, {})[int(run["seed"])] = per_case_dice(run["path"])
    main = main_table(pd.DataFrame(runs)) if runs else pd.DataFrame(
        columns=["dataset", "segmenter", "method", "seed", "class", "metric", "value"])
    # the per-run "mean" class (the mean over foreground classes) is the Dice of a run, as in main.md
    run_means = main[main["class"] == "mean"].set_index(["dataset", "segmenter", "method", "seed", "metric"])
    run_means = run_means["value"].sort_index()
    blocks = sorted({(r["dataset"], r["segmenter"]) for r in runs})
    records = []
    for label, method in rows.items():
        if method in absent:
            for dataset, segmenter in blocks or [("", "")]:
                records.append({"row": label, "method": method, "dataset": dataset, "segmenter": segmenter,
                                "empty_because": absent[method]})
            continue
        for dataset, segmenter in blocks:
            record = {"row": label, "method": method, "dataset": dataset, "segmenter": segmenter,
                      "empty_because": None}
            for metric in ("dice", "hd95"):
                try:
                    values = run_means.loc[(dataset, segmenter, method)].xs(metric, level="metric")
                except KeyError:
                    values = pd.Series(dtype=float)
                record[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
                record[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
                record[f"{metric}_n"] = int(len(values))
            if fidelity is not None and method != "baseline":
                sets = fidelity[(fidelity["dataset"] == dataset) & (fidelity["method"] == method)]
                for metric in ("fid", "domain_fid"):
                    values = sets.loc[sets["metric"] == metric, "value"]
                    record[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
                    record[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
            candidate, ref = per_case.get((dataset, segmenter, method)), per_case.get((dataset, segmenter, reference))
            if method != reference and candidate and ref:
                test = paired_wilcoxon(candidate, ref)
                record.update({f"wilcoxon_{k}": v for k, v in test.items()})
            records.append(record)
    return pd.DataFrame(records)


def _cell(row: dict, key: str, scale: float, decimals: int) -> str:
    return value_cell(row.get(f"{key}_mean", np.nan), row.get(f"{key}_std", np.nan), scale, decimals)


def methods_markdown(table: pd.DataFrame, heading: str, reference_label: str) -> str:
    """The paper layout: one row per method, per (dataset · segmenter) Dice and HD95, FID and domain FID; a
    Wilcoxon mark on Dice (* p < 0.05, ** p < 0.01) against the reference row; empty rows say why."""
    blocks = list(dict.fromkeys(zip(table["dataset"], table["segmenter"])))
    blocks = [b for b in blocks if b != ("", "")]
    datasets = list(dict.fromkeys(d for d, _ in blocks))
    header = ["Method"]
    for d, s in blocks:
        header += [f"{d} · {s} DSC (%)", f"{d} · {s} HD95"]
    for d in datasets:
        header += [f"{d} FID", f"{d} domain FID"]
    header += ["p (Wilcoxon, DSC vs " + reference_label + ")", "Empty because"]
    lines = [heading, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in dict.fromkeys(table["row"]):
        rows = table[table["row"] == label]
        first = rows.iloc[0]
        if isinstance(first.get("empty_because"), str):
            lines.append("| " + " | ".join([label] + ["–"] * (len(header) - 2) + [first["empty_because"]]) + " |")
            continue
        cells, p_values = [label], []
        for d, s in blocks:
            row = rows[(rows["dataset"] == d) & (rows["segmenter"] == s)]
            if row.empty:
                cells += ["–", "–"]
                continue
            r = row.iloc[0].to_dict()
            p = r.get("wilcoxon_p_value", np.nan)
            p_values.append(f"{p:.3g}" if p is not None and np.isfinite(p) else "–")
            cells += [_cell(r, "dice", 100.0, 1) + significance_mark(p if p is not None else np.nan),
                      _cell(r, "hd95", 1.0, 2)]
        for d in datasets:
            r = rows[rows["dataset"] == d].iloc[0].to_dict()
            cells += [_cell(r, "fid", 1.0, 1), _cell(r, "domain_fid", 1.0, 3)]
        cells += [" / ".join(p_values) if any(v != "–" for v in p_values) else "–", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- one paper ------------------------------------------------------------------------------------------------

def _heading(spec: dict, paper: str) -> str:
    return f"**{PAPERS[paper].split(':')[0]} — {spec['label']}: {spec['title']}.**"


def write_item(paper: str, spec: dict, fidelity_path=None) -> dict:
    """Write one item's files under results/papers/<paper>/ (paths relative to the working directory, as the
    DAG's); return its manifest entry."""
    kind, stem = spec["kind"], spec["stem"]
    target = Path(item_file(paper, stem, kind))
    heading = _heading(spec, paper)
    if kind == "missing":
        write_text(target, f"{heading}\n\nEmpty: {spec['reason']}\n")
    elif kind == "view":
        table = pd.read_parquet(spec["table"])
        body = Path(spec["markdown"]).read_text()
        write_parquet(target.with_suffix(".parquet"), table)
        write_text(target, f"{heading}\n\nThe DAG's `{spec['markdown']}` in the paper's layout:\n\n{body}")
    elif kind == "figure":
        with atomic_path(target) as tmp:
            shutil.copyfile(spec["figures"][0], tmp)
    elif kind == "methods":
        fidelity = pd.read_parquet(fidelity_path) if spec.get("fidelity", True) else None
        table = methods_table(spec["rows"], spec["reference"], spec["runs"], fidelity, spec["absent"])
        reference_label = next(label for label, m in spec["rows"].items() if m == spec["reference"])
        caption = (f"{heading}\n\nMean ± std over synthesis seeds of the mean over foreground classes (Baseline: a "
                   f"single real-only run); DSC in %, HD95 in the dataset's units (as results/tables/main.md). "
                   f"p: Wilcoxon signed-rank test, two-sided, of the row's per-case DSC against the "
                   f"{reference_label} row's, seeds pooled (pairs: seed × test case; a single-run reference is "
                   f"paired with every seed), one p per dataset · segmenter; * p < 0.05, ** p < 0.01.")
        write_parquet(target.with_suffix(".parquet"), table)
        write_text(target, methods_markdown(table, caption, reference_label))
    else:
        raise ValueError(f"unknown paper item kind {kind!r}")
    return {"paper": paper, "stem": stem, "label": spec["label"], "title": spec["title"], "kind": kind,
            "file": str(target), "sources": list(spec.get("sources", [])), "reason": spec.get("reason")}


def write_paper(paper: str, specs: list[dict], manifest_path, fidelity_path=None) -> list[dict]:
    """Every item of one paper, then its manifest (written last: the rule's completion marker)."""
    manifest = [write_item(paper, spec, fidelity_path) for spec in specs]
    write_json(manifest_path, manifest)
    return manifest


# ---- the index --------------------------------------------------------------------------------------------------

def write_index(manifest_paths, out_path) -> pd.DataFrame:
    """results/papers/README.md: each paper table and figure, its file, what it is built from, or why empty."""
    entries = [entry for path in manifest_paths for entry in json.loads(Path(path).read_text())]
    index = pd.DataFrame(entries)
    lines = ["# The papers' tables and figures", "",
             "Generated by the DAG (`snakemake papers`, rule `papers_index`) from each paper target's "
             "`manifest.json`; every file is a view over the DAG outputs named in its row.", ""]
    for paper, title in PAPERS.items():
        rows = [e for e in entries if e["paper"] == paper]
        if not rows:
            continue
        lines += [f"## {title}", "", "| Item | Title | File | Built from / empty because |", "|---|---|---|---|"]
        for e in rows:
            file = Path(e["file"]).relative_to("results/papers")
            origin = e["reason"] if e["kind"] == "missing" else ", ".join(f"`{s}`" for s in e["sources"])
            lines.append(f"| {e['label']} | {e['title']} | [{file}]({file}) | "
                         f"{'empty: ' if e['kind'] == 'missing' else ''}{origin} |")
        lines.append("")
    write_text(out_path, "\n".join(lines))
    return index
