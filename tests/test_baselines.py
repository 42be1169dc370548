"""The compared methods of the VGD paper: UGDM, TFG, AdvDiffuser, DiffAug, AugPaint and GAUDA samplers."""

import copy

import numpy as np
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
    "diffaug": {"max_strength": 0.8},
    "augpaint": {"jumps": 2, "jump_length": 2},
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
           ("ugdm", {"scale": -1.0}), ("advdiffuser", {"sign": "yes"}), ("advdiffuser", {"start_strength": 0.0}),
           ("advdiffuser", {"gradcam": 1}), ("diffaug", {"mode": "sde"}), ("diffaug", {"max_strength": 0.0}),
           ("augpaint", {"keep": "all"}), ("augpaint", {"jump_length": 0}), ("gauda", {"class_adaptive": "no"})]
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
    for name in ("advdiffuser", "diffaug", "augpaint", "gauda"):
        sampler = build_sampler(name, {**BASE, "sampler": name})
        with pytest.raises(ValueError, match="source_images"):
            sampler.sample(trained["generator"], trained["masks"], trained["seeds"], trained["value_model"], None)


@pytest.mark.parametrize("name,zero", [("ugdm", {"scale": 0.0}),
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
def test_advdiffuser_raises_the_segmentation_loss_over_its_unguided_path(trained, sign):
    unguided, _ = draw(trained, "advdiffuser", scale=0.0)
    images, records = draw(trained, "advdiffuser", scale=1.0, sign=sign)
    assert (terms(trained, images)["ce"] > terms(trained, unguided)["ce"]).all()
    assert all(r["guidance_norm"] > 0 for r in records)


def test_advdiffuser_restores_the_grad_cam_region_of_the_real_image(trained, monkeypatch):
    """AdvDiffuser's mask: where Grad-CAM is 1 the output is the real image (pixel space: exactly, the last
    step puts back the clean x_0); where it is 0 the adversarial sample stands."""
    sources = trained["sources"]
    left = torch.zeros(4, 1, 16, 16)
    left[..., :8] = 1.0
    seen = {}

    def fake_cam(value_model, images, masks, layer=None):
        seen["images"] = images
        return left

    monkeypatch.setattr(baselines, "grad_cam", fake_cam)
    images, records = draw(trained, "advdiffuser", scale=1.0)
    assert torch.equal(seen["images"], sources)                 # Grad-CAM reads the real image
    assert torch.equal(images[..., :8], sources[..., :8])
    assert (images[..., 8:] - sources[..., 8:]).abs().mean() > 0.05
    assert records[0]["cam_mean"] == pytest.approx(0.5)


def test_advdiffuser_starts_from_the_noised_real_image(trained):
    """Same seeds, other real images → other samples, even with no attack and no mask; a shorter start
    (img2img strength) stays closer to the real image."""
    plain = {"scale": 0.0, "gradcam": False}
    images, records = draw(trained, "advdiffuser", **plain)
    flipped, _ = draw(trained, "advdiffuser", sources=trained["sources"].flip(-1), **plain)
    assert not torch.equal(images, flipped)
    scheduler = trained["generator"].sampling_scheduler()
    scheduler.set_timesteps(BASE["steps"])
    assert records[0]["start_timestep"] == int(scheduler.timesteps[0])
    late, late_records = draw(trained, "advdiffuser", start_strength=0.4, **plain)
    assert late_records[0]["start_timestep"] < records[0]["start_timestep"]
    sources = trained["sources"]
    assert (late - sources).abs().mean() < (images - sources).abs().mean()


def test_grad_cam_of_the_segmenter_is_a_normalised_map_per_image(trained):
    value_model = trained["value_model"]
    layer = baselines.cam_layer(value_model)
    assert isinstance(dict(value_model.named_modules())[layer], baselines._ACTIVATIONS)
    cam = baselines.grad_cam(value_model, trained["sources"], trained["masks"])
    assert cam.shape == (4, 1, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    assert (cam.flatten(1).amax(1) > 0.99).all()                  # MONAI normalises each map to [0, 1]
    assert not any(m._forward_hooks for m in value_model.modules())  # hooks went on a copy


# -- augmentation of real images ----------------------------------------------------------------------------------
def test_diffaug_is_one_tweedie_step_from_a_random_timestep_per_sample(trained):
    """The paper's DiffAug: t ~ U[0, max_strength·T) from each sample's stream, x_t ~ q(x_t | x_0), one step."""
    from segsynth.sampling.base import NoiseStream
    from segsynth.sampling.ddim import DDIMTrajectory

    params = {**BASE, "sampler": "diffaug", "max_strength": 0.5}
    images, records = draw(trained, "diffaug", max_strength=0.5)
    t = torch.tensor([r["timestep"] for r in records])
    assert len(set(t.tolist())) == 4 and (t >= 0).all() and (t < 500).all()
    # by hand: the stream's first draw noises the source, its second gives u = Φ(z)
    stream = NoiseStream(trained["seeds"], (4, 1, 16, 16), "cpu")
    x_T, z = stream.next(), stream.next()
    assert torch.equal(t, (torch.special.ndtr(z.flatten(1)[:, 0].double()) * 500).long())
    generator = trained["generator"]
    scheduler = generator.sampling_scheduler()
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * trained["sources"] + (1 - a).sqrt() * x_T
    traj = DDIMTrajectory.from_params(generator, trained["masks"], trained["seeds"], params)
    with torch.no_grad():
        eps = traj.noise(x_t, t)
    expected = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert records[0]["mode"] == "tweedie"


def test_diffaug_sdedit_stays_near_the_source_at_low_strength_and_departs_at_high(trained):
    sources = trained["sources"]
    # 10 steps, strength 0.1: one DDIM step from t = 0, where q(x_t | x_0) barely perturbs the image
    near, records = draw(trained, "diffaug", mode="sdedit", strength=0.1, steps=10)
    assert records[0]["timestep"] == 0 and records[0]["mode"] == "sdedit"
    assert (near - sources).abs().max() < 0.05
    # a strength that leaves no DDIM step returns the source itself (pixel space: exactly)
    none, records = draw(trained, "diffaug", mode="sdedit", strength=0.05, steps=10)
    assert records[0]["timestep"] == -1 and torch.equal(none, sources)
    far, records = draw(trained, "diffaug", mode="sdedit", strength=0.8, steps=10)
    assert records[0]["timestep"] > 0
    assert (far - sources).abs().mean() > 0.1
    assert (far - sources).abs().mean() > 5 * (near - sources).abs().mean()


@pytest.mark.parametrize("keep,jumps", [("foreground", 1), ("foreground", 3), ("background", 2)])
def test_augpaint_keeps_its_region_exactly_and_inpaints_the_rest(trained, keep, jumps):
    images, records = draw(trained, "augpaint", keep=keep, jumps=jumps)
    sources, masks = trained["sources"], trained["masks"]
    kept = ((masks > 0) if keep == "foreground" else (masks == 0)).unsqueeze(1).expand_as(images)
    assert torch.equal(images[kept], sources[kept])          # pixel space: bit-exact
    assert (images[~kept] - sources[~kept]).abs().mean() > 0.1
    assert records[0]["jumps"] == jumps
    assert records[0]["known_fraction"] == pytest.approx(float(kept[0].float().mean()))


def test_repaint_schedule_jumps_back_and_ends_at_the_image():
    assert baselines.repaint_levels(4, 1, 1) == [4, 3, 2, 1, 0]
    levels = baselines.repaint_levels(6, 2, 3)
    assert levels[0] == 6 and levels[-1] == 0 and max(levels) == 6
    assert all(abs(a - b) == 1 for a, b in zip(levels, levels[1:]))
    # jump points at levels 0, 2 (not 4 = steps − j): each jumps up j = 2 levels r − 1 = 2 times
    ups = sum(b > a for a, b in zip(levels, levels[1:]))
    assert ups == 2 * 2 * 2
    assert sum(b < a for a, b in zip(levels, levels[1:])) == 6 + ups


def test_augpaint_known_region_in_latent_resolution_takes_only_whole_cells():
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, 0, 1] = 2
    masks[0, 3, 3] = 1
    masks[0, 2:, :2] = 1
    background = baselines.AugPaintSampler.known_region(masks, (2, 2), keep="background")
    assert background.shape == (1, 1, 2, 2)
    assert background[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    foreground = baselines.AugPaintSampler.known_region(masks, (2, 2), keep="foreground")
    assert foreground[0, 0].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    same = baselines.AugPaintSampler.known_region(masks, (4, 4), keep="foreground")
    assert torch.equal(same[0, 0], (masks[0] > 0).float())


# -- selection ----------------------------------------------------------------------------------------------------
class _UnsureOfClassTwo(torch.nn.Module):
    """A fake f_θ: right on every pixel, certain except on class 2 (p = 0.5 / 0.5 there)."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def forward(self, images):
        masks = self.masks[: len(images)]
        probs = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
        unsure = masks == 2
        probs[:, 1][unsure] = 0.5
        probs[:, 2][unsure] = 0.5
        return probs


def test_gauda_draws_the_masks_of_the_classes_f_theta_is_least_sure_of():
    masks = torch.zeros(8, 4, 4, dtype=torch.long)
    masks[:, 0, 0] = 1                       # every mask has class 1
    masks[:2, 1, 1] = 2                      # two of eight have class 2
    fake = _UnsureOfClassTwo(masks)
    uncertainty = baselines.class_uncertainty(fake, torch.zeros(8, 1, 4, 4), masks, 3, batch_size=3)
    assert uncertainty[2] == pytest.approx(1.0) and uncertainty[1] == pytest.approx(0.0)
    sampler = build_sampler("gauda", {**BASE, "sampler": "gauda"})
    sources, columns = sampler.choose_sources(fake, torch.zeros(8, 1, 4, 4), masks.numpy(), 40, seed=0)
    assert (columns["gauda_class"] == 2).all()          # class 1 is certain: all the budget goes to class 2
    assert set(sources.tolist()) == {0, 1}              # uniformly among the masks that contain it
    again, _ = sampler.choose_sources(fake, torch.zeros(8, 1, 4, 4), masks.numpy(), 40, seed=0)
    assert np.array_equal(sources, again)
    assert build_sampler("gauda", {**BASE, "sampler": "gauda", "class_adaptive": False}).choose_sources(
        fake, torch.zeros(8, 1, 4, 4), masks.numpy(), 40, seed=0) is None


def test_gauda_weighs_classes_by_their_uncertainty():
    masks = torch.zeros(10, 4, 4, dtype=torch.long)
    masks[:5, 0, 0] = 1
    masks[5:, 0, 0] = 2
    probs = torch.zeros(10, 3, 4, 4)
    probs[:, 0] = 1.0
    probs[:5, :, 0, 0] = torch.tensor([0.1, 0.6, 0.3])      # class 1: margin 0.3 → uncertainty 0.7
    probs[5:, :, 0, 0] = torch.tensor([0.0, 0.1, 0.9])      # class 2: margin 0.8 → uncertainty 0.2
    sampler = build_sampler("gauda", {**BASE, "sampler": "gauda"})
    sources, columns = sampler.choose_sources(lambda x: probs[: len(x)], torch.zeros(10, 1, 4, 4),
                                              masks.numpy(), 4000, seed=3, batch_size=10)
    share = float((columns["gauda_class"] == 1).mean())
    assert share == pytest.approx(0.7 / 0.9, abs=0.03)
    assert ((sources < 5) == (columns["gauda_class"] == 1)).all()


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
