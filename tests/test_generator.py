"""The mask-to-image generator: build, train with resume, save/load, and the from_pretrained path."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from segsynth.errors import ConfigError
from segsynth.generator import MaskToImageGenerator, build_generator
from segsynth.generator.train import train_generator
from segsynth.sampling.ddim import DDIMSampler


def _state(directory):
    gen = MaskToImageGenerator.load(directory)
    return {k: v.clone() for k, v in gen.state_dict().items()}


def test_tiny_generator_predicts_noise_of_the_right_shape(tiny_generator_cfg):
    gen = build_generator(tiny_generator_cfg, ["bg", "a", "b"], channels=1, resolution=(16, 16), seed=0)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:8, 4:8] = 1
    prompt = gen.encode_prompt(masks)
    assert prompt.shape == (2, 2, 8)  # one token per foreground class
    # class "a" present → its token, class "b" absent → the null token
    torch.testing.assert_close(prompt[0, 1], gen.prompt_embedding.null_token)
    eps = gen.predict_noise(torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), gen.mask_condition(masks), prompt)
    assert eps.shape == (2, 1, 16, 16)
    assert not gen.latent_space


def test_training_resumes_to_the_same_weights(tmp_path, tiny_data, tiny_generator_cfg):
    straight = train_generator(tiny_generator_cfg, tiny_data, tmp_path / "straight", seed=3)
    assert straight["steps"] == 4 and straight["resumed_from"] == 0
    # A job killed after step 2 (its checkpoint written) and restarted ends at the same step with the same weights.
    killed = train_generator(tiny_generator_cfg, tiny_data, tmp_path / "resumed", seed=3, stop_after=2)
    assert killed["stopped"] and not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.ckpt" / "last.pt").exists()
    resumed = train_generator(tiny_generator_cfg, tiny_data, tmp_path / "resumed", seed=3)
    assert resumed["steps"] == 4 and resumed["resumed_from"] == 2
    assert not (tmp_path / "resumed.ckpt").exists()
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_training_changes_the_weights_and_save_load_round_trips(tmp_path, tiny_data, tiny_generator_cfg):
    train_generator(tiny_generator_cfg, tiny_data, tmp_path / "gen", seed=0)
    loaded = MaskToImageGenerator.load(tmp_path / "gen")
    assert not any(p.requires_grad for p in loaded.parameters())
    fresh = build_generator(tiny_generator_cfg, ["background", "ring", "core"], 1, (16, 16), seed=0)
    moved = [not torch.equal(p, q) for p, q in zip(fresh.unet.parameters(), loaded.unet.parameters())]
    assert any(moved)
    assert (tmp_path / "gen" / "train_stats.json").exists()


def _save_tiny_stable_diffusion(root):
    """A Stable Diffusion directory in the hub layout, with tiny random weights, saved locally."""
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                 vocab_size=600, max_position_embeddings=16)).save_pretrained(root / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(root / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon").save_pretrained(root / "scheduler")
    return root


def test_from_pretrained_path_loads_a_locally_saved_stable_diffusion(tmp_path, tiny_data, tiny_generator_cfg):
    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = dict(tiny_generator_cfg, pretrained=str(sd))
    del cfg["unet"]  # architecture comes from the pretrained directory
    gen = build_generator(cfg, ["background", "ring", "core"], 1, (16, 16), seed=0,
                          prompt_template="a scan showing {classes}")
    assert gen.latent_space and gen.text_encoder is not None and gen.prompt_embedding is None
    assert gen.latent_shape(2) == (2, 4, 8, 8)
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    masks[0, 2:6, 2:6] = 2
    assert gen.prompt_text(torch.tensor([[False, True]])) == ["a scan showing core"]
    assert gen.encode_prompt(masks).shape == (1, 16, 16)  # CLIP hidden states (tokens × width)

    # Fine-tune: with a pretrained UNet only the ControlNet learns (train_unet false).
    cfg["training"]["train_unet"] = False
    stats = train_generator(cfg, tiny_data, tmp_path / "gen", seed=0, prompt_template="a scan showing {classes}")
    assert stats["trainable_parameters"] == sum(p.numel() for p in gen.controlnet.parameters())
    loaded = MaskToImageGenerator.load(tmp_path / "gen")
    original_unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    for p, q in zip(original_unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(p, q)  # frozen
    images, _ = DDIMSampler({"steps": 2, "eta": 0.0, "guidance_scale": 3.0}).sample(loaded, masks, [7])
    assert images.shape == (1, 1, 16, 16)  # decoded by the VAE, RGB averaged to the dataset's grey
    assert images.abs().max() <= 1.0


def test_pretrained_with_a_resolution_the_vae_cannot_encode_is_a_config_error(tmp_path, tiny_generator_cfg):
    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = dict(tiny_generator_cfg, pretrained=str(sd))
    with pytest.raises(ConfigError, match="not divisible"):
        build_generator(cfg, ["background", "a"], 1, (15, 15), seed=0)


def test_value_prediction_schedulers_are_refused(tmp_path, tiny_generator_cfg):
    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(sd / "scheduler")
    with pytest.raises(ConfigError, match="epsilon"):
        build_generator(dict(tiny_generator_cfg, pretrained=str(sd)), ["background", "a"], 1, (16, 16), seed=0)
