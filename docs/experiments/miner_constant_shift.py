"""A constant 'Miner' (Δμ, ΔΣ the same at every pixel, written into the zero head's bias; nothing trained): what
FID a global seed shift costs on the demo's generator. JSON: name -> [Δμ, ΔΣ]. After `make demo` in DEMO:
    python docs/experiments/miner_constant_shift.py DEMO OUT '{"mean0.0185": [0.0185, 0.0]}'"""
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from segsynth.config import method_params
from segsynth.evaluation import score_synthetic
from segsynth.fidelity import score_fidelity
from segsynth.miner import AdversarialityMiner
from segsynth.sampling.synthesize import synthesize
from segsynth.synthetic_set import load_synthetic_set

demo, out = Path(sys.argv[1]), Path(sys.argv[2])
variants = json.loads(sys.argv[3])      # name -> [delta_mu, delta_sigma]
config = yaml.safe_load((demo / "config.yaml").read_text())
res = demo / "results/mni152"
for name, (mu, sigma) in variants.items():
    miner = AdversarialityMiner(1, [16, 32], 1.0, 0.3)
    with torch.no_grad():
        miner.head.bias[0] = math.atanh(mu / 1.0)
        miner.head.bias[1] = math.atanh(sigma / 0.3)
    mdir = out / f"miner_{name}"
    mdir.mkdir(parents=True, exist_ok=True)
    miner.save(mdir)
    set_dir = out / f"set_{name}"
    if not set_dir.exists():
        synthesize(res / "generators/tiny", res / "data", "miner", method_params(config, "mni152", "miner"), 0,
                   set_dir, value_model_dir=res / "segmenters/unet/real", threads=2, miner_dir=mdir)
    fid = score_fidelity(res / "fidelity/real_features.npz", set_dir, res / "segmenters/unet/real",
                         out / f"fid_{name}.parquet", "mni152", "tiny", name, 0)
    adh = score_synthetic(res / "segmenters/unet/real", set_dir, judge_dir=res / "segmenters/mk_unet/real")
    rec = load_synthetic_set(set_dir).records
    line = {"variant": name, "delta_mu": mu, "delta_sigma": sigma,
            **{m: round(float(v), 4) for m, v in zip(fid["metric"], fid["value"])},
            **{f"adherence_{s}": round(100 * float(g.loc[g["class"] == "mean", "dice"].mean()), 2)
               for s, g in adh.groupby("scorer")},
            "seg_loss": round(float(rec["seg_loss"].mean()), 4),
            "seed_mean": round(float(rec["miner_seed_mean"].mean()), 4),
            "seed_std": round(float(rec["miner_seed_std"].mean()), 4)}
    print(json.dumps(line), flush=True)
