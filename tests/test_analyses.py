"""The Miner paper's analyses: adversariality subsets, the budget and subset tables, derived method names."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from test_tables import PNG_MAGIC, metrics_parquet

from segsynth.config import budget_name, subset_name
from segsynth.analyses import (adversarial_subset, budget_markdown, budget_table, subset_markdown,
                               subset_table)
from segsynth.config import budget_methods, budget_sources, check_references
from segsynth.errors import ConfigError, InputDataError
from segsynth.figures import budget_plot
from segsynth.io import save_array, write_json, write_parquet


def synthetic_set(directory, adversariality):
    n = len(adversariality)
    directory.mkdir(parents=True)
    save_array(directory / "images.npy", np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32))
    save_array(directory / "masks.npy", np.zeros((n, 8, 8), np.uint8))
    write_parquet(directory / "records.parquet",
                  pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "adversariality": adversariality}))
    write_json(directory / "meta.json", {"method": "rd", "n": n})
    return directory


def test_a_subset_keeps_exactly_the_samples_above_the_threshold(tmp_path):
    source = synthetic_set(tmp_path / "rd", [0.1, 0.35, 0.45, 0.6, 0.2])
    meta = adversarial_subset(source, 0.3, tmp_path / "sub")
    assert meta["n"] == 3 and meta["n_source"] == 5 and meta["share"] == pytest.approx(0.6)
    records = pd.read_parquet(tmp_path / "sub" / "records.parquet")
    assert list(records["sample_id"]) == ["s1", "s2", "s3"]
    assert np.array_equal(np.load(tmp_path / "sub" / "images.npy"), np.load(source / "images.npy")[[1, 2, 3]])
    empty = adversarial_subset(source, 0.99, tmp_path / "empty")
    assert empty["n"] == 0 and np.load(tmp_path / "empty" / "images.npy").shape == (0, 1, 8, 8)


def test_a_set_without_adversariality_is_a_clear_error_and_leaves_nothing(tmp_path):
    source = synthetic_set(tmp_path / "rd", [0.1, 0.2])
    write_parquet(source / "records.parquet", pd.DataFrame({"sample_id": ["s0", "s1"]}))
    with pytest.raises(InputDataError, match="records.parquet.*adversariality"):
        adversarial_subset(source, 0.3, tmp_path / "sub")
    assert not (tmp_path / "sub").exists()


def test_derived_names_and_the_budget_sweep_entries():
    assert budget_name("rd", 2) == "rd_x2" and budget_name("miner", 1.5) == "miner_x1p5"
    assert subset_name("rd", 0.3) == "rd_ls0p3" and subset_name("rd", 0.0) == "rd_ls0"
    config = {"methods": {"rd": {"sampler": "ddim", "eta": 0.1}}, "synthesis": {"budget": 1},
              "analyses": {"budget": {"methods": ["rd"], "budgets": [1, 2, 6]}}}
    assert budget_methods(config) == {"rd_x2": {"sampler": "ddim", "eta": 0.1, "budget": 2.0},
                                      "rd_x6": {"sampler": "ddim", "eta": 0.1, "budget": 6.0}}
    # the sweep point that is the main run is the method's own budget, not "1": at synthesis.budget 0.5 the 1×
    # point is a set of its own, and the main run (0.5×) is its prefix
    half = {**config, "synthesis": {"budget": 0.5}, "analyses": {"budget": {"methods": ["rd"], "budgets": [0.5, 1]}}}
    assert budget_methods(half) == {"rd_x1": {"sampler": "ddim", "eta": 0.1, "budget": 1.0}}
    assert budget_sources(half) == {"rd": "rd_x1"}
    config["methods"]["rd_x2"] = {"sampler": "ddim"}
    with pytest.raises(ConfigError, match="rd_x2"):
        budget_methods(config)


def test_analyses_must_name_configured_methods():
    config = {"run": {"datasets": [], "generators": [], "segmenters": [], "methods": [], "value_segmenter": "u"},
              "datasets": {}, "generators": {}, "segmenters": {"u": {}}, "methods": {"rd": {}},
              "analyses": {"subsets": {"method": "nope", "thresholds": [0.3]}}}
    with pytest.raises(ConfigError, match="analyses.subsets.method"):
        check_references(config)


@pytest.fixture
def baseline(tmp_path):
    return pd.DataFrame([{"dataset": "d", "segmenter": "u", "method": "baseline", "seed": 0,
                          "path": metrics_parquet(tmp_path / "base.parquet", [0.6, 0.6], [0.6, 0.6])}])


def test_budget_table_is_delta_dice_per_method_and_budget(tmp_path, baseline):
    rows = []
    for method, budget, seed, dice in (("rd", 1.0, 0, 0.62), ("rd", 1.0, 1, 0.64), ("rd", 2.0, 0, 0.65),
                                       ("rd", 2.0, 1, 0.67), ("miner", 1.0, 0, 0.7), ("miner", 1.0, 1, 0.7),
                                       ("miner", 2.0, 0, 0.75), ("miner", 2.0, 1, 0.77)):
        path = metrics_parquet(tmp_path / f"{method}{budget}{seed}.parquet", [dice] * 2, [dice] * 2)
        rows.append({"dataset": "d", "segmenter": "u", "method": method, "budget": budget, "seed": seed,
                     "path": path})
    table = budget_table(pd.DataFrame(rows), baseline)
    assert len(table) == 8
    delta = table.set_index(["method", "budget", "seed"])["delta_dice"]
    assert delta[("rd", 2.0, 1)] == pytest.approx(0.07) and delta[("miner", 1.0, 0)] == pytest.approx(0.1)
    markdown = budget_markdown(table)
    assert "| d · u | miner | 10.0 ± 0.0 | 16.0 ± 1.4 |" in markdown and "n = 2 seeds" in markdown
    # each cell's test pools its seeds' cases against the single Baseline run: 2 seeds × 2 cases, all above it,
    # too few for p < 0.05 (no mark)
    tests = table.drop_duplicates(["method", "budget"]).set_index(["method", "budget"])
    assert (tests["wilcoxon_n_pairs"] == 4).all() and (tests["wilcoxon_median_difference"] > 0).all()
    assert tests.loc[("rd", 2.0), "wilcoxon_p_value"] == pytest.approx(wilcoxon([0.05, 0.05, 0.07, 0.07]).pvalue)
    assert "Wilcoxon signed-rank test" in markdown and "*" not in markdown.split("\n", 1)[1]
    budget_plot(table, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").read_bytes().startswith(PNG_MAGIC)


def test_subset_table_counts_shares_and_per_sample_gain(tmp_path, baseline):
    full = synthetic_set(tmp_path / "rd", [0.1, 0.35, 0.45, 0.6])
    above = tmp_path / "rd_ls0p4"
    adversarial_subset(full, 0.4, above)
    rows = [{"dataset": "d", "segmenter": "u", "method": "rd", "threshold": 0.0, "seed": 0, "synthetic": str(full),
             "path": metrics_parquet(tmp_path / "full.parquet", [0.68] * 2, [0.68] * 2)},
            {"dataset": "d", "segmenter": "u", "method": "rd", "threshold": 0.4, "seed": 0, "synthetic": str(above),
             "path": metrics_parquet(tmp_path / "above.parquet", [0.64] * 2, [0.64] * 2)}]
    table = subset_table(pd.DataFrame(rows), baseline).set_index("threshold")
    assert table.loc[0.0, "count"] == 4 and table.loc[0.0, "share"] == 1.0
    assert table.loc[0.4, "count"] == 2 and table.loc[0.4, "share"] == 0.5
    assert table.loc[0.4, "delta_dice"] == pytest.approx(0.04)
    assert table.loc[0.4, "per_sample_gain"] == pytest.approx(2.0)  # +4.0 points over 2 samples
    markdown = subset_markdown(table.reset_index(), baseline)
    assert "| d · u | rd, τ = 0.4 | 2 | 50.0% | 64.0 (+4.0) | 2000.00 | 0.5 |" in markdown
    assert "| d · u | Baseline (real only) | – | – | 60.0 | – | – |" in markdown
    assert table.loc[0.4, "wilcoxon_n_pairs"] == 2 and "p (Wilcoxon, DSC vs Baseline)" in markdown
    assert "Baseline (real only)" in markdown and "τ = 0 (full set)" in markdown
    assert json.loads((above / "meta.json").read_text())["threshold"] == 0.4
