"""The compared methods of the VGD paper (Table 1), each a sampler on the same frozen generator and f_θ.

Guided sampling          ``ugdm``         uncertainty (margin M_s) classifier guidance, Luo et al. 2024
                         ``tfg``          training-free guidance with V as the guidance function, Ye et al. 2024
                         ``adv_guidance`` adversarial guidance (AG) of the Adversariality Miner paper
Diffusion augmentation   ``advdiffuser``  adversarial guidance from a noised real image, its Grad-CAM region kept,
                                          Chen et al. 2023
                         ``diffaug``      diffuse the real image to a random t, denoise in one Tweedie step,
                                          Sastry et al. 2024
                         ``augpaint``     keep the real image's labelled foreground, inpaint the rest (RePaint with
                                          its resampling jumps), Hu & Shi 2025
Pre-generation selection ``gauda``        condition on the masks of the classes f_θ is least sure of on real data
                                          (class-wise adaptive resampling), Frisch et al. 2025

The four augmentation/selection baselines' papers are not in ``../shared/papers``; each class docstring says
which mechanism of its paper it implements and where the VGD comparison's setting departs from it.

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

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Sampler, noise_seed, register_sampler
from .ddim import DDIMSampler, DDIMTrajectory
from .value import margin_map, margin_uncertainty, normalised_cross_entropy, value_terms

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
    tiny pixel-space generators clip to the image range), so guidance scores the estimate the sampler uses.
    ``t``: one timestep, or a (B,) tensor of one per sample."""
    if torch.is_tensor(t) and t.ndim:
        a = scheduler.alphas_cumprod.to(x_t.device)[t.long().to(x_t.device)].to(x_t.dtype)
        a = a.view(-1, *[1] * (x_t.ndim - 1))
        x0 = (x_t - torch.sqrt(1.0 - a) * eps) / torch.sqrt(a)
    else:
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


def diffused_source(traj: DDIMTrajectory, x0: torch.Tensor, t: int) -> torch.Tensor:
    """The real image's diffusion variable x0 diffused to timestep ``t``, q(x_t | x_0) with the next draw of each
    sample's stream; x0 itself past the schedule's end (t < 0), where the clean image is put back."""
    if t < 0:
        return x0
    a = alpha_bar(traj.scheduler, t)
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * traj.next_noise()


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


class _MaskScore(torch.nn.Module):
    """f_θ reduced to one score per image for Grad-CAM: the logit of each pixel's mask class summed over the
    image (the segmentation Grad-CAM of Vinogradova et al. 2020, the target class's logits summed over its
    region). f_θ gives probabilities; log p_c − mean_k log p_k is the logit z_c − mean_k z_k, which, unlike
    log p_c, does not saturate where f_θ is confident."""

    def __init__(self, value_model: torch.nn.Module, masks: torch.Tensor):
        super().__init__()
        self.value_model = value_model
        self.masks = masks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_p = self.value_model(images).clamp_min(1e-30).log()
        logits = log_p - log_p.mean(1, keepdim=True)
        return logits.gather(1, self.masks.long().unsqueeze(1)).flatten(1).sum(1, keepdim=True)


_ACTIVATIONS = (torch.nn.ReLU, torch.nn.PReLU, torch.nn.LeakyReLU, torch.nn.SiLU, torch.nn.GELU, torch.nn.ELU)


def cam_layer(model: torch.nn.Module) -> str:
    """The layer Grad-CAM reads when none is configured: the last activation of f_θ (the decoder's last
    non-linear features). Not a raw convolution: one followed by instance normalisation gets a spatial-mean
    gradient of exactly zero (the norm removes per-channel shifts), so its Grad-CAM weights vanish."""
    names = [name for name, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]
    if not names:
        raise ValueError("f_θ has no activation module for Grad-CAM to read: set the method's cam_layer")
    return names[-1]


def grad_cam(value_model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
             layer: str | None = None) -> torch.Tensor:
    """MONAI's Grad-CAM of f_θ for each image's own mask: (B, 1, H, W), scaled to [0, 1] per image (max → 1;
    MONAI's default post-processing maps the max to 0, so it is replaced).

    It runs on a copy of f_θ, since MONAI registers hooks on the modules it reads."""
    from monai.visualize import GradCAM

    scorer = _MaskScore(copy.deepcopy(value_model), masks)
    layer = layer or cam_layer(scorer.value_model)
    cam = GradCAM(nn_module=scorer, target_layers=f"value_model.{layer}", postprocessing=lambda x: x)
    with torch.enable_grad():
        saliency = cam(images.detach().float().requires_grad_(True), class_idx=0).detach()
    low = saliency.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = saliency.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((saliency - low) / (high - low).clamp_min(1e-12)).to(images.dtype)


@register_sampler("advdiffuser")
class AdvDiffuserSampler(_GradientGuided):
    """AdvDiffuser (Chen et al. 2023): adversarial guidance on a trajectory that starts from a noised real image,
    with the real image's Grad-CAM region restored at every step.

    - Start: the source image x_0 is diffused to the first DDIM timestep that ``start_strength`` keeps
      (diffusers' img2img rule; 1 = the whole schedule), x_t ~ q(x_t | x_0) with the sample's x_T draw —
      AdvDiffuser's start from a noised dataset image, not from pure noise.
    - Adversarial step: x_{t−1} = DDIM(x_t) + s·σ̃_t²·sign(∇_{x_t} L_CE), PGD spread over the denoising
      trajectory and scaled, as classifier guidance is, by the step's DDPM posterior variance σ̃_t² (DDIM's σ_t²
      at η = 1, independent of the sampling η); L_CE is f_θ's cross-entropy against the target mask on the
      Tweedie estimate. ``sign: false`` uses the raw gradient (the classifier-guidance form).
    - Grad-CAM: m = Grad-CAM of f_θ on the real image for its own mask (MONAI, :func:`grad_cam`, at
      ``cam_layer``, default :func:`cam_layer`), resized to the diffusion variable; after each step
      x_{t−1} ← m ⊙ q(x_{t−1} | x_0) + (1 − m) ⊙ x_{t−1} (the clean x_0 at the last step): the regions that
      carry f_θ's evidence for the label are the real image's, the attack acts elsewhere, so the mask stays
      the image's label. ``gradcam: false`` leaves that out.
    Keys: ``scale`` (s), ``sign``, ``start_strength`` ∈ (0, 1], ``gradcam``, ``cam_layer``.
    Records: ``guidance_norm``, ``cam_mean`` (mean of m), ``start_timestep``.
    """

    NAME = "advdiffuser"
    DEFAULTS = {"scale": 1.0, "sign": True, "start_strength": 1.0, "gradcam": True, "cam_layer": None}

    def check(self):
        if self.params["scale"] < 0:
            self._fail("scale", "must be ≥ 0")
        for key in ("sign", "gradcam"):
            if not isinstance(self.params[key], bool):
                self._fail(key, "must be true or false")
        if not 0.0 < self.params["start_strength"] <= 1.0:
            self._fail("start_strength", "must be in (0, 1]")

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

    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        if value_model is None:
            raise ValueError(f"sampler {self.NAME!r} needs the frozen segmenter f_θ (value_model)")
        sources = _require_sources(self.NAME, source_images, masks)
        traj = self._trajectory(generator, masks, noise_seeds)
        masks = masks.to(traj.x.device)
        sources = sources.to(traj.x)
        x0 = _encode(traj, sources)
        steps = len(traj.timesteps)
        timesteps = traj.timesteps[steps - max(1, int(round(steps * self.params["start_strength"]))):]
        with torch.no_grad():
            traj.x = traj.scheduler.add_noise(x0, traj.x_T.to(x0), timesteps[:1])
        if self.params["gradcam"]:
            keep = grad_cam(value_model, sources, masks, self.params["cam_layer"])
            keep = F.adaptive_avg_pool2d(keep, tuple(traj.x.shape[-2:])).to(traj.x)
        else:
            keep = torch.zeros_like(traj.x[:, :1])
        objective = self.objective(value_model, masks)
        norms = torch.zeros(len(masks), device=traj.x.device)
        for t in timesteps:
            norms += self.guided_step(traj, t, objective, 0)
            if self.params["gradcam"]:
                with torch.no_grad():
                    real = diffused_source(traj, x0, prev_timestep(traj.scheduler, t))
                    traj.x = keep * real + (1.0 - keep) * traj.x
        norms /= len(timesteps)
        with torch.no_grad():
            images = traj.decode()
        cam_mean = keep.flatten(1).mean(1).tolist()
        return images.detach(), [{"guidance_norm": n, "cam_mean": c, "start_timestep": int(timesteps[0])}
                                 for n, c in zip(norms.tolist(), cam_mean)]


@register_sampler("diffaug")
class DiffAugSampler(_Baseline):
    """DiffAug (Sastry et al. 2024): diffuse the real image to a random timestep and denoise it in one step.

    ``mode: tweedie`` (the paper): per sample, t = ⌊u·max_strength·T⌋ with u ~ U(0, 1) (u = Φ(z) of a draw z of
    the sample's own stream, so t depends on the seed alone), x_t ~ q(x_t | x_0) from the source image (its
    latent in latent space) and the sample's x_T draw, and the image is the one-step Tweedie estimate
    x̂_0 = (x_t − √(1−ᾱ_t)·ε_φ(x_t, t | mask)) / √ᾱ_t — the paper's single forward and reverse step. DiffAug
    draws a new t for every example of every training batch; here each synthetic sample is one such draw, so a
    budget of b gives b draws per training image. The denoiser is conditioned on the image's own mask (the
    project's generators are mask-conditioned).
    ``mode: sdedit``: the VGD comparison's fixed-strength variant — noised to the DDIM timestep reached after
    (1 − ``strength``) of the schedule (diffusers' img2img rule), then denoised with the DDIM schedule.
    Keys: ``mode``, ``max_strength`` ∈ (0, 1] (tweedie), ``strength`` ∈ (0, 1] (sdedit).
    Records: ``timestep`` (tweedie; the start timestep in sdedit, −1 when no step remains), ``mode``.
    """

    NAME = "diffaug"
    DEFAULTS = {"mode": "tweedie", "max_strength": 1.0, "strength": 0.5}

    def check(self):
        if self.params["mode"] not in ("tweedie", "sdedit"):
            self._fail("mode", "must be tweedie or sdedit")
        for key in ("strength", "max_strength"):
            if not 0.0 < self.params[key] <= 1.0:
                self._fail(key, "must be in (0, 1]")

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        sources = _require_sources(self.NAME, source_images, masks)
        traj = self._trajectory(generator, masks, noise_seeds)
        x0 = _encode(traj, sources.to(traj.x))
        if self.params["mode"] == "tweedie":
            total = traj.scheduler.config.num_train_timesteps
            uniform = torch.special.ndtr(traj.next_noise().flatten(1)[:, 0].double())
            t = (uniform * self.params["max_strength"] * total).long().clamp(0, total - 1).to(x0.device)
            x_t = traj.scheduler.add_noise(x0, traj.x_T.to(x0), t)
            traj.x = tweedie(traj.scheduler, x_t, traj.noise(x_t, t), t)
            starts = t.tolist()
        else:
            steps = len(traj.timesteps)
            remaining = min(int(steps * self.params["strength"]), steps)
            timesteps = traj.timesteps[steps - remaining:]
            if remaining:
                traj.x = traj.scheduler.add_noise(x0, traj.x_T.to(x0), timesteps[:1])
                for step_t in timesteps:
                    traj.x = traj.step(traj.noise(traj.x, step_t), step_t, traj.x).prev_sample
            else:
                traj.x = x0
            starts = [int(timesteps[0]) if remaining else -1] * len(noise_seeds)
        images = traj.decode()
        return images, [{"mode": self.params["mode"], "timestep": int(t)} for t in starts]


def repaint_levels(steps: int, jump_length: int, jumps: int) -> list[int]:
    """RePaint's time schedule (Lugmayr et al. 2022) in DDIM steps: the sequence of levels (steps still to go,
    ``steps`` = x_T … 0 = x_0) the sampler visits. Going down one level is a denoising step; at every
    ``jump_length``-th level below the start the walk goes back up ``jump_length`` levels, ``jumps − 1`` times
    (RePaint's jump_n_sample), re-noising with q(x_t | x_{t−1}); ``jumps = 1`` is one plain pass."""
    remaining = {level: jumps - 1 for level in range(0, steps - jump_length, jump_length)}
    level, levels = steps, [steps]
    while level > 0:
        level -= 1
        levels.append(level)
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return levels


@register_sampler("augpaint")
class AugPaintSampler(_Baseline):
    """AugPaint (Hu & Shi 2025): keep the labelled foreground of a real image and inpaint everything else, so
    the new image's label is exact where it is kept — RePaint conditioned on the mask.

    Known region (``keep: foreground``, the paper): the mask's foreground in the diffusion variable's
    resolution — the pixel foreground in pixel space; in latent space a latent cell is known only if its whole
    footprint is foreground (so no background pixel is copied). ``keep: background`` repaints the foreground
    instead (the region the VGD re-implementation kept). Sampling follows RePaint: each DDIM step
    x_t → x_{t−1} (conditioned on the mask) is followed by replacing the known region with the real image
    noised to t−1, q(x_{t−1} | x_0), with fresh per-sample noise (the clean encoded image at the last step, so
    in pixel space the kept region equals the source exactly); RePaint's resampling walks the schedule of
    :func:`repaint_levels`, re-noising x_{t−1} → x_t ~ q(x_t | x_{t−1}) on the way up, so the inpainted part
    harmonises with the kept one. Keys: ``keep``, ``jumps`` (RePaint's jump_n_sample r ≥ 1; 1 = no
    resampling), ``jump_length`` (j ≥ 1). RePaint's 250-step setting is r = j = 10; on the short DDIM
    schedules here the defaults are r = 3, j = 2 (about 3× the steps of RD).
    Records: ``jumps``, ``known_fraction``, ``denoiser_steps``.
    """

    NAME = "augpaint"
    DEFAULTS = {"keep": "foreground", "jumps": 3, "jump_length": 2}

    def check(self):
        if self.params["keep"] not in ("foreground", "background"):
            self._fail("keep", "must be foreground or background")
        for key in ("jumps", "jump_length"):
            if int(self.params[key]) < 1:
                self._fail(key, "must be ≥ 1")

    @staticmethod
    def known_region(masks: torch.Tensor, latent_hw, keep: str = "foreground") -> torch.Tensor:
        """(B, 1, h, w) float: 1 where the diffusion variable shows only the kept region."""
        kept = (masks > 0) if keep == "foreground" else (masks == 0)
        other = (~kept).float().unsqueeze(1)
        if tuple(other.shape[-2:]) != tuple(latent_hw):
            other = F.adaptive_max_pool2d(other, tuple(latent_hw))
        return 1.0 - other

    @torch.no_grad()
    def sample(self, generator, masks, noise_seeds, value_model=None, source_images=None):
        sources = _require_sources(self.NAME, source_images, masks)
        traj = self._trajectory(generator, masks, noise_seeds)
        x0 = _encode(traj, sources.to(traj.x))
        known = self.known_region(masks, traj.x.shape[-2:], self.params["keep"]).to(traj.x)
        steps = len(traj.timesteps)
        levels = repaint_levels(steps, int(self.params["jump_length"]), int(self.params["jumps"]))
        for level, following in zip(levels, levels[1:]):
            if following < level:  # one DDIM step down, then the known region from the real image
                t = traj.timesteps[steps - level]
                unknown = traj.step(traj.noise(traj.x, t), t, traj.x).prev_sample
                known_x = diffused_source(traj, x0, prev_timestep(traj.scheduler, t))
                traj.x = known * known_x + (1.0 - known) * unknown
            else:  # one level back up: x_t ~ q(x_t | x_{t−1})
                t = traj.timesteps[steps - following]
                alpha_step = alpha_bar(traj.scheduler, t) / alpha_bar(traj.scheduler, prev_timestep(traj.scheduler, t))
                traj.x = math.sqrt(alpha_step) * traj.x + math.sqrt(1.0 - alpha_step) * traj.next_noise()
        images = traj.decode()
        fraction = known.flatten(1).mean(1)
        down = sum(b < a for a, b in zip(levels, levels[1:]))
        return images, [{"jumps": int(self.params["jumps"]), "known_fraction": f, "denoiser_steps": down}
                        for f in fraction.tolist()]


def candidate_seed(seed: int, k: int) -> int:
    """The noise seed of GAUDA's k-th candidate for a sample: the sample's own seed for k = 0 (so one candidate
    is exactly RD), a seed derived from it otherwise."""
    return int(seed) if k == 0 else noise_seed(int(seed), k)


def _generator_range(images, device) -> torch.Tensor:
    """Real images in [0, 1] (array or tensor) → f_θ's input range [-1, 1] on ``device``."""
    return torch.as_tensor(images).to(device=device, dtype=torch.float32) * 2 - 1


def class_uncertainty(value_model, images, masks: torch.Tensor, num_classes: int, batch_size: int = 16,
                      device="cpu") -> np.ndarray:
    """f_θ's uncertainty per class on real data: the mean margin uncertainty 1 − (p_top1 − p_top2) over the
    pixels the masks label with each class (NaN for a class no mask has). ``images`` in [0, 1], moved to
    ``device`` one batch at a time."""
    totals, counts = np.zeros(num_classes), np.zeros(num_classes)
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            probs = value_model(_generator_range(images[begin:begin + batch_size], device))
            margins = margin_map(probs).double()
            labels = masks[begin:begin + batch_size].to(margins.device).long()
            totals += torch.zeros(num_classes, dtype=torch.float64, device=margins.device).index_add_(
                0, labels.flatten(), margins.flatten()).cpu().numpy()
            counts += torch.bincount(labels.flatten(), minlength=num_classes)[:num_classes].cpu().numpy()
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


@register_sampler("gauda")
class GAUDASampler(_Baseline):
    """GAUDA (Frisch et al. 2025) as the VGD comparison re-implements it: a pre-generation selector from
    real-data-derived metrics.

    GAUDA's mechanism is class-wise adaptive resampling: what to generate is chosen by the segmenter's
    uncertainty per class, so the synthetic data goes to the classes the segmenter is least sure of. Here
    (``class_adaptive: true``) f_θ's per-class uncertainty u_c on the real training images
    (:func:`class_uncertainty`) picks, for each synthetic sample, a foreground class c with probability
    u_c / Σ u, then one of the training masks that contain c uniformly; the sample is RD on that mask. The
    draws come from the synthesis seed alone. GAUDA re-estimates u during segmenter training; with the frozen
    real-only f_θ of this benchmark it is estimated once (the rounds of VGD's Fig. 5 would re-estimate it).
    ``oversample`` = K > 1 adds the VGD re-implementation's post-hoc step: K RD candidates per mask (candidate
    0 from the sample's own seed, the others from seeds derived from it, :func:`candidate_seed`), the one with
    the highest margin uncertainty M_s of f_θ relative to M_s on the real image of its mask kept.
    ``class_adaptive: false, oversample: 1`` is RD exactly. Keys: ``class_adaptive``, ``oversample`` (≥ 1).
    Records: ``gauda_class`` (class adaptive), ``selected_score``, ``candidate_score_mean``,
    ``selected_candidate``, ``real_margin`` (oversample > 1).
    """

    NAME = "gauda"
    DEFAULTS = {"class_adaptive": True, "oversample": 1}
    needs_value_model = True

    def __init__(self, params: dict):
        super().__init__(params)
        self.first_candidates: torch.Tensor | None = None

    def check(self):
        if int(self.params["oversample"]) < 1:
            self._fail("oversample", "must be ≥ 1")
        if not isinstance(self.params["class_adaptive"], bool):
            self._fail("class_adaptive", "must be true or false")

    def choose_sources(self, value_model, images, masks, total, seed, batch_size=16, device="cpu"):
        """Class-adaptive conditioning masks (``images`` the real training images in [0, 1], ``masks`` (N, H, W)
        the training masks); None with ``class_adaptive: false``."""
        if not self.params["class_adaptive"]:
            return None
        with torch.no_grad():
            num_classes = int(value_model(_generator_range(images[:1], device)).shape[1])
        uncertainty = class_uncertainty(value_model, images, torch.from_numpy(masks), num_classes, batch_size,
                                        device)
        present = np.stack([(masks == c).reshape(len(masks), -1).any(1) for c in range(num_classes)], axis=1)
        classes = [c for c in range(1, num_classes) if present[:, c].any() and uncertainty[c] > 0]
        rng = np.random.default_rng([seed, 0x6A0DA])
        if not classes:  # no foreground anywhere: nothing to adapt to
            return rng.integers(0, len(masks), size=total), {"gauda_class": np.zeros(total, dtype=int)}
        weights = uncertainty[classes] / uncertainty[classes].sum()
        picked = rng.choice(classes, size=total, p=weights)
        sources = np.array([rng.choice(np.flatnonzero(present[:, c])) for c in picked])
        return sources, {"gauda_class": picked.astype(int)}

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
