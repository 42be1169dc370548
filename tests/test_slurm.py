"""The workflow on a real SLURM cluster: the one-node cluster of tests/slurm_cluster.sh, driven by
``snakemake --profile slurm`` with the profile that ``make slurm-profile`` installs.

Opt-in (``make test-slurm`` starts the cluster, then runs ``pytest -m slurm tests/test_slurm.py``); without a
responding ``sinfo`` the whole module is skipped at once. The profile is installed by the make target a user
runs (account none, partitions gpu and cpu, no conda: no channel is reachable here) into a temporary Snakemake
config folder, and found by name. The tier adds only what the one-node cluster needs: its workflow profile
(tests/profiles/slurm-node: node-sized threads and memory), squeue status (no slurmdbd) and fast polling. Checks
that

- the DAG runs through the SLURM executor plugin (sbatch, srun job steps, squeue status, the fake GPU GRES, the
  profile's job groups and partition file) and produces exactly the tables a local ``--cores 2`` run of the same
  config produces (CPU runs are deterministic);
- a training job cancelled with ``scancel`` while RUNNING is resubmitted by the profile's retry, resumes from its
  checkpoint, and the workflow ends with complete outputs identical to an uninterrupted run's.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO


def _cluster_responds() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    states = result.stdout.split()
    return result.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states)


if not _cluster_responds():
    pytest.skip("no responding SLURM cluster (start one with: bash tests/slurm_cluster.sh start)",
                allow_module_level=True)

pytestmark = pytest.mark.slurm

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
NODE_PROFILE = ["--workflow-profile", str(REPO / "tests" / "profiles" / "slurm-node")]
# What `snakemake --profile slurm` gets on the test cluster beyond the installed profile: see the docstring.
CLUSTER = ["--profile", "slurm", *NODE_PROFILE, "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs"]
CONFIGS = [str(REPO / "tests" / "config" / name) for name in ("e2e.yaml", "slurm.yaml")]
GENERATOR = "results/mni152/generators/tiny"
CONFIG_HOME = Path(os.environ.get("SEGSYNTH_TEST_CONFIG_HOME", "/tmp/segsynth-slurm-tier-config"))


def snakemake_command(*args, timeout):
    # timeout -k: a hung snakemake ignores SIGTERM (the facts in ../shared/docs/local-slurm.md)
    return ["timeout", "-k", "15", str(timeout), SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args]


def environment():
    # The venv's bin first: the SLURM jobs inherit it (sbatch --export=ALL) and start snakemake and python from it.
    # XDG_CONFIG_HOME: where `make slurm-profile` installed the profile that `--profile slurm` finds.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                XDG_CONFIG_HOME=str(CONFIG_HOME))


@pytest.fixture(scope="module", autouse=True)
def slurm_profile():
    """The profile as a user installs it: `make slurm-profile` with the test cluster's settings."""
    shutil.rmtree(CONFIG_HOME, ignore_errors=True)
    install = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "slurm-profile", "ACCOUNT=none",
                              "GPU_PARTITION=gpu", "CPU_PARTITION=cpu", "GPUS_PER_NODE=1", "SDM=none"],
                             env=environment(), capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    profile = CONFIG_HOME / "snakemake" / "slurm"
    assert (profile / "config.yaml").is_file() and (profile / "partitions.yaml").is_file()
    return profile


def snakemake(*args, cwd, timeout):
    result = subprocess.run(snakemake_command(*args, timeout=timeout), cwd=cwd, env=environment(),
                            capture_output=True, text=True)
    if result.returncode in (124, 137):  # killed: the working directory stays locked
        subprocess.run(snakemake_command("--unlock", *args, timeout=120), cwd=cwd, env=environment(),
                       capture_output=True)
    return result


def report(result) -> str:
    return f"rc={result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def jobs(rule: str | None = None, after: int = 0) -> list[tuple[int, str]]:
    """(job id, state) of the jobs of ``rule`` or job group (all if None) with ids above ``after`` that slurmctld
    still knows (finished ones for MinJobAge=600 s), oldest first. The plugin puts rule_<rule or group>_... in
    --comment."""
    return [(i, state) for i, state, _ in job_rows(rule, after)]


def job_rows(rule: str | None = None, after: int = 0) -> list[tuple[int, str, str]]:
    """(job id, state, partition), as ``jobs``."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%P|%k"], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split("|", 3) for line in out.splitlines() if line.count("|") == 3]
    return sorted((int(i), state, partition) for i, state, partition, comment in rows
                  if int(i) > after and (rule is None or comment.startswith(f"rule_{rule}_")))


def last_job_id() -> int:
    return max((i for i, _ in jobs()), default=0)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The SLURM config's whole DAG run by the local executor: the numbers the cluster runs must reproduce."""
    workdir = tmp_path_factory.mktemp("local")
    run = snakemake("--configfile", *CONFIGS, "--cores", "2", *NODE_PROFILE, cwd=workdir, timeout=600)
    assert run.returncode == 0, report(run)
    return workdir


def test_the_dag_runs_through_slurm_and_matches_a_local_run(tmp_path, local_reference):
    before = last_job_id()
    run = snakemake(*CLUSTER, "--configfile", *CONFIGS, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, report(run)

    # Every cluster rule went through sbatch and finished there, short ones inside their group's job (training
    # + evaluation + profiling, synthesis + adherence); table rules are localrules.
    log = run.stdout + run.stderr
    assert "Using profiles slurm" in log and "Job stats" in log
    partitions = {}
    for name in ("splits", "train_generator", "segmenter_real", "fidelity_reference", "synthesis",
                 "segmenter_augmented"):
        rows = job_rows(name, after=before)
        assert rows and {state for _, state, _ in rows} == {"COMPLETED"}, (name, rows)
        partitions[name] = {partition for _, _, partition in rows}
    assert len(jobs(after=before)) == 6, jobs(after=before)  # 6 SLURM jobs for 11 cluster rule jobs
    # The partition file: gpu=1 jobs (groups holding one) on the GPU partition, the others on the CPU one.
    assert partitions == {"splits": {"cpu"}, "train_generator": {"gpu"}, "segmenter_real": {"gpu"},
                          "fidelity_reference": {"gpu"}, "synthesis": {"gpu"}, "segmenter_augmented": {"gpu"}}, partitions
    # A gpu=1 rule asked SLURM for the (fake) GPU.
    generator_job = jobs("train_generator", after=before)[-1][0]
    details = subprocess.run(["scontrol", "show", "job", str(generator_job)], capture_output=True, text=True).stdout
    assert "gpu:1" in details, details

    for table in ("main.parquet", "adherence.parquet", "segmenters.parquet"):
        cluster = pd.read_parquet(tmp_path / "results" / "tables" / table)
        local = pd.read_parquet(local_reference / "results" / "tables" / table)
        if table == "segmenters.parquet":  # wall-clock training time differs between any two runs
            cluster, local = cluster.drop(columns="train_s"), local.drop(columns="train_s")
        pd.testing.assert_frame_equal(cluster, local, check_exact=True)
    main = pd.read_parquet(tmp_path / "results" / "tables" / "main.parquet")
    assert set(main["method"]) == {"baseline", "rd"} and len(main) > 0
    for figure in ("dice.png", "samples_mni152_tiny.png"):
        assert (tmp_path / "results" / "figures" / figure).stat().st_size > 1000


def test_a_cancelled_training_job_is_resubmitted_and_resumes_from_its_checkpoint(tmp_path, local_reference):
    # Start from the local run's dataset splits, so the generator's job is the only cluster job.
    shutil.copytree(local_reference / "results" / "mni152" / "data", tmp_path / "results" / "mni152" / "data")
    checkpoint = tmp_path / f"{GENERATOR}.ckpt" / "last.pt"
    before = last_job_id()
    process = subprocess.Popen(snakemake_command(*CLUSTER, "--configfile", *CONFIGS,
                                                 "--", GENERATOR, timeout=540),
                               cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    cancelled = None
    try:
        # Cancel the generator's first SLURM job once it is RUNNING and has written a checkpoint.
        deadline = time.monotonic() + 300
        while cancelled is None and time.monotonic() < deadline and process.poll() is None:
            running = [i for i, state in jobs("train_generator", after=before) if state == "RUNNING"]
            if running and checkpoint.exists():
                subprocess.run(["scancel", str(running[0])], check=True)
                cancelled = running[0]
            time.sleep(0.5)
        output, _ = process.communicate(timeout=540)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if process.returncode in (124, 137):
        subprocess.run(snakemake_command("--unlock", "--configfile", *CONFIGS, timeout=120), cwd=tmp_path,
                       env=environment(), capture_output=True)
    assert cancelled is not None, "the generator's job never ran with a checkpoint written:\n" + output[-5000:]
    assert process.returncode == 0, f"rc={process.returncode}\n{output[-8000:]}"

    # SLURM saw the cancelled job and the retry's second job, which completed.
    assert jobs("splits", after=before) == []
    attempts = jobs("train_generator", after=before)
    assert attempts[0] == (cancelled, "CANCELLED") and attempts[-1][1] == "COMPLETED", attempts
    assert len(attempts) == 2, attempts

    # The second attempt resumed from the checkpoint, trained to the end and cleaned up after itself.
    stats = json.loads((tmp_path / GENERATOR / "train_stats.json").read_text())
    assert stats["steps"] == 60 and stats["resumed_from"] >= 5, stats
    log = (tmp_path / "logs" / "mni152" / "generators" / "tiny.log").read_text()
    assert f"at step {stats['resumed_from']}" in log and "resumed from" in log, log[-3000:]
    assert not checkpoint.parent.exists()

    # Resumed training is the uninterrupted training: the same weights as the local run, which was never killed.
    reference = local_reference / GENERATOR
    for part in ("unet", "controlnet"):
        weights = sorted((tmp_path / GENERATOR / part).glob("*.safetensors"))
        assert weights, f"no weights in {part}"
        for path in weights:
            assert path.read_bytes() == (reference / part / path.name).read_bytes(), path
    resumed, uninterrupted = (torch.load(d / "prompt_embedding.pt") for d in (tmp_path / GENERATOR, reference))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
