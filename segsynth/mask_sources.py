"""Where the conditioning masks of a synthetic set come from (VGD eq. 1 and its Table-3 mask ablations).

``mask_source`` (a synthesis setting, per run, dataset or method):

- ``gt``: the training masks themselves (each used once per budget unit, in a seeded order);
- ``gt_aug``: each of those masks deformed by MONAI's random elastic + affine transform (``Rand2DElasticd``:
  rotation, scaling, translation and a smooth displacement field), nearest-neighbour for the mask so its labels
  stay labels, the real image (for the samplers that edit it) moved with it, bilinear. The transform's random
  state is seeded by the sample's own noise seed, so a sample's mask depends on its seed alone.

- ``cvae``: a draw of the class-conditioned mask VAE p_ω(m | c) trained by the ``train_mask_vae`` rule
  (segsynth.mask_vae), c = the classes of the sample's source training mask, z from the sample's own seed; the
  real image beside it (for the samplers that edit one) is the source pair's, unchanged.
"""

from __future__ import annotations

import math

import numpy as np

MASK_SOURCES = ("gt", "gt_aug", "cvae")

#: the deformation of ``gt_aug``; a method's ``mask_augment`` entry overrides any key
GT_AUG_DEFAULTS = {
    "rotate_degrees": 15.0,      # uniform in ±15°
    "scale": 0.1,                # zoom factor in 1 ± 0.1
    "translate": 0.05,           # shift in ± 5 % of the side
    "elastic_spacing": 0.25,     # control-point spacing of the displacement field, as a fraction of the side
    "elastic_magnitude": 1.0,    # its magnitude range (0, m) in control-point units
}


def augment_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample's ``gt_aug`` transform: from the synthesis seed and the sample's index, apart from
    its noise seed (segsynth.sampling.base.noise_seed) so the two random streams are independent."""
    return int(np.random.SeedSequence([seed, sample_index, 0xA06]).generate_state(1)[0])


def augment_pairs(images: np.ndarray, masks: np.ndarray, seeds: list[int], settings: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``gt_aug``: each (image (C, H, W) in [0, 1], mask (H, W)) pair deformed by its own seeded transform.

    Returns new arrays of the same shapes and dtypes; the masks keep exactly the input's label values (nearest
    interpolation, zero = background outside the image)."""
    from monai.transforms import Rand2DElasticd

    cfg = {**GT_AUG_DEFAULTS, **(settings or {})}
    height, width = masks.shape[-2:]
    transform = Rand2DElasticd(
        keys=("image", "mask"), prob=1.0,
        spacing=(max(2.0, cfg["elastic_spacing"] * height), max(2.0, cfg["elastic_spacing"] * width)),
        magnitude_range=(0.0, float(cfg["elastic_magnitude"])),
        rotate_range=math.radians(cfg["rotate_degrees"]),
        scale_range=(cfg["scale"], cfg["scale"]),
        translate_range=(cfg["translate"] * height, cfg["translate"] * width),
        mode=("bilinear", "nearest"), padding_mode=("border", "zeros"))
    out_images, out_masks = np.empty_like(images), np.empty_like(masks)
    for i, seed in enumerate(seeds):
        transform.set_random_state(seed=int(seed) % (2**32))
        moved = transform({"image": images[i].astype(np.float32), "mask": masks[i][None].astype(np.float32)})
        out_images[i] = np.clip(np.asarray(moved["image"]), 0.0, 1.0).astype(images.dtype)
        out_masks[i] = np.rint(np.asarray(moved["mask"])[0]).astype(masks.dtype)
    return out_images, out_masks
