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
from segsynth.evaluation import score_synthetic
from segsynth.fidelity import score_fidelity
from segsynth.miner import train_miner
from segsynth.synthetic_set import load_synthetic_set

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
    from segsynth.sampling.synthesize import synthesize
    set_dir = out / f"set_{name}"
    if not set_dir.exists():
        synthesize(res / "generators/tiny", res / "data", "miner", method_params(config, "mni152", "miner"), 0,
                   set_dir, value_model_dir=res / "segmenters/unet/real", threads=2, miner_dir=miner_dir)
    fid = score_fidelity(res / "fidelity/real_features.npz", set_dir, res / "segmenters/unet/real",
                         out / f"fid_{name}.parquet", "mni152", "tiny", name, 0)
    adh = score_synthetic(res / "segmenters/unet/real", set_dir, judge_dir=res / "segmenters/mk_unet/real")
    rec = load_synthetic_set(set_dir).records
    line = {"variant": name, **overrides, "seconds": round(time.time() - began),
            **{m: round(float(v), 4) for m, v in zip(fid["metric"], fid["value"])},
            **{f"adherence_{s}": round(100 * float(g.loc[g["class"] == "mean", "dice"].mean()), 2)
               for s, g in adh.groupby("scorer")},
            "seg_loss": round(float(rec["seg_loss"].mean()), 4), "value": round(float(rec["value"].mean()), 4),
            **{c: round(float(rec[c].mean()), 4) for c in rec.columns if c.startswith("miner_")}}
    print(json.dumps(line), flush=True)
