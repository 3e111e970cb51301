#!/usr/bin/env bash
# Issue 15 on the lent GPU: the fused prefill kernels' `gpu` tests, one student layer against the attention it
# replaces (bench.student_prefill, with each row's kernels), and the hybrids' prefill at batch 1 and 8
# (bench.hybrid_inference, prefill only), both shapes, and the batch-1 prompts with the full model and the L/2
# hybrid timed in turns (bench.prefill_alternating: host-bound rows whose time moves between processes). Results land
# in $OUT; the Triton autotune choices come back as $OUT/triton.tgz (carry them next time as .gpu_cache/triton.tgz).
# Usage, from the repository root on the device (carry .whl): bash tools/gpu/prefill.sh
# STAGES="tests layer hybrid alternating" (default all four), SHAPES, STUDENTS, BATCHES (prefill batches), WINDOW and
# SHARED_KV (0: one K/V projection per query head; unset: the product's default, shared) pick what runs;
# LIMIT_S (default 560) stops starting new runs. Everything takes about 20 minutes: split it over calls.
source tools/gpu/device_env.sh
LIMIT_S=${LIMIT_S:-560}
STAGES=${STAGES:-"tests layer hybrid alternating"}
SHAPES=${SHAPES:-"llama-1b qwen-1.5b"}
STUDENTS=${STUDENTS:-"gla gated_deltanet"}
BATCHES=${BATCHES:-"1 8"}
WINDOW=${WINDOW:-0}  # the students' softmax window
STUDENT_OPTIONS=(--window "$WINDOW" $([[ ${SHARED_KV-} == 0 ]] && echo --no-shared-kv))
tag=$([[ $WINDOW == 0 ]] || echo "_w$WINDOW")$([[ ${SHARED_KV-} == 0 ]] && echo _kv_per_query)
time_left() { (( SECONDS < LIMIT_S )); }
run() { echo "== $* (at ${SECONDS}s)"; "$@"; }

if [[ $STAGES == *tests* ]]; then
    # First-config autotuning (tests/conftest.py) in a cache of its own, so the benchmarks' choices stay honest.
    TRITON_CACHE_DIR=/tmp/triton-tests DTR_TRITON_FIRST_CONFIG=1 TRITON_F32_DEFAULT=ieee run python3 -m pytest -m gpu \
        -n 4 -p no:benchmark -q --tb=short tests/ops/test_prefill_kernels.py tests/ops/test_prefill_graphs.py \
        tests/ops/test_gpu_static_decoding.py \
        2>&1 | tail -15
fi
if [[ $STAGES == *layer* ]]; then
    for shape in $SHAPES; do
        time_left && run python3 -m bench.student_prefill --shape "$shape" --kinds $STUDENTS "${STUDENT_OPTIONS[@]}" \
            --profile 12 --out "$OUT/layer_$shape$tag.md" > "$OUT/layer_$shape$tag.log" 2>&1
    done
fi
if [[ $STAGES == *hybrid* ]]; then
    for student in $STUDENTS; do
        for shape in $SHAPES; do
            half=$([[ $shape == llama-1b ]] && echo 8 || echo 14)
            for batch in $BATCHES; do
                lengths="2048 8192"
                [[ $batch == 1 ]] && lengths="2048 8192 131072"
                time_left && run python3 -m bench.hybrid_inference --model "$shape" --student "$student" "${STUDENT_OPTIONS[@]}" --contexts \
                    --lengths $lengths --linear-counts 0 "$half" --prefill-batch "$batch" \
                    --out "$OUT/prefill${batch}_${student}_$shape$tag.md" > /dev/null
            done
        done
    done
fi
if [[ $STAGES == *alternating* ]]; then
    time_left && run python3 -m bench.prefill_alternating --model $SHAPES --student $STUDENTS "${STUDENT_OPTIONS[@]}" \
        --lengths 2048 8192 --rounds 10 --warm-up 15 --out "$OUT/alternating$tag.md" > /dev/null
fi
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton.tgz" -T -)
if compgen -G "$OUT/*.log" > /dev/null; then tail -n 4 "$OUT"/*.log; rm -f "$OUT"/*.log; fi
(cd "$OUT" && ls ./*.json > /dev/null 2>&1 && tar czf results_json.tgz ./*.json && rm -f ./*.json)
echo "== done after ${SECONDS}s"
