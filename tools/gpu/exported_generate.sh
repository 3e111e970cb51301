#!/usr/bin/env bash
# Issue 15 on the lent GPU in one call of at most 9 minutes, from the repo root, with .whl carried:
#   bash tools/gpu/exported_generate.sh
# 1. At once, in parallel: the static-decoding `gpu` tests (tests/ops/test_gpu_static_decoding.py, with
#    their own Triton cache and only the first config of each autotuner: DEVELOPERS.md "GPU"), and fla's
#    full autotuning of the GLA students' prompt kernels at both shapes (bench.attention --warm-only, one
#    process per shape, as tools/gpu/gpu_all.sh warms up).
# 2. bench.exported_generate: benchmark 5 (an exported hybrid's generate() on 64 left-padded prompts of
#    1K-8K tokens, 256 new tokens each, k = 0, L/4, L/2, 3L/4 linear, both shapes) beside generate_static
#    on the same prompts, starting no row after what is left of BUDGET_S (less a row's worth).
# BENCH_ARGS: extra arguments for it, e.g. "--model llama-1b --linear-counts 0 8" for a shorter call.
# Back in $OUT: gpu_tests.log, warm_{llama-1b,qwen-1.5b}.log, exported_generate.{md,json,log}.

source tools/gpu/device_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
BUDGET_S=${BUDGET_S:-510}
DEADLINE=$(($(date +%s) + BUDGET_S))
WARM_S=${WARM_S:-200}

(TRITON_CACHE_DIR=/tmp/triton-tests DTR_TRITON_FIRST_CONFIG=1 TRITON_F32_DEFAULT=ieee timeout -k 10 "$WARM_S" \
    python3 -m pytest -m gpu -n 4 -p no:benchmark --tb=short tests/ops/test_gpu_static_decoding.py \
    > "$OUT/gpu_tests.log" 2>&1; echo "== gpu tests: exit $? ($(tail -n 1 "$OUT/gpu_tests.log"))") &
for shape in llama-1b qwen-1.5b; do
    (timeout -k 10 "$WARM_S" python3 -m bench.attention --warm-only --lengths 8192 --shape "$shape" --kinds gla \
        --passes fwd > "$OUT/warm_$shape.log" 2>&1; echo "== fla warm-up $shape: exit $?") &
done
wait

LEFT=$((DEADLINE - $(date +%s)))
echo "== bench.exported_generate, ${LEFT}s left"
timeout -k 10 "$LEFT" python3 -m bench.exported_generate --budget $((LEFT - 90)) $BENCH_ARGS \
    --out "$OUT/exported_generate.md" > "$OUT/exported_generate.log" 2>&1
echo "== bench.exported_generate: exit $?"
grep -v "Loading weights\|Writing model" "$OUT/exported_generate.log" | tail -n 60
