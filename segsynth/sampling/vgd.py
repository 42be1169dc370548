"""Value-Guided Diffusion (VGD; Zhang et al., AAAI 2026): DDIM steered toward samples the frozen segmenter f_θ
finds hard, inside a trust region around the unguided DDIM step.

Per DDIM step t → t_prev (``t_prev`` = the next timestep of the DDIM schedule, −1 after the last one):

1. ε = ε_φ(x_t) (classifier-free guided, :meth:`DDIMTrajectory.noise`) and Tweedie's estimate
   x̂_{0|t} = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (eq. 8), decoded with ``generator.decode`` (identity in pixel space,
   the VAE in latent space; optionally diffusers' ``AutoencoderTiny``, lever ``decoder``).
2. V = ``value_terms(f_θ(decode(x̂_{0|t})), m̂, ce_weight, lambda_margin)["value"]`` per sample (eq. 2) and
   g = ∂ΣV/∂x_t (eq. 9). ``jacobian: full`` backpropagates through ε_φ (the paper); ``jacobian: detached``
   takes ∂ε/∂x_t = 0 (ε computed without a graph, x̂_{0|t} affine in x_t, g = ∂V/∂x̂_{0|t}/√ᾱ_t), as the
   Miner paper does: no backward pass through the UNet.
3. Δ = τ·sign(g) (eq. 9). Value focus: S_t = Σ_channels g² per pixel (eq. 14), S̄ = S at the first guided
   pass, S̄ ← (1−γ)·S_t + γ·S̄ after it (eq. 15), Ω_t = per-sample min–max normalisation of S̄ to [0, 1],
   broadcast over channels (``focus: false``: Ω ≡ 1).
4. x̃_{t−1} = the DDIM update (eq. 10: diffusers' ``DDIMScheduler.step`` with σ_t·ε from the sample's own
   noise stream, exactly :meth:`DDIMTrajectory.step`), then x_{t−1} = x̃_{t−1} + Ω_t ⊙ Δ (eq. 16) projected
   onto the l∞ ball ‖x_{t−1} − x̃_{t−1}‖_∞ ≤ ε_t = k·√β_t (eq. 12; ``trust_region: false`` skips it).
5. Time-travel (eq. 13): x_t ← √α_t·x_{t−1} + √(1−α_t)·ε′ and 1–4 again, ``time_travel`` extra times on
   the steps inside ``window``.

Choices where the paper leaves a detail open (equation numbers as in the paper):

- eq. 12 with a skipped (DDIM) schedule: β_t is the training schedule's β at the step's timestep t (the
  paper's scale of k, whatever the number of sampling steps; ``radius_beta: schedule``). ``radius_beta:
  stride`` uses the *effective* β of the jump t → t_prev instead, 1 − ᾱ_t/ᾱ_{t_prev}, which grows with the
  stride (about 3× the paper's radius with SD's scaled-linear schedule at 100 steps).
- eq. 13 with a skipped schedule: the time-travel re-noising uses the effective α_t = ᾱ_t/ᾱ_{t_prev}
  (ᾱ_{−1} = the scheduler's ``final_alpha_cumprod``), so it undoes exactly the transition the sampler takes;
  with ``steps`` = the training steps it is the training schedule's α_t.
- eq. 8: x̂_{0|t} is neither clipped nor clamped before f_θ (clamping would zero the gradient of exactly the
  pixels an early, overshooting estimate gets wrong); the final image is clamped to [−1, 1] as RD's is.
- eq. 9/16: sign(0) = 0, so a pixel without gradient is not moved; non-finite gradient entries count as 0.
- eq. 12: the projection is applied to the guidance increment, x_{t−1} = x̃_{t−1} + clip(Ω⊙Δ, −ε_t, ε_t),
  which is the l∞ projection onto the ball around x̃_{t−1}; with k = 0 it adds exact zeros, so VGD with
  ``k: 0, time_travel: 0`` reproduces DDIM bit for bit.
- eq. 15: the EMA is updated at every guided pass, time-travel repeats included (a repeat is one more
  observation of the sensitivity at the same t), and passes outside ``guidance_window`` leave it unchanged;
  "S̄_T = S_T" is read as "the first guided pass initialises S̄".
- Ω_t: where S̄ is constant over a sample's pixels (max = min, e.g. an all-zero gradient) the map carries no
  spatial information and Ω = 0 (no update for that sample in that pass); no division by zero happens.
- eq. 13 randomness: ε′, and the σ_t·ε noise of the DDIM updates of time-travel repeats, come from a second
  per-sample stream seeded from the sample's noise seed (:func:`vgd_seed`); the first DDIM update of every
  step draws from the sample's DDIM stream, so that stream holds exactly the draws RD makes (x_T, then one
  σ_t·ε per step) whatever the VGD settings.
- windows: step i of N (i = 0 at t = T) is inside ``[start, end]`` iff start ≤ i/N < end ([0, 1] = all steps,
  [0, 0.5] = the first half). ``window`` gates time-travel (as the issue specifies); ``guidance_window``
  (a speed lever, not in the paper, default all steps) gates steps 1–4's guidance: outside it a step is the
  plain DDIM update and costs what RD's does.

Records per sample: ``guided_steps`` (guided passes, time-travel repeats included), ``mean_focus`` (mean of
Ω over pixels and guided passes), ``max_trust_ratio`` (max over passes of ‖x_{t−1} − x̃_{t−1}‖_∞/ε_t; ≤ 1 with
the trust region on). After ``sample`` the sampler's ``trace`` lists one dict per guided pass (step, t,
repeat, radius, and per-sample tensors trust_ratio, x_scale = ‖x̃_{t−1}‖_∞ (the float32 rounding of x̃ + δ is
relative to it), omega_min, omega_max, omega_mean, value = V(x̂_{0|t})).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import NoiseStream, Sampler, register_sampler
from .ddim import DDIMTrajectory
from .value import value_terms

#: The VGD keys of a method entry, with the paper's defaults (λ, τ, k, γ from the paper's implementation
#: details; time-travel once per step on every step; the full Jacobian of eq. 9).
VGD_DEFAULTS: dict = {
    "lambda_margin": 1.0,      # λ of eq. 2 (0 = "w/o M_s")
    "ce_weight": 1.0,          # weight of ζ(L_CE) in eq. 2 (0 = "w/o L_CE")
    "tau": 1.0,                # τ of eq. 9
    "k": 0.04,                 # trust coefficient of eq. 12 (Fig. 7 sweep)
    "radius_beta": "schedule",  # β_t of eq. 12: the training schedule's at t (paper) or the stride's ("stride")
    "gamma": 0.90,             # EMA decay of eq. 15
    "focus": True,             # value focus Ω_t (false = "w/o Ω_t": Ω ≡ 1)
    "trust_region": True,      # l∞ projection of eq. 12 (false = "w/o fidelity constraint")
    "time_travel": 1,          # extra passes per step, eq. 13 (0 = "w/o T.t.")
    "window": [0.0, 1.0],      # fraction of the trajectory whose steps time-travel
    "guidance_window": [0.0, 1.0],  # fraction of the trajectory whose steps are guided (speed lever)
    "jacobian": "full",        # "full": ∂ε/∂x_t included (paper); "detached": ∂ε/∂x_t = 0
    "decoder": "vae",          # decoder of x̂_{0|t} in latent space: "vae" or "tiny" (AutoencoderTiny)
    "tiny_decoder": None,      # local AutoencoderTiny directory (from_pretrained) for decoder: tiny
}

_VGD_STREAM = 0x564744  # "VGD": the second per-sample stream's key


def vgd_seed(noise_seed: int) -> int:
    """The seed of a sample's VGD-only noise stream (ε′ of eq. 13), derived from its DDIM noise seed."""
    return int(np.random.SeedSequence([int(noise_seed), _VGD_STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


def vgd_options(params: dict) -> dict:
    """The VGD keys of ``params`` over :data:`VGD_DEFAULTS`, checked (ConfigError names the bad key)."""
    opts = {key: params.get(key, default) for key, default in VGD_DEFAULTS.items()}

    def bad(key, why):
        raise ConfigError(f"methods.*.{key}", f"{why}, got {opts[key]!r}")

    for key in ("lambda_margin", "ce_weight", "tau", "k", "gamma"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            bad(key, "expected a finite number ≥ 0")
    if opts["gamma"] > 1:
        bad("gamma", "expected a number in [0, 1]")
    for key in ("focus", "trust_region"):
        if not isinstance(opts[key], bool):
            bad(key, "expected true or false")
    if isinstance(opts["time_travel"], bool) or not isinstance(opts["time_travel"], int) or opts["time_travel"] < 0:
        bad("time_travel", "expected an integer ≥ 0")
    for key in ("window", "guidance_window"):
        w = opts[key]
        if (not isinstance(w, (list, tuple)) or len(w) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in w)
                or not 0.0 <= w[0] <= w[1] <= 1.0):
            bad(key, "expected [start, end] with 0 ≤ start ≤ end ≤ 1")
        opts[key] = [float(w[0]), float(w[1])]
    if opts["jacobian"] not in ("full", "detached"):
        bad("jacobian", "expected 'full' or 'detached'")
    if opts["radius_beta"] not in ("schedule", "stride"):
        bad("radius_beta", "expected 'schedule' or 'stride'")
    if opts["decoder"] not in ("vae", "tiny"):
        bad("decoder", "expected 'vae' or 'tiny'")
    if opts["tiny_decoder"] is not None and not isinstance(opts["tiny_decoder"], str):
        bad("tiny_decoder", "expected a directory path or null")
    for key in ("lambda_margin", "ce_weight", "tau", "k", "gamma"):
        opts[key] = float(opts[key])
    return opts


def in_window(index: int, steps: int, window) -> bool:
    """Whether step ``index`` of ``steps`` (0 = the first, noisiest) lies in ``window`` = [start, end)."""
    position = index / steps
    return window[0] <= position < window[1]


def focus_map(sensitivity: torch.Tensor) -> torch.Tensor:
    """Ω of eq. 16: (B, H, W) sensitivities → (B, 1, H, W) per-sample min–max normalised to [0, 1].

    A sample whose map is constant (max = min) gets Ω = 0 everywhere: no spatial focus, no update."""
    flat = sensitivity.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = flat.amax(1).view(-1, 1, 1) - lo
    ok = span > 0
    omega = torch.where(ok, (sensitivity - lo) / torch.where(ok, span, torch.ones_like(span)),
                        torch.zeros_like(sensitivity))
    return omega.clamp(0.0, 1.0).unsqueeze(1)


def step_alphas(scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t_prev}) of one DDIM step, exactly as ``DDIMScheduler.step`` looks them up."""
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_bar = scheduler.alphas_cumprod[t]
    alpha_bar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return alpha_bar, alpha_bar_prev


class _TinyDecoder(torch.nn.Module):
    """diffusers' ``AutoencoderTiny`` (TAESD) as a cheap, differentiable stand-in for the VAE decoder.

    TAESD takes the latents the diffusion model works on (already multiplied by the VAE's scaling factor)
    divided by its own ``scaling_factor`` (1.0 for the released weights), as diffusers' pipelines do."""

    def __init__(self, directory, channels: int):
        super().__init__()
        from diffusers import AutoencoderTiny

        path = Path(directory)
        if not path.exists():
            raise ConfigError("methods.*.tiny_decoder", f"{path} does not exist")
        self.vae = AutoencoderTiny.from_pretrained(path)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False)[0]
        if image.shape[1] != self.channels:
            image = image.mean(dim=1, keepdim=True)
        return image


@register_sampler("vgd")
class VGDSampler(Sampler):
    """Value-Guided Diffusion; see the module docstring for the algorithm and the choices it makes."""

    needs_value_model = True

    def __init__(self, params: dict):
        super().__init__(params)
        self.opts = vgd_options(params)
        self.trace: list[dict] = []
        self._tiny: dict[str, _TinyDecoder] = {}

    # -- pieces -----------------------------------------------------------------------------------------------
    def guidance_decoder(self, generator):
        """The decoder of x̂_{0|t}: the generator's own (identity in pixel space), or AutoencoderTiny."""
        if self.opts["decoder"] == "vae" or not generator.latent_space:
            return generator.decode
        path = self.opts["tiny_decoder"]
        if path is None:
            raise ConfigError("methods.*.tiny_decoder", "decoder: tiny needs the AutoencoderTiny directory")
        if path not in self._tiny:
            self._tiny[path] = _TinyDecoder(path, generator.channels)
        return self._tiny[path]

    def value_gradient(self, traj: DDIMTrajectory, x_t: torch.Tensor, t, alpha_bar: torch.Tensor, decode,
                       value_model, masks: torch.Tensor):
        """(ε_φ(x_t), g = ∂ΣV/∂x_t, V(x̂_{0|t}) per sample), eqs. 8–9."""
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.opts["jacobian"] == "full":
                eps = traj.noise(x, t)
            else:
                with torch.no_grad():
                    eps = traj.noise(x_t, t)
            x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
            value = value_terms(value_model(decode(x0)), masks, self.opts["ce_weight"],
                                self.opts["lambda_margin"])["value"]
            (grad,) = torch.autograd.grad(value.sum(), x)
        return eps.detach(), torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), value.detach()

    # -- the sampler ------------------------------------------------------------------------------------------
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        if value_model is None:
            raise ValueError("the vgd sampler needs the frozen segmenter f_θ (value_model)")
        o = self.opts
        traj = DDIMTrajectory.from_params(generator, masks, noise_seeds, self.params)
        decode = self.guidance_decoder(generator)
        masks = masks.long().to(traj.x.device)
        batch = len(noise_seeds)
        steps = len(traj.timesteps)
        device = traj.x.device
        repeats_at = [o["time_travel"] if in_window(i, steps, o["window"]) else 0 for i in range(steps)]
        # The second stream holds, per repeat, ε′ of eq. 13 and (η > 0) the DDIM noise of the repeated update:
        # all of them drawn ahead in one block.
        second = NoiseStream([vgd_seed(s) for s in noise_seeds], tuple(traj.x.shape), device,
                             ahead=sum(repeats_at) * (2 if traj.eta > 0 else 1))
        s_bar = None
        # Per-sample records accumulate on the device and are read once, at the end.
        guided = torch.zeros(batch, dtype=torch.long, device=device)
        focus_sum = torch.zeros(batch, dtype=torch.float64, device=device)
        max_ratio = torch.zeros(batch, dtype=torch.float64, device=device)
        self.trace = []

        for i, t in enumerate(traj.timesteps):
            alpha_bar, alpha_bar_prev = step_alphas(traj.scheduler, t)
            alpha = alpha_bar / alpha_bar_prev  # effective one-step α_t of the jump t → t_prev
            beta = float(traj.scheduler.betas[int(t)]) if o["radius_beta"] == "schedule" else float(1 - alpha)
            radius = o["k"] * beta ** 0.5  # ε_t = k·√β_t, eq. 12
            guide = in_window(i, steps, o["guidance_window"])
            repeats = repeats_at[i]
            x_t = traj.x
            for r in range(repeats + 1):
                if guide:
                    eps, grad, value = self.value_gradient(traj, x_t, t, alpha_bar, decode, value_model, masks)
                else:
                    with torch.no_grad():
                        eps = traj.noise(x_t, t)
                with torch.no_grad():
                    if r == 0:  # the DDIM stream's draw of this step, as RD makes it
                        x_tilde = traj.step(eps, t, x_t).prev_sample
                    else:
                        noise = second.next() if traj.eta > 0 else None
                        x_tilde = traj.scheduler.step(eps, t, x_t, eta=traj.eta, variance_noise=noise).prev_sample
                    if guide:
                        x_prev, s_bar = self._guided_update(x_tilde, grad, s_bar, radius, i, int(t), r, value)
                        guided += 1
                        focus_sum += self.trace[-1]["omega_mean"].double()
                        max_ratio = torch.maximum(max_ratio, self.trace[-1]["trust_ratio"].double())
                    else:
                        x_prev = x_tilde
                    if r < repeats:  # time-travel, eq. 13
                        x_t = alpha ** 0.5 * x_prev + (1 - alpha) ** 0.5 * second.next()
            traj.x = x_prev

        with torch.no_grad():
            images = traj.decode()
        mean_focus = torch.where(guided > 0, focus_sum / guided.clamp_min(1), torch.zeros_like(focus_sum))
        records = [{"guided_steps": g, "mean_focus": f, "max_trust_ratio": m}
                   for g, f, m in zip(guided.tolist(), mean_focus.tolist(), max_ratio.tolist())]
        return images, records

    def _guided_update(self, x_tilde, grad, s_bar, radius: float, step: int, t: int, repeat: int, value):
        """(x_{t−1} = x̃_{t−1} + Π_{ε_t}(Ω_t ⊙ τ·sign(g)), the updated EMA S̄) — eqs. 9, 12, 14–16."""
        o = self.opts
        sensitivity = grad.pow(2).sum(1)  # S_t, eq. 14: (B, H, W)
        s_bar = sensitivity if s_bar is None else (1 - o["gamma"]) * sensitivity + o["gamma"] * s_bar
        omega = focus_map(s_bar) if o["focus"] else torch.ones_like(s_bar).unsqueeze(1)
        update = omega * (o["tau"] * torch.sign(grad))
        if o["trust_region"]:
            update = update.clamp(-radius, radius)
        x_prev = x_tilde + update
        moved = (x_prev - x_tilde).abs().flatten(1).amax(1)
        if radius > 0:
            ratio = moved / radius
        else:
            ratio = torch.where(moved > 0, torch.full_like(moved, math.inf), torch.zeros_like(moved))
        self.trace.append({"step": step, "t": t, "repeat": repeat, "radius": radius, "trust_ratio": ratio,
                           "x_scale": x_tilde.abs().flatten(1).amax(1),
                           "omega_min": omega.flatten(1).amin(1), "omega_max": omega.flatten(1).amax(1),
                           "omega_mean": omega.flatten(1).mean(1), "value": value})
        return x_prev, s_bar
