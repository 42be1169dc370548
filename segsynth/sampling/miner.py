"""Synthesis with the Adversariality Miner: resample x_T with a trained M_ξ, then an unmodified DDIM rollout."""

from __future__ import annotations

import torch

from .base import Sampler, register_sampler
from .ddim import DDIMTrajectory


@register_sampler("miner")
class MinerSampler(Sampler):
    """x_T from the sample's own stream (as RD draws it) → S_init → (Δμ, ΔΣ) → x_T^r = Δμ + √(1+ΔΣ)⊙x_T →
    the same DDIM rollout as RD (steps, η, guidance scale and per-sample step noise unchanged).

    The trained Miner is attached with :meth:`attach_miner` (the synthesis job loads it from the train_miner
    rule's output). Records per sample: the max |Δμ|, max |ΔΣ| and the KL of its shifted seed distribution.
    The cost over RD is one conditional denoiser call at x_T and one pass of the small M_ξ per sample."""

    needs_miner = True

    def __init__(self, params: dict):
        super().__init__(params)
        self.miner = None

    def attach_miner(self, miner) -> "MinerSampler":
        self.miner = miner
        return self

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        from ..miner import gaussian_kl, initial_score

        if self.miner is None:
            raise ValueError("the miner sampler needs a trained Miner (attach_miner; the train_miner rule makes one)")
        traj = DDIMTrajectory.from_params(generator, masks, noise_seeds, self.params)
        miner = self.miner.to(traj.x_T.device)
        delta_mu, delta_sigma = miner(initial_score(generator, traj.x_T, masks))
        traj.x_T = miner.resample(traj.x_T, delta_mu, delta_sigma)
        traj.x = traj.x_T * traj.scheduler.init_noise_sigma
        for t in traj.timesteps:
            traj.x = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
        shift = delta_mu.abs().flatten(1).amax(1).tolist()
        widening = delta_sigma.abs().flatten(1).amax(1).tolist()
        kl = gaussian_kl(delta_mu, delta_sigma).tolist()
        records = [{"miner_max_shift": m, "miner_max_delta_sigma": d, "miner_kl": k}
                   for m, d, k in zip(shift, widening, kl)]
        return traj.decode(), records
