"""The Adversariality Miner: exact RD at initialisation, the KL term, training gain, bounded shift, resume."""

import math

import numpy as np
import pytest
import torch

from segsynth.miner import AdversarialityMiner, gaussian_kl, stop_gradient_rollout, train_miner
from segsynth.sampling import build_sampler
from segsynth.sampling.base import noise_seed
from segsynth.sampling.ddim import DDIMTrajectory
from segsynth.sampling.value import value_terms

SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 20,
             "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}
MINER = {"channels": [8, 16], "steps": 40, "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "beta": 0.001,
         "kappa_up": 5.0, "rollout_steps": 4, "eta": 0.0, "grad_clip": 1.0, "mu_bound": 3.0, "sigma_bound": 0.9,
         "checkpoint_every": 10}
# κ_up above the tiny f_θ's loss (≈ 0.9 nats on RD samples): with the paper's 0.5 every sample would already be
# saturated and the clipped objective flat — which test_a_saturated_objective_leaves_the_miner_at_rd checks.
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
                        seed=0)
    return stats, AdversarialityMiner.load(models["root"] / "miner")


def miner_sampler(miner):
    return build_sampler("miner", SAMPLING).attach_miner(miner)


def test_an_untrained_miner_reproduces_rd_to_the_bit(models):
    miner = AdversarialityMiner(models["gen"].channels, (8, 16))
    rd, _ = build_sampler("rd", {**SAMPLING, "sampler": "ddim"}).sample(models["gen"], models["masks"][:4],
                                                                      models["seeds"][:4])
    images, records = miner_sampler(miner).sample(models["gen"], models["masks"][:4], models["seeds"][:4])
    assert torch.equal(images, rd)
    assert all(r["miner_max_shift"] == 0.0 and r["miner_kl"] == 0.0 for r in records)


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
    traj = DDIMTrajectory(gen, masks, seeds, 4, 0.0, 1.0, initial_noise=x_T)
    x_s = stop_gradient_rollout(traj)
    (grad,) = torch.autograd.grad(x_s.sum(), x_T)
    s = traj.scheduler
    expected = math.sqrt(float(s.final_alpha_cumprod) / float(s.alphas_cumprod[int(traj.timesteps[0])]))
    assert torch.allclose(grad, torch.full_like(grad, expected))
    # the value is the plain no-grad rollout's
    plain = DDIMTrajectory(gen, masks, seeds, 4, 0.0, 1.0, initial_noise=x_T.detach())
    with torch.no_grad():
        for t in plain.timesteps:
            plain.x = plain.step(plain.noise(plain.x, t), t, plain.x).prev_sample
    assert torch.equal(x_s.detach(), plain.x)


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
                          stop_after=20)
    assert stopped == {"steps": 20, "stopped": True} and not out.exists()
    stats = train_miner(MINER, models["data"], models["gen_dir"], models["seg_dir"], out, seed=0)
    assert stats["resumed_from"] == 20 and stats["steps"] == MINER["steps"]
    resumed = AdversarialityMiner.load(out).state_dict()
    for name, value in trained[1].state_dict().items():
        assert torch.equal(value, resumed[name]), name


def test_a_saturated_objective_leaves_the_miner_at_rd(models):
    """min(κ_up, ℓ_seg) is flat where ℓ_seg > κ_up: with every sample past κ_up only the KL term acts."""
    out = models["root"] / "saturated"
    train_miner({**MINER, "steps": 5, "kappa_up": 1e-3}, models["data"], models["gen_dir"], models["seg_dir"], out,
                seed=0)
    _, records = miner_sampler(AdversarialityMiner.load(out)).sample(models["gen"], models["masks"][:2],
                                                                     models["seeds"][:2])
    assert all(r["miner_max_shift"] == 0.0 for r in records)
