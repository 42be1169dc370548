"""The workflow as a user runs it: dry-run, lint, config validation, and the whole DAG end to end on a tiny
config, including incremental reruns."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from segsynth.errors import ConfigError

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
E2E_CONFIG = REPO / "tests" / "config" / "e2e.yaml"
STAGES = {"splits", "train_generator", "train_segmenter_real", "synthesize", "mask_adherence",
          "train_segmenter_augmented", "evaluate_real", "evaluate_augmented", "main_table", "adherence_table",
          "dice_figure", "sample_figure", "train_miner", "profile_segmenter", "segmenter_table", "fidelity",
          "fidelity_reference", "fidelity_table", "train_segmenter_synthetic_only", "evaluate_synthetic_only",
          "synthetic_only_table"}
#: The Miner paper's analyses: presets/miner_analyses.yaml, not the demo
MINER_ANALYSES = {"adversarial_subset", "budget_table", "subset_table", "budget_figure", "budget_prefix"}


def snakemake(*args, cwd, timeout=900):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["timeout", "-k", "15", str(timeout), SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)
            if m.group(1) not in ("total", "job")}


def test_dry_run_of_the_default_config_lists_every_stage(tmp_path):
    result = snakemake("-n", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert STAGES <= set(counts) and not MINER_ANALYSES & set(counts)
    # rd, vgd_fast and miner × 3 synthesis seeds; the Miner paper's analyses live in presets/miner_analyses.yaml
    assert counts["synthesize"] == 3 * 3 and "budget_prefix" not in counts and counts["train_miner"] == 1
    assert counts["train_segmenter_augmented"] == 3 * 3
    # each RD set trains a segmenter alone (analyses.synthetic_only), scored on the real test split
    assert counts["train_segmenter_synthetic_only"] == counts["evaluate_synthetic_only"] == 3
    # FID / KID / domain FID of each main synthetic set (methods × seeds), as mask adherence; the real side once
    assert counts["fidelity"] == counts["mask_adherence"] == 3 * 3 and counts["fidelity_table"] == 1
    assert counts["fidelity_reference"] == 1


def test_lint_is_clean():
    result = snakemake("--lint", cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["datasets"]["mni152"].update(bogus=1), "bogus"),
    (lambda c: c["synthesis"].update(steps="many"), "many"),
    (lambda c: c["synthesis"].update(eta=3), "eta"),
    (lambda c: c["run"].update(methods=["nope"]), "nope"),
    (lambda c: c["methods"].update(rd={"sampler": "magic"}), "magic"),
])
def test_invalid_config_is_refused_before_anything_runs(tmp_path, edit, message):
    config = yaml.safe_load(E2E_CONFIG.read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_every_analysis_switches_off_with_null(tmp_path):
    """null is the schema's off switch of each analysis; Snakemake's validate must not trip over defaults inside
    one (it set them on the None: the schema keeps no defaults under a nullable object)."""
    config = yaml.safe_load(E2E_CONFIG.read_text())
    config["analyses"] = {name: None for name in ("budget", "subsets", "synthetic_only", "rounds", "cross_domain",
                                                  "law", "victr", "leaf", "order")}
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--quiet", "rules", "--", "all", "papers", cwd=tmp_path,
                       timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["paper_law_order"] == 1 and not {"law_tables", "victr_tables", "subset_table"} & set(counts)


@pytest.mark.slow
def test_the_whole_dag_runs_end_to_end_and_reruns_incrementally(tmp_path, e2e_reference):
    # the shared uninterrupted run (conftest.e2e_reference), copied with its mtimes and Snakemake's records
    shutil.copytree(e2e_reference, tmp_path, symlinks=True, dirs_exist_ok=True)
    config = tmp_path / "config.yaml"

    results = tmp_path / "results"
    main = pd.read_parquet(results / "tables" / "main.parquet")
    assert list(main.columns) == ["dataset", "segmenter", "method", "seed", "class", "metric", "value", "unit"]
    assert set(main["unit"]) == {"slice·px"}  # MNI152 slices carry no volume: per image, in pixels
    assert set(main["method"]) == {"baseline", "rd", "rd_eta0", "miner"}
    assert set(main.loc[main["method"] == "rd", "seed"]) == {0, 1}
    assert set(main["metric"]) == {"dice", "iou", "asd", "hd95"}
    assert set(main["class"]) == {"csf", "gm", "wm", "mean"}
    dice = main[(main["metric"] == "dice") & (main["class"] == "mean")]["value"]
    assert np.isfinite(dice).all() and ((dice >= 0) & (dice <= 1)).all()
    markdown = (results / "tables" / "main.md").read_text()
    assert "| Baseline |" in markdown and "| rd |" in markdown and "±" in markdown
    adherence = pd.read_parquet(results / "tables" / "adherence.parquet")
    assert len(adherence) == 6 and {"method", "seed", "dice", "judge_dice"} <= set(adherence.columns)
    # the adherence judge (tests/config/e2e.yaml: judge_unet) scored every set beside f_θ
    assert adherence[["dice", "judge_dice"]].notna().all().all()
    assert "by judge (judge_unet)" in (results / "tables" / "adherence.md").read_text()
    fidelity = pd.read_parquet(results / "tables" / "fidelity.parquet")
    assert len(fidelity) == 6 * 4 and set(fidelity["metric"]) == {"fid", "kid_mean", "kid_std", "domain_fid"}
    assert np.isfinite(fidelity["value"]).all() and (fidelity["n_real"] > 0).all() and (fidelity["n_samples"] > 0).all()
    assert "| rd |" in (results / "tables" / "fidelity.md").read_text()
    assert "mni152 FID" in markdown and "mni152 adherence DSC (%)" in markdown  # beside Dice in the main table
    alone = pd.read_parquet(results / "tables" / "synthetic_only.parquet")
    assert list(alone.columns) == ["dataset", "generator", "method", "seed", "segmenter", "metric", "value", "unit"]
    assert sorted(alone["metric"]) == ["baseline_dice", "dice", "dice_ratio"] and set(alone["seed"]) == {0}
    stats = json.loads((results / "mni152" / "synthetic_only" / "segmenters" / "unet" / "tiny" / "rd" / "seed0"
                        / "train_stats.json").read_text())
    assert stats["n_real"] == 0 and stats["n_synthetic"] > 0
    budget = pd.read_parquet(results / "tables" / "budget.parquet")
    assert sorted(budget["budget"]) == [1.0, 2.0] and budget["delta_dice"].notna().all()
    subsets = pd.read_parquet(results / "tables" / "subsets.parquet")
    assert len(subsets) == 4 and (subsets.loc[subsets["threshold"] == 0, "share"] == 1).all()
    assert "τ = 0.3" in (results / "tables" / "subsets.md").read_text()
    segmenters = pd.read_parquet(results / "tables" / "segmenters.parquet")
    assert list(segmenters["segmenter"]) == ["unet"] and (segmenters["params"] > 0).all()
    assert segmenters["train_s"].gt(0).all() and segmenters["dice_mean"].between(0, 1).all()
    for figure in ("dice.png", "samples_mni152_tiny.png", "budget.png"):
        assert (results / "figures" / figure).stat().st_size > 1000
    # every costly rule left a benchmark file and every rule a log
    assert (tmp_path / "benchmarks" / "mni152" / "generators" / "tiny.tsv").exists()
    assert (tmp_path / "logs" / "mni152" / "splits.log").exists()
    assert (tmp_path / "benchmarks" / "mni152" / "miners" / "tiny" / "unet.tsv").exists()
    miner_records = pd.read_parquet(results / "mni152" / "synthetic" / "tiny" / "miner" / "seed0" / "records.parquet")
    assert {"seg_loss", "adversariality", "miner_max_shift", "miner_kl", "miner_seed_mean",
            "miner_seed_std"} <= set(miner_records.columns)
    # each synthetic set records the value terms of every sample under f_θ
    records = pd.read_parquet(results / "mni152" / "synthetic" / "tiny" / "rd" / "seed0" / "records.parquet")
    assert {"value", "ce", "margin"} <= set(records.columns) and records["value"].notna().all()

    again = snakemake("-n", "--configfile", str(config), cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # The cost table counts exactly this run's benchmarked jobs: every benchmark file under benchmarks/.
    cost = pd.read_parquet(results / "tables" / "cost.parquet")
    assert cost["jobs"].sum() == len(list((tmp_path / "benchmarks").rglob("*.tsv")))

    # Runtime settings (checkpoint intervals, the synthesis batch size) change no result: nothing reruns.
    runtime = yaml.safe_load(config.read_text())
    runtime["generators"]["tiny"]["training"]["checkpoint_every"] = 3
    runtime["miner"]["checkpoint_every"] = 3
    runtime["segmenters"]["unet"]["checkpoint_every"] = 3
    runtime["synthesis"]["batch_size"] = 5
    config.write_text(yaml.safe_dump(runtime))
    again = snakemake("-n", "--configfile", str(config), cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]

    # Changing one method's parameter reruns that method's jobs and what depends on them, nothing else.
    edited = yaml.safe_load(config.read_text())
    edited["methods"]["rd_eta0"]["steps"] = 4
    config.write_text(yaml.safe_dump(edited))
    dry = snakemake("-n", "--configfile", str(config), cwd=tmp_path, timeout=120)
    assert dry.returncode == 0, dry.stderr
    counts = job_counts(dry.stdout)
    assert counts["synthesize"] == 2 and counts["train_segmenter_augmented"] == 2
    assert counts["evaluate_augmented"] == 2 and counts["mask_adherence"] == 2
    for untouched in ("splits", "train_generator", "train_segmenter_real", "evaluate_real", "train_miner"):
        assert untouched not in counts
    outputs = re.findall(r"^\s+output: (.*)$", dry.stdout, flags=re.M)
    assert any("rd_eta0" in out for out in outputs)
    assert not any("/rd/seed" in out for out in outputs)  # rd's jobs are untouched


@pytest.mark.slow
def test_mask_sources_and_the_continue_protocol_run_end_to_end(tmp_path):
    """tests/config/protocols.yaml over e2e.yaml: gt, gt_aug and cvae masks, downstream protocol continue."""
    shutil.copy(E2E_CONFIG, tmp_path / "config.yaml")
    shutil.copy(REPO / "tests" / "config" / "protocols.yaml", tmp_path / "protocols.yaml")
    run = snakemake("--configfile", "config.yaml", "protocols.yaml", "--cores", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = tmp_path / "results"
    main = pd.read_parquet(results / "tables" / "main.parquet")
    assert set(main["method"]) == {"baseline", "rd", "rd_aug", "rd_cvae"}
    synthetic = results / "mni152" / "synthetic" / "tiny"
    gt = np.load(synthetic / "rd" / "seed0" / "masks.npy")
    for method in ("rd_aug", "rd_cvae"):  # same sources and seeds as rd, other masks, the same label set
        masks = np.load(synthetic / method / "seed0" / "masks.npy")
        assert masks.shape == gt.shape and not np.array_equal(masks, gt)
        assert set(np.unique(masks)) <= set(np.unique(gt))
    quality = pd.read_parquet(results / "tables" / "mask_vae.parquet")
    assert set(quality["class_name"]) == {"csf", "gm", "wm"} and quality["area_wasserstein"].notna().all()
    assert (tmp_path / "benchmarks" / "mni152" / "mask_vae.tsv").exists()
    for method in ("rd", "rd_aug", "rd_cvae"):
        stats = json.loads((results / "mni152" / "segmenters" / "unet" / "tiny" / method / "seed0"
                            / "train_stats.json").read_text())
        assert stats["protocol"] == "continue" and stats["steps"] == 4 and stats["batch_real"] == stats["batch_synthetic"]
        assert stats["n_val"] > 0 and stats["best_step"] in (2, 4)


#: presets layered over another preset, not over config.yaml alone (tested with their base below)
LAYERED_PRESETS = {REPO / "presets" / "law_kvasir.yaml", REPO / "presets" / "victr_kvasir.yaml",
                   REPO / "presets" / "victr_ablation_kvasir.yaml",
                   REPO / "presets" / "papers_gpu.yaml"}  # over paper.yaml: tests/test_plan.py dry-runs it
#: presets whose run narrows the product (run.generator_methods), tested on their own (tests/test_papers.py)
NARROWED_PRESETS = {REPO / "presets" / "papers_cpu.yaml"}


@pytest.mark.parametrize("preset", sorted(set((REPO / "presets").glob("*.yaml")) - {REPO / "presets" / "paper.yaml"}
                                          - LAYERED_PRESETS - NARROWED_PRESETS), ids=lambda p: p.stem)
def test_every_preset_validates_and_dry_runs(tmp_path, preset):
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = snakemake("-n", "--configfile", str(tmp_path / "config.yaml"), str(preset), cwd=tmp_path,
                       timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = yaml.safe_load(preset.read_text())
    # a preset without a run section (default_generator) runs the default's methods
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    run = {**default["run"], **(config.get("run") or {})}
    methods, generators = run["methods"], run["generators"]
    n_seed = {**default["seeds"], **(config.get("seeds") or {})}["n_seed"]
    sweep = (config.get("analyses") or {}).get("budget")  # presets switch the analyses off with null
    extra = 0 if sweep is None else len(sweep["methods"]) * len(set(sweep["budgets"]) - {1}) * sweep["n_seed"]
    counts = job_counts(result.stdout)
    # every synthetic set is synthesised, or cut from its method's largest budget (nested budget sets)
    assert counts["synthesize"] + counts.get("budget_prefix", 0) == n_seed * len(methods) * len(generators) + extra


def test_paper_preset_dry_runs_on_placeholder_datasets(tmp_path):
    """What `make paper-dryrun` does: the three papers' datasets × every method × 3 seeds, plus the analyses."""
    from segsynth.data.placeholders import write_placeholder_datasets

    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "paths.yaml").write_text(yaml.safe_dump(write_placeholder_datasets(tmp_path / "data")))
    result = snakemake("-n", "--configfile", str(tmp_path / "config.yaml"), str(REPO / "presets" / "paper.yaml"),
                       str(tmp_path / "paths.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    preset = yaml.safe_load((REPO / "presets" / "paper.yaml").read_text())
    counts = job_counts(result.stdout)
    n_methods, sweep = len(preset["run"]["methods"]), preset["analyses"]["budget"]
    extra = len(sweep["methods"]) * (len(sweep["budgets"]) - 1) * sweep["n_seed"]
    assert counts["splits"] == 3 and counts["train_generator"] == 3
    # one synthesis per dataset, method and seed: the budget sweep's smaller budgets are prefixes of its largest
    assert counts["synthesize"] + counts["budget_prefix"] == 3 * (3 * n_methods + extra)
    assert counts["synthesize"] == 3 * 3 * n_methods


def test_snakemake_profile_slurm_finds_the_profile_make_slurm_profile_installs(tmp_path):
    """The README's cluster set-up, then `snakemake --profile slurm -n` as a user types it (profile found by name
    in the user's Snakemake config folder, here a temporary one)."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def install(*settings):
        result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "slurm-profile", *settings],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return yaml.safe_load((tmp_path / "config" / "snakemake" / "slurm" / "config.yaml").read_text())

    def dry_run():
        return subprocess.run(["timeout", "-k", "15", "120", SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--profile",
                               "slurm", "-n", "--configfile", str(E2E_CONFIG)], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    profile = install("ACCOUNT=lab42", "GPU_PARTITION=gpu-a100", "CPU_PARTITION=cpu")
    assert profile["executor"] == "slurm" and profile["software-deployment-method"] == "conda"
    assert profile["default-resources"] == {"slurm_account": "lab42"}
    assert "cpus_per_task" not in str(profile)  # threads map to --cpus-per-task by themselves
    partitions = yaml.safe_load((tmp_path / "config" / "snakemake" / "slurm" / "partitions.yaml").read_text())
    assert partitions["partitions"] == {"cpu": {"max_gpu": 0}, "gpu-a100": {"max_gpu": 8}}
    result = dry_run()
    # Found by name, with the workflow profile beside it; no conda here, so the dry run stops at `conda info`.
    assert f"Using profiles slurm and workflow specific profile {REPO}/profiles/default" in result.stderr
    assert "conda info" in result.stdout + result.stderr

    profile = install("SDM=none")  # no account or partitions given: the plugin's auto-detection
    assert "default-resources" not in profile and "slurm-partition-config" not in profile
    assert not (tmp_path / "config" / "snakemake" / "slurm" / "partitions.yaml").exists()
    result = dry_run()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Using profiles slurm" in result.stdout + result.stderr
    assert re.search(r"^synthesize\s+\d+$", result.stdout, flags=re.M)


@pytest.mark.slow
def test_law_tables_and_figure_run_end_to_end(tmp_path):
    """tests/config/law.yaml over e2e.yaml: generators trained with each weighting, LAW's tables and figure."""
    shutil.copy(E2E_CONFIG, tmp_path / "config.yaml")
    shutil.copy(REPO / "tests" / "config" / "law.yaml", tmp_path / "law.yaml")
    run = snakemake("--configfile", "config.yaml", "law.yaml", "--cores", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tables = tmp_path / "results" / "tables"
    synthesis = pd.read_parquet(tables / "law_synthesis.parquet")
    assert list(dict.fromkeys(synthesis["row"])) == ["Uniform", "Adaptive Distillation", "LAW"]
    assert synthesis.loc[synthesis["metric"] == "fid", "value"].notna().all()
    downstream = pd.read_parquet(tables / "law_downstream.parquet")
    assert list(dict.fromkeys(downstream["row"])) == ["Real only", "+ Uniform", "+ Adaptive Distillation", "+ LAW"]
    dice = downstream["metric"] != "wilcoxon_p"
    assert downstream.loc[dice, "value"].between(0, 1).all()
    p_values = downstream[~dice].set_index("row")["value"]  # each row against Real only, itself untested
    tested = p_values.drop("Real only")  # NaN only where a row's per-case Dice equals Real only's everywhere
    assert np.isnan(p_values["Real only"]) and tested.notna().any() and tested.dropna().between(0, 1).all()
    ablation = pd.read_parquet(tables / "law_ablation.parquet")
    assert set(ablation["stability"]) <= {"stable", "diverged", "collapsed", "unstable"}
    assert "| mni152 | LAW |" in (tables / "law_ablation.md").read_text()
    assert "p (Wilcoxon, DSC)" in (tables / "law_ablation.md").read_text()
    assert (tmp_path / "results" / "figures" / "law_weights_mni152.png").stat().st_size > 0
    generators = tmp_path / "results" / "mni152" / "generators"
    law = json.loads((generators / "tiny-law" / "train_stats.json").read_text())["weighting"]
    assert law["kind"] == "law" and law["dice_weight"] == 1.0 and 0 < law["delta_mean"] < 1
    nodice = json.loads((generators / "tiny-law-nodice" / "train_stats.json").read_text())["weighting"]
    assert nodice["dice_weight"] == 0.0


def test_generator_names_with_underscores_get_their_own_figures(tmp_path):
    """samples_{dataset}_{generator}.png splits at the configured names: a generator called tiny_long is the
    generator tiny_long of dataset mni152, not generator "long" of a dataset "mni152_tiny"."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["generators"]["tiny_long"] = config["generators"]["tiny"]
    config["run"]["generators"] = ["tiny", "tiny_long"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["sample_figure"] == counts["value_figure"] == 2
    assert "results/figures/samples_mni152_tiny_long.png" in result.stdout


@pytest.mark.slow
def test_a_victr_generator_trains_in_two_stages_and_every_sampler_runs_on_it(tmp_path):
    """tests/config/victr.yaml over e2e.yaml: Stage 1 on another dataset's splits, Stage 2 on the run's, RD and
    the Miner (trained against the flow) from it, the downstream model and the main table."""
    shutil.copy(E2E_CONFIG, tmp_path / "config.yaml")
    shutil.copy(REPO / "tests" / "config" / "victr.yaml", tmp_path / "victr.yaml")
    run = snakemake("--configfile", "config.yaml", "victr.yaml", "--cores", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = tmp_path / "results"
    assert (results / "mni152_coronal" / "data").is_dir()  # Stage 1's dataset, built for the generator only
    stats = json.loads((results / "mni152" / "generators" / "victr" / "train_stats.json").read_text())
    assert stats["stage1"]["steps"] == 4 and stats["stage2"]["steps"] == 4 and stats["stage2"]["ewc_weight"] > 0
    assert stats["tweedie"] is True and stats["stage2"]["lora_parameters"] > 0
    main = pd.read_parquet(results / "tables" / "main.parquet")  # several generators: methods are generator:method
    assert {"tiny:rd", "tiny:miner", "victr:rd", "victr:miner"} <= set(main["method"])
    assert main.loc[main["method"].str.startswith("victr:"), "value"].notna().all()


def test_law_on_kvasir_fine_tunes_each_weighting_from_the_kvasir_generator_the_dag_trains_first(tmp_path):
    """presets/law_kvasir.yaml over presets/kvasir.yaml: the law-* generators `init` from a DAG output, so the
    Kvasir generator is a job of the run and every law-* training waits for it."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = snakemake("-n", "--configfile", "config.yaml", str(REPO / "presets" / "kvasir.yaml"),
                       str(REPO / "presets" / "law_kvasir.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["train_generator"] == 8 and counts["law_tables"] == 1
    assert "output: results/kvasir/generators/tiny" in result.stdout
    assert re.search(r"input: results/kvasir/data, results/kvasir/generators/tiny\n\s+output: "
                     r"results/kvasir/generators/law-law", result.stdout)


@pytest.mark.parametrize("dataset", ["mni152", "kvasir"])
def test_the_victr_ablation_trains_one_stage1_per_distinct_stage1_setting(tmp_path, dataset):
    """presets/victr_ablation.yaml (and over the Kvasir preset, victr_ablation_kvasir.yaml): eleven generators,
    of which only "w/o Tweedie correction" changes Stage 1 and "w/o Stage 1" has none, so two Stage-1 jobs serve
    ten Stage-2 trainings."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    presets = ["victr_ablation"] if dataset == "mni152" else ["kvasir", "victr_ablation", "victr_ablation_kvasir"]
    result = snakemake("-n", "--configfile", "config.yaml", *(str(REPO / "presets" / f"{p}.yaml") for p in presets),
                       cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["train_generator"] == 11 and counts["train_victr_stage1"] == 2 and counts["splits"] == 2
    source = "mni152_coronal" if dataset == "mni152" else "kvasir_stage1"
    assert result.stdout.count(f"input: results/{source}/data, results/{dataset}/data") == 2
    inputs = {output.removeprefix(f"results/{dataset}/generators/"): re.findall(r"victr_stage1/([0-9a-f]{12})\.pt",
                                                                                 line)
              for line, output in re.findall(r"input: (.*)\n\s+output: (\S+)", result.stdout)
              if output.startswith(f"results/{dataset}/generators/victr")}
    assert len(inputs) == 11 and inputs["victr-nostage1"] == [] and len(inputs["victr"]) == 1
    shared = {g for g in inputs if inputs[g] == inputs["victr"]}
    assert shared == set(inputs) - {"victr-notweedie", "victr-nostage1"}
    assert len(inputs["victr-notweedie"]) == 1 and inputs["victr-notweedie"] != inputs["victr"]
    # the shared Stage 1 (nine generators wait for it) starts first: priority 20 + its waiting generators
    priorities = dict(re.findall(r"output: results/\w+/victr_stage1/([0-9a-f]{12})\.pt\n(?:.*\n){0,6}?\s+priority: "
                                 r"(\d+)", result.stdout))
    assert priorities == {inputs["victr"][0]: "29", inputs["victr-notweedie"][0]: "21"}


def test_victr_on_kvasir_pretrains_on_the_other_kvasir_images_and_samples_only_the_tables_rows(tmp_path):
    """presets/victr_kvasir.yaml over presets/kvasir.yaml: ViCTr's Stage 1 reads the kvasir_stage1 dataset (the
    700 training ids the Kvasir preset leaves out, a list shipped beside the preset), and the product is
    narrowed to the victr tables' rows."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = snakemake("-n", "--configfile", "config.yaml", str(REPO / "presets" / "kvasir.yaml"),
                       str(REPO / "presets" / "victr_kvasir.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["train_generator"] == 2 and counts["splits"] == 2 and counts["victr_tables"] == 1
    assert counts["synthesize"] == 3 * (2 + 4)  # tiny: rd, rd_4; victr: rd, rd_1, rd_2, rd_4
    assert counts["train_victr_stage1"] == 1
    assert re.search(r"input: results/kvasir_stage1/data, results/kvasir/data\n\s+output: "
                     r"results/kvasir/victr_stage1/[0-9a-f]{12}\.pt", result.stdout)
    assert re.search(r"input: results/kvasir/data, results/kvasir/victr_stage1/[0-9a-f]{12}\.pt\n\s+output: "
                     r"results/kvasir/generators/victr", result.stdout)
    stage1 = {line.strip() for line in (REPO / "presets" / "kvasir_seg_stage1_ids.txt").read_text().splitlines()}
    preset = yaml.safe_load((REPO / "presets" / "kvasir.yaml").read_text())["datasets"]["kvasir"]
    assert len(stage1) == 700
    train_list = REPO / preset["split_files"]["train"]
    if train_list.is_file():  # the shared copy beside the project: its train ids but the preset's first 100
        listed = set(train_list.read_text().split())
        assert stage1 == listed - set(sorted(listed)[:preset["limit"]])


def test_the_leaf_preset_trains_only_real_only_models_for_its_tables(tmp_path):
    """presets/leaf.yaml, targeting its tables: every LEAF entry's real-only model, its evaluation and profile, the
    stability evaluations of Table 4's rows, and nothing of synthesis."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = snakemake("-n", "--configfile", "config.yaml", str(REPO / "presets" / "leaf.yaml"), "--",
                       "results/tables/leaf_parameterisation.md", "results/tables/segmenters.md", cwd=tmp_path,
                       timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["train_segmenter_real"] == 9 and counts["leaf_stability"] == 2 and counts["leaf_tables"] == 1
    assert "synthesize" not in counts and "train_generator" not in counts
    assert "output: results/mni152/eval/leaf_eps/stability.parquet" in result.stdout


def test_leaf_stability_rows_must_be_leaf_segmenters():
    from segsynth.config import check_references, read_configs

    config = read_configs([REPO / "config.yaml", REPO / "presets" / "leaf.yaml"])
    check_references(config)
    config["run"]["segmenters"].append("mk_unet")
    config["analyses"]["leaf"]["stability"]["MK-UNet"] = "mk_unet"
    with pytest.raises(ConfigError, match="not a leaf segmenter") as err:
        check_references(config)
    assert err.value.key == "analyses.leaf.stability"


def test_the_leaf_preset_layers_over_the_kvasir_preset(tmp_path):
    """LEAF's Kvasir rows: presets/leaf.yaml over presets/kvasir.yaml, RGB polyps through the same entries."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = snakemake("-n", "--configfile", "config.yaml", str(REPO / "presets" / "kvasir.yaml"),
                       str(REPO / "presets" / "leaf.yaml"), "--", "results/tables/leaf_parameterisation.md",
                       cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["train_segmenter_real"] == 9 and counts["leaf_stability"] == 2
    assert "output: results/kvasir/eval/leaf/stability.parquet" in result.stdout
