"""The mask-to-image generator: a ControlNet on a UNet2DConditionModel (+ AutoencoderKL), all diffusers classes.

Two ways to build one, one way to load it:
- ``build_generator(cfg, ...)`` with ``cfg["pretrained"]`` unset makes a tiny, randomly initialised model that
  works in pixel space (no VAE: a random VAE decodes noise, and training one costs more CPU time than the pixel
  UNet saves) and encodes the class prompt with a learned embedding table; as pixel-space DDPMs do, its
  scheduler clips the Tweedie estimate x̂0 to the image range [-1, 1] during sampling;
- with ``cfg["pretrained"]`` set to a Stable Diffusion directory (or hub id on a machine that has one cached) it
  loads UNet, VAE, CLIP text encoder and tokenizer with ``from_pretrained`` and initialises the ControlNet from the
  UNet, as diffusers' ``train_controlnet.py`` does; it then works in the VAE's latent space.
- ``MaskToImageGenerator.load(directory)`` reads back what ``save`` wrote (diffusers ``save_pretrained`` layout).

What the network predicts is its scheduler's ``prediction_type``: ε (Stable Diffusion 1.x), v (SD 2.x, and the
tiny default: v-prediction learns clean backgrounds in a few hundred CPU steps where ε-prediction leaves grain)
or x0. ``predict_noise`` always returns ε, converted with the schedule's ᾱ_t, so every sampler, the Miner and
VGD work on any of them unchanged.

A tiny generator can start from a saved one (``init``: a checkpoint shipped in ``segsynth/pretrained/``, as
nilearn ships its template, or a directory ``save`` wrote) and fine-tune it; the embedded default does.

Conditioning: the one-hot mask goes into the ControlNet (``conditioning: controlnet``, always with a pretrained
SD); a tiny generator can instead take it as extra input channels of its UNet (``conditioning: concat``: no
ControlNet copy of the encoder to run, and no zero-initialised path the mask has to grow through, so a
from-scratch model follows its masks sooner). The class prompt names the foreground classes present
in the mask ("... showing csf, gm"). With the embedding table the prompt is a sequence of one token per
foreground class, the class's embedding where present and a learned null token where absent; the
unconditional prompt for classifier-free guidance is all null tokens (the empty string for CLIP).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from ..errors import ConfigError
from ..io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

GENERATOR_META = "generator.json"


class ClassPromptEmbedding(torch.nn.Module):
    """Learned prompt encoder for tiny models: one token per foreground class, a null token where it is absent."""

    def __init__(self, num_foreground: int, dim: int):
        super().__init__()
        self.class_tokens = torch.nn.Parameter(torch.randn(num_foreground, dim) * 0.02)
        self.null_token = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, present: torch.Tensor) -> torch.Tensor:
        """``present``: (B, K-1) bool, which foreground classes the prompt names → (B, K-1, dim)."""
        p = present.to(self.class_tokens.dtype).unsqueeze(-1)
        return p * self.class_tokens.unsqueeze(0) + (1 - p) * self.null_token.view(1, 1, -1)


class MaskToImageGenerator(torch.nn.Module):
    """A frozen-or-trainable mask-to-image diffusion model with the few operations samplers need.

    Images are in [-1, 1] (the generator's range); ``x`` denotes the diffusion variable, which is the image in
    pixel space and the VAE latent in latent space.
    """

    def __init__(self, unet, controlnet, noise_scheduler, meta: dict, vae=None, prompt_embedding=None,
                 text_encoder=None, tokenizer=None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.prompt_embedding = prompt_embedding
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.meta = meta

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_space(self) -> bool:
        return self.vae is not None

    def sampling_scheduler(self) -> DDIMScheduler:
        """A DDIM scheduler with the training noise schedule (diffusers' ``from_config`` carries the betas); it
        reads ε, which ``predict_noise`` returns whatever the network predicts."""
        if self.meta.get("flow"):
            # a rectified flow (segsynth.victr): "trailing" spacing starts its first step at σ ≈ 1, so 1-4 steps
            # integrate from pure noise (the default "leading" spacing would start 1 step at t = 0)
            return DDIMScheduler.from_config(self.noise_scheduler.config, prediction_type="epsilon",
                                             timestep_spacing="trailing")
        return DDIMScheduler.from_config(self.noise_scheduler.config, prediction_type="epsilon")

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.meta["resolution"]
        if self.vae is None:
            return (batch, self.channels, h, w)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (batch, self.vae.config.latent_channels, h // factor, w // factor)

    # -- conditioning -----------------------------------------------------------------------------------------
    def mask_condition(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, H, W) class indices → (B, K, H, W) one-hot float, the ControlNet's conditioning image."""
        return F.one_hot(masks.to(self.device).long(), self.num_classes).permute(0, 3, 1, 2).float()

    def prompt_text(self, present: torch.Tensor) -> list[str]:
        names = self.class_names[1:]
        template = self.meta.get("prompt_template", "{classes}")
        return [template.format(classes=", ".join(n for n, p in zip(names, row) if p)) for row in present.tolist()]

    def encode_prompt(self, masks: torch.Tensor, unconditional: bool = False) -> torch.Tensor:
        """The class prompt of each mask (or the unconditional prompt) as encoder hidden states."""
        masks = masks.to(self.device)
        present = torch.stack([(masks == c).flatten(1).any(1) for c in range(1, self.num_classes)], dim=1)
        if unconditional:
            present = torch.zeros_like(present)
        if self.prompt_embedding is not None:
            return self.prompt_embedding(present)
        texts = [""] * len(present) if unconditional else self.prompt_text(present)
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    # -- the denoiser -----------------------------------------------------------------------------------------
    def model_output(self, x_t: torch.Tensor, t, cond_image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output (its scheduler's ``prediction_type``): the mask enters through the
        ControlNet's residuals, or, for a tiny generator with ``conditioning: concat``, as extra input channels."""
        if self.controlnet is None:
            return self.unet(torch.cat([x_t, cond_image.to(x_t.dtype)], dim=1), t, encoder_hidden_states=prompt,
                             return_dict=False)[0]
        down, mid = self.controlnet(x_t, t, encoder_hidden_states=prompt, controlnet_cond=cond_image,
                                    conditioning_scale=1.0, return_dict=False)
        return self.unet(x_t, t, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def predict_noise(self, x_t: torch.Tensor, t, cond_image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """ε_φ(x_t, t | mask, prompt), whatever the network predicts: every sampler works in ε. A v- or
        x0-predicting network's output is converted with the training schedule's ᾱ_t (ε = √ᾱ v + √(1−ᾱ) x_t,
        ε = (x_t − √ᾱ x̂0)/√(1−ᾱ)), so DDIM's x̂0 from this ε is the network's own."""
        if self.meta.get("flow"):
            return self._flow_noise(x_t, t, cond_image, prompt)
        out = self.model_output(x_t, t, cond_image, prompt).to(x_t.dtype)  # schedulers work in float32 under autocast
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        alpha_bar = self._alphas_cumprod(x_t.device)[torch.as_tensor(t, device=x_t.device).long()]
        alpha_bar = alpha_bar.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        if kind == "v_prediction":
            return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x_t
        return (x_t - alpha_bar.sqrt() * out) / (1 - alpha_bar).sqrt()

    def _flow_noise(self, x_t: torch.Tensor, t, cond_image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """A rectified-flow generator (segsynth.victr) served in ε at the timesteps of its reference
        variance-preserving schedule: x_VP = √ᾱ·x0 + √(1−ᾱ)·ε is the flow's x_σ = (1 − σ)·x0 + σ·ε scaled by
        √ᾱ + √(1−ᾱ), σ = √(1−ᾱ) / (√ᾱ + √(1−ᾱ)); both share ε, so DDIM on this schedule is the flow's Euler
        sampler (on that σ grid) and every sampler, VGD and the Miner run on the flow unchanged."""
        from ..victr import NUM_TRAIN_TIMESTEPS, noise_estimate, velocity_from_output

        alpha_bar = self._alphas_cumprod(x_t.device)[torch.as_tensor(t, device=x_t.device).long()].to(x_t.dtype)
        alpha_bar = alpha_bar.expand(len(x_t)) if alpha_bar.ndim == 0 else alpha_bar
        scale = alpha_bar.sqrt() + (1 - alpha_bar).sqrt()
        sigma = (1 - alpha_bar).sqrt() / scale
        x_flow = x_t / scale.view(-1, *([1] * (x_t.ndim - 1)))
        out = self.model_output(x_flow, sigma * NUM_TRAIN_TIMESTEPS, cond_image, prompt).to(x_t.dtype)
        velocity = velocity_from_output(out, x_flow, sigma, self.meta["flow"]["tweedie"])
        return noise_estimate(x_flow, velocity, sigma)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``model_output`` is trained to match at (x0, ε, t): ε, v (diffusers' ``get_velocity``) or x0."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return x0

    def _alphas_cumprod(self, device) -> torch.Tensor:
        """The schedule's ᾱ on ``device``, copied there once (no host transfer per denoiser call)."""
        cached = getattr(self, "_alphas_cumprod_cache", None)
        if cached is None or cached.device != torch.device(device):
            cached = self.noise_scheduler.alphas_cumprod.to(device)
            self._alphas_cumprod_cache = cached
        return cached

    def guided_noise(self, x_t, t, cond_image, prompt, uncond_prompt, guidance_scale: float,
                     mask_guidance_scale: float = 1.0) -> torch.Tensor:
        """Classifier-free guidance on the prompt (``guidance_scale``) and on the mask (``mask_guidance_scale``,
        for generators trained with ``mask_dropout``); every pass shares one batched call.

        Prompt only: ε(m, ∅) + s_p·(ε(m, c) − ε(m, ∅)). Mask (the whole condition) only: ε(∅, ∅) +
        s_m·(ε(m, c) − ε(∅, ∅)). Both: InstructPix2Pix's two-condition rule (Brooks et al. 2023, eq. 3),
        ε(∅, ∅) + s_m·(ε(m, ∅) − ε(∅, ∅)) + s_p·(ε(m, c) − ε(m, ∅)).
        """
        on_prompt, on_mask = guidance_scale != 1.0, mask_guidance_scale != 1.0
        if uncond_prompt is None or not (on_prompt or on_mask):
            return self.predict_noise(x_t, t, cond_image, prompt)
        passes = [(cond_image, prompt)]
        if on_mask:
            passes.append((self.null_condition(cond_image), uncond_prompt))
        if on_prompt:
            passes.append((cond_image, uncond_prompt))
        n = len(passes)
        if torch.is_tensor(t) and t.ndim:  # one timestep per sample: repeat it with the batch
            t = t.repeat(n)
        eps = self.predict_noise(torch.cat([x_t] * n), t, torch.cat([c for c, _ in passes]),
                                 torch.cat([p for _, p in passes])).chunk(n)
        if not on_mask:
            return eps[1] + guidance_scale * (eps[0] - eps[1])
        if not on_prompt:
            return eps[1] + mask_guidance_scale * (eps[0] - eps[1])
        return eps[1] + mask_guidance_scale * (eps[2] - eps[1]) + guidance_scale * (eps[0] - eps[2])

    @staticmethod
    def null_condition(cond_image: torch.Tensor) -> torch.Tensor:
        """The "no mask" condition of mask dropout and mask guidance: all channels zero, which no one-hot mask
        is (every pixel of a mask has exactly one class channel at 1)."""
        return torch.zeros_like(cond_image)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion variable → image in [-1, 1] (identity in pixel space)."""
        if self.vae is None:
            return x
        image = self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False)[0].to(x.dtype)
        if image.shape[1] != self.channels:  # an RGB VAE serving a grey dataset
            image = image.mean(dim=1, keepdim=True)
        return image

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [-1, 1] → diffusion variable (a latent sample in latent space: the posterior's mean + std·ε,
        ε from ``generator`` as diffusers' ``latent_dist.sample`` draws it, or the given standard normal
        ``noise`` of the latent's shape)."""
        if self.vae is None:
            return images
        if images.shape[1] != self.vae.config.in_channels:
            images = images.expand(-1, self.vae.config.in_channels, -1, -1)
        dist = self.vae.encode(images).latent_dist
        latent = dist.sample(generator) if noise is None else dist.mean + dist.std * noise.to(dist.mean)
        return (latent * self.vae.config.scaling_factor).to(images.dtype)

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, directory, stats: dict | None = None, extra_modules: dict | None = None) -> None:
        """Write every part in diffusers' ``save_pretrained`` layout (and training ``stats``), atomically.
        ``extra_modules`` (name → module) are training companions kept beside it as ``<name>.pt`` state dicts
        (LAW's φ, for its figure); loading the generator ignores them."""
        with atomic_dir(directory) as tmp:
            if stats is not None:
                write_json(tmp / "train_stats.json", stats)
            for name, module in (extra_modules or {}).items():
                torch.save(module.state_dict(), tmp / f"{name}.pt")
            self.unet.save_pretrained(tmp / "unet")
            if self.controlnet is not None:
                self.controlnet.save_pretrained(tmp / "controlnet")
            self.noise_scheduler.save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae")
            if self.prompt_embedding is not None:
                torch.save(self.prompt_embedding.state_dict(), tmp / "prompt_embedding.pt")
            if self.text_encoder is not None:
                self.text_encoder.save_pretrained(tmp / "text_encoder")
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            write_json(tmp / GENERATOR_META, self.meta)

    @classmethod
    def load(cls, directory) -> "MaskToImageGenerator":
        """Load a saved generator with ``from_pretrained``; the result is frozen and in eval mode."""
        directory = Path(directory)
        meta = read_json(directory / GENERATOR_META)
        parts = load_parts(directory, has_vae=(directory / "vae").exists(),
                            has_text=(directory / "text_encoder").exists())
        parts["controlnet"] = (ControlNetModel.from_pretrained(directory / "controlnet")
                               if (directory / "controlnet").exists() else None)
        parts["noise_scheduler"] = DDPMScheduler.from_pretrained(directory / "scheduler")
        if parts["text_encoder"] is None:
            emb = ClassPromptEmbedding(len(meta["class_names"]) - 1, meta["cross_attention_dim"])
            emb.load_state_dict(torch.load(directory / "prompt_embedding.pt", map_location="cpu"))
            parts["prompt_embedding"] = emb
        gen = cls(meta=meta, **parts)
        gen.requires_grad_(False)
        return gen.eval()


def load_parts(root, has_vae: bool, has_text: bool) -> dict:
    """UNet, VAE, text encoder and tokenizer with ``from_pretrained`` from an SD-layout directory or hub id."""
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {"unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
             "vae": None, "text_encoder": None, "tokenizer": None}
    if has_vae:
        parts["vae"] = AutoencoderKL.from_pretrained(root, subfolder="vae")
    if has_text:
        parts["text_encoder"] = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    return parts


def build_generator(cfg: dict, class_names: list[str], channels: int, resolution, seed: int,
                    prompt_template: str = "{classes}") -> MaskToImageGenerator:
    """A trainable generator as the config entry describes it (tiny random-init, or loaded from ``pretrained``).

    ``prompt_template`` is the dataset's, e.g. "a T1-weighted brain MRI slice showing {classes}"."""
    torch.manual_seed(seed)
    num_classes = len(class_names)
    meta = {"class_names": list(class_names), "channels": int(channels),
            "resolution": [int(r) for r in resolution], "prompt_template": prompt_template}
    pretrained = cfg.get("pretrained")
    if pretrained:
        parts = load_parts(pretrained, has_vae=True, has_text=True)
        unet = parts["unet"]
        factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
        if any(r % factor for r in meta["resolution"]):
            raise ConfigError("generators.*.pretrained", f"resolution {meta['resolution']} is not divisible by "
                              f"the VAE's downsampling factor {factor}")
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
        prompt_embedding = None
    else:
        concat = cfg.get("conditioning", "controlnet") == "concat"
        unet = _tiny_unet(cfg["unet"], channels, meta["resolution"], extra_inputs=num_classes if concat else 0)
        parts = {"vae": None, "text_encoder": None, "tokenizer": None}
        factor = 1
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg["beta_schedule"],
                                        prediction_type=cfg.get("prediction_type", "epsilon"), clip_sample=True)
        prompt_embedding = ClassPromptEmbedding(num_classes - 1, cfg["unet"]["cross_attention_dim"])
        if concat:
            meta["conditioning"] = "concat"
            meta["cross_attention_dim"] = int(unet.config.cross_attention_dim)
            generator = MaskToImageGenerator(unet=unet, controlnet=None, noise_scheduler=noise_scheduler, meta=meta,
                                             prompt_embedding=prompt_embedding)
            if cfg.get("init"):
                _load_init(generator, cfg["init"])
            return generator
    # The conditioning embedding downsamples the mask by 2 per extra stage, to the UNet's input resolution: for
    # SD's 8× VAE the ControlNet paper's (and diffusers' default) 16-32-96-256, else doubling widths from 16.
    cond_channels = (16, 32, 96, 256) if factor == 8 else [16 * 2**i for i in range(int(np.log2(factor)) + 1)]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(cond_channels),
                                           conditioning_channels=num_classes)
    meta["cross_attention_dim"] = int(unet.config.cross_attention_dim)
    generator = MaskToImageGenerator(unet=unet, controlnet=controlnet, noise_scheduler=noise_scheduler, meta=meta,
                                     vae=parts["vae"], prompt_embedding=prompt_embedding,
                                     text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"])
    if cfg.get("init"):
        if pretrained:
            raise ConfigError("generators.*.init", "init starts a tiny generator from a saved one; a pretrained "
                              "Stable Diffusion generator starts from `pretrained`")
        _load_init(generator, cfg["init"])
    return generator


def _load_init(generator: MaskToImageGenerator, init: str) -> None:
    """Start a tiny generator from the weights of a saved one (``init``: a checkpoint shipped in
    ``segsynth/pretrained/`` or a directory ``save`` wrote), refusing one of another shape or dataset."""
    from ..config import generator_init_path

    directory = generator_init_path(init)
    if not (directory / GENERATOR_META).is_file():
        raise ConfigError("generators.*.init", f"{directory} is not a saved generator (no {GENERATOR_META})")
    saved = MaskToImageGenerator.load(directory)
    for key in ("class_names", "channels", "resolution", "conditioning"):
        if saved.meta.get(key) != generator.meta.get(key):
            raise ConfigError("generators.*.init", f"{directory} has {key} {saved.meta.get(key)!r}, this generator "
                              f"{generator.meta.get(key)!r}")
    for key in ("prediction_type", "beta_schedule", "num_train_timesteps"):
        if saved.noise_scheduler.config[key] != generator.noise_scheduler.config[key]:
            raise ConfigError("generators.*.init", f"{directory} was trained with {key} "
                              f"{saved.noise_scheduler.config[key]!r}, this generator has "
                              f"{generator.noise_scheduler.config[key]!r}")
    for name in ("unet", "controlnet", "prompt_embedding"):
        ours, theirs = getattr(generator, name), getattr(saved, name)
        if (ours is None) != (theirs is None):
            raise ConfigError("generators.*.init", f"{directory} has {'no ' if theirs is None else ''}{name}, "
                              f"this generator {'has' if ours is not None else 'has none'}")
        if ours is None:
            continue
        try:
            ours.load_state_dict(theirs.state_dict())
        except RuntimeError as error:  # another architecture (block widths, layers, attention)
            raise ConfigError("generators.*.init", f"{directory}: its {name} does not fit this generator's "
                              f"config: {str(error).splitlines()[0]}") from None


def _tiny_unet(cfg: dict, channels: int, resolution, extra_inputs: int = 0) -> UNet2DConditionModel:
    """A small UNet2DConditionModel with cross-attention only at the lowest resolution (full-resolution
    attention costs ~10× more per step on a CPU); ``extra_inputs`` conditioning channels are concatenated to
    its input."""
    widths = tuple(cfg["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=resolution[0], in_channels=channels + extra_inputs, out_channels=channels, block_out_channels=widths,
        layers_per_block=cfg["layers_per_block"],
        down_block_types=("DownBlock2D",) * (len(widths) - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (len(widths) - 1),
        cross_attention_dim=cfg["cross_attention_dim"], attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=cfg["norm_num_groups"])
