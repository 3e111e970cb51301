#!/usr/bin/env bash
# Issue 5's GPU benchmarks 1 and 2 in one call of the lent GPU (at most 9 minutes), from the repo root:
#   bash bench/gpu_all.sh
# Stages, most important first; each gets the smaller of its cap and the time left of BUDGET_S:
#   1. fla kernel autotuning for every shape used, in parallel processes (compiling is CPU-bound and
#      serial inside one process: minutes per kernel family on a cold cache); nothing is timed meanwhile;
#   2. hybrid inference, Llama-3.2-1B shape (the issue's targets);
#   3. one attention layer, teacher vs students, Llama-3.2-1B shape;
#   4. the DtR pass's own throughput and projected GPU-hours, Qwen2.5-1.5B shape (bench/dtr_pass.py);
#   5. hybrid inference, Qwen2.5-1.5B shape.
# Every script rewrites its results after each measurement, so a stage cut off by its limit still
# returns what it measured. Files back in $OUT (8, the most a call returns): gpu_all.log,
# attention.{md,json}, hybrid_llama-1b.{md,json}, hybrid_qwen-1.5b.{md,json}, triton.tgz.
# Carry .whl, and .gpu_cache/triton.tgz from the previous call (its $OUT/triton.tgz): the warm-up then
# skips most compiling or at least the autotuning.

source bench/device_env.sh
# Searching the largest decode batch runs into out-of-memory on purpose: expandable segments keep the
# allocator from failing on fragmentation before memory is really full.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
BUDGET_S=${BUDGET_S:-500}  # seconds since this shell started; leaves ~30 s to save the Triton cache
LOG="$OUT/gpu_all.log"
RETURNED_FILE_LIMIT=$((16 * 1024 * 1024))

limit_for() {  # limit_for CAP: the smaller of CAP and the seconds left
    local left=$((BUDGET_S - SECONDS))
    echo $((left < $1 ? left : $1))
}

stage() {  # stage NAME CAP COMMAND...: run COMMAND under its limit, output into the log
    local name=$1 limit; limit=$(limit_for "$2"); shift 2
    if ((limit < 20)); then
        echo "== $name: skipped, ${limit}s left" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - started))s" | tee -a "$LOG"
}

warm_kernels() {  # stage 1: one warm-up process per student kind and shape, in parallel
    local limit; limit=$(limit_for 300)
    echo "== warm-up of fla kernels (limit ${limit}s)" | tee -a "$LOG"
    local started=$SECONDS job
    for job in "llama-1b gla fwd fwd+bwd" "llama-1b gated_deltanet fwd fwd+bwd" "qwen-1.5b gla fwd"; do
        set -- $job
        timeout -k 10 "$limit" python3 -m bench.attention --warm-only --lengths 8192 --shape "$1" --kinds "$2" \
            --passes "${@:3}" 2>&1 | sed -u "s/^/[warm $1 $2] /" | tee -a "$LOG" &
    done
    wait
    echo "== warm-up: done after $((SECONDS - started))s" | tee -a "$LOG"
}

{
    echo "== $(date -u +%FT%TZ), budget ${BUDGET_S}s"
    nvidia-smi -L
    python3 - <<'EOF'
import importlib.metadata as metadata, platform
import torch
names = ["transformers", "triton", "fla-core", "flash-linear-attention", "flash-attn"]
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      ", ".join(f"{name} {version}" for name, version in versions.items()))
EOF
} 2>&1 | tee -a "$LOG"

warm_kernels
stage "hybrid inference, llama-1b" 210 python3 -m bench.hybrid_inference --model llama-1b --out "$OUT/hybrid_llama-1b.md"
stage "attention layer, llama-1b" 90 python3 -m bench.attention --shape llama-1b --out "$OUT/attention.md"
stage "DtR pass, qwen-1.5b" 120 python3 -m bench.dtr_pass  # its table goes to the log (8 files come back at most)
stage "hybrid inference, qwen-1.5b" 210 python3 -m bench.hybrid_inference --model qwen-1.5b --out "$OUT/hybrid_qwen-1.5b.md"

save_triton_cache 2>&1 | tee -a "$LOG"
if [[ -f "$OUT/triton.tgz" ]] && (($(stat -c %s "$OUT/triton.tgz") > RETURNED_FILE_LIMIT)); then
    # Too big to come back: keep only Triton's autotuning choices (*.autotune.json, small), so the next
    # call compiles the chosen config of each kernel instead of benchmarking every candidate.
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton.tgz" -T -)
    echo "== triton.tgz over 16 MiB: kept only the autotune choices ($(stat -c %s "$OUT/triton.tgz") bytes)" | tee -a "$LOG"
fi
rm -f "$OUT"/.*.tmp  # a results file a time limit caught mid-write (its previous version is complete)
echo "== done after ${SECONDS}s" | tee -a "$LOG"
