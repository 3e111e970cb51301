# Source at the start of every command on the lent GPU machine (see DEVELOPERS.md, "GPU").
# The bare image has torch + transformers only: install the carried wheels (.whl/: fla, einops,
# pytest, pytest-xdist, ...) into /tmp/site, and restore Triton's kernel + autotune cache from
# .gpu_cache/triton.tgz when an earlier call saved one, because fla's first-use autotuning
# otherwise compiles every config serially (minutes per kernel).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .gpu_cache/triton.tgz ]; then tar xzf .gpu_cache/triton.tgz -C "$TRITON_CACHE_DIR"; fi

# Call at the end: hands the (grown) Triton cache back through $OUT for the next call to carry.
save_triton_cache() { tar czf "$OUT/triton.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton.tgz"; }
