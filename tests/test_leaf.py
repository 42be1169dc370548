"""LEAF (segsynth/segmenters/leaf.py): the x0 objective and eq. 3 by hand, single-step inference shapes, Marigold's
input widening, alignment that costs nothing at inference and nothing at λ = 0, resume after a kill in either
phase, the value model's gradient, the Stable Diffusion path on a tiny locally saved model, the stability check
and the tables."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import toy_arrays
from diffusers import UNet2DModel

from segsynth.errors import ConfigError, InputDataError
from segsynth.segmenters import LEAF, get_segmenter_class, load_segmenter
from segsynth.segmenters.leaf import (ALIGNMENT_FILE, alignment_loss, inference_seed_stability, mask_vae_input,
                                      widen_input_conv)
from segsynth.training import Checkpointer, step_torch_generator

CLASS_NAMES = ["background", "square", "bar"]
ENCODER = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "patch_size": 4, "image_size": 16}
LEAF_CFG = {"kind": "leaf", "prediction": "x0", "steps": 4, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4,
            "checkpoint_every": 2, "augment": True,
            "vae": {"block_out_channels": [8, 8], "latent_channels": 4, "norm_num_groups": 4, "steps": 3,
                    "batch_size": 4},
            "unet": {"block_out_channels": [16, 16], "norm_num_groups": 4}}
ALIGNED_CFG = {**LEAF_CFG, "align": {"weight": 0.5, "encoder": ENCODER, "projector_dim": 8}}


def leaf(cfg=LEAF_CFG) -> LEAF:
    return LEAF(cfg, 1, len(CLASS_NAMES), CLASS_NAMES, device="cpu")


def weights(module) -> dict:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train(tmp_path, name: str, cfg=LEAF_CFG, seed: int = 3):
    images, masks = toy_arrays(8)
    segmenter = leaf(cfg)
    stats = segmenter.train(images, masks, tmp_path / name, seed=seed, log_every=0)
    return segmenter, stats


def test_the_registry_knows_leaf_and_refuses_bad_settings():
    assert get_segmenter_class("leaf") is LEAF
    with pytest.raises(ConfigError, match="prediction"):
        leaf({**LEAF_CFG, "prediction": "score"})
    with pytest.raises(ConfigError, match="align"):
        leaf({**LEAF_CFG, "align": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="unknown key"):
        leaf({**LEAF_CFG, "timesteps": 10})


def test_x0_objective_and_single_step_inference_shapes():
    segmenter = leaf()
    network = segmenter._initialise(0)
    images, masks = toy_arrays(4)
    images, masks = torch.from_numpy(images), torch.from_numpy(masks.astype(np.int64))[:, None]
    output = segmenter.training_forward(network, images, masks, step_torch_generator(0, 0))
    z_mask = network.encode_mask(masks[:, 0])
    assert z_mask.shape == (4, 4, 8, 8)  # 16² image, the VAE's 2× down-sampling, 4 latent channels
    assert output["prediction"].shape == output["target"].shape == z_mask.shape
    assert torch.equal(output["target"], z_mask)  # x0: the target is the clean mask latent itself
    loss = segmenter.training_loss(output, masks)
    assert torch.allclose(loss, (output["prediction"] - z_mask).abs().mean())  # eq. 4: L1
    assert network.unet.conv_in.in_channels == 8  # concat(z^x, z^y_t)
    with torch.no_grad():
        logits = network(images)
    assert logits.shape == (4, 3, 16, 16)
    assert network.inference_scheduler.timesteps.tolist() == [999]  # one reverse step from t = T - 1


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_the_single_step_estimate_is_eq_3(prediction):
    network = leaf({**LEAF_CFG, "prediction": prediction})._initialise(0)
    z_t, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alpha_bar = network.inference_scheduler.alphas_cumprod[999]
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    by_hand = {"epsilon": (z_t - sigma * output) / alpha, "v": alpha * z_t - sigma * output, "x0": output}[prediction]
    estimate = network.inference_scheduler.step(output, network.inference_scheduler.timesteps[0], z_t)
    torch.testing.assert_close(estimate.pred_original_sample, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_training_targets_are_epsilon_and_the_velocity(prediction):
    segmenter = leaf({**LEAF_CFG, "prediction": prediction})
    network = segmenter._initialise(0)
    images, masks = toy_arrays(2)
    masks = torch.from_numpy(masks.astype(np.int64))[:, None]
    generator = step_torch_generator(0, 1)
    output = segmenter.training_forward(network, torch.from_numpy(images), masks, generator)
    replay = step_torch_generator(0, 1)  # the same draws: timesteps, then the noise
    t = torch.randint(0, 1000, (2,), generator=replay)
    noise = torch.randn(output["target"].shape, generator=replay)
    z = network.encode_mask(masks[:, 0])
    alpha_bar = network.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = noise if prediction == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z  # eq. 2
    torch.testing.assert_close(output["target"], expected)


def test_the_widened_input_conv_computes_the_old_unet_on_a_duplicated_latent():
    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=4, out_channels=4, block_out_channels=(16, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    original = copy.deepcopy(unet)
    widen_input_conv(unet)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert unet.config.in_channels == 8
    torch.testing.assert_close(unet(torch.cat([z, z], 1), t).sample, original(z, t).sample, rtol=1e-4, atol=1e-5)


def test_training_fits_the_mask_vae_then_trains_and_saves_a_model_that_predicts_the_same(tmp_path):
    segmenter, stats = train(tmp_path, "ckpt")
    assert stats["steps"] == 4 and stats["mask_vae_steps"] == 3 and np.isfinite(stats["final_loss"])
    assert 0 <= stats["mask_vae_reconstruction_dice"] <= 1 and stats["mask_vae_latent_scale"] > 0
    # the mask VAE is frozen: only the image encoder and the UNet moved
    fitted = segmenter._fitted_mask_vae["weights"]
    assert_same_weights({k: v for k, v in weights(segmenter.network.mask_vae).items()}, fitted)
    segmenter.save(tmp_path / "model")
    loaded = load_segmenter(tmp_path / "model")
    assert isinstance(loaded, LEAF)
    images, _ = toy_arrays(3, seed=5)
    proba = segmenter.predict_proba(images)
    assert proba.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(loaded.predict_proba(images), proba)
    assert not (tmp_path / "model" / ALIGNMENT_FILE).exists()


def test_the_alignment_head_is_absent_at_inference(tmp_path):
    aligned, _ = train(tmp_path, "ckpt", ALIGNED_CFG)
    aligned.save(tmp_path / "model")
    saved = torch.load(tmp_path / "model" / "weights.pt", weights_only=True)
    assert not any("align" in key for key in saved)  # the network that predicts has no projector
    assert (tmp_path / "model" / ALIGNMENT_FILE).exists()

    images, _ = toy_arrays(3, seed=5)
    without = load_segmenter(tmp_path / "model")
    with_head = load_segmenter(tmp_path / "model")
    head = with_head.load_alignment_head(tmp_path / "model")
    assert sum(p.numel() for p in head.parameters()) > 0
    np.testing.assert_array_equal(with_head.predict_proba(images), without.predict_proba(images))
    plain, _ = train(tmp_path, "plain")
    count = lambda s: sum(p.numel() for p in s.as_value_model().parameters())  # noqa: E731
    assert count(without) == count(plain)  # no extra parameters at inference


def test_lambda_zero_trains_exactly_what_no_alignment_trains(tmp_path):
    plain, _ = train(tmp_path, "plain")
    zero, _ = train(tmp_path, "zero", {**ALIGNED_CFG, "align": {**ALIGNED_CFG["align"], "weight": 0.0}})
    aligned, _ = train(tmp_path, "aligned", ALIGNED_CFG)
    assert_same_weights(weights(plain.network), weights(zero.network))
    assert not all(torch.equal(a, b) for a, b in zip(weights(plain.network).values(),
                                                     weights(aligned.network).values()))


def test_alignment_loss_is_the_negative_mean_cosine():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    by_hand = -np.mean([[np.dot(a[i, j], b[i, j]) / np.linalg.norm(a[i, j]) / np.linalg.norm(b[i, j])
                         for j in range(5)] for i in range(2)])
    assert float(alignment_loss(a, b)) == pytest.approx(by_hand, rel=1e-5)
    assert float(alignment_loss(a, 3 * a)) == pytest.approx(-1.0)


@pytest.mark.parametrize("kill_at", [2, 4])  # during the mask-VAE fit (checkpoint at 2 of 3), then at step 2 of 4
def test_a_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch, kill_at):
    uninterrupted, _ = train(tmp_path, "full", ALIGNED_CFG)

    class Killed(Exception):
        pass

    original_save = Checkpointer.save
    saves = []

    def save_then_maybe_die(self, step, extra=None):
        original_save(self, step, extra)
        saves.append(step)
        if len(saves) == kill_at // 2:
            raise Killed(step)

    monkeypatch.setattr(Checkpointer, "save", save_then_maybe_die)
    with pytest.raises(Killed):
        train(tmp_path, "resumed", ALIGNED_CFG)
    monkeypatch.setattr(Checkpointer, "save", original_save)
    resumed, stats = train(tmp_path, "resumed", ALIGNED_CFG)
    assert stats["resumed_from_step"] == (0 if kill_at == 2 else 2)
    assert_same_weights(weights(uninterrupted.network), weights(resumed.network))
    assert_same_weights(weights(uninterrupted.alignment_head), weights(resumed.alignment_head))


def test_leaf_is_a_differentiable_value_model(tmp_path):
    segmenter, _ = train(tmp_path, "ckpt")
    value_model = segmenter.as_value_model()
    images = (torch.from_numpy(toy_arrays(2)[0]) * 2 - 1).requires_grad_(True)
    probabilities = value_model(images)
    assert probabilities.shape == (2, 3, 16, 16)
    probabilities[:, 1].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in value_model.parameters())


def test_the_grey_mask_coding_decodes_each_class_level_to_its_class():
    masks = torch.tensor([[[0, 1], [2, 3]]])
    coded = mask_vae_input(masks, 4, 3, grey=True)
    assert coded.shape == (1, 3, 2, 2) and torch.allclose(coded[0, 0], torch.tensor([[-1.0, -1 / 3], [1 / 3, 1.0]]))
    onehot = mask_vae_input(masks, 4, 4, grey=False)
    assert torch.equal(onehot.argmax(1), masks) and set(onehot.unique().tolist()) == {-1.0, 1.0}


def test_a_stable_diffusion_directory_gives_its_vae_unet_and_schedule(tmp_path):
    from test_generator import _save_tiny_stable_diffusion

    sd = _save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = {key: value for key, value in LEAF_CFG.items() if key not in ("vae", "unet")}
    segmenter = leaf({**cfg, "pretrained": str(sd), "steps": 2})
    assert segmenter.size_divisor == 4  # the VAE's 2× times the UNet's 2×
    images, masks = toy_arrays(4)
    segmenter.train(images, masks, tmp_path / "ckpt", seed=0, log_every=0)
    network = segmenter.network
    assert network.grey_masks and network.null_prompt.shape == (1, 16, 16)  # the empty prompt's CLIP embedding
    assert network.unet.conv_in.in_channels == 8
    assert float(network.latent_scale) == pytest.approx(0.18215)
    assert segmenter.predict_proba(images).shape == (4, 3, 16, 16)
    segmenter.save(tmp_path / "model")
    np.testing.assert_array_equal(load_segmenter(tmp_path / "model").predict_proba(images),
                                  segmenter.predict_proba(images))
    with pytest.raises(InputDataError, match="Stable Diffusion"):
        leaf({**cfg, "pretrained": str(tmp_path)}).build_network()


def test_stability_varies_only_the_inference_seed(tmp_path, tiny_data):
    from segsynth.data.canonical import load_split, read_meta
    from segsynth.segmenters import train_segmenter

    train_segmenter(LEAF_CFG, tiny_data, tmp_path / "model", seed=0)
    frame = inference_seed_stability(tmp_path / "model", tiny_data, seeds=[0, 1, 2], out_path=tmp_path / "s.parquet")
    assert frame["seed"].tolist() == [0, 1, 2] and frame["dice"].between(0, 1).all()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.parquet"), frame)
    again = inference_seed_stability(tmp_path / "model", tiny_data, seeds=[1])
    assert again["dice"].iloc[0] == frame["dice"].iloc[1]  # a seed is a fixed z_T
    segmenter = load_segmenter(tmp_path / "model")
    images = load_split(tiny_data, "test").images
    first = segmenter.predict_proba(images)
    segmenter.network.inference_seed = 1
    assert not np.array_equal(first, segmenter.predict_proba(images))
    assert len(read_meta(tiny_data)["class_names"]) == segmenter.num_classes


def test_an_rgb_image_enters_a_mask_vae_of_other_channels_through_an_adapted_first_convolution():
    """Kvasir: 3-channel images, a 2-class one-hot mask VAE. The image encoder's first convolution reads 3 channels,
    and on a grey image (equal channels) computes what the VAE encoder computes on that grey value."""
    segmenter = LEAF({**LEAF_CFG}, 3, 2, ["background", "polyp"], device="cpu")
    network = segmenter._initialise(0)
    assert network.image_encoder.encoder.conv_in.in_channels == 3 and network.mask_vae.config.in_channels == 2
    grey = torch.rand(2, 1, 16, 16)
    ours = network.image_encoder(grey.expand(-1, 3, -1, -1) * 2 - 1)
    vae_moments = network.mask_vae.quant_conv(network.mask_vae.encoder(grey.expand(-1, 2, -1, -1) * 2 - 1))
    torch.testing.assert_close(ours, vae_moments.chunk(2, dim=1)[0], rtol=1e-4, atol=1e-5)
    assert network(torch.rand(2, 3, 16, 16)).shape == (2, 2, 16, 16)
