"""The scores of one synthetic set, as the DAG computes them (score_fidelity, score_synthetic with the judge, the
set's records), flattened into one JSON-able dict: what every script here prints per variant."""
from segsynth.evaluation import score_synthetic
from segsynth.fidelity import score_fidelity
from segsynth.synthetic_set import load_synthetic_set


def set_scores(res, set_dir, fid_path, generator: str, method: str, seed: int = 0) -> dict:
    """``res``: a run's results/<dataset> folder (its real features, f_θ = segmenters/unet/real, judge =
    segmenters/mk_unet/real)."""
    f_theta = res / "segmenters/unet/real"
    fid = score_fidelity(res / "fidelity/real_features.npz", set_dir, f_theta, fid_path, res.name, generator,
                         method, seed)
    adherence = score_synthetic(f_theta, set_dir, judge_dir=res / "segmenters/mk_unet/real")
    records = load_synthetic_set(set_dir).records
    return {**{m: round(float(v), 4) for m, v in zip(fid["metric"], fid["value"])},
            **{f"adherence_{s}": round(100 * float(g.loc[g["class"] == "mean", "dice"].mean()), 2)
               for s, g in adherence.groupby("scorer")},
            "seg_loss": round(float(records["seg_loss"].mean()), 4), "value": round(float(records["value"].mean()), 4),
            **{c: round(float(records[c].mean()), 4) for c in records.columns if c.startswith("miner_")}}
