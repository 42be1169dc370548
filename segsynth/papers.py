"""The five papers' tables and figures, each in its paper's layout, as views over the DAG's own outputs.

``rules/papers.smk`` gives every paper a target (``snakemake paper_vgd`` …, ``snakemake papers`` for all) that
writes ``results/papers/<paper>/``: one file per paper table or figure (``PAPER_ITEMS``), a ``manifest.json``
saying which DAG outputs each came from, and — for the whole set — ``results/papers/README.md``, the index.

An item is one of four kinds, chosen at parse time from what the run's config makes:
- ``methods``: rows are synthesis methods (the paper's row order and names), columns the downstream segmenters'
  Dice and HD95 per dataset (mean ± std over synthesis seeds) and the synthetic sets' FID and domain FID, with a
  paired Wilcoxon signed-rank test of each row's per-case Dice against the paper's reference row (seeds pooled);
- ``view``: a table the DAG already writes in the paper's shape (LAW's, ORDER's, LEAF's, ViCTr's, the Miner
  paper's subsets and budget), under the paper's caption; those comparing downstream Dice carry their own paired
  Wilcoxon tests (ORDER's and LEAF's against their first row, the subsets and budget cells against the Baseline);
- ``figure``: a figure the DAG draws, copied under the paper's name;
- ``missing``: the item keeps its place and says why it is empty (a run that does not configure it, or a part
  the project does not build yet).
A row the run does not have stays in its table with the reason, never dropped.

This module is the registry, imported while the workflow parses (no pandas, no torch);
``segsynth.paper_tables`` writes the files (the tables env runs it).
"""
from __future__ import annotations

PAPERS = {
    "vgd": "VGD: value-guided diffusion (vgd-value-guided-diffusion.md)",
    "miner": "The Adversariality Miner (adversariality-miner.md)",
    "law_order": "LAW and ORDER: adaptive spatial weighting (law-order-spatial-weighting.md)",
    "leaf": "LEAF: a latent-diffusion segmenter (leaf-latent-diffusion-segmenter.md)",
    "victr": "ViCTr: rectified-flow synthesis (victr-rectified-flow-synthesis.md)",
}

#: Each paper's rows in its own order and names: label → the project's method (or segmenter) key
VGD_TABLE1_ROWS = {"Baseline": "baseline", "RD": "rd", "AG": "ugdm", "TFG": "tfg", "GAUDA": "gauda",
                   "DiffAug": "diffaug", "AdvDiffuser": "advdiffuser", "AugPaint": "augpaint", "VGD": "vgd",
                   "VGD (fast levers)": "vgd_fast"}
VGD_TABLE3_ROWS = {"VGD (all components)": "vgd", "w/o CE term": "vgd_no_ce", "w/o margin term": "vgd_no_margin",
                   "w/o focus Ω_t": "vgd_no_focus", "w/o time-travel": "vgd_no_tt",
                   "w/o trust region": "vgd_no_trust", "RD": "rd"}
VGD_FIG7_ROWS = {"k = 0.01": "vgd_k0p01", "k = 0.04 (paper)": "vgd", "k = 0.06": "vgd_k0p06",
                 "k = 0.08": "vgd_k0p08", "k = 0.1": "vgd_k0p1", "k = 0.2": "vgd_k0p2", "RD": "rd"}
MINER_BACKBONE_ROWS = {"Baseline": "baseline", "RD": "rd", "Miner": "miner"}

#: (paper, stem, label, title) in the papers' order; rules/papers.smk decides each one's kind and sources
PAPER_ITEMS = [
    ("vgd", "table1", "Table 1", "Generative fidelity and downstream utility, per method"),
    ("vgd", "table3", "Table 3", "Ablation of VGD's components"),
    ("vgd", "fig4", "Fig. 4", "Samples of each method"),
    ("vgd", "fig5", "Fig. 5", "Synthesize–train rounds: value scores and Dice per round"),
    ("vgd", "fig7", "Fig. 7", "Value level (trust coefficient k) against fidelity and utility, as a table"),
    ("miner", "backbones", "Backbone table", "RD and the Miner under each downstream segmenter"),
    ("miner", "subsets", "Subset table", "Adversariality subsets of the Miner's sets"),
    ("miner", "budget", "Budget curve", "Dice against the synthetic budget"),
    ("miner", "overhead", "Overhead table", "Wall time per stage, the Miner's training and sampling beside RD's"),
    ("miner", "cross_domain", "Cross-domain table", "Train on one dataset, test on another of the same kind"),
    ("law_order", "law_table1", "LAW Table 1", "Synthesis quality per loss weighting"),
    ("law_order", "law_table2", "LAW Table 2", "Downstream segmentation on each weighting's synthetic data"),
    ("law_order", "law_table4", "LAW Table 4", "Ablation of LAW's components, with training stability"),
    ("law_order", "law_fig4", "LAW Figs. 4 and 8", "Learned δ and final weight maps"),
    ("law_order", "order_table3", "ORDER Table 3", "Segmenters side by side: params, MACs, Dice"),
    ("law_order", "order_table5_6", "ORDER Tables 5–6", "Where the bidirectional skip attention sits"),
    ("leaf", "table2", "Table 2", "Parameterisation and feature alignment"),
    ("leaf", "table3", "Table 3", "The feature-alignment weight λ"),
    ("leaf", "table4", "Table 4", "Stability over inference seeds"),
    ("victr", "table2", "Table 2", "Synthesis quality and seconds per image against the DDIM generator"),
    ("victr", "table3", "Table 3", "Segmenters trained with ViCTr against DDIM data"),
    ("victr", "table4", "Table 4", "Ablations: Tweedie correction, loss terms, LoRA rank, Stage 1"),
]

STATUS_WORDS = {"methods": "table", "view": "table", "figure": "figure", "missing": "empty"}


def item_file(paper: str, stem: str, kind: str) -> str:
    suffix = ".png" if kind == "figure" else ".md"
    return f"results/papers/{paper}/{stem}{suffix}"


def item_outputs(paper: str, stem: str, kind: str) -> list[str]:
    """The files a paper item writes: its markdown (or figure), and a parquet for a table with cells."""
    files = [item_file(paper, stem, kind)]
    if kind in ("methods", "view"):
        files.append(f"results/papers/{paper}/{stem}.parquet")
    return files


