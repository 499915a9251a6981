#!/usr/bin/env bash
# One-shot GPU checks and benchmarks of scn_fast on a CUDA machine without network access.
#
#   bash bench/gpu_suite.sh [OUTDIR] [STAGE ...]
#
# OUTDIR defaults to bench/results/<device-name>-<date> (e.g. bench/results/NVIDIA-H100-80GB-HBM3-2026-11-25).
# STAGEs (default: all three, in this order):
#   tests  python -m pytest -m "gpu or gpu_compile" tests      -> OUTDIR/pytest-gpu.log (in logs.tar.gz)
#   bench  the full `scn-fast bench --device cuda` suite        -> OUTDIR/results.json, table.txt, *.png
#   ops    the op microbenchmarks, CUDA variants (-k cuda)      -> OUTDIR/ops.json
# Everything a stage prints also goes to the terminal; all logs (pytest, bench, per-point logs) are
# packed into OUTDIR/logs.tar.gz on exit, even when the run is cut short, so OUTDIR holds at most
# 7 files: results.json, table.txt, 3 PNGs, ops.json, logs.tar.gz.
#
# Environment knobs:
#   PYTHON              interpreter holding a CUDA torch (default: python3)
#   BENCH_MAX_MINUTES   no new benchmark point starts after this many minutes (default 5)
#   COMPILE_TIMEOUT     seconds allowed to compile the torch.compile path, per mode (default 180)
#   BENCH_ARGS          extra arguments for the bench stage (e.g. "--preset scn-t4-b2 --natoms 38,1000")
#
# Needs: a CUDA build of torch, triton, nvcc (the extension's CUDA twin is built on first use, a few
# minutes, cached for the rest of the run), ase, matplotlib, pytest, pytest-benchmark; tqdm optional.
# Nothing is downloaded: a missing package (ase is not in this workplace's GPU image) must be carried
# as a wheel and put on PYTHONPATH first (see the device tool's README). The package is used from this
# checkout (PYTHONPATH), so no install is needed.
#
# Budget: with the defaults the three stages fit in about 10 minutes on an H100 (the bench stage stops
# starting points after BENCH_MAX_MINUTES; a point already running finishes). Run the stages as
# separate commands, with the same OUTDIR, when one command has less time than that; each bench run
# rewrites results.json, so give separate bench runs separate OUTDIRs.
#
# Putting results into the repository (bench/results/):
#   1. copy OUTDIR's results.json, table.txt and PNGs (and ops.json) to bench/results/<device>-<date>/
#      (the default OUTDIR already is that folder when run from a checkout);
#   2. add one line for it to bench/README.md: date, device name as results.json's metadata.device
#      gives it, git commit (metadata.git_commit), what was run, and the headline numbers
#      (e.g. scn-t4-b2 training speedup of each fused backend at the largest size that fits);
#   3. commit the JSON/PNG files (not logs.tar.gz unless a failure needs it).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset SCN_FAST_BACKEND TRITON_INTERPRET

device_name() {
    "$PY" - <<'EOF'
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
print(re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"))
EOF
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: $PY sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["ase", "matplotlib", "pytest", "pytest_benchmark", "triton", "e3nn"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_suite: missing Python packages: $missing (carry them as wheels; nothing can be downloaded)" >&2
    exit 2
fi

OUTDIR="${1:-$REPO/bench/results/$(device_name)-$(date +%Y-%m-%d)}"
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests bench ops)
mkdir -p "$OUTDIR/logs"
OUTDIR="$(cd "$OUTDIR" && pwd)"

pack_logs() {
    if [ -d "$OUTDIR/logs" ]; then
        tar -C "$OUTDIR" -czf "$OUTDIR/logs.tar.gz" logs && rm -rf "$OUTDIR/logs"
    fi
}
trap pack_logs EXIT
trap 'exit 130' INT TERM

cd "$REPO" || exit 2
echo "gpu_suite: device $(device_name), torch $("$PY" -c 'import torch; print(torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null || echo none), output $OUTDIR, stages ${STAGES[*]}"
status=0
for stage in "${STAGES[@]}"; do
    start=$SECONDS
    case "$stage" in
    tests)
        "$PY" -m pytest -m "gpu or gpu_compile" tests -q -ra 2>&1 | tee "$OUTDIR/logs/pytest-gpu.log"
        rc=${PIPESTATUS[0]}
        ;;
    bench)
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
        "$PY" -m scn_fast.benchmark.cli --device cuda --out "$OUTDIR" \
            --max-minutes "${BENCH_MAX_MINUTES:-5}" --compile-timeout "${COMPILE_TIMEOUT:-180}" \
            ${BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/logs/bench.log"
        rc=${PIPESTATUS[0]}
        ;;
    ops)
        "$PY" -m pytest bench -q --benchmark-only -k cuda \
            --benchmark-json "$OUTDIR/ops.json" 2>&1 | tee "$OUTDIR/logs/ops.log"
        rc=${PIPESTATUS[0]}
        ;;
    *)
        echo "gpu_suite: unknown stage $stage (tests, bench, ops)" >&2
        rc=2
        ;;
    esac
    echo "gpu_suite: stage $stage finished with exit code $rc in $((SECONDS - start)) s"
    [ "$rc" -ne 0 ] && status=$rc
done
exit $status
