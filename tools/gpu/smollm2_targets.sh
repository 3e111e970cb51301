#!/usr/bin/env bash
# Issue 13's measurements on the lent GPU: SmolLM2-135M-Instruct (real weights), GLA students
# distilled in stream mode from the BBC train split (issue 4's settings), 5% relative perplexity
# tolerance. Run from the repo root, after tools/gpu/smollm2_model.sh in the same warm machine:
#   bash tools/gpu/smollm2_targets.sh perplexity          the perplexity-only run (to the end), with its card
#   bash tools/gpu/smollm2_targets.sh guarded 1024        + a pass-key guard at 1024 tokens (within 5 points)
#   bash tools/gpu/smollm2_targets.sh headlines           a free-form target: BBC headlines, token F1
# Every run shares one stage cache (/var/tmp/smollm2-cache): the guarded run reuses the students and
# every perplexity score of the perplexity run and scores only its guard. Settings by environment as in
# smollm2_quality.sh: TOKENS (1M), EPOCHS (2; EPOCHS= empty trains on the budget, cycling the data), MODEL_DTYPE (bfloat16), EVAL_EXAMPLES (200),
# EVAL_BATCH (100), LIMIT_S (540), ACCEPTANCE (point | bootstrap: the search's acceptance rule, default
# the product's), CONFIDENCE (the bootstrap's, default the product's), STUDENT (gla | gated_deltanet),
# WINDOW and SHORT_CONV (the student's softmax window, unset: the product's auto, and convolution size), SHARED_KV=0
# (one K/V projection per query head; unset: the product's default, shared), GENERAL_SHARE (share of
# general text in the distillation data). Back in $OUT: smollm2_<run>.log and report_<run>.{json,md};
# <run> names the student options, the general share and the acceptance rule when given.
set -o pipefail
EPOCHS=${EPOCHS-2}  # unset: issue 4's 2 passes; set empty: the token budget decides
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DTR_MODEL_CACHE=/var/tmp/models
export PYTHONPATH=/tmp/site_quality:$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps fla (and Triton 3.7.1) when device_env.sh was sourced
MODE=${1:?perplexity | guarded LENGTH | headlines}
COMMON=(--model smollm2-135m --model-dtype "${MODEL_DTYPE:-bfloat16}" --mode stream
        --token-budget "${TOKENS:-1000000}" ${EPOCHS:+--epochs "$EPOCHS"} --max-length 512 --batch-size 32
        --eval-examples "${EVAL_EXAMPLES:-200}" --eval-batch-size "${EVAL_BATCH:-100}" --device cuda
        --cache-dir /var/tmp/smollm2-cache
        ${ACCEPTANCE:+--acceptance "$ACCEPTANCE"} ${CONFIDENCE:+--confidence "$CONFIDENCE"}
        ${STUDENT:+--student "$STUDENT"} ${WINDOW:+--window "$WINDOW"} ${SHORT_CONV:+--short-conv "$SHORT_CONV"}
        $([[ ${SHARED_KV-} == 0 ]] && echo --no-shared-kv)
        ${GENERAL_SHARE:+--general-share "$GENERAL_SHARE"})
case $MODE in
    perplexity)
        NAME=perplexity
        ARGS=(--dataset bbc_news --target-kind perplexity --tolerance 0.05 --run-to-end) ;;
    guarded)
        LENGTH=${2:?guarded needs the pass key context length in tokens}
        NAME=guarded_${LENGTH}_${PASSKEY_EXAMPLES:-40}
        ARGS=(--dataset bbc_news --target-kind perplexity --tolerance 0.05
              --guard "kind=passkey,name=passkey_$LENGTH,context_tokens=$LENGTH,num_examples=${PASSKEY_EXAMPLES:-40},batch_size=${PASSKEY_EXAMPLES:-40},tolerance=0.05,tolerance_mode=absolute") ;;
    headlines)
        NAME=headlines
        python3 tools/example_targets.py /var/tmp/example_targets || exit 1
        ARGS=(--dataset /var/tmp/example_targets/headlines.jsonl --target-kind token_f1 --tolerance 0.05
              --target 'name=headline_f1,label_field=headline,prompt_template=Article: {text}\nHeadline:,num_fewshot=1,max_length=160') ;;
    *) echo "unknown mode $MODE"; exit 2 ;;
esac
NAME=$NAME${STUDENT:+_$STUDENT}${WINDOW:+_w$WINDOW}${SHORT_CONV:+_c$SHORT_CONV}$([[ ${SHARED_KV-} == 0 ]] && echo _kv_per_query)${GENERAL_SHARE:+_g$GENERAL_SHARE}${ACCEPTANCE:+_$ACCEPTANCE}
nvidia-smi -L
timeout -k 10 "${LIMIT_S:-540}" python3 -m dtr_core "${COMMON[@]}" "${ARGS[@]}" \
    --output-dir "/var/tmp/smollm2-$NAME" > "$OUT/smollm2_$NAME.log" 2>&1
STATUS=$?
tail -n 30 "$OUT/smollm2_$NAME.log"
for ext in json md; do
    report="/var/tmp/smollm2-$NAME/report/report.$ext"
    if [[ -f $report ]]; then cp "$report" "$OUT/report_$NAME.$ext"; fi
done
for plot in /var/tmp/smollm2-"$NAME"/report/*.png; do [[ -f $plot ]] && cp "$plot" "$OUT/${NAME}_$(basename "$plot")"; done
exit $STATUS
