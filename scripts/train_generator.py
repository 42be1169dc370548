from segsynth.config import for_dataset
from segsynth.generator.train import train_generator
from segsynth.victr import train_victr
from segsynth.workflow import run_logged

# params.generator without runtime keys, as this dataset sees it (its overrides merged in)
cfg = for_dataset(snakemake.config, snakemake.wildcards.dataset)["generators"][snakemake.wildcards.generator]
if "victr" in cfg:
    stage1 = snakemake.input.stage1
    run_logged(
        snakemake,
        train_victr,
        cfg=cfg,
        stage1=stage1[0] if len(stage1) else None,
        data_dir=snakemake.input.data,
        out_dir=snakemake.output[0],
        seed=snakemake.params.seed,
        prompt_template=snakemake.params.prompt_template,
        threads=snakemake.threads,
    )
else:
    run_logged(
        snakemake,
        train_generator,
        cfg=cfg,
        data_dir=snakemake.input.data,
        out_dir=snakemake.output[0],
        seed=snakemake.params.seed,
        prompt_template=snakemake.params.prompt_template,
        threads=snakemake.threads,
        precision=snakemake.params.precision,
    )
