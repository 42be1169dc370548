"""The Adversariality Miner: fresh resampled seeds, the deployed schedule's prefix as training rollout, the KL
term, training gain, bounded shift, resume."""

import copy
import math

import numpy as np
import pytest
import torch

from segsynth.generator import MaskToImageGenerator
from segsynth.miner import (AdversarialityMiner, full_gradient_prefix, gaussian_kl, miner_objective, miner_reward,
                            resample_seed, stop_gradient_prefix, train_miner)
from segsynth.sampling import build_sampler
from segsynth.sampling.base import NoiseStream, noise_seed
from segsynth.sampling.ddim import DDIMTrajectory
from segsynth.sampling.value import value_terms

SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 20,
             "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}
MINER = {"channels": [8, 16], "steps": 40, "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "beta": 0.001,
         "kappa_up": 5.0, "rollout_steps": 4, "grad_clip": 1.0, "mu_bound": 3.0, "sigma_bound": 0.9,
         "checkpoint_every": 10}
# κ_up above the bounded adversariality's range (< 1): the tiny f_θ's RD samples are already past the paper's 0.5,
# where the clipped objective is flat — which test_a_saturated_objective_leaves_the_miner_at_rd checks.
SAMPLING = {"sampler": "miner", "steps": 6, "eta": 0.2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import train_tiny_models

    from segsynth.data.canonical import load_split
    from segsynth.generator import MaskToImageGenerator
    from segsynth.segmenters import load_segmenter

    root = tmp_path_factory.mktemp("miner")
    data, gen, seg = train_tiny_models(root, SEGMENTER)
    masks = torch.from_numpy(load_split(data, "train").masks.copy())
    return {"data": data, "gen_dir": gen, "seg_dir": seg, "root": root,
            "gen": MaskToImageGenerator.load(gen), "f": load_segmenter(seg).as_value_model(), "masks": masks,
            "seeds": [noise_seed(5, i) for i in range(len(masks))]}


@pytest.fixture(scope="module")
def trained(models):
    stats = train_miner(MINER, models["data"], models["gen_dir"], models["seg_dir"], models["root"] / "miner",
                        seed=0, schedule=SAMPLING)
    return stats, AdversarialityMiner.load(models["root"] / "miner")


def miner_sampler(miner):
    return build_sampler("miner", SAMPLING).attach_miner(miner)


def test_the_resampled_seed_is_a_fresh_draw_not_the_probe(models, trained):
    gen, masks, seeds = models["gen"], models["masks"][:4], models["seeds"][:4]
    stream = NoiseStream(seeds, gen.latent_shape(4), torch.device("cpu"))
    probe, fresh = stream.next(), stream.next()
    for miner in (AdversarialityMiner(gen.channels, (8, 16)), trained[1]):
        traj = DDIMTrajectory.from_params(gen, masks, seeds, SAMPLING)
        with torch.no_grad():
            seed, delta_mu, delta_sigma = resample_seed(traj, miner)
        assert torch.equal(traj.x_T, probe)
        # x_T^r = Δμ + √(1 + ΔΣ)·ε' with ε' the stream's next draw (an untrained Miner: x_T^r = ε' exactly)
        torch.testing.assert_close((seed - delta_mu) / torch.sqrt(1 + delta_sigma), fresh)
        assert not torch.allclose(seed, probe)
    # the untrained Miner's images are RD's from the fresh draw: same sampler, one draw further down the stream
    untrained, records = miner_sampler(AdversarialityMiner(gen.channels, (8, 16))).sample(gen, masks, seeds)
    assert all(r["miner_max_shift"] == 0.0 and r["miner_kl"] == 0.0 for r in records)
    assert {"miner_seed_mean", "miner_seed_std"} <= set(records[0])
    traj = DDIMTrajectory.from_params(gen, masks, seeds, SAMPLING)
    traj.x = traj.next_noise() * traj.scheduler.init_noise_sigma
    with torch.no_grad():
        for t in traj.timesteps:
            traj.x = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
    assert torch.equal(untrained, traj.decode())


def test_the_training_rollout_is_the_deployed_schedules_prefix(models, monkeypatch):
    """Same timesteps, guidance scales and η as the sampler that deploys the Miner, first rollout_steps only."""
    from diffusers import DDIMScheduler

    schedule = {"steps": 6, "eta": 0.5, "guidance_scale": 2.0}
    calls, etas = [], []
    guided, step = MaskToImageGenerator.guided_noise, DDIMScheduler.step

    def spy_guided(self, x_t, t, cond, prompt, uncond, guidance_scale, mask_guidance_scale=1.0):
        calls.append((int(t), guidance_scale))
        return guided(self, x_t, t, cond, prompt, uncond, guidance_scale, mask_guidance_scale)

    def spy_step(self, *args, eta=0.0, **kwargs):
        etas.append(eta)
        return step(self, *args, eta=eta, **kwargs)

    monkeypatch.setattr(MaskToImageGenerator, "guided_noise", spy_guided)
    monkeypatch.setattr(DDIMScheduler, "step", spy_step)
    gen, masks, seeds = models["gen"], models["masks"][:2], models["seeds"][:2]
    miner = AdversarialityMiner(gen.channels, (8, 16))
    terms = miner_objective(gen, models["f"], miner, masks, seeds, schedule, rollout_steps=3, kappa_up=0.5,
                            beta=0.001)
    deployed = DDIMTrajectory.from_params(gen, masks, seeds, schedule).timesteps.tolist()
    T = gen.noise_scheduler.config.num_train_timesteps - 1
    assert calls == [(T, 2.0)] + [(t, 2.0) for t in deployed[:3]]
    assert etas == [0.5] * 3
    assert torch.equal(terms["reward"], miner_reward(terms["seg_loss"], "bounded_ce"))
    assert (terms["reward"] < 1).all()


def test_the_residual_attention_miner_starts_at_zero_and_round_trips(tmp_path):
    miner = AdversarialityMiner.from_config(4, {"network": "resunet", "channels": [8, 16, 16]})
    assert any("attentions" in name for name, _ in miner.named_parameters())  # bottleneck self-attention
    delta_mu, delta_sigma = miner(torch.randn(2, 4, 8, 8))
    assert delta_mu.shape == (2, 4, 8, 8) and not delta_mu.any() and not delta_sigma.any()
    torch.nn.init.normal_(miner.head.weight)
    miner.save(tmp_path)
    loaded = AdversarialityMiner.load(tmp_path)
    score = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded(score), miner(score))


def test_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu = 0.5 * torch.randn(1, 1, 4, 4)
    sigma = 0.8 * torch.tanh(torch.randn(1, 1, 4, 4))
    std = torch.sqrt(1 + sigma)
    x = mu + std * torch.randn(200_000, 1, 4, 4)
    log_q = torch.distributions.Normal(mu, std).log_prob(x).flatten(1).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    monte_carlo = float((log_q - log_p).mean())
    closed = float(gaussian_kl(mu, sigma)[0])
    assert closed > 0.5
    assert abs(monte_carlo - closed) < 0.02 * closed + 0.02
    assert float(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max()) == 0.0


def test_the_temporal_stop_gradient_jacobian_is_the_closed_form_constant(models):
    gen, masks, seeds = models["gen"], models["masks"][:2], models["seeds"][:2]
    x_T = torch.randn(gen.latent_shape(2), requires_grad=True)
    traj = DDIMTrajectory(gen, masks, seeds, 6, 0.0, 1.0, initial_noise=x_T)
    x0 = stop_gradient_prefix(traj, 3)
    (grad,) = torch.autograd.grad(x0.sum(), x_T)
    expected = 1.0 / math.sqrt(float(traj.scheduler.alphas_cumprod[int(traj.timesteps[0])]))
    assert torch.allclose(grad, torch.full_like(grad, expected))
    # the value is the Tweedie x̂0 of the third step of the plain no-grad rollout
    plain = DDIMTrajectory(gen, masks, seeds, 6, 0.0, 1.0, initial_noise=x_T.detach())
    with torch.no_grad():
        for t in plain.timesteps[:3]:
            out = plain.step(plain.noise(plain.x, t), t, plain.x)
            plain.x = out.prev_sample
    assert torch.equal(x0.detach(), out.pred_original_sample)


def test_the_full_rollout_gradient_is_the_chain_rule_through_the_denoiser(models):
    """``rollout_gradient: full``: the same x̂0 as the stop-gradient rule, but its gradient is the rollout's own
    derivative (checked against central finite differences along random directions), not 1/√ᾱ·I."""
    # in float64, so that the difference quotient is exact to far below the tolerance
    gen, masks, seeds = copy.deepcopy(models["gen"]).double(), models["masks"][:2], models["seeds"][:2]
    x_T = torch.randn(gen.latent_shape(2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def rollout(x, rule):
        traj = DDIMTrajectory(gen, masks, seeds, 6, 0.0, 1.0, initial_noise=x)
        traj.cond = traj.cond.double()  # the mask's one-hot is made in float32
        return rule(traj, 3)

    x = x_T.clone().requires_grad_(True)
    x0 = rollout(x, full_gradient_prefix)
    assert torch.equal(x0.detach(), rollout(x_T, stop_gradient_prefix).detach())
    # x̂0 is clipped to [−1, 1]: weigh only unclipped pixels, so the difference quotient sees no kink
    weights = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * (
        x0.detach().abs() < 0.95)
    (grad,) = torch.autograd.grad((x0 * weights).sum(), x)
    x = x_T.clone().requires_grad_(True)
    (stop_grad,) = torch.autograd.grad((rollout(x, stop_gradient_prefix) * weights).sum(), x)
    assert (grad - stop_grad).norm() > 0.1 * stop_grad.norm()  # the denoiser's response is in it
    h = 1e-5
    for k in range(3):
        v = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64)
        with torch.no_grad():
            diff = ((rollout(x_T + h * v, full_gradient_prefix) - rollout(x_T - h * v, full_gradient_prefix))
                    * weights).sum() / (2 * h)
        assert float((grad * v).sum()) == pytest.approx(float(diff), rel=1e-3)


def test_an_unknown_rollout_gradient_is_refused(models):
    with pytest.raises(ValueError, match="rollout_gradient"):
        miner_objective(models["gen"], models["f"], AdversarialityMiner(models["gen"].latent_shape(1)[1]),
                        models["masks"][:2], models["seeds"][:2], SAMPLING, 2, 0.5, 0.001, rollout_gradient="exact")


def test_training_raises_the_segmentation_loss_of_samples_with_a_bounded_shift(models, trained):
    stats, miner = trained
    assert stats["steps"] == MINER["steps"]
    gen, f, masks, seeds = models["gen"], models["f"], models["masks"], models["seeds"]
    rd, _ = build_sampler("rd", {**SAMPLING, "sampler": "ddim"}).sample(gen, masks, seeds)
    mined, records = miner_sampler(miner).sample(gen, masks, seeds)
    with torch.no_grad():
        rd_loss = value_terms(f(rd), masks)["seg_loss"].mean()
        miner_loss = value_terms(f(mined), masks)["seg_loss"].mean()
    assert miner_loss > rd_loss
    shifts = np.array([r["miner_max_shift"] for r in records])
    assert (shifts > 0).all() and (shifts <= MINER["mu_bound"]).all()
    assert all(r["miner_max_delta_sigma"] < MINER["sigma_bound"] for r in records)


def test_same_seed_same_miner_samples(models, trained):
    _, miner = trained
    a, _ = miner_sampler(miner).sample(models["gen"], models["masks"][:3], models["seeds"][:3])
    b, _ = miner_sampler(miner).sample(models["gen"], models["masks"][:3], models["seeds"][:3])
    assert torch.equal(a, b)


def test_a_killed_training_resumes_to_the_same_miner(models, trained):
    out = models["root"] / "resumed"
    stopped = train_miner(MINER, models["data"], models["gen_dir"], models["seg_dir"], out, seed=0,
                          schedule=SAMPLING, stop_after=20)
    assert stopped == {"steps": 20, "stopped": True} and not out.exists()
    stats = train_miner(MINER, models["data"], models["gen_dir"], models["seg_dir"], out, seed=0, schedule=SAMPLING)
    assert stats["resumed_from"] == 20 and stats["steps"] == MINER["steps"]
    for key in ("final_reward", "final_seg_loss", "final_kl"):  # the records before the kill were checkpointed
        assert stats[key] == trained[0][key], key
    resumed = AdversarialityMiner.load(out).state_dict()
    for name, value in trained[1].state_dict().items():
        assert torch.equal(value, resumed[name]), name


def test_a_saturated_objective_leaves_the_miner_at_rd(models):
    """min(κ_up, ℓ_seg) is flat where ℓ_seg > κ_up: with every sample past κ_up only the KL term acts."""
    out = models["root"] / "saturated"
    train_miner({**MINER, "steps": 5, "kappa_up": 1e-3}, models["data"], models["gen_dir"], models["seg_dir"], out,
                seed=0, schedule=SAMPLING)
    _, records = miner_sampler(AdversarialityMiner.load(out)).sample(models["gen"], models["masks"][:2],
                                                                     models["seeds"][:2])
    assert all(r["miner_max_shift"] == 0.0 for r in records)
