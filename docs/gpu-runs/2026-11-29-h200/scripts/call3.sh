# Call 3: the FID weights complete, the end-to-end DAG of make gpu-check on CUDA.
source .device/common.sh
cat "$PARTS/fid.part00" .device/fid.part01 > "$PARTS/fid.tar.xz" && unpack "$PARTS/fid.tar.xz"
t0=$(date +%s)
timeout -k 10 ${CHECK_S:-300} $PY -m pytest -v -rs --durations=5 tests/test_gpu.py::test_a_small_dag_runs_end_to_end_on_cuda \
  > $OUT/gpu_check_e2e.log 2>&1
echo "e2e rc=$? in $(( $(date +%s) - t0 )) s" | tee -a $OUT/gpu_check_e2e.log
tail -30 $OUT/gpu_check_e2e.log
