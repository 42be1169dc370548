# Two commands do everything on a fresh machine:  make demo  (the whole benchmark)  and  make test.
# Each creates .venv with the pinned environment first if it is missing or out of date.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: default-generator demo test test-slow test-envs test-slurm gpu-check ci install envs slurm-profile report lint dryrun paper-dryrun paper-plan papers-plan clean

install: $(STAMP)

# torch first (a CPU wheel on local disk), then everything under constraints.txt, which pins torch so no
# dependency pulls a CUDA build. timm (nnunetv2's dependency) drags in a torchvision whose import fails and
# breaks transformers/peft imports, so it is removed; nothing in segsynth needs it.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip uninstall -y -q torchvision
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(SNAKEMAKE) --profile profiles/local
	$(MAKE) --no-print-directory report
	@echo
	@echo "Tables:  results/tables/main.md  results/tables/main.parquet  results/tables/synthetic_only.md  results/tables/fidelity.md"
	@echo "Figures: results/figures/"
	@echo "Report:  results/report.html"

# The generator checkpoint the embedded default starts from (config.yaml: generators.tiny.init), reproduced by
# the DAG's own train_generator rule under presets/default_generator.yaml in build/default-generator/, then
# copied into the package (segsynth/pretrained/mni152_tiny) without its optimiser checkpoints.
default-generator: $(STAMP)
	$(SNAKEMAKE) --profile profiles/local -s Snakefile -d build/default-generator \
		--configfile config.yaml presets/default_generator.yaml -- results/mni152/generators/tiny
	rm -rf segsynth/pretrained/mni152_tiny
	cp -r build/default-generator/results/mni152/generators/tiny segsynth/pretrained/mni152_tiny
	rm -f segsynth/pretrained/mni152_tiny/.snakemake_timestamp
	chmod -R a+rX segsynth/pretrained/mni152_tiny

report: results/report.html

results/report.html: results/tables/main.tsv results/tables/adherence.md results/figures/dice.png
	$(SNAKEMAKE) --profile profiles/local --report $@

# The test suite (<= 10 min on 2 cores). The slower tiers below are marked and run by CI (.ci/run).
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not envs and not slurm"

# The whole DAG end to end with reruns, kill -9 faults, nnU-Net training (slow marker).
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not slurm"

# Each per-rule env's pip set in a fresh venv under the same constraints, then everything its rules import.
test-envs: $(STAMP)
	$(PY) -m pytest -m envs tests/test_envs.py

# On a GPU node (<= 5 min): every sampler, the trainers killed and resumed, mixed precision, no host sync per
# sampling step, nnU-Net training/resume and its value model, and one small DAG, all on CUDA. Without a CUDA
# device every check skips (the default test run collects them too).
GPU_NNUNET_TESTS := tests/test_nnunet.py::test_train_predict_save_load_value_model \
	tests/test_nnunet.py::test_resume_after_kill_ends_at_the_same_epoch
gpu-check: $(STAMP)
	@$(PY) -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device: the GPU checks skip')"
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m pytest -v -rs --durations=10 tests/test_gpu.py $(GPU_NNUNET_TESTS); \
	else $(PY) -m pytest -q -rs tests/test_gpu.py; fi

# Every tier in order: what .ci/run runs (after starting the SLURM cluster).
ci: test test-slow test-envs test-slurm

# Opt-in tier on a real one-node SLURM cluster (root, apt-get): installs and starts it if needed (idempotent),
# then runs the workflow with `snakemake --profile slurm` (the profile installed by `make slurm-profile` into a
# temporary config folder), including a scancel'led job that resumes. Stop the cluster with:
# bash tests/slurm_cluster.sh stop
test-slurm: $(STAMP)
	bash tests/slurm_cluster.sh start
	$(PY) -m pytest -m slurm tests/test_slurm.py

# Install the SLURM profile as `slurm` in your Snakemake config folder (~/.config/snakemake/slurm), so that
# `snakemake --profile slurm` finds it. Your two settings; empty ones are left to the plugin's auto-detection:
#   make slurm-profile ACCOUNT=<account|none> GPU_PARTITION=<partition> CPU_PARTITION=<partition>
# SDM=none runs the jobs in the environment snakemake runs in instead of the per-rule conda envs.
ACCOUNT ?=
GPU_PARTITION ?=
CPU_PARTITION ?=
GPUS_PER_NODE ?= 8
SDM ?= conda
slurm-profile: $(STAMP)
	$(PY) -m segsynth.slurm_profile --account "$(ACCOUNT)" --gpu-partition "$(GPU_PARTITION)" \
		--cpu-partition "$(CPU_PARTITION)" --gpus-per-node $(GPUS_PER_NODE) --software-deployment $(SDM)

# Regenerate envs/*.yaml from constraints.txt and the rules' imports (tests/test_envs.py checks they agree).
envs: $(STAMP)
	$(PY) -m segsynth.envs

lint: $(STAMP)
	$(SNAKEMAKE) --lint

dryrun: $(STAMP)
	$(SNAKEMAKE) -n

# The papers' whole benchmark (presets/paper.yaml) dry-run on placeholder copies of its three datasets: the ~1000
# jobs resolve (quiet; for the job counts per rule add PAPER_DRYRUN_FLAGS="--quiet rules", ~0.4 s more: Snakemake
# then expands every job's resources to describe it).
PAPER_DRYRUN_FLAGS ?= -q
paper-dryrun: $(STAMP)
	@tmp=$$(mktemp -d) && $(PY) -m segsynth.data.placeholders $$tmp > /dev/null && \
	start=$$(date +%s%N) && \
	$(SNAKEMAKE) -n --nolock $(PAPER_DRYRUN_FLAGS) --configfile config.yaml presets/paper.yaml $$tmp/paths.yaml && \
	echo "paper DAG resolved in $$(( ($$(date +%s%N) - start) / 1000000 )) ms (placeholder datasets in $$tmp)"

# What the papers' benchmark costs in H100-hours, per stage and in total, before anything is submitted: the jobs of
# Snakemake's own DAG (dry run on placeholder datasets, as paper-dryrun) × the work of each from the config × unit
# costs from this run's benchmarks/ when present, else the documented defaults of segsynth/plan.py; baseline,
# each reduction the workflow makes, what-ifs. PAPER_PLAN_FLAGS="--remaining" plans only what is left to run.
PAPER_PLAN_FLAGS ?=
paper-plan: $(STAMP)
	@tmp=$$(mktemp -d) && $(PY) -m segsynth.data.placeholders $$tmp > /dev/null && \
	$(PY) -m segsynth.plan $(PAPER_PLAN_FLAGS) --configfile config.yaml presets/paper.yaml $$tmp/paths.yaml

# The same for every paper's tables (`snakemake papers`): presets/paper.yaml + presets/papers_gpu.yaml (LAW/ORDER,
# LEAF and ViCTr on SD v1.5, VGD's ablations, sweep and rounds, the cross-domain set), on placeholder datasets.
papers-plan: $(STAMP)
	@tmp=$$(mktemp -d) && $(PY) -m segsynth.data.placeholders $$tmp > /dev/null && \
	$(PY) -m segsynth.plan $(PAPER_PLAN_FLAGS) --target papers --configfile config.yaml presets/paper.yaml \
		presets/papers_gpu.yaml $$tmp/paths.yaml $$tmp/paths_papers.yaml

clean:
	rm -rf results logs benchmarks .snakemake
