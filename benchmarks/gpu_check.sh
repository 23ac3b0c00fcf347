#!/usr/bin/env bash
# The first commands to run on a GPU machine: they check the GPU path in minutes. No GPU has been
# available to this project's own machines, so these are the checks CPU CI cannot make.
#
#   bash benchmarks/gpu_check.sh [PATH_TO_TinyRecursiveModels_CHECKOUT]
#
# What to expect (derived from the CPU figures and the hardware, not yet measured on a GPU):
#   1. `dis-run` bf16 smoke: run.json says "precision": "bf16" and "device": "cuda:0"; the
#      loss falls from ~1.1 to below 0.6 within the 200 steps; a few seconds of training.
#   2. SDPA: the flash (or memory-efficient) kernel is chosen for bf16 at head size 32-64;
#      "math" alone means a slow fallback (check the torch build and the head size).
#   3. 2-GPU parity: the per-step losses of 2 processes x 32 slots equal 1 process x 64 slots to
#      ~1e-6 in fp32 (NCCL all-reduce order may move the last bits), and both ranks report the
#      same parameter digest in their checkpoint files.
#   4. Throughput vs the official code (fp32 on the GPU, one process): dis at its default
#      precision (bf16 on CUDA) should be >= 1.5x the official fp32 step at both configs.
#   5. The preflight of every ARC recipe with this GPU's own probe (torch.cuda.max_memory_allocated),
#      then 30 real steps of arc1_compact against it. The recipe headers give what the CPU probe
#      and the published run times predict for an H100 (arc1_compact: ~37 GiB for its 512 slots
#      on one GPU by a CPU's bf16 probe, likely less with fused attention; ~160 h on 1 H100, 40 h
#      on 4). The real run's peak memory must stay within the preflight's figure x 1.25 (its
#      headroom) plus the CUDA context, and its seconds per step within 3x of the preflight's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "bf16 supported", torch.cuda.is_bf16_supported())
EOF

echo "== 1. bf16 training step on the GPU (precision auto -> bf16 on CUDA)"
dis-run recipes/nqueens_quick.toml --out "$OUT/bf16" --set train.steps=200 --set train.eval_interval=0
python - "$OUT/bf16" <<'EOF'
import json, sys
info = json.load(open(f"{sys.argv[1]}/run.json"))
print("device", info["device"], "precision", info["precision"])
assert info["precision"] == "bf16" and info["device"].startswith("cuda"), info
EOF

echo "== 2. which SDPA kernel a bf16 attention uses"
python - <<'EOF'
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(8, 8, 916, 32, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q)
        print("available:", backend.name)
    except RuntimeError as exc:
        print("not available:", backend.name, str(exc).splitlines()[0][:100])
EOF

echo "== 3. 2-GPU NCCL parity against 1 GPU (fp32, so that the comparison is tight)"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  common=(--set train.steps=20 --set train.precision=fp32 --set train.eval_interval=0 --set train.log_interval=1)
  dis-run recipes/nqueens_quick.toml --out "$OUT/one" "${common[@]}"
  deepspeed --num_gpus 2 --module dis_core.tools.cli run recipes/nqueens_quick.toml --out "$OUT/two" "${common[@]}"
  python - "$OUT/one" "$OUT/two" <<'EOF'
import json, sys
def losses(d):
    return [json.loads(l)["train/loss"] for l in open(f"{d}/metrics.jsonl") if '"train"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
print(f"max relative loss difference over {len(a)} steps: {worst:.2e}")
assert worst < 1e-4, "2-GPU run departs from the 1-GPU run"
EOF
else
  echo "only one GPU: skipped"
fi

echo "== 4. throughput against the official TRM code"
if [ $# -ge 1 ]; then
  python benchmarks/bench_vs_official.py --trm "$1" --threads "$(nproc)"
else
  echo "no TinyRecursiveModels checkout given: skipped (pass its path as the first argument)"
fi

echo "== 5. the preflight on this GPU, and 30 real steps of arc1_compact against it"
for recipe in recipes/arc1_*.toml recipes/arc2_*.toml; do
  echo "-- $recipe"
  dis-run "$recipe" --dry-run | sed -n '/^# preflight/,$p'
done
dis-run recipes/arc1_compact.toml --dry-run --json > "$OUT/arc1_preflight.json"
peak_file="$OUT/arc1_gpu_peak_mib"
echo 0 > "$peak_file"
( peak=0; while sleep 0.5; do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    if [ "$used" -gt "$peak" ]; then peak=$used; echo "$peak" > "$peak_file"; fi
  done ) &
poller=$!
dis-run recipes/arc1_compact.toml --out "$OUT/arc1_short" --set train.steps=30 --set train.log_interval=10 \
  --set train.eval_interval=0 --set train.eval_limit=1024 --set train.checkpoint_every=off
kill "$poller"
python - "$OUT/arc1_preflight.json" "$OUT/arc1_short" "$peak_file" <<'EOF'
import json, sys
pf = json.load(open(sys.argv[1]))["preflight"]
rows = {r["step"]: r for r in map(json.loads, open(f"{sys.argv[2]}/metrics.jsonl")) if r["split"] == "train"}
step_s = (rows[30]["cost/wall_time_s"] - rows[10]["cost/wall_time_s"]) / 20
peak = int(open(sys.argv[3]).read()) * 2**20
print(f"seconds a step: preflight {pf['seconds']['step']:.3f}, measured {step_s:.3f} (ratio {pf['seconds']['step'] / step_s:.2f})")
print(f"GPU memory: preflight needs {pf['needed'] / 2**30:.1f} GiB, nvidia-smi peak {peak / 2**30:.1f} GiB "
      f"(the CUDA context and the allocator's cache included)")
print("on paper (the recipe header's figures):", pf.get("gpus"))
assert peak <= pf["needed"] * 1.25 + 2**30, "the preflight underestimates this GPU's memory"
assert 1 / 3 <= pf["seconds"]["step"] / step_s <= 3, "the preflight's time is off by more than 3x"
EOF
