"""Numeric precision of the GPU stages: one config switch, ``precision``, read by every PyTorch job.

=========  =====================================================================================================
``fp32``   full float32: no autocast, TF32 off (bit-for-bit reference runs)
``tf32``   float32 storage, TF32 tensor-core matmuls and convolutions
``bf16``   TF32 plus bfloat16 autocast; frozen networks stored in bfloat16 (diffusers' ``train_controlnet.py``
           casts its frozen UNet/VAE/text encoder the same way); float16 on a GPU without bfloat16
``fp16``   TF32 plus float16 autocast with a gradient scaler for training
``auto``   ``bf16`` where the GPU has it, else ``fp16``
=========  =====================================================================================================

On a CPU every setting is float32 and changes nothing: CPU runs stay bit-identical whatever the config says.
Trainable weights, optimiser state, schedulers' arithmetic and everything written to disk stay float32.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "auto")


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_dtype(precision: str, device, cpu_autocast: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None means plain float32.

    ``cpu_autocast`` applies bf16/fp16 on a CPU too (bfloat16, the dtype CPU autocast supports): tests use it to
    run the reduced-precision code paths without a GPU; the workflow never sets it."""
    check(precision)
    device = torch.device(device)
    if precision in ("fp32", "tf32"):
        return None
    if device.type == "cuda":
        if precision == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if cpu_autocast else None


def configure(precision: str, device) -> None:
    """Process-wide switches of ``precision`` on ``device``: TF32 for every setting but ``fp32`` (CUDA only)."""
    check(precision)
    if torch.device(device).type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def autocast(dtype: torch.dtype | None, device):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for float16 training only (bfloat16 has float32's range)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
