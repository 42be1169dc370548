"""train_miner's seconds per step, stop-gradient against full gradient, interleaved (20 steps each, twice), on the
demo's models: python docs/experiments/miner_rollout_timing.py DEMO OUT"""
import json
import shutil
import sys
import time
from pathlib import Path
import yaml
from segsynth.config import miner_schedule
from segsynth.miner import train_miner
demo, out = Path(sys.argv[1]), Path(sys.argv[2])
config = yaml.safe_load((demo / "config.yaml").read_text())
res = demo / "results/mni152"
for rep in range(2):
    for rule in ("stop_gradient", "full"):
        cfg = {**config["miner"], "steps": 20, "rollout_gradient": rule}
        d = out / f"{rule}_{rep}"
        shutil.rmtree(d, ignore_errors=True)
        began = time.time()
        train_miner(cfg, res / "data", res / "generators/tiny", res / "segmenters/unet/real", d, seed=0,
                    schedule=miner_schedule(config, "mni152"), threads=2)
        print(json.dumps({"rule": rule, "rep": rep, "s_per_step": round((time.time() - began) / 20, 3)}), flush=True)
