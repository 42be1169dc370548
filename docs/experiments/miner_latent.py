"""Does a latent-space generator keep the Miner's samples native on the default's data?
    python docs/experiments/miner_latent.py DEMO OUT VAE_STEPS GENERATOR_STEPS ['{"name": {miner overrides}}']
(README: 1500 3000, then the β variants; without the JSON: RD, the paper's Miner and the full-gradient one).

A tiny VAE trained here, a latent ControlNet generator trained through train_generator (pretrained = an SD-layout
directory with that VAE, a random UNet and a tiny CLIP, train_unet true), then RD and the Miner (stop-gradient and
full) on seed 0, scored as the DAG scores a set, against the demo's f_θ and judge."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from segsynth.config import method_params, miner_schedule
from segsynth.data.canonical import load_split
from segsynth.generator.train import train_generator
from segsynth.miner import train_miner
from segsynth.sampling.synthesize import synthesize
from set_scores import set_scores

demo, out = Path(sys.argv[1]), Path(sys.argv[2])
vae_steps, gen_steps = int(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
config = yaml.safe_load((demo / "config.yaml").read_text())
res = demo / "results/mni152"
data = res / "data"
template = config["datasets"]["mni152"]["prompt_template"]


def log(**kw):
    print(json.dumps(kw), flush=True)


sd = out / "sd"
if not (sd / "scheduler").exists():
    began = time.time()
    images = torch.from_numpy(load_split(data, "train").images) * 2 - 1
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for step in range(vae_steps):
        x = images[rng.integers(0, len(images), 16)]
        if rng.random() < 0.5:
            x = x.flip(-1)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == vae_steps - 1:
            log(vae_step=step, l1=round(float((rec - x).abs().mean()), 4), kl=round(float(kl), 4))
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i:i + 32]).latent_dist.mean for i in range(0, len(images), 32)])
        recon = torch.cat([vae.decode(vae.encode(images[i:i + 32]).latent_dist.mean).sample
                           for i in range(0, len(images), 32)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    log(vae_seconds=round(time.time() - began), latent_std=round(float(lat.std()), 4),
        recon_l1=round(float((recon - images).abs().mean()), 4))
    vae.save_pretrained(sd / "vae")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                         layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(sd / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 vocab_size=600, max_position_embeddings=77)).save_pretrained(sd / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(sd / "tokenizer")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False).save_pretrained(sd / "scheduler")

gen_dir = out / "generator"
if not gen_dir.exists():
    began = time.time()
    cfg = {k: v for k, v in config["generators"]["tiny"].items() if k not in ("unet", "init", "conditioning")}
    cfg["pretrained"] = str(sd)
    cfg["training"] = {**cfg["training"], "steps": gen_steps, "warmup_steps": 50, "checkpoint_every": 250}
    stats = train_generator(cfg, data, gen_dir, seed=0, prompt_template=template, threads=2)
    log(generator_seconds=round(time.time() - began), final_loss=stats.get("final_loss"))

f_theta, judge = res / "segmenters/unet/real", res / "segmenters/mk_unet/real"
miners = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {"miner_sg": {}, "miner_full": {"rollout_gradient": "full"}}
for name in (["rd"] if len(sys.argv) <= 5 else []) + list(miners):
    began = time.time()
    set_dir = out / f"set_{name}"
    miner_dir = None
    if name != "rd":
        miner_dir = out / name
        if not miner_dir.exists():
            train_miner({**config["miner"], **miners[name]}, data, gen_dir, f_theta, miner_dir, seed=0,
                        schedule=miner_schedule(config, "mni152"), threads=2)
    method = "rd" if name == "rd" else "miner"
    if not set_dir.exists():
        synthesize(gen_dir, data, method, method_params(config, "mni152", method), 0, set_dir,
                   value_model_dir=f_theta, threads=2, miner_dir=miner_dir)
    log(variant=name, seconds=round(time.time() - began),
        **set_scores(res, set_dir, out / f"fid_{name}.parquet", "latent", name))
