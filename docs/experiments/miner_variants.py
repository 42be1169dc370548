"""The demo's Miner retrained with other settings (JSON: name -> miner overrides), seed 0 sampled, scored as the
DAG scores a set; one JSON line per variant. After `make demo` in a clone DEMO:
    python docs/experiments/miner_variants.py DEMO OUT '{"b0.01": {"beta": 0.01}, "full": {"rollout_gradient": "full"}}'
(README: "The Miner's β on the default" and "The full gradient, and what FID resolves on the default").
Another dataset of a run: DATASET and the run's preset files after the JSON, e.g. in a run of the Kvasir preset
    python docs/experiments/miner_variants.py RUN OUT '{...}' kvasir presets/kvasir.yaml
A variant named "existing:<method>" trains nothing and scores the run's own seed-0 set of that method."""
import json
import sys
import time
from pathlib import Path

from segsynth.config import for_dataset, method_params, miner_schedule, read_configs
from segsynth.miner import train_miner
from segsynth.sampling.synthesize import synthesize
from set_scores import set_scores

demo = Path(sys.argv[1])
out = Path(sys.argv[2])
variants = json.loads(sys.argv[3])          # name -> miner overrides
dataset = sys.argv[4] if len(sys.argv) > 4 else "mni152"
config = read_configs([demo / "config.yaml", *(demo / f for f in sys.argv[5:])])
res = demo / "results" / dataset
for name, overrides in variants.items():
    began = time.time()
    if name.startswith("existing:"):
        method = name.split(":", 1)[1]
        print(json.dumps({"variant": name, **set_scores(res, res / f"synthetic/tiny/{method}/seed0",
                                                         out / f"fid_{method}.parquet", "tiny", method)}), flush=True)
        continue
    cfg = {**for_dataset(config, dataset)["miner"], **overrides}
    miner_dir = out / f"miner_{name}"
    if not miner_dir.exists():
        train_miner(cfg, res / "data", res / "generators/tiny", res / "segmenters/unet/real", miner_dir, seed=0,
                    schedule=miner_schedule(config, dataset), threads=2)
    set_dir = out / f"set_{name}"
    if not set_dir.exists():
        synthesize(res / "generators/tiny", res / "data", "miner", method_params(config, dataset, "miner"), 0,
                   set_dir, value_model_dir=res / "segmenters/unet/real", threads=2, miner_dir=miner_dir)
    line = {"variant": name, **overrides, "seconds": round(time.time() - began),
            **set_scores(res, set_dir, out / f"fid_{name}.parquet", "tiny", name)}
    print(json.dumps(line), flush=True)
