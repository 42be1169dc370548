"""The class-conditioned mask VAE p_ω(m | c) of mask_source: cvae (VGD eq. 1): training, resume, sampling."""

import numpy as np
import pandas as pd
import pytest
import torch

from segsynth.mask_vae import ConditionalMaskVAE, class_presence, cvae_seed, train_mask_vae

CFG = {"latent_size": 8, "channels": [8, 16], "steps": 1000, "batch_size": 16, "lr": 1e-2, "kl_weight": 1.0,
       "checkpoint_every": 500}


def _class_set_data(directory, n=36, size=16):
    """Masks holding class 1 only (a square), class 2 only (a bar) or both, a third each, at random places."""
    from segsynth.data.canonical import write_canonical

    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 3 in (0, 2):
            r, c = rng.integers(0, size - 6, 2)
            masks[i, r:r + 6, c:c + 6] = 1
        if i % 3 in (1, 2):
            col = rng.integers(0, size - 2)
            masks[i, :, col:col + 2] = 2
    images = (masks[:, None] / 2.0).astype(np.float32)
    index = pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(n)], "case_id": [f"c{i:03d}" for i in range(n)],
                          "split": ["test" if i % 6 == 5 else "train" for i in range(n)],
                          "source_file": "generated", "slice_index": -1})
    write_canonical(directory, images, masks, index,
                    {"dataset": "sets", "kind": "test", "class_names": ["background", "square", "bar"]})
    return directory


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask_vae")
    data = _class_set_data(root / "data")
    stats = train_mask_vae(CFG, data, root / "vae", seed=0)
    return root, stats


def test_class_presence_is_the_multi_hot_of_the_foreground_classes():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, 0, 0] = 1
    masks[1, 1, 1] = 2
    masks[2, :2] = 1
    masks[2, 3, 3] = 2
    assert class_presence(masks, 3).tolist() == [[1, 0], [0, 1], [1, 1]]


def test_the_mask_vae_trains_and_samples_masks_of_the_declared_classes(trained_vae):
    root, stats = trained_vae
    assert stats["steps"] == CFG["steps"] and not (root / "vae.ckpt").exists()
    model = ConditionalMaskVAE.load(root / "vae")
    conditions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(20, 1)
    sampled = model.sample(conditions, [cvae_seed(0, i) for i in range(len(conditions))])
    assert sampled.shape == (60, 16, 16) and sampled.dtype == np.uint8
    assert set(np.unique(sampled)) <= {0, 1, 2}
    # the condition decides the classes: a class asked for is drawn (its shape's size: 36 or 32 pixels) in
    # nearly every sample, one not asked for covers a third of that or less on average
    for k in (1, 2):
        area = (sampled == k).reshape(60, -1).sum(1)
        asked = conditions[:, k - 1].numpy() == 1
        assert (area[asked] > 0).mean() > 0.9, k
        assert area[asked].mean() > 3 * area[~asked].mean(), (k, area[asked].mean(), area[~asked].mean())
    # a sample depends on its own seed alone, and other seeds give other shapes
    alone = model.sample(conditions[5:6], [cvae_seed(0, 5)])
    assert np.array_equal(alone[0], sampled[5])
    assert not np.array_equal(model.sample(conditions, [cvae_seed(1, i) for i in range(60)]), sampled)
    quality = pd.read_parquet(root / "vae" / "quality.parquet")
    assert quality["class_name"].tolist() == ["square", "bar"]
    assert (quality["condition_recall"] > quality["spurious_rate"]).all()
    assert np.allclose(quality["presence_train"], [2 / 3, 2 / 3], atol=0.1)


def test_a_killed_mask_vae_job_resumes_to_the_same_weights(tmp_path):
    data = _class_set_data(tmp_path / "data")
    cfg = {**CFG, "steps": 6, "checkpoint_every": 2}
    train_mask_vae(cfg, data, tmp_path / "whole", seed=3)
    assert train_mask_vae(cfg, data, tmp_path / "killed", seed=3, stop_after=3) == {"steps": 3, "stopped": True}
    assert not (tmp_path / "killed").exists() and (tmp_path / "killed.ckpt" / "last.pt").exists()
    assert train_mask_vae(cfg, data, tmp_path / "killed", seed=3)["resumed_from"] == 3
    whole = ConditionalMaskVAE.load(tmp_path / "whole").state_dict()
    resumed = ConditionalMaskVAE.load(tmp_path / "killed").state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resolution_the_levels_cannot_halve_is_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        ConditionalMaskVAE(3, 20, 8, [8, 16, 32])
