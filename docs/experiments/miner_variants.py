"""The demo's Miner retrained with other settings (JSON: name -> miner overrides), seed 0 sampled, scored as the
DAG scores a set; one JSON line per variant. After `make demo` in a clone DEMO:
    python docs/experiments/miner_variants.py DEMO OUT '{"b0.01": {"beta": 0.01}, "full": {"rollout_gradient": "full"}}'
(README: "The Miner's β on the default" and "The full gradient, and what FID resolves on the default")."""
import json
import sys
import time
from pathlib import Path

import yaml

from segsynth.config import method_params, miner_schedule
from segsynth.miner import train_miner
from segsynth.sampling.synthesize import synthesize
from set_scores import set_scores

demo = Path(sys.argv[1])
out = Path(sys.argv[2])
variants = json.loads(sys.argv[3])          # name -> miner overrides
config = yaml.safe_load((demo / "config.yaml").read_text())
res = demo / "results/mni152"
for name, overrides in variants.items():
    began = time.time()
    cfg = {**config["miner"], **overrides}
    miner_dir = out / f"miner_{name}"
    if not miner_dir.exists():
        train_miner(cfg, res / "data", res / "generators/tiny", res / "segmenters/unet/real", miner_dir, seed=0,
                    schedule=miner_schedule(config, "mni152"), threads=2)
    set_dir = out / f"set_{name}"
    if not set_dir.exists():
        synthesize(res / "generators/tiny", res / "data", "miner", method_params(config, "mni152", "miner"), 0,
                   set_dir, value_model_dir=res / "segmenters/unet/real", threads=2, miner_dir=miner_dir)
    line = {"variant": name, **overrides, "seconds": round(time.time() - began),
            **set_scores(res, set_dir, out / f"fid_{name}.parquet", "tiny", name)}
    print(json.dumps(line), flush=True)
