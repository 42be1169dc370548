"""``make gpu-check``: the project on CUDA — every sampler, the trainers killed and resumed, mixed precision, no
host sync inside a sampling loop, and one small end-to-end DAG. Each test skips without a CUDA device, so the
default test run collects them and skips them cleanly; on a GPU node ``make gpu-check`` runs them (with the
nnU-Net tests of tests/test_nnunet.py that then train and resume on the GPU too)."""

import shutil
import warnings

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")]

SEGMENTER = {"kind": "monai_unet", "channels": [8, 16], "strides": [2], "num_res_units": 0, "steps": 20,
             "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": 10, "augment": False}
MINER = {"channels": [8, 16], "steps": 6, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "beta": 0.001,
         "kappa_up": 5.0, "rollout_steps": 3, "grad_clip": 1.0, "mu_bound": 3.0, "sigma_bound": 0.9,
         "checkpoint_every": 3}
BASE = {"steps": 4, "eta": 0.5, "guidance_scale": 2.0, "budget": 1.0, "batch_size": 4}
#: every registered sampler, with settings that exercise its extra noise draws
SAMPLERS = {"rd": {"sampler": "ddim"}, "vgd": {"sampler": "vgd"},
            "vgd_fast": {"sampler": "vgd", "jacobian": "detached", "time_travel": 0},
            "miner": {"sampler": "miner"}, "adv_guidance": {"sampler": "adv_guidance"}, "ugdm": {"sampler": "ugdm"},
            "tfg": {"sampler": "tfg", "recurrence": 2}, "advdiffuser": {"sampler": "advdiffuser"},
            "diffaug": {"sampler": "diffaug"}, "augpaint": {"sampler": "augpaint", "jumps": 2},
            "gauda": {"sampler": "gauda", "oversample": 2}}
#: samplers without sign() or argmax in the loop: CUDA follows the CPU closely (TF32 off under fp32)
SMOOTH = {"rd", "miner", "diffaug", "augpaint"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny generator (EMA on), f_θ and Miner, trained on the GPU; the batch's masks, real images and seeds."""
    from conftest import train_tiny_models

    from segsynth.data.canonical import load_split
    from segsynth.miner import train_miner
    from segsynth.sampling.base import noise_seed

    root = tmp_path_factory.mktemp("gpu")
    data, gen, seg = train_tiny_models(root, SEGMENTER)
    train_miner(MINER, data, gen, seg, root / "miner", seed=0, schedule=BASE)
    train = load_split(data, "train")
    return {"root": root, "data": data, "gen": gen, "seg": seg, "miner": root / "miner",
            "masks": torch.from_numpy(train.masks[:4].copy()),
            "sources": torch.from_numpy(train.images[:4].copy()) * 2 - 1,
            "seeds": [noise_seed(1, i) for i in range(4)]}


def _loaded(models, device):
    from segsynth.generator import MaskToImageGenerator
    from segsynth.miner import AdversarialityMiner
    from segsynth.segmenters import load_segmenter

    return (MaskToImageGenerator.load(models["gen"]).to(device),
            load_segmenter(models["seg"]).as_value_model().to(device),
            AdversarialityMiner.load(models["miner"]).to(device))


def _sample(name, models, device, steps=BASE["steps"]):
    from segsynth.precision import configure
    from segsynth.sampling import build_sampler

    configure("fp32", device)
    generator, value_model, miner = _loaded(models, device)
    sampler = build_sampler(name, {**BASE, "steps": steps, **SAMPLERS[name]})
    if sampler.needs_miner:
        sampler.attach_miner(miner)
    return sampler.sample(generator, models["masks"].to(device), models["seeds"], value_model,
                          models["sources"].to(device))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_cuda_with_the_cpus_noise(models, name):
    images, records = _sample(name, models, "cuda")
    reference, reference_records = _sample(name, models, "cpu")
    assert images.device.type == "cuda" and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0 and len(records) == len(models["seeds"])
    assert [sorted(r) for r in records] == [sorted(r) for r in reference_records]
    if name in SMOOTH:  # same per-sample noise on both devices: the same images up to float rounding
        assert (images.cpu() - reference).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["rd", "vgd", "vgd_fast", "miner", "tfg", "augpaint"])
def test_sampling_loops_never_wait_for_the_gpu(models, name):
    """The number of host synchronisations of a batch does not grow with the step count: none per step."""

    def syncs(steps):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _sample(name, models, "cuda", steps=steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(2)  # warm-up: cuDNN/cuBLAS initialisation
    assert syncs(6) == syncs(2)


def test_generator_with_ema_resumes_on_cuda(tmp_path, tiny_data, tiny_generator_cfg):
    from segsynth.generator.train import train_generator

    cfg = dict(tiny_generator_cfg)
    cfg["training"] = dict(cfg["training"], steps=6, checkpoint_every=2, ema_decay=0.9)
    whole = train_generator(cfg, tiny_data, tmp_path / "whole", seed=0)
    stopped = train_generator(cfg, tiny_data, tmp_path / "resumed", seed=0, stop_after=3)
    assert stopped == {"steps": 3, "stopped": True}
    resumed = train_generator(cfg, tiny_data, tmp_path / "resumed", seed=0)  # EMA read to CPU, moved back
    assert resumed["resumed_from"] == 3 and resumed["steps"] == whole["steps"]
    assert abs(resumed["final_loss"] - whole["final_loss"]) < 1e-2


def test_miner_and_segmenter_resume_on_cuda(models, tmp_path):
    from conftest import toy_arrays

    from segsynth.miner import train_miner
    from segsynth.segmenters import get_segmenter_class

    args = (models["data"], models["gen"], models["seg"])
    train_miner(MINER, *args, tmp_path / "miner", seed=0, schedule=BASE, stop_after=4)
    stats = train_miner(MINER, *args, tmp_path / "miner", seed=0, schedule=BASE)
    assert stats["resumed_from"] == 4 and np.isfinite(stats["final_seg_loss"])

    images, masks = toy_arrays(16)
    cfg = dict(SEGMENTER, steps=5, checkpoint_every=2)
    first = get_segmenter_class("monai_unet")(cfg, 1, 3)
    first.train(images, masks, tmp_path / "seg.ckpt", seed=0)  # leaves its step-4 checkpoint
    second = get_segmenter_class("monai_unet")(cfg, 1, 3)
    stats = second.train(images, masks, tmp_path / "seg.ckpt", seed=0)
    assert stats["resumed_from_step"] == 4 and next(second.network.parameters()).device.type == "cuda"


@pytest.mark.parametrize("method", ["rd", "vgd", "miner"])
def test_mixed_precision_synthesis_and_training_on_cuda(models, tmp_path, tiny_data, tiny_generator_cfg, method):
    from segsynth.generator.train import train_generator
    from segsynth.sampling.synthesize import synthesize

    params = {**BASE, **SAMPLERS[method], "budget": 0.5}
    extra = {"miner_dir": models["miner"]} if method == "miner" else {}
    runs = {}
    for precision in ("fp32", "auto"):
        synthesize(models["gen"], models["data"], method, params, seed=0, out_dir=tmp_path / precision,
                   value_model_dir=models["seg"], precision=precision, **extra)
        runs[precision] = np.load(tmp_path / precision / "images.npy")
    assert np.isfinite(runs["auto"]).all() and np.abs(runs["auto"] - runs["fp32"]).mean() < 0.1
    if method == "rd":
        cfg = dict(tiny_generator_cfg)
        cfg["training"] = dict(cfg["training"], steps=4)
        stats = train_generator(cfg, tiny_data, tmp_path / "gen_bf16", seed=0, precision="auto")
        assert np.isfinite(stats["final_loss"])


def test_a_killed_synthesis_resumes_on_cuda(models, tmp_path):
    from segsynth.sampling.synthesize import synthesize

    params = {**BASE, **SAMPLERS["vgd"], "batch_size": 2}
    kwargs = {"value_model_dir": models["seg"], "precision": "fp32"}
    synthesize(models["gen"], models["data"], "vgd", params, seed=0, out_dir=tmp_path / "a", stop_after=1, **kwargs)
    synthesize(models["gen"], models["data"], "vgd", params, seed=0, out_dir=tmp_path / "a", **kwargs)
    synthesize(models["gen"], models["data"], "vgd", params, seed=0, out_dir=tmp_path / "b", **kwargs)
    # the GPU is not bit-reproducible across runs in general; the shard bookkeeping is
    assert np.load(tmp_path / "a" / "images.npy").shape == np.load(tmp_path / "b" / "images.npy").shape


def test_segmenter_profile_on_cuda(models, tmp_path):
    """The segmenter table's size and MACs with the model loaded onto the GPU (the input follows it)."""
    from segsynth.evaluation import profile_segmenter

    profile = profile_segmenter(models["seg"], models["data"], tmp_path / "profile.json")
    assert profile["params"] > 0 and profile["macs"] > 0 and (tmp_path / "profile.json").exists()


def test_a_small_dag_runs_end_to_end_on_cuda(tmp_path):
    from test_workflow import E2E_CONFIG, snakemake

    config = tmp_path / "config.yaml"
    shutil.copy(E2E_CONFIG, config)
    run = snakemake("--configfile", str(config), "--cores", "8", "--resources", "gpu=1", cwd=tmp_path, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "results" / "tables" / "main.parquet").exists()
    log = (tmp_path / "logs" / "mni152" / "synthetic" / "tiny" / "rd" / "seed0.log").read_text()
    assert "Traceback" not in log
