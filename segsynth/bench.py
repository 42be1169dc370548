"""Benchmarks of segsynth's samplers: seconds per image and mean value score, guided vs. random DDIM.

``python -m segsynth.bench dryrun`` times ``snakemake -n`` of the default and of the paper preset (what every
start of the workflow, and every cluster job's own start-up, pays before any work).

``python -m segsynth.bench sampling`` times every sampler of :data:`SAMPLERS_TO_TIME` (RD = DDIM, VGD, the
Adversariality Miner) on the same batch of training masks with the same noise seeds and step count,
interleaved over ``--repeats`` rounds (the order rotates each round; the median round counts; an untimed
``--warmup``-step RD run comes first), and prints ONE JSON line: ``ddim_s_per_image``, ``vgd_s_per_image``,
``miner_s_per_image``, ``ratio`` (VGD / DDIM), ``miner_ratio`` (Miner / DDIM), ``ddim_value``, ``vgd_value``,
``miner_value`` (mean final value score, eq. 2 with λ = 1, of each method's images under f_θ),
``ddim_seg_loss``, ``vgd_seg_loss``, ``miner_seg_loss`` (mean ℓ_seg, f_θ's cross-entropy, the Miner paper's
adversariality), ``ddim_adherence``, … (f_θ's Dice in % of each method's images against their masks),
``<name>_peak_…_mb`` (see Memory below), plus the setup.

``--levers`` times the naive VGD (paper defaults: full Jacobian, time-travel and guidance on every step) and
each speed lever (detached Jacobian, guidance on a step window, time-travel on a window, batch size, and
combinations; ``--variant NAME='{json overrides}'`` adds more) and prints one JSON line per variant with
s/image, ``ratio`` to RD at the same batch size, the value, its ``gain`` over RD, and ``gain_kept``: the
fraction of a reference variant's value gain over RD the variant keeps, ``gain_kept_<reference>`` =
(V_variant − V_RD) / (V_reference − V_RD), for the naive VGD and for its full-gradient counterpart without
time-travel (null where the reference does not beat RD; ``--reference`` picks others).

Models: by default the demo's ``results/<dataset>/generators/tiny``, ``results/<dataset>/segmenters/unet/
real`` and ``results/<dataset>/miners/tiny/unet`` (``make demo`` builds them); ``--build-tiny`` instead trains
a generator, a segmenter and a Miner with the config's architectures, briefly, on the embedded MNI152 dataset at a small resolution — a quick check of the
machinery and the timings' proportions, not of the demo's numbers. Sampling settings are the config's
(``synthesis`` < the dataset's guidance scale < ``methods.<name>``) unless overridden on the command line.
Every sampler runs at the baseline's step count (a ``methods.<name>.steps`` of the config is reported as
``config_steps`` and not applied), so the ratios are per-step costs on the same trajectory length.

``--shapes sd15`` instead builds, with random weights and no download, the papers' architecture at 256²
(:func:`build_sd15_generator`): Stable Diffusion v1.5's UNet2DConditionModel (859.5 M parameters), a
``ControlNetModel.from_unet`` of it with SD ControlNet's conditioning embedding (16, 32, 96, 256) taking the
one-hot mask (361.3 M with 4 classes), SD's AutoencoderKL (83.7 M, latents 4 × 32 × 32) and SD's noise schedule
(scaled_linear, β 0.00085–0.012, 1000 steps, ε-prediction), wrapped in :class:`MaskToImageGenerator`. The
prompt goes through a ``ClassPromptEmbedding`` of width 768 instead of CLIP's text encoder (whose tokenizer
needs vocabulary files that are not here): the prompt is encoded once per batch, before the first step, so
this changes no per-step cost (CLIP ViT-L's text encoder is one 123 M-parameter pass per batch). f_θ is a
randomly initialised ``--value-segmenter`` of the config (default ``unet``, MONAI's UNet) at 256², the Miner an
untrained :class:`AdversarialityMiner` of the config's ``miner.channels`` over the 4 × 32 × 32 latent (its
zero-initialised head makes x_T^r = x_T, but every pass it costs runs). The masks are the dataset's (default
the embedded MNI152, prepared at 256²) training masks. Settings are ``--config`` deep-merged with ``--preset``
(default ``presets/paper.yaml``: 100 steps, η 0.2, guidance 7.5, batch 8), overridable with ``--steps``,
``--batch-size``, ``--n-images``, ``--repeats``; the samplers timed are RD, the paper's VGD (``methods.vgd``),
``vgd_fast`` (detached Jacobian, no time-travel) and the Miner, and ``--levers`` works as above. Timings and
peak memory are what those shapes cost; the values (and ℓ_seg) of random models mean nothing.

Memory: every timed run also records its peak — ``<name>_peak_cuda_allocated_mb`` (``torch.cuda.
max_memory_allocated`` over the run, weights included) on a GPU, else ``<name>_peak_rss_delta_mb`` (the
process's peak resident set during the run, ``VmHWM`` reset before it, minus the resident set at its start:
activations, gradients and buffers, not the weights); the ``memory`` key of the line says which, and
``memory_before_runs_mb`` what was held before the first run (the weights: CUDA allocated, or RSS), so a run's
total is that plus its delta on a CPU. Resetting ``VmHWM`` also resets the process's ``ru_maxrss``, so an outside
``/usr/bin/time`` or Snakemake benchmark sees only the peak since the last run began.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger("segsynth.bench")

#: The samplers ``sampling`` times: name → method entry (merged over the config's synthesis settings, and
#: over ``methods.<name>`` of the config when it defines that name). The first is the baseline of ``ratio``.
SAMPLERS_TO_TIME: dict[str, dict] = {
    "ddim": {"sampler": "ddim"},
    "vgd": {"sampler": "vgd"},
    "miner": {"sampler": "miner"},
}
BASELINE = "ddim"
#: config ``methods`` entries that stand for a name above (the config calls random DDIM "rd")
CONFIG_METHOD = {"ddim": "rd"}

#: ``--levers`` variants: name → (VGD overrides over the paper defaults, batch size or None = the config's)
LEVERS: dict[str, tuple[dict, int | None]] = {
    "naive": ({}, None),
    "detached": ({"jacobian": "detached"}, None),
    "no_time_travel": ({"time_travel": 0}, None),
    "time_travel_first_half": ({"window": [0.0, 0.5]}, None),
    "time_travel_first_quarter": ({"window": [0.0, 0.25]}, None),
    "guidance_first_half": ({"guidance_window": [0.0, 0.5]}, None),
    "no_time_travel+guidance_last_half": ({"time_travel": 0, "guidance_window": [0.5, 1.0]}, None),
    "detached+no_time_travel": ({"jacobian": "detached", "time_travel": 0}, None),
    "detached+no_time_travel+guidance_first_half": (
        {"jacobian": "detached", "guidance_window": [0.0, 0.5], "time_travel": 0}, None),
    "naive_batch_4": ({}, 4),
}

#: extra ``--levers`` variants of ``--shapes sd15``: the full gradient through the UNet with diffusers'
#: ``AutoencoderTiny`` (TAESD shapes, random weights) decoding x̂_{0|t} instead of the SD VAE, whose backward
#: costs ~2.6× a guided DDIM step on these shapes (../shared/docs/stack-facts.md), on all or a part of the steps
SD15_LEVERS: dict[str, tuple[dict, int | None]] = {
    "tiny_decoder": ({"decoder": "tiny"}, None),
    "tiny_decoder+no_time_travel": ({"decoder": "tiny", "time_travel": 0}, None),
    "tiny_decoder+no_time_travel+guidance_first_half": (
        {"decoder": "tiny", "time_travel": 0, "guidance_window": [0.0, 0.5]}, None),
    "tiny_decoder+no_time_travel+guidance_first_third": (
        {"decoder": "tiny", "time_travel": 0, "guidance_window": [0.0, 0.34]}, None),
    "tiny_decoder+no_time_travel+guidance_last_third": (
        {"decoder": "tiny", "time_travel": 0, "guidance_window": [0.66, 1.0]}, None),
}

#: ``--shapes sd15`` times the paper-exact VGD and the demo's fast lever set too
SAMPLERS_TO_TIME_SD15: dict[str, dict] = {
    "ddim": {"sampler": "ddim"},
    "vgd": {"sampler": "vgd"},
    "vgd_fast": {"sampler": "vgd"},
    "miner": {"sampler": "miner"},
}
#: ``vgd_fast`` where the config does not define it (as config.yaml does)
VGD_FAST = {"sampler": "vgd", "jacobian": "detached", "time_travel": 0}

REPO = Path(__file__).resolve().parents[1]
SD15_PRESET = REPO / "presets" / "paper.yaml"
SD15_RESOLUTION = 256
SD15_DATASET = "mni152"
#: runwayml / stable-diffusion-v1-5 unet/config.json, at sample_size 32 (256² images; the size is metadata)
SD15_UNET: dict = {
    "sample_size": SD15_RESOLUTION // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}
#: lllyasviel's SD 1.5 ControlNets: the conditioning embedding brings 256² down to the 32² latent
SD15_CONTROLNET: dict = {"conditioning_embedding_out_channels": (16, 32, 96, 256)}
#: stable-diffusion-v1-5 vae/config.json (scaling_factor is diffusers' default, SD's 0.18215)
SD15_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: stable-diffusion-v1-5 scheduler/scheduler_config.json, read into a DDPMScheduler as ``build_generator``'s
#: pretrained path reads it (``DDPMScheduler.from_pretrained``); the DDIM sampler inherits every key
SD15_SCHEDULER: dict = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "prediction_type": "epsilon",
}
#: SD 1.5 parameter counts (the ControlNet's with SD's 3 conditioning channels; each more adds 16·3·3 = 144)
SD15_PARAMETERS = {"unet": 859_520_964, "controlnet": 361_279_120, "vae": 83_653_863}


# -- models ---------------------------------------------------------------------------------------------------
def build_tiny(config: dict, dataset: str, out: Path, resolution: int, generator_steps: int,
               segmenter_steps: int, seed: int = 0) -> dict:
    """Train a generator and a segmenter with the config's architectures on the dataset at ``resolution``."""
    from .data.adapters import prepare_dataset
    from .generator.train import train_generator
    from .segmenters import train_segmenter

    paths = {"data": out / "data", "generator": out / "generator", "segmenter": out / "segmenter",
             "miner": out / "miner"}
    ds_cfg = dict(config["datasets"][dataset], resolution=resolution)
    gen_name = config["run"]["generators"][0]
    gen_cfg = copy.deepcopy(config["generators"][gen_name])
    gen_cfg["training"].update(steps=generator_steps, checkpoint_every=max(1, generator_steps))
    seg_cfg = copy.deepcopy(config["segmenters"][config["run"]["value_segmenter"]])
    seg_cfg.update(steps=segmenter_steps, checkpoint_every=max(1, segmenter_steps))
    began = time.perf_counter()
    if not paths["data"].exists():
        prepare_dataset(dataset, ds_cfg, paths["data"])
    if not paths["generator"].exists():
        train_generator(gen_cfg, paths["data"], paths["generator"], seed=seed,
                        prompt_template=ds_cfg.get("prompt_template", "{classes}"))
    if not paths["segmenter"].exists():
        train_segmenter(seg_cfg, paths["data"], paths["segmenter"], seed=seed)
    if not paths["miner"].exists():
        from .config import miner_schedule
        from .miner import train_miner

        train_miner(config["miner"], paths["data"], paths["generator"], paths["segmenter"], paths["miner"],
                    seed=seed, schedule=miner_schedule(config, dataset))
    log.info("built tiny models in %s in %.0f s", out, time.perf_counter() - began)
    return paths


def load_models(generator_dir, segmenter_dir, miner_dir):
    from .generator import MaskToImageGenerator
    from .miner import AdversarialityMiner
    from .segmenters import load_segmenter

    miner = AdversarialityMiner.load(miner_dir) if Path(miner_dir).exists() else None
    return MaskToImageGenerator.load(generator_dir), load_segmenter(segmenter_dir).as_value_model(), miner


def build_sd15_generator(class_names: list[str], channels: int, seed: int = 0, device=None,
                         prompt_template: str = "{classes}"):
    """The papers' generator with random weights: SD 1.5's UNet, a ControlNet of it, SD's VAE and noise
    schedule at 256², in :class:`MaskToImageGenerator`, frozen and in eval mode (see the module docstring).

    ``device`` is where the weights are made ("meta" makes none: shapes and parameter counts only)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from .generator.model import ClassPromptEmbedding, MaskToImageGenerator

    meta = {"class_names": list(class_names), "channels": int(channels),
            "resolution": [SD15_RESOLUTION, SD15_RESOLUTION], "prompt_template": prompt_template,
            "cross_attention_dim": SD15_UNET["cross_attention_dim"]}
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)  # CPU tensors, outside the device context
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=len(class_names), **SD15_CONTROLNET)
        vae = AutoencoderKL(**SD15_VAE)
        prompt_embedding = ClassPromptEmbedding(len(class_names) - 1, SD15_UNET["cross_attention_dim"])
    generator = MaskToImageGenerator(unet=unet, controlnet=controlnet, noise_scheduler=noise_scheduler, meta=meta,
                                     vae=vae, prompt_embedding=prompt_embedding)
    generator.requires_grad_(False)
    return generator.eval()


def random_value_model(config: dict, name: str, in_channels: int, class_names: list[str], seed: int = 0):
    """f_θ: the config's segmenter ``name`` randomly initialised from ``seed`` (on ``default_device()``), as the
    frozen value model a trained one gives (``Segmenter.as_value_model``). Returns (value model, segmenter)."""
    from .errors import ConfigError
    from .segmenters import TorchSegmenter, get_segmenter_class

    if name not in config["segmenters"]:
        raise ConfigError("--value-segmenter", f"{name!r} is not a segmenter of the config "
                          f"(defined: {sorted(config['segmenters'])})")
    cfg = config["segmenters"][name]
    cls = get_segmenter_class(cfg["kind"])
    if not issubclass(cls, TorchSegmenter):
        raise ConfigError("--value-segmenter", f"{name!r} ({cfg['kind']}) cannot be initialised without "
                          "training; pick a torch segmenter such as unet")
    segmenter = cls(cfg, in_channels, len(class_names), class_names)
    segmenter._initialise(seed)
    return segmenter.as_value_model(), segmenter


def sd15_models(config: dict, dataset: str, data_dir, value_segmenter: str, device) -> tuple:
    """(generator, f_θ, Miner, setup) of ``--shapes sd15`` for ``dataset``'s copy in ``data_dir``, on ``device``."""
    from .data.canonical import read_meta
    from .miner import AdversarialityMiner

    meta = read_meta(data_dir)
    class_names, channels = list(meta["class_names"]), int(meta.get("channels", 1))
    seeds = config.get("seeds", {})
    began = time.perf_counter()
    generator = build_sd15_generator(class_names, channels, seeds.get("generator", 0), device,
                                     config["datasets"][dataset].get("prompt_template", "{classes}"))
    value_model, segmenter = random_value_model(config, value_segmenter, channels, class_names,
                                                seeds.get("segmenter", 0))
    miner_cfg = config["miner"]
    torch.manual_seed(seeds.get("miner", 0))
    miner = AdversarialityMiner.from_config(generator.latent_shape(1)[1], miner_cfg)
    miner = miner.requires_grad_(False).eval().to(device)
    value_model = value_model.to(device)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    setup = {"shapes": "sd15", "weights": "random",
             "parameters": {"unet": count(generator.unet), "controlnet": count(generator.controlnet),
                            "vae": count(generator.vae), "prompt_embedding": count(generator.prompt_embedding),
                            "value_model": count(value_model), "miner": count(miner)},
             "value_segmenter": f"{value_segmenter} ({segmenter.kind})", "miner_channels": miner.config["features"],
             "build_s": round(time.perf_counter() - began, 1)}
    log.info("built the sd15 models with random weights in %.0f s: %s", setup["build_s"], setup["parameters"])
    return generator, value_model, miner, setup


def prepare_data(config: dict, dataset: str, out: Path, resolution: int) -> Path:
    """The dataset's canonical copy at ``resolution`` in ``out`` (reused when it is there)."""
    from .data.adapters import prepare_dataset

    if not out.exists():
        prepare_dataset(dataset, dict(config["datasets"][dataset], resolution=resolution), out)
    return out


def load_config(path, preset=None) -> dict:
    """``path``'s config, deep-merged with ``preset``'s as ``snakemake --configfile path preset`` merges them."""
    from .config import read_configs

    return read_configs([path, preset] if preset else [path])


# -- memory ---------------------------------------------------------------------------------------------------
def _round(value, digits: int):
    return None if value is None else round(value, digits)


def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Hand memory that earlier runs freed back to the OS (glibc keeps freed heap pages resident), so the next
    run's resident set starts from what is live and its peak measures what it allocates itself."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (``VmHWM``; Linux ≥ 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_kb("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """The peak memory of one timed run, in MiB: ``start()`` before it, ``stop()`` after it.

    CUDA: ``torch.cuda.max_memory_allocated`` since ``start`` (the allocator's peak, weights included). CPU: the
    process's peak resident set since ``start`` (``VmHWM``, reset by ``start``, after freed heap memory is
    returned to the OS with glibc's ``malloc_trim``) minus its resident set at ``start``; where ``VmHWM`` cannot
    be reset, the growth of ``ru_maxrss`` (a lower bound: 0 for a run that peaks below an earlier one). ``key``
    names the measure in the JSON line, ``how`` says it in words."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.key = "peak_cuda_allocated_mb"
            self.how = "torch.cuda.max_memory_allocated over the run (weights included)"
        elif _reset_peak_rss():
            self.key, self.how = "peak_rss_delta_mb", ("process peak RSS over the run (VmHWM reset before it) minus "
                                                       "RSS at its start (weights excluded)")
        else:
            self.key = "peak_rss_growth_mb"
            self.how = "growth of the process's ru_maxrss over the run (a lower bound)"
        self._start = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.key == "peak_rss_delta_mb":
            _release_free_memory()
            _reset_peak_rss()
            self._start = _proc_kb("VmRSS")
        else:
            self._start = self._maxrss_kb()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        if self.key == "peak_rss_delta_mb":
            return (_proc_kb("VmHWM") - self._start) / 2**10
        return (self._maxrss_kb() - self._start) / 2**10

    def current(self) -> float | None:
        """What is held now, in MiB (CUDA: allocated; CPU: resident set), e.g. the weights before the runs."""
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        rss = _proc_kb("VmRSS")
        return None if rss is None else rss / 2**10

    @staticmethod
    def _maxrss_kb() -> int:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


# -- timing ---------------------------------------------------------------------------------------------------
def run_sampler(params: dict, generator, value_model, masks: torch.Tensor, seeds: list[int], batch_size: int,
                miner=None):
    """All images of ``masks`` in batches of ``batch_size``; returns (images, seconds)."""
    from .sampling import build_sampler

    sampler = build_sampler("bench", params)
    if sampler.needs_miner:
        sampler.attach_miner(miner)
    began = time.perf_counter()
    images = []
    for start in range(0, len(masks), batch_size):
        x, _ = sampler.sample(generator, masks[start:start + batch_size], seeds[start:start + batch_size],
                              value_model)
        images.append(x.detach())
    if images[-1].is_cuda:
        torch.cuda.synchronize()  # the clock stops when the device is done, not when the last kernel is queued
    return torch.cat(images), time.perf_counter() - began


def mean_terms(value_model, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean final value score (eq. 2, λ = 1, as synthesis records it), mean ℓ_seg of the images under f_θ, and
    their mask adherence: f_θ's Dice (%) of its arg-max labels against the conditioning masks, the nan-mean over
    foreground classes per image, then the mean over images (as ``evaluation.score_synthetic`` scores a set)."""
    from .evaluation import dice_scores
    from .sampling.value import value_terms

    with torch.no_grad():
        logits = value_model(images)
        terms = value_terms(logits, masks.to(images.device))
    dice = dice_scores(logits.argmax(1).cpu().numpy().astype(np.uint8), masks.cpu().numpy(), logits.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an image without foreground has a NaN mean
        adherence = 100 * float(np.nanmean(np.nanmean(dice, axis=1)))
    return {"value": float(terms["value"].mean()), "seg_loss": float(terms["seg_loss"].mean()),
            "adherence": adherence}


def time_samplers(variants: dict[str, tuple[dict, int]], generator, value_model, masks, seeds,
                  repeats: int, miner=None, memory: PeakMemory | None = None,
                  warmup_steps: int = 0) -> dict[str, dict]:
    """Time each variant (name → (params, batch size)) ``repeats`` times, interleaved with a rotating order.

    With ``warmup_steps`` > 0 an untimed run of the first DDIM variant (else the first variant) at that many
    steps on one batch comes first, so one-time costs (CUDA context and kernel loading, oneDNN primitives, the
    first touch of fresh memory) do not land on whichever variant happens to run first.

    Returns name → {"s_per_image": median over rounds, "s_per_image_min", "value", "seg_loss", "adherence"}
    (those of the first round; sampling is deterministic given the seeds, so every round draws the same
    images), plus "peak_mb", the largest peak of its rounds, when ``memory`` measures it."""
    names = list(variants)
    if warmup_steps > 0:
        first = next((name for name in names if variants[name][0]["sampler"] == "ddim"), names[0])
        params, batch_size = variants[first]
        _, took = run_sampler(dict(params, steps=warmup_steps), generator, value_model, masks[:batch_size],
                              seeds[:batch_size], batch_size, miner)
        log.info("warm-up: %s at %d steps, %.2f s (untimed)", first, warmup_steps, took)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, dict] = {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            params, batch_size = variants[name]
            if memory is not None:
                memory.start()
            images, took = run_sampler(params, generator, value_model, masks, seeds, batch_size, miner)
            if memory is not None:
                peaks[name].append(memory.stop())
            seconds[name].append(took)
            if name not in values:
                values[name] = mean_terms(value_model, images, masks)
            log.info("round %d %-45s %.2f s", round_, name, took)
    n = len(masks)
    return {name: {"s_per_image": statistics.median(seconds[name]) / n, "s_per_image_min": min(seconds[name]) / n,
                   **values[name], **({"peak_mb": max(peaks[name])} if peaks[name] else {})} for name in names}


# -- the command ----------------------------------------------------------------------------------------------
def method_entry(config: dict, dataset: str, name: str, base: dict, overrides: dict) -> dict:
    """The settings of ``name``: config synthesis < dataset guidance scale < ``methods.<name>`` < base <
    command-line overrides."""
    from .config import method_params, synthesis_defaults

    config_name = CONFIG_METHOD.get(name, name)
    if config_name in config.get("methods", {}):
        params = method_params(config, dataset, config_name)
    else:
        params = synthesis_defaults(config, dataset)
    params.update(base)
    params.update(overrides)
    return params


def sampling(args) -> int:
    from . import sampling as _sampling  # noqa: F401  (registers the samplers)
    from .data.canonical import load_split, read_meta
    from .sampling import vgd  # noqa: F401  (registers "vgd" until sampling/__init__ imports it)
    from .sampling.base import noise_seed
    from .sampling.synthesize import conditioning_sources
    from .precision import autocast, compute_dtype, configure
    from .training import default_device, set_torch_threads

    set_torch_threads(args.threads)
    sd15 = args.shapes == "sd15"
    preset = args.preset if args.preset is not None else (str(SD15_PRESET) if sd15 else None)
    config = load_config(args.config, preset or None)
    dataset = args.dataset or (SD15_DATASET if sd15 and SD15_DATASET in config["datasets"]
                               else config["run"]["datasets"][0])
    device = default_device()
    tmp = None
    if (args.build_tiny or (sd15 and args.data is None)) and args.build_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="segsynth-bench-")
    out = Path(args.build_dir or tmp.name) if tmp is not None or args.build_dir else None
    if sd15:
        paths = {"data": Path(args.data) if args.data else
                 prepare_data(config, dataset, out / f"data-{dataset}-{SD15_RESOLUTION}", SD15_RESOLUTION)}
    elif args.build_tiny:
        paths = build_tiny(config, dataset, out, args.build_resolution, args.build_generator_steps,
                           args.build_segmenter_steps)
    else:
        paths = {"data": Path(args.data or f"results/{dataset}/data"),
                 "generator": Path(args.generator or f"results/{dataset}/generators/tiny"),
                 "segmenter": Path(args.segmenter or f"results/{dataset}/segmenters/unet/real"),
                 "miner": Path(args.miner or f"results/{dataset}/miners/tiny/unet")}
        needed = {k: p for k, p in paths.items() if k != "miner" or not args.levers}  # --levers times VGD alone
        missing = [str(p) for p in needed.values() if not p.exists()]
        if missing:
            print(f"segsynth.bench: missing {', '.join(missing)}; run `make demo` first (it trains the generator, "
                  "the real-only segmenter and the Miner), point --generator/--segmenter/--data at trained ones, or pass "
                  "--build-tiny to train tiny ones on the fly.", file=sys.stderr)
            return 2
    try:
        if sd15:
            resolution = tuple(read_meta(paths["data"])["resolution"])
            if resolution != (SD15_RESOLUTION, SD15_RESOLUTION):
                print(f"segsynth.bench: --shapes sd15 needs {SD15_RESOLUTION}² masks; {paths['data']} holds "
                      f"{resolution}", file=sys.stderr)
                return 2
            generator, value_model, miner, model_setup = sd15_models(config, dataset, paths["data"],
                                                                     args.value_segmenter, device)
            samplers = dict(SAMPLERS_TO_TIME_SD15)
            if "vgd_fast" not in config.get("methods", {}):
                samplers["vgd_fast"] = dict(VGD_FAST)
        else:
            generator, value_model, miner = load_models(paths["generator"], paths["segmenter"], paths["miner"])
            generator, value_model = generator.to(device), value_model.to(device)
            model_setup, samplers = {}, SAMPLERS_TO_TIME
        # the config's precision (segsynth.precision) as a synthesis job runs it: float32 on a CPU
        precision = args.precision or config.get("precision", "fp32")
        configure(precision, device)
        dtype = compute_dtype(precision, device)
        generator = generator.to(device, dtype)
        overrides = {k: v for k, v in {"steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale,
                                       "batch_size": args.batch_size}.items() if v is not None}
        vgd_overrides = dict(overrides, **json.loads(args.vgd or "{}"))
        base = {name: method_entry(config, dataset, name, entry, vgd_overrides if name == "vgd" else overrides)
                for name, entry in samplers.items()}
        # every sampler at the baseline's step count, so that the ratios compare the same trajectory length
        steps = base[BASELINE]["steps"]
        config_steps = {name: params["steps"] for name, params in base.items() if params["steps"] != steps}
        for params in base.values():
            params["steps"] = steps
        # --levers times VGD variants against RD at the same batch size, VGD's (a preset may batch RD wider)
        batch_size = base["vgd" if args.levers else BASELINE]["batch_size"]
        train = load_split(paths["data"], "train")
        n = args.n_images or batch_size
        sources = conditioning_sources(len(train.masks), -(-n // len(train.masks)), args.seed)[:n]
        masks = torch.from_numpy(np.ascontiguousarray(train.masks[sources])).to(device)
        seeds = [noise_seed(args.seed, i) for i in range(n)]
        memory = PeakMemory(device)
        setup = {"dataset": dataset, "n_images": n, "steps": steps,
                 "eta": base[BASELINE]["eta"], "guidance_scale": base[BASELINE]["guidance_scale"],
                 "resolution": list(train.images.shape[2:]), "latent": generator.latent_space,
                 "repeats": args.repeats, "warmup_steps": args.warmup, "threads": args.threads, "seed": args.seed,
                 "device": str(device), "precision": f"{precision} ({dtype or torch.float32})",
                 "timing": "median of interleaved rounds", "memory": memory.how,
                 "memory_before_runs_mb": _round(memory.current(), 1), **model_setup}
        if preset:
            setup["preset"] = str(preset)
        if config_steps:
            setup["config_steps"] = config_steps
        if args.levers:
            extra = {}
            if sd15:  # a random TAESD saved where the tiny-decoder levers load it (from_pretrained)
                from diffusers import AutoencoderTiny

                taesd = Path(tempfile.mkdtemp(prefix="segsynth-taesd-"))
                torch.manual_seed(0)
                AutoencoderTiny().save_pretrained(taesd)
                extra = {name: (dict(overrides, tiny_decoder=str(taesd)), b)
                         for name, (overrides, b) in SD15_LEVERS.items()}
            with autocast(dtype, device):
                levers(args, base, generator, value_model, masks, seeds, batch_size, setup, memory, extra)
        else:
            variants = {name: (params, params.get("batch_size", batch_size)) for name, params in base.items()}
            setup["batch_size"] = batch_size
            if any(b != batch_size for _, b in variants.values()):  # e.g. the paper preset's 32 for RD, 8 for VGD
                setup["batch_sizes"] = {name: b for name, (_, b) in variants.items()}
            with autocast(dtype, device):
                result = time_samplers(variants, generator, value_model, masks, seeds, args.repeats, miner, memory,
                                       args.warmup)
            line = {}
            for name, r in result.items():
                line[f"{name}_s_per_image"] = round(r["s_per_image"], 5)
            line["ratio"] = round(result["vgd"]["s_per_image"] / result[BASELINE]["s_per_image"], 3)
            for name in result:
                if name not in (BASELINE, "vgd"):
                    line[f"{name}_ratio"] = round(result[name]["s_per_image"] / result[BASELINE]["s_per_image"], 3)
            for name, r in result.items():
                line[f"{name}_value"] = round(r["value"], 4)
            for name, r in result.items():
                line[f"{name}_seg_loss"] = round(r["seg_loss"], 4)
            for name, r in result.items():
                line[f"{name}_adherence"] = round(r["adherence"], 2)
            for name, r in result.items():
                line[f"{name}_{memory.key}"] = round(r["peak_mb"], 1)
            line.update(setup)
            line["vgd_params"] = vgd.vgd_options(base["vgd"])
            if "vgd_fast" in base:
                line["vgd_fast_params"] = vgd.vgd_options(base["vgd_fast"])
            print(json.dumps(line), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def levers(args, base, generator, value_model, masks, seeds, batch_size, setup, memory=None,
           extra: dict | None = None) -> None:
    """One JSON line per lever variant (:data:`LEVERS` and ``extra``): s/image, ratio to RD at the same batch
    size, value, gain kept."""
    chosen = {**LEVERS, **(extra or {})}
    for spec in args.variant or []:
        name, _, overrides = spec.partition("=")
        chosen[name] = (json.loads(overrides or "{}"), None)
    references = args.reference.split(",")
    unknown = [r for r in references if r not in chosen]
    if unknown:
        raise SystemExit(f"--reference {unknown} not among the variants ({sorted(chosen)})")
    if args.only:
        keep = set(args.only.split(","))
        chosen = {k: v for k, v in chosen.items() if k in keep or k in references}
    variants = {}
    for name, (overrides, lever_batch) in chosen.items():
        b = lever_batch or batch_size
        variants[name] = (dict(base["vgd"], **overrides), b)
        variants.setdefault(f"rd@{b}", (base[BASELINE], b))
    result = time_samplers(variants, generator, value_model, masks, seeds, args.repeats, memory=memory,
                           warmup_steps=args.warmup)

    def gain_over_rd(name: str) -> float:
        return result[name]["value"] - result[f"rd@{chosen[name][1] or batch_size}"]["value"]

    for name, (overrides, lever_batch) in chosen.items():
        b = lever_batch or batch_size
        rd = result[f"rd@{b}"]
        r = result[name]
        gain = gain_over_rd(name)
        # undefined (null) where the reference VGD does not beat RD at all
        kept = {f"gain_kept_{ref}": round(gain / gain_over_rd(ref), 3) if gain_over_rd(ref) > 0 else None
                for ref in references}
        print(json.dumps({
            "variant": name, "overrides": overrides, "batch_size": b,
            "s_per_image": round(r["s_per_image"], 5), "rd_s_per_image": round(rd["s_per_image"], 5),
            "ratio": round(r["s_per_image"] / rd["s_per_image"], 3),
            "value": round(r["value"], 4), "rd_value": round(rd["value"], 4), "gain": round(gain, 4),
            **kept, **({memory.key: round(r["peak_mb"], 1), f"rd_{memory.key}": round(rd["peak_mb"], 1)}
                       if memory is not None else {}), **setup}), flush=True)


def dryrun(args) -> int:
    """Wall time of ``snakemake -n`` (parse + DAG, no job runs) for the embedded default and for the paper
    preset on placeholder datasets: every repeat a fresh process, as a user's or a cluster job's start-up."""
    import subprocess

    from .data.placeholders import write_placeholder_datasets

    repo = Path(__file__).resolve().parents[1]
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp) / "paths.yaml"
        paths.write_text(yaml.safe_dump(write_placeholder_datasets(Path(tmp) / "data")))
        cases = {"default": [], "paper": ["--configfile", "config.yaml", "presets/paper.yaml", str(paths)]}
        for name, extra in cases.items():
            seconds = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                result = subprocess.run([snakemake, "-n", "--nolock", "-q", *extra], cwd=repo, capture_output=True,
                                        text=True)
                seconds.append(time.perf_counter() - began)
                if result.returncode != 0:
                    print(result.stdout[-2000:] + result.stderr[-2000:], file=sys.stderr)
                    return 1
            print(json.dumps({"dryrun": name, "median_s": round(statistics.median(seconds), 2),
                              "min_s": round(min(seconds), 2), "repeats": args.repeats}), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segsynth.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dryrun", help="time `snakemake -n` of the default and of the paper preset")
    d.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("sampling", help="time RD, VGD and the Miner (s/image, ratios, value, ℓ_seg) on one batch "
                       "of training masks")
    p.add_argument("--config", default="config.yaml", help="config whose synthesis/method settings apply")
    p.add_argument("--preset", help="a config file deep-merged over --config, as snakemake --configfile merges "
                   "them (default: none; with --shapes sd15 presets/paper.yaml, '' for none)")
    p.add_argument("--shapes", choices=("trained", "sd15"), default="trained",
                   help="trained: the demo's (or --build-tiny's) models; sd15: SD 1.5 + ControlNet + SD's VAE at "
                   "256², a random f_θ and an untrained Miner, all randomly initialised (no download)")
    p.add_argument("--value-segmenter", default="unet", help="--shapes sd15: the config segmenter randomly "
                   "initialised as f_θ (a torch network; default unet)")
    p.add_argument("--dataset", help="config dataset (default: the first of run.datasets; with --shapes sd15 "
                   "mni152)")
    p.add_argument("--generator", help="generator directory (default results/<dataset>/generators/tiny)")
    p.add_argument("--segmenter", help="f_θ directory (default results/<dataset>/segmenters/unet/real)")
    p.add_argument("--miner", help="trained Miner directory (default results/<dataset>/miners/tiny/unet)")
    p.add_argument("--data", help="dataset directory (default results/<dataset>/data; with --shapes sd15 the "
                   "dataset prepared at 256² in --build-dir or a temporary directory)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the config's)")
    p.add_argument("--eta", type=float)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--batch-size", type=int, help="sampling batch size (default: the config's)")
    p.add_argument("--n-images", type=int, help="images per timed run (default: one batch)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps of an untimed RD run on one batch before the timed "
                   "rounds (default 1; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed of the masks and noise")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a workflow job)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16", "auto"],
                   help="segsynth.precision on a GPU (default: the config's; a CPU runs float32)")
    p.add_argument("--vgd", help="JSON overrides of the VGD settings, e.g. '{\"jacobian\": \"detached\"}'")
    p.add_argument("--levers", action="store_true", help="time the naive VGD and each speed lever")
    p.add_argument("--variant", action="append", metavar="NAME=JSON", help="an extra --levers variant")
    p.add_argument("--only", help="comma-separated --levers variants to run (the reference always runs)")
    p.add_argument("--reference", default="naive,no_time_travel", help="comma-separated --levers variants; "
                   "each adds gain_kept_<variant>: a variant's value gain over RD divided by that one's (default: "
                   "naive, the paper's VGD, and no_time_travel, its full-gradient counterpart without time-travel)")
    p.add_argument("--build-tiny", action="store_true", help="train tiny models on the fly instead")
    p.add_argument("--build-dir", help="keep (and reuse) the --build-tiny models, or --shapes sd15's dataset, here")
    p.add_argument("--build-resolution", type=int, default=32)
    p.add_argument("--build-generator-steps", type=int, default=300)
    p.add_argument("--build-segmenter-steps", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "sampling":
        return sampling(args)
    if args.command == "dryrun":
        return dryrun(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
