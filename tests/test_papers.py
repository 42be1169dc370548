"""The papers' targets (rules/papers.smk, segsynth/papers.py, segsynth/paper_tables.py): every paper target in the
DAG, the paired test's pairing, rows and items the run does not make kept with their reason, and the targets as
views over a real run's outputs."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

import yaml

from conftest import REPO
from segsynth.config import (check_references, for_dataset, method_params, read_configs, round_methods,
                             round_previous, synthesizes, trains_on)
from segsynth.errors import ConfigError
from segsynth.paper_tables import methods_markdown, methods_table, write_index, write_item
from segsynth.tables import paired_wilcoxon
from segsynth.papers import PAPER_ITEMS, PAPERS
from test_workflow import job_counts, snakemake


def _per_case(values, ids=None):
    ids = ids or [f"case{i}" for i in range(len(values))]
    return pd.Series(values, index=pd.Index(ids, name="sample_id"), dtype=float)


def test_wilcoxon_pairs_seed_with_seed_and_a_single_reference_with_every_seed():
    rng = np.random.default_rng(0)
    a = {s: _per_case(rng.uniform(0.5, 0.9, 12)) for s in range(3)}
    b = {s: _per_case(rng.uniform(0.4, 0.8, 12)) for s in range(3)}
    test = paired_wilcoxon(a, b)
    pooled = np.concatenate([a[s].to_numpy() - b[s].to_numpy() for s in range(3)])
    assert test["n_pairs"] == 36
    assert test["p_value"] == pytest.approx(wilcoxon(pooled).pvalue)
    # the real-only Baseline is one run: every seed's case pairs with the same reference case
    single = {0: b[0]}
    test = paired_wilcoxon(a, single)
    pooled = np.concatenate([a[s].to_numpy() - b[0].to_numpy() for s in range(3)])
    assert test["n_pairs"] == 36 and test["p_value"] == pytest.approx(wilcoxon(pooled).pvalue)
    # pairs are by case id, not by position; a case missing on one side drops out
    shuffled = {0: a[0].iloc[::-1]}
    assert paired_wilcoxon(shuffled, {0: b[0]})["p_value"] == pytest.approx(wilcoxon(a[0] - b[0]).pvalue)
    assert paired_wilcoxon({0: a[0]}, {0: b[0].iloc[:10]})["n_pairs"] == 10
    # identical rows: no test, not a p of 1
    assert np.isnan(paired_wilcoxon({0: a[0]}, {0: a[0]})["p_value"])


def _eval_file(path, dice_by_case):
    rows = []
    for case, dice in dice_by_case.items():
        for k, name in enumerate(["a", "b"], start=1):
            rows.append({"sample_id": case, "case_id": case, "class_index": k, "class_name": name,
                         "metric": "dice", "value": dice, "unit": "slice·px"})
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_a_methods_table_keeps_absent_rows_with_their_reason_and_marks_significance(tmp_path):
    cases = [f"c{i}" for i in range(20)]
    runs = [dict(dataset="d", segmenter="unet", method="baseline", seed=0,
                 path=_eval_file(tmp_path / "real.parquet", {c: 0.5 for c in cases}))]
    for seed in range(2):
        dice = {c: 0.6 + 0.01 * i + 0.02 * seed for i, c in enumerate(cases)}  # every case above the Baseline's
        runs.append(dict(dataset="d", segmenter="unet", method="rd", seed=seed,
                         path=_eval_file(tmp_path / f"rd{seed}.parquet", dice)))
    fidelity = pd.DataFrame([{"dataset": "d", "generator": "tiny", "method": "rd", "seed": s, "metric": "fid",
                              "value": 100.0 + s, "n_samples": 10, "n_real": 10} for s in range(2)])
    rows = {"Baseline": "baseline", "RD": "rd", "VGD": "vgd"}
    table = methods_table(rows, "baseline", runs, fidelity, absent={"vgd": "`vgd` is not in this run's run.methods"})
    assert list(dict.fromkeys(table["row"])) == ["Baseline", "RD", "VGD"]
    rd = table[table["row"] == "RD"].iloc[0]
    # the run means as the main table makes them: seed 0 at 0.695, seed 1 at 0.715
    assert rd["dice_mean"] == pytest.approx(0.705) and rd["dice_n"] == 2 and rd["wilcoxon_n_pairs"] == 40
    assert rd["wilcoxon_p_value"] < 0.01 and rd["fid_mean"] == pytest.approx(100.5)
    markdown = methods_markdown(table, "caption", "Baseline")
    assert "| RD | 70.5 ± 1.4** |" in markdown
    assert "| VGD | – |" in markdown and "`vgd` is not in this run's run.methods |" in markdown


def test_an_item_the_run_does_not_make_says_why_and_the_index_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = write_item("vgd", {"kind": "missing", "stem": "fig5", "label": "Fig. 5", "title": "rounds",
                               "reason": "not built yet"})
    text = (tmp_path / "results/papers/vgd/fig5.md").read_text()
    assert "Empty: not built yet" in text and entry["kind"] == "missing"
    (tmp_path / "results/tables").mkdir(parents=True)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "results/tables/cost.parquet")
    (tmp_path / "results/tables/cost.md").write_text("| Stage |\n")
    view = write_item("miner", {"kind": "view", "stem": "overhead", "label": "Overhead table", "title": "t",
                                "table": "results/tables/cost.parquet", "markdown": "results/tables/cost.md",
                                "sources": ["results/tables/cost.parquet"]})
    assert (tmp_path / "results/papers/miner/overhead.parquet").exists()
    for paper, entries in (("vgd", [entry]), ("miner", [view])):
        (tmp_path / f"{paper}.json").write_text(json.dumps(entries))
    write_index([tmp_path / "vgd.json", tmp_path / "miner.json"], tmp_path / "results/papers/README.md")
    index = (tmp_path / "results/papers/README.md").read_text()
    assert "| Fig. 5 | rounds | [vgd/fig5.md](vgd/fig5.md) | empty: not built yet |" in index
    assert "[miner/overhead.md](miner/overhead.md) | `results/tables/cost.parquet` |" in index


def _default_config(**analyses):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["analyses"] = {**(config.get("analyses") or {}), **analyses}
    return config


def test_rounds_derive_one_method_per_round_each_guided_by_the_previous_rounds_model():
    config = _default_config(rounds={"method": "vgd_fast", "rounds": 3})
    derived = round_methods(config)
    assert set(derived) == {"vgd_fast_round2", "vgd_fast_round3"}
    assert all(entry == config["methods"]["vgd_fast"] for entry in derived.values())
    assert round_previous(config) == {"vgd_fast_round2": "vgd_fast", "vgd_fast_round3": "vgd_fast_round2"}
    with pytest.raises(ConfigError, match="the Miner is trained against the real-only f_θ"):
        round_methods(_default_config(rounds={"method": "miner", "rounds": 2}))
    taken = _default_config(rounds={"method": "rd", "rounds": 2})
    taken["methods"]["rd_round2"] = {"sampler": "ddim"}
    with pytest.raises(ConfigError, match="methods.rd_round2"):
        round_methods(taken)


def test_a_cross_domain_pair_must_be_two_datasets_of_one_kind():
    check_references(_default_config(cross_domain={"train": "mni152", "test": "mni152_coronal"}))
    with pytest.raises(ConfigError, match="analyses.cross_domain.train"):
        check_references(_default_config(cross_domain={"train": "mni152_coronal", "test": "mni152"}))
    with pytest.raises(ConfigError, match="not another dataset"):
        check_references(_default_config(cross_domain={"train": "mni152", "test": "mni152"}))
    config = _default_config(cross_domain={"train": "mni152", "test": "mni152_coronal"})
    config["datasets"]["mni152_coronal"]["resolution"] = 32
    with pytest.raises(ConfigError, match="has resolution 32"):
        check_references(config)


def test_snakemake_papers_lists_every_paper_target(tmp_path):
    result = snakemake("-n", "papers", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert {f"paper_{p}" for p in PAPERS} | {"papers_index", "papers"} <= set(counts)
    for paper in PAPERS:
        assert counts[f"paper_{paper}"] == 1
        items = [stem for p, stem, *_ in PAPER_ITEMS if p == paper]
        assert all(f"results/papers/{paper}/{stem}." in result.stdout for stem in items), paper


def test_a_dataset_override_changes_that_datasets_entries_only():
    config = read_configs([REPO / "config.yaml", REPO / "presets" / "papers_cpu.yaml"])
    check_references(config)
    kvasir, mni = for_dataset(config, "kvasir"), for_dataset(config, "mni152")
    assert mni is config and config["generators"]["tiny"]["init"] == "mni152_tiny"
    assert kvasir["generators"]["tiny"]["init"] is None and kvasir["generators"]["tiny"]["training"]["steps"] == 2000
    # merged, not replaced: the rest of the entry is the shared one's
    assert kvasir["generators"]["tiny"]["training"]["lr"] == config["generators"]["tiny"]["training"]["lr"]
    assert kvasir["miner"]["lr"] == 3.0e-3 and kvasir["miner"]["steps"] == config["miner"]["steps"]
    config["datasets"]["kvasir"]["overrides"]["methods"] = {"vgd": {"k": 0.02}}
    assert method_params(config, "kvasir", "vgd")["k"] == 0.02 and "k" not in method_params(config, "mni152", "vgd")
    config["datasets"]["kvasir"]["overrides"]["generators"]["tinny"] = {"init": None}
    with pytest.raises(ConfigError, match="'tinny' is not defined under 'generators'") as err:
        check_references(config)
    assert err.value.key == "datasets.kvasir.overrides.generators"


def test_run_generator_and_segmenter_methods_narrow_the_product():
    config = read_configs([REPO / "config.yaml", REPO / "presets" / "papers_cpu.yaml"])
    assert synthesizes(config, "tiny", "vgd") and not synthesizes(config, "law-law", "vgd")
    assert synthesizes(config, "law-law", "rd_law") and not synthesizes(config, "tiny", "rd_law")
    assert trains_on(config, "unet", "vgd") and not trains_on(config, "order", "rd")
    config["run"]["generator_methods"]["law-law"] = ["rd"]
    with pytest.raises(ConfigError, match="does not sample 'rd_law', the LAW tables' method"):
        check_references(config)
    config["run"]["generator_methods"]["law-law"] = ["nope"]
    with pytest.raises(ConfigError, match="'nope' is not in run.methods") as err:
        check_references(config)
    assert err.value.key == "run.generator_methods.law-law"


def test_the_cpu_papers_preset_makes_every_paper_item_on_both_datasets(tmp_path):
    """presets/papers_cpu.yaml: every item of every paper is a table or figure (none empty), on MNI152 and
    Kvasir-SEG, each generator sampling only its tables' methods and each dataset training its own recipe."""
    result = snakemake("-n", "papers", "--configfile", str(REPO / "config.yaml"),
                       str(REPO / "presets" / "papers_cpu.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    for rule in ("law_tables", "victr_tables", "leaf_tables", "order_ablation_table", "rounds_table", "budget_table",
                 "subset_table", "law_figure", "papers_index"):
        assert counts[rule] == 1, rule
    # tiny: 6 methods; law-*: rd_law; victr, victr-notweedie: rd_4; VGD's round 2 — × 2 seeds × 2 datasets;
    # the budget's half sets are cut from RD's
    assert counts["synthesize"] == (6 + 2 + 2 + 1) * 2 * 2 and counts["budget_prefix"] == 2 * 2
    assert counts["train_generator"] == 5 * 2 and counts["train_segmenter_real"] == 7 * 2
    assert "results/mni152/synthetic/law-law/rd_law/seed1" in result.stdout
    assert "synthetic/law-law/rd/" not in result.stdout and "synthetic/tiny/rd_law/" not in result.stdout
    assert "eval/order/tiny/" not in result.stdout  # the segmenter papers' models are real-only
    # ... so the methods tables have no column for them: VGD's Table 1 reads the Baseline of unet alone
    vgd_inputs = result.stdout.split("rule paper_vgd:", 1)[1].split("output:", 1)[0]
    assert "results/mni152/eval/unet/real.parquet" in vgd_inputs and "eval/mk_unet/real" not in vgd_inputs
    # Kvasir's LAW generators fine-tune its own generator (trained from scratch), MNI152's the shipped one
    assert re.search(r"input: results/kvasir/data, results/kvasir/generators/tiny\n\s+output: "
                     r"results/kvasir/generators/law-law", result.stdout)
    assert not re.search(r"input: results/mni152/data, results/mni152/generators/tiny\n\s+output: "
                         r"results/mni152/generators/law-law", result.stdout)


@pytest.mark.parametrize("preset, rule, expected", [
    # LAW Table 2: real only and each weighting's RD sets, the downstream UNet's per-case evaluations
    ("law.yaml", "paper_law_order", ["results/mni152/eval/unet/real.parquet",
                                     "results/mni152/eval/unet/law-law/rd/seed2.parquet"]),
    # ViCTr Table 3: each row's (generator, method) sets
    ("victr.yaml", "paper_victr", ["results/mni152/eval/unet/victr/rd_1/seed0.parquet",
                                   "results/mni152/eval/unet/tiny/rd/seed2.parquet"]),
])
def test_paper_tables_with_generator_rows_read_each_rows_models(tmp_path, preset, rule, expected):
    result = snakemake("-n", rule, "--configfile", str(REPO / "config.yaml"), str(REPO / "presets" / preset),
                       cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    inputs = result.stdout.split(f"rule {rule}:", 1)[1].split("output:", 1)[0]
    assert all(path in inputs for path in expected)


@pytest.mark.slow
def test_paper_targets_are_views_over_a_runs_outputs(tmp_path, e2e_reference):
    """On the end-to-end run, with the cross-domain table and two rounds switched on (tests/config/papers.yaml):
    `snakemake papers` adds only the coronal split, the cross-domain evaluations, round 2 and the paper rules; its
    tables carry the run's cells."""
    shutil.copytree(e2e_reference, tmp_path, symlinks=True, dirs_exist_ok=True)
    shutil.copy(REPO / "tests" / "config" / "papers.yaml", tmp_path / "papers.yaml")
    configs = ("--configfile", "config.yaml", "papers.yaml")
    dry = snakemake("-n", "papers", *configs, cwd=tmp_path, timeout=300)
    assert dry.returncode == 0, dry.stderr
    counts = job_counts(dry.stdout)
    # the table's rows: the Baseline, RD and the Miner (2 seeds each) of the axial run
    assert counts.pop("evaluate_cross_domain") == 5 and counts.pop("splits") == 1
    # round 2 of rd (seed 0): its set, sampled with f_θ = the real + round-1 model, that set's model and table
    for rule in ("synthesize", "train_segmenter_augmented", "evaluate_augmented", "rounds_table"):
        assert counts.pop(rule) == 1, rule
    assert set(counts) == {f"paper_{p}" for p in PAPERS} | {"papers_index", "papers"}
    run = snakemake("papers", *configs, "--cores", "2", cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    papers = tmp_path / "results" / "papers"
    backbones = pd.read_parquet(papers / "miner" / "backbones.parquet")
    main = pd.read_parquet(tmp_path / "results" / "tables" / "main.parquet")
    rd_dice = main[(main["method"] == "rd") & (main["metric"] == "dice") & (main["class"] == "mean")]["value"]
    rd = backbones[backbones["row"] == "RD"].iloc[0]
    assert rd["dice_mean"] == pytest.approx(rd_dice.mean()) and rd["dice_n"] == 2
    miner = backbones[backbones["row"] == "Miner"].iloc[0]
    assert miner["wilcoxon_n_pairs"] > 0
    assert "p (Wilcoxon, DSC vs RD)" in (papers / "miner" / "backbones.md").read_text()
    cross = pd.read_parquet(papers / "miner" / "cross_domain.parquet")
    assert set(cross["dataset"]) == {"mni152 → mni152_coronal"} and cross["dice_mean"].between(0, 1).all()
    assert cross["dice_n"].tolist() == [1, 2, 2]
    assert (tmp_path / "results/mni152_coronal/cross_domain/mni152/eval/unet/tiny/miner/seed1.parquet").exists()
    rounds = pd.read_parquet(tmp_path / "results" / "tables" / "rounds.parquet")
    assert rounds["round"].tolist() == [1, 2] and rounds["method"].tolist() == ["rd", "rd_round2"]
    rd_seed0 = main[(main["method"] == "rd") & (main["seed"] == 0) & (main["metric"] == "dice") & (main["class"] == "mean")]
    assert rounds["dice"].iloc[0] == pytest.approx(rd_seed0["value"].iloc[0])
    assert (papers / "vgd" / "fig5.png").stat().st_size > 0
    table1 = (papers / "vgd" / "table1.md").read_text()
    assert "| AG | – |" in table1 and "presets/vgd_table1.yaml runs it" in table1
    assert (papers / "miner" / "budget.md").read_text().count("|") > 10
    figure = (papers / "vgd" / "fig4.png").read_bytes()
    assert figure == (tmp_path / "results" / "figures" / "samples_mni152_tiny.png").read_bytes()
    index = (papers / "README.md").read_text()
    assert index.count("](") == len(PAPER_ITEMS) and "empty: analyses.law is off" in index
    # the HTML report files each item under its paper (category) and item (subcategory), captions rendered
    report = snakemake("--report", "report.html", "papers", *configs, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    assert "The Adversariality Miner" in html and "Cross-domain table: Train on one dataset" in html
    assert "synthesis seeds." in html and "{{" not in html.split("One table or figure of the paper", 1)[1][:2000]
