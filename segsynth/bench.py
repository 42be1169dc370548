"""Benchmarks of segsynth's samplers: seconds per image and mean value score, guided vs. random DDIM.

``python -m segsynth.bench dryrun`` times ``snakemake -n`` of the default and of the paper preset (what every
start of the workflow, and every cluster job's own start-up, pays before any work).

``python -m segsynth.bench sampling`` times every sampler of :data:`SAMPLERS_TO_TIME` (RD = DDIM, VGD, the
Adversariality Miner) on the same batch of training masks with the same noise seeds and step count,
interleaved over ``--repeats`` rounds (the order rotates each round; the median round counts), and prints
ONE JSON line: ``ddim_s_per_image``, ``vgd_s_per_image``, ``miner_s_per_image``, ``ratio`` (VGD / DDIM),
``miner_ratio`` (Miner / DDIM), ``ddim_value``, ``vgd_value``, ``miner_value`` (mean final value score, eq. 2
with λ = 1, of each method's images under f_θ), ``ddim_seg_loss``, ``vgd_seg_loss``, ``miner_seg_loss`` (mean
ℓ_seg, f_θ's cross-entropy, the Miner paper's adversariality), plus the setup.

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
        from .miner import train_miner

        train_miner(config["miner"], paths["data"], paths["generator"], paths["segmenter"], paths["miner"],
                    seed=seed)
    log.info("built tiny models in %s in %.0f s", out, time.perf_counter() - began)
    return paths


def load_models(generator_dir, segmenter_dir, miner_dir):
    from .generator import MaskToImageGenerator
    from .miner import AdversarialityMiner
    from .segmenters import load_segmenter

    miner = AdversarialityMiner.load(miner_dir) if Path(miner_dir).exists() else None
    return MaskToImageGenerator.load(generator_dir), load_segmenter(segmenter_dir).as_value_model(), miner


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
    return torch.cat(images), time.perf_counter() - began


def mean_terms(value_model, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean final value score (eq. 2, λ = 1, as synthesis records it) and mean ℓ_seg of the images under f_θ."""
    from .sampling.value import value_terms

    with torch.no_grad():
        terms = value_terms(value_model(images), masks)
    return {"value": float(terms["value"].mean()), "seg_loss": float(terms["seg_loss"].mean())}


def time_samplers(variants: dict[str, tuple[dict, int]], generator, value_model, masks, seeds,
                  repeats: int, miner=None) -> dict[str, dict]:
    """Time each variant (name → (params, batch size)) ``repeats`` times, interleaved with a rotating order.

    Returns name → {"s_per_image": median over rounds, "s_per_image_min", "value", "seg_loss"} (those of the
    first round; sampling is deterministic given the seeds, so every round draws the same images)."""
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, dict] = {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            params, batch_size = variants[name]
            images, took = run_sampler(params, generator, value_model, masks, seeds, batch_size, miner)
            seconds[name].append(took)
            if name not in values:
                values[name] = mean_terms(value_model, images, masks)
            log.info("round %d %-45s %.2f s", round_, name, took)
    n = len(masks)
    return {name: {"s_per_image": statistics.median(seconds[name]) / n, "s_per_image_min": min(seconds[name]) / n,
                   **values[name]} for name in names}


# -- the command ----------------------------------------------------------------------------------------------
def method_entry(config: dict, dataset: str, name: str, base: dict, overrides: dict) -> dict:
    """The settings of ``name``: config synthesis < dataset guidance scale < ``methods.<name>`` < base <
    command-line overrides."""
    from .config import method_params

    config_name = CONFIG_METHOD.get(name, name)
    if config_name in config.get("methods", {}):
        params = method_params(config, dataset, config_name)
    else:
        params = dict(config["synthesis"])
        params.update({k: v for k, v in config["datasets"][dataset].items() if k == "guidance_scale"})
    params.update(base)
    params.update(overrides)
    return params


def sampling(args) -> int:
    from . import sampling as _sampling  # noqa: F401  (registers the samplers)
    from .data.canonical import load_split
    from .sampling import vgd  # noqa: F401  (registers "vgd" until sampling/__init__ imports it)
    from .sampling.base import noise_seed
    from .sampling.synthesize import conditioning_sources
    from .training import set_torch_threads

    set_torch_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    dataset = args.dataset or config["run"]["datasets"][0]
    tmp = None
    if args.build_tiny:
        if args.build_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="segsynth-bench-")
        out = Path(args.build_dir or tmp.name)
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
        generator, value_model, miner = load_models(paths["generator"], paths["segmenter"], paths["miner"])
        overrides = {k: v for k, v in {"steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale,
                                       "batch_size": args.batch_size}.items() if v is not None}
        vgd_overrides = dict(overrides, **json.loads(args.vgd or "{}"))
        base = {name: method_entry(config, dataset, name, entry, vgd_overrides if name == "vgd" else overrides)
                for name, entry in SAMPLERS_TO_TIME.items()}
        batch_size = base[BASELINE]["batch_size"]
        train = load_split(paths["data"], "train")
        n = args.n_images or batch_size
        sources = conditioning_sources(len(train.masks), -(-n // len(train.masks)), args.seed)[:n]
        masks = torch.from_numpy(np.ascontiguousarray(train.masks[sources]))
        seeds = [noise_seed(args.seed, i) for i in range(n)]
        setup = {"dataset": dataset, "n_images": n, "steps": base[BASELINE]["steps"],
                 "eta": base[BASELINE]["eta"], "guidance_scale": base[BASELINE]["guidance_scale"],
                 "resolution": list(train.images.shape[2:]), "latent": generator.latent_space,
                 "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                 "timing": "median of interleaved rounds"}
        if args.levers:
            levers(args, base, generator, value_model, masks, seeds, batch_size, setup)
        else:
            variants = {name: (params, params.get("batch_size", batch_size)) for name, params in base.items()}
            result = time_samplers(variants, generator, value_model, masks, seeds, args.repeats, miner)
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
            line.update(setup)
            line["vgd_params"] = vgd.vgd_options(base["vgd"])
            print(json.dumps(line), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def levers(args, base, generator, value_model, masks, seeds, batch_size, setup) -> None:
    """One JSON line per lever variant: s/image, ratio to RD at the same batch size, value, gain kept."""
    chosen = dict(LEVERS)
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
    result = time_samplers(variants, generator, value_model, masks, seeds, args.repeats)

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
            **kept, **setup}), flush=True)


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
    p.add_argument("--dataset", help="config dataset (default: the first of run.datasets)")
    p.add_argument("--generator", help="generator directory (default results/<dataset>/generators/tiny)")
    p.add_argument("--segmenter", help="f_θ directory (default results/<dataset>/segmenters/unet/real)")
    p.add_argument("--miner", help="trained Miner directory (default results/<dataset>/miners/tiny/unet)")
    p.add_argument("--data", help="dataset directory (default results/<dataset>/data)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the config's)")
    p.add_argument("--eta", type=float)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--batch-size", type=int, help="sampling batch size (default: the config's)")
    p.add_argument("--n-images", type=int, help="images per timed run (default: one batch)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed of the masks and noise")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a workflow job)")
    p.add_argument("--vgd", help="JSON overrides of the VGD settings, e.g. '{\"jacobian\": \"detached\"}'")
    p.add_argument("--levers", action="store_true", help="time the naive VGD and each speed lever")
    p.add_argument("--variant", action="append", metavar="NAME=JSON", help="an extra --levers variant")
    p.add_argument("--only", help="comma-separated --levers variants to run (the reference always runs)")
    p.add_argument("--reference", default="naive,no_time_travel", help="comma-separated --levers variants; "
                   "each adds gain_kept_<variant>: a variant's value gain over RD divided by that one's (default: "
                   "naive, the paper's VGD, and no_time_travel, its full-gradient counterpart without time-travel)")
    p.add_argument("--build-tiny", action="store_true", help="train tiny models on the fly instead")
    p.add_argument("--build-dir", help="keep (and reuse) the --build-tiny models here")
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
