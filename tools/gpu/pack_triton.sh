#!/usr/bin/env bash
# Here, before a GPU session that needs Triton >= 3.7.1 (fla's Gated DeltaNet backward on Hopper; the
# image has 3.6.0, where fla refuses it: fla issue #640, fixed in Triton 3.7.1). The wheel (198 MB) is
# over one call's carry limit: it is trimmed of what DtR never loads (the profiler's CUPTI libraries,
# the Blackwell ptxas, proton and its test libraries), packed with xz (95 MB) and split in two parts,
# .gpu_carry/triton_aa and triton_ab, carried by two calls back to back (tools/gpu/triton_371.sh).
set -euo pipefail
VERSION=3.7.1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$WORK" "triton==$VERSION"
mkdir "$WORK/site"
(cd "$WORK/site" && unzip -q "$WORK"/triton-*.whl)
rm -rf "$WORK"/site/triton/backends/nvidia/lib/cupti "$WORK"/site/triton/backends/nvidia/bin/ptxas-blackwell \
    "$WORK"/site/triton/instrumentation "$WORK"/site/triton/_C/libproton.so
tar cf - -C "$WORK/site" . | xz -T0 -6 > "$WORK/triton.tar.xz"
mkdir -p .gpu_carry
rm -f .gpu_carry/triton_a?
split -b 48000000 "$WORK/triton.tar.xz" .gpu_carry/triton_
sha256sum "$WORK/triton.tar.xz" | cut -d' ' -f1 > .gpu_carry/triton.sha256
ls -la .gpu_carry/triton_a? .gpu_carry/triton.sha256
