"""Fine-tune the mask-to-image generator (the ControlNet recipe of diffusers' ``train_controlnet.py``).

With a pretrained Stable Diffusion the UNet, VAE and text encoder stay frozen and only the ControlNet learns;
a tiny generator trains its UNet, ControlNet (if it has one) and prompt embedding together, from random weights
or from its ``init`` checkpoint. Loss: MSE on the network's target (ε, v or x0: the generator's
``prediction_type``), spatially weighted by ``training.weighting`` (``segsynth.law``: uniform, the ArSDM
ratio prior, Qiu et al.'s adaptive distillation or LAW; the teacher and LAW's φ train beside the generator,
checkpoint with it and are not part of the sampler); the prompt is dropped to the unconditional one with probability ``prompt_dropout``, and
the whole condition (mask and prompt) with probability ``mask_dropout``, so classifier-free guidance on the prompt
and on the mask works at sampling time; optional Min-SNR-γ loss weighting. Resumable at every
``checkpoint_every`` steps; batches and noise come from ``(seed, step)``, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from ..data.canonical import load_split, read_meta
from ..law import SpatialWeighting
from ..precision import autocast, compute_dtype, configure, grad_scaler
from ..config import science, weight_sources
from ..training import (Checkpointer, TrainingBatches, TrainingRecords, claim_checkpoint_dir, default_device,
                        inputs_fingerprint, releases_unused_claims, set_torch_threads)
from .model import load_parts, build_generator

log = logging.getLogger(__name__)


@releases_unused_claims
def train_generator(cfg: dict, data_dir, out_dir, seed: int, prompt_template: str = "{classes}",
                    checkpoint_dir=None, threads: int = 1, stop_after: int | None = None,
                    precision: str = "fp32", cpu_autocast: bool = False) -> dict:
    """Train the generator described by ``cfg`` on the train split of ``data_dir``; save it to ``out_dir``.

    ``stop_after`` ends the run after that many steps without writing the output (tests use it to simulate a
    killed job). ``precision`` (segsynth.precision; float32 on a CPU unless ``cpu_autocast``): forward passes
    under autocast, and, as ``train_controlnet.py`` does, the frozen networks stored in the reduced dtype; the
    trained networks, the EMA and the optimiser stay float32. Returns training statistics, also written to
    ``out_dir/train_stats.json``.
    """
    set_torch_threads(threads)
    train_cfg = cfg["training"]
    checkpoint_dir = claim_checkpoint_dir(
        checkpoint_dir or f"{out_dir}.ckpt",
        {"trainer": "generator", "cfg": science("generator", cfg), "seed": seed, "prompt_template": prompt_template,
         "precision": precision, "cpu_autocast": cpu_autocast,
         "inputs": inputs_fingerprint([data_dir, *weight_sources(cfg)])})
    meta = read_meta(data_dir)
    data = load_split(data_dir, "train")
    device = default_device()
    generator = build_generator(cfg, meta["class_names"], meta["channels"], meta["resolution"], seed,
                                prompt_template).to(device)

    pretrained = bool(cfg.get("pretrained"))
    trainable = [generator.controlnet] if generator.controlnet is not None else []
    if not pretrained or train_cfg["train_unet"]:
        trainable.append(generator.unet)
    if generator.prompt_embedding is not None:
        trainable.append(generator.prompt_embedding)
    generator.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    weighting = SpatialWeighting(generator, train_cfg).to(device)
    companions = [m for m in (weighting.teacher, weighting.delta_net) if m is not None]
    configure(precision, device)
    dtype = compute_dtype(precision, device, cpu_autocast)
    cast_frozen = []
    if dtype is not None:
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(generator, name)
            if module is not None and not any(module is m for m in trainable):
                module.to(dtype)
                cast_frozen.append(name)
    if train_cfg.get("gradient_checkpointing"):
        # diffusers' switch: activations recomputed in the backward pass (memory for time, same numbers)
        for module in (generator.controlnet, generator.unet):
            if module is not None and any(module is m for m in trainable):
                module.enable_gradient_checkpointing()

    # the teacher and φ learn with the generator's optimiser; the EMA (what is saved) covers the generator only
    companion_params = [p for m in companions for p in m.parameters()]
    optimizer = torch.optim.AdamW(params + companion_params, lr=train_cfg["lr"],
                                  weight_decay=train_cfg["weight_decay"])
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=train_cfg["warmup_steps"])
    objects = {"trainable": torch.nn.ModuleList(trainable), "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    if companions:
        objects["weighting"] = weighting
    scaler = grad_scaler(dtype, device)
    if scaler.is_enabled():  # float16: the loss scale resumes too
        objects["scaler"] = scaler
    ema = None
    if train_cfg["ema_decay"] > 0:
        ema = EMAModel(params, decay=train_cfg["ema_decay"], use_ema_warmup=True)
        objects["ema"] = ema
    losses: list[float] = []
    weight_stats: dict[str, deque] = {}  # per statistic its last 50 steps: all the summary reads
    objects["records"] = TrainingRecords(losses=losses, weight_stats=weight_stats)
    checkpointer = Checkpointer(checkpoint_dir, train_cfg["checkpoint_every"], objects)
    start = checkpointer.restore()
    if ema is not None:
        # the checkpoint was read to the CPU, and EMAModel keeps the tensors it is given: back to the model's device
        ema.to(device)

    steps, batch_size = train_cfg["steps"], train_cfg["batch_size"]
    scheduler = generator.noise_scheduler
    batches = TrainingBatches(data, train_cfg["hflip"], data_dir)
    generator.train()
    weighting.train()
    pending: list[torch.Tensor] = []
    began = time.time()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="generator", mininterval=10):
        # Randomness is drawn on the CPU (same numbers on any device), then the batch moves to the device.
        images, masks, g = batches.draw(seed, step, batch_size)
        images, masks = images.to(device), masks.to(device)
        with torch.no_grad(), autocast(dtype, device):
            x0 = generator.encode(images, g)  # diffusers draws CPU-generator noise on the CPU and moves it
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g).to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        drop = torch.rand(batch_size, generator=g) < train_cfg["prompt_dropout"]
        cond_image = generator.mask_condition(masks)
        mask_dropout = train_cfg.get("mask_dropout", 0.0)
        if mask_dropout > 0:
            # Dropping the mask drops the whole condition (mask and prompt): the unconditional model that mask
            # guidance extrapolates away from. Drawn only when enabled, so older recipes keep their noise.
            drop_mask = torch.rand(batch_size, generator=g) < mask_dropout
            drop = drop | drop_mask
            if drop_mask.any():
                cond_image = torch.where(drop_mask.to(device).view(-1, 1, 1, 1),
                                         generator.null_condition(cond_image), cond_image)
        with autocast(dtype, device):
            prompt = generator.encode_prompt(masks)
        if drop.any():  # decided on the CPU, where it was drawn: no wait for the GPU
            with autocast(dtype, device):
                uncond = generator.encode_prompt(masks, unconditional=True)
            prompt = torch.where(drop.to(device).view(-1, 1, 1), uncond, prompt)
        with autocast(dtype, device):
            output = generator.model_output(x_t, t, cond_image, prompt)
        target = generator.training_target(x0, noise, t)
        with autocast(dtype, device):
            loss, batch_stats = weighting(generator, output, target, x_t, t, cond_image, images, masks, prompt)
        for key, value in batch_stats.items():
            weight_stats.setdefault(key, deque(maxlen=50)).append(value)
        if train_cfg.get("snr_gamma"):
            # Min-SNR-γ weighting (Hang et al. 2023, as in diffusers' training examples): min(SNR, γ) over the
            # target's own SNR weight: SNR for ε, SNR + 1 for v, 1 for x0.
            snr = compute_snr(scheduler, t)
            own = {"epsilon": snr, "v_prediction": snr + 1}.get(scheduler.config.prediction_type, torch.ones_like(snr))
            loss = loss * torch.clamp(snr, max=train_cfg["snr_gamma"]) / own
        loss = loss.mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params + companion_params, train_cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        pending.append(loss.detach())
        done = step + 1
        stopping = stop_after is not None and done >= stop_after
        # reading a loss waits for the GPU: every 50 steps, and before a checkpoint (the records go into it)
        if done % 50 == 0 or done == steps or stopping or checkpointer.due(done, steps):
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
        if done % 50 == 0:
            log.info("step %d/%d loss %.4f", done, steps, np.mean(losses[-50:]))
        checkpointer.maybe_save(done, steps)
        if stopping:
            checkpointer.save(done)
            return {"steps": done, "stopped": True}

    if ema is not None:
        ema.copy_to(params)
    generator.to("cpu", torch.float32)
    if cast_frozen:
        # the frozen networks were rounded to the reduced dtype for speed: save the pretrained float32 weights
        parts = load_parts(cfg["pretrained"], has_vae=generator.vae is not None,
                            has_text=generator.text_encoder is not None)
        for name in cast_frozen:
            setattr(generator, name, parts[name])
    generator.requires_grad_(False)
    generator.eval()
    stats = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - began, 2),
             "final_loss": float(np.mean(losses[-50:])) if losses else None,
             "trainable_parameters": sum(p.numel() for p in params),
             "weighting": weighting_summary(weighting, losses, weight_stats)}
    extra = {}
    if weighting.delta_net is not None:
        extra["law_delta_net"] = weighting.delta_net.to("cpu")
    generator.save(out_dir, stats=stats, extra_modules=extra)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def weighting_summary(weighting: SpatialWeighting, losses: list, weight_stats: dict) -> dict:
    """What the stability column of the LAW ablation reads: the weighting's settings, whether every loss of the
    run was finite, the loss's first and last 50-step means, and per weight statistic its value over the last 50
    steps of this process (a resumed run's earlier steps are in its checkpoint's log, not here)."""
    finite = [value for value in losses if np.isfinite(value)]
    summary = {"kind": weighting.kind, **({k: v for k, v in weighting.opts.items() if k != "weighting"}
                                          if weighting.kind != "uniform" else {}),
               "losses_finite": len(finite) == len(losses),
               "first_loss": float(np.mean(finite[:50])) if finite else None,
               "last_loss": float(np.mean(finite[-50:])) if finite else None}
    for key, values in weight_stats.items():
        tail = torch.stack(list(values)).float().cpu().numpy()
        summary[key] = float(tail.mean())
    return summary
