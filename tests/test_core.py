"""The small shared modules: atomic writes, per-step randomness and checkpoints, config checks, script glue."""

import copy
import types

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from segsynth.config import check_references, method_params, validate_config
from segsynth.errors import ConfigError
from segsynth.io import atomic_dir, atomic_path, read_json, write_json
from segsynth.training import (Checkpointer, claim_checkpoint_dir, inputs_fingerprint, releases_unused_claims, step_rng,
                               step_torch_generator)
from segsynth.workflow import run_logged


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": np.int64(1)})
    assert read_json(target) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("v2")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_step_randomness_depends_only_on_seed_step_and_stream():
    assert np.array_equal(step_rng(1, 5).integers(0, 100, 8), step_rng(1, 5).integers(0, 100, 8))
    assert not np.array_equal(step_rng(1, 5).integers(0, 100, 8), step_rng(1, 6).integers(0, 100, 8))
    a = torch.randn(4, generator=step_torch_generator(2, 3))
    assert torch.equal(a, torch.randn(4, generator=step_torch_generator(2, 3)))
    assert not torch.equal(a, torch.randn(4, generator=step_torch_generator(2, 3, stream=1)))


def test_checkpointer_round_trip(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(tmp_path, every=2, objects={"model": model})
    assert ckpt.restore() == 0
    ckpt.maybe_save(1, total=10)
    assert not ckpt.path.exists()
    ckpt.maybe_save(2, total=10)
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert Checkpointer(tmp_path, 2, {"model": model}).restore() == 2
    assert torch.equal(model.weight, saved["weight"])


def test_a_checkpoint_directory_of_another_job_is_emptied_not_resumed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.npz").write_bytes(b"x")
    job = {"cfg": {"lr": 1e-3, "betas": (0.9, 0.99)}, "seed": 0, "inputs": inputs_fingerprint([data, None])}
    ckpt = claim_checkpoint_dir(tmp_path / "out.ckpt", job)
    (ckpt / "last.pt").write_bytes(b"state")
    # the same job (tuples compare as the lists job.json holds) keeps its checkpoint
    assert (claim_checkpoint_dir(ckpt, copy.deepcopy(job)) / "last.pt").exists()
    # another seed, another config value, a rewritten input: the checkpoint is discarded
    for changed in ({**job, "seed": 1}, {**job, "cfg": {"lr": 2e-3, "betas": (0.9, 0.99)}}):
        (ckpt / "last.pt").write_bytes(b"state")
        claim_checkpoint_dir(ckpt, job)
        assert not (claim_checkpoint_dir(ckpt, changed) / "last.pt").exists()
        assert read_json(ckpt / "job.json")["cfg"] == copy.deepcopy(changed)["cfg"] | {"betas": [0.9, 0.99]}
    claim_checkpoint_dir(ckpt, job)
    (ckpt / "last.pt").write_bytes(b"state")
    (data / "train.npz").write_bytes(b"yy")
    assert inputs_fingerprint([data, None]) != job["inputs"]
    assert not (claim_checkpoint_dir(ckpt, {**job, "inputs": inputs_fingerprint([data, None])}) / "last.pt").exists()
    # a directory from before job.json existed (an older checkpoint format) is discarded too
    legacy = tmp_path / "legacy.ckpt"
    legacy.mkdir()
    (legacy / "last.pt").write_bytes(b"old format")
    assert not (claim_checkpoint_dir(legacy, job) / "last.pt").exists()
    assert read_json(legacy / "job.json")["seed"] == 0



def test_a_failed_trainer_leaves_no_empty_claim_but_keeps_its_checkpoints(tmp_path):
    @releases_unused_claims
    def trainer(out, checkpoint_steps):
        ckpt = claim_checkpoint_dir(out, {"seed": 0})
        for step in range(checkpoint_steps):
            (ckpt / "last.pt").write_bytes(b"state %d" % step)
        raise ValueError("bad input found after the claim")

    with pytest.raises(ValueError, match="bad input"):
        trainer(tmp_path / "early.ckpt", 0)
    assert not (tmp_path / "early.ckpt").exists()
    with pytest.raises(ValueError, match="bad input"):
        trainer(tmp_path / "late.ckpt", 2)
    assert (tmp_path / "late.ckpt" / "last.pt").read_bytes() == b"state 1"  # the rerun resumes from it

def _default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_default_config_is_valid_and_method_params_merge_in_order():
    config = _default_config()
    validate_config(config)
    config["datasets"]["mni152"].update(guidance_scale=3.0, mask_guidance_scale=2.0)
    config["methods"]["rd"] = {"sampler": "ddim", "steps": 7}
    validate_config(config)
    params = method_params(config, "mni152", "rd")
    assert params["steps"] == 7 and params["guidance_scale"] == 3.0 and params["mask_guidance_scale"] == 2.0
    assert params["budget"] == config["synthesis"]["budget"]


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["run"].update(segmenters=["missing"]), "run.segmenters"),
    (lambda c: c["run"].update(value_segmenter="missing"), "run.value_segmenter"),
    (lambda c: c["run"].update(adherence_judge="missing"), "run.adherence_judge"),
    (lambda c: c["segmenters"]["unet"].update(steps=0), "segmenters.unet.steps"),
    (lambda c: c["generators"]["tiny"]["training"].update(extra=1), "generators.tiny.training"),
])
def test_config_errors_name_the_key(edit, key):
    config = _default_config()
    edit(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert err.value.key == key


def test_check_references_accepts_the_default():
    check_references(_default_config())


def test_run_logged_writes_the_traceback_to_the_log_and_reraises(tmp_path):
    log = tmp_path / "job.log"
    smk = types.SimpleNamespace(log=[str(log)], threads=1)

    def fails():
        raise ConfigError("methods.x.sampler", "unknown sampler")

    with pytest.raises(ConfigError):
        run_logged(smk, fails)
    text = log.read_text()
    assert "Traceback" in text and "config key 'methods.x.sampler': unknown sampler" in text
    assert run_logged(smk, lambda value: value * 2, value=21) == 42


def test_canonical_params_do_not_depend_on_key_order():
    from segsynth.config import canonical

    a = canonical({"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": 0}})
    b = canonical({"a": {"x": 0, "y": [1, {"p": 3, "q": 2}]}, "b": 1})
    assert repr(a) == repr(b) == "{'a': {'x': 0, 'y': [1, {'p': 3, 'q': 2}]}, 'b': 1}"
