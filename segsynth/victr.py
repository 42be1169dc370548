"""ViCTr (Susladkar et al., "ViCTr: Vital Consistency Transfer for Pathology Aware Image Synthesis"): a
rectified-flow mask-to-image generator with Tweedie's correction, trained in two stages (Stage 1 on a source
dataset, then EWC-anchored LoRA fine-tuning on the target) and sampled in 1–4 Euler steps.

The paper's path and target (§3.3, eq. 5), in diffusers' flow-matching convention (σ = 0 is data, σ = 1 noise):
``x_σ = (1 − σ)·x0 + σ·ε`` and the velocity ``u = ε − x0``; an Euler step is ``x_σ' = x_σ + (σ' − σ)·u``.

Tweedie's correction (§3.2). On this path the conditional score is ``∇log p(x_σ | x0) = −ε/σ`` and Tweedie's
posterior mean is ``E[x0 | x_σ] = x_σ − σ·u``. The paper subtracts ``(1 − ᾱ)·∇log p`` from the velocity target
and adds it back in the sampling ODE; ᾱ is "the cumulative product of the schedule's variance decay factors",
which a flow does not have, so we take the ᾱ of the variance-preserving schedule at the same signal-to-noise
ratio: ``ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²)``. With ``tweedie`` on, the network's output is trained towards

    f* = u − (1 − ᾱ)·ε/σ        (= u + (1 − ᾱ)·∇log p(x_σ | x0), the paper's corrected objective)

and the sampler adds the Tweedie term back with the score of its own estimate, ε̂ = x_σ + (1 − σ)·u; solved for u
this is the closed form of ``velocity_from_output`` (its denominator 1 − 3σ + 3σ² is never below ¼, so every σ
is invertible). The corrected initialisation is the one-step estimate from pure noise, x̂0 = x_1 − u(x_1, 1):
at σ = 1 the corrected network predicts −x0 itself. Said plainly: at the optimum both parameterisations describe
the same ODE, as ε-, v- and x0-prediction do; what the correction changes is what the network learns to output
(it shifts the target by the Tweedie term), which is the paper's claim to test (Table 4, with/without).

Two-stage training (§3.3). Stage 1 (``train_victr_stage1``, a job of its own shared by every generator with the
same ``victr_stage1_settings``) trains the generator's trainable networks on the source dataset with the flow
loss plus the pixel L2 and SSIM (MONAI) terms on the Tweedie estimate; then the diagonal empirical Fisher of
the Stage-1 loss is estimated at the Stage-1 weights (``estimate_fisher``). Stage 2 freezes them, puts LoRA
adapters (peft) into the layers Stage 1 trained (``lora.target_modules`` of those networks) and trains only the
adapters on the target dataset with: the flow loss; the spatial consistency loss between the adapted and the
frozen base model's estimates of x0; the temporal consistency loss between the adapted model's estimates at σ
and at σ − Δ on the same path (the later one a stop-gradient target); pixel L2 and SSIM on the estimate; and the
EWC penalty ``λ/2 · Σ F·(θ − θ*)²`` on the effective (base + adapter) weights. Each term has a weight, 0 turns
it off. The adapters are merged into the weights when the run ends, so the saved generator is a plain one.

Sampling. Every sampler of the project (RD, VGD, the Miner, the baselines) is written against DDIM's ε. A flow
is served to them in ε (``MaskToImageGenerator._flow_noise``): x_VP = √ᾱ·x0 + √(1−ᾱ)·ε of the generator's
reference schedule is x_σ scaled by √ᾱ + √(1−ᾱ) with σ = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)), both share ε, and a DDIM step
(η = 0) between two such timesteps is exactly the flow's Euler step between their σ (tested against diffusers'
FlowMatchEulerDiscreteScheduler). With "trailing" timestep spacing the first step starts at σ ≈ 1, so RD with
1-4 steps is the paper's few-step sampler, and VGD and the Miner (x̂0 = x_σ − σ·u is DDIM's x̂0) run unchanged.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.canonical import load_split, read_meta
from .config import science, victr_options, victr_stage1_settings, weight_sources
from .errors import ConfigError, InputDataError
from .io import atomic_path, json_value
from .training import (Checkpointer, TrainingBatches, TrainingRecords, claim_checkpoint_dir, default_device,
                       inputs_fingerprint, releases_unused_claims, set_torch_threads)

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000  # the network's time input is σ·1000, diffusers' flow-matching convention


# -- the rectified-flow path and Tweedie's correction ---------------------------------------------------------
def _expand(sigma, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (the paper's forward diffusion, §3.3)."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u = ε − x0, the velocity of the straight path (eq. 5's target)."""
    return noise - x0


def training_target(x0: torch.Tensor, noise: torch.Tensor, sigma, tweedie: bool) -> torch.Tensor:
    """What the network's output is trained to match: u, or with Tweedie's correction u − (1 − ᾱ)·ε/σ. The
    correction's coefficient (1 − ᾱ)/σ = σ / ((1 − σ)² + σ²) is finite at σ = 0."""
    u = velocity_target(x0, noise)
    if not tweedie:
        return u
    s = _expand(sigma, x0)
    return u - s / ((1 - s) ** 2 + s**2) * noise


def velocity_from_output(output: torch.Tensor, x_t: torch.Tensor, sigma, tweedie: bool) -> torch.Tensor:
    """The velocity u the sampler integrates, from the network's output f: f itself, or with Tweedie's
    correction the solution of u = f + (1 − ᾱ)/σ·ε̂(u), ε̂ = x_σ + (1 − σ)·u:
    u = (f + k·x_σ) / (1 − k·(1 − σ)), k = σ / ((1 − σ)² + σ²)."""
    if not tweedie:
        return output
    s = _expand(sigma, x_t)
    k = s / ((1 - s) ** 2 + s**2)
    return (output + k * x_t) / (1 - k * (1 - s))


def x0_estimate(x_t: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """Tweedie's posterior mean on the straight path: x̂0 = x_σ − σ·u."""
    return x_t - _expand(sigma, x_t) * velocity


def noise_estimate(x_t: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """ε̂ = x_σ + (1 − σ)·u (so that x_σ = (1 − σ)·x̂0 + σ·ε̂)."""
    return x_t + (1 - _expand(sigma, x_t)) * velocity


# -- EWC --------------------------------------------------------------------------------------------------------
class ElasticWeightConsolidation:
    """Kirkpatrick et al.'s penalty λ/2 · Σ_i F_i·(θ_i − θ*_i)² with a diagonal Fisher F at the anchor θ*."""

    def __init__(self, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]):
        if anchor.keys() != fisher.keys():
            raise ValueError("EWC: the anchor and the Fisher name different parameters")
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.fisher = {k: v.detach().clone() for k, v in fisher.items()}

    def penalty(self, parameters: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        """λ/2 · Σ F·(θ − θ*)² over the anchored parameters found in ``parameters`` (name → tensor)."""
        terms = [(self.fisher[name].to(p) * (p - self.anchor[name].to(p)) ** 2).sum()
                 for name, p in parameters.items() if name in self.anchor]
        if not terms:
            raise ValueError("EWC: none of the given parameters is anchored")
        return 0.5 * weight * torch.stack(terms).sum()

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "fisher": self.fisher}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ElasticWeightConsolidation":
        return cls(state["anchor"], state["fisher"])


def estimate_fisher(parameters: dict[str, torch.nn.Parameter], losses: Iterable[Callable[[], torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher: the mean over batches of each parameter's squared loss gradient."""
    fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
    count = 0
    for loss_fn in losses:
        params = list(parameters.values())
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        for (name, _), grad in zip(parameters.items(), grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        count += 1
    if not count:
        raise ValueError("EWC: the Fisher needs at least one batch")
    return {name: value / count for name, value in fisher.items()}


# -- LoRA (peft) ------------------------------------------------------------------------------------------------
def add_lora(module: torch.nn.Module, rank: int, alpha: float | None, target_modules: list[str],
             seed: int) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters (peft) into ``module``'s layers named by ``target_modules``; returns the adapters'
    parameters, the only ones left trainable. B starts at zero (peft's default), so the adapted model starts
    equal to the base."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in module.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ConfigError("generators.*.victr.lora.target_modules", f"no layer named {missing} in the network")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules,
                                           lora_dropout=0.0), module)
    module.requires_grad_(False)
    params = []
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params.append(p)
    return params


def _lora_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def set_adapters(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA adapter of ``module`` on or off (off: the frozen base model)."""
    for _, layer in _lora_layers(module):
        layer.enable_adapters(enabled)


def effective_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name → weight as the adapted model computes it: a LoRA layer's base weight plus its adapter's
    (differentiable) delta, under the base layer's own parameter name, so Stage-1 anchors match."""
    weights = {}
    for name, layer in _lora_layers(module):
        base = layer.get_base_layer()
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        weights[f"{name}.weight"] = base.weight + delta
    return weights


def merge_lora(module: torch.nn.Module) -> None:
    """Fold every adapter into its base weight and remove the peft layers (a plain diffusers model again)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for _, layer in _lora_layers(module):
        layer.merge()
    recurse_remove_peft_layers(module)


# -- two-stage training -----------------------------------------------------------------------------------------
def _ssim_loss():
    from monai.losses import SSIMLoss

    return SSIMLoss(spatial_dims=2, data_range=2.0)  # images in [-1, 1]


def stage_losses(generator, images, masks, g, device, opts: dict, weights: dict, base_estimate=None,
                 ewc: ElasticWeightConsolidation | None = None, ewc_params=None, ssim=None) -> dict:
    """Every loss term of one training batch (those with weight 0 not computed), in a dict with ``total``."""
    batch = len(images)
    images, masks = images.to(device), masks.to(device)
    with torch.no_grad():
        x0 = generator.encode(images, g)
    noise = torch.randn(x0.shape, generator=g).to(device)
    sigma = torch.rand(batch, generator=g).to(device)
    drop = torch.rand(batch, generator=g) < opts.get("prompt_dropout", 0.0)
    x_t = interpolate(x0, noise, sigma)
    cond = generator.mask_condition(masks)
    if opts.get("mask_dropout", 0.0) > 0:
        # as segsynth.generator.train: the whole condition dropped, the unconditional flow that guidance on the
        # mask extrapolates away from; drawn only when enabled, so recipes without it keep their noise
        drop_mask = torch.rand(batch, generator=g) < opts["mask_dropout"]
        drop = drop | drop_mask
        cond = torch.where(drop_mask.to(device).view(-1, 1, 1, 1), generator.null_condition(cond), cond)
    prompt = generator.encode_prompt(masks)
    if drop.any():
        prompt = torch.where(drop.to(device).view(-1, 1, 1), generator.encode_prompt(masks, unconditional=True),
                             prompt)
    tweedie = opts["tweedie"]

    def estimate(x, s):
        out = generator.model_output(x, s * NUM_TRAIN_TIMESTEPS, cond, prompt)
        return out, x0_estimate(x, velocity_from_output(out, x, s, tweedie), s)

    output, x0_hat = estimate(x_t, sigma)
    terms = {"diffusion": F.mse_loss(output, training_target(x0, noise, sigma, tweedie))}
    if weights.get("l2") or weights.get("ssim"):
        decoded = generator.decode(x0_hat).clamp(-1, 1)
        if weights.get("l2"):
            terms["l2"] = F.mse_loss(decoded, images)
        if weights.get("ssim"):
            terms["ssim"] = ssim(decoded, images)
    if weights.get("spatial"):
        with torch.no_grad():
            base = base_estimate(x_t, sigma, cond, prompt)
        terms["spatial"] = F.mse_loss(x0_hat, base)
    if weights.get("temporal"):
        earlier = (sigma - opts["temporal_gap"]).clamp(min=0.0)
        with torch.no_grad():
            _, target = estimate(interpolate(x0, noise, earlier), earlier)
        terms["temporal"] = F.mse_loss(x0_hat, target)
    if weights.get("ewc"):
        terms["ewc"] = ewc.penalty(ewc_params(), 1.0)
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def _stage_modules(generator, pretrained: bool, train_unet: bool) -> dict[str, torch.nn.Module]:
    """The networks Stage 1 trains (and Stage 2 adapts): the ControlNet if there is one, the UNet unless a
    pretrained one stays frozen, the tiny model's prompt embedding (Stage 1 only)."""
    modules = {}
    if generator.controlnet is not None:
        modules["controlnet"] = generator.controlnet
    if not pretrained or train_unet:
        modules["unet"] = generator.unet
    return modules


def _target_meta(source_dir, data_dir) -> dict:
    """The target dataset's meta (the network is built for its classes, channels and resolution); Stage 1's
    source, when given, must have the same ones."""
    meta = read_meta(data_dir)
    if source_dir is not None:
        source_meta = read_meta(source_dir)
        for key in ("class_names", "channels", "resolution"):
            if source_meta[key] != meta[key]:
                raise ConfigError("generators.*.victr.source", f"Stage 1's dataset {source_dir} has {key} "
                                  f"{source_meta[key]!r}, the target {data_dir} {meta[key]!r}: one network cannot "
                                  "serve both")
    return {key: meta[key] for key in ("class_names", "channels", "resolution")}


def _build_flow_generator(cfg: dict, meta: dict, seed: int, prompt_template: str, tweedie: bool, device):
    from .generator.model import build_generator

    generator = build_generator(cfg, meta["class_names"], meta["channels"], meta["resolution"], seed,
                                prompt_template).to(device)
    generator.meta["flow"] = {"kind": "rectified", "tweedie": bool(tweedie)}
    return generator


@releases_unused_claims
def train_victr_stage1(cfg: dict, source_dir, data_dir, out_path, seed: int, prompt_template: str = "{classes}",
                       checkpoint_dir=None, threads: int = 1, stop_after: int | None = None) -> dict:
    """ViCTr's Stage 1 of the generator entry ``cfg`` (only its ``victr_stage1_settings`` are read): the
    generator's trainable networks trained on ``source_dir``'s train split, then the diagonal Fisher of the
    Stage-1 loss at the result. Saved to the file ``out_path`` (weights, the EWC anchor and Fisher, stats and the
    settings), from which every generator with these settings starts its Stage 2 (``train_victr``). The network
    is built for ``data_dir``'s (the target's) classes, channels and resolution, which the source must share.

    Checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir`` (``<out_path>.ckpt``); batches and noise
    come from (seed, step), so a killed run resumes to the same weights. ``stop_after`` simulates a kill.
    """
    settings = victr_stage1_settings(cfg)
    if settings is None:
        raise ConfigError("generators.*.victr", "this generator has no Stage 1 (no victr.source, or "
                          "victr.stage1.steps is 0)")
    set_torch_threads(threads)
    opts = {**victr_options(settings), "checkpoint_every": victr_options(cfg)["checkpoint_every"]}
    checkpoint_dir = claim_checkpoint_dir(
        checkpoint_dir or f"{out_path}.ckpt",
        {"trainer": "victr_stage1", "settings": settings, "seed": seed, "prompt_template": prompt_template,
         "inputs": inputs_fingerprint([source_dir, data_dir, *weight_sources(cfg)])})
    meta = _target_meta(source_dir, data_dir)
    device = default_device()
    generator = _build_flow_generator(settings, meta, seed, prompt_template, opts["tweedie"], device)
    modules = _stage_modules(generator, bool(settings.get("pretrained")), opts["train_unet"])
    trainable = list(modules.values()) + ([generator.prompt_embedding]
                                          if generator.prompt_embedding is not None else [])
    generator.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    began = time.time()
    stage1 = opts["stage1"]
    source = load_split(source_dir, "train")
    result = _run_stage("stage1", generator, params, TrainingBatches(source, opts["hflip"], source_dir),
                        stage1, stage1["losses"], opts, seed, device, checkpoint_dir / "stage1", _ssim_loss(),
                        stop_after=stop_after)
    if result.get("stopped"):
        return result
    fisher_params = {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters()
                     if _is_lora_target(n, opts["lora"]["target_modules"])}
    fisher = estimate_fisher(fisher_params, _fisher_losses(
        generator, TrainingBatches(source, False, source_dir), opts, seed, device,
        stage1["batch_size"]))
    ewc = ElasticWeightConsolidation({k: p.detach() for k, p in fisher_params.items()}, fisher)
    stats = {**result, "fisher_mean": float(torch.cat([f.flatten() for f in fisher.values()]).mean()),
             "seconds": round(time.time() - began, 2), "source": str(source_dir)}
    generator.to("cpu")
    with atomic_path(out_path) as tmp:
        torch.save({"generator": generator.state_dict(), "ewc": ewc.state_dict(), "stats": stats,
                    "settings": settings, "seed": seed, "prompt_template": prompt_template, "target": meta}, tmp)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def _load_stage1(path, cfg: dict, meta: dict, seed: int, prompt_template: str) -> dict:
    """The Stage-1 file ``path``, checked to be this generator's Stage 1 on this target."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    expected = {"settings": victr_stage1_settings(cfg), "seed": seed, "prompt_template": prompt_template,
                "target": meta}
    for key, value in expected.items():
        if json_value(state.get(key)) != json_value(value):
            raise InputDataError(path, f"is another Stage 1 than this generator's: its {key} differs "
                                 f"({state.get(key)!r} against {value!r})")
    return state


@releases_unused_claims
def train_victr(cfg: dict, stage1, data_dir, out_dir, seed: int, prompt_template: str = "{classes}",
                checkpoint_dir=None, threads: int = 1, stop_after: int | None = None) -> dict:
    """Train a ViCTr generator's Stage 2 (LoRA + EWC) on ``data_dir``'s train split, from ``stage1``, the file
    ``train_victr_stage1`` wrote for this entry (None when the entry has no Stage 1: Stage 2 then adapts the
    initial weights, without an EWC anchor, the "without Stage 1" ablation); save the merged generator to
    ``out_dir``.

    Checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir``; batches and noise come from (seed,
    step), so a killed run resumes to the same weights. ``stop_after`` (Stage-2 steps) simulates a kill.
    """
    set_torch_threads(threads)
    opts = victr_options(cfg)
    if (stage1 is None) != (victr_stage1_settings(cfg) is None):
        raise ConfigError("generators.*.victr", "this generator has a Stage 1 (victr.source and stage1.steps) and "
                          "none was given" if stage1 is None else f"this generator has no Stage 1, {stage1} was given")
    checkpoint_dir = claim_checkpoint_dir(
        checkpoint_dir or f"{out_dir}.ckpt",
        {"trainer": "victr", "cfg": science("generator", cfg), "seed": seed, "prompt_template": prompt_template,
         "inputs": inputs_fingerprint([stage1, data_dir, *weight_sources(cfg)])})
    meta = _target_meta(None, data_dir)
    device = default_device()
    generator = _build_flow_generator(cfg, meta, seed, prompt_template, opts["tweedie"], device)
    modules = _stage_modules(generator, bool(cfg.get("pretrained")), opts["train_unet"])
    ssim = _ssim_loss()
    began, stats, done_steps = time.time(), {}, 0
    if stage1 is not None:
        stage1_state = _load_stage1(stage1, cfg, meta, seed, prompt_template)
        generator.load_state_dict(stage1_state["generator"])
        stats["stage1"] = stage1_state["stats"]
        done_steps = stage1_state["stats"]["steps"]

    weights = dict(opts["losses"])
    ewc = None
    if weights.get("ewc"):
        if "stage1" in stats:
            ewc = ElasticWeightConsolidation.from_state_dict(stage1_state["ewc"])
        else:
            weights["ewc"] = 0.0  # no Stage 1, no anchor: the penalty is off (the stats say so)
    lora = opts["lora"]
    generator.requires_grad_(False)
    params = []
    for i, module in enumerate(modules.values()):
        params += add_lora(module, lora["rank"], lora["alpha"], lora["target_modules"], seed + i)
    generator.to(device)

    def base_estimate(x, s, cond, prompt):
        """The frozen Stage-1 model's x̂0 (every adapter off), the spatial consistency loss's target."""
        for m in modules.values():
            set_adapters(m, False)
        try:
            out = generator.model_output(x, s * NUM_TRAIN_TIMESTEPS, cond, prompt)
        finally:
            for m in modules.values():
                set_adapters(m, True)
        return x0_estimate(x, velocity_from_output(out, x, s, opts["tweedie"]), s)

    def ewc_params():
        return {f"{prefix}.{n}": w for prefix, m in modules.items() for n, w in effective_weights(m).items()}

    stage2 = opts["stage2"]
    batches = TrainingBatches(load_split(data_dir, "train"), opts["hflip"], data_dir)
    result = _run_stage("stage2", generator, params, batches, stage2, weights, opts, seed,
                        device, checkpoint_dir / "stage2", ssim, base_estimate=base_estimate, ewc=ewc,
                        ewc_params=ewc_params, stop_after=stop_after)
    if result.get("stopped"):
        return result
    stats["stage2"] = {**result, "losses": weights, "ewc_weight": weights.get("ewc", 0.0),
                       "lora_rank": lora["rank"], "lora_parameters": sum(p.numel() for p in params)}
    for module in modules.values():
        merge_lora(module)
    generator.to("cpu")
    generator.requires_grad_(False)
    generator.eval()
    stats.update(seconds=round(time.time() - began, 2), steps=done_steps + stage2["steps"],
                 tweedie=opts["tweedie"])
    generator.save(out_dir, stats=stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def _is_lora_target(param_name: str, targets: list[str]) -> bool:
    """Whether a parameter is the weight of a layer LoRA adapts (peft's suffix match on module names)."""
    if not param_name.endswith(".weight"):
        return False
    layer = param_name[: -len(".weight")]
    return any(layer == t or layer.endswith(f".{t}") for t in targets)


def _fisher_losses(generator, batches: TrainingBatches, opts: dict, seed: int, device, batch_size: int):
    """One Stage-1 flow loss per Fisher batch (stream 2 of the seed: other draws than training's)."""
    for i in range(opts["fisher_batches"]):
        images, masks, g = batches.draw(seed, i, batch_size, stream=2)

        def loss(images=images, masks=masks, g=g):
            return stage_losses(generator, images, masks, g, device, {**opts, "prompt_dropout": 0.0, "mask_dropout": 0.0},
                                {"diffusion": 1.0})["diffusion"]
        yield loss


def _run_stage(name: str, generator, params, batches: TrainingBatches, stage: dict, weights: dict, opts: dict, seed: int,
               device, checkpoint_dir: Path, ssim, base_estimate=None, ewc=None, ewc_params=None,
               stop_after: int | None = None) -> dict:
    """One stage's AdamW loop over ``params`` (cosine schedule, as the paper's both stages), resumable."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=stage["lr"], weight_decay=stage.get("weight_decay") or 0.0)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=stage.get("warmup_steps", 0),
                                 num_training_steps=stage["steps"])
    trainable = torch.nn.ParameterList(params)
    history: dict[str, list[float]] = {}
    checkpointer = Checkpointer(checkpoint_dir, opts["checkpoint_every"],
                                {"params": trainable, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                                 "records": TrainingRecords(history=history)})
    start = checkpointer.restore()
    stream = 0 if name == "stage1" else 1
    generator.train()
    for step in tqdm(range(start, stage["steps"]), initial=start, total=stage["steps"], desc=f"victr {name}",
                     mininterval=10):
        images, masks, g = batches.draw(seed, step, stage["batch_size"], stream)
        terms = stage_losses(generator, images, masks, g, device, opts, weights, base_estimate=base_estimate,
                             ewc=ewc, ewc_params=ewc_params, ssim=ssim)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, stage.get("grad_clip", 1.0))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for key, value in terms.items():
            history.setdefault(key, []).append(float(value.detach()))
        done = step + 1
        checkpointer.maybe_save(done, stage["steps"])
        if stop_after is not None and done >= stop_after:
            checkpointer.save(done)
            return {"steps": done, "stopped": True}
    generator.eval()
    return {"steps": stage["steps"], "resumed_from": start,
            "final_losses": {k: float(np.mean(v[-50:])) for k, v in history.items()}}
