#!/usr/bin/env bash
# The GPU path checked in one call, within about 8 minutes on one CUDA GPU:
#   1. install this checkout (with its test extras) into $PYTHON's environment;
#   2. `pytest -m cuda`: every stage tiny in bf16 and fp16, every sampler, compile=true, exact resume
#      with EMA, torchrun on two GPUs when there are two;
#   3. the quickstart's pipeline (its data and models, fewer steps) on CUDA, with its figures;
#   4. scripts/bench_sample.py and scripts/bench_train_diffusion.py, preset sd15, against diffusers.
# Every log and figure goes into OUTDIR; OUTDIR/summary.txt has one line per step. Exit 0 when every
# step passed or when there is no CUDA GPU (then nothing runs: the summary says so), 1 otherwise.
#
#   scripts/gpu_check.sh OUTDIR
#   PYTHON=/path/to/python GPU_CHECK_SECONDS=480 scripts/gpu_check.sh OUTDIR
#
# No internet is needed: PyTorch (with CUDA) must already be installed for $PYTHON; the rest of the
# dependencies are installed when a package index is reachable, else the checkout alone is.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-480}
START=$SECONDS
FAILED=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_SECONDS COMMAND...: run COMMAND into OUT/NAME.log, stopped after CAP_SECONDS or when
# the whole budget is spent, whichever comes first; one summary line either way
step() {
  local name=$1 cap=$2
  shift 2
  local remaining=$((BUDGET - (SECONDS - START)))
  if ((remaining < 15)); then
    note "$name: not run (the ${BUDGET} s budget is spent)"
    FAILED=1
    return 1
  fi
  ((cap > remaining)) && cap=$remaining
  local began=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  if ((code == 0)); then
    note "$name: ok ($((SECONDS - began)) s)"
    return 0
  fi
  local why="exit $code"
  ((code == 124 || code == 137)) && why="stopped after $cap s"
  note "$name: FAILED ($why; see $name.log)"
  FAILED=1
  return 1
}

if ! "$PYTHON" -c "import torch" > /dev/null 2>&1; then
  note "PyTorch is not installed for $PYTHON (set PYTHON=...): nothing was checked"
  exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA GPU visible to $PYTHON: the GPU checks were skipped"
  exit 0
fi
"$PYTHON" - > "$OUT/environment.txt" 2>&1 << 'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for index in range(torch.cuda.device_count()):
    properties = torch.cuda.get_device_properties(index)
    print(f"cuda:{index} {properties.name}, {properties.total_memory / 2**30:.0f} GiB, capability {properties.major}.{properties.minor}")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/environment.txt" 2>&1
note "$(head -n 2 "$OUT/environment.txt" | tr '\n' ' ')"

# 1. install: the checkout as a package (configs included), dependencies from an index if one answers
cd "$REPO" || exit 1
if ! step install 150 "$PYTHON" -m pip install --no-build-isolation "$REPO[test]"; then
  step install-offline 90 "$PYTHON" -m pip install --no-build-isolation --no-deps "$REPO" || exit 1
fi

# 2. the cuda-marked tests
step cuda-tests 200 "$PYTHON" -m pytest -m cuda -n 0 -p no:cacheprovider -q -rs --junitxml="$OUT/cuda-tests.xml" tests

# 3. the quickstart's data, autoencoder, U-Net and figures on CUDA, with fewer training steps
step quickstart 150 "$PYTHON" -c "
from pathlib import Path
from ldm_cli.quickstart import print_summary, run_quickstart
out = Path('$OUT/quickstart')
print_summary(out, run_quickstart(out, 'cuda', extra_vae=['train.max_steps=300'], extra_diffusion=['train.max_steps=500']))
"

# 4. speed against diffusers, SD-1.5-sized
step bench-sample 90 "$PYTHON" scripts/bench_sample.py --preset sd15 --device cuda --repeats 3
step bench-train-diffusion 90 "$PYTHON" scripts/bench_train_diffusion.py --preset sd15 --device cuda --repeats 3

note "total: $((SECONDS - START)) s; logs and figures in $OUT"
exit $FAILED
