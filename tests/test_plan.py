"""The GPU-hour plan (segsynth.plan, `make paper-plan`) and the nested budget sets it counts: the budget sweep's
smaller budgets are prefixes of the largest budget's set (rule budget_prefix, segsynth.analyses.budget_prefix)."""

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from segsynth.analyses import budget_prefix
from segsynth.config import budget_seeds, budget_sources
from segsynth.errors import InputDataError
from segsynth.plan import (BASELINE, PLANNED, Job, format_plan, job_cost, load_config, make_plan, parse_dry_run,
                           dry_run)

SYNTHESIS = {"sampler": "ddim", "budget": 1.0, "steps": 3, "eta": 0.5, "guidance_scale": 2.0, "batch_size": 3}
SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 2,
             "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}
PAPER = [REPO / "config.yaml", REPO / "presets" / "paper.yaml"]
# the default with the Miner paper's budget sweep (1×, 2×) and subsets on one seed
SWEEP = [REPO / "config.yaml", REPO / "tests" / "config" / "budget_sweep.yaml"]


# -- nested budget sets ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import train_tiny_models

    root = tmp_path_factory.mktemp("prefix")
    train_tiny_models(root, SEGMENTER)
    return root


def test_the_prefix_of_a_budget_2_set_is_the_budget_1_set(trained, tmp_path):
    """What the workflow relies on: the first |train| samples of rd at 2× are rd at 1×, bit for bit, records and
    sample ids included (the batch of 3 cuts the two sets' last batches differently: 8 train masks)."""
    from segsynth.sampling.synthesize import synthesize

    direct = tmp_path / "rd"
    synthesize(trained / "gen", trained / "data", "rd", SYNTHESIS, seed=1, out_dir=direct,
               value_model_dir=trained / "seg")
    synthesize(trained / "gen", trained / "data", "rd_x2", {**SYNTHESIS, "budget": 2.0}, seed=1,
               out_dir=tmp_path / "rd_x2", value_model_dir=trained / "seg")
    meta = budget_prefix(tmp_path / "rd_x2", trained / "data", "rd", SYNTHESIS, 1, tmp_path / "prefix")

    n = len(np.load(direct / "images.npy"))
    assert meta["n"] == n and meta["prefix_of"]["n"] == 2 * n
    for name in ("images.npy", "masks.npy"):
        assert np.array_equal(np.load(tmp_path / "prefix" / name), np.load(direct / name)), name
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "prefix" / "records.parquet"),
                                  pd.read_parquet(direct / "records.parquet"))
    from segsynth.analyses import subset_size
    from segsynth.synthetic_set import load_synthetic_set

    assert len(load_synthetic_set(tmp_path / "prefix").images) == n and subset_size(tmp_path / "prefix") == (n, 1.0)

    # another method's settings, or another seed, is refused
    with pytest.raises(InputDataError, match="other settings"):
        budget_prefix(tmp_path / "rd_x2", trained / "data", "rd", {**SYNTHESIS, "steps": 4}, 1, tmp_path / "bad")
    with pytest.raises(InputDataError, match="seed"):
        budget_prefix(tmp_path / "rd_x2", trained / "data", "rd", SYNTHESIS, 2, tmp_path / "bad")
    # a batch size is a runtime setting: it may differ
    budget_prefix(tmp_path / "rd_x2", trained / "data", "rd", {**SYNTHESIS, "batch_size": 7}, 1, tmp_path / "ok")
    assert not (tmp_path / "bad").exists()


def test_budget_sources_cut_every_smaller_budget_from_the_largest():
    config = load_config(SWEEP)  # budgets 1 and 2 of rd and the Miner, one seed
    assert budget_sources(config) == {"rd": "rd_x2", "miner": "miner_x2"} and budget_seeds(config) == [0]
    config = load_config(PAPER)
    assert budget_sources(config) == {m: f"{base}_x6" for base in ("rd", "miner") for m in (base, f"{base}_x2", f"{base}_x4")}
    # a method whose own budget is the largest is the source; no sweep, no sources
    config["methods"]["rd"]["budget"] = 8.0
    assert budget_sources(config)["rd_x6"] == "rd"
    assert budget_sources({**config, "analyses": {"budget": None}}) == {}


# -- the DAG: one synthesis per (method, seed) of the sweep -------------------------------------------------------
@pytest.fixture(scope="module")
def default_dag(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("default_dag")
    return workdir, dry_run(SWEEP, workdir)


@pytest.fixture(scope="module")
def paper_dag(tmp_path_factory):
    from segsynth.data.placeholders import write_placeholder_datasets

    workdir = tmp_path_factory.mktemp("paper_dag")
    (workdir / "paths.yaml").write_text(yaml.safe_dump(write_placeholder_datasets(workdir / "data")))
    files = [*PAPER, workdir / "paths.yaml"]
    return workdir, files, dry_run(files, workdir)


def _sets(jobs, rule):
    return {(j.wildcards["dataset"], j.wildcards["method"], int(j.wildcards["seed"])) for j in jobs if j.rule == rule}


def test_the_dag_synthesises_each_swept_method_once_per_seed(default_dag, paper_dag):
    jobs = parse_dry_run(default_dag[1])
    synthesised, prefixes = _sets(jobs, "synthesize"), _sets(jobs, "budget_prefix")
    # the sweep's seed 0: rd_x2 and miner_x2 synthesised, rd and miner cut from them; seeds 1, 2 synthesised
    assert prefixes == {("mni152", "rd", 0), ("mni152", "miner", 0)}
    assert {(m, s) for _, m, s in synthesised if m.startswith(("rd", "miner"))} == \
        {("rd_x2", 0), ("miner_x2", 0), ("rd", 1), ("rd", 2), ("miner", 1), ("miner", 2)}
    assert len(synthesised) == 9  # rd, vgd_fast, miner × 3 seeds: one set per (method, seed)

    jobs = parse_dry_run(paper_dag[2])
    synthesised, prefixes = _sets(jobs, "synthesize"), _sets(jobs, "budget_prefix")
    for base in ("rd", "miner"):
        family = {base, f"{base}_x2", f"{base}_x4", f"{base}_x6"}
        assert {(d, s) for d, m, s in synthesised if m in family} == \
            {(d, s) for d in ("acdc", "synapse", "polyps") for s in range(3)}  # one per (dataset, seed)
        assert all(m == f"{base}_x6" for _, m, _ in synthesised if m in family)
        assert len({x for x in prefixes if x[1] in family}) == 3 * 3 * 3
    assert len(synthesised) == 3 * 3 * 10 and len(prefixes) == 54  # was 144 syntheses


# -- the plan ------------------------------------------------------------------------------------------------------
def test_plan_of_the_default_config(default_dag):
    workdir, text = default_dag
    plan = make_plan(SWEEP, workdir, text)
    assert plan.sizes["mni152"]["train"] == 87
    assert {"generator fine-tuning", "miner training", "synthesis: ddim", "synthesis: vgd", "synthesis: miner",
            "budget prefixes (copies)", "segmenter unet: real + synthetic", "evaluation", "splits (CPU)"} <= set(plan.rows)
    assert not plan.rows["splits (CPU)"].gpu and plan.rows["synthesis: ddim"].gpu
    assert sum(r.jobs for r in plan.rows.values()) == len(plan.jobs)
    labels = {label: (applied, saving) for label, applied, saving, _ in plan.reductions}
    assert labels["(a) shared samples"][0] and labels["(a) shared samples"][1] > 0
    assert labels["(b) batch sizes per sampler"][0]  # the default's batch 16
    assert not labels["(d) continue protocol"][0]
    assert 0 < plan.totals["planned"] <= plan.totals["baseline"]
    text = format_plan(plan)
    assert "within the 300 H100-hour target" in text and "(default)" in text


def test_plan_of_the_paper_preset(paper_dag):
    workdir, files, text = paper_dag
    plan = make_plan(files, workdir, text)
    rows = plan.rows
    nnunet = [r for s, r in rows.items() if s.startswith("segmenter nnunet")]
    assert sum(r.jobs for r in nnunet) == 174  # 171 real+synthetic continuations and 3 real-only runs
    # the baseline: 171 fresh runs of 1000 epochs; the preset continues them from the real-only model, 100 epochs
    assert rows["segmenter nnunet: real + synthetic"].base_jobs == 171
    assert rows["segmenter nnunet: real + synthetic (continue)"].units == 171 * 100
    # the estimate of this preset: ~1,150 H100-hours, ~870 of them nnU-Net
    assert 1050 <= plan.hours("baseline") <= 1300
    assert 800 <= sum(r.seconds.get("baseline", 0.0) for r in nnunet) / 3600 <= 950
    # every reduction the workflow makes reduces; each applied one is named
    labels = {label: (applied, saving) for label, applied, saving, _ in plan.reductions}
    for label in ("(a) shared samples", "(b) batch sizes per sampler", "(c) precision", "(d) continue protocol"):
        assert labels[label][0] and labels[label][1] > 0, label
    assert plan.totals["planned"] < plan.totals["+precision"] < plan.totals["+batch"] < plan.totals["+nested"] \
        < plan.totals["baseline"]
    assert rows["synthesis: ddim"].jobs == 9 and rows["synthesis: ddim"].base_jobs == 36
    assert rows["budget prefixes (copies)"].seconds.get("baseline", 0.0) == 0
    text = format_plan(plan)
    assert "H100-hour target" in text
    for stage in ("generator fine-tuning", "miner training", "synthesis: vgd", "synthesis: miner", "evaluation",
                  "segmenter swin_unet: real + synthetic (continue)", "splits (CPU)"):
        assert stage in text


def test_plan_of_every_papers_tables_on_a_gpu_cluster(tmp_path):
    """`make papers-plan`: presets/papers_gpu.yaml over paper.yaml, target `papers`: every generator of the five
    papers is costed per dataset, LEAF on SD, ORDER's real-only models, the cross-domain evaluations on the GPU."""
    from segsynth.data.placeholders import write_placeholder_datasets, write_unseen_polyps

    paths, unseen = tmp_path / "paths.yaml", tmp_path / "paths_papers.yaml"
    paths.write_text(yaml.safe_dump(write_placeholder_datasets(tmp_path / "data")))
    unseen.write_text(yaml.safe_dump(write_unseen_polyps(tmp_path / "data")))
    # with the synthetic-only models paper.yaml switches off, to cost them too
    synthetic_only = tmp_path / "synthetic_only.yaml"
    synthetic_only.write_text(yaml.safe_dump({"analyses": {"synthetic_only": {"methods": ["rd"]}}}))
    files = [*PAPER, REPO / "presets" / "papers_gpu.yaml", paths, unseen, synthetic_only]
    plan = make_plan(files, tmp_path, targets=["papers"])
    rows = plan.rows
    # sd15, 7 LAW weightings, 9 ViCTr generators, on each of the 3 datasets
    assert rows["generator fine-tuning"].jobs == 17 * 3
    assert rows["segmenter leaf: real only"].jobs == 3 and rows["segmenter order: real only"].jobs == 3
    assert rows["segmenter leaf: real only"].seconds["planned"] > 10 * rows["segmenter order: real only"].seconds["planned"]
    # every cross-domain model (3 real-only nnU-Net/Swin/..., each augmented one of Polyps) costed as an evaluation
    evaluations = ("evaluate_real", "evaluate_augmented", "evaluate_synthetic_only", "evaluate_cross_domain",
                   "profile_segmenter", "leaf_stability")
    assert any(j.rule == "evaluate_cross_domain" for j in plan.jobs)
    assert rows["evaluation"].jobs == sum(j.rule in evaluations for j in plan.jobs)
    # synthetic-only models train as real-only ones do, not as a 10-second table job
    assert rows["segmenter nnunet: synthetic only"].jobs == 3 * 3
    assert rows["segmenter nnunet: synthetic only"].seconds["planned"] > rows["segmenter nnunet: real only"].seconds["planned"] / 2
    assert plan.sizes["polyps_unseen"]["test"] == 176
    assert plan.totals["planned"] < plan.totals["baseline"]


def test_a_configured_continue_protocol_is_counted(paper_dag, tmp_path):
    workdir, files, text = paper_dag
    extra = tmp_path / "continue.yaml"
    extra.write_text(yaml.safe_dump({"segmenters": {"nnunet": {"protocol": "continue", "continue_epochs": 50}}}))
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(yaml.safe_dump({"segmenters": {"nnunet": {"protocol": "scratch"},
                                                      "swin_unet": {"protocol": "scratch"}}}))
    fresh = make_plan([*files, scratch], workdir, text)
    assert not {label: a for label, a, _, _ in fresh.reductions}["(d) continue protocol"]
    assert dict(fresh.what_ifs)["continue protocol"] < fresh.totals["planned"]  # shown, not counted
    assert "What-if, NOT counted" in format_plan(fresh)
    plan = make_plan([*files, extra], workdir, text)
    applied, saving = {label: (a, s) for label, a, s, _ in plan.reductions}["(d) continue protocol"]
    assert applied and saving > 0
    assert plan.rows["segmenter nnunet: real + synthetic (continue)"].units == 171 * 50


def test_benchmark_files_replace_the_defaults(default_dag, tmp_path):
    workdir, text = default_dag
    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    jobs = parse_dry_run(text)
    measured = [j for j in jobs if j.rule == "synthesize" and j.wildcards["method"] == "vgd_fast"]
    bench = work / measured[0].benchmark
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text("s\th:m:s\tmax_rss\n3600.0\t1:00:00\t100\n")
    plan = make_plan(SWEEP, work, text)
    row = plan.rows["synthesis: vgd"]
    assert row.measured == 1 and row.scaled == 2
    # the measured job takes its hour; the two others of its stage the same (same work)
    assert row.seconds["planned"] == pytest.approx(3 * 3600.0)
    assert "1 measured, 2 scaled" in format_plan(plan)


def test_a_budget_prefix_job_is_costed_as_its_synthesis_in_the_baseline():
    config = load_config(PAPER)
    from segsynth.plan import Context

    ctx = Context(config, {"acdc": {"train": 100, "test": 40, "classes": 3, "source": "test"}}, set())
    config["datasets"]["acdc"]["resolution"] = 256
    job = Job("budget_prefix", {"dataset": "acdc", "generator": "sd15", "method": "rd_x2", "seed": "0"})
    copy, synthesis = job_cost(ctx, job, PLANNED), job_cost(ctx, job, BASELINE)
    assert copy.stage == "budget prefixes (copies)" and synthesis.stage == "synthesis: ddim"
    assert copy.units == synthesis.units == 200 and copy.seconds < synthesis.seconds / 10


def test_sampler_costs_follow_the_samplers_defaults():
    from segsynth.plan import DECODE_STEPS, sampler_steps

    steps = {"steps": 100}
    # GAUDA: one candidate per (class-adaptively chosen) mask unless oversample says more
    assert sampler_steps({**steps, "sampler": "gauda"}, True) == 100 + DECODE_STEPS
    assert sampler_steps({**steps, "sampler": "gauda", "oversample": 4}, True) == 4 * (100 + DECODE_STEPS)
    # DiffAug: one Tweedie step between encoding and decoding; the SDEdit variant runs strength × steps
    assert sampler_steps({**steps, "sampler": "diffaug"}, True) == 1 + 2 * DECODE_STEPS
    assert sampler_steps({**steps, "sampler": "diffaug", "mode": "sdedit", "strength": 0.5}, True) == \
        50 + 2 * DECODE_STEPS
    # the Miner costs RD's schedule plus its probe
    assert sampler_steps({**steps, "sampler": "miner"}, False) > sampler_steps({**steps, "sampler": "ddim"}, False)
