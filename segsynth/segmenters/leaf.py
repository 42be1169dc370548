"""LEAF: a latent-diffusion segmenter ("LEAF: Latent Diffusion with Efficient Encoder Distillation for Aligned
Features in Medical Image Segmentation", Huang et al.), in the SDSeg lineage it builds on.

- **Latents.** A frozen VAE encodes the mask y into z^y; a trainable image encoder E_θ, initialised from that
  VAE's encoder, encodes the image x into z^x. A UNet reads concat(z^x, z^y_t) (its input convolution widened
  from c to 2c channels, the new half initialised by duplicating the weights and halving both, as Marigold and
  the paper do) and predicts the mask latent; the frozen decoder turns the estimate back into a mask.
- **Parameterisation** (§2.1, ``prediction: epsilon | v | x0``): the UNet is trained to predict ε, v = α_t ε − σ_t z
  or z itself, each with SDSeg's L1 loss against its own target (eq. 4 for x0, the paper's choice). Inference is
  SDSeg's single reverse step from z_T ~ N(0, I) at t = T − 1: ẑ from eq. 3, through diffusers'
  ``DDIMScheduler.step`` with one "trailing" step (its ``pred_original_sample`` is eq. 3 for every
  parameterisation). The noise z_T is drawn from ``inference_seed`` once per forward and shared by the batch, so
  a trained model is a deterministic, differentiable function of the image: the stability check varies the seed,
  and the model can be the value model f_θ of VGD and the Miner (``as_value_model``).
- **Feature alignment** (§2.2, ``align``): REPA's projector (an MLP: Linear-SiLU-Linear-SiLU-Linear) maps the
  output of one UNet down block, reshaped to (HW, C), to a frozen vision encoder's patch features of the clean
  image (its last hidden state's last HW tokens, the image resized so its patch grid is the block's H × W), and
  ``weight`` (λ) times the negative mean cosine similarity is added to the loss (eqs. 5–6). The encoder is
  DINOv2 (any ``transformers`` vision model with ``patch_size``) from a local directory, or, with ``encoder`` a
  mapping of sizes, a small randomly initialised DINOv2-architecture ViT (seeded, the same for every run).
  The projector is an auxiliary module: trained and checkpointed, saved beside the model (``alignment_head.pt``)
  but never part of the network that predicts, so inference costs what the unaligned model costs. λ = 0 runs the
  whole alignment path with a zero weight, which trains exactly what no alignment trains (tested).
- **Sizes.** With ``pretrained`` (a Stable Diffusion directory: ``vae``, ``unet``, ``scheduler`` and, for the
  empty-prompt embedding the conditional UNet reads, ``text_encoder`` and ``tokenizer``), the VAE, UNet and noise
  schedule are SD's, and a mask of K classes is the grey image of its class levels in [−1, 1] on the VAE's three
  channels (SDSeg's binary masks, generalised); a decoded pixel's class logits are its negative squared distance
  to each level. Without it (the default), a tiny ``AutoencoderKL`` with K input and output channels (a one-hot
  mask in, class logits out) is first fitted to the training masks (``vae.steps``: cross-entropy + a small KL),
  its latent scale set to 1 / std of the training masks' latents as LDM's is, and frozen; a tiny ``UNet2DModel``
  is trained from scratch.

Everything resumes bit for bit: the mask-VAE fit and the segmenter training checkpoint their steps, each step's
batch and noise come from (seed, step) alone (segsynth.training).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from ..errors import ConfigError, InputDataError
from ..io import atomic_path
from ..training import Checkpointer, step_rng, step_torch_generator
from .base import TorchSegmenter
from .lightweight import check_network_cfg
from .protocol import mean_foreground_dice

log = logging.getLogger(__name__)

#: The config's parameterisations → diffusers' ``prediction_type``.
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
ALIGNMENT_FILE = "alignment_head.pt"
#: The random stream of the mask-VAE fit (the segmenter's own steps use stream 0).
MASK_VAE_STREAM = 7
#: The random ViT alignment target is seeded with this, so every run (and every λ) aligns to the same encoder.
RANDOM_ENCODER_SEED = 0
#: DINOv2's image normalisation (ImageNet statistics), applied to the encoder's input.
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The tiny networks' defaults, sized for a 2-core CPU (64² images: a 16² latent; measured in the README's LEAF run).
DEFAULT_VAE = {"block_out_channels": [8, 16, 32], "latent_channels": 4, "layers_per_block": 1,
               "norm_num_groups": 4, "steps": 800, "batch_size": 8, "lr": 3.0e-3, "kl_weight": 1.0e-6}
DEFAULT_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8}
DEFAULT_ALIGN = {"block": 0, "projector_dim": 256}


class ImageEncoder(nn.Module):
    """E_θ: a copy of the VAE's encoder (and quant conv) whose posterior mean, times the latent scale, is z^x.

    When the image has other channels than the VAE reads (a grey MRI slice and a one-hot mask VAE or SD's RGB VAE,
    an RGB endoscopy frame and a two-class mask VAE), the first convolution reads the image's channels, each
    initialised to the sum of the VAE's input weights over its channels divided by their number: on an image whose
    channels are equal, the copy computes what the VAE encoder computes on that grey value in all its channels."""

    def __init__(self, vae: AutoencoderKL, image_channels: int):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.quant_conv = copy.deepcopy(vae.quant_conv) if vae.quant_conv is not None else None
        conv = self.encoder.conv_in
        if conv.in_channels != image_channels:
            adapted = nn.Conv2d(image_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            with torch.no_grad():
                summed = conv.weight.sum(dim=1, keepdim=True)
                adapted.weight.copy_(summed.expand(-1, image_channels, -1, -1) / image_channels)
                adapted.bias.copy_(conv.bias)
            self.encoder.conv_in = adapted
        self.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.chunk(2, dim=1)[0]


class LeafNetwork(nn.Module):
    """The inference network: image in [0, 1] → E_θ → UNet(concat(z^x, z_T), T − 1) → ẑ (eq. 3) → frozen decoder
    → class logits. The training objective reaches in through ``encode_mask``, ``encode_image`` and ``denoise``."""

    def __init__(self, mask_vae: AutoencoderKL, unet: nn.Module, noise_scheduler: DDPMScheduler, prediction: str,
                 image_channels: int, num_classes: int, grey_masks: bool, latent_scale: float,
                 inference_seed: int = 0, null_prompt: torch.Tensor | None = None):
        super().__init__()
        self.mask_vae = mask_vae.requires_grad_(False)
        self.image_encoder = ImageEncoder(mask_vae, image_channels)
        self.unet = unet
        self.num_classes, self.grey_masks, self.prediction = int(num_classes), bool(grey_masks), prediction
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))
        self.register_buffer("null_prompt", null_prompt, persistent=null_prompt is not None)
        # (keyword overrides: a config dict's own prediction_type is reset to the default when it was one)
        prediction_type = PREDICTION_TYPES[prediction]
        self.noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, prediction_type=prediction_type)
        # one reverse step from t = T - 1: "trailing" spacing puts the single timestep there
        self.inference_scheduler = DDIMScheduler.from_config(noise_scheduler.config, prediction_type=prediction_type,
                                                             timestep_spacing="trailing", clip_sample=False,
                                                             set_alpha_to_one=False)
        self.inference_scheduler.set_timesteps(1)
        self.inference_seed = int(inference_seed)

    @property
    def latent_channels(self) -> int:
        return int(self.mask_vae.config.latent_channels)

    @torch.no_grad()
    def encode_mask(self, masks: torch.Tensor) -> torch.Tensor:
        coded = mask_vae_input(masks, self.num_classes, int(self.mask_vae.config.in_channels), self.grey_masks)
        return self.mask_vae.encode(coded).latent_dist.mode() * self.latent_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images * 2.0 - 1.0) * self.latent_scale

    def denoise(self, z_image: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = torch.cat([z_image, z_t], dim=1)
        if self.null_prompt is not None:  # SD's conditional UNet reads the empty prompt, as Marigold's does
            prompt = self.null_prompt.expand(len(sample), -1, -1).to(sample.dtype)
            return self.unet(sample, t, encoder_hidden_states=prompt).sample
        return self.unet(sample, t).sample

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        decoded = self.mask_vae.decode(z / self.latent_scale).sample
        if not self.grey_masks:
            return decoded
        grey = decoded.mean(dim=1, keepdim=True)
        levels = torch.linspace(-1.0, 1.0, self.num_classes, device=z.device).view(1, -1, 1, 1)
        spread = 0.5 / max(self.num_classes - 1, 1)  # a quarter of the spacing between levels
        return -((grey - levels) ** 2) / (2 * spread**2)

    def initial_noise(self, shape: Sequence[int], device, dtype) -> torch.Tensor:
        """z_T of the current ``inference_seed``: one (1, c, h, w) draw, broadcast over the batch."""
        generator = torch.Generator().manual_seed(self.inference_seed)
        return torch.randn((1, *shape[1:]), generator=generator).to(device=device, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z_image = self.encode_image(images)
        z_noise = self.initial_noise(z_image.shape, z_image.device, z_image.dtype).expand_as(z_image)
        t = self.inference_scheduler.timesteps[0]
        output = self.denoise(z_image, z_noise, t.to(z_image.device).expand(len(z_image)))
        z_estimate = self.inference_scheduler.step(output, t, z_noise).pred_original_sample
        return self.decode_logits(z_estimate)


def mask_vae_input(masks: torch.Tensor, num_classes: int, channels: int, grey: bool) -> torch.Tensor:
    """(B, H, W) class indices → a mask VAE's input: one-hot in ±1 (the tiny VAE's K channels), or the grey image of
    the class levels in [−1, 1] on ``channels`` channels (a pretrained RGB VAE, SDSeg's coding)."""
    if grey:
        levels = masks.float() / max(num_classes - 1, 1) * 2.0 - 1.0
        return levels[:, None].expand(-1, channels, -1, -1)
    return F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float() * 2.0 - 1.0


def widen_input_conv(unet: nn.Module) -> None:
    """Marigold's input widening: conv_in reads 2c channels, both halves the old weights / 2, so the widened UNet on
    concat(z, z) computes what the old one did on z."""
    conv = unet.conv_in
    wide = nn.Conv2d(2 * conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([conv.weight, conv.weight], dim=1) / 2.0)
        wide.bias.copy_(conv.bias)
    unet.conv_in = wide
    unet.register_to_config(in_channels=2 * conv.in_channels)


def alignment_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the negative mean cosine similarity of projected UNet features and encoder patch features (B, L, D)."""
    return -F.cosine_similarity(projected.float(), teacher.float(), dim=-1).mean()


class LEAF(TorchSegmenter):
    """The LEAF segmenter (``kind: leaf``); see the module docstring. Config keys: the training keys of every
    torch segmenter, ``prediction`` (x0), ``pretrained`` (null), ``vae`` and ``unet`` (the tiny networks),
    ``beta_schedule`` (scaled_linear, the tiny schedule's), ``inference_seed`` (0), ``align`` (null: off; else
    ``weight`` λ, ``encoder`` a directory or ``{hidden_size, num_layers, num_heads, patch_size}``, ``block`` (0),
    ``projector_dim`` (256))."""

    kind = "leaf"
    NETWORK_KEYS = ("prediction", "pretrained", "vae", "unet", "beta_schedule", "inference_seed", "align")

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names, device)
        check_network_cfg(self.kind, self.cfg, self.NETWORK_KEYS)
        self.prediction = self.cfg.get("prediction", "x0")
        if self.prediction not in PREDICTION_TYPES:
            raise ConfigError("leaf.prediction", f"{self.prediction!r} is not one of {sorted(PREDICTION_TYPES)}")
        self.pretrained = self.cfg.get("pretrained")
        self.vae_cfg = {**DEFAULT_VAE, **(self.cfg.get("vae") or {})}
        self.unet_cfg = {**DEFAULT_UNET, **(self.cfg.get("unet") or {})}
        align = self.cfg.get("align")
        self.align_cfg = {**DEFAULT_ALIGN, **align} if align else None
        if self.align_cfg is not None:
            if "weight" not in self.align_cfg or "encoder" not in self.align_cfg:
                raise ConfigError("leaf.align", "needs `weight` (λ) and `encoder` (a directory or ViT sizes)")
            if float(self.align_cfg["weight"]) < 0:
                raise ConfigError("leaf.align.weight", f"λ must be ≥ 0, got {self.align_cfg['weight']}")
        self.alignment_head: nn.Module | None = None
        self._fitted_mask_vae: dict | None = None
        self._teacher: nn.Module | None = None
        self._seed = 0

    # --- the networks -------------------------------------------------------------------------------------------

    def build_network(self) -> LeafNetwork:
        if self.pretrained:
            return self._pretrained_network()
        vae = self._tiny_vae()
        latent_scale = 1.0
        if self._fitted_mask_vae is not None:
            vae.load_state_dict(self._fitted_mask_vae["weights"])
            latent_scale = self._fitted_mask_vae["latent_scale"]
        latent = int(vae.config.latent_channels)
        widths = tuple(self.unet_cfg["block_out_channels"])
        unet = UNet2DModel(in_channels=latent, out_channels=latent, block_out_channels=widths,
                           layers_per_block=int(self.unet_cfg["layers_per_block"]),
                           down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                           norm_num_groups=int(self.unet_cfg["norm_num_groups"]), add_attention=True)
        widen_input_conv(unet)
        scheduler = DDPMScheduler(num_train_timesteps=1000,
                                  beta_schedule=self.cfg.get("beta_schedule", "scaled_linear"))
        return LeafNetwork(vae, unet, scheduler, self.prediction, self.in_channels, self.num_classes,
                           grey_masks=False, latent_scale=latent_scale,
                           inference_seed=int(self.cfg.get("inference_seed", 0)))

    def _tiny_vae(self) -> AutoencoderKL:
        widths = tuple(self.vae_cfg["block_out_channels"])
        return AutoencoderKL(in_channels=self.num_classes, out_channels=self.num_classes,
                             down_block_types=("DownEncoderBlock2D",) * len(widths),
                             up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                             layers_per_block=int(self.vae_cfg["layers_per_block"]),
                             latent_channels=int(self.vae_cfg["latent_channels"]),
                             norm_num_groups=int(self.vae_cfg["norm_num_groups"]),
                             # a mask has no long-range texture to attend to; the attention cost 15 % of a step
                             mid_block_add_attention=False)

    def _pretrained_network(self) -> LeafNetwork:
        """SD's VAE, UNet (input widened) and noise schedule, and the empty prompt's text embedding."""
        from ..generator.model import load_parts

        root = Path(self.pretrained)
        if not (root / "vae").is_dir() or not (root / "unet").is_dir():
            raise InputDataError(root, "not a Stable Diffusion directory (needs vae/ and unet/)")
        has_text = (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir()
        parts = load_parts(root, has_vae=True, has_text=has_text)
        unet = parts["unet"]
        widen_input_conv(unet)
        null_prompt = None
        if getattr(unet.config, "cross_attention_dim", None):
            if not has_text:
                raise InputDataError(root, "the UNet reads a prompt, but there is no text_encoder/ and tokenizer/ "
                                     "for the empty prompt's embedding")
            tokens = parts["tokenizer"]([""], padding="max_length", max_length=parts["tokenizer"].model_max_length,
                                        return_tensors="pt")
            with torch.no_grad():
                null_prompt = parts["text_encoder"](tokens.input_ids)[0]
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
        vae = parts["vae"]
        return LeafNetwork(vae, unet, scheduler, self.prediction, self.in_channels, self.num_classes,
                           grey_masks=True, latent_scale=float(vae.config.scaling_factor),
                           inference_seed=int(self.cfg.get("inference_seed", 0)), null_prompt=null_prompt)

    @property
    def size_divisor(self) -> int:
        if self.pretrained:
            from diffusers import UNet2DConditionModel

            vae_blocks = len(AutoencoderKL.load_config(Path(self.pretrained) / "vae")["block_out_channels"])
            unet_blocks = len(UNet2DConditionModel.load_config(Path(self.pretrained) / "unet")["block_out_channels"])
        else:
            vae_blocks, unet_blocks = len(self.vae_cfg["block_out_channels"]), len(self.unet_cfg["block_out_channels"])
        return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)

    # --- training -----------------------------------------------------------------------------------------------

    def train(self, images: np.ndarray, masks: np.ndarray, checkpoint_dir, seed: int,
              log_every: int = 50, synthetic_from: int | None = None) -> dict:
        self.check_inputs(images, masks)
        if len(images) == 0:
            raise ValueError(f"{self.kind}: no training samples")
        self._seed = int(seed)
        vae_stats = {} if self.pretrained else self._fit_mask_vae(masks, Path(checkpoint_dir), seed, log_every)
        stats = super().train(images, masks, Path(checkpoint_dir) / "segmenter", seed, log_every, synthetic_from)
        return {**stats, **vae_stats}

    def train_continue(self, real, synthetic, validation, init_dir, checkpoint_dir, seed: int,
                       log_every: int = 50) -> dict:
        self._seed = int(seed)
        return super().train_continue(real, synthetic, validation, init_dir, checkpoint_dir, seed, log_every)

    def _fit_mask_vae(self, masks: np.ndarray, checkpoint_dir: Path, seed: int, log_every: int) -> dict:
        """Fit the tiny mask VAE to the training masks (cross-entropy of the decoded logits + ``kl_weight`` · KL),
        set its latent scale, and keep it in ``checkpoint_dir/mask_vae.pt`` so a resumed job skips the fit."""
        done = checkpoint_dir / "mask_vae.pt"
        if done.exists():
            self._fitted_mask_vae = torch.load(done, map_location="cpu", weights_only=False)
            return self._fitted_mask_vae["stats"]
        options = self.vae_cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = self._tiny_vae().to(self.device)
        optimiser = torch.optim.AdamW(vae.parameters(), lr=float(options["lr"]))
        checkpointer = Checkpointer(checkpoint_dir / "mask_vae", int(self.cfg["checkpoint_every"]),
                                    {"vae": vae, "optimizer": optimiser})
        start = checkpointer.restore()
        def coder(batch):
            return mask_vae_input(batch, self.num_classes, self.num_classes, grey=False)

        total, batch_size = int(options["steps"]), int(options["batch_size"])
        vae.train()
        loss = None
        for step in range(start, total):
            index = step_rng(seed, step, MASK_VAE_STREAM).integers(0, len(masks), size=batch_size)
            batch = torch.from_numpy(masks[index].astype(np.int64)).to(self.device)
            posterior = vae.encode(coder(batch)).latent_dist
            latent = posterior.sample(generator=step_torch_generator(seed, step, MASK_VAE_STREAM))
            logits = vae.decode(latent).sample
            loss = F.cross_entropy(logits, batch) + float(options["kl_weight"]) * posterior.kl().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if log_every and (step + 1) % log_every == 0:
                log.info("leaf mask VAE step %d/%d loss %.4f", step + 1, total, float(loss.detach()))
            checkpointer.maybe_save(step + 1, total)
        vae.eval()
        latents, dice = [], []
        with torch.no_grad():
            for begin in range(0, len(masks), 64):
                batch = torch.from_numpy(masks[begin:begin + 64].astype(np.int64)).to(self.device)
                latent = vae.encode(coder(batch)).latent_dist.mode()
                latents.append(latent.flatten().cpu())
                dice.append(vae.decode(latent).sample.argmax(1).cpu().numpy())
        latent_scale = float(1.0 / torch.cat(latents).std())
        reconstruction = mean_foreground_dice(np.concatenate(dice), masks, self.num_classes)
        stats = {"mask_vae_steps": total, "mask_vae_final_loss": None if loss is None else float(loss.detach()),
                 "mask_vae_latent_scale": latent_scale, "mask_vae_reconstruction_dice": reconstruction}
        log.info("leaf mask VAE: latent scale %.3f, reconstruction Dice on the training masks %.4f",
                 latent_scale, reconstruction)
        self._fitted_mask_vae = {"weights": {k: v.cpu() for k, v in vae.state_dict().items()},
                                 "latent_scale": latent_scale, "stats": stats}
        with atomic_path(done) as tmp:
            torch.save(self._fitted_mask_vae, tmp)
        return stats

    def training_forward(self, network: LeafNetwork, images: torch.Tensor, masks: torch.Tensor,
                         generator: torch.Generator) -> dict:
        z_mask = network.encode_mask(masks[:, 0])
        timesteps = torch.randint(0, network.noise_scheduler.config.num_train_timesteps, (len(images),),
                                  generator=generator).to(z_mask.device)
        noise = torch.randn(z_mask.shape, generator=generator).to(z_mask.device)
        z_t = network.noise_scheduler.add_noise(z_mask, noise, timesteps)
        with self._captured_block(network) as captured:
            prediction = network.denoise(network.encode_image(images), z_t, timesteps)
        target = {"epsilon": noise, "v": network.noise_scheduler.get_velocity(z_mask, noise, timesteps),
                  "x0": z_mask}[self.prediction]
        output = {"prediction": prediction, "target": target}
        if self.align_cfg is not None:
            features = captured[0]
            output["projected"] = self.alignment_head(features.flatten(2).transpose(1, 2))
            output["teacher"] = self._teacher_features(images, features.shape[-2:])
        return output

    def training_loss(self, output: dict, masks: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(output["prediction"].float(), output["target"].float())  # eq. 4, SDSeg's L1
        if self.align_cfg is not None:  # eq. 6
            loss = loss + float(self.align_cfg["weight"]) * alignment_loss(output["projected"], output["teacher"])
        return loss

    # --- feature alignment --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _captured_block(self, network: LeafNetwork):
        """While training with alignment, the output of UNet down block ``align.block`` lands in the yielded list."""
        captured: list[torch.Tensor] = []
        if self.align_cfg is None:
            yield captured
            return
        blocks = network.unet.down_blocks
        index = int(self.align_cfg["block"])
        if not 0 <= index < len(blocks):
            raise ConfigError("leaf.align.block", f"{index}: the UNet has down blocks 0..{len(blocks) - 1}")
        handle = blocks[index].register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            yield captured
        finally:
            handle.remove()

    def teacher(self) -> nn.Module:
        """The frozen vision encoder: a ``transformers`` model from ``align.encoder`` (a directory), or the seeded
        random DINOv2-architecture ViT its sizes describe."""
        if self._teacher is None:
            spec = self.align_cfg["encoder"]
            if isinstance(spec, str):
                from transformers import AutoModel

                if not Path(spec).is_dir():
                    raise InputDataError(spec, "leaf.align.encoder: not a directory of a vision encoder")
                model = AutoModel.from_pretrained(spec)
            else:
                from transformers import Dinov2Config, Dinov2Model

                hidden = int(spec["hidden_size"])
                config = Dinov2Config(hidden_size=hidden, num_hidden_layers=int(spec["num_layers"]),
                                      num_attention_heads=int(spec["num_heads"]), intermediate_size=4 * hidden,
                                      patch_size=int(spec["patch_size"]), image_size=int(spec.get("image_size", 64)))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_ENCODER_SEED)
                    model = Dinov2Model(config)
            self._teacher = model.eval().requires_grad_(False).to(self.device)
        return self._teacher

    @torch.no_grad()
    def _teacher_features(self, images: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """h = f(x): the encoder's last hidden state on the clean image, its patch tokens on a ``grid`` patch grid."""
        teacher = self.teacher()
        patch = int(teacher.config.patch_size)
        pixels = F.interpolate(images.float(), size=(grid[0] * patch, grid[1] * patch), mode="bilinear",
                               align_corners=False, antialias=True)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGE_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=pixels.device).view(1, 3, 1, 1)
        hidden = teacher(pixel_values=(pixels - mean) / std).last_hidden_state
        return hidden[:, -grid[0] * grid[1]:]

    def _alignment_head(self, network: LeafNetwork) -> nn.Module:
        """REPA's projector φ: block features (C) → encoder features (D), built from the run's seed in a forked RNG
        so that switching alignment on changes nothing else of the run."""
        channels = int(network.unet.config.block_out_channels[int(self.align_cfg["block"])])
        width = int(self.align_cfg["projector_dim"])
        dim = int(self.teacher().config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed)
            return nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim)).to(self.device)

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        if self.align_cfg is None:
            return {}
        if self.alignment_head is None:
            self.alignment_head = self._alignment_head(self._trained_network())
        return {"alignment_head": self.alignment_head}

    def _write_weights(self, directory: Path) -> None:
        super()._write_weights(directory)
        if self.alignment_head is not None:
            torch.save(self.alignment_head.state_dict(), directory / ALIGNMENT_FILE)

    def load_alignment_head(self, model_dir) -> nn.Module:
        """The saved projector of an aligned model (inspection only: prediction never uses it)."""
        path = Path(model_dir) / ALIGNMENT_FILE
        if self.align_cfg is None or not path.exists():
            raise InputDataError(path, "this LEAF model was trained without feature alignment")
        self.alignment_head = self._alignment_head(self._trained_network())
        self.alignment_head.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return self.alignment_head


def inference_seed_stability(model_dir, data_dir, seeds: Sequence[int], out_path=None, threads: int = 1):
    """LEAF Table 4: the trained model on the test split once per inference seed (its z_T); per seed, the mean over
    test samples of the mean foreground Dice and IoU. Returns (and writes) the per-seed frame."""
    import pandas as pd

    from ..data.canonical import load_split
    from ..evaluation import dice_scores, iou_scores, predict_labels
    from ..io import write_parquet
    from ..training import set_torch_threads
    from . import load_segmenter

    set_torch_threads(threads)
    segmenter = load_segmenter(model_dir)
    if not isinstance(segmenter, LEAF):
        raise ConfigError("analyses.leaf.stability", f"{model_dir} is a {segmenter.kind} model; only a diffusion "
                          "segmenter (leaf) depends on an inference seed")
    test = load_split(data_dir, "test")
    records = []
    for seed in seeds:
        segmenter.network.inference_seed = int(seed)
        labels = predict_labels(segmenter, test.images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a sample without foreground has a NaN mean
            dice = np.nanmean(np.nanmean(dice_scores(labels, test.masks, segmenter.num_classes), axis=1))
            iou = np.nanmean(np.nanmean(iou_scores(labels, test.masks, segmenter.num_classes), axis=1))
        records.append({"seed": int(seed), "dice": float(dice), "iou": float(iou)})
    frame = pd.DataFrame(records)
    if out_path is not None:
        write_parquet(out_path, frame)
    return frame
