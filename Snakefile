# segsynth: a benchmark of utility-guided synthetic data for medical image segmentation.
#
# DAG: dataset splits → generator fine-tuning → miner training → per-seed guided synthesis → segmenter training
#      → evaluation → metric tables, figures and the Snakemake HTML report.
# Run:  snakemake --profile profiles/local   (make demo), or snakemake --profile slurm after make slurm-profile

import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# segsynth is imported from this workflow's folder: here, and in every job, whatever environment runs it (the
# per-rule conda envs do not install the project; Snakemake's script preamble appends the launcher's sys.path).
# Parsing stays torch-free (segsynth.config and segsynth.provenance import no torch): every dry run, and every
# cluster job's own start-up, pays for what is imported while parsing.
if workflow.basedir not in sys.path:
    sys.path.insert(0, workflow.basedir)

from segsynth.config import for_dataset, schema_file


configfile: "config.yaml"


report: "report/workflow.rst"


# schemas/config.schema.yaml, through a JSON copy that parses in milliseconds (segsynth.config.schema_file)
SCHEMA = schema_file(Path(workflow.basedir) / "schemas" / "config.schema.yaml")
validate(config, SCHEMA)
# ... and so must each dataset's view of it, its overrides merged in (datasets.<name>.overrides)
for _dataset, _entry in config["datasets"].items():
    if _entry.get("overrides"):
        validate(for_dataset(config, _dataset), SCHEMA)


include: "rules/common.smk"
include: "rules/splits.smk"
include: "rules/generator.smk"
include: "rules/miner.smk"
include: "rules/synthesis.smk"
include: "rules/segmenters.smk"
include: "rules/evaluation.smk"
include: "rules/tables.smk"
include: "rules/papers.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
