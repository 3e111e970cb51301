# Source on the lent GPU after tools/gpu/device_env.sh, in the call that carries .gpu_carry/triton_ab
# (and .gpu_carry/triton.sha256), when the call before copied .gpu_carry/triton_aa to /var/tmp/parts:
#   source tools/gpu/triton_371.sh
# Puts Triton 3.7.1 (packed by tools/gpu/pack_triton.sh) in front of the image's 3.6.0 on PYTHONPATH;
# later calls on the same warm machine source it again and reuse /var/tmp/triton371.
TRITON_SITE=/var/tmp/triton371
if [ ! -f "$TRITON_SITE/triton/__init__.py" ]; then
    cat /var/tmp/parts/triton_aa .gpu_carry/triton_ab > /var/tmp/triton.tar.xz || return 1
    echo "$(cat .gpu_carry/triton.sha256)  /var/tmp/triton.tar.xz" | sha256sum -c || return 1
    mkdir -p "$TRITON_SITE" && tar xJf /var/tmp/triton.tar.xz -C "$TRITON_SITE" || return 1
fi
export PYTHONPATH=$TRITON_SITE:$PYTHONPATH
# Kernels compiled by another Triton are not reused (the version is in the key), so a separate cache.
export TRITON_CACHE_DIR=/var/tmp/triton371-cache
mkdir -p "$TRITON_CACHE_DIR"
# fla's autotune choices under 3.7.1 (committed, then an earlier call's $OUT/triton371.tgz kept as .gpu_cache/triton371.tgz).
restore_autotune_choices 3.7.1 .gpu_cache/triton371.tgz
python3 -c "import triton, fla.utils as u; print('triton', triton.__version__, '| fla gated delta backward on Hopper:', \
not (u.IS_NVIDIA_HOPPER and u.TRITON_ABOVE_3_4_0 and not u.TRITON_ABOVE_3_7_1))"
