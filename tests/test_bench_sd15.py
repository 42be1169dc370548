"""``python -m segsynth.bench sampling --shapes sd15``: the papers' architecture with random weights.

The fast tests build SD 1.5's parts on the meta device (shapes and parameter counts, no weights, no memory) and
run the command end to end with the SD 1.5 configs shrunk; the slow one builds the real-size generator on the
CPU (~15 s, ~5.5 GB) and runs one denoiser call and one decode.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segsynth import bench
from segsynth.bench import (SD15_PARAMETERS, SD15_RESOLUTION, PeakMemory, build_sd15_generator, load_config,
                            main, method_entry, random_value_model)
from segsynth.errors import ConfigError

CLASSES = ["background", "csf", "gm", "wm"]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_parts_have_sd15_shapes_and_parameter_counts():
    gen = build_sd15_generator(CLASSES, channels=1, device="meta")
    assert gen.device.type == "meta"
    # exactly SD 1.5's UNet and VAE; the ControlNet's conditioning takes 4 one-hot classes instead of RGB
    assert _count(gen.unet) == SD15_PARAMETERS["unet"] == 859_520_964
    assert _count(gen.vae) == SD15_PARAMETERS["vae"] == 83_653_863
    assert _count(gen.controlnet) == SD15_PARAMETERS["controlnet"] + (len(CLASSES) - 3) * 16 * 3 * 3
    assert abs(_count(gen.controlnet) / 361e6 - 1) < 0.01
    unet, cn, vae = gen.unet.config, gen.controlnet.config, gen.vae.config
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280) and unet.layers_per_block == 2
    assert unet.cross_attention_dim == 768 and unet.attention_head_dim == 8 and unet.sample_size == 32
    assert tuple(unet.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert tuple(cn.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    assert cn.conditioning_channels == len(CLASSES)
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512) and vae.latent_channels == 4
    assert vae.scaling_factor == 0.18215
    assert gen.latent_space and gen.latent_shape(8) == (8, 4, 32, 32)
    assert gen.meta["resolution"] == [SD15_RESOLUTION] * 2 and gen.meta["cross_attention_dim"] == 768
    assert gen.prompt_embedding.class_tokens.shape == (3, 768)
    assert not any(p.requires_grad for p in gen.parameters()) and not gen.training


def test_sd15_noise_schedule_is_sds():
    gen = build_sd15_generator(CLASSES, channels=1, device="meta")
    cfg = gen.noise_scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    assert gen.noise_scheduler.betas.device.type == "cpu"
    ddim = gen.sampling_scheduler()
    assert not ddim.config.set_alpha_to_one and ddim.config.steps_offset == 1 and not ddim.config.clip_sample
    assert float(ddim.final_alpha_cumprod) == pytest.approx(1 - 0.00085)


def test_sd15_settings_default_to_the_paper_preset(repo_root):
    config = load_config(repo_root / "config.yaml", bench.SD15_PRESET)
    assert {k: config["synthesis"][k] for k in ("steps", "eta", "guidance_scale", "batch_size")} == {
        "steps": 100, "eta": 0.2, "guidance_scale": 7.5, "batch_size": 16}
    rd = method_entry(config, "mni152", "ddim", {"sampler": "ddim"}, {})
    assert (rd["steps"], rd["eta"], rd["guidance_scale"]) == (100, 0.2, 7.5)
    assert rd["batch_size"] == config["methods"]["rd"].get("batch_size", 16)  # the preset may batch RD wider
    assert config["miner"]["channels"] == [48, 96, 192, 192] and config["miner"]["network"] == "resunet"
    fast = method_entry(config, "mni152", "vgd_fast", {"sampler": "vgd"}, {})
    assert fast["jacobian"] == "detached" and fast["time_travel"] == 0
    vgd = method_entry(config, "mni152", "vgd", {"sampler": "vgd"}, {})
    assert "jacobian" not in vgd and (vgd["steps"], vgd["batch_size"]) == (100, 16)  # the paper's defaults
    vgd = method_entry(config, "mni152", "vgd", {"sampler": "vgd"}, {"steps": 4, "batch_size": 1})
    assert (vgd["steps"], vgd["batch_size"]) == (4, 1)
    # the deep merge keeps what the preset does not set
    assert config["miner"]["mu_bound"] == 1.0 and "mni152" in config["datasets"]


def test_random_value_model_is_the_registry_segmenter(repo_root):
    config = load_config(repo_root / "config.yaml")
    f, segmenter = random_value_model(config, "unet", 1, CLASSES, seed=0)
    assert segmenter.kind == "monai_unet"
    with torch.no_grad():
        probs = f(torch.zeros(1, 1, 64, 64))
    assert probs.shape == (1, 4, 64, 64) and torch.allclose(probs.sum(1), torch.ones(1, 64, 64))
    assert not any(p.requires_grad for p in f.parameters())
    with pytest.raises(ConfigError, match="cannot be initialised"):
        random_value_model(config, "nnunet", 1, CLASSES)


def test_peak_memory_sees_an_allocation():
    meter = PeakMemory("cpu")
    assert meter.key in ("peak_rss_delta_mb", "peak_rss_growth_mb")
    meter.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = meter.stop()
    del x
    assert peak > 48


@pytest.fixture
def small_sd15(monkeypatch):
    """SD 1.5's block layout at a few channels, so the whole command runs in seconds."""
    monkeypatch.setattr(bench, "SD15_UNET", {**bench.SD15_UNET, "block_out_channels": (32,) * 4,
                                             "layers_per_block": 1, "cross_attention_dim": 16,
                                             "norm_num_groups": 8})
    monkeypatch.setattr(bench, "SD15_VAE", {**bench.SD15_VAE, "block_out_channels": (8,) * 4,
                                            "layers_per_block": 1, "norm_num_groups": 4})


def test_sd15_command_prints_every_sampler_with_memory(small_sd15, repo_root, tmp_path, capsys):
    from conftest import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=6, size=SD15_RESOLUTION)
    common = ["sampling", "--shapes", "sd15", "--config", str(repo_root / "config.yaml"), "--data", str(data),
              "--value-segmenter", "unet", "--steps", "1", "--batch-size", "2", "--n-images", "2",
              "--repeats", "1", "--warmup", "0"]
    assert main(common) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    r = json.loads(line)
    for name in ("ddim", "vgd", "vgd_fast", "miner"):
        assert r[f"{name}_s_per_image"] > 0 and np.isfinite(r[f"{name}_value"])
        assert r[f"{name}_peak_rss_delta_mb"] >= 0 or r[f"{name}_peak_rss_growth_mb"] >= 0
    assert r["ratio"] > 0 and r["vgd_fast_ratio"] > 0 and r["miner_ratio"] > 0
    assert (r["steps"], r["batch_size"], r["n_images"], r["eta"], r["guidance_scale"]) == (1, 2, 2, 0.2, 7.5)
    assert r["shapes"] == "sd15" and r["resolution"] == [256, 256] and r["latent"] and r["device"] == "cpu"
    assert r["memory_before_runs_mb"] is None or r["memory_before_runs_mb"] > 0
    assert r["preset"].endswith("paper.yaml") and r["miner_channels"] == [48, 96, 192, 192]
    assert r["vgd_params"]["jacobian"] == "full" and r["vgd_params"]["time_travel"] == 1
    assert r["vgd_fast_params"]["jacobian"] == "detached" and r["vgd_fast_params"]["time_travel"] == 0
    assert set(r["parameters"]) == {"unet", "controlnet", "vae", "prompt_embedding", "value_model", "miner"}

    assert main(common + ["--levers", "--only", "detached"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [row["variant"] for row in rows] == ["naive", "detached", "no_time_travel"]
    assert all(row["shapes"] == "sd15" and row["ratio"] > 0 and "gain_kept_naive" in row for row in rows)
    assert all(row["batch_size"] == 2 and row["steps"] == 1 for row in rows)
    assert all(any(k.startswith("peak_rss") for k in row) for row in rows)

    # the tiny-decoder levers: x̂_{0|t} decoded by a random AutoencoderTiny the bench saves and loads
    assert main(common + ["--levers", "--only", "tiny_decoder+no_time_travel+guidance_first_third"]) == 0
    rows = {json.loads(x)["variant"]: json.loads(x) for x in capsys.readouterr().out.strip().splitlines()}
    tiny = rows["tiny_decoder+no_time_travel+guidance_first_third"]
    assert tiny["overrides"]["decoder"] == "tiny" and Path(tiny["overrides"]["tiny_decoder"]).is_dir()
    assert tiny["ratio"] > 0 and np.isfinite(tiny["value"])

    small = make_tiny_dataset(tmp_path / "small", n=6, size=64)
    assert main([*common[:6], str(small), *common[7:]]) == 2
    assert "256" in capsys.readouterr().err


@pytest.mark.slow
def test_sd15_generator_builds_and_denoises_at_full_size():
    """The real thing on the CPU: ~1.3 G random parameters (~5.5 GB), one guided ε call and one decode."""
    gen = build_sd15_generator(CLASSES, channels=1, device="cpu")
    assert _count(gen.unet) == SD15_PARAMETERS["unet"] and _count(gen.vae) == SD15_PARAMETERS["vae"]
    masks = torch.zeros(1, SD15_RESOLUTION, SD15_RESOLUTION, dtype=torch.long)
    masks[:, 64:192, 64:192] = 2
    with torch.no_grad():
        x = torch.randn(gen.latent_shape(1))
        eps = gen.guided_noise(x, torch.tensor(999), gen.mask_condition(masks), gen.encode_prompt(masks),
                               gen.encode_prompt(masks, unconditional=True), 7.5)
        image = gen.decode(x)
    assert eps.shape == (1, 4, 32, 32) and torch.isfinite(eps).all()
    assert image.shape == (1, 1, SD15_RESOLUTION, SD15_RESOLUTION) and torch.isfinite(image).all()
