# Source at the start of every command on the lent GPU machine (see DEVELOPERS.md, "GPU").
# The bare image has torch + transformers only: install the carried wheels (.whl/: fla, einops,
# pytest, pytest-xdist, ...) into /tmp/site, and restore fla's autotune choices, because its first-use
# autotuning otherwise compiles every config serially (minutes per kernel): the committed ones
# (tools/gpu/autotune/triton-<version>.tgz, H200) and then .gpu_cache/triton.tgz when an earlier call of
# this session brought one back.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$TRITON_CACHE_DIR"
restore_autotune_choices() {  # $1: the Triton version, $2: the session's own tgz
    local committed; committed=tools/gpu/autotune/triton-$1.tgz
    if [ -f "$committed" ]; then tar xzf "$committed" -C "$TRITON_CACHE_DIR"; fi
    if [ -f "$2" ]; then tar xzf "$2" -C "$TRITON_CACHE_DIR"; fi
}
restore_autotune_choices 3.6.0 .gpu_cache/triton.tgz

# Call at the end: hands the (grown) Triton cache back through $OUT for the next call to carry.
save_triton_cache() { tar czf "$OUT/triton.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton.tgz"; }
