"""p_ω(m | c): the class-conditioned mask VAE of VGD's eq. 1 (a conditional VAE, Sohn, Lee and Yan 2015), the
``mask_source: cvae`` of a synthesis method; trained by the ``train_mask_vae`` rule.

- c is the set of foreground classes a mask contains, a multi-hot vector over the dataset's foreground classes.
  A synthetic sample's c is its source training mask's, so the prompt P_c and the class balance of a synthetic
  set follow the training set while the shapes are new.
- Encoder q(z | m, c) and decoder p(m | z, c) are MONAI's ``VarAutoEncoder``: the encoder reads the one-hot mask
  with c broadcast as extra channels; the decoder reads z + W·c (the condition added to the latent code, a
  learned linear map W) and gives per-pixel class logits. The prior p(z | c) is a learned diagonal Gaussian
  per class set (Sohn et al.'s conditional prior; starts as N(0, I)): with a fixed N(0, I) prior the encoder
  carries the class set in z and the decoder learns to ignore c (measured on the tests' toy set: masks asked
  for one class drew the other in 70–90 % of samples).
- Loss (the negative ELBO per mask): the pixels' cross-entropy summed over the mask + ``kl_weight`` ·
  KL(q(z | m, c) ‖ p(z | c)).
- Sampling: z ~ p(z | c) with ε from the sample's own seed (:func:`cvae_seed`), labels = argmax of the logits.

Training draws each step's batch from (seed, step) alone and checkpoints every ``checkpoint_every`` steps, so a
killed job resumes to the weights of the run that was not killed (segsynth.training).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import MASK_VAE_DEFAULTS, science
from .data.canonical import load_split, read_meta
from .errors import InputDataError
from .io import atomic_dir, write_json, write_parquet
from .training import (Checkpointer, claim_checkpoint_dir, default_device, inputs_fingerprint, releases_unused_claims,
                       set_torch_threads, step_rng, step_torch_generator)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mask_vae.pt"
META_FILE = "mask_vae.json"
QUALITY_FILE = "quality.parquet"



def class_presence(masks: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """c of each mask (N, H, W): (N, num_classes - 1) float multi-hot, 1 where the foreground class occurs."""
    masks = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks).long()
    present = [(masks == k).flatten(1).any(1) for k in range(1, num_classes)]
    return torch.stack(present, 1).float()


def cvae_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample's latent draw: from the synthesis seed and the sample's index, apart from its noise
    seed and its gt_aug seed, so the three random streams are independent."""
    return int(np.random.SeedSequence([seed, sample_index, 0xC0AE]).generate_state(1)[0])


class ConditionalMaskVAE(torch.nn.Module):
    """p_ω(m | c) over (resolution × resolution) label masks of ``num_classes`` classes (background = 0)."""

    def __init__(self, num_classes: int, resolution: int, latent_size: int = 32, channels=(16, 32, 64)):
        super().__init__()
        from monai.networks.nets import VarAutoEncoder

        channels = tuple(int(c) for c in channels)
        if resolution % (2 ** len(channels)):
            raise ValueError(f"mask_vae.channels: {len(channels)} stride-2 levels need a resolution divisible by "
                             f"{2 ** len(channels)}, got {resolution}")
        self.config = {"num_classes": int(num_classes), "resolution": int(resolution),
                       "latent_size": int(latent_size), "channels": list(channels)}
        conditions = num_classes - 1
        self.vae = VarAutoEncoder(spatial_dims=2, in_shape=(num_classes + conditions, resolution, resolution),
                                  out_channels=num_classes, latent_size=latent_size, channels=channels,
                                  strides=(2,) * len(channels), use_sigmoid=False)
        self.condition = torch.nn.Linear(conditions, latent_size)
        self.prior_net = torch.nn.Linear(conditions, 2 * latent_size)
        torch.nn.init.zeros_(self.prior_net.weight)  # starts as N(0, I)
        torch.nn.init.zeros_(self.prior_net.bias)

    def forward(self, masks: torch.Tensor, c: torch.Tensor, noise: torch.Tensor):
        """Logits of the reconstruction and the posterior's and the prior's (mean, log-variance); ``noise`` is the
        reparameterisation's ε."""
        one_hot = F.one_hot(masks.long(), self.config["num_classes"]).permute(0, 3, 1, 2).float()
        condition_maps = c[:, :, None, None].expand(-1, -1, *masks.shape[-2:])
        mu, logvar = self.vae.encode_forward(torch.cat([one_hot, condition_maps], 1))
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z, c), (mu, logvar), self.prior(c)

    def prior(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | c) = N(mean, diag(exp(log-variance))): the CVAE's conditional prior (Sohn et al.'s prior network),
        so the latent codes of masks with different class sets need not share one N(0, I)."""
        mean, logvar = self.prior_net(c).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_forward(z + self.condition(c), use_sigmoid=False)

    @torch.no_grad()
    def sample(self, c: torch.Tensor, seeds: list[int]) -> np.ndarray:
        """One mask per row of c (N, K-1), z ~ p(z | c) with ε drawn from each sample's own seed: (N, H, W) uint8."""
        eps = torch.stack([torch.randn(self.config["latent_size"], generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds]).to(c.device)
        mean, logvar = self.prior(c)
        return self.decode(mean + eps * torch.exp(0.5 * logvar), c).argmax(1).to(torch.uint8).cpu().numpy()

    def save(self, directory, stats: dict) -> None:
        torch.save(self.state_dict(), Path(directory) / WEIGHTS_FILE)
        write_json(Path(directory) / META_FILE, {"config": self.config, "stats": stats})

    @classmethod
    def load(cls, directory) -> "ConditionalMaskVAE":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise InputDataError(meta_path, "missing: not a trained mask VAE directory (run the train_mask_vae rule)")
        model = cls(**json.loads(meta_path.read_text())["config"])
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return model.requires_grad_(False).eval()


def negative_elbo(logits, masks, posterior, prior, kl_weight: float):
    """(loss, reconstruction, KL), each the batch mean of a per-mask sum; KL(q(z | m, c) ‖ p(z | c)) in closed
    form for two diagonal Gaussians."""
    (mu, logvar), (prior_mu, prior_logvar) = posterior, prior
    reconstruction = F.cross_entropy(logits, masks.long(), reduction="none").flatten(1).sum(1).mean()
    kl = 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1)
    kl = kl.sum(1).mean()
    return reconstruction + kl_weight * kl, reconstruction, kl


def mask_quality(sampled: np.ndarray, conditions: torch.Tensor, reference: np.ndarray,
                 class_names: list[str]) -> pd.DataFrame:
    """How the sampled masks compare with the training masks, per foreground class: presence rate and mean area
    (fraction of the image) of each set, the 1-D Wasserstein distance between their area distributions, and how
    often a sample contains its conditioned class (recall) or a class it was not conditioned on (spurious)."""
    from scipy.stats import wasserstein_distance

    pixels = float(np.prod(reference.shape[1:]))
    sampled_c = class_presence(sampled, len(class_names)).numpy().astype(bool)
    wanted = conditions.cpu().numpy().astype(bool)
    rows = []
    for k, name in enumerate(class_names[1:], start=1):
        area_s = (sampled == k).reshape(len(sampled), -1).sum(1) / pixels
        area_r = (reference == k).reshape(len(reference), -1).sum(1) / pixels
        rows.append({"class_index": k, "class_name": name,
                     "presence_train": float((area_r > 0).mean()), "presence_sampled": float((area_s > 0).mean()),
                     "area_train": float(area_r.mean()), "area_sampled": float(area_s.mean()),
                     "area_wasserstein": float(wasserstein_distance(area_r, area_s)),
                     "condition_recall": float(sampled_c[wanted[:, k - 1], k - 1].mean())
                     if wanted[:, k - 1].any() else float("nan"),
                     "spurious_rate": float(sampled_c[~wanted[:, k - 1], k - 1].mean())
                     if (~wanted[:, k - 1]).any() else float("nan")})
    return pd.DataFrame(rows)


@releases_unused_claims
def train_mask_vae(cfg: dict, data_dir, out_dir, seed: int, checkpoint_dir=None, threads: int = 1,
                   stop_after: int | None = None) -> dict:
    """Train p_ω(m | c) on the training masks of ``data_dir`` and save it with its sample-quality table.

    ``stop_after`` ends after that many steps with a checkpoint and no output (tests simulate a kill with it)."""
    cfg = {**MASK_VAE_DEFAULTS, **(cfg or {})}
    set_torch_threads(threads)
    device = default_device()
    checkpoint_dir = claim_checkpoint_dir(checkpoint_dir or f"{out_dir}.ckpt",
                                          {"trainer": "mask_vae", "cfg": science("mask_vae", cfg), "seed": seed,
                                           "inputs": inputs_fingerprint([data_dir])})
    class_names = read_meta(data_dir)["class_names"]
    masks_all = torch.from_numpy(np.ascontiguousarray(load_split(data_dir, "train").masks))
    if len(class_names) < 2:
        raise InputDataError(Path(data_dir) / "meta.json", "the mask VAE needs at least one foreground class")
    conditions_all = class_presence(masks_all, len(class_names))

    torch.manual_seed(seed)
    model = ConditionalMaskVAE(len(class_names), masks_all.shape[-1], cfg["latent_size"], cfg["channels"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    checkpointer = Checkpointer(checkpoint_dir, cfg["checkpoint_every"], {"model": model, "optimizer": optimizer})
    start = checkpointer.restore()
    steps, batch_size = cfg["steps"], cfg["batch_size"]
    began, recent = time.time(), []
    model.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="mask VAE", mininterval=10):
        rng = step_rng(seed, step)
        idx = rng.integers(0, len(masks_all), size=batch_size)
        masks = masks_all[idx]
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        masks = torch.where(flip[:, None, None], masks.flip(-1), masks).to(device)  # left-right flips: more shapes
        noise = torch.randn(batch_size, cfg["latent_size"], generator=step_torch_generator(seed, step)).to(device)
        logits, posterior, prior = model(masks, conditions_all[idx].to(device), noise)
        loss, reconstruction, kl = negative_elbo(logits, masks, posterior, prior, cfg["kl_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [(reconstruction.item(), kl.item())])[-25:]
        done = step + 1
        if done % 50 == 0:
            log.info("step %d/%d reconstruction %.1f kl %.2f", done, steps, *np.mean(recent, axis=0))
        checkpointer.maybe_save(done, steps)
        if stop_after is not None and done >= stop_after:
            checkpointer.save(done)
            return {"steps": done, "stopped": True}

    model.to("cpu").eval()
    # sample quality: one draw per training mask, conditioned on its classes, against the training masks
    seeds = [cvae_seed(seed, i) for i in range(len(masks_all))]
    sampled = model.sample(conditions_all, seeds)
    quality = mask_quality(sampled, conditions_all, masks_all.numpy(), class_names)
    stats = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - began, 2),
             "final_reconstruction": float(np.mean([r for r, _ in recent])) if recent else None,
             "final_kl": float(np.mean([k for _, k in recent])) if recent else None,
             "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_dir(out_dir) as tmp:
        model.save(tmp, stats)
        write_parquet(tmp / QUALITY_FILE, quality)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats
