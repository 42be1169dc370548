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
from segsynth.miner import AdversarialityMiner
from segsynth.sampling.synthesize import synthesize
from set_scores import set_scores

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
    line = {"variant": name, "delta_mu": mu, "delta_sigma": sigma,
            **set_scores(res, set_dir, out / f"fid_{name}.parquet", "tiny", name)}
    print(json.dumps(line), flush=True)
