"""The compared methods of the VGD paper: UGDM, TFG, AdvDiffuser, DiffAug, AugPaint and GAUDA samplers."""

import copy

import pytest
import torch

import segsynth.sampling.baselines as baselines  # noqa: F401  (registers the baseline samplers)
from segsynth.errors import ConfigError
from segsynth.sampling import build_sampler
from segsynth.sampling.base import SAMPLERS, noise_seed
from segsynth.sampling.value import margin_uncertainty, value_terms

BASE = {"budget": 1.0, "steps": 5, "eta": 0.5, "guidance_scale": 2.0, "batch_size": 4}
SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 40,
             "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 1000, "augment": False}
# One setting per sampler that every generic test runs; the method-specific tests vary them.
SETTINGS = {
    "ugdm": {"scale": 1.0},
    "tfg": {"rho": 1.0, "mu": 0.25, "mean_iters": 2, "recurrence": 2},
    "advdiffuser": {"scale": 1.0, "sign": True},
    "diffaug": {"strength": 0.6},
    "augpaint": {"jumps": 2},
    "gauda": {"oversample": 3},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel-space generator and a segmenter f_θ, trained a few dozen steps (a few seconds)."""
    from conftest import TINY_GENERATOR, train_tiny_models

    from segsynth.data.canonical import load_split
    from segsynth.generator import MaskToImageGenerator
    from segsynth.segmenters import load_segmenter

    root = tmp_path_factory.mktemp("baselines")
    gen_cfg = copy.deepcopy(TINY_GENERATOR)
    gen_cfg["training"].update(steps=40, checkpoint_every=1000)
    data, _, _ = train_tiny_models(root, SEGMENTER, gen_cfg)
    train = load_split(data, "train")
    return {
        "generator": MaskToImageGenerator.load(root / "gen"),
        "value_model": load_segmenter(root / "seg").as_value_model(),
        "masks": torch.from_numpy(train.masks[:4]).long(),
        "sources": torch.from_numpy(train.images[:4]) * 2 - 1,
        "seeds": [noise_seed(0, i) for i in range(4)],
    }


def draw(trained, sampler: str, seeds=None, masks=None, sources=None, **params):
    sampler_obj = build_sampler(sampler, {**BASE, "sampler": sampler, **params})
    seeds = trained["seeds"] if seeds is None else seeds
    masks = trained["masks"] if masks is None else masks
    sources = trained["sources"] if sources is None else sources
    return sampler_obj.sample(trained["generator"], masks, seeds, trained["value_model"], sources)


def terms(trained, images, masks=None):
    with torch.no_grad():
        return value_terms(trained["value_model"](images), trained["masks"] if masks is None else masks)


# -- every sampler ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_baseline_images_are_in_range_and_deterministic_per_seed(trained, name):
    images, records = draw(trained, name, **SETTINGS[name])
    assert images.shape == (4, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0 and torch.isfinite(images).all()
    assert len(records) == 4 and all(isinstance(r, dict) for r in records)

    again, records_again = draw(trained, name, **SETTINGS[name])
    assert torch.equal(images, again) and records == records_again
    other, _ = draw(trained, name, seeds=[noise_seed(1, i) for i in range(4)], **SETTINGS[name])
    assert not torch.equal(images, other)
    # a sample depends on its own seed only, not on the batch it was drawn in (up to batched-kernel rounding,
    # which the gradient steps amplify a little)
    alone, _ = draw(trained, name, seeds=trained["seeds"][2:3], masks=trained["masks"][2:3],
                    sources=trained["sources"][2:3], **SETTINGS[name])
    torch.testing.assert_close(alone[0], images[2], atol=1e-3, rtol=0)


def test_baselines_are_registered_and_check_their_keys():
    assert set(SETTINGS) <= set(SAMPLERS)
    bad = [("diffaug", {"strength": 0.0}), ("diffaug", {"strength": 1.5}), ("gauda", {"oversample": 0}),
           ("augpaint", {"jumps": 0}), ("tfg", {"schedule": "cosine"}), ("tfg", {"recurrence": 0}),
           ("ugdm", {"scale": -1.0}), ("advdiffuser", {"sign": "yes"})]
    for name, params in bad:
        key = next(iter(params))
        with pytest.raises(ConfigError, match=key):
            build_sampler(name, {**BASE, "sampler": name, **params})


def test_samplers_refuse_missing_inputs(trained):
    for name in ("ugdm", "tfg", "advdiffuser", "gauda"):
        sampler = build_sampler(name, {**BASE, "sampler": name})
        assert sampler.needs_value_model
        with pytest.raises(ValueError, match="value_model"):
            sampler.sample(trained["generator"], trained["masks"], trained["seeds"], None, trained["sources"])
    for name in ("diffaug", "augpaint", "gauda"):
        sampler = build_sampler(name, {**BASE, "sampler": name})
        with pytest.raises(ValueError, match="source_images"):
            sampler.sample(trained["generator"], trained["masks"], trained["seeds"], trained["value_model"], None)


@pytest.mark.parametrize("name,zero", [("ugdm", {"scale": 0.0}), ("advdiffuser", {"scale": 0.0}),
                                       ("tfg", {"rho": 0.0, "mu": 0.0}), ("gauda", {"oversample": 1})])
def test_switched_off_guidance_is_random_ddim(trained, name, zero):
    """With its strength at zero each guided sampler walks RD's trajectory on RD's noise streams."""
    rd, _ = draw(trained, "ddim")
    images, records = draw(trained, name, **zero)
    torch.testing.assert_close(images, rd, atol=1e-6, rtol=0)
    if name != "gauda":
        assert all(r["guidance_norm"] == 0.0 for r in records)


# -- guided sampling ----------------------------------------------------------------------------------------------
def test_ugdm_raises_the_margin_uncertainty_over_random_sampling(trained):
    rd, _ = draw(trained, "ddim")
    images, records = draw(trained, "ugdm", scale=1.0)
    assert (terms(trained, images)["margin"] > terms(trained, rd)["margin"]).all()
    assert all(r["guidance_norm"] > 0 for r in records)


def test_tfg_raises_the_value_score_and_recurrence_changes_the_path(trained):
    rd, _ = draw(trained, "ddim")
    images, records = draw(trained, "tfg")                # TFG's defaults
    assert terms(trained, images)["value"].mean() > terms(trained, rd)["value"].mean()
    assert all(r["guidance_norm"] > 0 for r in records)
    recurred, _ = draw(trained, "tfg", recurrence=2)
    assert not torch.equal(images, recurred)
    decreasing, _ = draw(trained, "tfg", schedule="decrease")
    assert not torch.equal(images, decreasing)


@pytest.mark.parametrize("sign", [True, False])
def test_advdiffuser_raises_the_segmentation_loss_over_random_sampling(trained, sign):
    rd, _ = draw(trained, "ddim")
    images, _ = draw(trained, "advdiffuser", scale=1.0, sign=sign)
    assert (terms(trained, images)["ce"] > terms(trained, rd)["ce"]).all()


# -- augmentation of real images ----------------------------------------------------------------------------------
def test_diffaug_stays_near_the_source_at_low_strength_and_departs_at_high(trained):
    sources = trained["sources"]
    # 10 steps, strength 0.1: one DDIM step from t = 0, where q(x_t | x_0) barely perturbs the image
    near, records = draw(trained, "diffaug", strength=0.1, steps=10)
    assert records[0]["start_timestep"] == 0 and records[0]["strength"] == 0.1
    assert (near - sources).abs().max() < 0.05
    # a strength that leaves no DDIM step returns the source itself (pixel space: exactly)
    none, records = draw(trained, "diffaug", strength=0.05, steps=10)
    assert records[0]["start_timestep"] == -1 and torch.equal(none, sources)
    far, records = draw(trained, "diffaug", strength=0.8, steps=10)
    assert records[0]["start_timestep"] > 0
    assert (far - sources).abs().mean() > 0.1
    assert (far - sources).abs().mean() > 5 * (near - sources).abs().mean()


@pytest.mark.parametrize("jumps", [1, 3])
def test_augpaint_keeps_the_background_exactly_and_repaints_the_foreground(trained, jumps):
    images, records = draw(trained, "augpaint", jumps=jumps)
    sources, masks = trained["sources"], trained["masks"]
    background = (masks == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(images[background], sources[background])          # pixel space: bit-exact
    assert (images[~background] - sources[~background]).abs().mean() > 0.1
    assert records[0]["jumps"] == jumps
    assert records[0]["known_fraction"] == pytest.approx(float((masks[0] == 0).float().mean()))


def test_augpaint_known_region_in_latent_resolution_excludes_any_foreground():
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, 0, 1] = 2
    masks[0, 3, 3] = 1
    known = baselines.AugPaintSampler.known_region(masks, (2, 2))
    assert known.shape == (1, 1, 2, 2)
    assert known[0, 0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    same = baselines.AugPaintSampler.known_region(masks, (4, 4))
    assert torch.equal(same[0, 0], (masks[0] == 0).float())


# -- post-hoc scoring ---------------------------------------------------------------------------------------------
def test_gauda_keeps_the_most_uncertain_of_its_rd_candidates(trained):
    oversample = 4
    images, records = draw(trained, "gauda", oversample=oversample)
    real = margin_uncertainty(trained["value_model"](trained["sources"])).detach()
    # recompute every candidate as plain RD from its derived seed
    candidates, scores = [], []
    for k in range(oversample):
        seeds = [baselines.candidate_seed(s, k) for s in trained["seeds"]]
        rd, _ = draw(trained, "ddim", seeds=seeds)
        candidates.append(rd)
        scores.append(terms(trained, rd)["margin"] / real)
    scores = torch.stack(scores)
    assert len({tuple(c.flatten().tolist()) for c in candidates}) == oversample  # distinct noise per candidate
    for b, record in enumerate(records):
        best = int(scores[:, b].argmax())
        assert record["selected_candidate"] == best
        assert torch.equal(images[b], candidates[best][b])
        assert record["selected_score"] == pytest.approx(float(scores[best, b]), rel=1e-5)
        assert record["selected_score"] >= record["candidate_score_mean"]
        assert record["candidate_score_mean"] == pytest.approx(float(scores[:, b].mean()), rel=1e-5)
        assert record["real_margin"] == pytest.approx(float(real[b]), rel=1e-5)
    assert any(r["selected_score"] > r["candidate_score_mean"] for r in records)


# -- latent space -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_generator():
    """A random tiny latent-space generator (AutoencoderKL with one downsampling stage, 16 px → 8 latent)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler

    from segsynth.generator.model import ClassPromptEmbedding, MaskToImageGenerator, _tiny_unet

    torch.manual_seed(0)
    cfg = {"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
           "attention_head_dim": 4, "norm_num_groups": 4}
    unet = _tiny_unet(cfg, 4, [8, 8])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32),
                                           conditioning_channels=3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    meta = {"class_names": ["background", "ring", "core"], "channels": 1, "resolution": [16, 16],
            "prompt_template": "{classes}", "cross_attention_dim": 8}
    gen = MaskToImageGenerator(unet=unet, controlnet=controlnet, meta=meta, vae=vae,
                               noise_scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                             beta_schedule="squaredcos_cap_v2"),
                               prompt_embedding=ClassPromptEmbedding(2, 8))
    gen.requires_grad_(False)
    return gen.eval()


@pytest.mark.parametrize("name", ["ugdm", "diffaug", "augpaint"])
def test_baselines_work_in_latent_space(trained, latent_generator, name):
    latent = {**trained, "generator": latent_generator}
    images, _ = draw(latent, name, steps=3, **SETTINGS[name])
    assert images.shape == (4, 1, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0 and torch.isfinite(images).all()
    again, _ = draw(latent, name, steps=3, **SETTINGS[name])
    assert torch.equal(images, again)
