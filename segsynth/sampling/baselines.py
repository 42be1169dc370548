"""The compared methods of the VGD paper (Table 1), each a sampler on the same frozen generator and f_θ.

Guided sampling          ``ugdm``         uncertainty (margin M_s) classifier guidance, Luo et al. 2024
                         ``tfg``          training-free guidance with V as the guidance function, Ye et al. 2024
                         ``adv_guidance`` adversarial guidance (AG) of the Adversariality Miner paper
Diffusion augmentation   ``advdiffuser``  adversarial (segmentation-loss) guidance, Chen et al. 2023
                         ``diffaug``      diffuse-and-denoise of the real image, Sastry et al. 2024
                         ``augpaint``     RePaint-style inpainting of the real image's foreground, Hu & Shi 2025
Post-hoc scoring         ``gauda``        over-generate RD candidates, keep the most uncertain, Frisch et al. 2025

The gradient-based samplers (ugdm, tfg, advdiffuser, adv_guidance) share one step, :func:`guidance_gradient`: the Tweedie
estimate x̂_{0|t} = (x_t − √(1−ᾱ_t)·ε_φ(x_t)) / √ᾱ_t (eq. 8, clipped only where the scheduler's own DDIM step
clips it) is decoded with ``generator.decode``, scored by f_θ, and differentiated w.r.t. x_t through the UNet. None
has VGD's trust region or value focus. Their objectives are per-image pixel means (``value.py``) multiplied by
the number of pixels, i.e. sums over pixels — the segmentation analogue of a classifier's log-likelihood — so a
gradient scale means the same at every resolution.

Every sampler consumes noise only from the per-sample streams of :class:`DDIMTrajectory` (x_T first), so a
sample depends on its seed alone, never on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Sampler, noise_seed, register_sampler
from .ddim import DDIMSampler, DDIMTrajectory
from .value import margin_uncertainty, normalised_cross_entropy, value_terms

Objective = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] → one value per sample (to ascend)


# -- schedule arithmetic ------------------------------------------------------------------------------------------
def prev_timestep(scheduler, t) -> int:
    """The timestep DDIM steps to from ``t`` (diffusers' rule; negative at the last step)."""
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alpha_bar(scheduler, t: int) -> float:
    """ᾱ_t, or the scheduler's final ᾱ for a negative (past-the-end) timestep."""
    t = int(t)
    return float(scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod)


def tweedie(scheduler, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x̂_{0|t} = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t (eq. 8), clipped as the scheduler's own DDIM step clips it (the
    tiny pixel-space generators clip to the image range), so guidance scores the estimate the sampler uses."""
    a = alpha_bar(scheduler, t)
    x0 = (x_t - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


def _pixels(images: torch.Tensor) -> int:
    return int(images.shape[-2] * images.shape[-1])


# -- objectives: per-image means × pixel count --------------------------------------------------------------------
def margin_objective(value_model) -> Objective:
    """Σ_pixels of 1 − (p_top1 − p_top2): M_s (eq. 3) times the pixel count."""
    return lambda images: margin_uncertainty(value_model(images)) * _pixels(images)


def cross_entropy_objective(value_model, masks: torch.Tensor) -> Objective:
    """Σ_pixels of the normalised cross-entropy of f_θ against the target mask."""
    return lambda images: normalised_cross_entropy(value_model(images), masks) * _pixels(images)


def value_objective(value_model, masks: torch.Tensor, margin_weight: float = 1.0) -> Objective:
    """V = ζ(L_CE) + λ·M_s (eq. 2) times the pixel count."""
    return lambda images: value_terms(value_model(images), masks, margin_weight=margin_weight)["value"] \
        * _pixels(images)


# -- the shared guidance step -------------------------------------------------------------------------------------
@dataclass
class GuidanceStep:
    """What one differentiable evaluation at x_t yields (all detached)."""

    eps: torch.Tensor        # ε_φ(x_t), classifier-free guided as the trajectory is
    x0: torch.Tensor         # Tweedie x̂_{0|t} in the diffusion variable
    grad: torch.Tensor       # ∇_{x_t} objective(decode(x̂_{0|t}))
    objective: torch.Tensor  # per-sample objective at x̂_{0|t}


def guidance_gradient(traj: DDIMTrajectory, x_t: torch.Tensor, t, objective: Objective) -> GuidanceStep:
    """ε, x̂_{0|t} and the gradient of ``objective(decode(x̂_{0|t}))`` w.r.t. x_t, through the frozen UNet."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = traj.noise(x, t)
        x0 = tweedie(traj.scheduler, x, eps, t)
        value = objective(traj.generator.decode(x0))
        (grad,) = torch.autograd.grad(value.sum(), x)
    return GuidanceStep(eps.detach(), x0.detach(), grad.detach(), value.detach())


def x0_gradient(generator, x0: torch.Tensor, objective: Objective) -> torch.Tensor:
    """∇_{x0} objective(decode(x0)): the gradient TFG's mean guidance ascends directly on x̂_{0|t}."""
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(generator.decode(x)).sum(), x)
    return grad.detach()


def _norms(update: torch.Tensor) -> torch.Tensor:
    return update.flatten(1).norm(dim=1)


def _encode(traj: DDIMTrajectory, images: torch.Tensor) -> torch.Tensor:
    """Real images → diffusion variable: the VAE posterior's mean + std·ε, ε the next draw of each sample's
    stream (diffusers' ``latent_dist.sample``, with the noise taken through the stream)."""
    if not traj.generator.latent_space:
        return images
    return traj.generator.encode(images, noise=traj.next_noise())


def _require_sources(name: str, source_images, masks) -> torch.Tensor:
    if source_images is None:
        raise ValueError(f"sampler {name!r} edits real images: it needs source_images")
    if source_images.shape[0] != masks.shape[0]:
        raise ValueError(f"{source_images.shape[0]} source images for {masks.shape[0]} masks")
    return source_images


class _Baseline(Sampler):
    """A sampler with its own config keys: ``DEFAULTS`` fill what the method entry leaves out."""

    NAME = ""
    DEFAULTS: dict = {}

    def __init__(self, params: dict):
        super().__init__({**self.DEFAULTS, **params})
        self.check()

    def check(self) -> None:
        """Range checks for library callers (the workflow's schema checks the same)."""

    def _fail(self, key: str, problem: str):
        raise ConfigError(f"methods.*.{key}", f"sampler {self.NAME!r}: {problem}")

    def _trajectory(self, generator, masks, noise_seeds) -> DDIMTrajectory:
        return DDIMTrajectory.from_params(generator, masks, noise_seeds, self.params)


class _GradientGuided(_Baseline):
    """DDIM where each step is changed by a gradient through f_θ; records the mean applied update norm."""

    needs_value_model = True

    def objective(self, value_model, masks) -> Objective:
        raise NotImplementedError

    def start(self, traj: DDIMTrajectory) -> None:
        """Per-batch preparation before the first step (e.g. a step-size schedule)."""

    def guided_step(self, traj: DDIMTrajectory, t, objective: Objective, index: int) -> torch.Tensor:
        """Advance ``traj.x`` by one guided step; return the per-sample L2 norm of the guidance's change."""
        raise NotImplementedError

    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        if value_model is None:
            raise ValueError(f"sampler {self.NAME!r} needs the frozen segmenter f_θ (value_model)")
        traj = self._trajectory(generator, masks, noise_seeds)
        objective = self.objective(value_model, masks.to(traj.x.device))
        self.start(traj)
        norms = torch.zeros(len(masks), device=traj.x.device)
        for i, t in enumerate(traj.timesteps):
            norms += self.guided_step(traj, t, objective, i)
        norms /= len(traj.timesteps)
        with torch.no_grad():
            images = traj.decode()
        return images.detach(), [{"guidance_norm": n} for n in norms.tolist()]


class _ScoreGuided(_GradientGuided):
    """Classifier guidance in ε form (Dhariwal & Nichol): ε̂ = ε − s·√(1−ᾱ_t)·∇_{x_t}U(x̂_{0|t}), then the
    ordinary DDIM update with ε̂ — the score s_φ + s·∇U written for an ε-predicting model. Key: ``scale`` (s)."""

    DEFAULTS = {"scale": 1.0}

    def check(self):
        if self.params["scale"] < 0:
            self._fail("scale", "must be ≥ 0")

    def guided_step(self, traj, t, objective, index):
        g = guidance_gradient(traj, traj.x, t, objective)
        guided_eps = g.eps - self.params["scale"] * math.sqrt(1.0 - alpha_bar(traj.scheduler, t)) * g.grad
        noise = traj.step_noise()
        step = traj.scheduler.step
        plain = step(g.eps, t, traj.x, eta=traj.eta, variance_noise=noise).prev_sample
        guided = step(guided_eps, t, traj.x, eta=traj.eta, variance_noise=noise).prev_sample
        traj.x = guided
        return _norms(guided - plain)


@register_sampler("ugdm")
class UGDMSampler(_ScoreGuided):
    """UGDM-style uncertainty guidance: classifier guidance that ascends the margin uncertainty M_s alone.

    UGDM (Luo et al. 2024, "Measurement guidance in diffusion models") plugs an uncertainty measure — the
    top-1/top-2 margin among them — into guided-diffusion's ``cond_fn``; with DDIM that is the score-based
    conditioning of :class:`_ScoreGuided`. Here U = Σ_pixels M_s of f_θ on the Tweedie estimate (UGDM's noisy
    classifier is replaced by the frozen segmenter on x̂_{0|t}, as the VGD comparison prescribes). No trust
    region, no focus. Key: ``scale`` (s ≥ 0).
    """

    NAME = "ugdm"

    def objective(self, value_model, masks):
        return margin_objective(value_model)


@register_sampler("adv_guidance")
class AdversarialGuidanceSampler(_ScoreGuided):
    """Adversarial Guidance (AG) of the Miner paper: s_adv(x_t, t) = s_φ(x_t, t) + λ·∇_{x_t} ℓ_seg(f_θ(x̂_{0|t}), ŷ),
    the log-derivative of the Gibbs preference q_φ(x|ŷ)·exp(λ·ℓ_seg) along the reverse trajectory — the
    "artificial adversariality" the Miner is contrasted with. ℓ_seg is f_θ's cross-entropy against the target
    mask, summed over pixels and divided by log K (the constant is absorbed in λ). Key: ``scale`` (λ ≥ 0).
    """

    NAME = "adv_guidance"

    def objective(self, value_model, masks):
        return cross_entropy_objective(value_model, masks)


@register_sampler("tfg")
class TFGSampler(_GradientGuided):
    """TFG (Ye et al. 2024) with V(f_θ, x̂_0) = ζ(L_CE) + λ·M_s as the guidance function.

    Per step, following TFG's Algorithm 1 and reference code:
    - variance guidance Δ_t = ρ_t·∇_{x_t}V(x̂_{0|t}) (through the UNet);
    - mean guidance: ``mean_iters`` ascent steps x̂_0 ← x̂_0 + μ_t·∇_{x̂_0}V directly on the Tweedie estimate,
      Δ_0 = (result − x̂_{0|t});
    - x_{t−1} = DDIM(x_t, ε) + Δ_t/√α_t + √ᾱ_{t−1}·Δ_0, where α_t = ᾱ_t/ᾱ_{t−1} over the DDIM stride;
    - recurrence: ``recurrence`` > 1 re-noises x_{t−1} → x_t ~ q(x_t | x_{t−1}) and repeats the step, keeping
      the last x_{t−1};
    - ρ_t and μ_t follow TFG's ``schedule`` ("increase": ∝ α_t, "decrease": ∝ 1 − α_t, "constant"), normalised
      to mean ρ (μ) over the sampling steps. TFG's recommended setting is "increase".
    TFG's implicit dynamics (Gaussian smoothing of x̂_0 with a Monte-Carlo estimate) is left out: its published
    configurations use a negligible σ (10⁻³) with one sample. No trust region, no focus. Keys: ``rho``, ``mu``,
    ``mean_iters``, ``recurrence``, ``schedule``, ``margin_weight`` (λ of eq. 2).
    """

    NAME = "tfg"
    DEFAULTS = {"rho": 1.0, "mu": 0.25, "mean_iters": 4, "recurrence": 1, "schedule": "increase",
                "margin_weight": 1.0}

    def check(self):
        p = self.params
        for key in ("rho", "mu", "margin_weight"):
            if p[key] < 0:
                self._fail(key, "must be ≥ 0")
        if int(p["mean_iters"]) < 0:
            self._fail("mean_iters", "must be ≥ 0")
        if int(p["recurrence"]) < 1:
            self._fail("recurrence", "must be ≥ 1")
        if p["schedule"] not in ("increase", "decrease", "constant"):
            self._fail("schedule", "must be one of increase, decrease, constant")

    def objective(self, value_model, masks):
        return value_objective(value_model, masks, self.params["margin_weight"])

    def start(self, traj):
        """The schedule's per-step weights, mean 1 over the sampling steps."""
        steps = [alpha_bar(traj.scheduler, t) / alpha_bar(traj.scheduler, prev_timestep(traj.scheduler, t))
                 for t in traj.timesteps]
        alphas = np.asarray(steps, dtype=np.float64)
        weights = {"increase": alphas, "decrease": 1.0 - alphas,
                   "constant": np.ones_like(alphas)}[self.params["schedule"]]
        traj.tfg_weights = weights * len(weights) / max(weights.sum(), 1e-12)

    def guided_step(self, traj, t, objective, index):
        rho = self.params["rho"] * traj.tfg_weights[index]
        mu = self.params["mu"] * traj.tfg_weights[index]
        a_t = alpha_bar(traj.scheduler, t)
        a_prev = alpha_bar(traj.scheduler, prev_timestep(traj.scheduler, t))
        alpha_step = a_t / a_prev
        x = traj.x
        for r in range(int(self.params["recurrence"])):
            if rho > 0:
                g = guidance_gradient(traj, x, t, objective)
                eps, x0, delta_t = g.eps, g.x0, rho * g.grad
            else:
                with torch.no_grad():
                    eps = traj.noise(x, t)
                x0 = tweedie(traj.scheduler, x, eps, t)
                delta_t = torch.zeros_like(x)
            new_x0 = x0.clone()
            if mu > 0:
                for _ in range(int(self.params["mean_iters"])):
                    new_x0 = new_x0 + mu * x0_gradient(traj.generator, new_x0, objective)
            update = delta_t / math.sqrt(alpha_step) + math.sqrt(a_prev) * (new_x0 - x0)
            with torch.no_grad():
                x_prev = traj.step(eps, t, x).prev_sample + update
            if r + 1 < int(self.params["recurrence"]):
                renoise = traj.next_noise()
                x = math.sqrt(alpha_step) * x_prev + math.sqrt(1.0 - alpha_step) * renoise
        traj.x = x_prev
        return _norms(update)


@register_sampler("advdiffuser")
class AdvDiffuserSampler(_GradientGuided):
    """AdvDiffuser-style adversarial guidance (Chen et al. 2023): ascend f_θ's segmentation loss while sampling.

    AdvDiffuser adds an adversarial ascent step on the classifier loss to every reverse step, scaled, as
    classifier guidance is, by the step's DDPM posterior variance σ̃_t² (so the attack fades with the noise) —
    PGD spread over the denoising trajectory. Here the
    loss is the cross-entropy of f_θ against the target mask on the Tweedie estimate, and
    x_{t−1} = DDIM(x_t) + s·σ̃_t²·sign(∇_{x_t} L_CE) — the L∞ PGD sign step (``sign: true``, the default);
    ``sign: false`` uses the raw gradient (the classifier-guidance form). σ̃_t² is DDIM's σ_t² at η = 1 for the
    step, independent of the sampling η. AdvDiffuser's Grad-CAM mask and its start from a noised real image are
    left out: all compared methods share the mask-conditioned generation from noise. Keys: ``scale`` (s),
    ``sign``.
    """

    NAME = "advdiffuser"
    DEFAULTS = {"scale": 1.0, "sign": True}

    def check(self):
        if self.params["scale"] < 0:
            self._fail("scale", "must be ≥ 0")
        if not isinstance(self.params["sign"], bool):
            self._fail("sign", "must be true or false")

    def objective(self, value_model, masks):
        return cross_entropy_objective(value_model, masks)

    def guided_step(self, traj, t, objective, index):
        g = guidance_gradient(traj, traj.x, t, objective)
        variance = float(traj.scheduler._get_variance(int(t), prev_timestep(traj.scheduler, t)))
        direction = g.grad.sign() if self.params["sign"] else g.grad
        update = self.params["scale"] * variance * direction
        with torch.no_grad():
            traj.x = traj.step(g.eps, t, traj.x).prev_sample + update
        return _norms(update)


@register_sampler("diffaug")
class DiffAugSampler(_Baseline):
    """DiffAug (Sastry et al. 2024): diffuse the real source image part-way, then denoise it, unguided.

    The source image is encoded (a latent sample in latent space), noised to the DDIM timestep reached after
    ``(1 − strength)`` of the schedule — diffusers' img2img rule: the last ``int(steps·strength)`` DDIM steps
    remain — with q(x_t | x_0) using the sample's first noise draw, then denoised with DDIM conditioned on its
    own mask. ``strength`` → 0 returns the (re-encoded) source, 1 starts from (almost) pure noise. DiffAug
    itself draws t uniformly per example and denoises in one Tweedie step; the VGD comparison uses a fixed
    strength and the shared DDIM sampler so its fidelity is comparable. Key: ``strength`` ∈ (0, 1].
    """

    NAME = "diffaug"
    DEFAULTS = {"strength": 0.5}

    def check(self):
        if not 0.0 < self.params["strength"] <= 1.0:
            self._fail("strength", "must be in (0, 1]")

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        sources = _require_sources(self.NAME, source_images, masks)
        traj = self._trajectory(generator, masks, noise_seeds)
        steps = len(traj.timesteps)
        remaining = min(int(steps * self.params["strength"]), steps)
        timesteps = traj.timesteps[steps - remaining:]
        x0 = _encode(traj, sources.to(traj.x))
        start = int(timesteps[0]) if remaining else -1
        if remaining:
            traj.x = traj.scheduler.add_noise(x0, traj.x_T.to(x0), timesteps[:1])
            for t in timesteps:
                traj.x = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
        else:
            traj.x = x0
        images = traj.decode()
        return images, [{"strength": float(self.params["strength"]), "start_timestep": start}
                        for _ in noise_seeds]


@register_sampler("augpaint")
class AugPaintSampler(_Baseline):
    """AugPaint (Hu & Shi 2025): keep the real image's background, repaint its mask's foreground (RePaint).

    Known region: mask == 0 in the diffusion variable's resolution — the pixel mask in pixel space; in latent
    space a latent cell is known only if its whole footprint is background (max-pool of the foreground), so
    nothing of the foreground is kept. From x_T ~ N(0, I), each DDIM step x_t → x_{t−1} (conditioned on the mask)
    is followed by replacing the known region with the real image noised to t−1, q(x_{t−1} | x_0) with fresh
    per-sample noise; at the last step the known region is the clean encoded image, so in pixel space the
    background equals the source exactly. RePaint's resampling: with ``jumps`` = u > 1 each step is repeated u
    times, re-noising x_{t−1} → x_t ~ q(x_t | x_{t−1}) in between (RePaint's jump length 1; u = 1 is plain
    RePaint without resampling). Key: ``jumps`` (u ≥ 1).
    """

    NAME = "augpaint"
    DEFAULTS = {"jumps": 1}

    def check(self):
        if int(self.params["jumps"]) < 1:
            self._fail("jumps", "must be ≥ 1")

    @staticmethod
    def known_region(masks: torch.Tensor, latent_hw) -> torch.Tensor:
        """(B, 1, h, w) float: 1 where the diffusion variable shows only background."""
        foreground = (masks > 0).float().unsqueeze(1)
        if tuple(foreground.shape[-2:]) != tuple(latent_hw):
            foreground = F.adaptive_max_pool2d(foreground, tuple(latent_hw))
        return 1.0 - foreground

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        sources = _require_sources(self.NAME, source_images, masks)
        traj = self._trajectory(generator, masks, noise_seeds)
        x0 = _encode(traj, sources.to(traj.x))
        known = self.known_region(masks, traj.x.shape[-2:]).to(traj.x)
        jumps = int(self.params["jumps"])
        for t in traj.timesteps:
            prev = prev_timestep(traj.scheduler, t)
            a_prev = alpha_bar(traj.scheduler, prev)
            alpha_step = alpha_bar(traj.scheduler, t) / a_prev
            for u in range(jumps):
                unknown = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
                if prev >= 0:
                    noise = traj.next_noise()
                    known_x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * noise
                else:
                    known_x = x0
                x_prev = known * known_x + (1.0 - known) * unknown
                if u + 1 < jumps:
                    renoise = traj.next_noise()
                    traj.x = math.sqrt(alpha_step) * x_prev + math.sqrt(1.0 - alpha_step) * renoise
            traj.x = x_prev
        images = traj.decode()
        fraction = known.flatten(1).mean(1)
        return images, [{"jumps": jumps, "known_fraction": f} for f in fraction.tolist()]


def candidate_seed(seed: int, k: int) -> int:
    """The noise seed of GAUDA's k-th candidate for a sample: the sample's own seed for k = 0 (so one candidate
    is exactly RD), a seed derived from it otherwise."""
    return int(seed) if k == 0 else noise_seed(int(seed), k)


@register_sampler("gauda")
class GAUDASampler(_Baseline):
    """GAUDA (Frisch et al. 2025) re-implemented as a pre-generation selector, as in the VGD comparison.

    For each mask, ``oversample`` RD candidates are drawn (candidate 0 from the sample's own seed, the others
    from seeds derived from it, see :func:`candidate_seed`) and scored by the margin uncertainty M_s of f_θ
    (the top-1/top-2 margin of eq. 3) normalised by M_s of f_θ on the real training image of the same mask —
    the "real-data-derived metric" of the VGD re-implementation: > 1 means f_θ is less sure of the candidate
    than of the real image. GAUDA itself resamples hard examples during training from the segmenter's
    uncertainty; here that becomes a selection before training. The candidate with the highest score is kept.
    The normaliser is per mask, so the choice equals the argmax of raw M_s and never depends on the batch.
    ``oversample`` = 1 is RD exactly. Key: ``oversample`` (≥ 1).
    Records: ``selected_score``, ``candidate_score_mean``, ``selected_candidate``, ``real_margin``.
    """

    NAME = "gauda"
    DEFAULTS = {"oversample": 4}
    needs_value_model = True

    def __init__(self, params: dict):
        super().__init__(params)
        #: the next batch's candidate 0 when another job already sampled it (the run's RD set: see
        #: ``segsynth.config.candidate_source``); images in [-1, 1], used by one ``sample`` call
        self.first_candidates: torch.Tensor | None = None

    def check(self):
        if int(self.params["oversample"]) < 1:
            self._fail("oversample", "must be ≥ 1")

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        if value_model is None:
            raise ValueError(f"sampler {self.NAME!r} needs the frozen segmenter f_θ (value_model)")
        sources = _require_sources(self.NAME, source_images, masks)
        rd = DDIMSampler(self.params)
        real_margin = margin_uncertainty(value_model(sources))
        candidates, scores = [], []
        first, self.first_candidates = self.first_candidates, None
        for k in range(int(self.params["oversample"])):
            if k == 0 and first is not None:
                if len(first) != len(masks):
                    raise ValueError(f"{len(first)} first candidates for {len(masks)} masks")
                images = first.to(sources)
            else:
                images, _ = rd.sample(generator, masks, [candidate_seed(s, k) for s in noise_seeds])
            candidates.append(images)
            scores.append(margin_uncertainty(value_model(images.to(sources))) / real_margin.clamp_min(1e-6))
        scores = torch.stack(scores)                       # (K, B)
        best = scores.argmax(0)                            # first maximum on ties
        stacked = torch.stack(candidates)                  # (K, B, C, H, W)
        columns = torch.arange(len(masks), device=best.device)
        chosen = stacked[best, columns]
        selected, means = scores[best, columns].tolist(), scores.mean(0).tolist()
        records = [{"selected_score": s, "candidate_score_mean": m, "selected_candidate": k, "real_margin": r}
                   for s, m, k, r in zip(selected, means, best.tolist(), real_margin.tolist())]
        return chosen, records
