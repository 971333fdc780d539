#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100 or H200; torch 2.11 + CUDA 13, triton 3.6, python
# 3.12, 16 cores, no internet), at most 9 minutes: every step is time-boxed (`timeout`) to its own
# limit or to what is left of the budget (GPU_CHECK_SECONDS, default 500 s; the sweep's merge, at most
# 20 s, comes after it), in priority order, so a step that hangs or fails leaves the others their time.
#   bench/gpu_check.sh             the check (without a CUDA device it says so and exits 0)
#   bench/gpu_check.sh --dry-run   the rehearsal, on any machine: bash -n of this script, and for every
#                                  step that its command exists and its arguments parse (python scripts:
#                                  the step's arguments then --help; pytest: --collect-only of its tests)
# Everything goes under $OUT (default bench/results/gpu-<date>; a temporary folder for --dry-run):
#   summary.txt    one line per step: PASS / FAIL / SKIP, exit code, seconds, limit
#   log.txt        the machine and every step's output (benchmark tables included)
#   build.log      building fastmaml._C with its CUDA kernels (sm_90, MAX_JOBS=16)
#   tests.log      the CUDA and Triton tests: every kernel backend against the reference, the fused and
#                  generic engines on CUDA in float64, the fused path in CUDA graphs, the Triton layers
#   layers_gpu_<gpu>.json           the Triton layer kernels against their torch reference
#   meta_step_standard_<gpu>.json   issue 10's benchmark: Omniglot 5-way 1-shot (T = 32, K = 1 and 5),
#                  its training batch and the MLP: the fused engine eager and in a CUDA graph, the generic
#                  (vmap) engine, the reference, torch.func, learn2learn, higher, TorchOpt; exact float32
#                  (TF32 off), every meta-gradient checked against the reference computed in float64
#   profile_*.json the profile of the fused meta-step, eager and in a CUDA graph
#   meta_step_sweep_<gpu>.json      T in 4 16 32 64, K in 1 5 10 20, with what time is left
# Comparison libraries: build their Python 3.12 wheels here first, then carry that folder (ignored by git):
#   bench/setup_bench_env.sh --wheels carry/wheels      (device run: carry=["carry"], at most 64 MiB)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then OUT=${OUT:-$(mktemp -d)}; else OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}; fi
mkdir -p "$OUT"
LOG=$OUT/log.txt SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-500}))

say() { echo "$*" | tee -a "$LOG"; }
cap() { local left=$((DEADLINE - SECONDS)); echo $(($1 < left ? $1 : left)); }  # a step's limit: its own or what is left
rehearse() {  # the dry run's check of a command: it exists and its arguments parse
  if [ "$1" = env ]; then shift; while [[ $1 == *=* ]]; do shift; done; fi
  case "$1 ${2:-} ${3:-}" in
    "python -m pytest") python -m pytest --collect-only -q -p no:cacheprovider "${@:4}" ;;
    "python -c "*) python -c 'import ast, sys; ast.parse(sys.argv[1])' "$3" ;;
    "python setup.py "*) python setup.py build_ext --help ;;
    python*) python "${@:2}" --help ;;
    *) command -v "$1" ;;
  esac
}
step() {  # step NAME SECONDS CMD...: run (or rehearse) CMD, output to $STEP_LOG (default log.txt)
  local name=$1 limit start=$SECONDS rc status out=${STEP_LOG:-$LOG}
  limit=$(cap "$2")
  shift 2
  if [ $DRY = 1 ]; then
    rehearse "$@" >>"$out" 2>&1
  elif [ "$limit" -lt 5 ]; then
    say "== $name: SKIP (the time budget is spent)"
    echo "SKIP  $name: the time budget is spent" >>"$SUMMARY"
    return 1
  else
    timeout -k 5 "$limit" "$@" >>"$out" 2>&1
  fi
  rc=$?
  status=$([ $rc = 0 ] && echo PASS || echo FAIL)
  [ $rc = 124 ] && status="FAIL (timed out)"
  say "== $name: $status, rc=$rc in $((SECONDS - start)) s (limit $limit s)"
  local last=""  # a real run's step with its own log: that log's last line (pytest's counts)
  [ $DRY = 0 ] && [ -n "${STEP_LOG:-}" ] && last="; $(grep -v '^\s*$' "$STEP_LOG" | tail -n 1)"
  echo "$status  $name: rc=$rc, $((SECONDS - start)) s of $limit s$last" >>"$SUMMARY"
  return $rc
}

if [ $DRY = 1 ]; then
  bash -n "$0" && echo "PASS  bash -n $0" >>"$SUMMARY" || echo "FAIL  bash -n $0" >>"$SUMMARY"
elif ! timeout 60 python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here; nothing to check (exit 0)." | tee "$OUT/no_gpu.txt"
  exit 0
else
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
step "versions" 20 python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. The extension with its CUDA kernels. The system compiler first: with the image's /opt/gcc build,
#    every C++ exception from the extension crashed the process (bench/results/h100/diag.txt).
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
BUILD=(python setup.py build_ext --inplace)
if [ -x /usr/bin/g++ ]; then
  STEP_LOG=$OUT/build.log step "build (/usr/bin/g++)" 150 env CC=/usr/bin/gcc CXX=/usr/bin/g++ FASTMAML_REQUIRE_EXT=1 "${BUILD[@]}" ||
    STEP_LOG=$OUT/build.log step "build (default compiler)" 150 env FASTMAML_REQUIRE_EXT=1 "${BUILD[@]}"
else
  STEP_LOG=$OUT/build.log step "build (default compiler)" 150 env FASTMAML_REQUIRE_EXT=1 "${BUILD[@]}"
fi
step "kernel backends" 30 python -c "import fastmaml.kernels as K; print('kernel backends:', K.available_backends())"
# Does a C++ exception from the extension reach Python as an error (rc 0) or kill it (139)?
step "C++ exception probe" 30 python -c "
import torch, fastmaml._C
try:
    torch.ops.fastmaml.inner_update(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor(0.1), None)
except RuntimeError as e:
    print('C++ exception reached Python:', str(e).splitlines()[0][:120])"

# 2. The comparison libraries, from the carried wheels (without their dependencies: the image has them).
if ls carry/wheels/*.whl >/dev/null 2>&1; then
  step "comparison libraries" 60 python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site carry/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
else
  say "== comparison libraries: SKIP (no carry/wheels/*.whl: learn2learn, higher, TorchOpt will be reported as missing)"
  echo "SKIP  comparison libraries: no carry/wheels (bench/setup_bench_env.sh --wheels carry/wheels)" >>"$SUMMARY"
fi
step "baselines" 30 python -c "import sys; sys.path.insert(0, 'bench'); import baselines; print('baselines:', baselines.available(), baselines.versions())"

# 3. The CUDA and Triton tests (Triton compiled: TRITON_INTERPRET=0), float64 against the reference, in
#    parallel workers when pytest-xdist is there (a crashed worker fails its test, not the run).
XDIST=()
if [ $DRY = 0 ]; then
  export TRITON_INTERPRET=0  # (a dry run collects them with the interpreter: without it they skip on a CPU)
  python -c "import xdist" 2>/dev/null && XDIST=(-n 8)
fi
STEP_LOG=$OUT/tests.log step "CUDA and Triton tests" 150 python -m pytest -q "${XDIST[@]}" -p no:cacheprovider \
  tests/test_cuda_graph.py tests/test_engine_cuda.py tests/test_kernels.py tests/test_triton_kernels.py \
  tests/test_cpp_kernels.py tests/test_layers_triton.py

# 4. Issue 10's benchmark: --budget ends it cleanly with what it measured; the step's limit is a backstop.
L=$(cap 190)
step "standard workload" "$L" python bench/bench_meta_step.py --device cuda --tasks 32 --steps 1 5 --repeats 5 \
  --warmup 1 --group --workloads omniglot-5w1s omniglot-5w1s-train omniglot-mlp-5w1s \
  --impls reference,engine,engine-graph,engine-vmap,torch_func,learn2learn,higher,torchopt \
  --timeout 40 --budget $((L > 30 ? L - 20 : 10)) --name meta_step_standard --out "$OUT"

# 5. Where the time goes (the fused path), then the Triton layer kernels against torch (conv4 shapes).
step "profile engine" 25 python bench/profile_meta_step.py --device cuda --impl engine --out "$OUT"
step "profile engine-graph" 25 python bench/profile_meta_step.py --device cuda --impl engine-graph --out "$OUT"
step "layer kernels" 45 python bench/bench_layers_gpu.py --repeats 5 --out "$OUT"

# 6. The sweep (T in 4 16 32 64, K in 1 5 10 20) in parts, with what is left; each part's --budget ends it
#    20 s before its limit. The gradient oracle is the first implementation listed (a float64 run per
#    cell would not fit). Later files win in the merge, which runs after the budget (at most 20 s).
SW=/tmp/sweep
rm -rf $SW && mkdir -p $SW
TAG=$(timeout 15 python -c 'import sys; sys.path.insert(0, "bench"); from common import device_tag; print(device_tag("cuda"))')
GRID=(--device cuda --steps 1 5 10 20 --group --oracle first --out $SW)
sweep() {  # sweep NAME SECONDS ARGS...
  local name=$1 L
  L=$(cap "$2")
  shift 2
  step "sweep $name" "$L" python bench/bench_meta_step.py "${GRID[@]}" --budget $((L > 30 ? L - 20 : 10)) --name "$@"
}
sweep sinusoid 60 sin --tasks 4 16 32 64 --workloads sinusoid --repeats 3 --impls engine,engine-graph,torch_func
sweep omniglot-5w1s 75 o5 --tasks 4 16 32 64 --workloads omniglot-5w1s --repeats 2 --impls engine,engine-graph,torch_func
sweep "sinusoid learn2learn" 50 sin_l2l --tasks 4 16 --workloads sinusoid --repeats 1 --impls engine-graph,learn2learn
sweep omniglot-20w5s 60 o20 --tasks 4 16 32 64 --workloads omniglot-20w5s --repeats 2 --impls engine,engine-graph
DEADLINE=$((DEADLINE + 20))
parts=()
for f in $SW/sin_l2l_*.json $SW/sin_$TAG.json $SW/o5_*.json $SW/o20_*.json; do [ -e "$f" ] && parts+=("$f"); done
[ $DRY = 1 ] && parts=("$SW/a_part.json")
[ ${#parts[@]} -gt 0 ] && step "merge sweep" 20 python bench/merge_results.py "$OUT/meta_step_sweep_$TAG.json" "${parts[@]}"

say "== summary ($OUT/summary.txt, $SECONDS s in all):"
cat "$SUMMARY" | tee -a "$LOG"
failed=$(grep -c '^FAIL' "$SUMMARY")
say "gpu_check$([ $DRY = 1 ] && echo ' --dry-run'): $(grep -c '^PASS' "$SUMMARY") steps passed, $failed failed, $(grep -c '^SKIP' "$SUMMARY") skipped"
[ "$failed" = 0 ]
