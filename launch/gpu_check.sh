#!/usr/bin/env bash
# The GPU check: what the CPU test suite cannot show, on a CUDA host, in one folder with a summary.
#
#   make setup-gpu && bash launch/gpu_check.sh [OUT_DIR]        # default runs/gpu_check
#   DRY_RUN=1 bash launch/gpu_check.sh OUT_DIR                   # every step on a CPU with tiny shapes (tests this)
#
# 1. launch check: every launch a config header documents, on CUDA (bf16, ZeRO-2/3, offload), one process per GPU:
#    tests/test_shipped_configs.py -k test_documented_launch_runs, heavy launches included
# 2. QLoRA: NF4 base linears on bitsandbytes' CUDA kernels with LoRA adapters, under ZeRO-2 (recipes/finetune.py)
# 3. benchmark: recipes/benchmark.py for base and large at their configs' resolution (step time, MFU), and a MILE
#    sweep row's step (tiny, 256 px, batch 20)
# 4. memory: base_finetune.yaml and large_finetune.yaml as shipped (ZeRO-2, their micro-batch and shapes) through
#    tests/recipes/measure_memory.py; each GPU's max_memory_allocated beside `scaling estimate-memory`'s figure
# 5. offload's optimizer step on this host's CPU: torch's fused AdamW against DeepSpeedCPUAdam (one flat partition)
# Then summary.md / summary.json (GPU name, each step's status, the numbers). A failing step is recorded and the
# next one runs; the exit status is the number of failed steps.
set -uo pipefail

OUT=$(realpath -m "${1:-runs/gpu_check}")
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
ACCELERATE=("$PYTHON" -m accelerate.commands.launch)

if [[ $DRY_RUN == 1 ]]; then
    # CPU stand-ins: 2 processes, the mini and test presets, one launch of the check, few steps, small tensors
    GPUS=2
    LAUNCH_FILTER="test_documented_launch_runs and base_finetune"
    BENCH=("--preset mini --batch 4 --image-size 64 --src-len 16 --tgt-len 8 --steps 1 --repeats 1 --skip loader generation")
    MEMORY_CONFIGS=(test_finetune)
    SHRINK=(model.image_size=32 data.max_src_len=48 data.max_tgt_len=24)
    ADAM_PARAMETERS=2000000
else
    GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
    [[ $GPUS -ge 1 ]] || { echo "no GPU found (nvidia-smi -L); DRY_RUN=1 runs the steps on this CPU" >&2; exit 3; }
    LAUNCH_FILTER="test_documented_launch_runs"
    BENCH=("--preset base --batch 32 --image-size 384 --src-len 128 --tgt-len 32"
           "--preset large --batch 16 --image-size 480 --src-len 128 --tgt-len 32"
           "--preset tiny --batch 20 --image-size 256 --src-len 64 --tgt-len 16")  # a MILE sweep row's step
    MEMORY_CONFIGS=(base_finetune large_finetune)
    SHRINK=()
    ADAM_PARAMETERS=200000000
fi
FAILED=()
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record the status
    local name=$1; shift
    echo "== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$status" >"$OUT/$name.status"
    [[ $status == 0 ]] || FAILED+=("$name")
}

"$PYTHON" -m scaling.cli env >"$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.csv" 2>/dev/null || true

# 1. launch check
step launch_check "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_shipped_configs.py -k "$LAUNCH_FILTER" \
    --junitxml "$OUT/launch_check.xml"

# 2. QLoRA NF4 under ZeRO-2
step qlora "${ACCELERATE[@]}" --config_file accelerate_configs/zero2.yaml --num_processes "$GPUS" \
    --main_process_port 29611 recipes/finetune.py --config recipes/configs/biomedgpt/test_finetune.yaml \
    peft.vision=freeze peft.encoder=lora peft.decoder=lora peft.quantize=nf4 peft.quant_compute_dtype=bfloat16 \
    train.mixed_precision=bf16 train.max_steps=4 "train.output_dir=$OUT/qlora" "data.cache_dir=$OUT/cache"

# 3. benchmark
for args in "${BENCH[@]}"; do
    preset=$(echo "$args" | awk '{print $2}')
    # shellcheck disable=SC2086  # the shapes are words
    step "benchmark_$preset" "$PYTHON" recipes/benchmark.py $args --precision bf16 --out "$OUT/benchmark_$preset"
done

# 4. memory: the shipped fine-tuning configs through the probe, then the planner for the same setting
for config in "${MEMORY_CONFIGS[@]}"; do
    step "memory_$config" "${ACCELERATE[@]}" --config_file accelerate_configs/zero2.yaml --num_processes "$GPUS" \
        --main_process_port 29612 tests/recipes/measure_memory.py recipes/finetune.py \
        --config "recipes/configs/biomedgpt/$config.yaml" model.checkpoint= "data.sources=[]" "data.eval_sources=[]" \
        data.synthetic_images=60 train.max_steps=3 eval.after_training=false logging.progress=false \
        "train.output_dir=$OUT/memory_$config" "data.cache_dir=$OUT/cache" "${SHRINK[@]}"
done

# 5. offloaded optimizer step on this CPU
step cpu_adam "$PYTHON" - "$ADAM_PARAMETERS" "$OUT/cpu_adam.json" <<'EOF'
# one flat fp32 partition, as DeepSpeed hands offloaded states to the optimizer; steps interleaved to share the noise
import json, statistics, sys, time
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

n, out = int(sys.argv[1]), sys.argv[2]

def partition():
    param = torch.nn.Parameter(torch.randn(n))
    param.grad = torch.randn(n) * 1e-3
    return [param]

optimizers = {"deepspeed_cpu_adam": DeepSpeedCPUAdam(partition(), lr=1e-3, weight_decay=0.01),
              "torch_fused_adamw": torch.optim.AdamW(partition(), lr=1e-3, weight_decay=0.01, fused=True)}
times = {name: [] for name in optimizers}
for optimizer in optimizers.values():
    optimizer.step()  # warm-up (and DeepSpeed's op build on first use)
for _ in range(8):
    for name, optimizer in optimizers.items():
        start = time.perf_counter()
        optimizer.step()
        times[name].append(time.perf_counter() - start)
result = {"parameters": n, "threads": torch.get_num_threads(), **{f"{k}_s": v for k, v in times.items()}}
result["fused_over_cpu_adam"] = statistics.median(times["torch_fused_adamw"]) / statistics.median(
    times["deepspeed_cpu_adam"])
json.dump(result, open(out, "w"), indent=1)
print(result)
EOF

# summary
"$PYTHON" - "$OUT" "$GPUS" "${MEMORY_CONFIGS[@]}" >"$OUT/summary.md" <<'EOF'
import json, statistics, sys, xml.etree.ElementTree as ET
from pathlib import Path
from scaling.config import load_config
from scaling.training.memory import format_bytes
from scaling.training.memory_estimate import estimate_for_config

out, gpus, configs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
gpu_list = (out / "gpus.csv").read_text().strip() if (out / "gpus.csv").exists() else ""
summary = {"gpus": gpu_list or "none (DRY_RUN on the CPU)",
           "steps": {p.stem: int(p.read_text()) for p in sorted(out.glob("*.status"))}}
print(f"# GPU check\n\nGPUs: {summary['gpus']}\n\n| step | exit status |\n|---|---|")
print("\n".join(f"| {name} | {status} |" for name, status in summary["steps"].items()))
if (out / "launch_check.xml").exists():
    suite = ET.parse(out / "launch_check.xml").getroot().find("testsuite")
    summary["launch_check"] = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"\nLaunch check: {summary['launch_check']}")
print("\n| preset | step (s) | samples/s | MFU | peak memory |\n|---|---|---|---|---|")
for bench in sorted(out.glob("benchmark_*/benchmark.json")):
    b = json.loads(bench.read_text())
    summary[bench.parent.name] = b
    print(f"| {b['shape']['preset']} | {b['step_time_s']:.3f} | "
          f"{b['samples_per_s']:.1f} | {b['mfu_of_matmul_peak']:.1%} | "
          f"{format_bytes(b['peak_memory_bytes'])} |")
print("\n| config | rank | measured training peak | planned | measured / planned |\n|---|---|---|---|---|")
for name in configs:
    run = out / f"memory_{name}"
    if not (run / "config.yaml").exists():
        continue
    cfg = load_config(run / "config.yaml")
    for rank_file in sorted(run.glob("memory_rank*.json")):
        m = json.loads(rank_file.read_text())
        planned = estimate_for_config(cfg, 2, gpus, device=m["device"])  # ZeRO-2, as launched above
        # CUDA: max_memory_allocated; CPU: the peak resident set less what the process held before the model
        used = m["training_peak"] - (m["before_model"] if m["device"] == "cpu" else 0)
        summary.setdefault("memory", []).append({"config": name, "file": rank_file.name, "measured": used,
                                                 "planned": planned.total})
        print(f"| {name} | {rank_file.stem[-1]} | {format_bytes(used)} | {format_bytes(planned.total)} | "
              f"{used / planned.total:.2f} |")
if (out / "cpu_adam.json").exists():
    adam = json.loads((out / "cpu_adam.json").read_text())
    summary["cpu_adam"] = adam
    print(f"\nOffloaded optimizer step, {adam['parameters']:,} fp32 parameters on this CPU: torch fused AdamW "
          f"{statistics.median(adam['torch_fused_adamw_s']) * 1e3:.0f} ms, DeepSpeedCPUAdam "
          f"{statistics.median(adam['deepspeed_cpu_adam_s']) * 1e3:.0f} ms (median of 8; ratio "
          f"{adam['fused_over_cpu_adam']:.2f})")
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
EOF
cat "$OUT/summary.md"
[[ ${#FAILED[@]} == 0 ]] || echo "failed steps: ${FAILED[*]} (logs in $OUT)" >&2
exit "${#FAILED[@]}"
