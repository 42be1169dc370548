"""Install the project's SLURM profile where ``snakemake --profile slurm`` finds it.

Snakemake resolves a bare profile name in the current folder, then in the user's Snakemake config folder
(``~/.config/snakemake/<name>``, platformdirs' user config dir), then the site folder. This writes
``<user config dir>/slurm/config.yaml``: the repository's ``profiles/slurm/config.yaml`` plus the user's two
site settings, and ``partitions.yaml`` when partitions are given.

- Account: ``--account NAME`` (sbatch -A); ``none`` for clusters without accounts; empty: the plugin detects it.
- Partitions: ``--gpu-partition`` and ``--cpu-partition`` write the plugin's partition file, so jobs with
  ``gpu=1`` go to the GPU partition and all others to the CPU one (the same name twice is fine); empty: the
  cluster's default partition (``sinfo``), for every job.

Run through ``make slurm-profile ACCOUNT=... GPU_PARTITION=... CPU_PARTITION=...``; rerun it to change them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parents[1] / "profiles" / "slurm" / "config.yaml"
PARTITIONS_FILE = "partitions.yaml"


def user_profile_dir(name: str = "slurm") -> Path:
    """Where Snakemake's profile lookup finds ``--profile <name>`` for this user (its own platformdirs call)."""
    from snakemake.common import get_appdirs

    return Path(get_appdirs().user_config_dir) / name


def profile_settings(account: str = "", gpu_partition: str = "", cpu_partition: str = "", gpus_per_node: int = 8,
                     software_deployment: str = "conda") -> tuple[dict, dict | None]:
    """The profile's settings (template + site settings) and the partition file's content (None: no file)."""
    settings = yaml.safe_load(TEMPLATE.read_text())
    if software_deployment == "none":
        settings.pop("software-deployment-method", None)
    elif software_deployment:
        settings["software-deployment-method"] = software_deployment
    if account == "none":
        settings["slurm-no-account"] = True
    elif account:
        settings.setdefault("default-resources", {})["slurm_account"] = account
    partitions = None
    if bool(gpu_partition) != bool(cpu_partition):
        raise SystemExit("slurm_profile: give both GPU_PARTITION and CPU_PARTITION (the same name twice is fine), "
                         "or neither for the cluster's default partition")
    if gpu_partition:
        # The plugin scores partitions per job: gpu=1 jobs fit only where max_gpu > 0, CPU jobs prefer max_gpu 0.
        partitions = {"partitions": {cpu_partition: {"max_gpu": 0}}}
        partitions["partitions"][gpu_partition] = {"max_gpu": int(gpus_per_node)}
        settings["slurm-partition-config"] = PARTITIONS_FILE
    return settings, partitions


def install(destination: Path, settings: dict, partitions: dict | None) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by `make slurm-profile` from {TEMPLATE} plus your site settings;\n"
              "# rerun it to change them (edits here are overwritten).\n")
    files = {"config.yaml": header + yaml.safe_dump(settings, sort_keys=False)}
    if partitions is not None:
        files[PARTITIONS_FILE] = header + yaml.safe_dump(partitions, sort_keys=False)
    elif (destination / PARTITIONS_FILE).exists():
        (destination / PARTITIONS_FILE).unlink()
    for name, text in files.items():
        tmp = destination / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, destination / name)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--account", default="", help="SLURM account; 'none' for none; empty: auto-detect")
    parser.add_argument("--gpu-partition", default="", help="partition for gpu=1 jobs")
    parser.add_argument("--cpu-partition", default="", help="partition for all other jobs")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of a node of the GPU partition")
    parser.add_argument("--software-deployment", default="conda", choices=["conda", "none"],
                        help="per-rule conda envs (default), or none: the environment snakemake runs in")
    parser.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    parser.add_argument("--dest", type=Path, default=None, help="profile folder (default: the user config dir)")
    args = parser.parse_args(argv)
    settings, partitions = profile_settings(args.account, args.gpu_partition, args.cpu_partition,
                                            args.gpus_per_node, args.software_deployment)
    destination = args.dest or user_profile_dir(args.name)
    install(destination, settings, partitions)
    print(f"installed: {destination}/config.yaml — run `snakemake --profile {args.name}` from the repository")
    return destination


if __name__ == "__main__":
    main()
