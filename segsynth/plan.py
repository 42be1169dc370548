"""What a run of the benchmark costs on GPUs, before anything is submitted: ``make paper-plan``.

    python -m segsynth.plan --configfile config.yaml presets/paper.yaml paths.yaml [--directory DIR]

The jobs are Snakemake's own: the plan runs ``snakemake -n -F`` (``--remaining``: ``snakemake -n``, only what
is left) on the same config files and reads every job's rule, wildcards, GPU request and benchmark file from
the dry run. The work of each job comes from the config through the same functions the Snakefile uses
(``method_params``, the budget sweep's derived methods): images to synthesise = round(budget × |train|),
DDIM steps, sampler cost multipliers, training steps, nnU-Net epochs × iterations, test images. The seconds per
unit of work are this run's own benchmark files (``benchmarks/`` in the working directory: a job with one
uses its measured time, the other jobs of the same stage scale the documented model by the measured / modelled
ratio), else the documented defaults below: one H100 (SXM, 80 GB), the paper's shapes (256², SD v1.5 +
ControlNet, batch 8), float32. Every stage row says which source it used.

GPU-hours are the hours of GPU jobs (``resources: gpu=1``) and of the jobs the SLURM profile groups into a GPU
job (evaluation, mask adherence, subsets and budget prefixes: they hold the GPU allocation while they run).
CPU jobs (splits, tables, figures) are listed as CPU-hours, outside the GPU total.

Reductions, each counted only where the workflow makes it (the plan prints the baseline, each reduction's
saving and the planned total):

(a) shared samples — the budget sweep's smaller budgets are prefixes of the largest budget's set (rule
    ``budget_prefix``, see ``segsynth.config.budget_sources``): the dry run has copy jobs instead of syntheses;
    and GAUDA reads its first candidates from the run's RD set (``segsynth.config.candidate_source``).
    Baseline: those copies costed as the syntheses they replace, GAUDA sampling every candidate.
(b) batch sizes per sampler — the configured ``batch_size`` of each method (a runtime key: no sample changes)
    against the reference batch 8, through ``BATCH_THROUGHPUT``.
(c) precision — the config's ``precision`` (segsynth.precision; ``auto`` is bf16 on an H100) against float32,
    through ``PRECISION_SPEEDUP``.
(d) the downstream "continue" protocol — modelled only for a segmenter whose entry says ``protocol:
    continue``; otherwise shown as a separate what-if line, never in the total.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .config import (MASK_VAE_DEFAULTS, budget_methods, candidate_source, denoiser_passes, for_dataset, method_params,
                     read_configs, round_methods)

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TARGET_GPU_HOURS = 300.0
GPU = "H100"

# ------------------------------------------------------------------------------------------------------------
# Documented defaults: one H100 SXM 80 GB. Nothing in this repository was measured on an H100 (the project's
# machines have no GPU): these are estimates, each with its derivation, to be replaced by this run's benchmark
# files as soon as jobs have run (the plan then says "benchmarks"). The figure for the paper preset
# (~1,150 H100-hours, ~870 of them in 174 nnU-Net runs of 1000 epochs) is the calibration target of the
# nnU-Net epoch time; the other constants are independent estimates.
# ------------------------------------------------------------------------------------------------------------

#: Reference shape of the unit costs: 256² images, batch 8, float32 (PyTorch's defaults: cuDNN may use TF32).
REFERENCE_RESOLUTION = 256
REFERENCE_BATCH = 8

#: One DDIM step of one 256² image with classifier-free guidance (2 UNet+ControlNet passes, batched) for SD v1.5
#: + ControlNet, fp32, batch 8: 486 GFLOP per image-step (../shared/docs/stack-facts.md, "Where guidance time
#: goes") at ~50 TFLOP/s sustained. Cross-check: the VGD paper times DDIM-100 at 3.02 s per 256² image on an
#: RTX 4090, i.e. 30 ms per step; an H100 at batch 8 is taken as ~3× that.
STEP_S = 0.010
#: The same for the tiny pixel-space generators of the embedded default (~1 M parameters at 64²): launch-bound.
TINY_STEP_S = 0.0005
#: SD-VAE decoder forward, per image, in DDIM steps: 622 GFLOP = 1.3× a CFG step (stack-facts.md). The encoder
#: (DiffAug, AugPaint encode the real image) is taken as the same.
DECODE_STEPS = 1.3
#: Whole guided step over a DDIM step (time, SD v1.5 + ControlNet at 256², stack-facts.md): full gradient through
#: the UNet 3.3–3.8×; noise prediction detached with SD-VAE decoding 2.8–3.2×; detached with the tiny decoder
#: 1.15×. ugdm, adv_guidance, advdiffuser and tfg's variance guidance backpropagate through the UNet (full).
GUIDED_FULL = 3.5
GUIDED_DETACHED_VAE = 3.0
GUIDED_DETACHED_TINY = 1.15
#: TFG's mean guidance: one SD-VAE decoder forward + backward (2.6×) and a segmenter forward + backward (0.12×
#: for a 33 M nnU-Net) per mean iteration, in DDIM steps (stack-facts.md).
X0_GRADIENT_STEPS = 2.7
#: The Miner at sampling time: one conditional denoiser call at x_T (half a CFG step) and one M_ξ pass.
MINER_EXTRA_STEPS = 0.55
#: Images per second relative to batch 8 for sampling on an H100 (SD v1.5 + ControlNet at 32² latents): a batch
#: of 8 with CFG is 16 UNet rows and already keeps most of the GPU busy; larger batches amortise kernel launches
#: and the small attention/GEMM shapes. Assumed, not measured (python -m segsynth.bench sampling measures it on
#: the machine it runs on); interpolated log-linearly in the batch size, flat above 64.
BATCH_THROUGHPUT = {1: 0.45, 2: 0.65, 4: 0.85, 8: 1.0, 16: 1.12, 32: 1.2, 64: 1.25}
#: Speed-up over float32 per kind of work (segsynth.precision). bf16/fp16 autocast with the frozen networks
#: stored in bf16: ~2× for inference of a UNet this size on H100 tensor cores, ~1.8× where a backward pass runs
#: (generator and Miner training, gradient-guided sampling), ~1.6× for Swin-Unet training (small, partly
#: data-bound); tf32: float32 storage on TF32 tensor cores. nnU-Net trains and predicts with its own mixed
#: precision whatever the switch says: 1.0.
PRECISION_SPEEDUP = {
    "sampling": {"fp32": 1.0, "tf32": 1.3, "bf16": 2.0, "fp16": 2.0},
    "guided": {"fp32": 1.0, "tf32": 1.3, "bf16": 1.8, "fp16": 1.8},
    "training": {"fp32": 1.0, "tf32": 1.3, "bf16": 1.8, "fp16": 1.8},
    "segmenter": {"fp32": 1.0, "tf32": 1.2, "bf16": 1.6, "fp16": 1.6},
    "nnunet": {"fp32": 1.0, "tf32": 1.0, "bf16": 1.0, "fp16": 1.0},
}
#: ``precision: auto`` is bf16 where the GPU has it (segsynth.precision): on an H100, bf16.
AUTO_PRECISION = "bf16"
#: ControlNet fine-tuning step (diffusers' train_controlnet.py shape: frozen UNet, VAE-encoded 256² batch of 8,
#: AdamW on the ControlNet's 361 M parameters), fp32: ~3× the forward FLOPs of 8 CFG-less passes plus the VAE
#: encoder, ~10 TFLOP at ~35 TFLOP/s. Training the UNet too (train_unet) adds its weight gradients and optimiser.
GENERATOR_STEP_S = 0.30
GENERATOR_TRAIN_UNET = 1.6
TINY_GENERATOR_STEP_S = 0.01
#: One step of the mask VAE p_ω(m | c) (~0.3 M parameters, 32 masks): launch-bound like the tiny generator's;
#: assumed, scaled by the pixels of the dataset's masks (its CPU cost is in the README's demo runs).
MASK_VAE_STEP_S = 0.01
#: One Miner training sample, in DDIM steps: the initial score (0.5), ``rollout_steps`` no-grad DDIM steps,
#: the SD-VAE decoder forward + backward (2.6), f_θ forward + backward (0.12) and M_ξ (0.05).
MINER_SAMPLE_FIXED_STEPS = 0.5 + 2.6 + 0.12 + 0.05
#: nnU-Net v2 2D at 256² (PlainConvUNet planned by nnU-Net, its own AMP, its augmentation workers): 64 ms per
#: training iteration and 40 ms per validation iteration, so a standard epoch (250 + 50) takes 18 s and a
#: 1000-epoch run 5.0 h — the issue's ~870 H100-hours for 174 runs. (nnU-Net's expected-epoch-time tables put
#: 2D epochs of V100/A100-class GPUs at tens of seconds; at this size an H100 is data-augmentation-bound.)
NNUNET_ITER_S = 0.064
NNUNET_VAL_ITER_S = 0.040
#: nnU-Net fingerprint, planning and preprocessing per training job: fixed + per image (real and synthetic).
NNUNET_PREPARE_S = 120.0
NNUNET_PREPARE_S_PER_IMAGE = 0.02
#: as segsynth.segmenters.nnunet.DEFAULTS (the short trainer's schedule when the entry leaves it out)
NNUNET_DEFAULTS = {"epochs": 50, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50}
NNUNET_STANDARD = {"epochs": 1000, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50}
#: Torch segmenters, seconds per image per training step at 256², fp32: Swin-T-sized Swin-Unet (embed 96, depths
#: 2-2-2-2; ~8 GFLOP forward per 256² image, ×3 with the backward) at ~0.05 s per batch-24 step with its data
#: pipeline; scaled by (embed_dim / 96)² × Σdepths / 8. The small CNNs (MONAI UNet, MK-UNet, ORDER) are
#: launch-bound.
SWIN_S_PER_IMAGE_STEP = 0.05 / 24
SMALL_SEGMENTER_S_PER_IMAGE_STEP = 0.0005
SWIN_DEFAULTS = {"embed_dim": 24, "depths": [2, 2, 2]}  # as segsynth.segmenters.swin_unet
#: LEAF (segsynth/segmenters/leaf.py) with ``pretrained``: a step trains SD's UNet and a VAE encoder on the batch,
#: the generator's train_unet step per image (GENERATOR_STEP_S × GENERATOR_TRAIN_UNET over its batch of 8). A
#: tiny LEAF is launch-bound like the tiny generator, per step, plus its mask-VAE fit (MASK_VAE_STEP_S per step).
LEAF_SD_S_PER_IMAGE_STEP = GENERATOR_STEP_S * GENERATOR_TRAIN_UNET / 8
#: The "continue" protocol (segsynth/segmenters/protocol.py): a real+synthetic model continues from the
#: real-only checkpoint for ``continue_epochs`` / ``continue_steps``, by default a tenth of the scratch schedule
#: (the Miner paper's reference code: 1000 → 100 nnU-Net epochs) — the same rule as protocol.CONTINUE_FRACTION.
#: An nnU-Net continuation iteration draws the planned batch from real AND from synthetic cases: 2× the
#: training iteration's work; a torch segmenter splits its batch 1:1, same work per step.
CONTINUE_FRACTION = 0.1
CONTINUE_NNUNET_BATCHES = 2
#: Evaluation per test image: prediction (nnU-Net's sliding window with mirroring: 4 passes of a 256² tile;
#: torch segmenters one pass) and MONAI's ASD and HD95 on the CPU (~10–15 ms per mask and metric,
#: stack-facts.md) per foreground class.
PREDICT_S = {"nnunet": 0.02, "torch": 0.005}
METRICS_S_PER_CLASS = 0.025
#: A generator step with LAW's or adaptive distillation's teacher against a plain one (two trained networks'
#: forward and backward passes instead of one; with a frozen SD UNet the ControlNets dominate either way).
TEACHER_STEP_FACTOR = 2.0
#: ViCTr's Stage 2 step over a plain one: two extra forward passes (base model, earlier σ) of ⅓ step each
VICTR_STAGE2_FACTOR = 1.67
#: Mask adherence: f_θ forward and Dice per synthetic image.
ADHERENCE_S_PER_IMAGE = 0.005
#: fidelity (segsynth.fidelity) per image, real and synthetic: the bilinear resize to 299² and the 8-bit rounding
#: on the CPU (~2–3 ms), Inception-v3 (5.7 GFLOP) and f_θ's encoder on the GPU (<1 ms batched).
FIDELITY_S_PER_IMAGE = 0.004
#: Copy jobs (adversarial subsets, budget prefixes): per image read + write of a 256² RGB float32 image.
COPY_S_PER_IMAGE = 0.001
#: Start-up of a job: environment, imports, loading weights (SD v1.5 + ControlNet ~1.2 B parameters; f_θ).
STARTUP_S = {"synthesis": 60.0, "training": 60.0, "evaluation": 30.0, "copy": 10.0, "cpu": 10.0}
#: splits (CPU): adapter, resampling and checks per image.
SPLITS_S_PER_IMAGE = 0.05

#: |train| and |test| 2D images of the papers' datasets at their 7:3 split, for a plan made before the splits
#: ran (e.g. on placeholder datasets); a dataset whose split exists (results/{dataset}/data/meta.json) uses its
#: own counts. Each with its source:
PAPER_SIZES = {
    # ACDC: 100 training patients × ED and ES frames = 1,902 short-axis slices (the slice count of the SSL4MIS copy
    # of ACDC); 7:3 by patient → 1,331 / 571.
    "acdc": {"train": 1331, "test": 571, "classes": 3,
             "source": "ACDC: 100 patients, 1,902 ED/ES slices, 7:3 → 1,331/571"},
    # Synapse: 30 CT cases, 3,779 axial slices — TransUNet's 18 training cases (train_npz, 2,211 slices) and 12
    # test volumes (1,568 slices). The preset's random 7:3 case split draws 21/9 cases instead (~2,650 train
    # slices before empty slices are dropped); the plan takes the 18-case figure.
    "synapse": {"train": 2211, "test": 1568, "classes": 8,
                "source": "Synapse: 30 CT cases, 3,779 slices, TransUNet's 18 train (2,211) / 12 test (1,568)"},
    # Polyps: Kvasir-SEG + CVC-ClinicDB as PraNet's TrainDataset, 900 + 550 = 1,450 images taken as |train|;
    # |test| at 7:3 → 621.
    "polyps": {"train": 1450, "test": 621, "classes": 1,
               "source": "Polyps: Kvasir-SEG + CVC-ClinicDB, 1,450 train images (PraNet), 7:3 → 621 test"},
    # presets/papers_gpu.yaml's cross-domain test set: ETIS-LaribPolypDB, 196 images, 9:1 → 176 test
    "polyps_unseen": {"train": 20, "test": 176, "classes": 1,
                      "source": "ETIS-LaribPolypDB: 196 images, test_fraction 0.9 → 176 test"},
    # The embedded default (README, "The embedded default": measured).
    "mni152": {"train": 87, "test": 40, "classes": 3, "source": "MNI152 default: 87/40 slices (README)"},
}
FALLBACK_SIZE = {"train": 1000, "test": 430, "classes": 1, "source": "unknown dataset: 1,000/430 assumed"}

SAMPLER_KIND = {"ddim": "sampling", "miner": "sampling", "diffaug": "sampling", "augpaint": "sampling",
                "gauda": "sampling", "vgd": "guided", "ugdm": "guided", "adv_guidance": "guided",
                "advdiffuser": "guided", "tfg": "guided"}
TFG_DEFAULTS = {"rho": 1.0, "mu": 0.25, "mean_iters": 4, "recurrence": 1}  # as segsynth.sampling.baselines
VGD_DEFAULTS = {"time_travel": 1, "window": [0.0, 1.0], "guidance_window": [0.0, 1.0], "jacobian": "full",
                "decoder": "vae"}  # as segsynth.sampling.vgd.VGD_DEFAULTS


# ------------------------------------------------------------------------------------------------------------
# The jobs: Snakemake's dry run
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: dict = field(default_factory=dict)
    gpu: bool = False
    benchmark: str | None = None


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of a ``snakemake -n`` listing: rule, wildcards, ``gpu`` resource and benchmark file of each."""
    jobs, current = [], None
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if head:
            current = {"rule": head.group(1), "wildcards": {}, "gpu": False, "benchmark": None}
            jobs.append(current)
            continue
        item = re.match(r"^\s+(\w+): (.*)$", line)
        if current is None or not item:
            if not line.startswith((" ", "\t")):
                current = None  # a job block ends at the next unindented line
            continue
        key, value = item.groups()
        if key == "wildcards":
            current["wildcards"] = dict(part.split("=", 1) for part in value.split(", "))
        elif key == "resources":
            resources = dict(part.split("=", 1) for part in value.split(", ") if "=" in part)
            current["gpu"] = resources.get("gpu", "0").strip() not in ("0", "")
        elif key == "benchmark":
            current["benchmark"] = value.strip()
    parsed = [Job(**job) for job in jobs]
    stats = re.search(r"^total\s+(\d+)\s*$", text, flags=re.M)
    if stats and int(stats.group(1)) != len(parsed):
        raise RuntimeError(f"read {len(parsed)} jobs from the dry run, its job stats say {stats.group(1)}")
    return parsed


def dry_run(configfiles, workdir=".", snakefile=SNAKEFILE, remaining: bool = False, targets=()) -> str:
    """``snakemake -n [-F] --nolock`` on the config files, in ``workdir``: its listing of every job (of ``targets``,
    default the workflow's default target)."""
    executable = Path(sys.executable).with_name("snakemake")
    command = [str(executable) if executable.exists() else "snakemake", "-s", str(snakefile), "-n", "--nolock",
               "-d", str(workdir), "--configfile", *[str(Path(f).resolve()) for f in configfiles]]
    if targets:
        command += ["--", *targets]
    if not remaining:
        command.insert(4, "-F")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def load_config(configfiles) -> dict:
    """The config as the Snakefile sees it: the files merged in order (nested mappings merged, as Snakemake
    merges ``--configfile``s), with the budget sweep's and the rounds' derived methods added as rules/common.smk
    adds them."""
    config = read_configs(configfiles)
    config["methods"].update(budget_methods(config))
    config["methods"].update(round_methods(config))
    return config


def slurm_profile(profile=SLURM_PROFILE) -> dict:
    try:
        return yaml.safe_load(Path(profile).read_text()) or {}
    except OSError:
        return {}


def gpu_groups(profile=SLURM_PROFILE) -> dict[str, str]:
    """rule → job group of the SLURM profile (rules grouped with a GPU rule run inside its GPU job)."""
    return dict(slurm_profile(profile).get("groups") or {})


def profile_threads(profile=SLURM_PROFILE) -> dict[str, int]:
    """rule → threads of its cluster job in the SLURM profile (``set-threads``)."""
    return {rule: int(n) for rule, n in (slurm_profile(profile).get("set-threads") or {}).items()}


# ------------------------------------------------------------------------------------------------------------
# The work of one job and its modelled seconds
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """Which reductions a costing applies. None: as the config and the DAG say."""

    nested: bool = True               # budget_prefix jobs are copies (False: the syntheses they replace)
    batch: bool = True                # configured batch sizes (False: the reference batch 8)
    precision: str | None = None      # the config's precision, or this one
    protocol: str | None = None       # the segmenters' protocol ("scratch" unless configured), or this one


BASELINE = Scenario(nested=False, batch=False, precision="fp32", protocol="scratch")
PLANNED = Scenario()


@dataclass
class Cost:
    stage: str
    key: tuple             # jobs of one key share a benchmark calibration
    unit: str
    units: float
    seconds: float
    gpu: bool = True


@dataclass
class Context:
    config: dict
    sizes: dict            # dataset → {"train", "test", "classes", "source"}
    gpu_rules: set
    threads: dict = field(default_factory=dict)  # rule → threads of its cluster job (the SLURM profile's)


def dataset_sizes(config: dict, workdir=".") -> dict:
    """|train|, |test| and foreground classes per dataset of the run: the split's own meta.json when it exists,
    else ``PAPER_SIZES`` (by dataset name, then kind), else ``FALLBACK_SIZE``."""
    import json

    sizes = {}
    cross = (config.get("analyses") or {}).get("cross_domain")
    for name in [*config["run"]["datasets"], *([cross["test"]] if cross else [])]:
        entry = config["datasets"][name]
        meta_path = Path(workdir) / "results" / name / "data" / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            sizes[name] = {"train": int(meta["n_train"]), "test": int(meta["n_test"]),
                           "classes": max(1, len(meta.get("class_names", [])) - 1),
                           "source": f"{meta_path} (this run's split)"}
            continue
        size = dict(PAPER_SIZES.get(name) or PAPER_SIZES.get(entry["kind"]) or FALLBACK_SIZE)
        if entry.get("class_names"):
            size["classes"] = max(1, len(entry["class_names"]) - 1)
        sizes[name] = size
    return sizes


def precision_of(config: dict, scenario: Scenario) -> str:
    precision = scenario.precision or config.get("precision", "fp32")
    return AUTO_PRECISION if precision == "auto" else precision


def batch_factor(batch: int) -> float:
    """Throughput at ``batch`` over the reference batch 8 (``BATCH_THROUGHPUT``, log-linear in between)."""
    points = sorted(BATCH_THROUGHPUT.items())
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if batch <= b1:
            w = math.log(batch / b0) / math.log(b1 / b0)
            return t0 + w * (t1 - t0)
    return points[-1][1]


def _pixels(config: dict, dataset: str) -> float:
    return (config["datasets"][dataset].get("resolution", REFERENCE_RESOLUTION) / REFERENCE_RESOLUTION) ** 2


def _latent(config: dict, generator: str) -> bool:
    return bool(config["generators"][generator].get("pretrained"))


def sampler_steps(p: dict, latent: bool, reused_candidate: bool = False) -> float:
    """Cost of one synthetic image in DDIM steps with CFG (before the step time, batch and precision);
    ``reused_candidate``: GAUDA reads its candidate 0 from the run's RD set."""
    steps, kind = p["steps"], p["sampler"]
    decode = DECODE_STEPS if latent else 0.0
    if kind == "ddim":
        return steps + decode
    if kind == "miner":
        return steps + MINER_EXTRA_STEPS + decode
    if kind == "vgd":
        o = {**VGD_DEFAULTS, **p}
        guided = (GUIDED_FULL if o["jacobian"] == "full"
                  else GUIDED_DETACHED_TINY if o["decoder"] == "tiny" or not latent else GUIDED_DETACHED_VAE)
        g = o["guidance_window"][1] - o["guidance_window"][0]
        w = o["window"][1] - o["window"][0]
        return steps * (1 + o["time_travel"] * w) * (g * guided + (1 - g)) + decode
    if kind in ("ugdm", "adv_guidance"):
        return steps * GUIDED_FULL + decode
    if kind == "advdiffuser":  # from the real image noised to start_strength (encoded first), guided every step
        return max(1, round(steps * p.get("start_strength", 1.0))) * GUIDED_FULL + 2 * decode
    if kind == "tfg":
        o = {**TFG_DEFAULTS, **p}
        per_step = (GUIDED_FULL if o["rho"] > 0 else 1.0) + (o["mean_iters"] * X0_GRADIENT_STEPS if o["mu"] > 0 else 0)
        return steps * o["recurrence"] * per_step + decode
    if kind == "diffaug":  # encode the real image, denoise, decode
        if p.get("mode", "tweedie") == "tweedie":
            return 1 + 2 * decode  # one Tweedie step from the sample's random t
        return int(steps * p.get("strength", 0.5)) + 2 * decode
    if kind == "augpaint":
        return steps * p.get("jumps", 1) + 2 * decode
    if kind == "gauda":  # class-adaptive masks, then oversample RD candidates (1: none extra; baselines' defaults)
        return (p.get("oversample", 1) - reused_candidate) * (steps + decode)
    raise ValueError(f"no cost model for sampler {kind!r}")


def synthesis_cost(ctx: Context, wc: dict, scenario: Scenario) -> Cost:
    config, d, g, m = ctx.config, wc["dataset"], wc["generator"], wc["method"]
    p = method_params(config, d, m)
    latent = _latent(config, g)
    n = int(round(float(p["budget"]) * ctx.sizes[d]["train"]))
    step = (STEP_S if latent else TINY_STEP_S) * _pixels(config, d) * 0.5 * denoiser_passes(p)
    kind = SAMPLER_KIND[p["sampler"]]
    reused = scenario.nested and candidate_source(config, d, m) is not None
    per_image = sampler_steps(p, latent, reused) * step
    per_image /= batch_factor(int(p["batch_size"])) if scenario.batch else 1.0
    per_image /= PRECISION_SPEEDUP[kind][precision_of(config, scenario)]
    return Cost(f"synthesis: {p['sampler']}", ("synthesize", p["sampler"]), "image", n,
                STARTUP_S["synthesis"] + n * per_image)


def generator_cost(ctx: Context, wc: dict, scenario: Scenario) -> Cost:
    config, d, g = ctx.config, wc["dataset"], wc["generator"]
    entry = for_dataset(config, d)["generators"][g]  # the dataset's own recipe (datasets.<name>.overrides)
    training = entry["training"]
    if _latent(config, g):
        step = GENERATOR_STEP_S * training["batch_size"] / REFERENCE_BATCH * _pixels(config, d)
        step *= GENERATOR_TRAIN_UNET if training.get("train_unet") else 1.0
    else:
        step = TINY_GENERATOR_STEP_S
    if training.get("weighting", "uniform") in ("adaptive_distill", "law"):
        # the privileged teacher (segsynth.law): a second forward and backward pass of the trained network
        step *= TEACHER_STEP_FACTOR
    step /= PRECISION_SPEEDUP["training"][precision_of(config, scenario)]
    if "victr" in entry:
        # ViCTr (segsynth.victr): Stage 1's plain steps, then Stage 2's, each with the base model's and the
        # earlier σ's forward passes of the consistency losses (a forward pass ≈ ⅓ of a training step)
        stage1 = (entry["victr"].get("stage1") or {}).get("steps", 0) if entry["victr"].get("source") else 0
        steps = stage1 + training["steps"]
        return Cost("generator fine-tuning", ("train_generator", g), "step", steps,
                    STARTUP_S["training"] + (stage1 + training["steps"] * VICTR_STAGE2_FACTOR) * step)
    return Cost("generator fine-tuning", ("train_generator", g), "step", training["steps"],
                STARTUP_S["training"] + training["steps"] * step)


def miner_cost(ctx: Context, wc: dict, scenario: Scenario) -> Cost:
    config, d, g = ctx.config, wc["dataset"], wc["generator"]
    miner = for_dataset(config, d)["miner"]
    latent = _latent(config, g)
    cfg = 1.0 if config["synthesis"]["guidance_scale"] > 1 else 0.5
    per_sample = (miner["rollout_steps"] + (MINER_SAMPLE_FIXED_STEPS if latent else 0.2)) \
        * (STEP_S if latent else TINY_STEP_S) * _pixels(config, d) * cfg
    step = per_sample * miner["batch_size"] / PRECISION_SPEEDUP["training"][precision_of(config, scenario)]
    return Cost("miner training", ("train_miner",), "step", miner["steps"],
                STARTUP_S["training"] + miner["steps"] * step)


def mask_vae_cost(ctx: Context, wc: dict) -> Cost:
    cfg = {**MASK_VAE_DEFAULTS, **(ctx.config.get("mask_vae") or {})}
    step = MASK_VAE_STEP_S * cfg["batch_size"] / 32 * _pixels(ctx.config, wc["dataset"])
    return Cost("mask VAE training", ("train_mask_vae",), "step", cfg["steps"],
                STARTUP_S["training"] + cfg["steps"] * step)


def protocol_of(entry: dict, scenario: Scenario) -> str:
    return scenario.protocol or entry.get("protocol", "scratch")


def segmenter_cost(ctx: Context, rule: str, wc: dict, scenario: Scenario) -> Cost:
    config, d, s = ctx.config, wc["dataset"], wc["segmenter"]
    entry = config["segmenters"][s]
    augmented = rule == "train_segmenter_augmented"
    n_synthetic = 0
    if augmented:
        p = method_params(config, d, wc["method"]) if wc["method"] in config["methods"] else {"budget": 1.0}
        n_synthetic = int(round(float(p.get("budget", 1.0)) * ctx.sizes[d]["train"]))
    cont = augmented and protocol_of(entry, scenario) == "continue"
    # a synthetic-only model trains from scratch as the real-only one does, on one synthetic set
    label = f"segmenter {s}: " + ("real + synthetic" if augmented else
                                  "synthetic only" if rule == "train_segmenter_synthetic_only" else "real only")
    if cont:
        label += " (continue)"
    pixels = _pixels(config, d)
    if entry["kind"] == "nnunet":
        o = NNUNET_STANDARD if entry.get("trainer", "standard") == "standard" else {**NNUNET_DEFAULTS, **entry}
        epochs = o["epochs"]
        if entry.get("trainer") == "short" and entry.get("steps"):
            epochs = -(-entry["steps"] // o["iterations_per_epoch"])
        batches = 1
        if cont:
            epochs = entry.get("continue_epochs", max(1, math.ceil(CONTINUE_FRACTION * epochs)))
            batches = CONTINUE_NNUNET_BATCHES
        epoch_s = (batches * o["iterations_per_epoch"] * NNUNET_ITER_S
                   + o["val_iterations_per_epoch"] * NNUNET_VAL_ITER_S) * pixels
        prepare = NNUNET_PREPARE_S + NNUNET_PREPARE_S_PER_IMAGE * (ctx.sizes[d]["train"] + n_synthetic)
        seconds = STARTUP_S["training"] + prepare + epochs * epoch_s / PRECISION_SPEEDUP["nnunet"][precision_of(config, scenario)]
        return Cost(label, (rule, "nnunet"), "epoch", epochs, seconds)
    steps = entry["steps"]
    if cont:
        steps = entry.get("continue_steps", max(1, math.ceil(steps * CONTINUE_FRACTION)))
    if entry["kind"] == "leaf":
        speedup = PRECISION_SPEEDUP["training"][precision_of(config, scenario)]
        if entry.get("pretrained"):
            step = LEAF_SD_S_PER_IMAGE_STEP * entry["batch_size"] * pixels / speedup
            return Cost(label, (rule, "leaf"), "step", steps, STARTUP_S["training"] + steps * step)
        mask_vae_steps = 0 if cont else (entry.get("vae") or {}).get("steps", 800)  # segsynth.segmenters.leaf
        seconds = STARTUP_S["training"] + (steps * TINY_GENERATOR_STEP_S + mask_vae_steps * MASK_VAE_STEP_S) / speedup
        return Cost(label, (rule, "leaf"), "step", steps, seconds)
    if entry["kind"] == "swin_unet":
        embed = entry.get("embed_dim", SWIN_DEFAULTS["embed_dim"])
        depths = entry.get("depths", SWIN_DEFAULTS["depths"])
        per_image = SWIN_S_PER_IMAGE_STEP * (embed / 96) ** 2 * sum(depths) / 8
    else:
        per_image = SMALL_SEGMENTER_S_PER_IMAGE_STEP
    step = per_image * entry["batch_size"] * pixels / PRECISION_SPEEDUP["segmenter"][precision_of(config, scenario)]
    return Cost(label, (rule, entry["kind"]), "step", steps, STARTUP_S["training"] + steps * step)


def evaluation_cost(ctx: Context, rule: str, wc: dict) -> Cost:
    config, d, s = ctx.config, wc["dataset"], wc["segmenter"]
    kind = "nnunet" if config["segmenters"][s]["kind"] == "nnunet" else "torch"
    if rule == "profile_segmenter":
        return Cost("evaluation", (rule,), "job", 1, STARTUP_S["evaluation"] * 2)
    n = ctx.sizes[d]["test"]
    # MONAI's surface distances run on the CPU in the job's threads (segsynth.evaluation.distance_scores)
    metrics = METRICS_S_PER_CLASS * ctx.sizes[d]["classes"] / max(1, ctx.threads.get(rule, 1))
    per_image = PREDICT_S[kind] * _pixels(config, d) + metrics
    return Cost("evaluation", (rule, kind), "test image", n, STARTUP_S["evaluation"] + n * per_image)


def _set_size(ctx: Context, dataset: str, method: str) -> int:
    p = method_params(ctx.config, dataset, method)
    return int(round(float(p["budget"]) * ctx.sizes[dataset]["train"]))


def job_cost(ctx: Context, job: Job, scenario: Scenario) -> Cost:
    """The stage, calibration key, work and modelled seconds of ``job`` under ``scenario``."""
    rule, wc, config = job.rule, job.wildcards, ctx.config
    if rule == "synthesize" or (rule == "budget_prefix" and not scenario.nested):
        return synthesis_cost(ctx, wc, scenario)
    if rule == "budget_prefix":
        n = _set_size(ctx, wc["dataset"], wc["method"])
        return Cost("budget prefixes (copies)", (rule,), "image", n, STARTUP_S["copy"] + n * COPY_S_PER_IMAGE)
    if rule == "adversarial_subset":
        n = _set_size(ctx, wc["dataset"], wc["method"])
        return Cost("adversarial subsets (copies)", (rule,), "image", n, STARTUP_S["copy"] + n * COPY_S_PER_IMAGE)
    if rule == "mask_adherence":
        n = _set_size(ctx, wc["dataset"], wc["method"])
        scorers = 2 if config["run"].get("adherence_judge") else 1  # f_θ and the adherence judge
        return Cost("mask adherence", (rule,), "image", n,
                    STARTUP_S["evaluation"] + n * scorers * ADHERENCE_S_PER_IMAGE)
    if rule == "fidelity":
        n = _set_size(ctx, wc["dataset"], wc["method"]) + ctx.sizes[wc["dataset"]]["train"]
        return Cost("fidelity (FID, KID, domain FID)", (rule,), "image", n,
                    STARTUP_S["evaluation"] + n * FIDELITY_S_PER_IMAGE)
    if rule == "train_generator":
        return generator_cost(ctx, wc, scenario)
    if rule == "train_miner":
        return miner_cost(ctx, wc, scenario)
    if rule == "train_mask_vae":
        return mask_vae_cost(ctx, wc)
    if rule in ("train_segmenter_real", "train_segmenter_augmented", "train_segmenter_synthetic_only"):
        return segmenter_cost(ctx, rule, wc, scenario)
    if rule in ("evaluate_real", "evaluate_augmented", "evaluate_synthetic_only", "profile_segmenter"):
        return evaluation_cost(ctx, rule, wc)
    if rule == "evaluate_cross_domain":  # a model of {train} scored on the test split of {test}
        return evaluation_cost(ctx, rule, {**wc, "dataset": wc["test"]})
    if rule == "leaf_stability":  # one test-split prediction per inference seed, Dice and IoU only
        seeds = ((config.get("analyses") or {}).get("leaf") or {}).get("stability_seeds", 10)
        n = ctx.sizes[wc["dataset"]]["test"] * seeds
        return Cost("evaluation", (rule,), "test image", n,
                    STARTUP_S["evaluation"] + n * PREDICT_S["torch"] * _pixels(config, wc["dataset"]))
    if rule == "splits":
        size = ctx.sizes[wc["dataset"]]
        return Cost("splits (CPU)", (rule,), "image", size["train"] + size["test"],
                    STARTUP_S["cpu"] + SPLITS_S_PER_IMAGE * (size["train"] + size["test"]), gpu=False)
    return Cost("tables and figures (CPU)", (rule,), "job", 1, STARTUP_S["cpu"], gpu=False)


# ------------------------------------------------------------------------------------------------------------
# Benchmarks, costing and the plan
# ------------------------------------------------------------------------------------------------------------
def read_benchmark(path) -> float | None:
    """Wall seconds of a Snakemake benchmark file (its last repeat), or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    lines = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2 or lines[0][0] != "s":
        return None
    try:
        return float(lines[-1][0])
    except ValueError:
        return None


@dataclass
class StageRow:
    stage: str
    gpu: bool
    jobs: int = 0
    base_jobs: int = 0    # jobs costed in this stage by the baseline (a budget prefix: as a synthesis)
    unit: str = ""
    units: float = 0.0
    seconds: dict = field(default_factory=dict)   # scenario name → seconds
    measured: int = 0     # jobs whose own benchmark file gave their time
    scaled: int = 0       # jobs scaled by the measured / modelled ratio of their stage


@dataclass
class Plan:
    configfiles: list
    jobs: list
    sizes: dict
    precision: str
    rows: dict            # stage → StageRow
    totals: dict          # scenario name → GPU seconds
    cpu_totals: dict      # scenario name → CPU seconds
    reductions: list      # (label, applied, saving seconds, note)
    what_ifs: list        # (label, GPU seconds)
    remaining: bool = False

    def hours(self, scenario: str = "planned") -> float:
        return self.totals[scenario] / 3600.0


SCENARIOS = {
    "baseline": BASELINE,
    "+nested": replace(BASELINE, nested=True),
    "+batch": replace(BASELINE, nested=True, batch=True),
    "+precision": replace(BASELINE, nested=True, batch=True, precision=None),
    "planned": PLANNED,
}


def make_plan(configfiles, workdir=".", dry_run_text: str | None = None, remaining: bool = False,
              targets=()) -> Plan:
    """Cost every job of the run's DAG (of ``targets``: e.g. ``papers``) under the baseline, each reduction in
    turn, the planned settings and the what-ifs (bf16, the continue protocol)."""
    config = load_config(configfiles)
    if dry_run_text is None:
        dry_run_text = dry_run(configfiles, workdir, remaining=remaining, targets=targets)
    jobs = parse_dry_run(dry_run_text)
    gpu_rules = {job.rule for job in jobs if job.gpu}
    groups = gpu_groups()
    gpu_groups_used = {groups[r] for r in gpu_rules if r in groups}
    ctx = Context(config, dataset_sizes(config, workdir), gpu_rules, profile_threads())

    def on_gpu(job: Job, cost: Cost) -> bool:
        return cost.gpu and (job.gpu or groups.get(job.rule) in gpu_groups_used)

    # Calibration: measured / modelled (planned settings) per key, from the jobs that have a benchmark file.
    measured, ratios = {}, {}
    for i, job in enumerate(jobs):
        seconds = read_benchmark(Path(workdir) / job.benchmark) if job.benchmark else None
        if seconds is not None:
            cost = job_cost(ctx, job, PLANNED)
            measured[i] = seconds / max(cost.seconds, 1e-9)
            total = ratios.setdefault(cost.key, [0.0, 0.0])
            total[0] += seconds
            total[1] += cost.seconds
    factors = {key: m / max(s, 1e-9) for key, (m, s) in ratios.items()}

    what_if = {"bf16 precision": Scenario(precision="bf16"),
               "continue protocol": Scenario(protocol="continue"),
               "bf16 + continue": Scenario(precision="bf16", protocol="continue")}
    scenarios = {**SCENARIOS, **{f"what-if {k}": v for k, v in what_if.items()}}
    rows: dict[str, StageRow] = {}
    totals = {name: 0.0 for name in scenarios}
    cpu_totals = {name: 0.0 for name in scenarios}
    for i, job in enumerate(jobs):
        planned = job_cost(ctx, job, PLANNED)
        for name, scenario in scenarios.items():
            cost = planned if name == "planned" else job_cost(ctx, job, scenario)
            own = cost.key == planned.key and i in measured
            factor = measured[i] if own else factors.get(cost.key, 1.0)
            seconds = cost.seconds * factor
            gpu = on_gpu(job, cost)
            (totals if gpu else cpu_totals)[name] += seconds
            if name in SCENARIOS:  # the what-ifs are totals only
                row = rows.setdefault(cost.stage, StageRow(cost.stage, gpu))
                row.seconds[name] = row.seconds.get(name, 0.0) + seconds
                if name == "baseline":
                    row.base_jobs += 1
        row = rows.setdefault(planned.stage, StageRow(planned.stage, on_gpu(job, planned)))
        row.jobs += 1
        row.unit = planned.unit
        row.units += planned.units
        if i in measured:
            row.measured += 1
        elif planned.key in factors:
            row.scaled += 1

    precision = precision_of(config, PLANNED)
    reductions = []
    steps = [("(a) shared samples", "baseline", "+nested"), ("(b) batch sizes per sampler", "+nested", "+batch"),
             ("(c) precision", "+batch", "+precision"), ("(d) continue protocol", "+precision", "planned")]
    applied = _applied(config, jobs, precision)
    for (label, before, after), on in zip(steps, applied):
        saving = totals[before] - totals[after]
        reductions.append((label, on, saving, _reduction_note(label, config, jobs, precision)))
    what_ifs = [(label, totals[f"what-if {label}"]) for label in what_if
                if abs(totals[f"what-if {label}"] - totals["planned"]) > 0.5
                and not (precision == "bf16" and label.startswith("bf16"))]
    return Plan(list(configfiles), jobs, ctx.sizes, precision, rows, totals, cpu_totals, reductions, what_ifs,
                remaining)


def _applied(config: dict, jobs: list, precision: str) -> list[bool]:
    """Whether the workflow makes each reduction (a)–(d) for this config and DAG."""
    batches = {int(method_params(config, j.wildcards["dataset"], j.wildcards["method"])["batch_size"])
               for j in jobs if j.rule == "synthesize"}
    return [any(j.rule == "budget_prefix" for j in jobs) or _gauda_reuses(config, jobs),
            bool(batches - {REFERENCE_BATCH}),
            precision != "fp32",
            any(config["segmenters"][s].get("protocol") == "continue" for s in config["run"]["segmenters"])]


def _gauda_reuses(config: dict, jobs: list) -> int:
    return sum(job.rule == "synthesize" and job.wildcards["method"] in config["methods"]
               and candidate_source(config, job.wildcards["dataset"], job.wildcards["method"]) is not None
               for job in jobs)


def _reduction_note(label: str, config: dict, jobs: list, precision: str) -> str:
    if label.startswith("(a)"):
        n = sum(job.rule == "budget_prefix" for job in jobs)
        syn = sum(job.rule == "synthesize" for job in jobs)
        gauda = _gauda_reuses(config, jobs)
        return (f"{gauda} GAUDA jobs read candidate 0 from the RD set; " if gauda else "") + \
               (f"{n} budget-sweep sets are prefix copies of their method's largest budget (rule budget_prefix); "
                f"{syn} syntheses left" if n else "no budget sweep in this DAG")
    if label.startswith("(b)"):
        batches = {}
        for job in jobs:
            if job.rule == "synthesize":
                p = method_params(config, job.wildcards["dataset"], job.wildcards["method"])
                batches.setdefault(p["sampler"], set()).add(int(p["batch_size"]))
        text = ", ".join(f"{s} {'/'.join(map(str, sorted(b)))}" for s, b in sorted(batches.items()))
        return f"batch per sampler: {text} (reference {REFERENCE_BATCH}; BATCH_THROUGHPUT, assumed)"
    if label.startswith("(c)"):
        said = config.get("precision")
        return (f"precision: {said} → {precision} on an {GPU}" if said else "no precision key: float32") + \
            " (PRECISION_SPEEDUP; nnU-Net keeps its own AMP)"
    protocols = {s: config["segmenters"][s].get("protocol") for s in config["run"]["segmenters"]}
    if any(p == "continue" for p in protocols.values()):
        return "continue protocol: " + ", ".join(s for s, p in protocols.items() if p == "continue")
    return "no segmenter says protocol: continue: see the what-if lines"


# ------------------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------------------
STAGE_ORDER = ("splits", "generator", "miner", "synthesis", "budget", "mask", "adversarial", "segmenter",
               "evaluation", "tables")


def _order(stage: str) -> tuple:
    for i, prefix in enumerate(STAGE_ORDER):
        if stage.startswith(prefix):
            return (i, stage)
    return (len(STAGE_ORDER), stage)


def _h(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f}" if abs(hours) >= 10 else f"{hours:.2f}"


def format_plan(plan: Plan) -> str:
    out = []
    files = " ".join(str(f) for f in plan.configfiles)
    what = "jobs left to run (snakemake -n)" if plan.remaining else "jobs (snakemake -n -F)"
    out.append(f"segsynth plan: {files}")
    out.append(f"{len(plan.jobs)} {what}; GPU-hours = {GPU}-hours (one {GPU} SXM 80 GB per GPU job) from the "
               "defaults in segsynth/plan.py, or hours of the benchmarked machine where a row says benchmarks")
    out.append("dataset sizes (|train| / |test| images):")
    out += [f"  {d:<10} {s['train']:>6,} / {s['test']:<6,} {s['source']}" for d, s in plan.sizes.items()]
    out.append("")
    header = (f"{'stage':<50} {'jobs (base)':>11} {'work (planned)':>22} {'baseline h':>11} {'planned h':>10}  "
              "planned unit cost (source)")
    out.append(header)
    out.append("-" * len(header))
    for gpu in (True, False):
        for stage in sorted((s for s, r in plan.rows.items() if r.gpu == gpu), key=_order):
            row = plan.rows[stage]
            base, planned = row.seconds.get("baseline", 0.0), row.seconds.get("planned", 0.0)
            work = f"{row.units:,.0f} {row.unit}s" if row.jobs else "—"
            jobs = f"{row.jobs}" if row.base_jobs in (0, row.jobs) else f"{row.jobs} ({row.base_jobs})"
            unit = (f"{planned / row.units:.3g} s/{row.unit}" if row.units and row.jobs else "")
            source = ("benchmarks: " + ", ".join(x for x in (f"{row.measured} measured" if row.measured else "",
                                                               f"{row.scaled} scaled" if row.scaled else "") if x)
                      if row.measured or row.scaled else "default")
            if row.jobs and (row.measured + row.scaled) < row.jobs and (row.measured or row.scaled):
                source += f", {row.jobs - row.measured - row.scaled} default"
            out.append(f"{stage:<50} {jobs:>11} {work:>22} {_h(base):>11} {_h(planned):>10}  "
                       f"{unit}{' (' + source + ')' if row.jobs else ' (no job left: replaced by a reduction)'}")
        if gpu:
            out.append("-" * len(header))
            out.append(f"{'GPU total':<50} {sum(r.jobs for r in plan.rows.values() if r.gpu):>11} {'':>22} "
                       f"{_h(plan.totals['baseline']):>11} {_h(plan.totals['planned']):>10}")
            out.append("")
    out.append(f"{'CPU jobs (not GPU-hours)':<50} {sum(r.jobs for r in plan.rows.values() if not r.gpu):>11} "
               f"{'':>22} {_h(plan.cpu_totals['baseline']):>11} {_h(plan.cpu_totals['planned']):>10}")
    out.append("")
    out.append(f"Baseline (every budget synthesised, batch {REFERENCE_BATCH}, float32, downstream from scratch): "
               f"{_h(plan.totals['baseline'])} {GPU}-hours")
    nn = [r for s, r in plan.rows.items() if s.startswith("segmenter nnunet")]
    if nn:
        out.append(f"  of which nnU-Net training: {sum(r.jobs for r in nn)} runs, "
                   f"{_h(sum(r.seconds.get('baseline', 0.0) for r in nn))} h")
    out.append("Reductions (counted only where the workflow makes them):")
    for label, applied, saving, note in plan.reductions:
        state = (f"−{_h(saving)} h" if saving >= 0 else f"+{_h(-saving)} h") if applied else "not applied"
        out.append(f"  {label:<30} {state:>12}   {note}")
    out.append(f"Planned: {_h(plan.totals['planned'])} {GPU}-hours "
               f"({_h(plan.totals['baseline'] - plan.totals['planned'])} h saved, "
               f"{100 * (1 - plan.totals['planned'] / max(plan.totals['baseline'], 1e-9)):.0f} %)")
    if plan.what_ifs:
        out.append("What-if, NOT counted in the total:")
    for label, seconds in plan.what_ifs:
        note = {"bf16 precision": "generator, Miner, samplers and torch segmenters in bf16",
                "continue protocol": "real+synthetic segmenters continue from the real-only checkpoint "
                                     f"(protocol: continue; default {CONTINUE_FRACTION:.0%} of the scratch "
                                     "epochs / steps, nnU-Net at 2 batches per iteration)",
                "bf16 + continue": "both"}[label]
        out.append(f"  {label:<30} {_h(seconds):>10} h   {note}")
    gpu_rows = sorted((r for r in plan.rows.values() if r.gpu), key=lambda r: -r.seconds.get("planned", 0.0))
    out.append("Largest planned stages: " + "; ".join(
        f"{r.stage} {_h(r.seconds['planned'])} h ({100 * r.seconds['planned'] / max(plan.totals['planned'], 1e-9):.0f} %)"
        for r in gpu_rows[:3]))
    hours = plan.hours()
    verdict = "within" if hours <= TARGET_GPU_HOURS else "above"
    out.append(f"Planned total {hours:,.1f} {GPU}-hours: {verdict} the {TARGET_GPU_HOURS:.0f} {GPU}-hour target"
               + ("" if hours <= TARGET_GPU_HOURS else f" by {hours - TARGET_GPU_HOURS:,.1f} h"))
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", required=True, help="config files, merged in order")
    parser.add_argument("--directory", "-d", default=".", help="the run's working directory (benchmarks/, results/)")
    parser.add_argument("--remaining", action="store_true", help="only the jobs Snakemake would run now")
    parser.add_argument("--dry-run-output", help="a saved `snakemake -n` listing instead of running it")
    parser.add_argument("--target", nargs="*", default=[], help="the run's targets (default: the workflow's "
                        "default target; `papers` for every paper's tables)")
    args = parser.parse_args(argv)
    text = Path(args.dry_run_output).read_text() if args.dry_run_output else None
    print(format_plan(make_plan(args.configfile, args.directory, text, args.remaining, args.target)))


if __name__ == "__main__":
    main()
