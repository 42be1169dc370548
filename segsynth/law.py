"""LAW (Naman et al., 2026: "LAW & ORDER"): spatial loss weightings for training the mask-to-image generator.

A weighting turns the per-pixel squared error of the denoiser's output into the training loss. Four kinds
(generator key ``training.weighting``):

- ``uniform``: the plain mean squared error (eq. 2), the ControlNet baseline.
- ``ratio``: the ArSDM prior w = m·(1 − r) + (1 − m)·r (eq. 3), r = the lesion-area ratio of the sample's mask.
  Multi-class masks: each pixel is weighted by 1 − r_k, r_k the area ratio of its own class k (background
  included), which is eq. 3 exactly when there is one foreground class (a lesion pixel gets 1 − r, a background
  pixel 1 − (1 − r) = r); every class then weighs in inversely to its area. At the output resolution of a
  latent model the mask is the area-averaged one-hot (soft m), and w = Σ_k m_k·(1 − r_k).
- ``adaptive_distill``: Qiu et al.'s teacher–student setup that LAW builds on: a teacher that sees the clean
  image beside the mask (privileged, used only in training) is trained by L_T (eq. 10), the student by the
  ratio-weighted L_S and the distillation L_{S←T} = w ⊙ ‖ε̂_S − ε̂_T‖² (eq. 11), β_T = β_D = 0.05 (eq. 12).
- ``law``: ``adaptive_distill`` with the learned weights of eqs. 4–7: δ = σ(φ(f_t, m)/τ) from a 3-layer,
  32-channel conv net φ over the student prediction f_t and the mask, μ = 1 + γ(2δ − 1), w_adapt = w_ratio ⊙ μ,
  w_final = clamp(w_adapt / mean(w_adapt), w_min, w_max) (τ = 3, γ = 0.2, w_min = 1e-3, w_max = 2), plus the
  Dice regulariser λ_dice·(1 − Dice(δ, m)) (eq. 9, λ_dice = 1) over the foreground union.

Choices where the paper leaves a detail open:

- Every weight map is normalised by its per-sample spatial mean before use (``ratio`` and the teacher's too):
  eq. 3's raw weights sum to 2r(1 − r)·HW, which would scale each sample's loss by its lesion size and zero
  the loss of a mask without foreground. A map whose mean is 0 (an empty mask under eq. 3) becomes uniform.
  The LAW ablation's ``normalize: false`` drops exactly this step for the learned map (Table 4, row 2).
- φ reads the student prediction with its gradient stopped: φ learns from the weighted loss and the Dice
  term, the student from the weighted loss, and the student cannot lower its loss by steering the weights.
- The teacher's target in L_{S←T} is stopped too (a distillation target); L_T trains the teacher.
- Table 4's ablation as switches (``training.law``): ``normalize`` (eq. 7's division by the mean),
  ``w_max`` and ``w_min`` (eq. 7's clamp; null drops a bound), ``dice_weight`` (λ_dice; 0 drops eq. 9). The
  paper's rows add normalisation, then the min-weight clamp, then the Dice term; its text calls the maximum bound
  "critical for stability", so the normalisation row keeps it (``presets/law.yaml`` lists the four rows).
- The losses are taken on the generator's own target (ε, v or x0, ``prediction_type``), as its uniform
  training is; with ε-prediction (Stable Diffusion) they are the paper's equations as written.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .errors import ConfigError

WEIGHTINGS = ("uniform", "ratio", "adaptive_distill", "law")

#: ``training.law`` keys with the paper's values (eqs. 4–12 and its implementation details).
LAW_DEFAULTS: dict = {
    "hidden": 32,          # φ: 3 conv layers, 32 hidden channels
    "tau": 3.0,            # temperature of eq. 4
    "gamma": 0.2,          # eq. 5: μ ∈ [0.8, 1.2]
    "normalize": True,     # eq. 7: divide by the per-sample mean
    "w_min": 1.0e-3,       # eq. 7's clamp (null: no lower bound)
    "w_max": 2.0,          # eq. 7's clamp (null: no upper bound)
    "dice_weight": 1.0,    # λ_dice of eq. 12 (0: no Dice regulariser)
    "beta_teacher": 0.05,  # β_T of eq. 12
    "beta_distill": 0.05,  # β_D of eq. 12
}


def law_options(training: dict) -> dict:
    """The weighting kind and the ``law`` keys over :data:`LAW_DEFAULTS`, checked (ConfigError names the key)."""
    kind = training.get("weighting", "uniform")
    if kind not in WEIGHTINGS:
        raise ConfigError("generators.*.training.weighting", f"expected one of {WEIGHTINGS}, got {kind!r}")
    opts = {**LAW_DEFAULTS, **(training.get("law") or {})}
    unknown = set(opts) - set(LAW_DEFAULTS)
    if unknown:
        raise ConfigError("generators.*.training.law", f"unknown keys {sorted(unknown)}")
    if opts["w_min"] is not None and opts["w_max"] is not None and opts["w_min"] > opts["w_max"]:
        raise ConfigError("generators.*.training.law", f"w_min {opts['w_min']} exceeds w_max {opts['w_max']}")
    return {"weighting": kind, **opts}


def soft_masks(masks: torch.Tensor, num_classes: int, size) -> torch.Tensor:
    """(B, H, W) class indices → (B, K, h, w) class fractions at the loss's resolution (area-averaged one-hot)."""
    onehot = F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()
    if tuple(onehot.shape[-2:]) == tuple(size):
        return onehot
    return F.adaptive_avg_pool2d(onehot, tuple(size))


def ratio_prior(soft: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per class: (B, K, h, w) class fractions → (B, 1, h, w) weights Σ_k m_k·(1 − r_k), r_k = the
    area ratio of class k in the sample (unnormalised; see the module docstring)."""
    ratios = soft.mean(dim=(2, 3), keepdim=True)  # r_k
    return (soft * (1.0 - ratios)).sum(1, keepdim=True)


def mean_normalise(weights: torch.Tensor) -> torch.Tensor:
    """w / mean(w) per sample; a sample whose weights average 0 gets uniform weights."""
    mean = weights.mean(dim=(1, 2, 3), keepdim=True)
    ok = mean > 0
    return torch.where(ok, weights / torch.where(ok, mean, torch.ones_like(mean)), torch.ones_like(weights))


class DeltaNet(torch.nn.Module):
    """φ of eq. 4: three 3×3 convolutions (``hidden`` channels, ReLU between) over [f_t, m] → one logit map."""

    def __init__(self, in_channels: int, hidden: int = 32):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, hidden, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, hidden, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, 1, 3, padding=1))

    def forward(self, prediction: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([prediction, soft], dim=1))


def law_weights(delta: torch.Tensor, prior: torch.Tensor, opts: dict) -> torch.Tensor:
    """Eqs. 5–7: μ = 1 + γ(2δ − 1), w = w_ratio ⊙ μ, divided by its per-sample mean (``normalize``) and
    clamped to [w_min, w_max] (either bound null: not applied)."""
    weights = prior * (1.0 + opts["gamma"] * (2.0 * delta - 1.0))
    if opts["normalize"]:
        weights = mean_normalise(weights)
    if opts["w_min"] is not None or opts["w_max"] is not None:
        weights = weights.clamp(min=opts["w_min"], max=opts["w_max"])
    return weights


def soft_dice_loss(delta: torch.Tensor, foreground: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """Eq. 9 per sample, averaged: 1 − (2Σδm + ε_s)/(Σδ + Σm + ε_s)."""
    inter = (delta * foreground).flatten(1).sum(1)
    total = delta.flatten(1).sum(1) + foreground.flatten(1).sum(1)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def widen_input_conv(conv: torch.nn.Conv2d, extra: int) -> torch.nn.Conv2d:
    """A copy of ``conv`` with ``extra`` more input channels whose weights start at zero: the widened network
    computes exactly what the original did until it learns to use the new inputs (as Marigold widens SD)."""
    wide = torch.nn.Conv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide.to(conv.weight.device, conv.weight.dtype)


def build_teacher(generator) -> torch.nn.Module:
    """The privileged teacher of ``adaptive_distill`` and ``law``: a copy of the student's mask path that also
    sees the clean image — the ControlNet (its conditioning input widened by the image channels) or, for a tiny
    generator that takes the mask as UNet input channels, the UNet (its first convolution widened). It starts
    as the student and is trained by L_T; sampling never uses it."""
    if generator.controlnet is not None:
        teacher = copy.deepcopy(generator.controlnet)
        embedding = teacher.controlnet_cond_embedding
        embedding.conv_in = widen_input_conv(embedding.conv_in, generator.channels)
        teacher.config["conditioning_channels"] = embedding.conv_in.in_channels
    else:
        teacher = copy.deepcopy(generator.unet)
        teacher.conv_in = widen_input_conv(teacher.conv_in, generator.channels)
    teacher.requires_grad_(True)
    return teacher


def teacher_output(generator, teacher, x_t, t, cond_image, images, prompt) -> torch.Tensor:
    """The teacher's raw output at (x_t, t): the student's denoiser with the teacher's mask path, its condition
    the one-hot mask and the clean image ([−1, 1], pixel resolution) side by side."""
    if generator.controlnet is None:
        size = x_t.shape[-2:]
        image = images if tuple(images.shape[-2:]) == tuple(size) else F.interpolate(images, size=size, mode="area")
        return teacher(torch.cat([x_t, cond_image.to(x_t.dtype), image.to(x_t.dtype)], dim=1), t,
                       encoder_hidden_states=prompt, return_dict=False)[0]
    condition = torch.cat([cond_image, images.to(cond_image.dtype)], dim=1)
    down, mid = teacher(x_t, t, encoder_hidden_states=prompt, controlnet_cond=condition, conditioning_scale=1.0,
                        return_dict=False)
    return generator.unet(x_t, t, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]


class SpatialWeighting(torch.nn.Module):
    """The training loss of one weighting kind (module docstring). Holds what it trains beside the generator:
    the teacher (``adaptive_distill``, ``law``) and φ (``law``); both checkpoint with the generator's run."""

    def __init__(self, generator, training: dict):
        super().__init__()
        self.opts = law_options(training)
        self.kind = self.opts["weighting"]
        self.num_classes = generator.num_classes
        self.teacher = build_teacher(generator) if self.kind in ("adaptive_distill", "law") else None
        # φ reads the student's output (the UNet's output channels) and the class fractions of the mask
        self.delta_net = (DeltaNet(generator.unet.config.out_channels + generator.num_classes, self.opts["hidden"])
                          if self.kind == "law" else None)

    def forward(self, generator, output, target, x_t, t, cond_image, images, masks, prompt) -> tuple:
        """(loss per sample (B,), statistics of this batch) for the student's ``output`` against ``target``."""
        error = (output.float() - target.float()).pow(2)  # (B, C, h, w)
        stats: dict = {}
        if self.kind == "uniform":
            return error.flatten(1).mean(1), stats
        soft = soft_masks(masks, self.num_classes, error.shape[-2:])
        prior = ratio_prior(soft)
        if self.kind == "law":
            delta = torch.sigmoid(self.delta_net(output.detach().float(), soft) / self.opts["tau"])
            weights = law_weights(delta, prior, self.opts)
            foreground = 1.0 - soft[:, :1]
            dice = soft_dice_loss(delta, foreground)
            stats.update(delta_mean=delta.mean().detach(), delta_std=delta.std().detach(), dice=dice.detach())
            # collapse: the share of pixels pinned at a bound (all background at w_min, say)
            for bound in ("w_min", "w_max"):
                if self.opts[bound] is not None:
                    at = (weights.detach() - self.opts[bound]).abs() <= 1e-6 * max(1.0, self.opts[bound])
                    stats[f"at_{bound}"] = at.float().mean()
        else:
            weights = mean_normalise(prior)
        stats.update(weight_mean=weights.mean().detach(), weight_max=weights.amax().detach(),
                     weight_min=weights.amin().detach())
        loss = (weights * error).flatten(1).mean(1)
        if self.teacher is not None:
            teacher_out = teacher_output(generator, self.teacher, x_t, t, cond_image, images, prompt).float()
            loss_teacher = (teacher_out - target.float()).pow(2).flatten(1).mean(1)
            loss_distill = (weights * (output.float() - teacher_out.detach()).pow(2)).flatten(1).mean(1)
            loss = loss + self.opts["beta_teacher"] * loss_teacher + self.opts["beta_distill"] * loss_distill
            stats.update(teacher_loss=loss_teacher.mean().detach())
        if self.kind == "law" and self.opts["dice_weight"] > 0:
            loss = loss + self.opts["dice_weight"] * dice
        return loss, stats


def law_maps(generator_dir, data_dir, n: int = 6, timestep: int = 500, seed: int = 0, split: str = "train") -> dict:
    """A trained LAW generator's weights over ``n`` masks of ``split`` (evenly spread over the dataset's order):
    the ratio prior, the learned δ and the final weights at ``timestep``, each (n, h, w), with the images and
    masks; for the paper's Figs. 4 and 8. x_t is the real image noised with a seeded ε, f_t the saved
    generator's prediction there (its EMA weights: what training ends with)."""
    from pathlib import Path

    import numpy as np

    from .data.canonical import load_split
    from .generator import MaskToImageGenerator
    from .io import read_json

    generator_dir = Path(generator_dir)
    summary = read_json(generator_dir / "train_stats.json").get("weighting") or {}
    if summary.get("kind") != "law" or not (generator_dir / "law_delta_net.pt").is_file():
        raise ConfigError("analyses.law.figure", f"{generator_dir} was not trained with weighting: law")
    opts = {**LAW_DEFAULTS, **{k: summary[k] for k in LAW_DEFAULTS if k in summary}}
    generator = MaskToImageGenerator.load(generator_dir)
    delta_net = DeltaNet(generator.unet.config.out_channels + generator.num_classes, opts["hidden"])
    delta_net.load_state_dict(torch.load(generator_dir / "law_delta_net.pt", map_location="cpu"))
    data = load_split(data_dir, split)
    rows = np.unique(np.linspace(0, len(data.images) - 1, min(n, len(data.images))).round().astype(int))
    images = torch.from_numpy(np.ascontiguousarray(data.images[rows])) * 2 - 1
    masks = torch.from_numpy(np.ascontiguousarray(data.masks[rows])).long()
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = generator.encode(images, rng)
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.full((len(rows),), int(timestep), dtype=torch.long)
        x_t = generator.noise_scheduler.add_noise(x0, noise, t)
        output = generator.model_output(x_t, t, generator.mask_condition(masks), generator.encode_prompt(masks))
        soft = soft_masks(masks, generator.num_classes, output.shape[-2:])
        prior = ratio_prior(soft)
        delta = torch.sigmoid(delta_net(output.float(), soft) / opts["tau"])
        weights = law_weights(delta, prior, opts)
    return {"sample_ids": data.index["sample_id"].to_numpy()[rows], "images": data.images[rows],
            "masks": data.masks[rows], "prior": mean_normalise(prior)[:, 0].numpy(), "delta": delta[:, 0].numpy(),
            "weights": weights[:, 0].numpy(), "timestep": int(timestep)}
