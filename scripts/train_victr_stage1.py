from segsynth.config import for_dataset, victr_stage1_generator
from segsynth.victr import train_victr_stage1
from segsynth.workflow import run_logged

# the entry of the first generator with this Stage 1 (its runtime settings, checkpoint_every, included); the job
# reads only its Stage-1 settings, which params.settings holds
dataset = snakemake.wildcards.dataset
cfg = for_dataset(snakemake.config, dataset)["generators"][
    victr_stage1_generator(snakemake.config, dataset, snakemake.wildcards.key)]
run_logged(
    snakemake,
    train_victr_stage1,
    cfg=cfg,
    source_dir=snakemake.input.source,
    data_dir=snakemake.input.data,
    out_path=snakemake.output[0],
    seed=snakemake.params.seed,
    prompt_template=snakemake.params.prompt_template,
    threads=snakemake.threads,
)
