#!/usr/bin/env bash
# The CUDA and NCCL path, proved in one call on a CUDA machine (a lent device starts bare, with about
# 10 minutes a command): build with the CUDA sources, run the CUDA-capable tests, the pack/unpack and
# averaging benchmarks on the GPU, and a profile of one sync; all within a wall-clock budget, printing
# as it goes and writing results.md (a table of steps, then each step's output tail) and each step's log.
#
#   bash scripts/gpu_check.sh                      # on the CUDA machine (results under $OUT or ./gpu_check_out)
#   bash scripts/gpu_check.sh --dry-run --out DIR  # anywhere: prints and records every step without running it
#   bash scripts/gpu_check.sh --fetch-wheels DIR   # here, with an index: the pure-Python test tools to carry
#
# Options: --budget SECONDS (default 480), --out DIR, --wheels DIR (install missing test tools from there,
# offline), --arch LIST (TORCH_CUDA_ARCH_LIST, default 9.0: the H200).
set -uo pipefail
cd "$(dirname "$0")/.."

budget=480
out="${OUT:-gpu_check_out}"
wheels=""
arch="9.0"
dry_run=0
# The build and test tools a bare device may lack, fetched here for its interpreter (GPU_PYTHON_VERSION,
# default 3.12) and installed there offline; pip leaves any already installed as they are.
TEST_TOOLS=(pytest pluggy iniconfig packaging pytest-timeout hypothesis attrs sortedcontainers setuptools ninja)

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --budget)
      [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs a whole number of seconds, got '${2:-}'" >&2; exit 2; }
      budget=$2; shift 2 ;;
    --out) [ -n "${2:-}" ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; out=$2; shift 2 ;;
    --wheels) [ -d "${2:-}" ] || { echo "gpu_check: --wheels needs an existing folder, got '${2:-}'" >&2; exit 2; }; wheels=$2; shift 2 ;;
    --arch) [ -n "${2:-}" ] || { echo "gpu_check: --arch needs a TORCH_CUDA_ARCH_LIST, e.g. 9.0" >&2; exit 2; }; arch=$2; shift 2 ;;
    --fetch-wheels)
      [ -n "${2:-}" ] || { echo "gpu_check: --fetch-wheels needs a folder" >&2; exit 2; }
      mkdir -p "$2" && exec python -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" -d "$2" "${TEST_TOOLS[@]}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$out"
results="$out/results.md"
started=$(date +%s)
{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), budget ${budget} s$([ $dry_run = 1 ] && echo ', dry run'))"
  echo
  echo "| step | exit | seconds |"
  echo "| --- | ---: | ---: |"
} > "$results"
tails="$out/tails.md"
: > "$tails"
failures=0

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under the smaller of its limit and what is left of
# the budget, tees its output to $out/NAME.log, and records its exit status and time.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( budget - ($(date +%s) - started) ))
  echo "=== gpu_check: $name (limit ${limit} s, ${left} s of the budget left): $*"
  if [ $dry_run = 1 ]; then
    echo "| $name | dry run | 0 |" >> "$results"
    return 0
  fi
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: budget spent | 0 |" >> "$results"
    failures=$((failures + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (timed out)') | $(( $(date +%s) - begin )) |" >> "$results"
  { echo; echo "## $name (exit $rc)"; echo; echo '```'; tail -n 40 "$out/$name.log"; echo '```'; } >> "$tails"
  [ "$rc" = 0 ] || failures=$((failures + 1))
}

step environment 60 bash -c 'nvidia-smi; python -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"gpus\", torch.cuda.device_count())"; nvcc --version | tail -n 2'

if [ -n "$wheels" ]; then
  step test_tools 120 python -m pip install --quiet --no-index --find-links "$wheels" "${TEST_TOOLS[@]}"
fi

# One Hopper target: the device's own, and the shortest CUDA build.
step build 300 env LOCALSGD_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
  python setup.py build_ext --inplace

step import 60 python -c "import torch, localsgd_ext; assert torch.ops.localsgd_ext.pack_into.default.has_kernel_for_dispatch_key('CUDA'), 'no CUDA kernel registered'; print('CUDA kernels registered')"

step tests 240 python -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_quantize.py

step bench_pack_unpack 120 python bench/cuda_pack_unpack.py --device cuda --rounds 11 --json "$out/cuda_pack_unpack.json"

# NCCL at world size 1 (one GPU; NCCL refuses two ranks on one device, and bench/averaging_latency.py needs
# a GPU per rank): the engine against one flat all_reduce and Accelerate's algorithm, then a profile.
step sync_world_size_1 150 python scripts/profile_one_sync.py --device cuda --shapes transformer tiny wide --rounds 11
# Where the machine has 2+ GPUs, the full comparison with Accelerate's LocalSGD over NCCL.
if [ $dry_run = 1 ] || [ "$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -ge 2 ]; then
  step bench_averaging_nccl 180 python bench/averaging_latency.py --device cuda --ranks 2 --shapes wide tiny transformer --rounds 7 --no-sweep --out "$out/averaging"
fi

{ echo; echo "Finished in $(( $(date +%s) - started )) s with $failures failed or skipped steps."; cat "$tails"; } >> "$results"
rm -f "$tails"
echo "=== gpu_check: results in $results ($failures failed or skipped steps)"
cat "$results" | head -n 20
[ $dry_run = 1 ] || [ $failures = 0 ]
