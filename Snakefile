# segsynth: a benchmark of utility-guided synthetic data for medical image segmentation.
#
# DAG: dataset splits → generator fine-tuning → miner training → per-seed guided synthesis → segmenter training
#      → evaluation → metric tables, figures and the Snakemake HTML report.
# Run:  snakemake --profile profiles/local        (or profiles/slurm on a cluster)

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/splits.smk"
include: "rules/generator.smk"
include: "rules/miner.smk"
include: "rules/synthesis.smk"
include: "rules/segmenters.smk"
include: "rules/evaluation.smk"
include: "rules/tables.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
