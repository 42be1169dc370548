"""Random DDIM sampling, the sampler registry, the value score terms and one synthesis job end to end."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segsynth.errors import ConfigError
from segsynth.sampling import build_sampler
from segsynth.sampling.base import noise_seed
from segsynth.sampling.ddim import DDIMTrajectory
from segsynth.sampling.synthesize import conditioning_sources, synthesize
from segsynth.sampling.value import log_cosh, margin_uncertainty, normalised_cross_entropy, value_terms

SYNTHESIS = {"sampler": "ddim", "budget": 1.5, "steps": 3, "eta": 0.5, "guidance_scale": 2.0, "batch_size": 3}
SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 2,
             "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import train_tiny_models

    root = tmp_path_factory.mktemp("sampling")
    train_tiny_models(root, SEGMENTER)
    return root


def test_log_cosh_matches_numpy_and_does_not_overflow():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(log_cosh(x).numpy(), np.log(np.cosh(x.numpy())), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(log_cosh(torch.tensor([1e4]))).all()


def test_value_terms_on_known_predictions():
    masks = torch.tensor([[[0, 1], [2, 1]]])
    uniform = torch.full((1, 3, 2, 2), 1 / 3)
    assert normalised_cross_entropy(uniform, masks).item() == pytest.approx(1.0)
    assert margin_uncertainty(uniform).item() == pytest.approx(1.0)
    perfect = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    assert normalised_cross_entropy(perfect, masks).item() == pytest.approx(0.0, abs=1e-6)
    assert margin_uncertainty(perfect).item() == pytest.approx(0.0)
    # V = ζ(CE) + λ·M_s
    terms = value_terms(uniform, masks, margin_weight=0.5)
    assert terms["value"].item() == pytest.approx(math.log(math.cosh(1.0)) + 0.5)


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="methods.foo.sampler"):
        build_sampler("foo", {"sampler": "nope"})


def test_noise_of_a_sample_does_not_depend_on_its_batch(trained):
    from segsynth.generator import MaskToImageGenerator

    gen = MaskToImageGenerator.load(trained / "gen")
    masks = torch.zeros(3, 16, 16, dtype=torch.long)
    seeds = [noise_seed(0, i) for i in range(3)]
    together = DDIMTrajectory(gen, masks, seeds, steps=2, eta=1.0, guidance_scale=1.0)
    alone = DDIMTrajectory(gen, masks[1:2], seeds[1:2], steps=2, eta=1.0, guidance_scale=1.0)
    assert torch.equal(together.x_T[1], alone.x_T[0])
    assert torch.equal(together.step_noise()[1], alone.step_noise()[0])


def test_conditioning_sources_use_every_training_mask_per_budget_unit():
    sources = conditioning_sources(10, 2.5, seed=4)
    assert len(sources) == 25
    assert sorted(sources[:10]) == list(range(10)) and sorted(sources[10:20]) == list(range(10))
    assert not np.array_equal(sources, conditioning_sources(10, 2.5, seed=5))


def test_synthesis_writes_a_complete_deterministic_set(trained, tmp_path):
    from segsynth.data.canonical import load_split

    records = synthesize(trained / "gen", trained / "data", "rd", SYNTHESIS, seed=1, out_dir=tmp_path / "a",
                         value_model_dir=trained / "seg")
    train = load_split(trained / "data", "train")
    n = round(1.5 * len(train.masks))
    images, masks = np.load(tmp_path / "a" / "images.npy"), np.load(tmp_path / "a" / "masks.npy")
    assert images.shape == (n, 1, 16, 16) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    frame = pd.read_parquet(tmp_path / "a" / "records.parquet")
    assert len(frame) == n and frame["sample_id"].is_unique
    assert {"ce", "margin", "value", "source_sample_id"} <= set(frame.columns)
    # each synthetic mask is the training mask it names
    by_id = dict(zip(train.index["sample_id"], train.masks))
    for sid, mask in zip(frame["source_sample_id"], masks):
        assert np.array_equal(by_id[sid], mask)
    pd.testing.assert_frame_equal(records, frame)

    synthesize(trained / "gen", trained / "data", "rd", SYNTHESIS, seed=1, out_dir=tmp_path / "b",
               value_model_dir=trained / "seg")
    assert np.array_equal(images, np.load(tmp_path / "b" / "images.npy"))  # same seed → same bits
    synthesize(trained / "gen", trained / "data", "rd", SYNTHESIS, seed=2, out_dir=tmp_path / "c",
               value_model_dir=trained / "seg")
    assert not np.array_equal(images, np.load(tmp_path / "c" / "images.npy"))


@pytest.mark.parametrize("method", ["rd", "vgd"])
def test_a_killed_synthesis_job_resumes_to_the_same_bits(trained, tmp_path, method):
    """Per-batch shards: a job stopped after one batch leaves that batch and no output; the rerun samples only
    the rest and writes the set an uninterrupted job writes, bit for bit. Shards of another job are dropped."""
    params = {**SYNTHESIS, "sampler": "ddim" if method == "rd" else "vgd"}
    kwargs = {"value_model_dir": trained / "seg"}
    whole = tmp_path / "whole"
    synthesize(trained / "gen", trained / "data", method, params, seed=1, out_dir=whole, **kwargs)
    assert not Path(f"{whole}.ckpt").exists()  # shards are removed with the output written

    killed = tmp_path / "killed"
    synthesize(trained / "gen", trained / "data", method, params, seed=1, out_dir=killed, stop_after=1, **kwargs)
    assert not killed.exists()
    shards = sorted(Path(f"{killed}.ckpt").glob("batch_*.json"))
    assert [s.name for s in shards] == ["batch_0000000.json"]
    calls = []
    original = build_sampler(method, params).__class__.sample

    def counting(self, generator, masks, *args, **kw):
        calls.append(len(masks))
        return original(self, generator, masks, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_sampler(method, params).__class__, "sample", counting)
        synthesize(trained / "gen", trained / "data", method, params, seed=1, out_dir=killed, **kwargs)
    n = len(np.load(whole / "masks.npy"))
    assert sum(calls) == n - params["batch_size"]  # the first batch came from its shard
    for name in ("images.npy", "masks.npy"):
        assert np.array_equal(np.load(whole / name), np.load(killed / name))
    pd.testing.assert_frame_equal(pd.read_parquet(whole / "records.parquet"),
                                  pd.read_parquet(killed / "records.parquet"))

    # a shard of another job (another seed) is not reused
    other = tmp_path / "other"
    synthesize(trained / "gen", trained / "data", method, params, seed=2, out_dir=other, stop_after=1, **kwargs)
    Path(f"{other}.ckpt").rename(Path(f"{killed}.ckpt"))
    synthesize(trained / "gen", trained / "data", method, params, seed=1, out_dir=tmp_path / "killed", **kwargs)
    assert np.array_equal(np.load(whole / "images.npy"), np.load(killed / "images.npy"))


def test_gauda_reads_its_first_candidates_from_the_rd_set(trained, tmp_path, monkeypatch):
    """GAUDA's candidate 0 is RD's sample of the same seed: read from the RD set, the set is the same (up to
    the [0, 1] storage's rounding) and one DDIM pass per batch fewer runs."""
    from segsynth.config import candidate_source
    from segsynth.sampling.ddim import DDIMSampler

    kwargs = {"value_model_dir": trained / "seg"}
    rd = {**SYNTHESIS, "sampler": "ddim"}
    gauda = {**SYNTHESIS, "sampler": "gauda", "oversample": 2, "class_adaptive": False}
    synthesize(trained / "gen", trained / "data", "rd", rd, seed=1, out_dir=tmp_path / "rd", **kwargs)
    calls = []
    original = DDIMSampler.sample

    def counting(self, *args, **kw):
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(DDIMSampler, "sample", counting)
    synthesize(trained / "gen", trained / "data", "gauda", gauda, seed=1, out_dir=tmp_path / "alone", **kwargs)
    alone_calls, calls[:] = len(calls), []
    synthesize(trained / "gen", trained / "data", "gauda", gauda, seed=1, out_dir=tmp_path / "reused",
               candidates_dir=tmp_path / "rd", **kwargs)
    assert len(calls) == alone_calls // 2  # candidate 1 only
    alone, reused = (pd.read_parquet(tmp_path / d / "records.parquet") for d in ("alone", "reused"))
    assert (alone["selected_candidate"] == reused["selected_candidate"]).all()
    np.testing.assert_allclose(np.load(tmp_path / "reused" / "images.npy"),
                               np.load(tmp_path / "alone" / "images.npy"), atol=1e-6)
    # another seed's RD set is refused: its masks are in another order
    synthesize(trained / "gen", trained / "data", "rd", rd, seed=2, out_dir=tmp_path / "rd2", **kwargs)
    with pytest.raises(Exception, match="not conditioned on this job's masks"):
        synthesize(trained / "gen", trained / "data", "gauda", gauda, seed=1, out_dir=tmp_path / "bad",
                   candidates_dir=tmp_path / "rd2", **kwargs)

    config = {"run": {"methods": ["rd_eta0", "rd", "gauda"]}, "datasets": {"d": {}},
              "synthesis": {"steps": 3, "eta": 0.5, "guidance_scale": 2.0, "budget": 1.0, "batch_size": 4},
              "methods": {"rd": {"sampler": "ddim"}, "rd_eta0": {"sampler": "ddim", "eta": 0.0},
                          "gauda": {"sampler": "gauda", "class_adaptive": False, "oversample": 4},
                          "gauda_10": {"sampler": "gauda", "class_adaptive": False, "oversample": 4, "steps": 10},
                          "gauda_adaptive": {"sampler": "gauda", "oversample": 4},
                          "gauda_one": {"sampler": "gauda", "class_adaptive": False}}}
    assert candidate_source(config, "d", "gauda") == "rd"
    assert candidate_source(config, "d", "gauda_10") is None and candidate_source(config, "d", "rd") is None
    # class-adaptive masks are not RD's; one candidate needs none read
    assert candidate_source(config, "d", "gauda_adaptive") is None and candidate_source(config, "d", "gauda_one") is None


def test_gauda_class_adaptive_masks_reach_the_synthetic_set(trained, tmp_path):
    """The job conditions on the masks GAUDA draws and records the class each was drawn for."""
    from segsynth.data.canonical import load_split

    gauda = {**SYNTHESIS, "sampler": "gauda"}
    synthesize(trained / "gen", trained / "data", "gauda", gauda, seed=1, out_dir=tmp_path / "g",
               value_model_dir=trained / "seg")
    records = pd.read_parquet(tmp_path / "g" / "records.parquet")
    train = load_split(trained / "data", "train")
    ids = train.index["sample_id"].tolist()
    masks = np.load(tmp_path / "g" / "masks.npy")
    for row, mask in zip(records.itertuples(), masks):
        assert row.gauda_class > 0 and (mask == row.gauda_class).any()
        assert np.array_equal(mask, train.masks[ids.index(row.source_sample_id)])


def test_gt_aug_sets_are_conditioned_on_the_deformed_masks(trained, tmp_path):
    from segsynth.data.canonical import load_split

    params = {**SYNTHESIS, "sampler": "ddim", "mask_source": "gt_aug"}
    synthesize(trained / "gen", trained / "data", "rd", params, seed=1, out_dir=tmp_path / "aug")
    synthesize(trained / "gen", trained / "data", "rd", {**params, "mask_source": "gt"}, seed=1,
               out_dir=tmp_path / "gt")
    train = load_split(trained / "data", "train")
    ids = train.index["sample_id"].tolist()
    records = pd.read_parquet(tmp_path / "aug" / "records.parquet")
    aug, gt = np.load(tmp_path / "aug" / "masks.npy"), np.load(tmp_path / "gt" / "masks.npy")
    originals = np.stack([train.masks[ids.index(s)] for s in records["source_sample_id"]])
    assert np.array_equal(gt, originals)
    assert not np.array_equal(aug, originals)
    assert all(set(np.unique(a)) <= set(np.unique(o)) for a, o in zip(aug, originals))
    with pytest.raises(ValueError, match="mask_source"):
        synthesize(trained / "gen", trained / "data", "rd", {**params, "mask_source": "cloud"}, seed=1,
                   out_dir=tmp_path / "bad")


def test_cvae_sets_are_conditioned_on_masks_drawn_from_the_mask_vae(trained, tmp_path):
    from segsynth.data.canonical import load_split
    from segsynth.mask_vae import train_mask_vae

    train_mask_vae({"latent_size": 4, "channels": [4, 8], "steps": 3, "batch_size": 4}, trained / "data",
                   tmp_path / "vae", seed=0)
    params = {**SYNTHESIS, "sampler": "ddim", "mask_source": "cvae"}
    synthesize(trained / "gen", trained / "data", "rd", params, seed=1, out_dir=tmp_path / "a",
               mask_vae_dir=tmp_path / "vae")
    synthesize(trained / "gen", trained / "data", "rd", params, seed=1, out_dir=tmp_path / "b",
               mask_vae_dir=tmp_path / "vae")
    train = load_split(trained / "data", "train")
    ids = train.index["sample_id"].tolist()
    records = pd.read_parquet(tmp_path / "a" / "records.parquet")
    masks = np.load(tmp_path / "a" / "masks.npy")
    originals = np.stack([train.masks[ids.index(s)] for s in records["source_sample_id"]])
    assert masks.shape == originals.shape and not np.array_equal(masks, originals)
    assert set(np.unique(masks)) <= {0, 1, 2}
    assert np.array_equal(masks, np.load(tmp_path / "b" / "masks.npy"))      # the seed decides the masks
    assert np.array_equal(np.load(tmp_path / "a" / "images.npy"), np.load(tmp_path / "b" / "images.npy"))
    with pytest.raises(ValueError, match="mask VAE"):
        synthesize(trained / "gen", trained / "data", "rd", params, seed=1, out_dir=tmp_path / "c")
