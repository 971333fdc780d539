#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100 or H200; torch 2.11 + CUDA 13, triton 3.6, python
# 3.12, no internet). Budget: about 9 minutes, every step time-boxed, so that a step that hangs or
# fails leaves the others their time. Everything it produces goes under $OUT (default
# bench/results/gpu-<date>), at most 8 files:
#   log.txt        the machine, each step's outcome and time, the benchmark tables
#   build.log      building fastmaml._C with its CUDA kernels (sm_90)
#   tests.log      kernel tests on every backend (Triton compiled), the layer kernels, the engine's
#                  fused and generic paths against the reference on CUDA in float64, CUDA-graph tests
#   layers_gpu_<gpu>.json           the Triton layer kernels against their torch reference
#   meta_step_standard_<gpu>.json   the standard workload (Omniglot 5-way 1-shot, 15 queries, T=32,
#                  K=1 and 5) and the omniglot-5w1s training workload (1 query per class) and the paper's MLP without convolutions (omniglot-mlp-5w1s): the fused
#                  engine, eager and in a CUDA graph, the generic (vmap) engine, the reference,
#                  torch.func, and learn2learn / higher / TorchOpt from the wheels in carry/wheels
#   meta_step_sweep_<gpu>.json      the sweep: T in 4 16 32 64, K in 1 5 10 20 (see step 6)
#   profile_*.json the profile of the engine's meta-step, eager and in a CUDA graph
# Without a GPU it says so and exits 0, so it can be rehearsed on any machine.
# Comparison libraries: build their Python 3.12 wheels here first, then carry that folder:
#   bench/setup_bench_env.sh --wheels carry/wheels      (device run: carry=["carry"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run CMD time-boxed, output appended to the log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  say "== $name: rc=$rc in $((SECONDS - start)) s (limit $limit s)"
}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here; nothing to check (exit 0)." | tee "$OUT/no_gpu.txt"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"

# 1. The extension with its CUDA kernels. The system compiler first: with the image's /opt/gcc
#    build, every C++ exception from the extension crashed the process (bench/results/h100/diag.txt).
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
if [ -x /usr/bin/g++ ]; then
  CC=/usr/bin/gcc CXX=/usr/bin/g++ FASTMAML_REQUIRE_EXT=1 timeout 100 python setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  say "== build with /usr/bin/g++ ($(/usr/bin/g++ -dumpfullversion)): rc=$rc in $((SECONDS - start)) s"
else
  rc=1
fi
if [ $rc -ne 0 ]; then
  start=$SECONDS
  FASTMAML_REQUIRE_EXT=1 timeout 100 python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  rc=$?
  say "== build with the default compiler ($(c++ -dumpfullversion)): rc=$rc in $((SECONDS - start)) s"
fi
python -c "import fastmaml.kernels as K; print('kernel backends:', K.available_backends())" 2>&1 | tee -a "$LOG"
# Does a C++ exception from the extension reach Python as an error (rc 0 here) or kill it (139)?
timeout 30 python -c "
import torch, fastmaml._C
t = torch.zeros(2, 3)
try:
    torch.ops.fastmaml.inner_update(t, torch.zeros(2, 4), torch.tensor(0.1), None)
except RuntimeError as e:
    print('C++ exception reached Python:', str(e).splitlines()[0][:120])
" >>"$LOG" 2>&1
say "== C++ exception probe: rc=$? (0: raised as RuntimeError; 139: crashed)"

# 2. The comparison libraries, from the carried wheels (without their dependencies: the image has them).
if ls carry/wheels/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site carry/wheels/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python -c "
import sys; sys.path.insert(0, 'bench')
import baselines; print('baselines:', baselines.available(), baselines.versions())" 2>&1 | tee -a "$LOG"

# 3. Tests that exercise the GPU, in parallel workers (a crashed worker fails its test, not the run).
TRITON_INTERPRET=0 timeout 120 python -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda_graph.py \
  tests/test_engine_cuda.py tests/test_kernels.py tests/test_triton_kernels.py tests/test_cpp_kernels.py \
  tests/test_layers_triton.py >"$OUT/tests.log" 2>&1
say "== tests (fused and generic engine vs reference on CUDA, cuda graph, kernels on every backend, triton layer kernels compiled): rc=$? : $(tail -n 1 "$OUT/tests.log")"

# 3b. The Triton layer kernels against their torch reference (cuDNN / ATen), float32, conv4 shapes.
step "layer kernels" 45 python bench/bench_layers_gpu.py --repeats 5 --out "$OUT"

# 4. The standard workload against everything. --budget ends each benchmark cleanly with what it
#    measured; the step's own limit is only a backstop.
#    Every meta-gradient is checked against the reference computed in float64; TF32 is off.
#    engine = the fused path (auto), engine-vmap = the generic path it replaces.
step "standard workload" 200 python bench/bench_meta_step.py --device cuda --tasks 32 --steps 1 5 --repeats 5 --warmup 1 \
  --group --workloads omniglot-5w1s omniglot-5w1s-train omniglot-mlp-5w1s \
  --impls reference,engine,engine-graph,engine-vmap,torch_func,learn2learn,higher,torchopt \
  --timeout 40 --budget 185 --name meta_step_standard --out "$OUT"

# 5. Where the time goes (the fused path).
step "profile engine" 25 python bench/profile_meta_step.py --device cuda --impl engine --out "$OUT"
step "profile engine-graph" 25 python bench/profile_meta_step.py --device cuda --impl engine-graph --out "$OUT"

# 6. The sweep (T in 4 16 32 64, K in 1 5 10 20), in parts sized to the budget: learn2learn (a
#    Python loop over T x K task-steps) at T 4 and 16 with one timed step after the checked one, and
#    20-way 5-shot without torch.func. Each part has its own file; later files win in the merge.
#    The gradient oracle here is the first implementation listed (a float64 run per cell would not fit).
SW=/tmp/sweep; rm -rf $SW; mkdir -p $SW
GRID="--device cuda --steps 1 5 10 20 --group --oracle first"
step "sweep sinusoid" 60 python bench/bench_meta_step.py $GRID --tasks 4 16 32 64 --workloads sinusoid --repeats 3 \
  --impls engine,engine-graph,torch_func --budget 45 --name sin --out $SW
step "sweep sinusoid learn2learn" 45 python bench/bench_meta_step.py $GRID --tasks 4 16 --workloads sinusoid \
  --repeats 1 --impls engine-graph,learn2learn --budget 30 --name sin_l2l --out $SW
step "sweep omniglot-5w1s" 75 python bench/bench_meta_step.py $GRID --tasks 4 16 32 64 --workloads omniglot-5w1s \
  --repeats 2 --impls engine,engine-graph,torch_func --budget 60 --name o5 --out $SW
step "sweep omniglot-20w5s" 60 python bench/bench_meta_step.py $GRID --tasks 4 16 32 64 --workloads omniglot-20w5s \
  --repeats 2 --impls engine,engine-graph --budget 45 --name o20 --out $SW
TAG=$(python -c 'import sys; sys.path.insert(0, "bench"); from common import device_tag; print(device_tag("cuda"))')
step "merge sweep" 20 python bench/merge_results.py "$OUT/meta_step_sweep_$TAG.json" $SW/sin_l2l_*.json \
  $SW/sin_$TAG.json $SW/o5_*.json $SW/o20_*.json
grep "^== " "$LOG"
