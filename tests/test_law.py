"""LAW and its baselines (segsynth.law): the ratio prior of eq. 3, the learned weights of eqs. 4–7, the Dice
regulariser, the teacher, the ablation switches, and generator training with every weighting (with resume)."""

import json

import pytest
import torch

from segsynth.errors import ConfigError
from segsynth.generator import MaskToImageGenerator, build_generator
from segsynth.generator.train import train_generator
from segsynth.law import (LAW_DEFAULTS, SpatialWeighting, build_teacher, law_options, law_weights, mean_normalise,
                          ratio_prior, soft_dice_loss, soft_masks, teacher_output)


def test_ratio_prior_is_eq_3_on_a_binary_mask():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 1  # 4 of 16 pixels: r = 0.25
    prior = ratio_prior(soft_masks(mask, 2, (4, 4)))
    m = mask[0].float()
    r = 0.25
    torch.testing.assert_close(prior[0, 0], m * (1 - r) + (1 - m) * r)
    assert prior[0, 0, 0, 0] == pytest.approx(0.75) and prior[0, 0, 3, 3] == pytest.approx(0.25)


def test_ratio_prior_weights_each_class_by_one_minus_its_own_area():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0, :2] = 1   # class 1: 2 pixels, r = 1/8
    mask[0, 3, :] = 2    # class 2: 4 pixels, r = 1/4; background 10 pixels, r = 5/8
    prior = ratio_prior(soft_masks(mask, 3, (4, 4)))[0, 0]
    assert prior[0, 0] == pytest.approx(1 - 1 / 8)
    assert prior[3, 0] == pytest.approx(1 - 1 / 4)
    assert prior[1, 1] == pytest.approx(1 - 5 / 8)


def test_soft_masks_at_a_latent_resolution_are_class_fractions():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0, 0] = 1
    soft = soft_masks(mask, 2, (2, 2))
    assert soft.shape == (1, 2, 2, 2)
    assert soft[0, 1, 0, 0] == pytest.approx(0.25) and soft.sum(1).allclose(torch.ones(1, 2, 2))


def test_an_empty_mask_gets_uniform_weights_not_zero():
    prior = ratio_prior(soft_masks(torch.zeros(1, 4, 4, dtype=torch.long), 2, (4, 4)))
    assert prior.abs().max() == 0  # eq. 3 with r = 0 and m = 0
    assert torch.equal(mean_normalise(prior), torch.ones_like(prior))


def test_law_weights_are_mean_normalised_and_inside_the_clamp():
    torch.manual_seed(0)
    mask = torch.zeros(3, 8, 8, dtype=torch.long)
    mask[:, 2:4, 2:5] = 1
    prior = ratio_prior(soft_masks(mask, 2, (8, 8)))
    delta = torch.rand(3, 1, 8, 8)
    opts = law_options({"weighting": "law"})
    weights = law_weights(delta, prior, opts)
    assert weights.min() >= LAW_DEFAULTS["w_min"] and weights.max() <= LAW_DEFAULTS["w_max"]
    unclamped = law_weights(delta, prior, {**opts, "w_min": None, "w_max": None})
    torch.testing.assert_close(unclamped.mean(dim=(1, 2, 3)), torch.ones(3))
    # μ = 1 + γ(2δ − 1) ∈ [0.8, 1.2] multiplies the prior before the normalisation
    raw = law_weights(delta, prior, {**opts, "normalize": False, "w_min": None, "w_max": None})
    torch.testing.assert_close(raw, prior * (1 + 0.2 * (2 * delta - 1)))


def test_each_ablation_switch_changes_exactly_its_component():
    torch.manual_seed(1)
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, :1, :1] = 1  # a tiny lesion: its normalised weight exceeds w_max
    prior = ratio_prior(soft_masks(mask, 2, (8, 8)))
    delta = torch.rand(2, 1, 8, 8)
    opts = law_options({"weighting": "law"})
    full = law_weights(delta, prior, opts)
    no_max = law_weights(delta, prior, {**opts, "w_max": None})
    assert no_max.max() > opts["w_max"] and torch.equal(no_max.clamp(max=opts["w_max"]), full)
    no_min = law_weights(delta, prior, {**opts, "w_min": None})
    torch.testing.assert_close(no_min.clamp(min=opts["w_min"]), full)
    no_norm = law_weights(delta, prior, {**opts, "normalize": False})
    torch.testing.assert_close(no_norm, (prior * (1 + 0.2 * (2 * delta - 1))).clamp(opts["w_min"], opts["w_max"]))


def test_soft_dice_is_zero_on_agreement_and_one_on_disjoint_maps():
    fg = torch.zeros(1, 1, 4, 4)
    fg[..., :2, :] = 1
    assert soft_dice_loss(fg, fg).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(1 - fg, fg).item() == pytest.approx(1.0, abs=1e-6)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="weighting"):
        law_options({"weighting": "magic"})
    with pytest.raises(ConfigError, match="w_min"):
        law_options({"weighting": "law", "law": {"w_min": 3.0, "w_max": 2.0}})


@pytest.mark.parametrize("conditioning", ["concat", "controlnet"])
def test_the_teacher_starts_as_the_student_and_sees_the_image(tiny_generator_cfg, conditioning):
    cfg = dict(tiny_generator_cfg, conditioning=conditioning)
    gen = build_generator(cfg, ["bg", "a", "b"], channels=1, resolution=(16, 16), seed=0)
    teacher = build_teacher(gen)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:8, 4:8] = 1
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    cond, prompt = gen.mask_condition(masks), gen.encode_prompt(masks)
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        student = gen.model_output(x_t, t, cond, prompt)
        same = teacher_output(gen, teacher, x_t, t, cond, image, prompt)
    torch.testing.assert_close(same, student)  # the image's input weights start at zero
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)
        other = teacher_output(gen, teacher, x_t, t, cond, image, prompt)
        changed = teacher_output(gen, teacher, x_t, t, cond, -image, prompt)
    assert not torch.allclose(other, changed)  # ... and it reads the image once trained


def test_the_law_loss_trains_delta_net_and_adds_the_dice_term(tiny_generator_cfg):
    gen = build_generator(tiny_generator_cfg, ["bg", "a"], channels=1, resolution=(16, 16), seed=0)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:8, 4:8] = 1
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    cond, prompt = gen.mask_condition(masks), gen.encode_prompt(masks)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    output, target = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    args = (gen, output, target, x_t, t, cond, images, masks, prompt)
    law = SpatialWeighting(gen, {"weighting": "law"})
    no_dice = SpatialWeighting(gen, {"weighting": "law", "law": {"dice_weight": 0.0}})
    no_dice.load_state_dict(law.state_dict())
    loss, stats = law(*args)
    loss_no_dice, _ = no_dice(*args)
    torch.testing.assert_close(loss - loss_no_dice, torch.full((2,), float(stats["dice"])))
    loss.sum().backward()
    assert all(p.grad is not None for p in law.delta_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in law.teacher.parameters())
    uniform, _ = SpatialWeighting(gen, {"weighting": "uniform"})(*args)
    torch.testing.assert_close(uniform, (output - target).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("weighting", ["uniform", "ratio", "adaptive_distill", "law"])
def test_training_with_each_weighting_runs_and_resumes(tmp_path, tiny_data, tiny_generator_cfg, weighting):
    cfg = dict(tiny_generator_cfg)
    cfg["training"] = dict(cfg["training"], weighting=weighting)
    straight = train_generator(cfg, tiny_data, tmp_path / "straight", seed=3)
    assert straight["weighting"]["kind"] == weighting and straight["weighting"]["losses_finite"]
    killed = train_generator(cfg, tiny_data, tmp_path / "resumed", seed=3, stop_after=2)
    assert killed["stopped"]
    resumed = train_generator(cfg, tiny_data, tmp_path / "resumed", seed=3)
    assert resumed["resumed_from"] == 2
    a = MaskToImageGenerator.load(tmp_path / "straight").state_dict()
    b = MaskToImageGenerator.load(tmp_path / "resumed").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    saved = json.loads((tmp_path / "straight" / "train_stats.json").read_text())["weighting"]
    if weighting == "law":
        assert (tmp_path / "straight" / "law_delta_net.pt").exists()
        assert 0 < saved["delta_mean"] < 1 and saved["weight_max"] <= LAW_DEFAULTS["w_max"]
    else:
        assert not (tmp_path / "straight" / "law_delta_net.pt").exists()


def test_law_trains_a_stable_diffusion_controlnet_at_latent_resolution(tmp_path, tiny_data, tiny_generator_cfg):
    from test_generator import _save_tiny_stable_diffusion

    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = dict(tiny_generator_cfg, pretrained=str(sd))
    del cfg["unet"]
    cfg["training"] = dict(cfg["training"], train_unet=False, weighting="law")
    stats = train_generator(cfg, tiny_data, tmp_path / "gen", seed=0)
    # the student's trainable part is the ControlNet alone; the teacher and φ train beside it, unsaved
    gen = MaskToImageGenerator.load(tmp_path / "gen")
    assert stats["trainable_parameters"] == sum(p.numel() for p in gen.controlnet.parameters())
    assert gen.controlnet.config["conditioning_channels"] == gen.num_classes  # the student's, not the teacher's
    assert stats["weighting"]["losses_finite"] and 0 < stats["weighting"]["delta_mean"] < 1
    weighting = SpatialWeighting(gen, {"weighting": "law"})
    assert weighting.teacher.controlnet_cond_embedding.conv_in.in_channels == gen.num_classes + gen.channels


def test_the_weight_figure_draws_long_sample_ids_as_short_titles(tmp_path, monkeypatch):
    # Kvasir-SEG's 25-character ids overlapped their neighbours' titles in the first Kvasir figure
    import numpy as np

    from segsynth import figures

    titles = []
    monkeypatch.setattr(figures.Axes, "set_title", lambda ax, text, **kw: titles.append(text))
    rng = np.random.default_rng(0)
    maps = {"sample_ids": ["cju0qkwl35piu0993l0dewei2", "img3"], "images": rng.random((2, 8, 8, 3)),
            "masks": rng.integers(0, 2, (2, 8, 8)), "prior": rng.random((2, 8, 8)), "delta": rng.random((2, 8, 8)),
            "weights": rng.random((2, 8, 8)), "timestep": 500}
    figures.law_weight_figure(maps, ["background", "polyp"], tmp_path / "law.png")
    assert (tmp_path / "law.png").stat().st_size > 0
    assert titles == ["cju0qkwl35piu…", "img3"]
