"""A generic 2D dataset: a folder of images and a folder of masks matched by file stem.

Each file is its own case (2D sources such as Kvasir-SEG carry no patient ids). Raw mask values are
mapped to class indices either by an explicit list (``mask_values``, for lossless masks) or by a
threshold (``mask_threshold``, for binary masks stored as JPEG, whose edges hold in-between grey
values). Images are 8-bit; they are resized with bilinear filtering and masks with nearest
neighbour after mapping, so no interpolated value can become a class index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from segsynth.data.canonical import config_option
from segsynth.data.splits import case_split
from segsynth.errors import ConfigError, InputDataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr")


def build_folder(name: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Read, map, resize and split an image/mask folder pair; return (images, masks, index, meta)."""
    images_dir = Path(config_option(name, cfg, "images", ConfigError, str))
    masks_dir = Path(config_option(name, cfg, "masks", ConfigError, str))
    resolution = config_option(name, cfg, "resolution", ConfigError, int)
    channels = config_option(name, cfg, "channels", 3, int)
    class_names = [str(c) for c in config_option(name, cfg, "class_names", ConfigError, list)]
    mask_values = config_option(name, cfg, "mask_values", None, list)
    mask_threshold = config_option(name, cfg, "mask_threshold", None, (int, float))
    split_files = config_option(name, cfg, "split_files", None, dict)
    test_fraction = config_option(name, cfg, "test_fraction", 0.3, (int, float))
    split_seed = config_option(name, cfg, "split_seed", 0, int)
    limit = config_option(name, cfg, "limit", None, int)
    _check_config(
        name, resolution, channels, class_names, mask_values, mask_threshold, split_files, test_fraction, limit
    )

    image_files = _files_by_stem(images_dir, "image")
    mask_files = _files_by_stem(masks_dir, "mask")
    if split_files is not None:
        splits = _read_split_files(name, split_files, image_files, limit)
    else:
        ids = sorted(image_files)[:limit]
        try:
            splits = case_split(ids, test_fraction, split_seed)
        except ValueError as err:
            raise InputDataError(images_dir, str(err)) from err
    if not splits:
        raise InputDataError(images_dir, "no samples selected: the split files list no ids")

    images, masks, rows = [], [], []
    for sample_id in sorted(splits):
        image_path = image_files[sample_id]
        if sample_id not in mask_files:
            raise InputDataError(image_path, f"no mask with stem '{sample_id}' in {masks_dir}")
        mask_path = mask_files[sample_id]
        image = _read_image(image_path, channels)
        raw_mask = _read_mask(mask_path, mask_threshold is not None)
        if raw_mask.shape != (image.height, image.width):
            raise InputDataError(
                mask_path,
                f"mask size {raw_mask.shape[1]}x{raw_mask.shape[0]} (WxH) differs from "
                f"image {image_path} size {image.width}x{image.height}",
            )
        labels = _map_mask(mask_path, raw_mask, mask_values, mask_threshold)
        size = (resolution, resolution)
        pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        images.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
        masks.append(np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST)))
        rows.append(
            {
                "sample_id": sample_id,
                "case_id": sample_id,
                "split": splits[sample_id],
                "source_file": str(image_path),
                "slice_index": -1,
            }
        )

    meta = {
        "dataset": name,
        "kind": "folder",
        "class_names": class_names,
        "images_dir": str(images_dir),
        "masks_dir": str(masks_dir),
        "mask_values": mask_values,
        "mask_threshold": mask_threshold,
        "split_source": (
            {"split_files": {k: str(v) for k, v in split_files.items()}}
            if split_files is not None
            else {"test_fraction": test_fraction, "split_seed": split_seed}
        ),
        "limit": limit,
    }
    return np.stack(images), np.stack(masks), pd.DataFrame(rows), meta


def _check_config(
    name: str,
    resolution: int,
    channels: int,
    class_names: list[str],
    mask_values: list | None,
    mask_threshold: float | None,
    split_files: dict | None,
    test_fraction: float,
    limit: int | None,
) -> None:
    def key(k: str) -> str:
        return f"datasets.{name}.{k}"

    if resolution < 8:
        raise ConfigError(key("resolution"), f"must be at least 8, got {resolution}")
    if channels not in (1, 3):
        raise ConfigError(key("channels"), f"must be 1 or 3, got {channels}")
    if (mask_values is None) == (mask_threshold is None):
        raise ConfigError(key("mask_values"), "give exactly one of mask_values and mask_threshold")
    if mask_values is not None and (len(mask_values) != len(class_names) or len(set(mask_values)) != len(mask_values)):
        raise ConfigError(
            key("mask_values"), f"need one distinct raw value per class {class_names}, got {mask_values}"
        )
    if mask_threshold is not None and len(class_names) != 2:
        raise ConfigError(key("mask_threshold"), f"thresholding gives 2 classes, class_names has {len(class_names)}")
    if split_files is not None and sorted(split_files) != ["test", "train"]:
        raise ConfigError(key("split_files"), f"needs exactly the keys train and test, got {sorted(split_files)}")
    if not 0 < test_fraction < 1:
        raise ConfigError(key("test_fraction"), f"must be in (0, 1), got {test_fraction}")
    if limit is not None and limit < 1:
        raise ConfigError(key("limit"), f"must be positive, got {limit}")


def _files_by_stem(directory: Path, what: str) -> dict[str, Path]:
    """Map each file stem in ``directory`` to its path, refusing two files with one stem."""
    if not directory.is_dir():
        raise InputDataError(directory, f"{what} directory does not exist")
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in EXTENSIONS or not path.is_file():
            continue
        if path.stem in files:
            raise InputDataError(
                path, f"duplicate sample id '{path.stem}': {what} {files[path.stem]} has the same stem"
            )
        files[path.stem] = path
    if not files:
        raise InputDataError(directory, f"no {what} files ({', '.join(EXTENSIONS)})")
    return files


def _read_split_files(name: str, split_files: dict, image_files: dict[str, Path], limit: int | None) -> dict[str, str]:
    """Sample id -> split from the id lists; ids absent from both lists are left out."""
    splits: dict[str, str] = {}
    for split in ("train", "test"):
        path = Path(split_files[split])
        if not path.is_file():
            raise ConfigError(f"datasets.{name}.split_files.{split}", f"file {path} does not exist")
        ids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})[:limit]
        unknown = [i for i in ids if i not in image_files]
        if unknown:
            raise InputDataError(path, f"lists {len(unknown)} ids with no image, e.g. {unknown[:5]}")
        both = [i for i in ids if i in splits]
        if both:
            raise InputDataError(path, f"ids {both[:10]} are also in the train list")
        splits.update(dict.fromkeys(ids, split))
    return splits


def _read_image(path: Path, channels: int) -> Image.Image:
    """Decode an 8-bit image fully (so truncated files fail here) as grey or RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in EIGHT_BIT_MODES:
                raise InputDataError(path, f"image mode {image.mode} is not 8-bit; the folder adapter reads only 8-bit")
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise InputDataError(path, f"cannot read image: {err}") from err


def _read_mask(path: Path, lossy: bool) -> np.ndarray:
    """Decode a mask as a 2D array of raw values.

    A colour mask is accepted only when its channels agree (grey stored as RGB), unless the mask is
    thresholded, where a conversion to grey is the intended reading of a lossy mask.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA") and lossy:
                image = image.convert("L")
            values = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputDataError(path, f"cannot read mask: {err}") from err
    if values.ndim == 3:
        colour = values[..., :3]
        if (colour != colour[..., :1]).any():
            raise InputDataError(path, "colour mask whose channels differ; expected one value per pixel")
        values = colour[..., 0]
    return values


def _map_mask(path: Path, raw: np.ndarray, mask_values: list | None, mask_threshold: float | None) -> np.ndarray:
    """Raw mask values -> uint8 class indices, refusing values outside the declared set."""
    if mask_threshold is not None:
        return (raw > mask_threshold).astype(np.uint8)
    present = np.unique(raw)
    undeclared = sorted(set(present.tolist()) - set(mask_values))
    if undeclared:
        kind = "non-binary mask: " if len(mask_values) == 2 else ""
        hint = "; for lossy (JPEG) masks set mask_threshold instead" if len(mask_values) == 2 else ""
        raise InputDataError(
            path, f"{kind}values {undeclared[:10]} are not among the declared mask_values {mask_values}{hint}"
        )
    labels = np.zeros(raw.shape, dtype=np.uint8)
    for k, value in enumerate(mask_values):
        labels[raw == value] = k
    return labels
