# Call 1: the GPU, versions, make gpu-check (its end-to-end DAG deselected: the FID weights come in calls 2-3),
# then the SD-shape bench. Everything lands in $OUT.
source .device/common.sh
[ -z "${LOCAL_DRY:-}" ] && { unpack .device/a.tar.xz; unpack .device/s.tar.xz; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee $OUT/gpu.txt
$PY - <<'PYEOF' 2>&1 | tee -a $OUT/gpu.txt
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
for m in ["numpy", "pandas", "scipy", "diffusers", "transformers", "huggingface_hub", "peft", "accelerate", "monai",
          "nnunetv2", "SimpleITK", "snakemake", "nilearn", "torchmetrics", "pyarrow", "seaborn", "matplotlib",
          "skimage", "sklearn", "jsonschema", "yaml", "pytest"]:
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "FAILED", repr(e))
for m in ["segsynth.generator", "segsynth.sampling", "segsynth.miner", "segsynth.segmenters", "segsynth.segmenters.nnunet",
          "segsynth.bench", "segsynth.evaluation", "segsynth.victr", "segsynth.law", "segsynth.segmenters.leaf"]:
    try:
        importlib.import_module(m); print("import", m, "ok")
    except Exception as e:
        print("import", m, "FAILED", repr(e))
PYEOF
t0=$(date +%s)
DESELECT="--deselect tests/test_gpu.py::test_a_small_dag_runs_end_to_end_on_cuda"
command -v make >/dev/null || echo "no make on the device"
timeout -k 10 ${CHECK_S:-280} make gpu-check PY=$PY STAMP= PYTEST_ADDOPTS="$DESELECT" > $OUT/gpu_check.log 2>&1
echo "gpu-check rc=$? in $(( $(date +%s) - t0 )) s" | tee -a $OUT/gpu_check.log
tail -45 $OUT/gpu_check.log
t0=$(date +%s)
timeout -k 10 ${BENCH_S:-250} $PY -m segsynth.bench sampling --shapes sd15 --threads 8 ${BENCH_ARGS:-} \
  > $OUT/bench_sd15.jsonl 2> $OUT/bench_sd15.log
echo "bench rc=$? in $(( $(date +%s) - t0 )) s"
tail -15 $OUT/bench_sd15.log; cat $OUT/bench_sd15.jsonl
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv
