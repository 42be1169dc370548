"""The mask-to-image generator: build, train with resume, save/load, and the from_pretrained path."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import REPO
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
    # the summary covers the steps before the kill too (the loss records travel in the checkpoint)
    assert resumed["final_loss"] == straight["final_loss"] and resumed["weighting"] == straight["weighting"]
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_rerun_after_a_config_change_starts_afresh(tmp_path, tiny_data, tiny_generator_cfg):
    # Snakemake reruns a job whose config changed: the killed run's checkpoint (beside the output, where Snakemake
    # does not look) was made under the old config and must not be continued
    train_generator(tiny_generator_cfg, tiny_data, tmp_path / "gen", seed=3, stop_after=2)
    changed = copy.deepcopy(tiny_generator_cfg)
    changed["training"]["lr"] *= 2
    assert train_generator(changed, tiny_data, tmp_path / "gen", seed=3)["resumed_from"] == 0
    # a runtime key (how often to checkpoint) does not change the job: its checkpoint resumes
    train_generator(tiny_generator_cfg, tiny_data, tmp_path / "again", seed=3, stop_after=2)
    runtime = copy.deepcopy(tiny_generator_cfg)
    runtime["training"]["checkpoint_every"] = 3
    assert train_generator(runtime, tiny_data, tmp_path / "again", seed=3)["resumed_from"] == 2


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_gives_samplers_the_noise(tiny_generator_cfg, prediction_type, monkeypatch):
    """A network that predicts its training target exactly gives back exactly the noise that made x_t, whatever
    it predicts; and the sampling scheduler reads that ε."""
    cfg = dict(tiny_generator_cfg, prediction_type=prediction_type)
    gen = build_generator(cfg, ["bg", "a"], channels=1, resolution=(16, 16), seed=0)
    assert gen.sampling_scheduler().config.prediction_type == "epsilon"
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 16, 16) * 2 - 1, torch.randn(3, 1, 16, 16)
    t = torch.tensor([5, 400, 990])
    x_t = gen.noise_scheduler.add_noise(x0, noise, t)
    target = gen.training_target(x0, noise, t)
    expected = {"epsilon": noise, "v_prediction": gen.noise_scheduler.get_velocity(x0, noise, t), "sample": x0}
    torch.testing.assert_close(target, expected[prediction_type])
    monkeypatch.setattr(gen, "model_output", lambda *args: target)
    masks = torch.zeros(3, 16, 16, dtype=torch.long)
    eps = gen.predict_noise(x_t, t, gen.mask_condition(masks), gen.encode_prompt(masks))
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
    # a scalar timestep (samplers pass one per step) broadcasts over the batch
    x_500 = gen.noise_scheduler.add_noise(x0, noise, torch.tensor([500] * 3))
    monkeypatch.setattr(gen, "model_output", lambda *args: gen.training_target(x0, noise, torch.tensor([500] * 3)))
    torch.testing.assert_close(gen.predict_noise(x_500, torch.tensor(500), gen.mask_condition(masks),
                                                 gen.encode_prompt(masks)), noise, rtol=1e-4, atol=1e-4)


def test_a_pretrained_v_prediction_stable_diffusion_is_sampled_in_epsilon(tmp_path, tiny_generator_cfg):
    """SD 2.x-style v-prediction checkpoints load (their scheduler says so) and sample through the ε interface."""
    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(sd / "scheduler")
    gen = build_generator(dict(tiny_generator_cfg, pretrained=str(sd)), ["background", "a"], 1, (16, 16), seed=0)
    assert gen.noise_scheduler.config.prediction_type == "v_prediction"
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    images, _ = DDIMSampler({"steps": 2, "eta": 0.0, "guidance_scale": 1.0}).sample(gen, masks, [3])
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()


def test_concat_conditioning_feeds_the_mask_as_input_channels(tmp_path, tiny_data, tiny_generator_cfg):
    cfg = dict(tiny_generator_cfg, conditioning="concat", prediction_type="v_prediction")
    gen = build_generator(cfg, ["background", "ring", "core"], 1, (16, 16), seed=0)
    assert gen.controlnet is None and gen.unet.config.in_channels == 1 + 3
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([300])
    empty, full = torch.zeros(1, 16, 16, dtype=torch.long), torch.full((1, 16, 16), 2)
    prompt = gen.encode_prompt(empty)
    assert not torch.allclose(gen.predict_noise(x, t, gen.mask_condition(empty), prompt),
                              gen.predict_noise(x, t, gen.mask_condition(full), prompt))
    stats = train_generator(cfg, tiny_data, tmp_path / "gen", seed=0)
    assert stats["trainable_parameters"] == (sum(p.numel() for p in gen.unet.parameters())
                                             + sum(p.numel() for p in gen.prompt_embedding.parameters()))
    loaded = MaskToImageGenerator.load(tmp_path / "gen")
    assert loaded.controlnet is None and not (tmp_path / "gen" / "controlnet").exists()
    assert loaded.meta["conditioning"] == "concat" and loaded.noise_scheduler.config.prediction_type == "v_prediction"
    images, _ = DDIMSampler({"steps": 2, "eta": 0.0, "guidance_scale": 2.0}).sample(loaded, full, [1])
    assert images.shape == (1, 1, 16, 16) and images.abs().max() <= 1.0


@pytest.mark.parametrize("conditioning", ["concat", "controlnet"])
def test_mask_guidance_extrapolates_from_the_unconditional_model(conditioning, tiny_generator_cfg):
    gen = build_generator(dict(tiny_generator_cfg, conditioning=conditioning), ["background", "ring", "core"], 1,
                          (16, 16), seed=0).eval()
    if gen.controlnet is not None:  # its zero convolutions would hide the mask from an untrained UNet
        torch.manual_seed(0)
        for p in gen.controlnet.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:12, 4:12] = 1
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 700])
    cond, prompt, null = gen.mask_condition(masks), gen.encode_prompt(masks), gen.encode_prompt(masks, True)
    with torch.no_grad():
        full = gen.predict_noise(x, t, cond, prompt)
        mask_only = gen.predict_noise(x, t, cond, null)
        nothing = gen.predict_noise(x, t, torch.zeros_like(cond), null)
        assert not torch.allclose(nothing, mask_only)  # the null condition is a different input
        expected = {(1.0, 3.0): nothing + 3.0 * (full - nothing),
                    (2.0, 1.0): mask_only + 2.0 * (full - mask_only),
                    (2.0, 3.0): nothing + 3.0 * (mask_only - nothing) + 2.0 * (full - mask_only),
                    (1.0, 1.0): full}
        for (prompt_scale, mask_scale), want in expected.items():
            got = gen.guided_noise(x, t, cond, prompt, null, prompt_scale, mask_scale)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=str((prompt_scale, mask_scale)))


def test_mask_dropout_trains_on_the_null_condition(tmp_path, tiny_data, tiny_generator_cfg, monkeypatch):
    seen = []
    original = MaskToImageGenerator.model_output

    def spy(self, x_t, t, cond_image, prompt):
        seen.append(cond_image.flatten(1).sum(1) == 0)
        return original(self, x_t, t, cond_image, prompt)

    monkeypatch.setattr(MaskToImageGenerator, "model_output", spy)
    cfg = dict(tiny_generator_cfg, conditioning="concat")
    train_generator(dict(cfg, training=dict(cfg["training"], mask_dropout=0.5)), tiny_data, tmp_path / "a", seed=0)
    dropped = torch.cat(seen)
    assert 0 < dropped.sum() < len(dropped)  # some samples saw no mask, some their one-hot mask
    seen.clear()
    train_generator(cfg, tiny_data, tmp_path / "b", seed=0)
    assert not torch.cat(seen).any()


def test_init_starts_from_a_saved_generator_and_refuses_one_that_does_not_fit(tmp_path, tiny_data,
                                                                              tiny_generator_cfg):
    cfg = dict(tiny_generator_cfg, conditioning="concat", prediction_type="v_prediction")
    train_generator(cfg, tiny_data, tmp_path / "first", seed=0)
    started = build_generator(dict(cfg, init=str(tmp_path / "first")), ["background", "ring", "core"], 1, (16, 16),
                              seed=5)
    for p, q in zip(MaskToImageGenerator.load(tmp_path / "first").parameters(), started.parameters()):
        assert torch.equal(p, q)
    # fine-tuning moves on from there
    stats = train_generator(dict(cfg, init=str(tmp_path / "first")), tiny_data, tmp_path / "second", seed=0)
    assert stats["steps"] == cfg["training"]["steps"]
    for bad, match in [(dict(cfg, init=str(tmp_path / "nowhere")), "not a saved generator"),
                       (dict(cfg, init=str(tmp_path / "first"), prediction_type="epsilon"), "prediction_type"),
                       (dict(cfg, init=str(tmp_path / "first"), conditioning="controlnet"), "conditioning"),
                       (dict(cfg, init=str(tmp_path / "first"),
                             unet=dict(cfg["unet"], block_out_channels=[8, 8])), "unet does not fit")]:
        with pytest.raises(ConfigError, match=match):
            build_generator(bad, ["background", "ring", "core"], 1, (16, 16), seed=0)
    with pytest.raises(ConfigError, match="class_names"):
        build_generator(dict(cfg, init=str(tmp_path / "first")), ["background", "ring"], 1, (16, 16), seed=0)


def test_the_shipped_default_checkpoint_fits_the_embedded_default():
    """config.yaml's tiny generator starts from segsynth/pretrained/mni152_tiny: it must load into that entry
    with the mni152 adapter's classes at the default resolution."""
    import yaml

    from segsynth.config import generator_init_path, weight_sources

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    entry = config["generators"]["tiny"]
    directory = generator_init_path(entry["init"])
    assert directory.is_dir() and str(directory / "unet" / "config.json") in weight_sources(entry)
    meta = MaskToImageGenerator.load(directory).meta
    resolution = config["datasets"]["mni152"]["resolution"]
    assert meta["resolution"] == [resolution, resolution]
    gen = build_generator(entry, meta["class_names"], meta["channels"], meta["resolution"], seed=0)
    assert gen.controlnet is None
