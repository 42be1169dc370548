"""Value-Guided Diffusion: exactness against DDIM, the trust region, value focus, streams, value gain, levers."""

import math

import pytest
import torch

from segsynth.errors import ConfigError
from segsynth.sampling import build_sampler
from segsynth.sampling import vgd as vgd_module
from segsynth.sampling.base import noise_seed
from segsynth.sampling.ddim import DDIMTrajectory
from segsynth.sampling.value import value_terms
from segsynth.sampling.vgd import VGD_DEFAULTS, focus_map, in_window, vgd_options, vgd_seed

BASE = {"steps": 6, "eta": 0.5, "guidance_scale": 2.0}
SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 20,
             "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny trained generator, a tiny trained f_θ, and a batch of training masks with their noise seeds."""
    from conftest import train_tiny_models

    from segsynth.data.canonical import load_split
    from segsynth.generator import MaskToImageGenerator
    from segsynth.segmenters import load_segmenter

    root = tmp_path_factory.mktemp("vgd")
    data, _, _ = train_tiny_models(root, SEGMENTER)
    masks = torch.from_numpy(load_split(data, "train").masks[:4].copy())
    return {"gen": MaskToImageGenerator.load(root / "gen"),
            "f": load_segmenter(root / "seg").as_value_model(),
            "masks": masks, "seeds": [noise_seed(3, i) for i in range(len(masks))], "root": root}


def vgd(**overrides):
    return build_sampler("vgd", {"sampler": "vgd", **BASE, **overrides})


def run(sampler, models, masks=None, seeds=None):
    return sampler.sample(models["gen"], models["masks"] if masks is None else masks,
                          models["seeds"] if seeds is None else seeds, models["f"])


def test_defaults_are_the_papers_and_bad_settings_are_config_errors():
    assert (VGD_DEFAULTS["lambda_margin"], VGD_DEFAULTS["tau"], VGD_DEFAULTS["k"], VGD_DEFAULTS["gamma"]) == (
        1.0, 1.0, 0.04, 0.90)
    assert VGD_DEFAULTS["jacobian"] == "full" and VGD_DEFAULTS["focus"] and VGD_DEFAULTS["trust_region"]
    assert vgd_options({})["window"] == [0.0, 1.0]
    assert vgd(k=0.1).needs_value_model
    for bad in ({"jacobian": "approx"}, {"gamma": 1.5}, {"k": -0.1}, {"time_travel": 1.5},
                {"window": [0.6, 0.2]}, {"focus": "yes"}, {"decoder": "taesd"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            vgd_options(bad)


def test_class_balanced_adversariality_weighs_a_small_structure_like_the_background():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, :2, :2] = 1  # 4 of 64 pixels
    probs = torch.zeros(2, 2, 8, 8)
    probs[:, 0], probs[:, 1] = 0.9, 0.1  # everything called background
    probs[1, :, :2, :2] = torch.tensor([0.1, 0.9]).view(2, 1, 1)  # sample 1 gets the structure right
    terms = value_terms(probs, masks)
    wrong, right = -math.log(0.1), -math.log(0.9)
    # the plain CE hardly tells them apart (4 pixels of 64), the class-balanced one averages the two classes
    expected = torch.tensor([(wrong + right) / 2, right])
    torch.testing.assert_close(terms["adversariality"], 1 - torch.exp(-expected))
    assert terms["seg_loss"][0] - terms["seg_loss"][1] < 0.2 < terms["adversariality"][0] - terms["adversariality"][1]


def test_focus_map_is_a_per_sample_min_max_in_unit_range():
    s = torch.stack([torch.arange(16.0).view(4, 4), torch.full((4, 4), 3.0), torch.zeros(4, 4)])
    omega = focus_map(s)
    assert omega.shape == (3, 1, 4, 4)
    assert omega[0].min() == 0 and omega[0].max() == 1
    assert torch.allclose(omega[0, 0], s[0] / 15)
    assert torch.equal(omega[1:], torch.zeros(2, 1, 4, 4))  # constant map → Ω = 0, no NaN


def test_windows_are_fractions_of_the_trajectory():
    assert [in_window(i, 10, [0.0, 1.0]) for i in range(10)] == [True] * 10
    assert [in_window(i, 10, [0.0, 0.5]) for i in range(10)] == [True] * 5 + [False] * 5
    assert [in_window(i, 10, [0.8, 1.0]) for i in range(10)] == [False] * 8 + [True] * 2
    assert not any(in_window(i, 10, [0.3, 0.3]) for i in range(10))


@pytest.mark.parametrize("jacobian", ["full", "detached"])
def test_without_trust_radius_and_time_travel_vgd_is_ddim_to_the_bit(models, jacobian):
    ddim, _ = build_sampler("rd", {"sampler": "ddim", **BASE}).sample(
        models["gen"], models["masks"], models["seeds"], models["f"])
    sampler = vgd(k=0.0, time_travel=0, jacobian=jacobian)
    x, records = run(sampler, models)
    assert torch.equal(x, ddim)
    # ... and the guidance machinery did run: every step guided, with non-zero focus
    assert [r["guided_steps"] for r in records] == [BASE["steps"]] * len(x)
    assert len(sampler.trace) == BASE["steps"] and all(r["mean_focus"] > 0 for r in records)


def test_ddim_stream_holds_exactly_rds_draws_whatever_the_time_travel(models, monkeypatch):
    draws = {"rd": [], "vgd": []}
    original = DDIMTrajectory.step_noise
    current = []

    def spy(self):
        noise = original(self)
        current.append(noise.clone())
        return noise

    monkeypatch.setattr(DDIMTrajectory, "step_noise", spy)
    build_sampler("rd", {"sampler": "ddim", **BASE}).sample(models["gen"], models["masks"], models["seeds"])
    draws["rd"], current[:] = list(current), []
    run(vgd(k=0.3, time_travel=2), models)
    draws["vgd"] = list(current)
    assert len(draws["vgd"]) == len(draws["rd"]) == BASE["steps"]
    assert all(torch.equal(a, b) for a, b in zip(draws["rd"], draws["vgd"]))
    assert vgd_seed(5) != 5 and vgd_seed(5) == vgd_seed(5)


def test_every_step_stays_in_the_trust_region_and_focus_in_unit_range(models):
    sampler = vgd(k=0.5, time_travel=1, window=[0.0, 0.5])
    _, records = run(sampler, models)
    steps = BASE["steps"]
    assert len(sampler.trace) == steps + steps // 2  # one time-travel repeat on the first half
    assert [r["guided_steps"] for r in records] == [steps + steps // 2] * len(records)
    for row in sampler.trace:
        assert row["radius"] > 0
        # ‖x_{t−1} − x̃_{t−1}‖_∞ ≤ ε_t up to the float32 rounding of the addition x̃ + δ
        slack = 4 * torch.finfo(torch.float32).eps * row["x_scale"] / row["radius"]
        assert (row["trust_ratio"] <= 1 + slack).all(), row
        assert (row["omega_min"] >= 0).all() and (row["omega_max"] <= 1).all()
    # the bound is tight: sign steps of size τ = 1 saturate the ball where Ω ≥ ε_t
    assert max(float(row["trust_ratio"].max()) for row in sampler.trace) > 0.99
    assert all(0 < r["mean_focus"] <= 1 and r["max_trust_ratio"] <= 1.001 for r in records)


def test_the_trust_radius_is_k_sqrt_beta_t_of_the_training_schedule(models):
    sampler = vgd(k=0.04, time_travel=0)
    run(sampler, models)
    scheduler = models["gen"].sampling_scheduler()
    assert [row["radius"] for row in sampler.trace] == pytest.approx(
        [0.04 * math.sqrt(float(scheduler.betas[row["t"]])) for row in sampler.trace])
    # the stride option reads the effective β of each DDIM jump, larger than the schedule's with skipped steps
    stride = vgd(k=0.04, time_travel=0, radius_beta="stride")
    run(stride, models)
    assert all(a["radius"] > b["radius"] for a, b in zip(stride.trace, sampler.trace))
    with pytest.raises(ConfigError, match="radius_beta"):
        vgd(radius_beta="effective")


def test_without_the_trust_region_updates_leave_the_ball(models):
    sampler = vgd(k=0.04, trust_region=False, focus=False, time_travel=0)
    x, records = run(sampler, models)
    assert all(r["max_trust_ratio"] > 10 for r in records)
    assert all(float(row["omega_min"].min()) == 1.0 for row in sampler.trace)  # focus off: Ω ≡ 1


def test_same_seed_same_samples_other_seed_other_samples(models):
    a, rec_a = run(vgd(k=0.3), models)
    b, rec_b = run(vgd(k=0.3), models)
    assert torch.equal(a, b) and rec_a == rec_b
    c, _ = run(vgd(k=0.3), models, seeds=[noise_seed(4, i) for i in range(len(models["masks"]))])
    assert not torch.equal(a, c)


def test_guidance_window_limits_the_guided_steps(models):
    _, records = run(vgd(k=0.3, guidance_window=[0.0, 0.5], time_travel=0), models)
    assert [r["guided_steps"] for r in records] == [BASE["steps"] // 2] * len(records)


def test_detached_jacobian_is_the_gradient_through_tweedie_alone(models):
    """With ∂ε/∂x_t = 0, g = ∂V/∂x̂_0 / √ᾱ_t; the full Jacobian differs from it."""
    gen, f, masks = models["gen"], models["f"], models["masks"]
    traj = DDIMTrajectory(gen, masks, models["seeds"], BASE["steps"], BASE["eta"], BASE["guidance_scale"])
    t = traj.timesteps[2]
    alpha_bar, _ = vgd_module.step_alphas(traj.scheduler, t)
    eps_d, g_d, v_d = vgd(jacobian="detached").value_gradient(traj, traj.x, t, alpha_bar, gen.decode, f, masks)
    eps_f, g_f, v_f = vgd(jacobian="full").value_gradient(traj, traj.x, t, alpha_bar, gen.decode, f, masks)
    assert torch.equal(eps_d, eps_f) and torch.allclose(v_d, v_f)
    x0 = ((traj.x - (1 - alpha_bar) ** 0.5 * eps_d) / alpha_bar ** 0.5).requires_grad_(True)
    (g0,) = torch.autograd.grad(value_terms(f(x0), masks.long())["value"].sum(), x0)
    assert torch.allclose(g_d, g0 / alpha_bar ** 0.5, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(g_f, g_d, rtol=1e-2, atol=1e-6)


def test_vgd_raises_the_value_score_above_random_ddim(models):
    """The point of the method: on fixed seeds, guided samples score higher under f_θ than RD's."""
    f, masks = models["f"], models["masks"]
    rd, _ = build_sampler("rd", {"sampler": "ddim", **BASE}).sample(models["gen"], masks, models["seeds"])
    guided, _ = run(vgd(k=0.5, time_travel=0), models)
    with torch.no_grad():
        v_rd = value_terms(f(rd), masks)["value"]
        v_vgd = value_terms(f(guided), masks)["value"]
    assert v_vgd.mean() > v_rd.mean() + 0.1, (v_rd, v_vgd)
    assert (v_vgd > v_rd).float().mean() >= 0.75


def test_tiny_decoder_lever_on_a_latent_generator(models, tmp_path):
    """decoder: tiny decodes x̂_0|t with an AutoencoderTiny in latent space; in pixel space it is the identity."""
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, DDPMScheduler

    from segsynth.generator.model import ClassPromptEmbedding, MaskToImageGenerator, _tiny_unet

    torch.manual_seed(0)
    unet_cfg = {"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
                "attention_head_dim": 4, "norm_num_groups": 4}
    unet = _tiny_unet(unet_cfg, 4, [8, 8])
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    latent_gen = MaskToImageGenerator(
        unet=unet, controlnet=ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32),
                                                        conditioning_channels=3),
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        meta={"class_names": ["background", "ring", "core"], "channels": 1, "resolution": [16, 16],
              "cross_attention_dim": 8}, vae=vae, prompt_embedding=ClassPromptEmbedding(2, 8)).eval()
    latent_gen.requires_grad_(False)
    AutoencoderTiny(in_channels=1, out_channels=1, encoder_block_out_channels=(8, 8),
                    decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                    latent_channels=4).save_pretrained(tmp_path / "taesd")
    latent = {**models, "gen": latent_gen}
    settings = {"k": 2.0, "time_travel": 0, "jacobian": "detached", "steps": 3}
    x_vae, _ = run(vgd(**settings), latent)
    tiny = vgd(decoder="tiny", tiny_decoder=str(tmp_path / "taesd"), **settings)
    assert isinstance(tiny.guidance_decoder(latent_gen), vgd_module._TinyDecoder)
    x_tiny, _ = run(tiny, latent)
    assert x_tiny.shape == x_vae.shape == (len(models["masks"]), 1, 16, 16)
    assert torch.isfinite(x_tiny).all() and not torch.equal(x_tiny, x_vae)
    with pytest.raises(ConfigError, match="tiny_decoder"):
        run(vgd(decoder="tiny", **settings), latent)
    # pixel space: the lever changes nothing (and needs no AutoencoderTiny)
    pixel = {"k": 0.3, "time_travel": 0}
    assert torch.equal(run(vgd(decoder="tiny", **pixel), models)[0], run(vgd(**pixel), models)[0])


def test_vgd_needs_f_theta(models):
    with pytest.raises(ValueError, match="value_model"):
        vgd().sample(models["gen"], models["masks"], models["seeds"], None)


def test_bench_prints_one_json_line_per_run(models, repo_root, capsys):
    import json

    from segsynth.bench import main

    from segsynth.miner import train_miner

    root = models["root"]
    train_miner({"channels": [4, 8], "steps": 2, "batch_size": 2, "lr": 1e-3, "beta": 0.001, "kappa_up": 0.5,
                 "rollout_steps": 2}, root / "data", root / "gen", root / "seg", root / "miner", seed=0,
                schedule={"steps": 2, "eta": 0.0, "guidance_scale": 1.0})
    common = ["sampling", "--config", str(repo_root / "config.yaml"), "--generator", str(root / "gen"),
              "--segmenter", str(root / "seg"), "--data", str(root / "data"), "--miner", str(root / "miner"),
              "--steps", "2", "--n-images", "3", "--batch-size", "3", "--repeats", "1"]
    assert main(common) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert {"ddim_s_per_image", "vgd_s_per_image", "miner_s_per_image", "ratio", "miner_ratio", "ddim_value",
            "vgd_value", "ddim_seg_loss", "miner_seg_loss", "ddim_adherence", "vgd_adherence"} <= set(result)
    assert all(0.0 <= result[f"{name}_adherence"] <= 100.0 for name in ("ddim", "vgd", "miner"))
    assert result["ratio"] > 0 and result["miner_ratio"] > 0 and result["steps"] == 2 and result["n_images"] == 3
    assert main(common + ["--levers", "--only", "detached"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["variant"] for r in rows] == ["naive", "detached", "no_time_travel"]
    assert all({"s_per_image", "ratio", "value", "rd_value", "gain_kept_naive", "gain_kept_no_time_travel"}
               <= set(r) for r in rows)
    missing = ["sampling", "--config", str(repo_root / "config.yaml"), "--generator", str(root / "nope")]
    assert main(missing) == 2 and "make demo" in capsys.readouterr().err


def test_bench_adherence_is_the_value_models_dice_against_the_masks():
    from segsynth.bench import mean_terms

    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, 2:6, 2:6] = 1
    masks[1, :, 4:] = 2
    images = torch.zeros(2, 1, 8, 8)

    def model_predicting(labels):
        return lambda x: 10.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()

    assert mean_terms(model_predicting(masks), images, masks)["adherence"] == pytest.approx(100.0)
    half = masks.clone()
    half[0] = 0          # image 0 misses its class-1 square: Dice 0; image 1 is right: Dice 1
    assert mean_terms(model_predicting(half), images, masks)["adherence"] == pytest.approx(50.0)


def test_bench_levers_name_valid_vgd_settings():
    from segsynth.bench import LEVERS, SAMPLERS_TO_TIME

    assert {"ddim", "vgd", "miner"} <= set(SAMPLERS_TO_TIME) and "naive" in LEVERS
    for overrides, batch in LEVERS.values():
        vgd_options(overrides)
        assert batch is None or batch >= 1
    assert math.isfinite(VGD_DEFAULTS["k"])
