"""Mask sources of the synthetic sets (VGD eq. 1 and its Table-3 ablations): gt and gt_aug."""

import numpy as np

from segsynth.mask_sources import augment_pairs, augment_seed


def _pairs(n=4, size=32):
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 8:22, 9:23] = 1
    masks[:, 12:17, 13:18] = 3
    images = np.random.default_rng(0).random((n, 1, size, size)).astype(np.float32)
    return images, masks


def test_gt_aug_keeps_the_label_set_and_changes_the_shapes():
    images, masks = _pairs()
    seeds = [augment_seed(0, i) for i in range(4)]
    new_images, new_masks = augment_pairs(images, masks, seeds)
    assert new_masks.dtype == masks.dtype and new_masks.shape == masks.shape
    for before, after in zip(masks, new_masks):
        assert set(np.unique(after)) == set(np.unique(before))     # nearest: no new label, none lost
        assert (after != before).mean() > 0.01                       # the shape moved
    assert new_images.shape == images.shape and 0 <= new_images.min() and new_images.max() <= 1
    # the image moves with its mask: the deformation is one transform per pair
    assert not np.allclose(new_images, images)


def test_gt_aug_depends_on_each_samples_seed_alone():
    images, masks = _pairs()
    seeds = [augment_seed(0, i) for i in range(4)]
    _, whole = augment_pairs(images, masks, seeds)
    _, alone = augment_pairs(images[2:3], masks[2:3], seeds[2:3])
    assert np.array_equal(whole[2], alone[0])
    _, other = augment_pairs(images, masks, [augment_seed(1, i) for i in range(4)])
    assert not np.array_equal(whole, other)
    assert len({augment_seed(0, i) for i in range(100)}) == 100
