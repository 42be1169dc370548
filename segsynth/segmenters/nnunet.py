"""nnU-Net v2 (Isensee et al. 2021) as a downstream segmenter and value model, kind ``nnunet``.

nnU-Net plans its own network, patch size, batch size and normalisation from the training data, so
``train`` goes through nnU-Net's own pipeline: the pooled (N,C,H,W) images are written as a nnU-Net
raw dataset inside the checkpoint directory (``<checkpoint_dir>/nnunet/nnUNet_raw/Dataset501_segsynth``:
one float32 2D TIFF per case and channel, read by nnU-Net's ``NaturalImage2DIO``, so no 8-bit
quantisation), then the fingerprint is extracted, the default ``ExperimentPlanner`` plans, the default
preprocessor preprocesses (in this process) and a trainer trains, all through the Python API.

Why not the CLI: nnU-Net finds trainers by name by importing every trainer module, and its Primus
trainers import timm → torchvision; this module constructs its trainer class and ``nnUNetPredictor``
itself, so no name lookup of a trainer ever happens.

Paths: nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` through objects
in ``nnunetv2.paths`` that many modules import by name. ``nnunet_paths`` swaps those objects, in
every loaded ``nnunetv2`` module, for fixed paths of one job and puts the originals back afterwards;
``os.environ`` is never written, so jobs in one process cannot see each other's folders.

Config keys (``DEFAULTS``): ``trainer`` ("standard": nnU-Net's ``nnUNetTrainer`` with its 1000
epochs × 250 iterations, subclassed only to write checkpoints atomically; "short": a subclass with
``epochs``, ``iterations_per_epoch``, ``val_iterations_per_epoch``), ``configuration`` (only "2d": the images are 2D), ``fold`` ("all":
train on every case, nnU-Net's "all" fold; or an integer fold of ``splits_final.json``),
``num_folds`` (folds of the real cases in ``splits_final.json``), ``checkpoint_every`` (nnU-Net's
``save_every``, in epochs), ``normalization`` (the nnU-Net channel name written to ``dataset.json``:
"zscore" — nnU-Net's default, as for MRI —, "ct", "noNorm", "rescale_to_0_1", or "rgb_to_0_1", for
which the images are exported on the 0–255 scale), ``use_mirroring`` and ``tile_step_size``
(prediction), ``data_workers`` (augmentation processes; null = the job's threads, i.e. torch's thread
count that the workflow sets from the rule's ``threads``; either way at most the CPUs this process may
run on, ``os.sched_getaffinity``: nnU-Net's own rule would start 12 per GPU, whatever the allocation),
``device`` (null = CUDA when available), ``steps`` (optional, "short" only: a budget of
iterations like the torch segmenters', rounded up to whole epochs; it replaces ``epochs``), ``compile``
(false: no ``torch.compile`` of the network and loss; true: compile on CUDA, where nnU-Net compiles by
default. The ``nnUNet_compile`` environment variable is not read).

On CUDA, training runs with ``cudnn.benchmark`` on and ``cudnn.deterministic`` off, as nnU-Net's
``run_training`` entry point sets them; both are put back afterwards, and CPU runs never touch them.

nnU-Net's final validation (``perform_actual_validation``: exporting predictions of the validation
cases through a spawned process pool) is not run; segsynth's evaluation scores the test split.

Splits: rows from ``synthetic_from`` on (argument of ``train``) are synthetic; ``splits_final.json`` puts
them in the training part of every fold, so validation (nnU-Net's pseudo Dice and ``checkpoint_best``) only
ever sees real cases. The test split never reaches ``train``.

Protocol ``continue`` (``train_continue``; segsynth.segmenters.protocol): the real + synthetic model continues
from the real-only model. The job's raw dataset holds the real training cases, the carved validation cases and
the synthetic cases; it is preprocessed with the real-only model's own plans (nnU-Net's way of fine-tuning,
cf. ``nnUNetv2_move_plans_between_datasets``: same network, patch and batch size, normalisation), not re-planned.
``splits_final.json`` holds one fold: train = real training + synthetic cases, val = the validation cases. The
trainer (``nnUNetTrainerSegsynth[Short]Continue``) runs ``continue_epochs`` epochs with nnU-Net's optimiser,
poly schedule, loss and augmentation, and differs in three places: (1) the network is initialised with every
weight of the real-only ``checkpoint_final.pth`` (``load_state_dict``, as nnU-Net's ``load_checkpoint`` does for
weights; nnU-Net's ``load_pretrained_weights`` would re-initialise the segmentation heads, which is meant for a
new label set); (2) its training data loader (``nnUNetPairedDataLoader``, built in place of
``nnUNetDataLoader`` only for the training split) draws the plans' batch size B from the real cases and B from
the synthetic ones, as the reference's two streams of ``batch_size_per_stream`` (4, the real batch size, in its
nnU-Net preset), foreground oversampling applied per stream; (3) ``train_step`` applies paired CutMix with
probability ``cutmix_p`` to the augmented batch (real ``i`` ↔ synthetic ``i``, one box for image and full-
resolution target; the deep-supervision targets are re-derived from the mixed target with nnU-Net's own
nearest-exact down-sampling). Validation is nnU-Net's own: the pseudo Dice of every epoch on the validation
cases and its EMA; ``checkpoint_best.pth`` (best EMA pseudo Dice) may be replaced only at epochs that are
multiples of ``val_every`` and at the last one, and is the saved model. Keys: ``protocol``, ``continue_epochs``
(default a tenth of the scratch epochs: 100 for the standard trainer, the reference's 100 of 1000; 0 keeps the
real-only model), ``val_fraction``, ``val_every`` (epochs, default 1), ``cutmix_p``.

Determinism: torch, numpy and ``random`` are seeded before the network is built, so with
``data_workers`` 0 on the CPU a training run is repeatable. Not repeatable: augmentation with worker
processes (nnU-Net's ``NonDetMultiThreadedAugmenter`` serves batches in arrival order), CUDA kernels
(cuDNN benchmarking and nnU-Net's mixed precision), and a resumed run: nnU-Net's checkpoint
holds weights, optimiser, epoch and logs but not the data loader's random state, so a resumed job ends
at the same epoch with different (equally valid) weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputDataError
from ..io import atomic_path, read_json, write_json
from ..training import default_device
from .base import Segmenter
from .protocol import NNUNET_PROTOCOL_KEYS, continue_options, cutmix_box, paired_cutmix, protocol_of

log = logging.getLogger(__name__)

DATASET_NAME = "Dataset501_segsynth"
PLANS_NAME = "nnUNetPlans"
FILE_ENDING = ".tif"
MODEL_SUBDIR = "nnunet"
PREPARED_FILE = "segsynth_prepared.json"
TRAINERS = ("standard", "short")  # config values → nnUNetTrainerSegsynth, nnUNetTrainerSegsynthShort
STANDARD_EPOCHS = 1000  # nnUNetTrainer's num_epochs
# nnU-Net channel names (nnunetv2.preprocessing.normalization.map_channel_name_to_normalization)
NORMALIZATIONS = {"zscore": "zscore", "ct": "CT", "nonorm": "noNorm", "rescale_to_0_1": "rescale_to_0_1",
                  "rgb_to_0_1": "rgb_to_0_1"}

DEFAULTS = {
    "trainer": "standard", "configuration": "2d", "fold": "all", "num_folds": 5, "checkpoint_every": 50,
    "epochs": 50, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50,
    "normalization": "zscore", "use_mirroring": True, "tile_step_size": 0.5, "data_workers": None,
    "device": None, "steps": None, "compile": False,
}


# --- nnU-Net paths, set per job -------------------------------------------------------------------


def _import_nnunet():
    """Import every nnU-Net module this module uses (slow: ~several seconds), before paths are patched.

    Importing them first matters: a module imported while ``nnunet_paths`` is active would keep the
    job's fixed paths; ``nnunet_paths`` also sweeps for such leftovers on exit.
    """
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor  # noqa: F401
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner  # noqa: F401
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401
    import nnunetv2.preprocessing.preprocessors.default_preprocessor  # noqa: F401
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
    import nnunetv2.utilities.crossval_split  # noqa: F401
    import nnunetv2.utilities.plans_handling.plans_handler  # noqa: F401


PATH_NAMES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _nnunet_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "nnunetv2" or name.startswith("nnunetv2."))]


class _InProcessMultiprocessing:
    """Stands in for the ``multiprocessing`` module of nnU-Net's fingerprint extractor and preprocessor:
    their ``get_context("spawn").Pool(n)`` becomes a thread pool, so no process is spawned (a spawned
    worker re-imports torch and nnU-Net, and re-runs the parent's ``__main__`` module)."""

    @staticmethod
    def get_context(method=None):
        import multiprocessing.dummy
        return multiprocessing.dummy


@contextlib.contextmanager
def nnunet_paths(raw, preprocessed, results, data_workers: int | None = None):
    """Point nnU-Net at these three folders inside the block, without touching ``os.environ``.

    ``nnunetv2.paths`` holds one object per folder that reads its environment variable when used, and
    modules bind those objects by name (``from nnunetv2.paths import nnUNet_raw``). Each binding in a
    loaded ``nnunetv2`` module is replaced by a fixed path of the same type and restored on exit.
    Inside the block nnU-Net's fingerprint/preprocessing pools run as threads in this process, and
    ``data_workers`` (when not None) replaces nnU-Net's choice of augmentation processes; the planner
    sizes its network with the caller's torch thread count.
    """
    _import_nnunet()
    import nnunetv2.paths as paths

    originals = {name: getattr(paths, name) for name in PATH_NAMES}
    env_path_type = type(originals["nnUNet_raw"])

    class FixedPath(env_path_type):
        def __init__(self, env_var_name: str, value: str):
            super().__init__(env_var_name, "")
            self.value = value

        def get(self):
            return self.value

    fixed = {"nnUNet_raw": FixedPath("nnUNet_raw", str(raw)),
             "nnUNet_preprocessed": FixedPath("nnUNet_preprocessed", str(preprocessed)),
             "nnUNet_results": FixedPath("nnUNet_results", str(results))}
    patches = []  # (module, attribute, original value)
    for module in _nnunet_modules():
        namespace = vars(module)
        for name in PATH_NAMES:
            if namespace.get(name) is originals[name]:
                patches.append((module, name, originals[name]))
                setattr(module, name, fixed[name])
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fingerprint_module
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as preprocessor_module
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as planner_module
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    for module in (fingerprint_module, preprocessor_module):
        patches.append((module, "multiprocessing", module.multiprocessing))
        module.multiprocessing = _InProcessMultiprocessing
    # the planner sets torch's threads to the augmentation process count while it sizes the network,
    # which fails for nnUNet_n_proc_DA=0: keep the caller's thread count instead
    patches.append((planner_module, "get_allowed_n_proc_DA", planner_module.get_allowed_n_proc_DA))
    planner_module.get_allowed_n_proc_DA = lambda: max(1, torch.get_num_threads())
    if data_workers is not None:
        patches.append((trainer_module, "get_allowed_n_proc_DA", trainer_module.get_allowed_n_proc_DA))
        trainer_module.get_allowed_n_proc_DA = lambda: int(data_workers)
    try:
        yield
    finally:
        for module, name, value in reversed(patches):
            setattr(module, name, value)
        # a module first imported inside the block bound the fixed paths: give it the originals
        for module in _nnunet_modules():
            namespace = vars(module)
            for name in PATH_NAMES:
                if isinstance(namespace.get(name), FixedPath):
                    setattr(module, name, originals[name])


# --- the job's resources -----------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM or taskset allocation), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def augmentation_workers(data_workers: int | None, threads: int | None = None) -> int:
    """nnU-Net's augmentation processes for a job: ``data_workers`` when set (0: augment in this process),
    else the job's ``threads`` (default: torch's thread count, which the workflow sets from the rule's
    threads), never more than ``usable_cpus()``."""
    cap = usable_cpus()
    if data_workers is not None:
        if int(data_workers) > cap:
            log.warning("nnunet: data_workers=%d but this process may use %d CPUs: using %d", data_workers, cap, cap)
        return min(int(data_workers), cap)
    threads = torch.get_num_threads() if threads is None else int(threads)
    return max(1, min(threads, cap))


def compile_supported(device) -> bool:
    """Where nnU-Net's trainer would ``torch.compile``: CUDA, not Windows (not CPU, not MPS)."""
    return torch.device(device).type == "cuda" and os.name != "nt"


def cudnn_training_flags(device) -> dict[str, bool]:
    """The ``torch.backends.cudnn`` flags nnU-Net's ``run_training`` sets before training; none off CUDA."""
    return {"benchmark": True, "deterministic": False} if torch.device(device).type == "cuda" else {}


@contextlib.contextmanager
def cudnn_for_training(device):
    """``cudnn_training_flags(device)`` inside the block, the previous values after it."""
    flags = cudnn_training_flags(device)
    before = {name: getattr(torch.backends.cudnn, name) for name in flags}
    for name, value in flags.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(torch.backends.cudnn, name, value)


# --- trainers ---------------------------------------------------------------------------------------

_TRAINER_CLASSES: dict = {}


def trainer_class(name: str, continuation: bool = False):
    """The nnU-Net trainer class for config value ``name``, checked by ``NnUNetSegmenter`` (built once, on
    first use: lazy import); ``continuation``: its subclass for protocol continue."""
    if not _TRAINER_CLASSES:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        class nnUNetTrainerSegsynth(nnUNetTrainer):
            """``nnUNetTrainer`` unchanged (1000 epochs × 250 iterations) except that checkpoints are
            written atomically: a job killed while saving never leaves a truncated ``checkpoint_latest.pth``,
            and ``torch.compile`` is used only when ``compile_network`` says so (set it before ``initialize``)."""

            compile_network: bool = False

            def _do_i_compile(self) -> bool:
                # nnU-Net's rule compiles on CUDA unless the environment says nnUNet_compile=false
                return bool(self.compile_network) and compile_supported(self.device)

            def save_checkpoint(self, filename: str) -> None:
                tmp = f"{filename}.tmp"
                super().save_checkpoint(tmp)
                if os.path.exists(tmp):
                    os.replace(tmp, filename)

        class nnUNetTrainerSegsynthShort(nnUNetTrainerSegsynth):
            """A configurable schedule: call ``set_schedule`` before ``initialize``.

            The constructor keeps nnU-Net's signature (nnU-Net records its arguments by introspection
            for checkpoints), so the schedule is set by a method instead of constructor arguments.
            """

            def set_schedule(self, epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
                             plot_progress: bool = False):
                """The schedule; ``plot_progress`` False skips nnU-Net's 3000×5400-pixel progress.png per epoch."""
                if self.was_initialized:
                    raise RuntimeError("set the schedule before the trainer is initialised")
                self.num_epochs = int(epochs)
                self.num_iterations_per_epoch = int(iterations_per_epoch)
                self.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
                if not plot_progress:
                    self.logger.plot_progress_png = lambda output_folder: None

        globals().update(nnUNetTrainerSegsynth=nnUNetTrainerSegsynth,
                         nnUNetTrainerSegsynthShort=nnUNetTrainerSegsynthShort)
        _TRAINER_CLASSES.update(standard=nnUNetTrainerSegsynth, short=nnUNetTrainerSegsynthShort)
        _define_continuation_trainers()
    return _TRAINER_CLASSES[f"{name}_continue" if continuation else name]


def _define_continuation_trainers() -> None:
    """The protocol-continue trainers (see the module docstring) and their paired data loader, defined as
    module attributes (so that they pickle by reference)."""
    import torch.nn.functional as F
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    class nnUNetPairedDataLoader(nnUNetDataLoader):
        """``nnUNetDataLoader`` whose batch is ``stream`` real cases then ``stream`` synthetic cases (drawn
        uniformly with replacement, as nnU-Net draws its cases); foreground oversampling per stream."""

        def __init__(self, data, batch_size: int, *args, real_ids=(), synthetic_ids=(), **kwargs):
            super().__init__(data, 2 * int(batch_size), *args, **kwargs)
            self.stream = int(batch_size)
            present = set(data.identifiers)
            self.real_ids = [i for i in real_ids if i in present]
            self.synthetic_ids = [i for i in synthetic_ids if i in present]
            if not self.real_ids or not self.synthetic_ids:
                raise ValueError(f"paired batches need real and synthetic training cases, got {len(self.real_ids)} "
                                 f"and {len(self.synthetic_ids)}")

        def get_indices(self):
            return [*np.random.choice(self.real_ids, self.stream, replace=True),
                    *np.random.choice(self.synthetic_ids, self.stream, replace=True)]

        def _oversample_last_XX_percent(self, sample_idx: int) -> bool:
            return not sample_idx % self.stream < round(self.stream * (1 - self.oversample_foreground_percent))

    class ContinuationMixin:
        """Protocol continue on top of a segsynth trainer: call ``set_continuation`` before ``initialize``."""

        continuation: dict | None = None

        def set_continuation(self, epochs: int, real_ids, synthetic_ids, cutmix_p: float, val_every: int):
            if self.was_initialized:
                raise RuntimeError("set the continuation before the trainer is initialised")
            self.num_epochs = int(epochs)
            self.continuation = {"real_ids": list(real_ids), "synthetic_ids": list(synthetic_ids),
                                 "cutmix_p": float(cutmix_p), "val_every": int(val_every)}

        def get_dataloaders(self):
            """nnU-Net's loaders, the training one (the split with synthetic cases) paired."""
            original = trainer_module.nnUNetDataLoader
            synthetic = set(self.continuation["synthetic_ids"])

            def make_loader(data, batch_size, *args, **kwargs):
                if synthetic & set(data.identifiers):
                    return nnUNetPairedDataLoader(data, batch_size, *args, real_ids=self.continuation["real_ids"],
                                                  synthetic_ids=self.continuation["synthetic_ids"], **kwargs)
                return original(data, batch_size, *args, **kwargs)

            trainer_module.nnUNetDataLoader = make_loader
            try:
                return super().get_dataloaders()
            finally:
                trainer_module.nnUNetDataLoader = original

        def train_step(self, batch: dict) -> dict:
            if np.random.uniform() < self.continuation["cutmix_p"]:
                batch = self.cutmix(batch)
            return super().train_step(batch)

        @staticmethod
        def cutmix(batch: dict) -> dict:
            """Paired CutMix of a paired batch (first half real, second half synthetic), in place: the same box
            of the images and the full-resolution target; lower deep-supervision targets re-derived from it as
            nnU-Net's ``DownsampleSegForDSTransform`` derives them (nearest-exact)."""
            data, target = batch["data"], batch["target"]
            targets = target if isinstance(target, list) else [target]
            half = data.shape[0] // 2
            box = cutmix_box(lambda low, high: int(np.random.randint(low, high + 1)), tuple(data.shape[2:]))
            paired_cutmix(data, targets[0], half, box)
            for k in range(1, len(targets)):
                if tuple(targets[k].shape[2:]) != tuple(targets[0].shape[2:]):
                    targets[k] = F.interpolate(targets[0].float(), size=tuple(targets[k].shape[2:]),
                                               mode="nearest-exact").to(targets[0].dtype)
                else:
                    targets[k] = targets[0].clone()
            batch["target"] = targets if isinstance(target, list) else targets[0]
            return batch

        def on_epoch_end(self):
            """nnU-Net's epoch end, except that ``checkpoint_best.pth`` is only replaced at validation epochs."""
            epoch = self.current_epoch
            if (epoch + 1) % self.continuation["val_every"] == 0 or epoch == self.num_epochs - 1:
                return super().on_epoch_end()
            best = self._best_ema
            save = self.save_checkpoint

            def save_but_best(filename: str) -> None:
                if os.path.basename(filename) != "checkpoint_best.pth":
                    save(filename)

            self.save_checkpoint = save_but_best
            try:
                super().on_epoch_end()
            finally:
                del self.save_checkpoint
                self._best_ema = best

    class nnUNetTrainerSegsynthContinue(ContinuationMixin, _TRAINER_CLASSES["standard"]):
        """nnUNetTrainerSegsynth for protocol continue."""

    class nnUNetTrainerSegsynthShortContinue(ContinuationMixin, _TRAINER_CLASSES["short"]):
        """nnUNetTrainerSegsynthShort for protocol continue."""

    for cls in (nnUNetPairedDataLoader, nnUNetTrainerSegsynthContinue, nnUNetTrainerSegsynthShortContinue):
        cls.__qualname__ = cls.__name__
    globals().update(nnUNetPairedDataLoader=nnUNetPairedDataLoader,
                     nnUNetTrainerSegsynthContinue=nnUNetTrainerSegsynthContinue,
                     nnUNetTrainerSegsynthShortContinue=nnUNetTrainerSegsynthShortContinue)
    _TRAINER_CLASSES.update(standard_continue=nnUNetTrainerSegsynthContinue,
                            short_continue=nnUNetTrainerSegsynthShortContinue)


# --- the segmenter ----------------------------------------------------------------------------------


class NnUNetSegmenter(Segmenter):
    """nnU-Net v2 trained and applied through its Python API; see the module docstring."""

    kind: ClassVar[str] = "nnunet"

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names)
        self.options = self._check_config(cfg)
        chosen = device if device is not None else self.options["device"]
        self.device = torch.device(chosen) if chosen is not None else default_device()
        self._model: dict | None = None  # plans, dataset_json, fingerprint, checkpoint (weights etc.)
        self._predictor = None
        self._network = None

    # config ------------------------------------------------------------------------------------------

    def _check_config(self, cfg: dict) -> dict:
        unknown = set(cfg) - set(DEFAULTS) - {"kind", "name"} - set(NNUNET_PROTOCOL_KEYS)
        if unknown:
            raise ConfigError("segmenters", f"unknown nnunet keys {sorted(unknown)}; "
                              f"known: {sorted({*DEFAULTS, *NNUNET_PROTOCOL_KEYS})}")
        options = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in DEFAULTS}}
        if options["trainer"] not in TRAINERS:
            raise ConfigError("segmenters.trainer", f"must be one of {TRAINERS}, got {options['trainer']!r}")
        if options["configuration"] != "2d":
            raise ConfigError("segmenters.configuration",
                              f"only '2d' is possible for 2D images, got {options['configuration']!r}")
        for key in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "checkpoint_every", "num_folds"):
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"segmenters.{key}", f"must be a positive integer, got {value!r}")
        steps = options["steps"]
        if steps is not None:  # the torch segmenters' budget (bench.py sets it): whole epochs of the short trainer
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError("segmenters.steps", f"must be a positive integer, got {steps!r}")
            if options["trainer"] != "short":
                raise ConfigError("segmenters.steps", "a step budget needs trainer 'short' (the standard trainer "
                                  "always runs nnU-Net's 1000 epochs x 250 iterations)")
            options["epochs"] = -(-steps // options["iterations_per_epoch"])
        if options["num_folds"] < 2:
            raise ConfigError("segmenters.num_folds", f"must be at least 2, got {options['num_folds']}")
        fold = options["fold"]
        if fold != "all" and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < options["num_folds"]):
            raise ConfigError("segmenters.fold",
                              f"must be 'all' or an integer in [0, num_folds={options['num_folds']}), got {fold!r}")
        norm = str(options["normalization"]).casefold()
        if norm not in NORMALIZATIONS:
            raise ConfigError("segmenters.normalization",
                              f"must be one of {sorted(set(NORMALIZATIONS.values()))}, got {options['normalization']!r}")
        options["normalization"] = NORMALIZATIONS[norm]
        if norm == "rgb_to_0_1" and self.in_channels != 3:
            raise ConfigError("segmenters.normalization", f"'rgb_to_0_1' needs 3 channels, not {self.in_channels}")
        if not isinstance(options["use_mirroring"], bool):
            raise ConfigError("segmenters.use_mirroring", f"must be true or false, got {options['use_mirroring']!r}")
        step = options["tile_step_size"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
            raise ConfigError("segmenters.tile_step_size", f"must be in (0, 1], got {step!r}")
        workers = options["data_workers"]
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError("segmenters.data_workers", f"must be null or an integer >= 0, got {workers!r}")
        if not isinstance(options["compile"], bool):
            raise ConfigError("segmenters.compile", f"must be true or false, got {options['compile']!r}")
        if options["device"] is not None and not isinstance(options["device"], str):
            raise ConfigError("segmenters.device", f"must be null or a torch device name, got {options['device']!r}")
        options["protocol"] = protocol_of(cfg)
        self._continue = continue_options(cfg, "continue_epochs", options["epochs"] if options["trainer"] == "short"
                                          else STANDARD_EPOCHS, 1)
        return options

    def continue_options(self, n_real: int | None = None):
        """The checked continuation settings (``continue_epochs`` default: a tenth of the scratch epochs, so 100
        for the standard trainer's 1000, as the reference's nnU-Net preset; ``val_every`` in epochs, default 1)."""
        return self._continue

    @property
    def intensity_scale(self) -> float:
        """Images in [0, 1] are exported as ``image * intensity_scale`` (255 for nnU-Net's RGB scheme)."""
        return 255.0 if self.options["normalization"] == "rgb_to_0_1" else 1.0

    def check_inputs(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"{self.kind}: images of shape {images.shape} do not have {self.in_channels} channels")
        if masks is not None:
            if masks.shape != (images.shape[0], *images.shape[2:]):
                raise ValueError(f"{self.kind}: masks of shape {masks.shape} do not match images {images.shape}")
            if masks.size and (int(masks.max()) >= self.num_classes or int(masks.min()) < 0):
                raise ValueError(f"{self.kind}: mask values outside [0, {self.num_classes}) for {self.num_classes} classes")

    # export --------------------------------------------------------------------------------------------

    def case_ids(self, n: int, synthetic_from: int | None) -> list[str]:
        """Case names: ``real_00000`` … then ``synth_00000`` … from row ``synthetic_from`` on."""
        cut = n if synthetic_from is None else int(synthetic_from)
        return [f"real_{i:05d}" if i < cut else f"synth_{i - cut:05d}" for i in range(n)]

    def dataset_json(self, num_training: int) -> dict:
        labels = {"background": 0}
        for value, name in enumerate(self.class_names[1:], start=1):
            labels[name if name != "background" else f"class_{value}"] = value
        if len(labels) != self.num_classes:
            raise ConfigError("class_names", f"names {self.class_names} are not unique")
        return {"channel_names": {str(c): self.options["normalization"] for c in range(self.in_channels)},
                "labels": labels, "numTraining": int(num_training), "file_ending": FILE_ENDING,
                "overwrite_image_reader_writer": "NaturalImage2DIO"}

    def export_raw(self, images: np.ndarray, masks: np.ndarray, raw_dataset_dir, synthetic_from: int | None = None,
                   cases: Sequence[str] | None = None) -> list[str]:
        """Write a nnU-Net raw dataset folder: ``imagesTr/<case>_<cccc>.tif`` (float32), ``labelsTr/<case>.tif``
        (uint8), ``dataset.json``. Returns the case names (``cases`` when given, else ``case_ids``)."""
        import tifffile

        raw_dataset_dir = Path(raw_dataset_dir)
        if raw_dataset_dir.exists():
            shutil.rmtree(raw_dataset_dir)
        (raw_dataset_dir / "imagesTr").mkdir(parents=True)
        (raw_dataset_dir / "labelsTr").mkdir()
        cases = self.case_ids(len(images), synthetic_from) if cases is None else [str(c) for c in cases]
        if len(cases) != len(images):
            raise ValueError(f"{len(cases)} case names for {len(images)} images")
        scale = self.intensity_scale
        for case, image, mask in zip(cases, images, masks):
            for c, channel in enumerate(image):
                tifffile.imwrite(raw_dataset_dir / "imagesTr" / f"{case}_{c:04d}{FILE_ENDING}",
                                 (np.asarray(channel, dtype=np.float32) * np.float32(scale)))
            tifffile.imwrite(raw_dataset_dir / "labelsTr" / f"{case}{FILE_ENDING}", np.asarray(mask, dtype=np.uint8))
        write_json(raw_dataset_dir / "dataset.json", self.dataset_json(len(cases)))
        return cases

    def splits(self, cases: Sequence[str]) -> list[dict]:
        """``splits_final.json``: folds over the real cases; every synthetic case in every training part."""
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        real = sorted(c for c in cases if c.startswith("real_"))
        synthetic = sorted(c for c in cases if not c.startswith("real_"))
        n_splits = min(self.options["num_folds"], len(real))
        if n_splits < 2:
            if self.options["fold"] != "all":
                raise ConfigError("segmenters.fold", f"fold {self.options['fold']} needs at least 2 real cases, "
                                  f"got {len(real)}")
            return [{"train": real + synthetic, "val": real}]
        folds = generate_crossval_split(real, seed=12345, n_splits=n_splits)
        if self.options["fold"] != "all" and self.options["fold"] >= len(folds):
            raise ConfigError("segmenters.fold", f"fold {self.options['fold']} but only {len(folds)} folds "
                              f"of {len(real)} real cases")
        return [{"train": [str(k) for k in fold["train"]] + synthetic, "val": [str(k) for k in fold["val"]]}
                for fold in folds]

    # training --------------------------------------------------------------------------------------------

    @staticmethod
    def job_folders(checkpoint_dir) -> dict[str, Path]:
        root = Path(checkpoint_dir) / "nnunet"
        return {"raw": root / "nnUNet_raw", "preprocessed": root / "nnUNet_preprocessed",
                "results": root / "nnUNet_results"}

    def _fingerprint_of_inputs(self, images, masks, synthetic_from) -> dict:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(masks, dtype=np.uint8).tobytes())
        relevant = {k: self.options[k] for k in ("normalization", "num_folds", "configuration")}
        return {"sha256": digest.hexdigest(), "shape": list(images.shape), "synthetic_from": synthetic_from,
                "class_names": self.class_names, "options": relevant}

    def prepare(self, images, masks, folders: dict[str, Path], synthetic_from: int | None) -> tuple[dict, float]:
        """Export, fingerprint, plan and preprocess, unless a previous attempt of this job already did
        so for the same inputs (then the results folder is kept for resuming). Returns (marker, seconds)."""
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        started = time.monotonic()
        marker_path = folders["preprocessed"] / DATASET_NAME / PREPARED_FILE
        wanted = self._fingerprint_of_inputs(images, masks, synthetic_from)
        if marker_path.exists() and read_json(marker_path).get("inputs") == wanted:
            return read_json(marker_path), 0.0
        for folder in folders.values():  # stale or partial: start this job over
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        cases = self.export_raw(images, masks, folders["raw"] / DATASET_NAME, synthetic_from)
        extractor = DatasetFingerprintExtractor(DATASET_NAME, num_processes=1, verbose=False)
        extractor.show_progress_bar = False
        extractor.run(overwrite_existing=True)
        planner = ExperimentPlanner(DATASET_NAME, preprocessor_name="DefaultPreprocessor", plans_name=PLANS_NAME)
        planner.plan_experiment()
        plans_manager = PlansManager(str(folders["preprocessed"] / DATASET_NAME / f"{PLANS_NAME}.json"))
        configuration = plans_manager.get_configuration(self.options["configuration"])
        preprocessor = configuration.preprocessor_class(verbose=False)
        preprocessor.show_progress_bar = False
        preprocessor.run(DATASET_NAME, self.options["configuration"], PLANS_NAME, num_processes=1)
        gt_dir = folders["preprocessed"] / DATASET_NAME / "gt_segmentations"  # as nnU-Net's preprocess() leaves it
        gt_dir.mkdir(exist_ok=True)
        for case in cases:
            shutil.copyfile(folders["raw"] / DATASET_NAME / "labelsTr" / f"{case}{FILE_ENDING}", gt_dir / f"{case}{FILE_ENDING}")
        write_json(folders["preprocessed"] / DATASET_NAME / "splits_final.json", self.splits(cases))
        marker = {"inputs": wanted, "cases": cases, "seconds": time.monotonic() - started}
        write_json(marker_path, marker)
        return marker, marker["seconds"]

    def _node_settings(self, what: str) -> tuple[int, bool]:
        """The job's augmentation workers (its threads, capped by the CPU affinity) and whether torch.compile
        runs, logged; both trainers start with it."""
        workers = augmentation_workers(self.options["data_workers"])
        compiled = bool(self.options["compile"]) and compile_supported(self.device)
        log.info("%s: %d augmentation worker(s), torch.compile %s, device %s", what, workers,
                 "on" if compiled else "off", self.device)
        return workers, compiled

    def train(self, images: np.ndarray, masks: np.ndarray, checkpoint_dir, seed: int,
              log_every: int = 50, synthetic_from: int | None = None) -> dict:
        """Train nnU-Net on the pool; rows >= ``synthetic_from`` are synthetic (None: all real).

        A killed job resumes from nnU-Net's ``checkpoint_latest.pth`` (written every ``checkpoint_every``
        epochs) and ends at the same epoch count.
        """
        self.check_inputs(images, masks)
        if len(images) == 0:
            raise ValueError(f"{self.kind}: no training samples")
        if synthetic_from is not None and not 0 <= int(synthetic_from) <= len(images):
            raise ValueError(f"{self.kind}: synthetic_from={synthetic_from} outside [0, {len(images)}]")
        synthetic_from = None if synthetic_from is None else int(synthetic_from)
        if synthetic_from == 0 and self.options["fold"] != "all":
            raise ConfigError("segmenters.fold", "an integer fold validates on real cases, and there are none")
        folders = self.job_folders(checkpoint_dir)
        started = time.monotonic()
        workers, compiled = self._node_settings("nnunet")
        with nnunet_paths(folders["raw"], folders["preprocessed"], folders["results"], workers):
            marker, prepare_seconds = self.prepare(images, masks, folders, synthetic_from)
            cls = trainer_class(self.options["trainer"])
            fold = self.options["fold"]
            fit = self._fit(folders, cls, fold, seed,
                            lambda resume: self.new_trainer(folders, continue_training=resume))
        return {"steps": fit["epochs"] * fit["iterations"], "epochs": fit["epochs"],
                "iterations_per_epoch": fit["iterations"],
                "resumed_from_epoch": fit["resumed_from_epoch"], "final_loss": fit["final_loss"],
                "seconds": time.monotonic() - started, "prepare_seconds": prepare_seconds,
                "train_seconds": fit["train_seconds"], "num_samples": int(len(images)),
                "n_synthetic_cases": int(sum(not c.startswith("real_") for c in marker["cases"])),
                "trainer": cls.__name__, "fold": fold, "data_workers": workers,
                "compiled": compiled}

    def _fit(self, folders: dict[str, Path], cls, fold, seed: int, make_trainer, init_checkpoint: Path | None = None,
             model_checkpoint: str = "checkpoint_final.pth") -> dict:
        """Train (or resume, or find finished) the trainer ``make_trainer(resuming)`` of class ``cls`` on ``fold``
        (inside ``nnunet_paths``), then load ``model_checkpoint`` of its output folder as this segmenter's model.
        ``init_checkpoint``: a nnU-Net checkpoint whose network weights start a fresh (not resumed) run."""
        output_folder = (folders["results"] / DATASET_NAME /
                         f"{cls.__name__}__{PLANS_NAME}__{self.options['configuration']}" / f"fold_{fold}")
        final, latest = output_folder / "checkpoint_final.pth", output_folder / "checkpoint_latest.pth"
        resume_from = final if final.exists() else latest if latest.exists() else None
        _seed_everything(seed)
        trainer = make_trainer(resume_from is not None)
        resumed_from_epoch = 0
        if resume_from is not None:
            trainer.load_checkpoint(str(resume_from))
            resumed_from_epoch = int(trainer.current_epoch)
            log.info("nnunet: resuming from %s at epoch %d", resume_from.name, resumed_from_epoch)
        elif init_checkpoint is not None:
            trainer.initialize()
            load_network_weights(trainer.network, init_checkpoint)
            log.info("nnunet: network initialised from %s", init_checkpoint)
        train_started = time.monotonic()
        if resume_from != final:
            with cudnn_for_training(self.device):  # as nnU-Net's run_training entry point, on CUDA only
                trainer.run_training()
        train_seconds = time.monotonic() - train_started
        losses = trainer.logger.get_value("train_losses", step=None)
        final_loss = float(losses[-1]) if len(losses) else float("nan")
        epochs_done = int(trainer.current_epoch)
        if epochs_done != trainer.num_epochs:
            raise RuntimeError(f"nnunet: training stopped at epoch {epochs_done} of {trainer.num_epochs}")
        checkpoint = model_checkpoint if (output_folder / model_checkpoint).exists() else "checkpoint_final.pth"
        self._load_model_folder(output_folder.parent, f"fold_{fold}", checkpoint)
        iterations = int(trainer.num_iterations_per_epoch)
        best_ema = trainer._best_ema
        del trainer
        return {"epochs": epochs_done, "iterations": iterations, "resumed_from_epoch": resumed_from_epoch,
                "final_loss": final_loss, "train_seconds": train_seconds, "checkpoint": checkpoint,
                "best_ema": None if best_ema is None else float(best_ema)}

    # protocol continue ---------------------------------------------------------------------------------

    def train_continue(self, real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                       validation: tuple[np.ndarray, np.ndarray], init_dir, checkpoint_dir, seed: int,
                       log_every: int = 50) -> dict:
        """Protocol continue (see the module docstring): continue the real-only nnU-Net in ``init_dir`` on
        1:1 real:synthetic batches with paired CutMix, validating on ``validation`` (real cases), for
        ``continue_epochs`` epochs; the model is nnU-Net's ``checkpoint_best.pth``. A killed job resumes from
        ``checkpoint_latest.pth`` as ``train`` does."""
        parts = {"real": real, "synthetic": synthetic, "validation": validation}
        for name, (images, masks) in parts.items():
            self.check_inputs(images, masks)
            if len(images) == 0:
                raise ValueError(f"{self.kind}: protocol continue needs {name} samples, got none")
        options = self.continue_options()
        init_folder = self._init_model_folder(init_dir)
        n_real, n_val, n_synthetic = len(real[0]), len(validation[0]), len(synthetic[0])
        if options.budget == 0:  # nothing to continue (nnU-Net's poly schedule cannot run 0 epochs)
            self._load_model_folder(init_folder["folder"], init_folder["checkpoint"].parent.name)
            return {"protocol": "continue", "steps": 0, "epochs": 0, "resumed_from_epoch": 0,
                    "final_loss": float("nan"), "seconds": 0.0, "num_samples": int(n_real + n_synthetic),
                    "n_val": int(n_val), "n_synthetic_cases": int(n_synthetic), "cutmix_p": options.cutmix_p,
                    "val_every": options.val_every, "model_checkpoint": "initial",
                    "init_checkpoint": str(init_folder["checkpoint"])}
        cases = ([f"real_{i:05d}" for i in range(n_real)] + [f"real_val_{i:05d}" for i in range(n_val)]
                 + [f"synth_{i:05d}" for i in range(n_synthetic)])
        real_ids, val_ids, synthetic_ids = cases[:n_real], cases[n_real:n_real + n_val], cases[n_real + n_val:]
        images = np.concatenate([real[0], validation[0], synthetic[0]])
        masks = np.concatenate([real[1], validation[1], synthetic[1]])
        splits = [{"train": real_ids + synthetic_ids, "val": val_ids}]
        folders = self.job_folders(checkpoint_dir)
        started = time.monotonic()
        workers, compiled = self._node_settings("nnunet continue")
        with nnunet_paths(folders["raw"], folders["preprocessed"], folders["results"], workers):
            _, prepare_seconds = self.prepare_continue(images, masks, cases, splits, folders, init_folder)
            cls = trainer_class(self.options["trainer"], continuation=True)

            def make_trainer(resuming: bool):
                trainer = self.new_trainer(folders, continue_training=resuming, fold=0, continuation=True)
                trainer.set_continuation(options.budget, real_ids, synthetic_ids, options.cutmix_p,
                                         options.val_every)
                return trainer

            fit = self._fit(folders, cls, 0, seed, make_trainer, init_checkpoint=init_folder["checkpoint"],
                            model_checkpoint="checkpoint_best.pth")
        return {"protocol": "continue", "steps": fit["epochs"] * fit["iterations"], "epochs": fit["epochs"],
                "iterations_per_epoch": fit["iterations"], "resumed_from_epoch": fit["resumed_from_epoch"],
                "final_loss": fit["final_loss"], "seconds": time.monotonic() - started,
                "prepare_seconds": prepare_seconds, "train_seconds": fit["train_seconds"],
                "num_samples": int(n_real + n_synthetic), "n_val": int(n_val),
                "n_synthetic_cases": int(n_synthetic), "trainer": cls.__name__, "fold": 0,
                "data_workers": workers, "compiled": compiled, "cutmix_p": options.cutmix_p,
                "val_every": options.val_every, "model_checkpoint": fit["checkpoint"],
                "best_ema_pseudo_dice": fit["best_ema"], "init_checkpoint": str(init_folder["checkpoint"])}

    def _init_model_folder(self, init_dir) -> dict:
        """The real-only nnU-Net model of ``init_dir``: its plans, dataset.json, fingerprint and checkpoint."""
        init_dir = self.check_initial_model(init_dir)
        folder = init_dir / MODEL_SUBDIR
        folds = sorted(p.name for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").exists())
        if not folds:
            raise InputDataError(folder, "no fold_*/checkpoint_final.pth: not a nnU-Net model folder")
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).exists():
                raise InputDataError(folder / name, "missing from the initial nnU-Net model")
        fingerprint = folder / "dataset_fingerprint.json"
        return {"folder": folder, "plans": folder / "plans.json", "dataset_json": folder / "dataset.json",
                "fingerprint": fingerprint if fingerprint.exists() else None,
                "checkpoint": folder / folds[0] / "checkpoint_final.pth"}

    def prepare_continue(self, images, masks, cases: list[str], splits: list[dict], folders: dict[str, Path],
                         init_folder: dict) -> tuple[dict, float]:
        """``prepare`` for protocol continue: export the cases and preprocess them with the initial model's plans
        (no planning); ``splits_final.json`` is ``splits``. Kept when a previous attempt prepared the same."""
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        started = time.monotonic()
        dataset_dir = folders["preprocessed"] / DATASET_NAME
        marker_path = dataset_dir / PREPARED_FILE
        plans = read_json(init_folder["plans"])
        wanted = {**self._fingerprint_of_inputs(images, masks, None), "protocol": "continue", "cases": cases,
                  "splits": splits,
                  "plans_sha256": hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()}
        if marker_path.exists() and read_json(marker_path).get("inputs") == wanted:
            return read_json(marker_path), 0.0
        for folder in folders.values():  # stale or partial: start this job over
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.export_raw(images, masks, folders["raw"] / DATASET_NAME, cases=cases)
        raw_spec = read_json(folders["raw"] / DATASET_NAME / "dataset.json")
        init_spec = read_json(init_folder["dataset_json"])
        if any(raw_spec[key] != init_spec.get(key) for key in ("channel_names", "labels")):
            raise InputDataError(init_folder["dataset_json"], "channels or labels differ from this segmenter's")
        dataset_dir.mkdir(parents=True, exist_ok=True)
        if init_folder["fingerprint"] is not None:
            shutil.copyfile(init_folder["fingerprint"], dataset_dir / "dataset_fingerprint.json")
        else:
            extractor = DatasetFingerprintExtractor(DATASET_NAME, num_processes=1, verbose=False)
            extractor.show_progress_bar = False
            extractor.run(overwrite_existing=True)
        # the initial model's plans, as nnUNetv2_move_plans_between_datasets moves them (same dataset name here)
        plans["dataset_name"] = DATASET_NAME
        write_json(dataset_dir / f"{PLANS_NAME}.json", plans)
        shutil.copyfile(folders["raw"] / DATASET_NAME / "dataset.json", dataset_dir / "dataset.json")
        plans_manager = PlansManager(str(dataset_dir / f"{PLANS_NAME}.json"))
        configuration = plans_manager.get_configuration(self.options["configuration"])
        preprocessor = configuration.preprocessor_class(verbose=False)
        preprocessor.show_progress_bar = False
        preprocessor.run(DATASET_NAME, self.options["configuration"], PLANS_NAME, num_processes=1)
        gt_dir = dataset_dir / "gt_segmentations"
        gt_dir.mkdir(exist_ok=True)
        for case in cases:
            shutil.copyfile(folders["raw"] / DATASET_NAME / "labelsTr" / f"{case}{FILE_ENDING}",
                            gt_dir / f"{case}{FILE_ENDING}")
        write_json(dataset_dir / "splits_final.json", splits)
        marker = {"inputs": wanted, "cases": cases, "seconds": time.monotonic() - started}
        write_json(marker_path, marker)
        return marker, marker["seconds"]

    def new_trainer(self, folders: dict[str, Path], continue_training: bool = False, fold=None,
                    continuation: bool = False):
        """The nnU-Net trainer of this segmenter's options for the prepared dataset in ``folders``
        (call inside ``nnunet_paths``): schedule, checkpoint interval and ``torch.compile`` choice set,
        not yet initialised. ``fold`` (default: the config's), ``continuation``: the protocol-continue
        subclass (its ``set_continuation`` still to be called)."""
        from batchgenerators.utilities.file_and_folder_operations import load_json

        preprocessed = folders["preprocessed"] / DATASET_NAME
        plans = load_json(str(preprocessed / f"{PLANS_NAME}.json"))
        dataset_json = load_json(str(preprocessed / "dataset.json"))
        plans["continue_training"] = bool(continue_training)
        trainer = trainer_class(self.options["trainer"], continuation)(
            plans=plans, configuration=self.options["configuration"],
            fold=self.options["fold"] if fold is None else fold, dataset_json=dataset_json, device=self.device)
        trainer.compile_network = bool(self.options["compile"])
        if self.options["trainer"] == "short":
            trainer.set_schedule(self.options["epochs"], self.options["iterations_per_epoch"],
                                 self.options["val_iterations_per_epoch"])
        trainer.save_every = int(self.options["checkpoint_every"])
        return trainer

    # model folder --------------------------------------------------------------------------------------

    def _load_model_folder(self, model_folder: Path, fold_dir: str,
                           checkpoint_name: str = "checkpoint_final.pth") -> None:
        """Read a nnU-Net trained model folder (plans.json, dataset.json, fold_x/``checkpoint_name``)."""
        model_folder = Path(model_folder)
        for path in (model_folder / "plans.json", model_folder / "dataset.json",
                     model_folder / fold_dir / checkpoint_name):
            if not path.exists():
                raise InputDataError(path, "missing from the nnU-Net model folder")
        checkpoint = torch.load(model_folder / fold_dir / checkpoint_name, map_location="cpu", weights_only=False)
        fingerprint_path = model_folder / "dataset_fingerprint.json"
        self._model = {
            "plans": read_json(model_folder / "plans.json"),
            "dataset_json": read_json(model_folder / "dataset.json"),
            "fingerprint": read_json(fingerprint_path) if fingerprint_path.exists() else None,
            "fold_dir": fold_dir,
            # only what inference needs: no optimiser state
            "checkpoint": {k: checkpoint[k] for k in ("network_weights", "trainer_name", "init_args",
                                                      "current_epoch", "inference_allowed_mirroring_axes")
                           if k in checkpoint},
        }
        self._predictor = None
        self._network = None

    def _write_weights(self, directory: Path) -> None:
        model = self._trained_model()
        folder = Path(directory) / MODEL_SUBDIR
        (folder / model["fold_dir"]).mkdir(parents=True)
        write_json(folder / "plans.json", model["plans"])
        write_json(folder / "dataset.json", model["dataset_json"])
        if model["fingerprint"] is not None:
            write_json(folder / "dataset_fingerprint.json", model["fingerprint"])
        with atomic_path(folder / model["fold_dir"] / "checkpoint_final.pth") as tmp:
            torch.save(model["checkpoint"], tmp)

    def _read_weights(self, directory: Path) -> None:
        folder = Path(directory) / MODEL_SUBDIR
        folds = sorted(p.name for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").exists())
        if not folds:
            raise InputDataError(folder, "no fold_*/checkpoint_final.pth: not a nnU-Net model folder")
        self._load_model_folder(folder, folds[0])

    def _trained_model(self) -> dict:
        if self._model is None:
            raise RuntimeError(f"{self.kind}: train or load the segmenter before using it")
        return self._model

    # inference -----------------------------------------------------------------------------------------

    def _managers(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        model = self._trained_model()
        plans_manager = PlansManager(json.loads(json.dumps(model["plans"])))
        configuration = model["checkpoint"]["init_args"]["configuration"]
        return plans_manager, plans_manager.get_configuration(configuration)

    def network(self) -> torch.nn.Module:
        """The trained nnU-Net network (deep supervision off) on ``self.device``, in eval mode."""
        if self._network is None:
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

            model = self._trained_model()
            plans_manager, configuration_manager = self._managers()
            n_in = determine_num_input_channels(plans_manager, configuration_manager, model["dataset_json"])
            n_out = plans_manager.get_label_manager(model["dataset_json"]).num_segmentation_heads
            network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                               enable_deep_supervision=False)
            network.load_state_dict(model["checkpoint"]["network_weights"])
            self._network = network.to(self.device).eval()
        return self._network

    def predictor(self):
        """``nnUNetPredictor`` set up by hand (no trainer lookup by name)."""
        if self._predictor is None:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            model = self._trained_model()
            plans_manager, configuration_manager = self._managers()
            with contextlib.redirect_stdout(_NullWriter()):
                predictor = nnUNetPredictor(tile_step_size=float(self.options["tile_step_size"]), use_gaussian=True,
                                            use_mirroring=bool(self.options["use_mirroring"]),
                                            perform_everything_on_device=self.device.type == "cuda",
                                            device=self.device, verbose=False, verbose_preprocessing=False,
                                            allow_tqdm=False)
            axes = model["checkpoint"].get("inference_allowed_mirroring_axes")
            predictor.manual_initialization(self.network(), plans_manager, configuration_manager,
                                            [model["checkpoint"]["network_weights"]], model["dataset_json"],
                                            model["checkpoint"]["trainer_name"],
                                            tuple(axes) if axes is not None else None)
            self._predictor = predictor
        return self._predictor

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """nnU-Net's own inference per image (crop to non-zero, normalise, sliding window with Gaussian
        weighting, optional mirroring, softmax, revert cropping); (N,K,H,W) float32 at input resolution."""
        self.check_inputs(images)
        predictor = self.predictor()
        out = np.empty((len(images), self.num_classes, *images.shape[2:]), dtype=np.float32)
        scale = np.float32(self.intensity_scale)
        for i, image in enumerate(images):
            data = (np.asarray(image, dtype=np.float32) * scale)[:, None]  # (C, 1, H, W), as NaturalImage2DIO reads
            with contextlib.redirect_stdout(_NullWriter()):
                _, probabilities = predictor.predict_single_npy_array(data, {"spacing": [999.0, 1.0, 1.0]}, None, None,
                                                                      True)
            out[i] = np.asarray(probabilities, dtype=np.float32)[:, 0]
        return out

    def as_value_model(self) -> torch.nn.Module:
        import copy

        plans_manager, configuration_manager = self._managers()
        network = copy.deepcopy(self.network()).eval()
        network.requires_grad_(False)
        properties = plans_manager.foreground_intensity_properties_per_channel
        value_model = NnUNetValueModel(
            network,
            schemes=list(configuration_manager.normalization_schemes),
            use_mask_for_norm=[bool(v) for v in configuration_manager.use_mask_for_norm],
            intensity_properties=[properties[str(c)] for c in range(self.in_channels)],
            intensity_scale=self.intensity_scale,
            transpose_forward=list(plans_manager.transpose_forward),
            patch_size=list(configuration_manager.patch_size),
            divisor=_size_divisor(configuration_manager),
            num_classes=self.num_classes,
        ).eval()
        value_model.requires_grad_(False)
        return value_model


# --- value model -----------------------------------------------------------------------------------

SUPPORTED_SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                     "RGBTo01Normalization")


class NnUNetValueModel(torch.nn.Module):
    """Generator-range images in [-1, 1] → nnU-Net's preprocessing → network → softmax, differentiably.

    Reproduces ``nnUNetPredictor`` for 2D images at the planned spacing (1, 1): (x + 1) / 2 is scaled to
    the exported intensities; each image is cropped to the bounding box of its filled non-zero mask
    (nnU-Net's ``crop_to_nonzero``); each channel is normalised with the scheme of the plans
    (z-score per image — inside the non-zero mask when the plans say ``use_mask_for_norm``, leaving the
    outside at 0 —, CT clip + dataset mean/std from the fingerprint, none, per-image min–max, /255);
    in-plane axes are transposed as ``transpose_forward`` says; the crop is zero-padded, centred, to
    at least the patch size (as the sliding window pads) and, beyond that, to a multiple of the
    network's down-sampling ``divisor``; the softmax of the logits is cropped back and put into the
    image, with background probability 1 outside the box (nnU-Net's ``revert_cropping_on_probabilities``).

    Differences from ``predict_proba``: no mirroring (turn ``use_mirroring`` off to compare), and an
    image larger than the patch goes through the network in one piece instead of Gaussian-weighted
    tiles (equal when the image fits the patch, as for the planned 2D configurations of 64²–256² sets).
    The box and mask are piecewise constant in the input, so gradients flow through everything else.

    Host synchronisation (f_θ runs inside every guided sampling step): when the image fits the patch
    (the usual case), every crop is padded to exactly the patch size, so the whole batch is one
    fixed-shape network call: boxes, masks, crop-and-pad and the paste back are gathers with indices
    computed on the input's device, and a CUDA forward + backward never waits for the host. Two
    exceptions, each at most one host read per call: an image larger than the patch pads its crop to a
    size that depends on the box (data-dependent shapes, so the boxes are read back), and a z-score
    with ``use_mask_for_norm`` needs the hole-filled mask, whose flood fill ends at a data-dependent
    pass count (see ``_fill_holes``; the boxes, when needed, come back in the same read).
    """

    def __init__(self, network: torch.nn.Module, schemes: list[str], use_mask_for_norm: list[bool],
                 intensity_properties: list[dict], intensity_scale: float, transpose_forward: list[int],
                 patch_size: list[int], divisor: list[int], num_classes: int):
        super().__init__()
        unknown = [s for s in schemes if s not in SUPPORTED_SCHEMES]
        if unknown:
            raise ConfigError("segmenters.normalization", f"the value model cannot reproduce nnU-Net schemes {unknown}")
        if len(transpose_forward) != 3 or transpose_forward[0] != 0:
            raise ConfigError("segmenters.configuration", f"unexpected 2D transpose_forward {transpose_forward}")
        self.network = network
        self.schemes = schemes
        self.use_mask_for_norm = use_mask_for_norm
        self.intensity_properties = intensity_properties
        self.intensity_scale = float(intensity_scale)
        self.in_plane = [transpose_forward[1] - 1, transpose_forward[2] - 1]  # (0, 1) or (1, 0)
        self.patch_size = [int(p) for p in patch_size]
        self.divisor = [int(d) for d in divisor]
        self.num_classes = int(num_classes)

    @property
    def _needs_filled_mask(self) -> bool:
        return any(s == "ZScoreNormalization" and m for s, m in zip(self.schemes, self.use_mask_for_norm))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raw = (images + 1.0) / 2.0 * self.intensity_scale
        height, width = raw.shape[2:]
        patch = [self.patch_size[axis] for axis in self.in_plane]  # in image axes (the permutation is its inverse)
        fits = height <= patch[0] and width <= patch[1]  # static shapes: no data involved
        nonzero = (raw.detach() != 0).any(dim=1)
        boxes = _bounding_boxes(nonzero)  # (N, 4) y0, y1, x0, x1 on raw's device
        masks, host_boxes = None, None
        if self._needs_filled_mask:
            masks, host_boxes = _fill_holes(nonzero, read_back=None if fits else boxes)
        elif not fits:
            host_boxes = boxes.tolist()  # the one host sync: the padded crop's shape depends on its box
        if fits:
            return self._forward_in_patch(raw, boxes, masks, patch)
        return self._forward_by_box(raw, [tuple(b) for b in host_boxes],
                                    masks if masks is not None else nonzero)

    def _background(self, reference: torch.Tensor) -> torch.Tensor:
        background = torch.zeros(self.num_classes, dtype=reference.dtype, device=reference.device)
        background[0] = 1.0
        return background

    def _forward_in_patch(self, raw: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None,
                          patch: list[int]) -> torch.Tensor:
        """Every crop padded to exactly the patch (the image fits it): one batch, no host sync."""
        n, _, height, width = raw.shape
        device = raw.device
        y0, y1, x0, x1 = boxes.unbind(dim=1)
        top, left = (patch[0] - (y1 - y0)) // 2, (patch[1] - (x1 - x0)) // 2  # centred zero padding
        in_box = (_within(torch.arange(height, device=device)[None], y0[:, None], y1[:, None])[:, None, :, None]
                  & _within(torch.arange(width, device=device)[None], x0[:, None], x1[:, None])[:, None, None, :])
        x = self._normalise(raw, in_box, masks[:, None] if masks is not None else None)
        # the crop, centred in a patch-sized canvas of zeros: canvas pixel i is image pixel y0 + i - top
        rows = y0[:, None] + torch.arange(patch[0], device=device)[None] - top[:, None]
        cols = x0[:, None] + torch.arange(patch[1], device=device)[None] - left[:, None]
        canvas = _gather_grid(x, rows.clamp(0, height - 1), cols.clamp(0, width - 1))
        valid = _within(rows, y0[:, None], y1[:, None])[:, None, :, None] & \
            _within(cols, x0[:, None], x1[:, None])[:, None, None, :]
        canvas = torch.where(valid, canvas, torch.zeros((), dtype=canvas.dtype, device=device))
        if self.in_plane != [0, 1]:
            canvas = canvas.transpose(2, 3)
        probabilities = torch.softmax(self.network(canvas), dim=1)
        if self.in_plane != [0, 1]:
            probabilities = probabilities.transpose(2, 3)
        # back into the image: image pixel y is canvas pixel y - y0 + top; background outside the box
        rows = torch.arange(height, device=device)[None] - y0[:, None] + top[:, None]
        cols = torch.arange(width, device=device)[None] - x0[:, None] + left[:, None]
        pasted = _gather_grid(probabilities, rows.clamp(0, patch[0] - 1), cols.clamp(0, patch[1] - 1))
        return torch.where(in_box, pasted, self._background(raw)[None, :, None, None])

    def _forward_by_box(self, raw: torch.Tensor, boxes: list[tuple[int, int, int, int]],
                        masks: torch.Tensor) -> torch.Tensor:
        """An image larger than the patch: crops of each box size go through the network together."""
        background = self._background(raw)
        groups: dict[tuple, list[int]] = {}
        for i, box in enumerate(boxes):  # images with the same box go through the network together
            groups.setdefault(box, []).append(i)
        rows: list[torch.Tensor | None] = [None] * raw.shape[0]
        for (y0, y1, x0, x1), index in groups.items():
            crop = raw[index, :, y0:y1, x0:x1]
            mask = masks[index, None, y0:y1, x0:x1]
            probabilities = self._predict_crop(self._normalise(crop, None, mask))
            for j, i in enumerate(index):
                row = background[:, None, None].repeat(1, *raw.shape[2:])
                row[:, y0:y1, x0:x1] = probabilities[j]
                rows[i] = row
        return torch.stack(rows)

    def _normalise(self, x: torch.Tensor, region: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """nnU-Net's normalisation per channel of the crop ``region`` (n,1,h,w) bool of ``x`` (None: all of
        ``x`` is the crop); ``mask`` (n,1,h,w) is the filled non-zero mask (needed for ``use_mask_for_norm``).
        Values outside ``region`` are left unspecified."""
        channels = []
        for c, scheme in enumerate(self.schemes):
            x_c = x[:, c:c + 1]
            if scheme == "ZScoreNormalization":
                if self.use_mask_for_norm[c]:  # statistics inside the mask, which lies inside the box
                    mean = _masked_mean(x_c, mask)
                    x_c = torch.where(mask, (x_c - mean) / _masked_std(x_c, mask, mean).clamp_min(1e-8), x_c)
                elif region is None:
                    mean = x_c.mean(dim=(2, 3), keepdim=True)
                    std = x_c.std(dim=(2, 3), keepdim=True, unbiased=False)
                    x_c = (x_c - mean) / std.clamp_min(1e-8)
                else:
                    mean = _masked_mean(x_c, region)
                    x_c = (x_c - mean) / _masked_std(x_c, region, mean).clamp_min(1e-8)
            elif scheme == "CTNormalization":
                props = self.intensity_properties[c]
                x_c = x_c.clamp(props["percentile_00_5"], props["percentile_99_5"])
                x_c = (x_c - props["mean"]) / max(props["std"], 1e-8)
            elif scheme == "RescaleTo01Normalization":
                if region is None:
                    x_c = x_c - x_c.amin(dim=(2, 3), keepdim=True)
                    x_c = x_c / x_c.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
                else:
                    inf = torch.full((), float("inf"), dtype=x_c.dtype, device=x_c.device)
                    x_c = x_c - torch.where(region, x_c, inf).amin(dim=(2, 3), keepdim=True)
                    x_c = x_c / torch.where(region, x_c, -inf).amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
            elif scheme == "RGBTo01Normalization":
                x_c = x_c / 255.0
            channels.append(x_c)  # NoNormalization: unchanged
        return torch.cat(channels, dim=1)

    def _predict_crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_plane != [0, 1]:
            x = x.transpose(2, 3)
        height, width = x.shape[2:]
        target = []
        for size, patch, div in zip((height, width), self.patch_size, self.divisor):
            size_needed = max(size, patch)
            target.append(-(-size_needed // div) * div if size_needed > patch else size_needed)
        dy, dx = target[0] - height, target[1] - width
        padding = (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2)
        logits = self.network(torch.nn.functional.pad(x, padding, mode="constant", value=0.0))
        logits = logits[:, :, dy // 2:dy // 2 + height, dx // 2:dx // 2 + width]
        probabilities = torch.softmax(logits, dim=1)
        if self.in_plane != [0, 1]:
            probabilities = probabilities.transpose(2, 3)
        return probabilities


def _within(index: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    return (index >= start) & (index < stop)


def _gather_grid(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]`` for (N,C,H,W) ``x`` and index rows (N,R), cols (N,S)."""
    n, c = x.shape[:2]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, rows.shape[1], x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(n, c, rows.shape[1], cols.shape[1]))


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.to(x.dtype)
    return (x * weight).sum(dim=(2, 3), keepdim=True) / weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)


def _masked_std(x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Population std inside ``weight``; at least 1e-8 (the callers' floor), taken on the variance so that
    a constant image (an all-zero one) gets a zero gradient instead of sqrt'(0) = inf times 0 = NaN."""
    weight = weight.to(x.dtype)
    count = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    return (((x - mean) * weight) ** 2).sum(dim=(2, 3), keepdim=True).div(count).clamp_min(1e-16).sqrt()


def _bounding_boxes(nonzero: torch.Tensor) -> torch.Tensor:
    """Half-open bounding box (y0, y1, x0, x1) of each (H,W) mask of ``nonzero`` (N,H,W), as an (N,4) int64
    tensor on its device; an all-zero image keeps the full box, as nnU-Net's ``get_bbox_from_mask`` does.

    The box of the hole-filled mask is the box of the mask itself: every pixel outside the box shares
    a background row or column with the image border, so it is never a hole."""
    edges = []
    for flags, size in ((nonzero.any(dim=2), nonzero.shape[1]), (nonzero.any(dim=1), nonzero.shape[2])):
        index = torch.arange(size, device=nonzero.device)
        empty = ~flags.any(dim=1)
        first = torch.where(flags, index, size).amin(dim=1)
        stop = torch.where(flags, index, -1).amax(dim=1) + 1
        edges += [torch.where(empty, 0, first), torch.where(empty, size, stop)]
    return torch.stack(edges, dim=1)


FILL_PASSES_PER_CHECK = 8  # row + column pass pairs of _fill_holes between two host reads


def _fill_holes(nonzero: torch.Tensor, read_back: torch.Tensor | None = None) -> tuple[torch.Tensor, list | None]:
    """nnU-Net's ``create_nonzero_mask`` hole filling (``scipy.ndimage.binary_fill_holes`` with its default
    4-connected structure) of each (H,W) mask of ``nonzero`` (N,H,W), on its device.

    A background pixel stays background when a 4-connected path of background pixels joins it to the
    border. Starting from the background border pixels, a row pass marks every run of background pixels
    along a row that holds a marked pixel (two cumulative max/min scans), a column pass does the same
    down the columns; alternating them reaches, after k pairs, every pixel whose path makes fewer than
    ~2k turns. That count depends on the mask (a spiral needs many), so after every
    ``FILL_PASSES_PER_CHECK`` pairs one host read asks whether the last pair still changed anything:
    the one host sync of the value model's forward for realistic masks, which converge within the
    first block. ``read_back`` (a tensor, e.g. the boxes) is read in the same sync and returned as a
    list (None when not asked for).
    """
    background = ~nonzero
    border = torch.zeros_like(background)
    border[:, 0], border[:, -1], border[:, :, 0], border[:, :, -1] = True, True, True, True
    # run ids: constant along a run of background pixels, different for runs split by a mask pixel
    run_ids = [torch.cumsum(nonzero, dim=dim) for dim in (2, 1)]
    reached = background & border
    while True:
        for _ in range(FILL_PASSES_PER_CHECK):
            before = reached
            for dim, run in zip((2, 1), run_ids):
                reached = background & _runs_with_a_mark(reached, run, dim)
        changed = (reached != before).any()
        if read_back is None:
            values, done = None, not bool(changed)  # the host read
        else:  # the host read: [changed, *read_back]
            values = torch.cat([changed.reshape(1, 1).expand(1, read_back.shape[1]).to(read_back.dtype),
                                read_back]).tolist()
            done, values = not values[0][0], values[1:]
        if done:
            return ~reached, values


def _runs_with_a_mark(marked: torch.Tensor, run: torch.Tensor, dim: int) -> torch.Tensor:
    """Pixels whose run (equal ``run`` id, ids non-decreasing along ``dim``) holds a ``marked`` pixel."""
    before = torch.where(marked, run, -1).cummax(dim).values == run
    after = torch.where(marked, run, run.numel() + 1).flip(dim).cummin(dim).values.flip(dim) == run
    return before | after


def _size_divisor(configuration_manager) -> list[int]:
    """Total down-sampling of the planned network per in-plane axis (product of its strides)."""
    kwargs = configuration_manager.network_arch_init_kwargs
    strides = kwargs.get("strides")
    if strides is None:
        return [1, 1]
    divisor = [1, 1]
    for stride in strides:
        stride = [stride, stride] if isinstance(stride, int) else list(stride)
        divisor = [d * int(s) for d, s in zip(divisor, stride[-2:])]
    return divisor


def load_network_weights(network: torch.nn.Module, checkpoint_path) -> None:
    """Every weight of a nnU-Net checkpoint's ``network_weights`` into ``network`` (unwrapping a compiled or
    DDP module), strictly: the protocol-continue start from the real-only model. Unlike nnU-Net's
    ``load_pretrained_weights``, the segmentation heads are loaded too (same labels, same task)."""
    from torch._dynamo import OptimizedModule

    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["network_weights"]
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise InputDataError(checkpoint_path, f"does not fit the planned network: {error}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _NullWriter:
    def write(self, text):
        return len(text)

    def flush(self):
        pass
