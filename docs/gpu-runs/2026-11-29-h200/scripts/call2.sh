# Call 2: keep the first half of the FID weights' archive; with time to spare, the SD-shape lever bench.
source .device/common.sh
cp .device/fid.part00 "$PARTS/" && ls -la "$PARTS"
[ -d "$SITE/diffusers" ] || { echo "fresh machine: the site trees of call 1 are gone"; exit 3; }
if [ -n "${LEVERS:-}" ]; then
  t0=$(date +%s)
  timeout -k 10 ${BENCH_S:-200} $PY -m segsynth.bench sampling --shapes sd15 --threads 8 --levers --only "$LEVERS" \
    ${BENCH_ARGS:-} > $OUT/bench_levers.jsonl 2> $OUT/bench_levers.log
  echo "levers rc=$? in $(( $(date +%s) - t0 )) s"; tail -25 $OUT/bench_levers.log; cat $OUT/bench_levers.jsonl
fi
