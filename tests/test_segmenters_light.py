"""MK-UNet, ORDER and the Swin-Unet-style segmenter: parameter budgets, ORDER's shared-similarity
bidirectional attention, training through ``train()``, save/load, the value model, resume, config schema."""

import copy
import json

import numpy as np
import pytest
import torch
import yaml

import conftest
from segsynth.config import validate_config
from segsynth.errors import ConfigError, InputDataError
from segsynth.segmenters import ORDER, MKUNet, NnUNetSegmenter, SwinUNet, get_segmenter_class, load_segmenter
from segsynth.segmenters.lightweight import BidirectionalSkipAttention
from segsynth.training import Checkpointer

CLASS_NAMES = ["background", "square", "bar"]
TRAINING = {"steps": 4, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "checkpoint_every": 2, "augment": True}
CFGS = {
    "mk_unet": {"kind": "mk_unet", **TRAINING},
    "order": {"kind": "order", **TRAINING},
    "swin_unet": {"kind": "swin_unet", "embed_dim": 12, "depths": [1, 1, 1], "num_heads": [1, 2, 4],
                  "window_size": 4, **TRAINING},
}
#: the smallest resolution each network accepts (twice its down-sampling)
SIZES = {"mk_unet": 64, "order": 64, "swin_unet": 32}
#: the paper's parameter counts (LAW & ORDER, Table 3), binary polyp segmentation of RGB images
PAPER_PARAMS = {"mk_unet": 27_000, "order": 42_000}


def toy_arrays(n: int, size: int, seed: int = 0):
    return conftest.toy_arrays(n, seed=seed, size=size, square=9)


def make(kind: str, cfg: dict | None = None):
    return get_segmenter_class(kind)(cfg or CFGS[kind], 1, len(CLASS_NAMES), CLASS_NAMES, device="cpu")


def train(kind: str, checkpoint_dir, seed: int = 0):
    images, masks = toy_arrays(6, SIZES[kind])
    segmenter = make(kind)
    stats = segmenter.train(images, masks, checkpoint_dir, seed=seed, log_every=0)
    return segmenter, stats


def weights(segmenter) -> dict:
    return {name: tensor.clone() for name, tensor in segmenter.network.state_dict().items()}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", ["mk_unet", "order"])
def test_parameter_count_is_the_papers(kind):
    # the paper's setting: RGB polyp images, binary segmentation (one sigmoid logit; two softmax logits here)
    cls = get_segmenter_class(kind)
    counts = {(c, k): n_params(cls(CFGS[kind], c, k).build_network()) for c, k in [(3, 1), (3, 2), (1, 2)]}
    print(f"{kind}: parameters {counts} vs the paper's {PAPER_PARAMS[kind]}")
    for count in counts.values():
        assert abs(count - PAPER_PARAMS[kind]) <= 0.15 * PAPER_PARAMS[kind]


def test_swin_unet_is_a_pure_transformer():
    network = make("swin_unet", {**CFGS["swin_unet"], "embed_dim": 24, "depths": [2, 2, 2]}).build_network()
    print(f"swin_unet (embed 24, depths [2, 2, 2]): {n_params(network)} parameters")
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.kernel_size) for c in convs] == [(4, 4), (1, 1)]  # patch embedding and 1x1 head only
    assert network(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)


def test_order_attention_computes_one_similarity_used_in_both_directions(monkeypatch):
    torch.manual_seed(0)
    attention = BidirectionalSkipAttention(channels=8, attention_dim=16, heads=2, grid=32)
    calls = []
    original = attention.similarity
    monkeypatch.setattr(attention, "similarity", lambda q, k: calls.append(1) or original(q, k))
    decoder, encoder = torch.randn(3, 8, 6, 5), torch.randn(3, 8, 6, 5)
    out = attention.attend(decoder, encoder)

    assert len(calls) == 1
    s = out.similarity
    assert s.shape == (3, 2, 30, 30)  # (B, heads, N_d, N_e)
    # decoder reads the encoder through softmax(S); encoder reads the decoder through softmax(Sᵀ)
    torch.testing.assert_close(out.delta_dec, torch.softmax(s, dim=-1) @ out.values_enc)
    torch.testing.assert_close(out.delta_enc, torch.softmax(s.transpose(-1, -2), dim=-1) @ out.values_dec)
    assert out.gate.shape == (3, 1, 1, 1) and bool(((out.gate >= 0) & (out.gate <= 1)).all())
    # residual updates scaled by the same gate; heads concatenated back to channels
    update_dec = out.delta_dec.transpose(-1, -2).reshape(3, 8, 6, 5)
    torch.testing.assert_close(out.decoder, decoder + out.gate * update_dec)
    torch.testing.assert_close(attention(decoder, encoder), out.decoder + out.encoder)


@pytest.mark.parametrize("stages, widths", [([], []), ([0, 1], [8, 4]), ([2, 3], [24, 16]), ([1, 2], [16, 8]),
                                             ("all", [24, 16, 8, 4])])
def test_order_attention_stages_pick_the_skips_the_paper_numbers(stages, widths):
    # ORDER Tables 5-6: stages numbered from the full-resolution end; [] is MK-UNet's graph exactly
    network = make("order", {**CFGS["order"], "attention_stages": stages}).build_network()
    assert [m.value_dec.in_channels for m in network.attention_modules()] == widths  # deepest first
    if not stages:
        assert n_params(network) == n_params(make("mk_unet").build_network())


@pytest.mark.parametrize("stages", [[4], [0, 0], "last", [True]])
def test_order_attention_stages_out_of_range_are_config_errors(stages):
    with pytest.raises(ConfigError, match="attention_stages"):
        make("order", {**CFGS["order"], "attention_stages": stages})


def test_order_attends_on_the_final_two_skips_and_pools_large_stages():
    network = make("order").build_network().eval()
    modules = network.attention_modules()
    assert [m.value_dec.in_channels for m in modules] == [8, 4]  # the final two skips (1/4 and 1/2 resolution)
    for module in modules:
        module.record = True
    with torch.no_grad():
        network(torch.rand(2, 1, 64, 64))
    assert [tuple(m.last.similarity.shape) for m in modules] == [(2, 1, 256, 256), (2, 1, 1024, 1024)]
    assert all(bool(((m.last.gate >= 0) & (m.last.gate <= 1)).all()) for m in modules)

    pooled = BidirectionalSkipAttention(channels=4, attention_dim=8, grid=4)
    pooled.record = True
    fused = pooled(torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16))
    assert fused.shape == (1, 4, 16, 16) and pooled.last.similarity.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("kind", ["mk_unet", "order", "swin_unet"])
def test_trains_predicts_saves_and_gives_a_value_model(tmp_path, kind):
    segmenter, stats = train(kind, tmp_path / "ckpt")
    assert stats["steps"] == 4 and np.isfinite(stats["final_loss"])
    size = SIZES[kind]
    images, _ = toy_arrays(3, size, seed=9)
    proba = segmenter.predict_proba(images, batch_size=2)
    assert proba.shape == (3, 3, size, size) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)

    segmenter.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "meta.json").read_text())["kind"] == kind
    loaded = load_segmenter(tmp_path / "model")
    assert type(loaded) is type(segmenter)
    np.testing.assert_array_equal(loaded.predict_proba(images, batch_size=2), proba)

    value_model = segmenter.as_value_model()
    assert not value_model.training and not any(p.requires_grad for p in value_model.parameters())
    x = torch.from_numpy(images * 2.0 - 1.0).requires_grad_(True)
    probs = value_model(x)
    np.testing.assert_allclose(probs.detach().numpy(), proba, atol=1e-5)
    probs[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mk_unet", "order", "swin_unet"])
def test_killed_training_resumes_to_identical_weights(tmp_path, monkeypatch, kind):
    uninterrupted, _ = train(kind, tmp_path / "full", seed=5)

    class Killed(Exception):
        pass

    original_save = Checkpointer.save

    def save_then_die(self, step, extra=None):
        original_save(self, step, extra)
        raise Killed(step)

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        train(kind, tmp_path / "resumed", seed=5)
    monkeypatch.setattr(Checkpointer, "save", original_save)

    resumed, stats = train(kind, tmp_path / "resumed", seed=5)
    assert stats["resumed_from_step"] == 2 and stats["steps"] == 4
    a, b = weights(uninterrupted), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["mk_unet", "order", "swin_unet"])
def test_config_schema_accepts_the_kind_and_refuses_unknown_keys(repo_root, kind):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    value_name = config["run"]["value_segmenter"]
    config["segmenters"][value_name] = copy.deepcopy(CFGS[kind])
    validate_config(config)

    config["segmenters"][value_name]["features"] = [4, 4, 4, 4, 4, 4]
    with pytest.raises(ConfigError, match=f"segmenters.{value_name}"):
        validate_config(config)
    with pytest.raises(ConfigError, match=f"'{kind}.features'.*unknown key"):
        make(kind, config["segmenters"][value_name])


def test_network_keys_are_checked_when_the_segmenter_is_made():
    with pytest.raises(ConfigError, match="'mk_unet.channels'"):
        make("mk_unet", {**CFGS["mk_unet"], "channels": [4, 0, 8]})
    with pytest.raises(ConfigError, match="'order.attention_heads'.*do not divide"):
        make("order", {**CFGS["order"], "attention_heads": 3})
    with pytest.raises(ConfigError, match="'swin_unet.num_heads'"):
        make("swin_unet", {**CFGS["swin_unet"], "num_heads": [1, 2]})
    with pytest.raises(ConfigError, match="'order.weight_decay'.*missing"):
        make("order", {k: v for k, v in CFGS["order"].items() if k != "weight_decay"})
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        make("mk_unet").train(*toy_arrays(2, 48), "unused", seed=0)


def test_swin_unet_loads_matching_swin_t_weights(tmp_path, caplog):
    reference = make("swin_unet").build_network()
    # a Swin-T-style checkpoint: Microsoft's key names (mlp.fc1/fc2), wrapped in "model", with a classifier head
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith(("patch_embed.", "layers.", "norm.")):
            state[key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = value + 1.0
    state["head.weight"] = torch.zeros(1000, 48)
    torch.save({"model": state}, tmp_path / "swin_tiny.pth")

    segmenter = make("swin_unet", {**CFGS["swin_unet"], "pretrained_swin": str(tmp_path / "swin_tiny.pth")})
    with caplog.at_level("INFO"):
        network = segmenter._initialise(seed=0)
    assert "loaded" in caplog.text
    own = network.state_dict()
    torch.testing.assert_close(own["layers.1.blocks.0.mlp.linear1.weight"], state["layers.1.blocks.0.mlp.fc1.weight"])
    torch.testing.assert_close(own["layers.0.downsample.reduction.weight"], state["layers.0.downsample.reduction.weight"])
    # Swin-Unet's symmetric initialisation of the decoder blocks
    torch.testing.assert_close(own["layers_up.0.blocks.0.attn.qkv.weight"], state["layers.0.blocks.0.attn.qkv.weight"])

    missing = make("swin_unet", {**CFGS["swin_unet"], "pretrained_swin": str(tmp_path / "absent.pth")})
    with pytest.raises(InputDataError, match="absent.pth.*does not exist"):
        missing.train(*toy_arrays(2, 32), tmp_path / "ckpt", seed=0)
    torch.save({"model": {"unrelated.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    foreign = make("swin_unet", {**CFGS["swin_unet"], "pretrained_swin": str(tmp_path / "other.pth")})
    with pytest.raises(InputDataError, match="other.pth.*no tensor matches"):
        foreign._initialise(seed=0)


def test_registry_knows_the_new_kinds():
    assert (get_segmenter_class("mk_unet"), get_segmenter_class("order"), get_segmenter_class("swin_unet"),
            get_segmenter_class("nnunet")) == (MKUNet, ORDER, SwinUNet, NnUNetSegmenter)


def test_config_schema_takes_nnunet_as_f_theta_and_names_a_bad_trainer(repo_root):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config["run"]["value_segmenter"] = "nnunet"
    config["run"]["segmenters"] = ["nnunet"]
    validate_config(config)

    config["segmenters"]["nnunet"]["trainer"] = "nnUNetTrainer_250epochs"
    with pytest.raises(ConfigError, match="segmenters.nnunet"):
        validate_config(config)
