"""segsynth.precision: one config switch; float32 and bit-identical on a CPU, autocast code paths that run.

The reduced-precision paths are exercised on the CPU with ``cpu_autocast`` (bfloat16 autocast, which CPUs
support), so a dtype mismatch in them fails here rather than on a cluster node."""

import numpy as np
import pytest
import torch

from segsynth.errors import ConfigError
from segsynth.precision import PRECISIONS, autocast, compute_dtype, configure

SEGMENTER = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 3,
             "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 100, "augment": False}
SYNTHESIS = {"budget": 0.5, "steps": 2, "eta": 0.5, "guidance_scale": 2.0, "batch_size": 3}


def test_every_setting_is_float32_on_a_cpu_and_unknown_ones_are_config_errors():
    for precision in PRECISIONS:
        assert compute_dtype(precision, "cpu") is None
        configure(precision, "cpu")  # no CUDA switches touched
    assert compute_dtype("bf16", "cpu", cpu_autocast=True) == torch.bfloat16
    assert compute_dtype("tf32", "cpu", cpu_autocast=True) is None
    with pytest.raises(ConfigError, match="precision"):
        compute_dtype("fp8", "cpu")
    x = torch.randn(4, 4)
    with autocast(None, "cpu"):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.bfloat16, "cpu"):
        assert (x @ x).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import train_tiny_models

    root = tmp_path_factory.mktemp("precision")
    train_tiny_models(root, SEGMENTER)
    return root


@pytest.mark.parametrize("method", ["rd", "vgd", "tfg", "miner"])
def test_synthesis_is_bit_identical_on_a_cpu_and_runs_under_autocast(models, tmp_path, method):
    from segsynth.miner import train_miner
    from segsynth.sampling.synthesize import synthesize

    sampler = {"rd": "ddim"}.get(method, method)
    params = {**SYNTHESIS, "sampler": sampler}
    kwargs = {"value_model_dir": models / "seg"}
    if method == "miner":
        miner = models / "miner"
        if not miner.exists():
            train_miner({"channels": [4, 8], "steps": 2, "batch_size": 2, "lr": 1e-3, "beta": 0.001,
                         "kappa_up": 0.5, "rollout_steps": 2, "checkpoint_every": 100},
                        models / "data", models / "gen", models / "seg", miner, seed=0, schedule=params)
        kwargs["miner_dir"] = miner
    runs = {}
    for name, extra in {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
                        "bf16_cpu_autocast": {"precision": "bf16", "cpu_autocast": True}}.items():
        synthesize(models / "gen", models / "data", method, params, seed=0, out_dir=tmp_path / name, **kwargs,
                   **extra)
        runs[name] = np.load(tmp_path / name / "images.npy")
    assert np.array_equal(runs["fp32"], runs["bf16"])  # a CPU ignores the switch
    reduced = runs["bf16_cpu_autocast"]
    assert reduced.dtype == np.float32 and np.isfinite(reduced).all()
    assert not np.array_equal(reduced, runs["fp32"])  # autocast did run
    assert np.abs(reduced - runs["fp32"]).mean() < 0.1


def test_training_under_autocast_keeps_float32_weights_and_saves_the_pretrained_frozen_ones(tmp_path, tiny_data,
                                                                                           tiny_generator_cfg):
    from diffusers import UNet2DConditionModel
    from test_generator import _save_tiny_stable_diffusion

    from segsynth.generator import MaskToImageGenerator
    from segsynth.generator.train import train_generator
    from segsynth.miner import train_miner
    from segsynth.segmenters import load_segmenter, train_segmenter

    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = dict(tiny_generator_cfg, pretrained=str(sd))
    del cfg["unet"]
    cfg["training"] = dict(cfg["training"], steps=3, train_unet=False, gradient_checkpointing=True)
    stats = train_generator(cfg, tiny_data, tmp_path / "gen", seed=0, precision="bf16", cpu_autocast=True)
    assert np.isfinite(stats["final_loss"])
    gen = MaskToImageGenerator.load(tmp_path / "gen")
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    original = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    assert all(torch.equal(p, q) for p, q in zip(original.parameters(), gen.unet.parameters()))

    train_segmenter(SEGMENTER, tiny_data, tmp_path / "seg", seed=0, precision="bf16")
    reference = load_segmenter(tmp_path / "seg").predict_proba(np.zeros((1, 1, 16, 16), np.float32))
    stats = train_miner({"channels": [4, 8], "steps": 2, "batch_size": 2, "lr": 1e-3, "beta": 0.001,
                         "kappa_up": 0.5, "rollout_steps": 2, "checkpoint_every": 100},
                        tiny_data, tmp_path / "gen", tmp_path / "seg", tmp_path / "miner", seed=0,
                        schedule={"steps": 3, "eta": 0.0, "guidance_scale": 1.0}, precision="bf16",
                        cpu_autocast=True)
    assert np.isfinite(stats["final_seg_loss"])
    assert np.isfinite(reference).all()


def test_a_segmenter_trains_under_autocast_with_float32_weights(tmp_path):
    from conftest import toy_arrays

    from segsynth.segmenters import get_segmenter_class

    images, masks = toy_arrays(8)
    segmenter = get_segmenter_class("monai_unet")(SEGMENTER, images.shape[1], 3)
    segmenter.precision, segmenter.cpu_autocast = "bf16", True
    stats = segmenter.train(images, masks, tmp_path / "ckpt", seed=0)
    assert np.isfinite(stats["final_loss"])
    assert all(p.dtype == torch.float32 for p in segmenter.network.parameters())
