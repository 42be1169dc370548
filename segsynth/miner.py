"""The Adversariality Miner (adversariality-miner.md, CVPR 2026): learn a shift of the initial noise of a frozen
mask-to-image generator so that unmodified DDIM lands on samples the frozen segmenter f_θ gets wrong.

- M_ξ reads the stop-gradient initial score of the frozen generator at the seed, S_init = sg(s_φ(x_T, T | ŷ)),
  and predicts (Δμ, ΔΣ); the resampled seed is x_T^r = Δμ + √(1 + ΔΣ) ⊙ x_T, a draw from N(Δμ, I + ΔΣ)
  that reuses the sample's own x_T as its standard-normal draw. The output head is zero-initialised, so an
  untrained Miner returns x_T^r = 0 + √1 ⊙ x_T = x_T exactly (RD to the bit).
- Objective (maximised): E[min(κ_up, ℓ_seg(f_θ(x_s^r), ŷ))] − β·KL(N(Δμ, I+ΔΣ) ‖ N(0, I)), with the
  closed-form KL of :func:`gaussian_kl`.
- Temporal stop-gradient: the denoiser is queried without gradient and the DDIM update stays differentiable,
  so ∂x_{t_prev}/∂x_t = √(ᾱ_prev/ᾱ_t) at every step and ∂x_s/∂x_T^r = √(ᾱ_s/ᾱ_T) — the paper's constant
  √(1/α_T) (ᾱ_s ≈ 1). :func:`stop_gradient_rollout` runs the rollout without a graph and attaches that
  constant Jacobian in one step, which is the same gradient as chaining the per-step updates and needs no
  activation memory; it also makes the gradient ignore the x̂0 clipping of pixel-space schedulers, as the
  paper's closed form does.

Choices where the paper leaves a detail open (said in the config and README too):

- s_φ(x_T, T) = −ε_φ(x_T, T)/σ_T; M_ξ is fed ε_φ itself (a constant factor apart), conditional on the mask,
  without classifier-free guidance, at T = the last training timestep — the same input whatever the
  sampling schedule, so a Miner trained on 10-step rollouts serves 25- or 50-step inference unchanged.
- M_ξ is a small MONAI UNet over S_init followed by a zero-initialised 1×1 convolution to (a, b);
  Δμ = mu_bound·tanh(a) and ΔΣ = sigma_bound·tanh(b) with sigma_bound < 1, so 1 + ΔΣ > 0 and the shift is
  bounded by construction.
- ℓ_seg is f_θ's mean pixel cross-entropy (natural log) against the conditioning mask, the scale on which
  κ_up = 0.5 and the paper's subset thresholds τ ∈ {0.3, 0.4, 0.5} are read; KL is summed over the
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

from .data.canonical import load_split
from .errors import InputDataError
from .generator import MaskToImageGenerator
from .io import atomic_dir, write_json
from .precision import autocast, compute_dtype, configure, grad_scaler
from .sampling.base import NoiseStream
from .sampling.ddim import DDIMTrajectory
from .sampling.value import value_terms
from .training import Checkpointer, default_device, set_torch_threads, step_rng

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

    def __init__(self, channels: int, features=(16, 32), mu_bound: float = 3.0, sigma_bound: float = 0.9):
        super().__init__()
        from monai.networks.nets import UNet

        if not 0 < sigma_bound < 1:
            raise ValueError(f"sigma_bound must lie in (0, 1) so that 1 + ΔΣ > 0, got {sigma_bound}")
        features = tuple(int(f) for f in features)
        self.config = {"channels": int(channels), "features": list(features), "mu_bound": float(mu_bound),
                       "sigma_bound": float(sigma_bound)}
        self.body = UNet(spatial_dims=2, in_channels=channels, out_channels=features[0], channels=features,
                         strides=(2,) * (len(features) - 1), num_res_units=1)
        self.head = torch.nn.Conv2d(features[0], 2 * channels, kernel_size=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, initial_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.head(F.silu(self.body(initial_score))).chunk(2, dim=1)
        return self.config["mu_bound"] * torch.tanh(a), self.config["sigma_bound"] * torch.tanh(b)

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
        miner = cls(config["channels"], config["features"], config["mu_bound"], config["sigma_bound"])
        miner.load_state_dict(torch.load(directory / MINER_FILE, map_location="cpu", weights_only=True))
        miner.requires_grad_(False)
        return miner.eval()


def initial_score(generator: MaskToImageGenerator, x_T: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """S_init = sg(ε_φ(x_T, T | ŷ)) at T = the last training timestep (conditional, no CFG)."""
    # made on the device (a Python int would be copied to the GPU at every call)
    t = torch.full((), generator.noise_scheduler.config.num_train_timesteps - 1, device=x_T.device)
    with torch.no_grad():
        return generator.predict_noise(x_T, t, generator.mask_condition(masks), generator.encode_prompt(masks))


def stop_gradient_rollout(traj: DDIMTrajectory) -> torch.Tensor:
    """Run ``traj`` from its x_T to x_s without a graph and return x_s carrying the temporal stop-gradient
    Jacobian ∂x_s/∂x_T = √(ᾱ_final/ᾱ_{t_first}) (``traj.x_T`` may require grad)."""
    scheduler = traj.scheduler
    x_T = traj.x
    x = x_T.detach()
    with torch.no_grad():
        for t in traj.timesteps:
            x = traj.step(traj.noise(x, t), t, x).prev_sample
    first = int(traj.timesteps[0])
    jacobian = math.sqrt(float(scheduler.final_alpha_cumprod) / float(scheduler.alphas_cumprod[first]))
    return x + jacobian * (x_T - x_T.detach())


def miner_objective(generator, value_model, miner, x_T, masks, rollout_steps: int, eta: float,
                    noise_seeds: list[int], kappa_up: float, beta: float) -> dict:
    """One batch of the objective: resample, stop-gradient rollout, clipped ℓ_seg and KL (all per sample)."""
    delta_mu, delta_sigma = miner(initial_score(generator, x_T, masks))
    x_T_r = miner.resample(x_T, delta_mu, delta_sigma)
    traj = DDIMTrajectory(generator, masks, noise_seeds, rollout_steps, eta, 1.0, initial_noise=x_T_r)
    x_s = stop_gradient_rollout(traj)
    seg_loss = value_terms(value_model(generator.decode(x_s)), masks)["seg_loss"]
    kl = gaussian_kl(delta_mu, delta_sigma)
    adversarial = torch.clamp(seg_loss, max=kappa_up)
    return {"objective": adversarial - beta * kl, "seg_loss": seg_loss, "kl": kl,
            "shift": delta_mu.abs().flatten(1).amax(1), "delta_sigma": delta_sigma.abs().flatten(1).amax(1)}


#: the per-sample terms of :func:`miner_objective` that training logs (batch means)
TERMS = ("objective", "seg_loss", "kl", "shift", "delta_sigma")


def train_miner(cfg: dict, data_dir, generator_dir, value_model_dir, out_dir, seed: int, checkpoint_dir=None,
                threads: int = 1, stop_after: int | None = None, precision: str = "fp32",
                cpu_autocast: bool = False) -> dict:
    """Train M_ξ against the frozen generator and f_θ on the training masks of ``data_dir``; save to ``out_dir``.

    Step ``i`` draws its masks and noise from (seed, i) alone, so a resumed run is the run that was not killed.
    ``stop_after`` ends after that many steps with a checkpoint and no output (tests simulate a kill with it).
    ``precision`` (segsynth.precision): the frozen generator in the reduced dtype, the objective under autocast;
    M_ξ and its optimiser stay float32."""
    from .segmenters import load_segmenter

    set_torch_threads(threads)
    device = default_device()
    checkpoint_dir = Path(checkpoint_dir or f"{out_dir}.ckpt")
    configure(precision, device)
    dtype = compute_dtype(precision, device, cpu_autocast)
    generator = MaskToImageGenerator.load(generator_dir).to(device, dtype).requires_grad_(False).eval()
    value_model = load_segmenter(value_model_dir).as_value_model().to(device).requires_grad_(False).eval()
    masks_all = torch.from_numpy(np.ascontiguousarray(load_split(data_dir, "train").masks))

    torch.manual_seed(seed)
    miner = AdversarialityMiner(generator.latent_shape(1)[1], cfg.get("channels", [16, 32]),
                                cfg.get("mu_bound", 3.0), cfg.get("sigma_bound", 0.9)).to(device)
    optimizer = torch.optim.AdamW(miner.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    objects = {"miner": miner, "optimizer": optimizer}
    scaler = grad_scaler(dtype, device)
    if scaler.is_enabled():
        objects["scaler"] = scaler
    checkpointer = Checkpointer(checkpoint_dir, cfg.get("checkpoint_every", 50), objects)
    start = checkpointer.restore()
    steps, batch_size = cfg["steps"], cfg["batch_size"]
    history: list[dict] = []
    pending: list[torch.Tensor] = []
    began = time.time()
    miner.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="miner", mininterval=10):
        idx = step_rng(seed, step).integers(0, len(masks_all), size=batch_size)
        masks = masks_all[idx].to(device)
        noise_seeds = [int(s) for s in step_rng(seed, step, stream=1).integers(0, 2**62, size=batch_size)]
        # x_T is the first draw of each sample's stream, exactly as a synthesis job draws it
        x_T = NoiseStream(noise_seeds, generator.latent_shape(batch_size), device).next()
        with autocast(dtype, device):
            terms = miner_objective(generator, value_model, miner, x_T, masks, cfg["rollout_steps"],
                                    cfg.get("eta", 0.0), noise_seeds, cfg["kappa_up"], cfg["beta"])
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
        if done % 25 == 0 or done == steps or (stop_after is not None and done >= stop_after):
            history.extend(dict(zip(TERMS, row)) for row in torch.stack(pending).tolist())
            pending.clear()
        if done % 25 == 0:
            recent = history[-25:]
            log.info("step %d/%d seg_loss %.4f kl %.3f max|Δμ| %.3f", done, steps,
                     np.mean([h["seg_loss"] for h in recent]), np.mean([h["kl"] for h in recent]),
                     max(h["shift"] for h in recent))
        checkpointer.maybe_save(done, steps)
        if stop_after is not None and done >= stop_after:
            checkpointer.save(done)
            return {"steps": done, "stopped": True}

    miner.to("cpu").eval()
    tail = history[-25:]
    stats = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - began, 2),
             "final_seg_loss": float(np.mean([h["seg_loss"] for h in tail])) if tail else None,
             "final_kl": float(np.mean([h["kl"] for h in tail])) if tail else None,
             "parameters": sum(p.numel() for p in miner.parameters())}
    with atomic_dir(out_dir) as tmp:
        miner.save(tmp, stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats
