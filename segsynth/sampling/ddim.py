"""Random DDIM sampling ("RD"): the unguided baseline every guided sampler is measured against."""

from __future__ import annotations

import torch

from .base import NoiseStream, Sampler, register_sampler


class DDIMTrajectory:
    """The state of one batch's DDIM rollout: conditioning, prompts, scheduler and per-sample noise streams.

    Guided samplers reuse it and change only what happens around ``step``.
    """

    def __init__(self, generator, masks: torch.Tensor, noise_seeds: list[int], steps: int, eta: float,
                 guidance_scale: float, initial_noise: torch.Tensor | None = None, mask_guidance_scale: float = 1.0):
        self.generator = generator
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.mask_guidance_scale = mask_guidance_scale
        device = generator.device
        self.scheduler = generator.sampling_scheduler()
        # The scheduler's timesteps stay on the CPU: DDIMScheduler.step looks its ᾱ up with them, and a CPU
        # index never waits for the GPU. The denoiser gets the same timestep as a device tensor, made here once
        # (a CPU timestep would be copied to the GPU, and the host would wait, at every UNet call).
        self.scheduler.set_timesteps(steps)
        self._device_timesteps = dict(zip(self.scheduler.timesteps.tolist(), self.scheduler.timesteps.to(device)))
        with torch.no_grad():
            self.cond = generator.mask_condition(masks)
            self.prompt = generator.encode_prompt(masks)
            guided = guidance_scale != 1.0 or mask_guidance_scale != 1.0
            self.uncond = generator.encode_prompt(masks, unconditional=True) if guided else None
        shape = generator.latent_shape(len(masks))
        # Each sample's stream: x_T first, then one σ_t·ε per step (η > 0), then whatever a sampler draws more
        # (re-noising, VAE encoding), in the order it asks; a sampler that replaces x_T (the Miner) keeps the
        # rest. Blocks of 1 + steps draws: what RD uses in one copy to the device (unused draws cost nothing).
        self.noise_stream = NoiseStream(noise_seeds, shape, device, ahead=1 + len(self.timesteps))
        x_T = self.noise_stream.next()
        self.x_T = x_T if initial_noise is None else initial_noise.to(device)
        self.x = self.x_T * self.scheduler.init_noise_sigma

    @classmethod
    def from_params(cls, generator, masks: torch.Tensor, noise_seeds: list[int], params: dict,
                    initial_noise: torch.Tensor | None = None) -> "DDIMTrajectory":
        """The trajectory a sampler's ``params`` (its method's config over the synthesis defaults) describe."""
        return cls(generator, masks, noise_seeds, params["steps"], params["eta"], params["guidance_scale"],
                   initial_noise, params.get("mask_guidance_scale", 1.0))

    @property
    def timesteps(self):
        return self.scheduler.timesteps

    def noise(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """ε_φ(x_t, t) with the trajectory's conditioning and guidance; ``t`` a timestep of the schedule, or any
        timestep per sample as a (B,) tensor (DiffAug's random t)."""
        if torch.is_tensor(t) and t.ndim:
            t = t.to(x_t.device)
        else:
            t = self._device_timesteps.get(int(t), t)
        return self.generator.guided_noise(x_t, t, self.cond, self.prompt, self.uncond, self.guidance_scale,
                                           self.mask_guidance_scale)

    def next_noise(self) -> torch.Tensor:
        """The next standard normal draw of every sample's stream, (B, ...) on the device."""
        return self.noise_stream.next()

    def step_noise(self) -> torch.Tensor | None:
        """The σ_t·ε noise of one DDIM step (eq. 10), drawn from each sample's own stream."""
        return self.next_noise() if self.eta > 0 else None

    def step(self, eps: torch.Tensor, t, x_t: torch.Tensor):
        """One DDIM update x_t → x̃_{t−1}; returns diffusers' output (prev_sample, pred_original_sample)."""
        return self.scheduler.step(eps, t, x_t, eta=self.eta, variance_noise=self.step_noise())

    def decode(self) -> torch.Tensor:
        return self.generator.decode(self.x).clamp(-1.0, 1.0)


@register_sampler("ddim")
class DDIMSampler(Sampler):
    """Unmodified DDIM from N(0, I) noise (diffusers' DDIMScheduler; steps, eta, guidance scale from config)."""

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        traj = DDIMTrajectory.from_params(generator, masks, noise_seeds, self.params)
        for t in traj.timesteps:
            traj.x = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
        return traj.decode(), [{} for _ in noise_seeds]
