#!/usr/bin/env bash
# GPU bring-up kit: checks and benchmarks every GPU path of scn_fast in one offline command.
#
#   bash bench/gpu_suite.sh [OUTDIR] [--wheels DIR]     on a machine with one CUDA GPU (about 8 min)
#   bash bench/gpu_suite.sh --rehearse [OUTDIR]         the same plumbing on CPU (under 3 min; CI)
#
# Works from a plain checkout: nothing is installed and nothing is downloaded. The checkout is put on
# PYTHONPATH (scn_fast.kernels is found in the top-level kernels/ folder by scn_fast itself); wheel
# files in DIR (e.g. ase, which GPU images lack) are installed offline into a scratch folder
# (pip --no-index --no-deps --target) that goes on PYTHONPATH too. Every missing tool or package is
# named before anything starts (exit 2). TORCH_CUDA_ARCH_LIST is set from the device's compute
# capability, MAX_JOBS from the core count.
#
# OUTDIR (default: ${TMPDIR:-/tmp}/scn_fast-gpu-suite/<date>-<device>, outside the checkout) receives
# at most 8 files, no folders: results.json, table.txt, three PNGs, logs.tar.gz. Stages, deadlines and
# outputs: bench/gpu_suite.py; how to run it on a GPU machine and read the results: bench/GPU.md.
#
# Environment: PYTHON (interpreter, default python3); SCN_FAST_EXT_DIR (extension build folder,
# default torch's); SCN_GPU_SUITE_KEEP_SCRATCH=1 keeps the scratch folder.
set -uo pipefail

T0=$(date +%s.%N)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
REHEARSE=0
WHEELS=""
OUTDIR=""

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --rehearse) REHEARSE=1 ;;
    --wheels)
        [ $# -ge 2 ] || usage
        WHEELS="$2"
        shift
        ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    -h | --help) usage ;;
    -*) echo "gpu_suite: unknown option $1" >&2; usage ;;
    *)
        [ -z "$OUTDIR" ] || { echo "gpu_suite: two output folders given ($OUTDIR, $1)" >&2; usage; }
        OUTDIR="$1"
        ;;
    esac
    shift
done

say() { printf '[gpu_suite %6.1f s] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }

# ---------------------------------------------------------------------------- tools, before anything
missing=()
command -v "$PY" >/dev/null 2>&1 || missing+=("python ($PY)")
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=("a C++ compiler (c++/g++)")
if [ "$REHEARSE" -eq 0 ]; then
    if ! command -v nvcc >/dev/null 2>&1; then
        for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
            if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
                export CUDA_HOME="$d" PATH="$d/bin:$PATH"
                break
            fi
        done
        command -v nvcc >/dev/null 2>&1 || missing+=("nvcc (CUDA toolkit; set CUDA_HOME)")
    fi
fi
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    missing+=("the wheel folder $WHEELS")
fi
fail_missing() {
    printf 'gpu_suite: missing: %s\n' "${missing[@]}" >&2
    echo "gpu_suite: nothing was run. Bring missing packages as wheel files (--wheels DIR), see bench/GPU.md" >&2
    exit 2
}
# without the interpreter or the wheels, the package check below cannot run
if ! command -v "$PY" >/dev/null 2>&1 || { [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; }; then
    fail_missing
fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/scn_fast-gpu-suite.XXXXXX")"
if [ "${SCN_GPU_SUITE_KEEP_SCRATCH:-0}" != 1 ]; then
    trap 'rm -rf "$SCRATCH"' EXIT
fi

# ---------------------------------------------------------------------------- wheels, offline
installed=""
if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_suite: no .whl file in $WHEELS" >&2
        exit 2
    fi
    mkdir -p "$SCRATCH/site"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
        --target "$SCRATCH/site" "${wheels[@]}" >"$SCRATCH/pip.log" 2>&1; then
        # no pip, or pip refused: a wheel is a zip archive laid out for site-packages
        "$PY" - "$SCRATCH/site" "${wheels[@]}" <<'EOF' || { cat "$SCRATCH/pip.log" >&2; exit 2; }
import sys, zipfile
for whl in sys.argv[2:]:
    zipfile.ZipFile(whl).extractall(sys.argv[1])
EOF
    fi
    for w in "${wheels[@]}"; do installed+="$(basename "$w") "; done
fi
export PYTHONPATH="$REPO${SCRATCH:+:$SCRATCH/site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export SCN_GPU_SUITE_WHEELS="$installed" SCN_GPU_SUITE_T0="$T0"
unset SCN_FAST_BACKEND TRITON_INTERPRET

# ninja: on PATH, or the PyPI package's binary (torch runs `ninja` from PATH)
if ! command -v ninja >/dev/null 2>&1; then
    nbin=$("$PY" -c "import ninja, os; print(getattr(ninja, 'BIN_DIR', ''))" 2>/dev/null)
    [ -n "$nbin" ] && [ -x "$nbin/ninja" ] && export PATH="$nbin:$PATH"
fi

# ---------------------------------------------------------------------------- Python packages
info=$("$PY" - "$REHEARSE" <<'EOF'
import importlib, importlib.util, re, shutil, sys
rehearse = sys.argv[1] == "1"
need = ["torch", "triton", "numpy", "scipy", "ase", "e3nn", "matplotlib", "pytest",
        "pytest_benchmark", "cpuinfo", "setuptools"]
missing = [n for n in need if importlib.util.find_spec(n) is None]
for mod in ("ase.build", "e3nn.o3", "pytest_benchmark.plugin"):  # their own dependencies too
    if mod.split(".")[0] not in missing:
        try:
            importlib.import_module(mod)
        except Exception as exc:
            missing.append(f"a working {mod} ({type(exc).__name__}: {exc})")
if shutil.which("ninja") is None:
    missing.append("ninja (executable or the ninja package)")
device, arch, torch_version = "cpu-rehearsal", "", "none"
if importlib.util.find_spec("torch") is not None:
    import torch
    torch_version = torch.__version__
    if not rehearse:
        if torch.version.cuda is None:
            missing.append(f"a CUDA build of torch (found {torch.__version__})")
        elif not torch.cuda.is_available():
            missing.append(f"a visible CUDA device (torch {torch.__version__} sees none)")
        else:
            arch = "%d.%d" % torch.cuda.get_device_capability()
            device = re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-")
try:
    import scn_fast.kernels  # noqa: F401  (the checkout on PYTHONPATH)
except Exception as exc:
    missing.append(f"an importable scn_fast.kernels ({type(exc).__name__}: {exc})")
print("\t".join(missing) or "-")
print(device)
print(arch or "-")
print(f"python {sys.version.split()[0]}, torch {torch_version}")
EOF
)
{ read -r missing_pkgs; read -r device; read -r arch; read -r versions; } <<<"$info"
if [ "${missing_pkgs:-?}" != "-" ]; then
    IFS=$'\t' read -r -a pk <<<"${missing_pkgs:-(the package check itself failed: $info)}"
    missing+=("${pk[@]}")
fi
[ ${#missing[@]} -eq 0 ] || fail_missing

# ---------------------------------------------------------------------------- device, output folder
if [ "$REHEARSE" -eq 0 ]; then
    if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$TORCH_CUDA_ARCH_LIST" != "$arch" ]; then
        say "TORCH_CUDA_ARCH_LIST was $TORCH_CUDA_ARCH_LIST; set to the device's $arch"
    fi
    export TORCH_CUDA_ARCH_LIST="$arch"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
if [ -z "$OUTDIR" ]; then
    OUTDIR="${TMPDIR:-/tmp}/scn_fast-gpu-suite/$(date -u +%Y-%m-%d)-$device"
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -n "$(ls -A "$OUTDIR")" ]; then
    echo "gpu_suite: $OUTDIR is not empty; give an empty or new output folder" >&2
    exit 2
fi
case "$OUTDIR/" in
"$REPO"/*) say "note: OUTDIR is inside the checkout ($OUTDIR)" ;;
esac

load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "")
cores=$(nproc 2>/dev/null || echo 1)
export SCN_GPU_SUITE_LOAD="$load"
if [ -n "$load" ] && awk -v l="$load" -v c="$cores" 'BEGIN { exit !(l > c) }'; then
    export SCN_GPU_SUITE_BUSY="WARNING: the machine is busy before the start (load average $load > $cores cores): timings will scatter"
    say "$SCN_GPU_SUITE_BUSY"
fi
say "device $device, $versions, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} MAX_JOBS=$MAX_JOBS wheels: ${installed:-none}; output $OUTDIR; scratch $SCRATCH"

args=("$OUTDIR" --scratch "$SCRATCH")
[ "$REHEARSE" -eq 1 ] && args+=(--rehearse)
"$PY" "$REPO/bench/gpu_suite.py" "${args[@]}"
rc=$?
say "finished with exit code $rc; results in $OUTDIR"
exit $rc
