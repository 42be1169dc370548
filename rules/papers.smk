# The five papers' tables and figures in their layouts (segsynth/papers.py): `snakemake paper_vgd`, `paper_miner`,
# `paper_law_order`, `paper_leaf`, `paper_victr`, and `snakemake papers` for all of them and the index
# results/papers/README.md. Each item is a view over what this run's config makes; an item or row the run does
# not make stays, saying why (and which preset makes it).


localrules:
    papers,
    papers_index,


# each paper's items, worked out once per parse
PAPER_SPECS = {paper: paper_specs(paper) for paper in PAPERS}


for _paper, _specs in PAPER_SPECS.items():

    rule:
        name:
            f"paper_{_paper}"
        input:
            **paper_inputs(_specs),
        output:
            paper_outputs(_paper, _specs, for_report=True),
        params:
            code=code("paper_tables"),
            paper=_paper,
            specs=_specs,
        log:
            f"logs/papers/{_paper}.log",
        conda:
            "../envs/tables.yaml"
        localrule: True
        script:
            "../scripts/paper_tables.py"


rule papers_index:
    """results/papers/README.md: each paper table and figure, its file, and the DAG outputs it comes from."""
    input:
        [f"results/papers/{paper}/manifest.json" for paper in PAPERS],
    output:
        report(
            "results/papers/README.md",
            caption="../report/papers.rst",
            category="Papers",
            labels={"file": "index"},
        ),
    params:
        code=code("papers_index"),
    log:
        "logs/papers/index.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/papers_index.py"


rule papers:
    """Every paper's tables and figures, and their index."""
    input:
        [f for paper, specs in PAPER_SPECS.items() for f in paper_outputs(paper, specs)],
        "results/papers/README.md",
