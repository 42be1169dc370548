"""What every long trainer shares: per-step randomness, step-interval checkpoints and resume.

Randomness is derived from ``(seed, step)`` rather than carried in a stateful generator, so a run
resumed from a checkpoint at step ``s`` draws exactly the batches and noise an uninterrupted run
would have drawn: killed-and-resumed training ends at the same step count with the same weights.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path, json_value, read_json, write_json
from .workflow import set_torch_threads  # noqa: F401  (re-exported for the trainers)

log = logging.getLogger(__name__)


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """A numpy generator for one training step (batch indices, augmentations)."""
    return np.random.default_rng([seed, step, stream])


def step_torch_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU torch generator for one training step (noise, timesteps, dropout of the prompt)."""
    seq = np.random.SeedSequence([seed, step, stream, 0x5E65])
    return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))


def default_device() -> torch.device:
    """The GPU when there is one (a cluster job with gpu=1), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs_fingerprint(paths) -> str:
    """A hash of the files under ``paths`` (relative path, size, modification time): a retrained generator or
    f_θ gives another fingerprint, so checkpoints made from the old one are not reused. ``None`` entries count
    as absent inputs."""
    digest = hashlib.sha256()
    for root in paths:
        if root is None:
            digest.update(b"-")
            continue
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            stat = path.stat()
            digest.update(f"{path.relative_to(root.parent)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def claim_checkpoint_dir(directory, job: dict) -> Path:
    """``directory``, ready to hold the checkpoints of ``job``: what decides the job's result (its config, seed
    and ``inputs_fingerprint``), recorded in ``job.json``.

    A directory left by another job is emptied first, never resumed: Snakemake reruns a job whose config, code
    or inputs changed, and the checkpoint of the killed run it replaces (a beside-the-output ``<out>.ckpt``
    Snakemake does not know about) would otherwise continue under the new settings, or fail to load when its
    format changed. A directory without ``job.json`` predates this record and is emptied too."""
    directory = Path(directory)
    job = json_value(job)
    job_file = directory / "job.json"
    if directory.exists() and (not job_file.exists() or read_json(job_file) != job):
        log.info("discarding the checkpoints in %s: they belong to another job (its config, seed or inputs "
                 "differ)", directory)
        shutil.rmtree(directory)
    if not job_file.exists():
        write_json(job_file, job)
    if _claims:  # inside a ``releases_unused_claims`` call: the innermost one releases it if it fails
        _claims[-1].append(directory)
    return directory


_claims: list[list[Path]] = []  # per running ``releases_unused_claims`` call, the directories it claimed


def releases_unused_claims(trainer):
    """Decorates a trainer: when it fails, the checkpoint directories it claimed that still hold nothing but
    ``job.json`` are removed, so bad input found after the claim (a corrupt split, a config mismatch) leaves no
    ``<out>.ckpt`` behind; a directory holding a checkpoint stays for the rerun to resume."""
    @functools.wraps(trainer)
    def run(*args, **kwargs):
        _claims.append([])
        try:
            return trainer(*args, **kwargs)
        except BaseException:
            for directory in _claims[-1]:
                if directory.is_dir() and [p.name for p in directory.iterdir()] == ["job.json"]:
                    shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            _claims.pop()
    return run


class Checkpointer:
    """Saves ``state_dict``s of the given objects every ``every`` steps into ``directory/last.pt``.

    ``restore`` returns the step to resume from (0 for a fresh run). A checkpoint is written atomically,
    so a kill during the save leaves the previous checkpoint intact.
    """

    def __init__(self, directory, every: int, objects: dict):
        self.path = Path(directory) / "last.pt"
        self.every = int(every)
        self.objects = objects

    def restore(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for name, obj in self.objects.items():
            obj.load_state_dict(state["objects"][name])
        log.info("resumed from %s at step %d", self.path, state["step"])
        return int(state["step"])

    def save(self, step: int, extra: dict | None = None) -> None:
        state = {"step": step, "objects": {n: o.state_dict() for n, o in self.objects.items()}}
        if extra:
            state["extra"] = extra
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def due(self, step: int, total: int) -> bool:
        """Whether ``maybe_save`` saves after ``step`` completed steps (a loop flushes what it buffers first)."""
        return self.every > 0 and step % self.every == 0 and step < total

    def maybe_save(self, step: int, total: int) -> None:
        """Save after ``step`` completed steps when on the interval (the final step is saved by the caller's output)."""
        if self.due(step, total):
            self.save(step)


class TrainingRecords:
    """A training loop's per-step records (losses, statistics), checkpointed with its state_dicts.

    The summary a trainer writes (final loss as the mean of the last 50 steps, the LAW ablation's first and
    last 50-step means) reads these records, so a resumed run needs the steps before its kill too, or its
    summary would cover only the steps after it. ``containers`` are the loop's own lists, deques or dicts of
    them, restored in place.
    """

    def __init__(self, **containers):
        self.containers = containers

    def state_dict(self) -> dict:
        return copy.deepcopy(self.containers)

    def load_state_dict(self, state: dict) -> None:
        for name, saved in state.items():
            target = self.containers[name]
            target.clear()
            (target.update if isinstance(target, dict) else target.extend)(saved)


class TrainingBatches:
    """Seeded training batches of a split's arrays: images scaled to [-1, 1] and masks, the indices of step
    ``s`` from ``step_rng(seed, s, stream)``, a horizontal flip with probability ½ drawn first from
    ``step_torch_generator(seed, s, stream)``, which ``draw`` returns for the step's further noise — so a
    resumed run draws what an uninterrupted one does."""

    def __init__(self, data, hflip: bool, source=None):
        if len(data.images) == 0:
            from .errors import InputDataError

            raise InputDataError(source or "training data", "the train split is empty")
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)) * 2 - 1
        self.masks = torch.from_numpy(np.ascontiguousarray(data.masks))
        self.hflip = hflip

    def draw(self, seed: int, step: int, batch_size: int, stream: int = 0):
        idx = step_rng(seed, step, stream).integers(0, len(self.images), size=batch_size)
        images, masks = self.images[idx], self.masks[idx]
        g = step_torch_generator(seed, step, stream)
        if self.hflip:
            flip = torch.rand(batch_size, generator=g) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
        return images, masks, g
