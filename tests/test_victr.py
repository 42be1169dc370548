"""ViCTr (segsynth.victr): the rectified-flow target and Tweedie's correction by hand, the flow served to the DDIM
samplers, EWC, LoRA, two-stage training with resume, few-step sampling."""

import copy
from pathlib import Path

import pytest
import torch

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from conftest import TINY_GENERATOR, make_tiny_dataset
from segsynth import victr
from segsynth.data.canonical import load_split
from segsynth.config import victr_stage1, victr_stage1_generator, victr_stage1_settings
from segsynth.errors import ConfigError, InputDataError
from segsynth.generator import MaskToImageGenerator, build_generator
from segsynth.sampling.ddim import DDIMSampler
from segsynth.training import TrainingBatches

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
VICTR = {**copy.deepcopy(TINY_GENERATOR), "conditioning": "concat",  # training: Stage 2, 4 steps, checkpoints every 2
         "victr": {"source": "source", "tweedie": True, "fisher_batches": 2, "temporal_gap": 0.1,
                   "stage1": {"steps": 3},
                   "lora": {"rank": 4, "target_modules": LORA_TARGETS}}}
CLASSES = ["background", "ring", "core"]


def victr_cfg(**changes):
    cfg = copy.deepcopy(VICTR)
    cfg["victr"].update(changes)
    return cfg


def test_the_flow_target_and_the_tweedie_estimate_by_hand():
    # x0 = 1, ε = 2, σ = ¼: x_σ = ¾·1 + ¼·2 = 1.25, u = ε − x0 = 1
    x0, noise = torch.tensor([1.0]), torch.tensor([2.0])
    x_t = victr.interpolate(x0, noise, 0.25)
    torch.testing.assert_close(x_t, torch.tensor([1.25]))
    torch.testing.assert_close(victr.velocity_target(x0, noise), torch.tensor([1.0]))
    assert victr.training_target(x0, noise, 0.25, tweedie=False).item() == pytest.approx(1.0)
    # 1 − ᾱ = σ² / ((1−σ)² + σ²) = 0.0625 / 0.625 = 0.1; the corrected target u − 0.1·ε/σ = 1 − 0.8 = 0.2
    assert victr.training_target(x0, noise, 0.25, tweedie=True).item() == pytest.approx(0.2)
    # the sampler recovers u from the corrected output, and Tweedie's mean x_σ − σ·u is x0
    u = victr.velocity_from_output(torch.tensor([0.2]), x_t, 0.25, tweedie=True)
    assert u.item() == pytest.approx(1.0)
    assert victr.x0_estimate(x_t, u, 0.25).item() == pytest.approx(1.0)
    assert victr.noise_estimate(x_t, u, 0.25).item() == pytest.approx(2.0)
    # the corrected initialisation: at σ = 1 (x_1 = ε) the corrected network's target is −x0 itself
    assert victr.training_target(x0, noise, 1.0, tweedie=True).item() == pytest.approx(-1.0)
    u1 = victr.velocity_from_output(torch.tensor([-1.0]), noise, 1.0, tweedie=True)
    assert victr.x0_estimate(noise, u1, 1.0).item() == pytest.approx(1.0)


@pytest.mark.parametrize("tweedie", [False, True])
def test_the_sampler_inverts_the_training_target_at_every_sigma(tweedie):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 1e-3, 0.3, 0.5, 0.9, 1.0])
    x_t = victr.interpolate(x0, noise, sigma)
    target = victr.training_target(x0, noise, sigma, tweedie)
    u = victr.velocity_from_output(target, x_t, sigma, tweedie)
    torch.testing.assert_close(u, noise - x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(victr.x0_estimate(x_t, u, sigma), x0, rtol=1e-5, atol=1e-5)


def test_a_flow_generator_served_in_epsilon_makes_ddim_the_flows_euler_step():
    gen = build_generator(VICTR, CLASSES, 1, (16, 16), seed=0)
    gen.meta["flow"] = {"kind": "rectified", "tweedie": True}
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:10, 4:10] = 1
    cond, prompt = gen.mask_condition(masks), gen.encode_prompt(masks)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ac = gen.noise_scheduler.alphas_cumprod
    t, t_next = 700, 400
    with torch.no_grad():
        eps = gen.predict_noise(x, torch.tensor([t, t]), cond, prompt)
        x0_hat = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        ddim = ac[t_next].sqrt() * x0_hat + (1 - ac[t_next]).sqrt() * eps
        # the same step as an Euler step of the flow: x_σ = x_VP / (√ᾱ + √(1−ᾱ)), σ = √(1−ᾱ) / (√ᾱ + √(1−ᾱ))
        scale, scale_next = ac[t].sqrt() + (1 - ac[t]).sqrt(), ac[t_next].sqrt() + (1 - ac[t_next]).sqrt()
        sigma, sigma_next = (1 - ac[t]).sqrt() / scale, (1 - ac[t_next]).sqrt() / scale_next
        x_flow = x / scale
        out = gen.model_output(x_flow, (sigma * 1000).expand(2), cond, prompt)
        u = victr.velocity_from_output(out, x_flow, sigma, tweedie=True)
        euler = x_flow + (sigma_next - sigma) * u
    torch.testing.assert_close(ddim / scale_next, euler, rtol=1e-4, atol=1e-5)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    anchor = {"w": torch.ones(3), "v": torch.zeros(2)}
    fisher = {"w": torch.tensor([2.0, 0.0, 1.0]), "v": torch.ones(2)}
    ewc = victr.ElasticWeightConsolidation(anchor, fisher)
    assert ewc.penalty({k: v.clone() for k, v in anchor.items()}, weight=5.0).item() == 0.0
    penalties = [ewc.penalty({"w": anchor["w"] + d, "v": anchor["v"]}, weight=5.0).item() for d in (0.1, 0.2, 0.4)]
    # λ/2 · Σ F·d² = 2.5 · 3 · d²: quadratic growth
    assert penalties == pytest.approx([2.5 * 3 * d**2 for d in (0.1, 0.2, 0.4)])
    # a parameter with zero Fisher is free to move
    assert ewc.penalty({"w": torch.tensor([1.0, 9.0, 1.0])}, weight=5.0).item() == 0.0


def test_the_fisher_is_the_mean_squared_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])]
    # loss = (w·x)²: gradient 2(w·x)x → batch 1: w·x = −3, grad (−6, −12); batch 2: w·x = 3, grad (18, 0)
    fisher = victr.estimate_fisher({"w": w}, [lambda x=x: (w @ x) ** 2 for x in xs])
    torch.testing.assert_close(fisher["w"], torch.tensor([(36 + 324) / 2, 144 / 2]))


def test_lora_trains_only_the_adapters_and_starts_at_the_base_model(tiny_data):
    gen = build_generator(VICTR, CLASSES, 1, (16, 16), seed=0)
    before = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    params = victr.add_lora(gen.unet, rank=4, alpha=None, target_modules=LORA_TARGETS, seed=0)
    assert params and all("lora_" in n for n, p in gen.unet.named_parameters() if p.requires_grad)
    weights = victr.effective_weights(gen.unet)
    assert weights and all(torch.equal(w, before[name]) for name, w in weights.items())  # B = 0 at the start
    batches = TrainingBatches(load_split(tiny_data, "train"), hflip=True)
    images, masks, g = batches.draw(0, 0, 4, stream=1)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    terms = victr.stage_losses(gen, images, masks, g, "cpu", victr.victr_options(VICTR), {"diffusion": 1.0})
    terms["total"].backward()
    optimizer.step()
    after = gen.unet.state_dict()
    for name, value in before.items():
        key = name if name in after else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], value), name  # every base weight untouched
    assert any(not torch.equal(w, before[name]) for name, w in victr.effective_weights(gen.unet).items())
    with pytest.raises(ConfigError, match="no layer named"):
        victr.add_lora(torch.nn.Linear(2, 2), 2, None, ["to_q"], seed=0)


@pytest.mark.parametrize("mask_dropout", [0.0, 1.0])
def test_mask_dropout_trains_the_unconditional_flow(tiny_data, monkeypatch, mask_dropout):
    # guidance on the mask (mask_guidance_scale, the Kvasir recipe) needs the flow to have seen the "no mask"
    # condition; before, a victr entry's mask_dropout was read by nothing
    gen = build_generator(VICTR, CLASSES, 1, (16, 16), seed=0)
    cfg = copy.deepcopy(VICTR)
    cfg["training"]["mask_dropout"] = mask_dropout
    seen = []
    real_output = gen.model_output
    monkeypatch.setattr(gen, "model_output", lambda x, t, cond, prompt: seen.append((cond, prompt))
                        or real_output(x, t, cond, prompt))
    images, masks, g = TrainingBatches(load_split(tiny_data, "train"), hflip=True).draw(0, 0, 4, stream=1)
    victr.stage_losses(gen, images, masks, g, "cpu", victr.victr_options(cfg), {"diffusion": 1.0})
    cond, prompt = seen[0]
    if mask_dropout:
        assert torch.equal(cond, gen.null_condition(cond))
        torch.testing.assert_close(prompt, gen.encode_prompt(masks, unconditional=True))
    else:
        assert torch.equal(cond, gen.mask_condition(masks))


def _weights(directory):
    return {k: v.clone() for k, v in MaskToImageGenerator.load(directory).state_dict().items()}


def _stage1_state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {**{f"generator.{k}": v for k, v in state["generator"].items()},
            **{f"ewc.{part}.{k}": v for part in ("anchor", "fisher") for k, v in state["ewc"][part].items()}}


@pytest.mark.parametrize("killed", ["stage1", "stage2"])
def test_two_stage_training_resumes_after_a_kill_to_the_same_weights(tmp_path, killed):
    source = make_tiny_dataset(tmp_path / "source", seed=1)
    target = make_tiny_dataset(tmp_path / "target", seed=0)
    victr.train_victr_stage1(VICTR, source, target, tmp_path / "stage1.pt", seed=3)
    straight = victr.train_victr(VICTR, tmp_path / "stage1.pt", target, tmp_path / "straight", seed=3)
    assert straight["steps"] == 7 and straight["stage2"]["ewc_weight"] > 0
    stage1 = tmp_path / "stage1.pt"
    if killed == "stage1":
        stage1 = tmp_path / "resumed_stage1.pt"
        stopped = victr.train_victr_stage1(VICTR, source, target, stage1, seed=3, stop_after=2)
        assert stopped["stopped"] and not stage1.exists()
        victr.train_victr_stage1(VICTR, source, target, stage1, seed=3)
        assert not Path(f"{stage1}.ckpt").exists()
        a, b = _stage1_state(tmp_path / "stage1.pt"), _stage1_state(stage1)
        assert a.keys() == b.keys()
        for key in a:  # the weights, the EWC anchor and the Fisher
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    else:
        stopped = victr.train_victr(VICTR, stage1, target, tmp_path / "resumed", seed=3, stop_after=2)
        assert stopped["stopped"] and not (tmp_path / "resumed").exists()
    resumed = victr.train_victr(VICTR, stage1, target, tmp_path / "resumed", seed=3)
    assert not (tmp_path / "resumed.ckpt").exists()
    for stage in ("stage1", "stage2"):  # each stage's loss records survive the kill
        assert resumed[stage]["final_losses"] == straight[stage]["final_losses"], stage
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_stage2_refuses_a_stage1_file_of_other_settings_and_a_missing_one(tmp_path):
    source = make_tiny_dataset(tmp_path / "source", seed=1)
    target = make_tiny_dataset(tmp_path / "target", seed=0)
    victr.train_victr_stage1(VICTR, source, target, tmp_path / "stage1.pt", seed=3)
    # another LoRA rank and other Stage-2 losses: the same Stage 1
    shared = victr_cfg(lora={"rank": 2, "target_modules": LORA_TARGETS}, losses={"l2": 0.0})
    assert victr.train_victr(shared, tmp_path / "stage1.pt", target, tmp_path / "shared", seed=3)["steps"] == 7
    with pytest.raises(InputDataError, match=r"stage1\.pt.*settings differs"):  # Tweedie changes Stage 1's target
        victr.train_victr(victr_cfg(tweedie=False), tmp_path / "stage1.pt", target, tmp_path / "other", seed=3)
    with pytest.raises(InputDataError, match="seed differs"):
        victr.train_victr(VICTR, tmp_path / "stage1.pt", target, tmp_path / "other", seed=4)
    with pytest.raises(ConfigError, match="none was given"):
        victr.train_victr(VICTR, None, target, tmp_path / "other", seed=3)
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.ckpt").exists()


def _victr_config(**generators):
    return {"seeds": {"generator": 0}, "datasets": {"d": {}}, "generators": generators}


def test_generators_that_differ_only_in_stage2_share_one_stage1_job():
    def entry(**changes):
        cfg = victr_cfg()
        for path, value in changes.items():
            *parents, key = path.split("__")
            node = cfg
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = value
        return cfg

    config = _victr_config(
        base=VICTR,
        # Stage 2 only: the same Stage 1
        rank=entry(victr__lora={"rank": 8, "target_modules": LORA_TARGETS}), nol2=entry(victr__losses={"l2": 0.0}),
        longer=entry(training__steps=40), explicit=entry(victr__tweedie=True, victr__stage1={"steps": 3, "lr": 1e-3}),
        runtime=entry(training__checkpoint_every=7),
        # Stage 1 reads these: each its own
        notweedie=entry(victr__tweedie=False), stage1_steps=entry(victr__stage1={"steps": 4}),
        stage1_lr=entry(training__lr=5e-4),  # Stage 1's lr defaults to training's
        targets=entry(victr__lora={"rank": 4, "target_modules": ["to_q"]}),  # the Fisher's layers
        dropout=entry(training__prompt_dropout=0.3), source=entry(victr__source="other"),
        # no Stage 1: no file
        nosource=entry(victr__source=None), nosteps=entry(victr__stage1={"steps": 0}))
    files = {g: victr_stage1(config, "d", g) for g in config["generators"]}
    assert files["nosource"] == files["nosteps"] == []
    shared = {g for g in files if files[g] == files["base"]}
    assert shared == {"base", "rank", "nol2", "longer", "explicit", "runtime"}
    own = ["notweedie", "stage1_steps", "stage1_lr", "targets", "dropout", "source"]
    assert len({tuple(files[g]) for g in own} | {tuple(files["base"])}) == len(own) + 1
    key = files["base"][0].split("/")[-1].removesuffix(".pt")
    assert victr_stage1_generator(config, "d", key) == "base"  # the first in config order
    # another seed, another file; the settings are a generator entry whose settings are themselves
    assert victr_stage1({**config, "seeds": {"generator": 1}}, "d", "base") != files["base"]
    settings = victr_stage1_settings(VICTR)
    assert victr_stage1_settings(settings) == settings and victr.victr_options(settings)["stage1"]["steps"] == 3


def test_the_saved_generator_is_a_plain_flow_generator_that_rd_samples_in_one_to_four_steps(tmp_path):
    target = make_tiny_dataset(tmp_path / "target", seed=0)
    stats = victr.train_victr(victr_cfg(source=None), None, target, tmp_path / "gen", seed=0)  # no EWC anchor
    assert "stage1" not in stats and stats["stage2"]["ewc_weight"] == 0.0
    gen = MaskToImageGenerator.load(tmp_path / "gen")
    assert gen.meta["flow"] == {"kind": "rectified", "tweedie": True}
    assert not any("lora" in name for name, _ in gen.named_parameters())  # adapters merged into the weights
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 3:9, 3:9] = 2
    for steps in (1, 2, 4):
        scheduler = gen.sampling_scheduler()
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps[0] == 999  # the first step starts from pure noise, σ ≈ 1
        params = {"steps": steps, "eta": 0.0, "guidance_scale": 2.0}
        images, _ = DDIMSampler(params).sample(gen, masks, [5, 6])
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
        torch.testing.assert_close(images, DDIMSampler(params).sample(gen, masks, [5, 6])[0])


def test_rd_on_a_flow_generator_is_diffusers_flow_match_euler_on_the_same_sigmas():
    gen = build_generator(VICTR, CLASSES, 1, (16, 16), seed=0)
    gen.meta["flow"] = {"kind": "rectified", "tweedie": True}
    gen.requires_grad_(False)
    # the pixel generator's DDIM clips x̂0 to [-1, 1] at every step, which the flow scheduler does not: off here
    gen.noise_scheduler = DDPMScheduler.from_config(gen.noise_scheduler.config, clip_sample=False)
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    masks[:, 2:12, 2:12] = 1
    images, _ = DDIMSampler({"steps": 4, "eta": 0.0, "guidance_scale": 1.0}).sample(gen, masks, [9])
    # the same 4 steps with diffusers' flow-matching Euler scheduler on the σ of DDIM's timesteps
    ddim = gen.sampling_scheduler()
    ddim.set_timesteps(4)
    ac = gen.noise_scheduler.alphas_cumprod[ddim.timesteps]
    sigmas = ((1 - ac).sqrt() / (ac.sqrt() + (1 - ac).sqrt())).tolist()
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    flow.set_timesteps(sigmas=sigmas)
    from segsynth.sampling.base import NoiseStream

    x_vp = NoiseStream([9], (1, 1, 16, 16), "cpu", ahead=1).next()
    x = x_vp / (ac[0].sqrt() + (1 - ac[0]).sqrt())
    cond, prompt = gen.mask_condition(masks), gen.encode_prompt(masks)
    with torch.no_grad():
        for t in flow.timesteps:
            sigma = t / 1000
            u = victr.velocity_from_output(gen.model_output(x, t.expand(1), cond, prompt), x, sigma, tweedie=True)
            x = flow.step(u, t, x, return_dict=False)[0]
    # float32 rounding of σ·1000 on the two paths moves the network's time input by ~1e-5: agreement to 1e-3
    # (a wrong conversion differs by O(0.1))
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=1e-3, atol=1e-3)


def test_a_stage1_dataset_of_other_classes_is_refused(tmp_path):
    import numpy as np
    import pandas as pd

    from segsynth.data.canonical import write_canonical

    target = make_tiny_dataset(tmp_path / "target")
    index = pd.DataFrame({"sample_id": ["a", "b"], "case_id": ["a", "b"], "split": ["train", "test"],
                          "source_file": "generated", "slice_index": -1})
    write_canonical(tmp_path / "source", np.zeros((2, 1, 16, 16), np.float32), np.zeros((2, 16, 16), np.uint8),
                    index, {"dataset": "other", "kind": "test", "class_names": ["background", "lesion"]})
    with pytest.raises(ConfigError, match="class_names"):
        victr.train_victr_stage1(VICTR, tmp_path / "source", target, tmp_path / "stage1.pt", seed=0)
    # the refusal comes after the checkpoint directory is claimed; it leaves none behind
    assert not (tmp_path / "stage1.pt.ckpt").exists() and not (tmp_path / "stage1.pt").exists()
