"""Tables from hand-made metric parquets give the expected numbers; figures render to PNG."""

import json

import numpy as np
import pandas as pd
import pytest

from segsynth.data import canonical
from segsynth.figures import metric_plot, sample_grid
from segsynth.errors import InputDataError
from segsynth.tables import (adherence_markdown, adherence_table, main_markdown, main_summary, main_table,
                             segmenter_markdown, segmenter_table, synthetic_only_markdown, synthetic_only_table,
                             write_adherence_tables, write_main_tables, write_synthetic_only_tables)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics_parquet(path, dice_a: list, dice_b: list, asd: float = 1.0, hd95: float = 4.0):
    """An evaluate_segmenter-style table: one value per case for classes a and b, per metric."""
    rows = []
    for class_index, class_name, dice in ((1, "a", dice_a), (2, "b", dice_b)):
        for case, value in enumerate(dice):
            for metric, v in (("dice", value), ("asd", asd), ("hd95", hd95)):
                rows.append({"sample_id": f"s{case}", "case_id": f"c{case}", "class_index": class_index,
                             "class_name": class_name, "metric": metric, "value": v})
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def runs(tmp_path) -> pd.DataFrame:
    """Baseline (one run) and two seeds each of methods "vgd" and "plain" on one dataset/segmenter.

    Class "mean" Dice: baseline (0.6 + 0.8) / 2 = 0.7; vgd 0.8 and 0.9; plain 0.5 and 0.7.
    """
    specs = [("baseline", 0, [0.5, 0.7], [0.8, np.nan]),
             ("vgd", 0, [0.8, 0.8], [0.8, 0.8]), ("vgd", 1, [0.9, 0.9], [0.9, 0.9]),
             ("plain", 0, [0.5, 0.5], [0.5, 0.5]), ("plain", 1, [0.7, 0.7], [0.7, 0.7])]
    return pd.DataFrame([
        {"dataset": "mni", "segmenter": "monai_unet", "method": method, "seed": seed,
         "path": metrics_parquet(tmp_path / f"{method}_{seed}.parquet", a, b)}
        for method, seed, a, b in specs])


def test_main_table_means_over_cases_then_classes(runs):
    main = main_table(runs)
    assert list(main.columns) == ["dataset", "segmenter", "method", "seed", "class", "metric", "value", "unit"]
    assert (main["unit"] == "slice·px").all()  # tables without a unit column are per slice
    value = main.set_index(["method", "seed", "class", "metric"])["value"]
    assert value[("baseline", 0, "a", "dice")] == pytest.approx(0.6)
    assert value[("baseline", 0, "b", "dice")] == pytest.approx(0.8)  # the NaN case is skipped
    assert value[("baseline", 0, "mean", "dice")] == pytest.approx(0.7)
    assert value[("vgd", 1, "mean", "dice")] == pytest.approx(0.9)
    assert value[("plain", 0, "mean", "hd95")] == pytest.approx(4.0)
    assert len(main) == 5 * 3 * 3  # runs x (a, b, mean) x metrics


def test_main_markdown_layout(runs):
    text = main_markdown(main_table(runs))
    lines = text.splitlines()
    assert lines[0].startswith("Mean ± std over n = 2 seeds")
    assert lines[0].endswith("; DSC and IoU in % (per 2D image), ASD and HD95 in pixels.")
    assert "| Method | mni · monai_unet DSC (%) | mni · monai_unet ASD | mni · monai_unet HD95 |" in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Method")]
    # Baseline first without ±, then methods in given order; std is the sample std (ddof = 1)
    # (these runs carry no IoU rows, as evaluations written before IoU existed: no IoU column)
    assert rows == ["| Baseline | 70.0 | 1.00 | 4.00 |",
                    "| vgd | 85.0 ± 7.1 | 1.00 ± 0.00 | 4.00 ± 0.00 |",
                    "| plain | 60.0 ± 14.1 | 1.00 ± 0.00 | 4.00 ± 0.00 |"]


def volume_metrics_parquet(path, slice_dice: float, volume_dice: list, volume_hd95: list):
    """An evaluate_segmenter table of a volume dataset: per-slice rows (two slices of each of two volumes, all
    with ``slice_dice``, ASD 50 px and HD95 99 px) and per-volume rows (``volume_dice``, ``volume_hd95`` mm per
    volume, ASD half of it), for classes a and b."""
    rows = []
    for class_index, class_name in ((1, "a"), (2, "b")):
        for v in range(2):
            for z in range(2):
                rows += [{"sample_id": f"v{v}_s{z:03d}", "case_id": f"c{v}", "class_index": class_index,
                          "class_name": class_name, "metric": metric, "value": value, "unit": "slice·px"}
                         for metric, value in (("dice", slice_dice), ("asd", 50.0), ("hd95", 99.0))]
            rows += [{"sample_id": f"v{v}", "case_id": f"c{v}", "class_index": class_index, "class_name": class_name,
                      "metric": metric, "value": value, "unit": "volume·mm"}
                     for metric, value in (("dice", volume_dice[v]), ("asd", volume_hd95[v] / 2),
                                           ("hd95", volume_hd95[v]))]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_main_table_averages_per_volume_where_volume_rows_exist(tmp_path, runs):
    volume_runs = pd.DataFrame([
        {"dataset": "acdc", "segmenter": "monai_unet", "method": method, "seed": seed,
         "path": volume_metrics_parquet(tmp_path / f"acdc_{method}_{seed}.parquet", 0.1, dice, hd95)}
        for method, seed, dice, hd95 in (("baseline", 0, [0.7, 0.9], [4.0, 6.0]), ("vgd", 0, [0.8, 1.0], [2.0, 4.0]),
                                         ("vgd", 1, [0.9, 0.9], [3.0, 3.0]))])
    main = main_table(volume_runs)
    value = main.set_index(["method", "seed", "class", "metric"])["value"]
    # the means over the two volumes, not over the four slices (0.1, 99 px)
    assert value[("baseline", 0, "mean", "dice")] == pytest.approx(0.8)
    assert value[("vgd", 0, "a", "hd95")] == pytest.approx(3.0) and value[("vgd", 1, "mean", "hd95")] == 3.0
    assert (main["unit"] == "volume·mm").all()
    caption = main_markdown(main).splitlines()[0]
    assert caption.endswith("; DSC and IoU in % (per 3D volume), ASD and HD95 in mm.")
    assert "| Baseline | 80.0 | 2.50 | 5.00 |" in main_markdown(main)

    # beside a 2D dataset the caption says which convention each dataset's columns use
    both = main_table(pd.concat([runs, volume_runs], ignore_index=True))
    caption = main_markdown(both).splitlines()[0]
    assert caption.endswith("; DSC and IoU in %; acdc: per 3D volume, ASD and HD95 in mm; "
                            "mni: per 2D image, ASD and HD95 in pixels.")
    # the 2D dataset's columns are unchanged by its neighbour
    column = "mni · monai_unet DSC (%)"
    assert main_summary(both)[column].tolist() == main_summary(main_table(runs))[column].tolist()

    # the synthetic-only table takes the same per-volume means and says so
    alone = pd.DataFrame([{"dataset": "acdc", "segmenter": "monai_unet", "generator": "g", "method": "rd", "seed": 0,
                           "path": volume_metrics_parquet(tmp_path / "alone.parquet", 0.1, [0.4, 0.4], [9.0, 9.0])}])
    table = synthetic_only_table(alone, volume_runs[volume_runs["method"] == "baseline"])
    assert table.set_index("metric")["value"]["dice_ratio"] == pytest.approx(0.5)
    assert (table["unit"] == "volume·mm").all() and "DSC (per 3D volume)" in synthetic_only_markdown(table)


def test_main_table_refuses_a_dataset_scored_in_two_units(tmp_path, runs):
    mixed = runs.copy()
    mixed.loc[1, "path"] = volume_metrics_parquet(tmp_path / "volumes.parquet", 0.1, [0.5, 0.5], [1.0, 1.0])
    with pytest.raises(InputDataError, match="scored in different units"):
        main_table(mixed)


def test_segmenter_table_per_volume(tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps({"kind": "monai_unet", "params": 10, "macs": 2_000_000}))
    (tmp_path / "bench.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t300\n")
    rows = pd.DataFrame([{"dataset": "acdc", "segmenter": "unet",
                          "eval": volume_metrics_parquet(tmp_path / "eval.parquet", 0.1, [0.6, 0.8], [2.0, 4.0]),
                          "profile": tmp_path / "profile.json", "benchmark": tmp_path / "bench.tsv"}])
    table = segmenter_table(rows)
    assert table["dice_mean"].iloc[0] == pytest.approx(0.7) and table["hd95_mean"].iloc[0] == pytest.approx(3.0)
    assert table["dice_std"].iloc[0] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert table["unit"].iloc[0] == "volume·mm"
    assert "mean ± std over test volumes or images" in segmenter_markdown(table)
    assert "(DSC and IoU in % (per 3D volume), ASD and HD95 in mm)" in segmenter_markdown(table)
    # one segmenter: it is its own reference, no test
    assert table["reference"].iloc[0] == "unet" and "wilcoxon_p_value" not in table
    assert segmenter_markdown(table).rstrip().endswith("| – |")


def test_segmenter_table_tests_each_row_against_its_datasets_first(tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps({"kind": "monai_unet", "params": 10, "macs": 2_000_000}))
    (tmp_path / "bench.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t300\n")
    cases = list(np.linspace(0.3, 0.9, 7))
    rows = pd.DataFrame([{"dataset": dataset, "segmenter": name, "profile": tmp_path / "profile.json",
                          "benchmark": tmp_path / "bench.tsv",
                          "eval": metrics_parquet(tmp_path / f"{dataset}{name}.parquet", dice, dice)}
                         for dataset, name, dice in (("a", "unet", cases), ("a", "order", [c + 0.01 * (i + 1) for i, c in enumerate(cases)]),
                                                     ("b", "order", cases), ("b", "unet", cases))])
    table = segmenter_table(rows).set_index(["dataset", "segmenter"])
    assert table.loc[("a", "order"), "reference"] == "unet" and table.loc[("b", "unet"), "reference"] == "order"
    assert table.loc[("a", "order"), "wilcoxon_p_value"] == pytest.approx(2 / 2 ** 7)
    assert table.loc[("a", "order"), "wilcoxon_n_pairs"] == 7
    assert np.isnan(table.loc[("b", "unet"), "wilcoxon_p_value"])  # identical per-case Dice: no test
    markdown = segmenter_markdown(table.reset_index())
    assert "p (Wilcoxon, DSC)" in markdown and "first row (a: unet, b: order)" in markdown
    assert "| a | order | monai_unet | 10 | 2.0 | 12 | 64.0 ± 23.8 |" in markdown and "| 0.0156* |" in markdown


def adherence_rows(tmp_path) -> pd.DataFrame:
    rows = []
    for method, seed, sample_means in (("vgd", 0, [0.8, 1.0]), ("vgd", 1, [0.6, np.nan]), ("plain", 0, [0.5, 0.5])):
        path = tmp_path / f"adh_{method}_{seed}.parquet"
        pd.DataFrame({"sample_id": ["g0", "g1", "g0", "g1"], "class": ["a", "a", "mean", "mean"],
                      "dice": [0.0, 0.0, *sample_means]}).to_parquet(path)
        rows.append({"dataset": "d", "method": method, "seed": seed, "path": path})
    return pd.DataFrame(rows)


def test_adherence_table_and_markdown(tmp_path):
    adherence = adherence_table(adherence_rows(tmp_path))
    # files without a scorer column (written before the judge existed) are f_θ's alone
    assert adherence.drop(columns="judge_dice").to_dict("list") == {
        "dataset": ["d"] * 3, "method": ["vgd", "vgd", "plain"], "seed": [0, 1, 0],
        "dice": [pytest.approx(0.9), pytest.approx(0.6), pytest.approx(0.5)]}
    assert adherence["judge_dice"].isna().all()
    assert "| d | vgd | 75.0 ± 21.2 |" in adherence_markdown(adherence)
    assert "| d | plain | 50.0 |" in adherence_markdown(adherence)
    assert "judge" not in adherence_markdown(adherence)


def test_adherence_table_keeps_the_judge_apart_from_f_theta(tmp_path):
    path = tmp_path / "adh.parquet"
    pd.DataFrame({"scorer": ["value_model"] * 2 + ["judge"] * 2, "sample_id": ["g0", "g1"] * 2,
                  "class": ["mean"] * 4, "dice": [0.2, 0.4, 0.8, 1.0]}).to_parquet(path)
    rows = pd.DataFrame([{"dataset": "d", "method": "vgd", "seed": 0, "path": path}])
    adherence = adherence_table(rows)
    assert adherence["dice"].iloc[0] == pytest.approx(0.3) and adherence["judge_dice"].iloc[0] == pytest.approx(0.9)
    markdown = adherence_markdown(adherence, {"value_model": "unet", "judge": "mk_unet"})
    assert ("| Dataset | Method | Mask adherence DSC (%) by f_θ (unet) | Mask adherence DSC (%) by judge (mk_unet) |") in markdown
    assert "| d | vgd | 30.0 | 90.0 |" in markdown


def test_writers_are_consistent(tmp_path, runs):
    main = write_main_tables(runs, tmp_path / "main.parquet", tmp_path / "main.md", tmp_path / "main.tsv")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "main.parquet"), main, check_dtype=False)
    assert (tmp_path / "main.md").read_text() == main_markdown(main)
    write_adherence_tables(adherence_rows(tmp_path), tmp_path / "adh.parquet", tmp_path / "adh.md")
    assert "Mask adherence" in (tmp_path / "adh.md").read_text()


def test_main_markdown_puts_fidelity_and_adherence_beside_dice(tmp_path, runs):
    adherence = adherence_table(adherence_rows(tmp_path)).assign(dataset="mni")
    fidelity = pd.DataFrame([{"dataset": "mni", "generator": "g", "method": method, "seed": seed, "metric": metric,
                              "value": value, "n_samples": 10, "n_real": 12}
                             for method, seed, fid in (("vgd", 0, 100.0), ("vgd", 1, 110.0), ("plain", 0, 50.0))
                             for metric, value in (("fid", fid), ("kid_mean", fid / 1e4), ("kid_std", 0.0),
                                                   ("domain_fid", fid / 100))])
    lines = main_markdown(main_table(runs), fidelity, adherence).splitlines()
    assert ("| Method | mni · monai_unet DSC (%) | mni · monai_unet ASD | mni · monai_unet HD95 | mni FID | "
            "mni KID ×10³ | mni Domain FID | mni adherence DSC (%) |") in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Method")]
    assert rows == ["| Baseline | 70.0 | 1.00 | 4.00 | – | – | – | – |",
                    "| vgd | 85.0 ± 7.1 | 1.00 ± 0.00 | 4.00 ± 0.00 | 105.0 ± 7.1 | 10.50 ± 0.71 | 1.050 ± 0.071 | "
                    "75.0 ± 21.2 |",
                    "| plain | 60.0 ± 14.1 | 1.00 ± 0.00 | 4.00 ± 0.00 | 50.0 | 5.00 | 0.500 | 50.0 |"]
    assert "fidelity.md" in lines[0] and "adherence.md" in lines[0]


def test_synthetic_only_table_divides_by_the_baseline_of_the_same_segmenter(tmp_path, runs):
    baselines = runs[runs["method"] == "baseline"][["dataset", "segmenter", "path"]]
    alone = pd.DataFrame([
        {"dataset": "mni", "segmenter": "monai_unet", "generator": "g", "method": "rd", "seed": seed,
         "path": metrics_parquet(tmp_path / f"alone_{seed}.parquet", [dice] * 2, [dice] * 2)}
        for seed, dice in ((0, 0.63), (1, 0.56))])
    table = synthetic_only_table(alone, baselines)
    assert list(table.columns) == ["dataset", "generator", "method", "seed", "segmenter", "metric", "value", "unit"]
    value = table.set_index(["seed", "metric"])["value"]
    assert value[(0, "dice")] == pytest.approx(0.63) and value[(1, "baseline_dice")] == pytest.approx(0.7)
    assert value[(0, "dice_ratio")] == pytest.approx(0.9) and value[(1, "dice_ratio")] == pytest.approx(0.8)
    write_synthetic_only_tables(alone, baselines, tmp_path / "so.parquet", tmp_path / "so.md")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "so.parquet"), table)
    assert "| mni | monai_unet | g | rd | 59.5 ± 4.9 | 70.0 | 85.0 ± 7.1 | 2 |" in (tmp_path / "so.md").read_text()


def write_dataset(directory, n: int = 4, size: int = 16):
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, size=(n, size, size)).astype(np.uint8)
    index = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "case_id": [f"c{i}" for i in range(n)],
                          "split": ["train"] * (n - 1) + ["test"], "source_file": "x", "slice_index": 0})
    directory.mkdir()
    np.save(directory / "images.npy", rng.uniform(size=(n, 1, size, size)).astype(np.float32))
    np.save(directory / "masks.npy", masks)
    index.to_parquet(directory / "index.parquet", index=False)
    (directory / "meta.json").write_text(json.dumps({
        "dataset": "toy", "kind": "toy", "class_names": ["bg", "a", "b"], "channels": 1, "resolution": [size, size],
        "format_version": canonical.FORMAT_VERSION, "n_train": n - 1, "n_test": 1}))
    return directory


def write_synthetic(directory, sources: list[str], size: int = 16):
    rng = np.random.default_rng(1)
    directory.mkdir()
    np.save(directory / "images.npy", rng.uniform(size=(len(sources), 1, size, size)).astype(np.float32))
    np.save(directory / "masks.npy", np.zeros((len(sources), size, size), dtype=np.uint8))
    pd.DataFrame({"sample_id": [f"g{i}" for i in range(len(sources))],
                  "source_sample_id": sources}).to_parquet(directory / "records.parquet")
    return directory


def test_figures_render_png(tmp_path, runs):
    data = write_dataset(tmp_path / "data")
    synthetic = {"vgd": write_synthetic(tmp_path / "vgd", ["s2", "s0", "s0", "s1"]),
                 "plain": write_synthetic(tmp_path / "plain", ["s1", "s2"])}
    sample_grid(data, synthetic, tmp_path / "figs" / "grid.png", n=6)
    metric_plot(main_table(runs), tmp_path / "figs" / "dice.png")
    for name in ("grid.png", "dice.png"):
        content = (tmp_path / "figs" / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 1000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["dice.png", "grid.png"]


def test_law_tables_are_views_over_the_dag_tables_per_generator():
    from segsynth.tables import row_table_markdown, law_tables, training_stability

    settings = {"method": "rd", "segmenter": "unet", "labelled": True,
                "synthesis": {"Uniform": "g_u", "LAW": "g_l"}, "ablation": {"Raw": "g_r", "LAW": "g_l"}}
    fidelity = pd.DataFrame([{"dataset": "d", "generator": g, "method": f"{g}:rd", "seed": seed, "metric": metric,
                              "value": base + seed}
                             for g, base in (("g_u", 100.0), ("g_l", 80.0), ("g_r", 120.0)) for seed in (0, 1)
                             for metric in ("fid", "kid_mean", "domain_fid")])
    adherence = pd.DataFrame([{"dataset": "d", "method": f"{g}:rd", "seed": seed, "dice": 0.5, "judge_dice": 0.6}
                              for g in ("g_u", "g_l", "g_r") for seed in (0, 1)])
    main = pd.DataFrame([{"dataset": "d", "segmenter": "unet", "method": label, "seed": seed, "class": "mean",
                          "metric": metric, "value": value, "unit": "slice·px"}
                         for label, value, seeds in (("baseline", 0.6, (0,)), ("g_u:rd", 0.62, (0, 1)),
                                                     ("g_l:rd", 0.66, (0, 1)), ("g_r:rd", 0.5, (0, 1)))
                         for seed in seeds for metric in ("dice", "iou")])
    stats = {"g_r": {"weighting": {"kind": "law", "losses_finite": False}},
             "g_l": {"weighting": {"kind": "law", "losses_finite": True, "first_loss": 0.2, "last_loss": 0.1,
                                   "at_w_min": 0.01}}}
    tables = law_tables(settings, fidelity, adherence, main, stats)
    synthesis = tables["law_synthesis"].set_index(["row", "metric"])
    assert synthesis.loc[("LAW", "fid"), "value"] == 80.5 and synthesis.loc[("LAW", "fid"), "n"] == 2
    assert synthesis.loc[("Uniform", "judge_adherence_dice"), "value"] == 0.6
    downstream = tables["law_downstream"].set_index(["row", "metric"])
    assert downstream.loc[("Real only", "dice"), "value"] == 0.6 and downstream.loc[("Real only", "dice"), "n"] == 1
    assert downstream.loc[("+ LAW", "iou"), "value"] == pytest.approx(0.66)
    ablation = tables["law_ablation"]
    assert set(ablation.loc[ablation["row"] == "Raw", "stability"]) == {"unstable"}
    assert set(ablation.loc[ablation["row"] == "LAW", "stability"]) == {"stable"}
    assert set(ablation["metric"]) == {"fid", "domain_fid", "dice"}
    markdown = row_table_markdown(ablation, "caption", ("stability",))
    assert "| d | LAW | 80.5 ± 0.7 | 80.500 ± 0.707 | 66.0 ± 0.0 | stable |" in markdown
    assert training_stability({"weighting": {"losses_finite": True, "first_loss": 0.1, "last_loss": 0.5}}) == "diverged"
    assert training_stability({"weighting": {"losses_finite": True, "at_w_min": 0.9}}) == "collapsed"


def test_law_and_victr_tables_test_rows_against_their_reference_row(tmp_path):
    from segsynth.tables import law_tables, row_table_markdown, victr_tables

    cases = list(np.linspace(0.3, 0.9, 7))
    # per-case DSC: each method's seed s above the baseline's by distinct shifts (14 pairs, all positive)
    shifted = {s: [c + 0.01 * (i + 1) + 0.1 * s for i, c in enumerate(cases)] for s in (0, 1)}
    specs = [("baseline", 0, cases), *((m, s, shifted[s]) for m in ("g_l:rd", "g_x:rd") for s in (0, 1)),
             *(("g_r:rd", s, cases) for s in (0, 1))]
    runs = pd.DataFrame([{"dataset": "d", "segmenter": "unet", "method": method, "seed": seed,
                          "path": metrics_parquet(tmp_path / f"{method.replace(':', '_')}{seed}.parquet", dice, dice)}
                         for method, seed, dice in specs])
    main = pd.DataFrame([{"dataset": "d", "segmenter": "unet", "method": m, "seed": s, "class": "mean",
                          "metric": metric, "value": 0.6, "unit": "slice·px"}
                         for m, s, _ in specs for metric in ("dice", "iou", "hd95")])
    fidelity = pd.DataFrame([{"dataset": "d", "generator": g, "method": f"{g}:rd", "seed": 0, "metric": metric,
                              "value": 1.0, "n_samples": 10, "n_real": 10}
                             for g in ("g_l", "g_r", "g_x") for metric in ("fid", "kid_mean", "domain_fid")])
    adherence = pd.DataFrame([{"dataset": "d", "method": f"{g}:rd", "seed": 0, "dice": 0.5} for g in ("g_l", "g_r")])
    settings = {"method": "rd", "segmenter": "unet", "labelled": True, "synthesis": {"LAW": "g_l"},
                "ablation": {"Raw": "g_r", "LAW": "g_l"}}
    tables = law_tables(settings, fidelity, adherence, main, {}, runs)
    downstream = tables["law_downstream"].set_index(["row", "metric"])
    assert np.isnan(downstream.loc[("Real only", "wilcoxon_p"), "value"])  # the reference row itself
    assert downstream.loc[("+ LAW", "wilcoxon_p"), "value"] == pytest.approx(2 / 2 ** 14)
    assert downstream.loc[("+ LAW", "wilcoxon_p"), "n"] == 14  # both seeds paired with the one Baseline run
    ablation = tables["law_ablation"].set_index(["row", "metric"])
    assert np.isnan(ablation.loc[("Raw", "wilcoxon_p"), "value"])  # against the ablation's first row
    assert ablation.loc[("LAW", "wilcoxon_p"), "value"] == pytest.approx(2 / 2 ** 14)
    markdown = row_table_markdown(tables["law_ablation"], "caption", ("stability",))
    assert "p (Wilcoxon, DSC)" in markdown and "| 0.000122** |" in markdown
    assert set(law_tables(settings, fidelity, adherence, main, {})["law_ablation"]["metric"]) == {
        "fid", "domain_fid", "dice"}  # no run list: no test

    rows = {"DDIM": {"generator": "g_r", "method": "rd"}, "ViCTr": {"generator": "g_l", "method": "rd"},
            "Same as DDIM": {"generator": "g_r", "method": "rd"}}
    victr = victr_tables({"segmenter": "unet", "labelled": True, "synthesis": rows, "steps": {"rd": 4},
                          "ablation": {"ViCTr": rows["ViCTr"], "w/o Tweedie": {"generator": "g_x", "method": "rd"}}},
                         fidelity, main, {}, runs)
    downstream = victr["victr_downstream"].set_index(["row", "metric"])
    assert downstream.loc[("ViCTr", "wilcoxon_p"), "value"] == pytest.approx(2 / 2 ** 14)
    assert np.isnan(downstream.loc[("Same as DDIM", "wilcoxon_p"), "value"])  # identical per-case Dice: no test
    ablation = victr["victr_ablation"].set_index(["row", "metric"])
    assert np.isnan(ablation.loc[("w/o Tweedie", "wilcoxon_p"), "value"])  # g_x's cases equal g_l's
    assert ablation.loc[("w/o Tweedie", "wilcoxon_p"), "n"] == 14


def test_victr_tables_are_views_over_the_dag_tables_and_benchmarks(tmp_path):
    from segsynth.tables import victr_tables, write_victr_tables

    rows = {"DDIM, 16 steps": {"generator": "tiny", "method": "rd"},
            "ViCTr, 1 step": {"generator": "victr", "method": "rd_1"}}
    settings = {"segmenter": "unet", "labelled": True, "synthesis": rows,
                "ablation": {"w/o Tweedie": {"generator": "victr-nt", "method": "rd_1"}},
                "steps": {"rd": 16, "rd_1": 1}}
    sets = [("tiny", "rd", 100.0), ("victr", "rd_1", 60.0), ("victr-nt", "rd_1", 70.0)]
    fidelity = pd.DataFrame([{"dataset": "d", "generator": g, "method": f"{g}:{m}", "seed": seed, "metric": metric,
                              "value": base + seed, "n_samples": 50, "n_real": 87}
                             for g, m, base in sets for seed in (0, 1) for metric in ("fid", "kid_mean", "domain_fid")])
    main = pd.DataFrame([{"dataset": "d", "segmenter": "unet", "method": f"{g}:{m}", "seed": seed, "class": "mean",
                          "metric": metric, "value": value, "unit": "slice·px"}
                         for g, m, _ in sets for seed in (0, 1) for metric, value in (("dice", 0.7), ("hd95", 3.0))])
    # synthesis wall seconds: 16-step DDIM 20 s and 30 s for 50 images, the 1-step flow 2 s and 4 s
    seconds = {"d/tiny/rd/seed0": 20.0, "d/tiny/rd/seed1": 30.0, "d/victr/rd_1/seed0": 2.0, "d/victr/rd_1/seed1": 4.0,
               "d/victr-nt/rd_1/seed0": 2.0, "d/victr-nt/rd_1/seed1": 2.0}
    tables = victr_tables(settings, fidelity, main, seconds)
    synthesis = tables["victr_synthesis"].set_index(["row", "metric"])
    assert synthesis.loc[("ViCTr, 1 step", "steps"), "value"] == 1
    assert synthesis.loc[("ViCTr, 1 step", "fid"), "value"] == 60.5
    assert synthesis.loc[("DDIM, 16 steps", "seconds_per_image"), "value"] == pytest.approx(0.5)
    assert synthesis.loc[("ViCTr, 1 step", "seconds_per_image"), "value"] == pytest.approx(0.06)
    downstream = tables["victr_downstream"].set_index(["row", "metric"])
    assert downstream.loc[("ViCTr, 1 step", "hd95"), "value"] == 3.0
    assert set(tables["victr_ablation"]["metric"]) == {"fid", "domain_fid", "dice"}
    # through the files: benchmark TSVs as Snakemake writes them (column s), parquet and markdown out
    fidelity.to_parquet(tmp_path / "fidelity.parquet")
    main.to_parquet(tmp_path / "main.parquet")
    files = {}
    for key, value in seconds.items():
        files[key] = tmp_path / f"{key.replace('/', '_')}.tsv"
        files[key].write_text(f"s\th:m:s\tmax_rss\n{value}\t0:00:0{int(value)}\t100\n")
    write_victr_tables(settings, tmp_path / "fidelity.parquet", tmp_path / "main.parquet", files, tmp_path / "out")
    markdown = (tmp_path / "out" / "victr_synthesis.md").read_text()
    assert "| d | ViCTr, 1 step | 1 | 60.5 ± 0.7 | 60.500 ± 0.707 | 0.060 ± 0.028 |" in markdown
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [
        "victr_ablation.parquet", "victr_downstream.parquet", "victr_synthesis.parquet"]


def test_segmenter_ablation_rows_come_from_the_segmenter_table(tmp_path):
    from segsynth.errors import InputDataError
    from segsynth.tables import ORDER_CAPTION, segmenter_rows_markdown, segmenter_rows_table, write_leaf_tables

    # per-case Dice over 8 test cases: order beats mk_unet on every case (exact two-sided p = 2 / 2⁸), leaf_eps
    # and leaf differ from mk_unet both ways
    cases = np.linspace(0.4, 0.8, 8)
    per_case = {"mk_unet": cases, "order": cases + np.linspace(0.05, 0.15, 8), "leaf_eps": cases[::-1],
                "leaf": cases + np.array([0.1, -0.1] * 4) * np.linspace(1.0, 1.7, 8)}
    segmenters = pd.DataFrame([{"dataset": "d", "segmenter": name, "params": params, "dice_mean": dice,
                                "dice_std": 0.1, "iou_mean": dice - 0.1, "iou_std": 0.1,
                                "eval": str(metrics_parquet(tmp_path / f"{name}.eval.parquet", list(per_case[name]),
                                                            list(per_case[name])))}
                               for name, params, dice in (("mk_unet", 25696, 0.6), ("order", 41610, 0.7),
                                                          ("leaf_eps", 900, 0.5), ("leaf", 900, 0.65))])
    table = segmenter_rows_table(segmenters, {"None (MK-UNet)": "mk_unet", "Stages 0-1": "order"}, "analyses.order")
    assert list(table["params"]) == [25696, 41610]
    assert np.isnan(table["wilcoxon_p_value"].iloc[0]) and set(table["reference"]) == {"mk_unet"}
    assert table["wilcoxon_p_value"].iloc[1] == pytest.approx(2 / 2 ** 8)
    assert table["wilcoxon_median_difference"].iloc[1] == pytest.approx(0.1)  # distinct differences: exact test
    markdown = segmenter_rows_markdown(table, ORDER_CAPTION)
    assert markdown.startswith("ORDER Tables 5–6")
    assert "against its dataset's first row (d: mk_unet)" in markdown
    assert "| d | None (MK-UNet) | mk_unet | 25,696 | 60.0 ± 10.0 | 50.0 ± 10.0 | – |" in markdown
    assert "| d | Stages 0-1 | order | 41,610 | 70.0 ± 10.0 | 60.0 ± 10.0 | 0.00781** |" in markdown
    with pytest.raises(InputDataError, match="order_all.*analyses.order"):
        segmenter_rows_table(segmenters, {"All": "order_all"}, "analyses.order")

    # LEAF's Tables 2-4: the same view, and the spread over inference seeds from the per-seed frames
    segmenters.to_parquet(tmp_path / "segmenters.parquet")
    for name, dice in (("leaf_eps", [0.50, 0.52, 0.48]), ("leaf", [0.65, 0.65, 0.65])):
        pd.DataFrame({"seed": [0, 1, 2], "dice": dice, "iou": [d - 0.1 for d in dice]}).to_parquet(
            tmp_path / f"{name}.parquet")
    settings = {"parameterisation": {"ε-prediction": "leaf_eps", "x0 + alignment": "leaf"},
                "stability": {"ε-prediction": "leaf_eps", "x0 + alignment": "leaf"}}
    tables = write_leaf_tables(tmp_path / "segmenters.parquet", settings,
                               {"d/leaf_eps": tmp_path / "leaf_eps.parquet", "d/leaf": tmp_path / "leaf.parquet"},
                               tmp_path)
    assert sorted(tables) == ["leaf_parameterisation", "leaf_stability"]
    parameterisation = (tmp_path / "leaf_parameterisation.md").read_text()
    assert "| d | ε-prediction | leaf_eps | 900 | 50.0 ± 10.0 | 40.0 ± 10.0 | – |" in parameterisation
    # half the cases up, half down by the same amount: not significant
    p = tables["leaf_parameterisation"].set_index("segmenter").loc["leaf", "wilcoxon_p_value"]
    assert p > 0.05 and f"| d | x0 + alignment | leaf | 900 | 65.0 ± 10.0 | 55.0 ± 10.0 | {p:.3g} |" in parameterisation
    stability = (tmp_path / "leaf_stability.md").read_text()
    assert "| d | ε-prediction | leaf_eps | 3 | 50.00 | 2.000 | 40.00 | 2.000 |" in stability
    assert "| d | x0 + alignment | leaf | 3 | 65.00 | 0.000 |" in stability
    assert not (tmp_path / "leaf_lambda.md").exists()
