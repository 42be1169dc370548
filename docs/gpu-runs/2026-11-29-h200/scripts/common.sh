# Sourced by each device call: unpack the carried site trees (packages the device image lacks, cp312 wheels
# installed with pip --target here) onto PYTHONPATH, and a `snakemake` beside python3 as the tests expect.
export PYTHONUNBUFFERED=1
SITE=${SITE:-/root/site}; PARTS=${PARTS:-/root/parts}
mkdir -p "$SITE" "$PARTS"
PY=${PY:-$(command -v python3)}
export PYTHONPATH=$SITE:$PWD
unpack() { local t0=$(date +%s); tar -C "$SITE" -xJf "$1" && echo "unpacked $1 in $(( $(date +%s) - t0 )) s"; }
if [ -z "${LOCAL_DRY:-}" ]; then
cat > "$(dirname "$PY")/snakemake" <<WRAP
#!$PY
import sys
from snakemake.cli import main
sys.exit(main())
WRAP
chmod +x "$(dirname "$PY")/snakemake"
fi
