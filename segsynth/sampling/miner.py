"""Synthesis with the Adversariality Miner: resample x_T with a trained M_ξ, then an unmodified DDIM rollout."""

from __future__ import annotations

import torch

from .base import Sampler, register_sampler
from .ddim import DDIMTrajectory


@register_sampler("miner")
class MinerSampler(Sampler):
    """Probe x_T from the sample's own stream (as RD draws it) → S_init → (Δμ, ΔΣ) → x_T^r = Δμ + √(1+ΔΣ)⊙ε' with
    ε' the stream's next draw (segsynth.miner.resample_seed) → the same DDIM rollout as RD (steps, η, guidance
    scales unchanged; its step noise follows ε' in the stream).

    The trained Miner is attached with :meth:`attach_miner` (the synthesis job loads it from the train_miner
    rule's output). Records per sample: the max |Δμ|, max |ΔΣ|, the KL of its shifted seed distribution, and
    the mined seed's mean and standard deviation (a native seed stays near 0 and 1, as N(0, I) draws do).
    The cost over RD is one (guided) denoiser call at x_T and one pass of the small M_ξ per sample."""

    needs_miner = True

    def __init__(self, params: dict):
        super().__init__(params)
        self.miner = None

    def attach_miner(self, miner) -> "MinerSampler":
        self.miner = miner
        return self

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        from ..miner import gaussian_kl, resample_seed

        if self.miner is None:
            raise ValueError("the miner sampler needs a trained Miner (attach_miner; the train_miner rule makes one)")
        traj = DDIMTrajectory.from_params(generator, masks, noise_seeds, self.params)
        seed, delta_mu, delta_sigma = resample_seed(traj, self.miner.to(traj.x_T.device))
        for t in traj.timesteps:
            traj.x = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
        columns = {"miner_max_shift": delta_mu.abs().flatten(1).amax(1),
                   "miner_max_delta_sigma": delta_sigma.abs().flatten(1).amax(1),
                   "miner_kl": gaussian_kl(delta_mu, delta_sigma),
                   "miner_seed_mean": seed.flatten(1).mean(1), "miner_seed_std": seed.flatten(1).std(1)}
        columns = {name: values.tolist() for name, values in columns.items()}
        records = [dict(zip(columns, row)) for row in zip(*columns.values())]
        return traj.decode(), records
