"""The Adversariality Miner (adversariality-miner.md, CVPR 2026): learn a shift of the initial noise of a frozen
mask-to-image generator so that unmodified DDIM lands on samples the frozen segmenter f_θ gets wrong.

- M_ξ reads the stop-gradient initial score of the frozen generator at a probe seed x_T,
  S_init = sg(s_φ(x_T, T | ŷ)), and predicts (Δμ, ΔΣ); the resampled seed is x_T^r = Δμ + √(1 + ΔΣ) ⊙ ε', a
  draw from N(Δμ, I + ΔΣ) with ε' a fresh standard-normal draw of the sample's own stream (the paper's code
  draws it; reusing the probe would tie the seed to the score it was chosen from). The output head is
  zero-initialised, so an untrained Miner samples x_T^r = ε': RD's distribution, one draw further down the
  stream.
- Objective (maximised): E[min(κ_up, A(f_θ(x̂0^r), ŷ))] − β·KL(N(Δμ, I+ΔΣ) ‖ N(0, I)), with the closed-form KL
  of :func:`gaussian_kl` and the adversariality A = 1 − exp(−ℓ_seg) (:func:`miner_reward`; the paper's code
  bounds it so κ_up = 0.5 reads the same on every dataset; raw ℓ_seg is the ``reward: ce`` option).
- Training rollouts are the deployed schedule's prefix (the paper's code: the first 10 of the 50 DDIM steps
  it samples with, at the same CFG scale and η), scored on the Tweedie estimate x̂0 of the last step run.
  The method's steps, η and guidance scales reach the train_miner job as its ``schedule``
  (segsynth.config.miner_schedule), so changing them retrains the Miner.
- Temporal stop-gradient: the denoiser is queried without gradient and the DDIM update stays differentiable,
  so ∂x̂0/∂x_T^r = 1/√ᾱ_{t_0} (:func:`stop_gradient_prefix`, attached in one step without activation memory).

Choices where the paper leaves a detail open (said in the config and README too):

- s_φ(x_T, T) = −ε_φ(x_T, T)/σ_T; M_ξ is fed ε_φ itself (a constant factor apart), conditional on the mask,
  with the schedule's classifier-free guidance, at T = the last training timestep.
- M_ξ is a small MONAI UNet over S_init followed by a zero-initialised 1×1 convolution to (a, b);
  Δμ = mu_bound·tanh(a) and ΔΣ = sigma_bound·tanh(b) with sigma_bound < 1, so 1 + ΔΣ > 0 and the shift is
  bounded by construction.
- ℓ_seg is f_θ's mean pixel cross-entropy (natural log) against the conditioning mask; KL is summed over the
  dimensions of x_T (the true divergence between the two Gaussians) and averaged over the batch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import science
from .data.canonical import load_split
from .errors import InputDataError
from .generator import MaskToImageGenerator
from .io import atomic_dir, write_json
from .precision import autocast, compute_dtype, configure, grad_scaler
from .sampling.ddim import DDIMTrajectory
from .sampling.value import value_terms
from .training import (Checkpointer, TrainingRecords, claim_checkpoint_dir, default_device, inputs_fingerprint,
                       releases_unused_claims, set_torch_threads, step_rng)

log = logging.getLogger(__name__)

MINER_FILE = "miner.pt"
META_FILE = "miner.json"


def gaussian_kl(delta_mu: torch.Tensor, delta_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(Δμ, diag(1 + ΔΣ)) ‖ N(0, I)) per sample, summed over dimensions:
    ½ Σ_i [(1 + ΔΣ_i) + Δμ_i² − 1 − log(1 + ΔΣ_i)]."""
    var = 1.0 + delta_sigma
    return 0.5 * (var + delta_mu.pow(2) - 1.0 - torch.log(var)).flatten(1).sum(1)


class AdversarialityMiner(torch.nn.Module):
    """M_ξ: initial score S_init (B, C, h, w) → (Δμ, ΔΣ), each (B, C, h, w), bounded; zero at initialisation."""

    def __init__(self, channels: int, features=(16, 32), mu_bound: float = 1.0, sigma_bound: float = 0.3,
                 network: str = "monai_unet"):
        super().__init__()
        if not 0 < sigma_bound < 1:
            raise ValueError(f"sigma_bound must lie in (0, 1) so that 1 + ΔΣ > 0, got {sigma_bound}")
        features = tuple(int(f) for f in features)
        self.config = {"channels": int(channels), "features": list(features), "mu_bound": float(mu_bound),
                       "sigma_bound": float(sigma_bound), "network": network}
        if network == "monai_unet":  # the small one, for CPUs
            from monai.networks.nets import UNet

            self.body = UNet(spatial_dims=2, in_channels=channels, out_channels=features[0], channels=features,
                             strides=(2,) * (len(features) - 1), num_res_units=1)
        elif network == "resunet":
            # The paper code's kind of network: a residual UNet with self-attention at the bottleneck (diffusers'
            # UNet2DModel, its mid block attends; run at a fixed timestep, as M_ξ has none).
            from diffusers import UNet2DModel

            self.body = UNet2DModel(in_channels=channels, out_channels=features[0], block_out_channels=features,
                                    down_block_types=("DownBlock2D",) * len(features),
                                    up_block_types=("UpBlock2D",) * len(features), layers_per_block=1,
                                    norm_num_groups=math.gcd(*features, 32))
        else:
            raise ValueError(f"unknown Miner network {network!r} (monai_unet | resunet)")
        self.head = torch.nn.Conv2d(features[0], 2 * channels, kernel_size=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, initial_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config["network"] == "resunet":
            features = self.body(initial_score, 0, return_dict=False)[0]
        else:
            features = self.body(initial_score)
        a, b = self.head(F.silu(features)).chunk(2, dim=1)
        return self.config["mu_bound"] * torch.tanh(a), self.config["sigma_bound"] * torch.tanh(b)

    @classmethod
    def from_config(cls, channels: int, cfg: dict) -> "AdversarialityMiner":
        """A fresh M_ξ over ``channels`` noise channels from a config ``miner`` entry."""
        return cls(channels, cfg.get("channels", [16, 32]), cfg.get("mu_bound", 1.0), cfg.get("sigma_bound", 0.3),
                   cfg.get("network", "monai_unet"))

    @staticmethod
    def resample(x_T: torch.Tensor, delta_mu: torch.Tensor, delta_sigma: torch.Tensor) -> torch.Tensor:
        """x_T^r = Δμ + √(1 + ΔΣ) ⊙ x_T: the sample's own N(0, I) draw moved to N(Δμ, I + ΔΣ)."""
        return delta_mu + torch.sqrt(1.0 + delta_sigma) * x_T

    def save(self, directory, stats: dict | None = None) -> None:
        directory = Path(directory)
        torch.save(self.state_dict(), directory / MINER_FILE)
        write_json(directory / META_FILE, {"config": self.config, "stats": stats or {}})

    @classmethod
    def load(cls, directory) -> "AdversarialityMiner":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise InputDataError(meta_path, "missing: not a trained Miner directory (run the train_miner rule)")
        config = json.loads(meta_path.read_text())["config"]
        miner = cls(config["channels"], config["features"], config["mu_bound"], config["sigma_bound"],
                    config.get("network", "monai_unet"))
        miner.load_state_dict(torch.load(directory / MINER_FILE, map_location="cpu", weights_only=True))
        miner.requires_grad_(False)
        return miner.eval()


def initial_score(traj: DDIMTrajectory) -> torch.Tensor:
    """S_init = sg(ε_φ(x_T, T | ŷ)) at T = the last training timestep, with the trajectory's classifier-free
    guidance (the Miner paper's code scores the probe at the CFG scale it trains and samples with)."""
    # made on the device (a Python int would be copied to the GPU at every call)
    t = torch.full((), traj.generator.noise_scheduler.config.num_train_timesteps - 1, device=traj.x_T.device)
    with torch.no_grad():
        return traj.noise(traj.x_T, t)


def resample_seed(traj: DDIMTrajectory, miner: "AdversarialityMiner") -> tuple[torch.Tensor, ...]:
    """The Miner's step of a trajectory: S_init at the probe x_T → (Δμ, ΔΣ) → x_T^r = Δμ + √(1 + ΔΣ)⊙ε' with ε'
    the next fresh draw of each sample's stream (not the probe: the resampled seed is a new draw from
    N(Δμ, I + ΔΣ)). The trajectory restarts from x_T^r; returns (x_T^r, Δμ, ΔΣ)."""
    delta_mu, delta_sigma = miner(initial_score(traj))
    seed = miner.resample(traj.next_noise(), delta_mu, delta_sigma)
    traj.x = seed * traj.scheduler.init_noise_sigma
    return seed, delta_mu, delta_sigma


def stop_gradient_prefix(traj: DDIMTrajectory, steps: int) -> torch.Tensor:
    """Run the first ``steps`` DDIM updates of ``traj`` from its current x (which may carry a graph to the
    resampled seed) without a graph, and return the Tweedie estimate x̂0 of the last one carrying the temporal
    stop-gradient Jacobian.

    With the denoiser's ε treated as a constant, every DDIM update is x_{t'} = √(ᾱ_{t'}/ᾱ_t)·x_t + const and
    x̂0 = x_t/√ᾱ_t − const, so ∂x̂0/∂x_{t_0} = 1/√ᾱ_{t_0} whatever the prefix length and η; attaching it in one
    step is the gradient of the chained updates without their activation memory (and, like the paper's
    closed form, it ignores x̂0 clipping)."""
    x_start = traj.x
    with torch.no_grad():
        x0 = _prefix_x0(traj, x_start.detach(), steps)
    jacobian = 1.0 / math.sqrt(float(traj.scheduler.alphas_cumprod[int(traj.timesteps[0])]))
    return x0 + jacobian * (x_start - x_start.detach())


def full_gradient_prefix(traj: DDIMTrajectory, steps: int) -> torch.Tensor:
    """The first ``steps`` DDIM updates of ``traj`` with the gradient through the denoiser as well (the chain
    rule of the rollout, ∂ε_φ/∂x_t included), returning the last step's Tweedie x̂0.

    Why an option beside the paper's stop-gradient: that rule's ∂x̂0/∂x_T^r = 1/√ᾱ_{t_0}·I is the gradient of
    f_θ's loss on the *image* pixels, amplified. In SD's latent space (the paper's backbones) it reaches the
    seed through the VAE decoder, which only passes what the decoder can render; a pixel-space generator has no
    decoder, so it is a pixel attack on x̂0, which DDIM mostly denoises away except for the seed's variance. The
    full Jacobian includes the denoiser's own response (at high noise it predicts most of x_t as noise, so
    white-noise directions largely cancel). Measured (README, "The full gradient, and what FID resolves on the
    default"): on the default M_ξ then hardly moves; on the Kvasir preset it finds a global shift of the seed's
    mean that breaks the masks. Neither is the paper's native adversariality, so it stays an option."""
    return _prefix_x0(traj, traj.x, steps)


def _prefix_x0(traj: DDIMTrajectory, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The Tweedie x̂0 of the ``steps``-th DDIM update of ``traj`` from ``x`` (traj.x is left as it is)."""
    x0 = None
    for t in traj.timesteps[:steps]:
        out = traj.step(traj.noise(x, t), t, x)
        x, x0 = out.prev_sample, out.pred_original_sample
    return x0


#: how a training rollout's x̂0 reaches the seed (config ``miner.rollout_gradient``)
ROLLOUT_GRADIENTS = {"stop_gradient": stop_gradient_prefix, "full": full_gradient_prefix}


def miner_reward(seg_loss: torch.Tensor, reward: str) -> torch.Tensor:
    """The adversariality the Miner maximises: ``bounded_ce`` = 1 − exp(−ℓ_seg) in [0, 1), the Miner paper
    code's training reward (κ_up is read on it), or ``ce`` = ℓ_seg itself."""
    if reward == "bounded_ce":
        return 1.0 - torch.exp(-seg_loss)
    if reward == "ce":
        return seg_loss
    raise ValueError(f"unknown Miner reward {reward!r} (bounded_ce | ce)")


def miner_objective(generator, value_model, miner, masks, noise_seeds: list[int], schedule: dict,
                    rollout_steps: int, kappa_up: float, beta: float, reward: str = "bounded_ce",
                    rollout_gradient: str = "stop_gradient") -> dict:
    """One batch of the objective: probe x_T and resample it as the deployed sampler does (``schedule``: the
    miner method's steps, η and guidance scales), run the first ``rollout_steps`` of that schedule with the
    ``rollout_gradient`` rule (:data:`ROLLOUT_GRADIENTS`), score f_θ on their x̂0; clipped adversariality and
    KL, all per sample."""
    if rollout_gradient not in ROLLOUT_GRADIENTS:
        raise ValueError(f"unknown rollout_gradient {rollout_gradient!r} ({' | '.join(ROLLOUT_GRADIENTS)})")
    traj = DDIMTrajectory.from_params(generator, masks, noise_seeds, schedule)
    _, delta_mu, delta_sigma = resample_seed(traj, miner)
    x0 = ROLLOUT_GRADIENTS[rollout_gradient](traj, rollout_steps)
    seg_loss = value_terms(value_model(generator.decode(x0).clamp(-1.0, 1.0)), masks)["seg_loss"]
    score = miner_reward(seg_loss, reward)
    kl = gaussian_kl(delta_mu, delta_sigma)
    return {"objective": torch.clamp(score, max=kappa_up) - beta * kl, "reward": score,
            "seg_loss": seg_loss, "kl": kl, "shift": delta_mu.abs().flatten(1).amax(1),
            "delta_sigma": delta_sigma.abs().flatten(1).amax(1)}


#: the per-sample terms of :func:`miner_objective` that training logs (batch means)
TERMS = ("objective", "reward", "seg_loss", "kl", "shift", "delta_sigma")


@releases_unused_claims
def train_miner(cfg: dict, data_dir, generator_dir, value_model_dir, out_dir, seed: int, schedule: dict,
                checkpoint_dir=None, threads: int = 1, stop_after: int | None = None, precision: str = "fp32",
                cpu_autocast: bool = False) -> dict:
    """Train M_ξ against the frozen generator and f_θ on the training masks of ``data_dir``; save to ``out_dir``.

    ``schedule`` is the deployed sampling schedule (steps, eta, guidance_scale, mask_guidance_scale:
    segsynth.config.miner_schedule): training rollouts are its first ``cfg["rollout_steps"]`` steps.

    Step ``i`` draws its masks and noise from (seed, i) alone, so a resumed run is the run that was not killed.
    ``stop_after`` ends after that many steps with a checkpoint and no output (tests simulate a kill with it).
    ``precision`` (segsynth.precision): the frozen generator in the reduced dtype, the objective under autocast;
    M_ξ and its optimiser stay float32."""
    from .segmenters import load_segmenter

    set_torch_threads(threads)
    device = default_device()
    checkpoint_dir = claim_checkpoint_dir(
        checkpoint_dir or f"{out_dir}.ckpt",
        {"trainer": "miner", "cfg": science("miner", cfg), "seed": seed, "schedule": schedule, "precision": precision,
         "cpu_autocast": cpu_autocast, "inputs": inputs_fingerprint([data_dir, generator_dir, value_model_dir])})
    configure(precision, device)
    dtype = compute_dtype(precision, device, cpu_autocast)
    generator = MaskToImageGenerator.load(generator_dir).to(device, dtype).requires_grad_(False).eval()
    value_model = load_segmenter(value_model_dir).as_value_model().to(device).requires_grad_(False).eval()
    masks_all = torch.from_numpy(np.ascontiguousarray(load_split(data_dir, "train").masks))

    torch.manual_seed(seed)
    miner = AdversarialityMiner.from_config(generator.latent_shape(1)[1], cfg).to(device)
    optimizer = torch.optim.AdamW(miner.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    objects = {"miner": miner, "optimizer": optimizer}
    scaler = grad_scaler(dtype, device)
    if scaler.is_enabled():
        objects["scaler"] = scaler
    history: list[dict] = []
    objects["records"] = TrainingRecords(history=history)
    checkpointer = Checkpointer(checkpoint_dir, cfg.get("checkpoint_every", 50), objects)
    start = checkpointer.restore()
    steps, batch_size = cfg["steps"], cfg["batch_size"]
    pending: list[torch.Tensor] = []
    began = time.time()
    miner.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="miner", mininterval=10):
        idx = step_rng(seed, step).integers(0, len(masks_all), size=batch_size)
        masks = masks_all[idx].to(device)
        # each sample's noise stream, drawn from exactly as a synthesis job draws it (probe x_T, then ε')
        noise_seeds = [int(s) for s in step_rng(seed, step, stream=1).integers(0, 2**62, size=batch_size)]
        with autocast(dtype, device):
            terms = miner_objective(generator, value_model, miner, masks, noise_seeds, schedule,
                                    cfg["rollout_steps"], cfg["kappa_up"], cfg["beta"],
                                    cfg.get("reward", "bounded_ce"), cfg.get("rollout_gradient", "stop_gradient"))
        loss = -terms["objective"].float().mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(miner.parameters(), cfg.get("grad_clip", 1.0))
        scaler.step(optimizer)
        scaler.update()
        # batch means stay on the device; read every 25 steps (a read waits for the GPU)
        pending.append(torch.stack([terms[k].detach().float().mean() for k in TERMS]))
        done = step + 1
        if (done % 25 == 0 or done == steps or (stop_after is not None and done >= stop_after)
                or checkpointer.due(done, steps)):  # the records go into the checkpoint
            history.extend(dict(zip(TERMS, row)) for row in torch.stack(pending).tolist())
            pending.clear()
        if done % 25 == 0:
            recent = history[-25:]
            log.info("step %d/%d reward %.4f seg_loss %.4f kl %.3f max|Δμ| %.3f", done, steps,
                     np.mean([h["reward"] for h in recent]), np.mean([h["seg_loss"] for h in recent]),
                     np.mean([h["kl"] for h in recent]),
                     max(h["shift"] for h in recent))
        checkpointer.maybe_save(done, steps)
        if stop_after is not None and done >= stop_after:
            checkpointer.save(done)
            return {"steps": done, "stopped": True}

    miner.to("cpu").eval()
    tail = history[-25:]
    stats = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - began, 2),
             "schedule": schedule,
             "final_reward": float(np.mean([h["reward"] for h in tail])) if tail else None,
             "final_seg_loss": float(np.mean([h["seg_loss"] for h in tail])) if tail else None,
             "final_kl": float(np.mean([h["kl"] for h in tail])) if tail else None,
             "parameters": sum(p.numel() for p in miner.parameters())}
    with atomic_dir(out_dir) as tmp:
        miner.save(tmp, stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats
